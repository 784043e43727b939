"""How many entries each module gets, and which ones, given scores.

Allocators take one module's scores at a time (``add``), so the scores of the whole model never
sit in memory together: per-module budgets keep only each module's chosen indices; the global
top-k keeps a running set of at most k candidates.
"""

from __future__ import annotations

import math

import torch

from ..config import SparseConfig, check_budget_request
from ..errors import ConfigError, NonFiniteScoresError


def total_budget(cfg: SparseConfig, total_entries: int) -> int:
    """k for the whole model: ``num_params`` exactly, or round(density × entries)."""
    k = int(cfg.num_params) if cfg.num_params is not None else math.floor(cfg.density * total_entries + 0.5)
    if not 0 < k <= total_entries:
        raise ConfigError(
            f"budget of {k} entries does not fit the {total_entries} targeted entries "
            f"(density={cfg.density}, num_params={cfg.num_params})"
        )
    return k


def module_budgets(cfg: SparseConfig, sizes: dict[str, int]) -> dict[str, int]:
    """Exact k per module for the ``proportional`` and ``per_module`` allocations.

    proportional: the total budget split in proportion to module size by largest remainder (ties to
    the earlier name), so the sum is exactly the total. per_module: round(density × size) in every
    module, so each module's own density is as close to ``density`` as its size allows; the total is
    their sum. per_module fixes a density, so it refuses ``num_params`` (``check_budget_request``).
    """
    total = sum(sizes.values())
    check_budget_request(cfg.allocation, cfg.num_params)
    if cfg.allocation == "per_module":
        budgets = {name: math.floor(cfg.density * n + 0.5) for name, n in sizes.items()}
        if sum(budgets.values()) == 0:
            raise ConfigError(f"density={cfg.density} rounds to 0 entries in every module; raise the density")
        return budgets
    k_total = total_budget(cfg, total)
    shares = {name: k_total * n / total for name, n in sizes.items()}
    budgets = {name: math.floor(s) for name, s in shares.items()}
    left = k_total - sum(budgets.values())
    by_remainder = sorted(sizes, key=lambda name: (-(shares[name] - budgets[name]), name))
    for name in by_remainder[:left]:
        budgets[name] += 1
    return budgets


def check_finite_scores(flat: torch.Tensor, name: str) -> None:
    """Refuse NaN/Inf scores: topk ranks NaN above every number, so a single one would make the
    k-th value NaN and select nothing at all (and an Inf crowds out the real ranking)."""
    bad = ~torch.isfinite(flat)
    if bool(bad.any()):
        raise NonFiniteScoresError(
            f"{name}: {int(bad.sum())} of {flat.numel()} scores are NaN or Inf "
            f"(first at flat index {int(bad.nonzero()[0])}); they cannot be ranked"
        )


