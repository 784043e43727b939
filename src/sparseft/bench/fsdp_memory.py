"""Memory per process of a sparse run with the base replicated (DDP) or sharded (``--fsdp``).

Run under torchrun (or alone for the 1-process row); every rank prints one JSON line:
  held_base_bytes / held_trainable_bytes: parameter bytes this process holds after training
      (its shard of the base under FSDP; the k fp32 values), from ``local_parameter_bytes``
  optimizer_state_bytes: AdamW's two moments of the k values
  rss_end_bytes: resident set at the end; peak_rss_bytes: the process's peak (it includes loading
      and selecting on the whole base, which every process does before sharding)
glibc is told to hand freed memory back (``return_freed_memory``), so RSS follows live bytes.

    torchrun --nproc-per-node 2 -m sparseft.bench.fsdp_memory --shape small --fsdp
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import tempfile
from pathlib import Path

from .shapes import build_llama, text_tokenizer

WORDS = ("good", "bad", "fine", "great", "awful", "plain", "bright", "dull")


def return_freed_memory() -> None:
    """Large blocks mmap'd and the heap trimmed on free (glibc), so RSS follows live bytes: otherwise the
    freed whole-base copy stays resident under FSDP's shards and the comparison shows the allocator."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD


def rss_bytes(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def write_rows(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            word = WORDS[i % len(WORDS)]
            f.write(json.dumps({"prompt": f"review : {word} {WORDS[(i * 3) % len(WORDS)]} ->", "completion": word}) + "\n")


def measure(args) -> dict:
    from ..training import TrainConfig, run_training
    from ..training.sharding import local_parameter_bytes

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_rows(data, 64)
        tokenizer = text_tokenizer([data.read_text()])
        base = build_llama(args.shape, 0)
        cfg = TrainConfig.from_dict(dict(
            model=args.shape, data=str(data), out=str(Path(tmp) / "run"), density=args.density, steps=args.steps,
            batch_size=args.batch_size, max_length=64, fsdp=args.fsdp, progress=False, value_dtype="float32"))
        result = run_training(cfg, model=base, tokenizer=tokenizer)
        held = local_parameter_bytes(base)
    return {
        "shape": args.shape, "fsdp": args.fsdp, "rank": int(os.environ.get("RANK", "0")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")), "k": result.trainable,
        "base_bytes": result.total_params * 4, "held_base_bytes": held["base"],
        "held_trainable_bytes": held["trainable"], "optimizer_state_bytes": result.optimizer_state_bytes,
        "rss_end_bytes": rss_bytes(), "peak_rss_bytes": result.peak_memory_bytes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", help="a shape of sparseft.bench.shapes (fp32, random init)")
    parser.add_argument("--fsdp", action="store_true", help="shard the base (else DDP replicates it)")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    return_freed_memory()
    print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
