"""Scorer registry: each scorer rates every entry of one weight; higher means "train this one".

A new scorer is one function plus one ``register_scorer`` line. Scorers see one module at a time
(``ScoreContext``), so scoring never needs more than one module's scores in memory.

Data-driven scorers read gradient statistics gathered by ``gradstats.accumulate_gradients`` over
B calibration batches, where g_b is the gradient of batch b's mean task loss with respect to W:
``grad_sum`` = Σ_b g_b and ``grad_sq_sum`` = Σ_b g_b² (elementwise, fp32, CPU).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ConfigError, NonFiniteScoresError

GRAD_SUM = "grad_sum"
GRAD_SQ_SUM = "grad_sq_sum"


@dataclass(frozen=True)
class ScoreContext:
    """What a scorer may look at for one module."""

    name: str
    weight: torch.Tensor
    seed: int
    grad_sum: torch.Tensor | None = None  # Σ g over calibration batches (fp32, CPU)
    grad_sq_sum: torch.Tensor | None = None  # Σ g² over calibration batches (fp32, CPU)
    num_batches: int = 0
    scorer_weights: dict[str, float] = field(default_factory=dict)  # parts of the combined score
    # The module's own budget when the allocation fixes one (``proportional``, ``per_module``): a scorer
    # may then give exact scores only to entries that can reach its top ``keep`` (see ``combined``).
    keep: int | None = None


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[[ScoreContext], torch.Tensor]
    stats: tuple[str, ...]  # gradient statistics it may read; empty for data-free scorers

    def needs_data_for(self, scorer_weights: dict[str, float]) -> bool:
        """Whether selecting with this scorer needs calibration data: ``required_stats`` decides, so
        ``combined`` with only data-free parts (e.g. {"magnitude": 1.0}) needs none, as in ``select``."""
        return bool(required_stats(self.name, scorer_weights))


SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, stats: tuple[str, ...] = ()) -> Callable:
    def wrap(fn: Callable[[ScoreContext], torch.Tensor]) -> Callable:
        SCORERS[name] = Scorer(name, fn, tuple(stats))
        return fn

    return wrap


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; available: {sorted(SCORERS)}")
    return SCORERS[name]


def combined_parts(scorer_weights: dict[str, float]) -> dict[str, float]:
    """The validated, positive-weight parts of the combined score."""
    if not isinstance(scorer_weights, dict) or not scorer_weights:
        raise ConfigError(f"scorer_weights must map scorer names to weights, got {scorer_weights!r}")
    for name, w in scorer_weights.items():
        if name == "combined" or name not in SCORERS:
            parts = sorted(n for n in SCORERS if n != "combined")
            raise ConfigError(f"scorer_weights has an unknown part {name!r} (not a scorer that can be combined); "
                              f"allowed parts: {parts}")
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"scorer_weights.{name} must be a finite number >= 0, got {w!r}")
    parts = {name: float(w) for name, w in scorer_weights.items() if w > 0}
    if not parts:
        raise ConfigError(f"scorer_weights needs at least one weight > 0, got {scorer_weights!r}")
    return parts


def required_stats(scorer: str, scorer_weights: dict[str, float]) -> tuple[str, ...]:
    """Gradient statistics a scorer needs (for ``combined``: those of its weighted parts only).
    The one rule for "does this selection need data?" (``select``, ``Scorer.needs_data_for``)."""
    if scorer != "combined":
        return get_scorer(scorer).stats
    needed = {s for part in combined_parts(scorer_weights) for s in get_scorer(part).stats}
    return tuple(s for s in (GRAD_SUM, GRAD_SQ_SUM) if s in needed)


def module_seed(seed: int, name: str) -> int:
    """A per-module seed, so a module's random choice does not depend on which other modules exist."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def require(ctx: ScoreContext, stat: str) -> torch.Tensor:
    value = getattr(ctx, stat)
    if value is None or ctx.num_batches < 1:
        raise ConfigError(f"{ctx.name}: this scorer needs {stat} from calibration batches; pass a dataloader to select")
    return value