def top_k_order(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k highest values, best first; ties go to the lower position.

    Same result as a stable descending sort of everything, but only the entries at or above the
    k-th largest value (found by topk, which is not stable) are sorted.
    """
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    if k < flat.numel():
        kth = torch.topk(flat, k, sorted=False).values.min()
        candidates = (flat >= kth).nonzero().reshape(-1)  # ascending positions, every tie included
    else:
        candidates = torch.arange(flat.numel())
    order = torch.sort(flat[candidates], descending=True, stable=True).indices[:k]
    return candidates[order]


def top_k_indices(scores: torch.Tensor, k: int, name: str = "scores") -> torch.Tensor:
    """Sorted flat indices of the k highest scores (ties broken towards the lower index).
    Raises NonFiniteScoresError (naming ``name``) if any score is NaN or Inf."""
    flat = scores.reshape(-1).float()
    check_finite_scores(flat, name)
    if k >= flat.numel():
        return torch.arange(flat.numel(), dtype=torch.long)
    return torch.sort(top_k_order(flat, k)).values


class ModuleTopK:
    """Fixed k per module: keeps only the chosen indices of each module added."""

    def __init__(self, budgets: dict[str, int]):
        self.budgets = budgets
        self.chosen: dict[str, torch.Tensor] = {}

    @property
    def k_total(self) -> int:
        return sum(self.budgets.values())

    def fixed_budget(self, name: str) -> int | None:
        return self.budgets[name]

    def add(self, name: str, scores: torch.Tensor) -> None:
        self.chosen[name] = top_k_indices(scores, self.budgets[name], name)

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: self.chosen[name] for name in self.budgets}


class GlobalTopK:
    """One top-k over all modules, kept as a running set of at most k candidates.

    The result equals a stable top-k over the concatenation of all scores in the order modules are
    added (ties go to the earlier module, then the lower index) without ever concatenating them:
    memory is O(k) plus one module's scores.
    """

    def __init__(self, k: int, names: list[str]):
        self.k = k
        self.names = list(names)
        self.values = torch.empty(0, dtype=torch.float32)
        self.module_ids = torch.empty(0, dtype=torch.int32)
        self.indices = torch.empty(0, dtype=torch.long)

    @property
    def k_total(self) -> int:
        return self.k

    def fixed_budget(self, name: str) -> int | None:
        """None: a module's share of the global top-k is only known once every module is scored."""
        return None

    def add(self, name: str, scores: torch.Tensor) -> None:
        flat = scores.reshape(-1).float()
        check_finite_scores(flat, name)  # before the running candidates are touched
        positions = torch.arange(flat.numel())
        if self.values.numel() == self.k:
            # Full: a newcomer must beat the weakest candidate outright (ties keep the earlier module).
            positions = (flat > self.values[-1]).nonzero().reshape(-1)
            flat = flat[positions]
        local = top_k_order(flat, min(self.k, flat.numel()))
        values = torch.cat([self.values, flat[local]])
        module_ids = torch.cat([self.module_ids, torch.full((local.numel(),), self.names.index(name), dtype=torch.int32)])
        indices = torch.cat([self.indices, positions[local]])
        # Earlier candidates come first in the concatenation, so the stable sort keeps them ahead on ties.
        keep = top_k_order(values, self.k)
        self.values, self.module_ids, self.indices = values[keep], module_ids[keep], indices[keep]

    def masks(self) -> dict[str, torch.Tensor]:
        return {
            name: torch.sort(self.indices[self.module_ids == i]).values for i, name in enumerate(self.names)
        }


def make_allocator(cfg: SparseConfig, sizes: dict[str, int]) -> ModuleTopK | GlobalTopK:
    """The allocator for ``cfg.allocation``; raises ConfigError for a budget that cannot be met."""
    if cfg.allocation == "global":
        return GlobalTopK(total_budget(cfg, sum(sizes.values())), list(sizes))
    return ModuleTopK(module_budgets(cfg, sizes))


def allocate(cfg: SparseConfig, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks (sorted flat indices per module) from per-module scores under ``cfg.allocation``."""
    allocator = make_allocator(cfg, {name: s.numel() for name, s in scores.items()})
    for name, s in scores.items():
        allocator.add(name, s)
    return allocator.masks()


def budget_report(masks: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, dict[str, float]]:
    """Where the budget landed: ``{module: {"k", "numel", "density"}}`` plus a ``"total"`` row."""
    rows = {
        name: {"k": int(masks[name].numel()), "numel": int(n), "density": masks[name].numel() / n}
        for name, n in sizes.items()
        if name in masks
    }
    k, numel = sum(r["k"] for r in rows.values()), sum(r["numel"] for r in rows.values())
    rows["total"] = {"k": k, "numel": numel, "density": k / numel if numel else 0.0}
    return rows


def format_budget_report(report: dict[str, dict[str, float]]) -> str:
    width = max(len(name) for name in report)
    lines = [f"{'module':<{width}}  {'k':>10}  {'entries':>12}  {'density':>9}"]
    for name, row in report.items():
        lines.append(f"{name:<{width}}  {row['k']:>10,}  {row['numel']:>12,}  {100 * row['density']:>8.4f}%")
    return "\n".join(lines)
