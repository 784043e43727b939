"""How many entries each module gets, and which ones, given scores."""

from __future__ import annotations

import math

import torch

from ..config import SparseConfig
from ..errors import ConfigError


def total_budget(cfg: SparseConfig, total_entries: int) -> int:
    k = int(cfg.num_params) if cfg.num_params is not None else int(round(cfg.density * total_entries))
    if not 0 < k <= total_entries:
        raise ConfigError(
            f"budget of {k} entries does not fit the {total_entries} targeted entries "
            f"(density={cfg.density}, num_params={cfg.num_params})"
        )
    return k


def module_budgets(cfg: SparseConfig, sizes: dict[str, int]) -> dict[str, int]:
    """Exact k per module for the ``proportional`` and ``per_module`` allocations.

    proportional: the total budget split in proportion to module size by largest remainder, so the
    sum is exactly the total. per_module: round(density × size) in every module (each module exact;
    the total is their sum).
    """
    total = sum(sizes.values())
    if cfg.allocation == "per_module":
        density = cfg.density if cfg.num_params is None else cfg.num_params / total
        return {name: max(1, int(round(density * n))) for name, n in sizes.items()}
    k_total = total_budget(cfg, total)
    shares = {name: k_total * n / total for name, n in sizes.items()}
    budgets = {name: math.floor(s) for name, s in shares.items()}
    left = k_total - sum(budgets.values())
    by_remainder = sorted(sizes, key=lambda name: (-(shares[name] - budgets[name]), name))
    for name in by_remainder[:left]:
        budgets[name] += 1
    return budgets


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k highest scores (ties broken towards the lower index)."""
    flat = scores.reshape(-1).float()
    if k >= flat.numel():
        return torch.arange(flat.numel(), dtype=torch.long)
    # A stable descending sort makes ties deterministic, unlike topk.
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def allocate(cfg: SparseConfig, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks (sorted flat indices per module) from per-module scores under ``cfg.allocation``."""
    sizes = {name: s.numel() for name, s in scores.items()}
    if cfg.allocation != "global":
        budgets = module_budgets(cfg, sizes)
        return {name: top_k_indices(scores[name], budgets[name]) for name in scores}
    k_total = total_budget(cfg, sum(sizes.values()))
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    chosen = top_k_indices(flat, k_total)
    offsets = torch.tensor([0] + [sizes[n] for n in names]).cumsum(0)
    return {
        n: chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i] for i, n in enumerate(names)
    }
