"""Where the time of ``sparseft.select`` goes, on a real model and a task's training rows, and what share
of a training row it is.

The calibration batches are built as ``sparseft bench`` builds a row's (the task's training rows rendered
with the model's tokenizer, rows longer than ``--max-length`` skipped, the first batches of the training
stream), then ``select`` runs ``--repeats`` times with its phases timed (wall and process CPU seconds):

  passes      forward + backward over the calibration batches, the gradient hooks included
  hooks       of which: folding each gradient into the sums (``StatSum.add``)
  unpack      compact sums back to fp32 (``StatSum.value``)
  scoring     the scorer, module by module (for ``combined``: its parts and their quantiles)
  quantiles   of which: ranking the parts (``quantile_normalise``; ``top_quantiles`` under a fixed budget)
  allocation  picking each module's entries from its scores (``allocator.add``)

With ``--train-steps N`` a sparse run of N steps then trains on the chosen entries (a mask file, so it
selects nothing) to give the median training step of the same rows on the same machine.

    python -m sparseft.bench.select_cost --task sst2-fit --data ../shared/data/sst2/train.tsv \\
        --max-length 80 --batch-size 8 --batches 4 --density 0.00575 --repeats 2 --train-steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

PHASES = ("passes", "hooks", "unpack", "scoring", "quantiles", "allocation")


class PhaseClock:
    """Wall and process-CPU seconds summed per phase; ``wrap(phase, fn)`` times every call of ``fn``."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[phase] += time.perf_counter() - wall
                self.cpu[phase] += time.process_time() - cpu

        return timed


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def timing_phases(clock: PhaseClock) -> Iterator[None]:
    """``select``'s phases timed into ``clock`` (module attributes wrapped, restored afterwards)."""
    from ..selection import gradstats, scorers, selector

    def timed_scorer(name: str) -> scorers.Scorer:
        scorer = scorers.get_scorer(name)
        return scorers.Scorer(scorer.name, clock.wrap("scoring", scorer.fn), scorer.stats)

    def timed_allocator(*args, **kwargs):
        allocator = selector_make_allocator(*args, **kwargs)
        allocator.add = clock.wrap("allocation", allocator.add)
        return allocator

    selector_make_allocator = selector.make_allocator
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(selector, "accumulate_gradients", clock.wrap("passes", selector.accumulate_gradients)))
        stack.enter_context(patched(selector, "get_scorer", timed_scorer))
        stack.enter_context(patched(selector, "make_allocator", timed_allocator))
        stack.enter_context(patched(gradstats.StatSum, "add", clock.wrap("hooks", gradstats.StatSum.add)))
        stack.enter_context(patched(gradstats.StatSum, "value", clock.wrap("unpack", gradstats.StatSum.value)))
        stack.enter_context(patched(scorers, "quantile_normalise", clock.wrap("quantiles", scorers.quantile_normalise)))
        stack.enter_context(patched(scorers, "top_quantiles", clock.wrap("quantiles", scorers.top_quantiles)))
        yield


def timed_select(model, cfg, batches) -> tuple[dict, dict[str, Any]]:
    """``(masks, {"wall_s", "cpu_s", "phases": {phase: {"wall_s", "cpu_s"}}})`` of one ``select``."""
    from ..selection import select

    clock = PhaseClock()
    wall, cpu = time.perf_counter(), time.process_time()
    with timing_phases(clock):
        masks = select(model, cfg, batches)
    cost = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "phases": {p: {"wall_s": clock.wall[p], "cpu_s": clock.cpu[p]} for p in PHASES}}
    return masks, cost


def bench_rows(model: str, task: str, data: str, limit: int, max_length: int, out: Path) -> Path:
    """The training rows file ``sparseft bench`` would write for this task and model (``grid.prepare_train_file``)."""
    from .grid import prepare_train_file

    grid = SimpleNamespace(task=task, train_data=data, train_limit=limit, max_length=max_length, source="select_cost")
    path, _, _ = prepare_train_file(grid, model, out / "train.jsonl")
    return path


def calibration(rows: Path, tokenizer, max_length: int, batch_size: int, count: int, seed: int) -> list[dict]:
    """The first ``count`` batches of the training stream, as a sparse run's selection sees them."""
    from ..loading import pad_token_id
    from ..training.data import calibration_batches, load_examples

    examples = load_examples(rows, tokenizer, max_length)
    return calibration_batches(examples, batch_size, pad_token_id(tokenizer), seed, count)


def median_train_step(args, rows: Path, masks: dict, cfg, out: Path) -> float:
    """Median step time of ``args.train_steps`` training steps on ``masks`` (saved as a mask file: no selection)."""
    from ..loading import load_model
    from ..selection import save_masks
    from ..targets import find_targets
    from ..training import TrainConfig, run_training

    model = load_model(args.model)
    shapes = {name: layer.weight.shape for name, layer in find_targets(model, cfg.target_modules).items()}
    save_masks(out / "masks.safetensors", masks, shapes, cfg, base_model=args.model)
    train_cfg = TrainConfig.from_dict(dict(
        model=args.model, data=str(rows), out=str(out / "run"), method="sparse", steps=args.train_steps,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, masks=str(out / "masks.safetensors"),
        progress=False, device="cpu"))
    return run_training(train_cfg, model=model).median_step_s


def summary(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats."""
    med = lambda values: round(statistics.median(values), 2)  # noqa: E731
    return {"wall_s": med([c["wall_s"] for c in costs]), "cpu_s": med([c["cpu_s"] for c in costs]),
            "phases": {p: {k: med([c["phases"][p][k] for c in costs]) for k in ("wall_s", "cpu_s")} for p in PHASES}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2-fit")
    ap.add_argument("--data", required=True, help="the task's training file, as a bench config's train_data")
    ap.add_argument("--limit", type=int, default=320, help="training rows kept (a bench config's train_limit)")
    ap.add_argument("--max-length", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4, help="calibration batches")
    ap.add_argument("--scorer", default="combined")
    ap.add_argument("--density", type=float, default=0.00575)
    ap.add_argument("--allocation", default="proportional")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=0, help="also time this many training steps (0: none)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..config import SparseConfig
    from ..loading import load_model, load_tokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = SparseConfig(density=args.density, scorer=args.scorer, allocation=args.allocation,
                       calibration_batches=args.batches, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_rows(args.model, args.task, args.data, args.limit, args.max_length, Path(tmp))
        batches = calibration(rows, load_tokenizer(args.model), args.max_length, args.batch_size, args.batches, args.seed)
        model = load_model(args.model)
        costs = []
        for _ in range(args.repeats):
            masks, cost = timed_select(model, cfg, batches)
            costs.append(cost)
        result = {"args": vars(args), "tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches],
                  "selected": sum(int(m.numel()) for m in masks.values()), "median": summary(costs), "runs": costs}
        if args.train_steps:
            result["median_train_step_s"] = round(median_train_step(args, rows, masks, cfg, Path(tmp)), 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