@register_scorer("random")
def random_scores(ctx: ScoreContext) -> torch.Tensor:
    """Uniform random scores: top-k of them is a seeded uniform random subset (the baseline)."""
    gen = torch.Generator().manual_seed(module_seed(ctx.seed, ctx.name))
    return torch.rand(ctx.weight.shape, generator=gen)


@register_scorer("magnitude")
def magnitude_scores(ctx: ScoreContext) -> torch.Tensor:
    """|W|: data-free; trains the entries that already carry the most weight."""
    return ctx.weight.detach().abs().float().cpu()


@register_scorer("gradient", stats=(GRAD_SUM,))
def gradient_scores(ctx: ScoreContext) -> torch.Tensor:
    """|ḡ| = |Σ_b g_b| / B: entries the task consistently pushes in one direction."""
    return require(ctx, GRAD_SUM).abs() / ctx.num_batches


@register_scorer("fisher", stats=(GRAD_SQ_SUM,))
def fisher_scores(ctx: ScoreContext) -> torch.Tensor:
    """Empirical Fisher diagonal Σ_b g_b² / B: how much information the data carries about each entry.

    g_b is the gradient of a batch's mean loss, so with batch size 1 this is the per-example empirical
    Fisher of FISH Mask (Sung et al. 2021); larger batches average out per-example noise first.
    """
    return require(ctx, GRAD_SQ_SUM) / ctx.num_batches


@register_scorer("taylor", stats=(GRAD_SUM,))
def taylor_scores(ctx: ScoreContext) -> torch.Tensor:
    """|W ⊙ ḡ|: first-order change of the loss if the entry were removed (Molchanov et al. 2019)."""
    grad_mean = require(ctx, GRAD_SUM) / ctx.num_batches
    return (ctx.weight.detach().float().cpu() * grad_mean).abs()


def quantile_normalise(scores: torch.Tensor) -> torch.Tensor:
    """q(s) = #{entries of the module with score <= s} / n, in (0, 1]; equal scores get equal q.

    Rank-based, so it is robust to the heavy tails of g² and puts parts with different units on one scale.
    NaN scores cannot be ranked; ``combined_scores`` refuses them before they get here.
    """
    flat = scores.reshape(-1).float()
    # Sorted as int32 keys in the floats' order: a stable integer sort is PyTorch's radix sort on CPU,
    # about twice as fast as sorting the floats.
    ordered, order = torch.sort(float_order_keys(flat), stable=True)
    # After the sort, #{<= s} is where the run of values equal to s ends: O(n), no binary searches.
    run_lengths = torch.unique_consecutive(ordered, return_counts=True)[1]
    del ordered
    count_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64  # int32 counts halve the memory
    counts = torch.repeat_interleave(torch.cumsum(run_lengths, 0, dtype=count_dtype), run_lengths)
    del run_lengths
    quantiles = torch.empty(flat.numel(), dtype=torch.float32)
    quantiles[order] = counts.to(torch.float32).div_(flat.numel())
    return quantiles.view(scores.shape)


