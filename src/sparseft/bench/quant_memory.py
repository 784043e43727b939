"""Memory of a sparse run over SmolLM2-135M with the base in fp32, bf16, int8, int4, nf4 or q4_1 (``train --quantize``);
``bf16-nf4`` is nf4 with the rest of the base (embeddings, norms) in bf16 (``--dtype bfloat16 --quantize nf4``).

Each precision trains in a fresh process (none inherits another's freed heap), with glibc told to
hand freed memory back, so RSS follows live bytes. Per precision, one JSON line:
  base_stored_bytes: bytes of the base's parameters as stored (int codes + scales when quantized;
      the trained k values not included)
  base_vs_fp32: base_stored_bytes over the fp32 base's bytes (its parameter count x 4)
  rss_end_bytes: resident set after training (runtime + base as stored + k values and AdamW state);
      rss_anon_end_bytes: its anonymous part (no mapped files: libraries, a memory-mapped model)
  train_peak_rss_bytes: peak resident set while the training loop ran (reset as it starts)
  peak_rss_bytes: the process's peak, which includes loading the fp32 base and selecting on it
      (int8/int4/nf4 are quantized after selection, on the full-precision weights)

    python -m sparseft.bench.quant_memory --steps 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .fsdp_memory import return_freed_memory, rss_bytes, write_rows

PRECISIONS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("float32", "int8"),
              "int4": ("float32", "int4"), "nf4": ("float32", "nf4"), "bf16-nf4": ("bfloat16", "nf4"),
              "q4_1": ("float32", "q4_1")}


def base_parameters(model) -> list:
    """The base's parameters: everything but the diff's values."""
    from ..sparse_linear import SparseLinear

    diff_values = {id(m.values) for m in model.modules() if isinstance(m, SparseLinear)}
    return [p for p in model.parameters() if id(p) not in diff_values]


def stored_bytes(model) -> int:
    from ..base_match import stored_tensors

    return sum(t.numel() * t.element_size() for p in base_parameters(model) for t in stored_tensors(p))


def fp32_bytes(model) -> int:
    """The base's bytes in fp32 (a quantized weight counts its logical shape, not its codes)."""
    return 4 * sum(p.numel() for p in base_parameters(model))


def measure(precision: str, args) -> dict:
    from ..training import TrainConfig, job, run_training

    dtype, scheme = PRECISIONS[precision]
    seen: dict = {}
    real_loop = job.train_loop

    def measured_loop(model, *a, **kw):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on: the training loop's peak
        stats = real_loop(model, *a, **kw)
        seen.update(train_peak=rss_bytes("VmHWM"), base=stored_bytes(model), fp32=fp32_bytes(model))
        return stats

    job.train_loop = measured_loop
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_rows(data, 64)
        cfg = TrainConfig.from_dict(dict(
            model=args.model, data=str(data), out=str(Path(tmp) / "run"), density=args.density, steps=args.steps,
            batch_size=args.batch_size, max_length=64, dtype=dtype, quantize=scheme, progress=False, device="cpu"))
        result = run_training(cfg)
    return {"precision": precision, "k": result.trainable, "base_stored_bytes": seen["base"],
            "base_vs_fp32": round(seen["base"] / seen["fp32"], 3),
            "rss_end_bytes": rss_bytes(), "rss_anon_end_bytes": rss_bytes("RssAnon"), "train_peak_rss_bytes": seen["train_peak"],
            "peak_rss_bytes": result.peak_memory_bytes, "first_loss": result.losses[0], "last_loss": result.losses[-1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help=f"comma-separated subset of {','.join(PRECISIONS)}")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this precision
    args = parser.parse_args(argv)
    if args.one:
        return_freed_memory()
        print(json.dumps(measure(args.one, args)), flush=True)
        return
    for precision in args.precisions.split(","):
        child = [sys.executable, "-m", "sparseft.bench.quant_memory", *(argv or sys.argv[1:]), "--one", precision]
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
