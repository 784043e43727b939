"""``select``: from a model, a config and (for data-driven scorers) data, to masks.

Memory bound. For a model whose N parameters take B = N × itemsize bytes in their own dtype,
selection holds at most about B extra bytes (plus the activations of one calibration batch):

- gradient sums: fp32 on CPU, 4 bytes per entry per statistic (``gradient``/``taylor``: Σg,
  ``fisher``: Σg², ``combined``: both). If they would not fit in one pass they are kept compact
  (fp16 with a per-module scale, 2 bytes; same masks up to near-ties, see ``gradstats``), and if
  those do not fit either, the modules are measured in groups, one pass over the same calibration
  batches per group. Each pass is a forward and backward per batch, the cost of selection;
- one module's gradient at a time (freed inside the backward pass, see ``gradstats``);
- scoring one module at a time (transient; reserved at 64 bytes per entry of the largest module,
  which covers the sort buffers of ``combined`` and the allocator's slack as measured);
- the allocation: chosen indices (8 bytes per chosen entry), or for ``global`` a running top-k of at
  most k candidates (16 bytes per candidate, reserved 3x for the merge copies).

The pass counts and peak memory this gives on real and random models (and how they were measured)
are in docs/selection.md, "Memory"; ``tests/test_selection.py::test_peak_memory_within_one_model_buffer``
pins the bound.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..config import SparseConfig
from ..errors import ConfigError, NonFiniteScoresError
from ..quantize import dequantized, is_quantized
from ..targets import find_targets
from .budget import GlobalTopK, make_allocator
from .gradstats import COMPACT_STAT_BYTES, STAT_BYTES, accumulate_gradients, take_batches
from .scorers import ScoreContext, get_scorer, required_stats

SCORING_BYTES_PER_ENTRY = 64  # one module: scores, sort values + indices, quantiles, and allocator slack (measured)
CANDIDATE_BYTES = 16  # value fp32 + index int64 + module id int32 per running global candidate
MASK_BYTES = 8  # int64 index per chosen entry
MIN_ACCUMULATOR_BYTES = 2**20  # toy models, whose reserves exceed their size, still take one pass


def model_bytes(model: nn.Module) -> int:
    """B: the bytes of all parameters in their own dtypes (the "one model-sized buffer")."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def plan_passes(sizes: dict[str, int], bytes_per_entry: int, budget: int) -> list[list[str]]:
    """Consecutive groups of modules whose accumulators fit ``budget`` bytes (a module never splits)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        need = n * bytes_per_entry
        if groups[-1] and used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return groups


STAT_PRECISIONS = ("auto", "fp32", "compact")


def plan_statistics(
    sizes: dict[str, int], num_stats: int, budget: int, stat_precision: str = "auto"
) -> tuple[list[list[str]], bool]:
    """``(groups of modules, one pass each; compact sums?)``: fp32 when that takes one pass, else compact.

    Fewer passes is what makes selection cheaper (each is a forward and backward per calibration batch).
    """
    if stat_precision not in STAT_PRECISIONS:
        raise ConfigError(f"stat_precision must be one of {STAT_PRECISIONS}, got {stat_precision!r}")
    exact = plan_passes(sizes, STAT_BYTES * num_stats, budget)
    if stat_precision == "fp32" or (stat_precision == "auto" and len(exact) == 1):
        return exact, False
    return plan_passes(sizes, COMPACT_STAT_BYTES * num_stats, budget), True


def accumulator_budget(cfg_budget: int, sizes: dict[str, int], k_total: int, is_global: bool) -> int:
    """What is left for gradient sums once scoring and allocation have their share (at least 1 MiB)."""
    allocation = k_total * (3 * CANDIDATE_BYTES if is_global else MASK_BYTES)  # merge copies + slack
    return max(cfg_budget - allocation - SCORING_BYTES_PER_ENTRY * max(sizes.values()), MIN_ACCUMULATOR_BYTES)


def select(
    model: nn.Module,
    cfg: SparseConfig,
    dataloader: Iterable | None = None,
    max_state_bytes: int | None = None,
    stat_precision: str = "auto",
) -> dict[str, torch.Tensor]:
    """Masks ``{module_name: sorted flat LongTensor}`` with the budget of ``cfg``.

    ``dataloader`` is any iterable of dicts of tensors that ``model(**batch).loss`` accepts (input_ids,
    attention_mask, labels); the first ``cfg.calibration_batches`` are used. Data-free scorers
    (random, magnitude) ignore it. ``max_state_bytes`` caps the memory selection keeps besides the
    model (default: the model's own size in its dtype); a smaller cap means compact gradient sums
    or more passes. ``stat_precision``: ``auto`` keeps the sums in fp32 when they fit in one pass and
    compact otherwise (fewer passes; the same masks up to near-ties); ``fp32`` or ``compact`` forces one.

    Example:
        >>> masks = select(model, SparseConfig(density=0.01, scorer="fisher"), dataloader)  # doctest: +SKIP
    """
    if stat_precision not in STAT_PRECISIONS:
        raise ConfigError(f"stat_precision must be one of {STAT_PRECISIONS}, got {stat_precision!r}")
    scorer = get_scorer(cfg.scorer)
    stats = required_stats(cfg.scorer, cfg.scorer_weights)  # also validates the parts of `combined`
    targets = find_targets(model, cfg.target_modules)
    sizes = {name: layer.weight.numel() for name, layer in targets.items()}
    allocator = make_allocator(cfg, sizes)  # checks the budget before any expensive pass
    batches: list = []
    groups = [list(sizes)]
    if stats:
        if dataloader is None:
            raise ConfigError(f"scorer {cfg.scorer!r} needs calibration data; pass a dataloader to sparseft.select")
        batches = take_batches(dataloader, cfg.calibration_batches)
        budget = accumulator_budget(
            model_bytes(model) if max_state_bytes is None else max_state_bytes,
            sizes,
            allocator.k_total,
            isinstance(allocator, GlobalTopK),
        )
        groups, compact = plan_statistics(sizes, len(stats), budget, stat_precision)
    for group in groups:
        sums = accumulate_gradients(model, {n: targets[n] for n in group}, batches, stats, compact) if stats else {}
        for name in group:
            # popped: this module's sums are freed once it is scored
            module_sums = {stat: total.value() for stat, total in sums.pop(name, {}).items()}
            ctx = ScoreContext(
                name=name,
                weight=dense_weight(targets[name].weight),
                seed=cfg.seed,
                num_batches=len(batches),
                scorer_weights=cfg.scorer_weights,
                keep=allocator.fixed_budget(name),
                **module_sums,
            )
            try:
                allocator.add(name, scorer.fn(ctx))
            except NonFiniteScoresError as e:
                raise NonFiniteScoresError(f"{e}; {non_finite_cause(cfg, ctx.weight, stats)}") from None
            del ctx, module_sums
    return allocator.masks()


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """What a scorer reads as W: a quantized weight's dequantized values (one module at a time)."""
    return dequantized(weight) if is_quantized(weight) else weight


def non_finite_cause(cfg: SparseConfig, weight: torch.Tensor, stats: tuple[str, ...]) -> str:
    """The likely reason a module's scores came out NaN/Inf, and what to do about it."""
    if not bool(torch.isfinite(weight).all()):
        return "the weight itself holds NaN/Inf, so the base model is broken"
    if stats:
        dtype = str(weight.dtype).removeprefix("torch.")
        return (
            f"the gradient statistics of scorer {cfg.scorer!r} overflowed on the calibration batches "
            f"(model in {dtype}); select with the model loaded in float32 (--dtype float32), "
            "or with fewer or shorter calibration batches"
        )
    return f"scorer {cfg.scorer!r} produced them from a finite weight"