def float_order_keys(flat: torch.Tensor) -> torch.Tensor:
    """int32 keys that order (and tie) as the fp32 values ``flat`` do: the bits of a non-negative float
    already order as integers; a negative one's are flipped except the sign. -0.0 becomes +0.0 first
    (they are equal scores)."""
    bits = (flat + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@register_scorer("combined", stats=(GRAD_SUM, GRAD_SQ_SUM))
def combined_scores(ctx: ScoreContext) -> torch.Tensor:
    """Σ_i w_i · q_i / Σ_i w_i, with q_i the per-module quantile of part i (``quantile_normalise``).

    Parts and weights come from ``SparseConfig.scorer_weights``; the default {"gradient": 0.5,
    "fisher": 0.5} averages the quantile of the gradient contribution |ḡ| and the quantile of the
    information (empirical Fisher Σg²/B). An entry scores high only if it ranks high in both: it
    is both consistently pushed by the task and informative. Because the parts are normalised per
    module, ``allocation="global"`` behaves close to ``proportional`` with this scorer.

    With a fixed budget (``ctx.keep``) only the entries that can reach the top ``keep`` are scored
    (``pruned_combined``); every other entry reads 0, below every real score, so the allocator picks
    the same entries, ties included, without sorting whole modules.
    """
    parts = combined_parts(ctx.scorer_weights)
    part_scores = {}
    for name in parts:
        scores = get_scorer(name).fn(ctx).reshape(-1).float()
        refuse_nan(scores, f"{ctx.name}: the {name!r} part of combined")
        part_scores[name] = scores
    if ctx.keep is not None:
        pruned = pruned_combined(part_scores, parts, ctx.keep)
        if pruned is not None:
            return pruned.view(ctx.weight.shape)
    # popped: each part's scores are freed once ranked
    return weighted_quantiles(lambda name: quantile_normalise(part_scores.pop(name)), parts).view(ctx.weight.shape)


def weighted_quantiles(quantile: Callable[[str], torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ_i w_i · q_i / Σ_i w_i over ``quantile(part)``, always in the same float operations, so entries
    scored in a subset get the very bits they get when the whole module is scored."""
    total = None
    for name, w in weights.items():
        q = quantile(name)
        total = torch.zeros_like(q) if total is None else total
        total.add_(q, alpha=w)
    return total.div_(sum(weights.values()))


def top_quantiles(flat: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ``m`` highest scores and their exact quantiles (those of ``quantile_normalise``).

    Every score above one of them is among them, so q(s) = (n - #{> s}) / n is known from the m alone;
    the last quantile bounds every entry left out (their scores are <= the m-th).
    """
    values, positions = torch.topk(flat, m)  # descending
    greater = m - torch.searchsorted(values.flip(0), values, right=True)
    return positions, (flat.numel() - greater).to(torch.float32).div_(flat.numel())


# Real combined scores carry a few float32 roundings (ulp 6e-8 below 1): a bound is only trusted this far above.
BOUND_MARGIN = 1e-6


def pruned_combined(part_scores: dict[str, torch.Tensor], weights: dict[str, float], keep: int) -> torch.Tensor | None:
    """Combined scores, exact wherever they can reach the top ``keep`` and 0 elsewhere; None when pruning
    would not pay (a budget of more than an eighth of the module).

    Only the top m of each part are ranked (m = 4 × keep, doubled until it suffices). An entry outside
    part i's top m has q_i at most that part's m-th quantile, so its combined score is at most
    1 - w_i (1 - q_i(m-th)) / Σw. The entries inside every part's top m get exact scores; once the
    keep-th best of them is above every such bound, they hold the whole top ``keep`` and its ties.
    """
    n = next(iter(part_scores.values())).numel()
    total_weight = sum(weights.values())
    m = 4 * keep
    while 0 < keep and 8 * keep <= n and 2 * m < n:
        hits = torch.zeros(n, dtype=torch.uint8)
        quantiles, bound = {}, 0.0
        for name, scores in part_scores.items():
            positions, q = top_quantiles(scores, m)
            hits[positions] += 1
            full = torch.zeros(n, dtype=torch.float32)
            full[positions] = q
            quantiles[name] = full
            bound = max(bound, 1.0 - weights[name] * (1.0 - float(q[-1])) / total_weight)
        candidates = (hits == len(part_scores)).nonzero().reshape(-1)
        if candidates.numel() >= keep:
            exact = weighted_quantiles(lambda name: quantiles[name][candidates], weights)
            if float(torch.topk(exact, keep, sorted=False).values.min()) > bound + BOUND_MARGIN:
                out = torch.zeros(n, dtype=torch.float32)
                out[candidates] = exact
                return out
        m *= 2
    return None


def refuse_nan(scores: torch.Tensor, what: str) -> None:
    """NaN has no rank: a quantile would hide broken statistics behind a finite combined score."""
    nan = torch.isnan(scores)
    if bool(nan.any()):
        raise NonFiniteScoresError(f"{what}: {int(nan.sum())} of {scores.numel()} scores are NaN; they cannot be ranked")
