"""Run under torchrun by test_training_fsdp.py: one training run on the tiny model, then a report.

argv: TrainConfig fields as JSON, a directory for the reports, and optionally N: raise
KeyboardInterrupt at the N-th train_step call (a run killed mid-way). Each rank writes
``rank-R.json`` with the bytes of parameters it held after training (``local_parameter_bytes``).
"""

import json
import os
import sys
from pathlib import Path

from conftest import make_tiny_llama, make_tiny_tokenizer
from sparseft.training import TrainConfig, run_training
from sparseft.training import loop as loop_module
from sparseft.training.sharding import local_parameter_bytes


def crash_at(call: int) -> None:
    real_step, calls = loop_module.train_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    loop_module.train_step = crashing_step


def main() -> None:
    cfg, reports = TrainConfig.from_dict(json.loads(sys.argv[1])), Path(sys.argv[2])
    if len(sys.argv) > 3:
        crash_at(int(sys.argv[3]))
    base = make_tiny_llama()
    result = run_training(cfg, model=base, tokenizer=make_tiny_tokenizer())
    rank = int(os.environ.get("RANK", "0"))
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"rank-{rank}.json").write_text(json.dumps({"held": local_parameter_bytes(base), "losses": result.losses}))


if __name__ == "__main__":
    main()
