"""Time and peak memory of `sparseft.select` on a model of SmolLM2-135M's shape (random init, fp32).

Each measurement runs in a fresh process so none inherits another's freed heap:
  activations: one forward+backward of one calibration batch (what any gradient scorer must pay)
  select:      sparseft.select with the given scorer over the calibration batches
  naive:       keep every .grad, then fp32 copies of Σg and Σg² (what selection costs without care;
               ``statistics_MiB``: the bytes of those copies)
Peak = growth of the peak resident set (Linux VmHWM, reset via /proc/self/clear_refs) over the RSS
after the model and batches exist.

    python -m sparseft.bench.select_memory --scorer combined --batches 8 --batch-size 4 --seq 256
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from .shapes import build_llama

SHAPE = "smollm2-135m"


def rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(mode: str, args) -> dict:
    import torch

    from ..config import SparseConfig
    from ..selection.selector import model_bytes, select
    from ..targets import find_targets

    torch.set_num_threads(args.threads)
    model = build_llama(SHAPE, seed=0)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    cfg = SparseConfig(density=args.density, scorer=args.scorer, allocation=args.allocation, calibration_batches=args.batches)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = rss("VmRSS")
    start = time.perf_counter()
    extra = {}
    if mode == "activations":
        for p in model.parameters():
            p.requires_grad_(False)
        first = next(iter(find_targets(model, ["q_proj"]).values())).weight
        first.requires_grad_(True)  # the backward runs through the whole network
        model(**batches[0]).loss.backward()
        first.grad = None
    elif mode == "select":
        masks = select(model, cfg, batches)
        assert sum(m.numel() for m in masks.values()) > 0
    else:
        for b in batches:
            model(**b).loss.backward()
        targets = find_targets(model, cfg.target_modules)
        # Σg and Σg² copies, allocated to be measured: with the kept .grad they are the naive peak.
        statistics = [{n: t.weight.grad.clone() for n, t in targets.items()},
                      {n: t.weight.grad.square() for n, t in targets.items()}]
        extra["statistics_MiB"] = round(sum(g.numel() * g.element_size() for s in statistics for g in s.values()) / 2**20, 1)
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": round(seconds, 1), "peak_growth_MiB": round((rss("VmHWM") - base) / 2**20, 1),
            "model_MiB": round(model_bytes(model) / 2**20, 1), "params": sum(p.numel() for p in model.parameters()),
            **extra}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m sparseft.bench.select_memory",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["activations", "select", "naive", "all"], default="all")
    p.add_argument("--scorer", default="combined")
    p.add_argument("--allocation", default="proportional")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.mode != "all":
        print(json.dumps(measure(args.mode, args)))
        return
    rest = [a for a in sys.argv[1:] if not a.startswith("--mode")]
    for mode in ("activations", "select", "naive"):
        cmd = [sys.executable, "-m", "sparseft.bench.select_memory", "--mode", mode, *rest]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
