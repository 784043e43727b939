"""Cost of one dynamic re-selection against one ordinary sparse training step (CPU, random-init Llama).

Both on the same micro-batch: a training step is forward + backward (sparse gradients) + AdamW; a
re-selection is one extra forward + backward that forms each layer's dense weight gradient in turn,
ranks it and swaps entries (``sparseft.training.loop.reselect_step``); with ``--growth-batches N``,
N forward + backward passes summing each layer's dense gradient. Medians of ``--repeats`` runs.

    python -m sparseft.bench.reselect_step                 # small: 4 layers, hidden 256
    python -m sparseft.bench.reselect_step --shape tiny    # the tests' 2-layer, hidden-32 model
    python -m sparseft.bench.reselect_step --growth-batches 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from .shapes import SHAPES, build_llama


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sparseft.bench.reselect_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--growth-batches", type=int, default=1,
                        help="micro-batches whose summed gradient ranks the growth (reselect_growth_batches)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="1: on a shared box, 2 threads mostly measure spin-waiting")
    args = parser.parse_args()

    import torch

    from ..config import SparseConfig
    from ..model import get_sparse_model
    from ..training.loop import Distributed, growth_loss, reselect_step, train_step
    from ..training.reselect import ReselectSchedule

    torch.set_num_threads(args.threads)
    base = build_llama(args.shape, seed=0, min_positions=args.seq)
    model = get_sparse_model(base, SparseConfig(density=args.density, scorer="random"))
    model.train()
    params = model.sparse_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    batches = []
    for _ in range(args.growth_batches):
        ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    batch = batches[0]
    dist = Distributed()
    schedule = ReselectSchedule(every=1, fraction=args.fraction, total_steps=10**9)  # the full fraction every call

    def step():
        train_step(model, [batch], optimizer, params, 1.0, dist, "fp32")

    def reselect():
        reselect_step(model, optimizer, schedule, 1, [lambda m, b=b: growth_loss(m, b, dist, "fp32") for b in batches],
                      dist.enabled)

    step(), reselect()  # warm-up (allocator, kernel choice)
    step_s, reselect_s = median_time(step, args.repeats), median_time(reselect, args.repeats)
    layers = model.sparse_layers().values()
    print(json.dumps({
        "shape": args.shape, "params": sum(p.numel() for p in base.parameters()),
        "targeted": sum(layer.weight.numel() for layer in layers), "k": sum(layer.k for layer in layers),
        "swapped_per_reselect": sum(schedule.count(layer.k, layer.weight.numel(), 1) for layer in layers),
        "tokens_per_batch": args.batch_size * args.seq, "growth_batches": args.growth_batches, "threads": args.threads,
        "train_step_s": round(step_s, 4), "reselect_s": round(reselect_s, 4), "ratio": round(reselect_s / step_s, 2),
        "load_average_1min": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
