"""``select``: from a model, a config and (for data-driven scorers) data, to masks."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..config import SparseConfig
from ..errors import ConfigError
from ..targets import find_targets
from .budget import allocate
from .scorers import ScoreContext, get_scorer


def select(model: nn.Module, cfg: SparseConfig, dataloader: Iterable | None = None) -> dict[str, torch.Tensor]:
    """Masks ``{module_name: sorted flat LongTensor}`` with the budget of ``cfg``.

    Example:
        >>> masks = select(model, SparseConfig(density=0.01, scorer="magnitude"))  # doctest: +SKIP
    """
    scorer = get_scorer(cfg.scorer)
    targets = find_targets(model, cfg.target_modules)
    if scorer.needs_data:
        raise ConfigError(f"scorer {cfg.scorer!r} needs calibration data; pass a dataloader to sparseft.select")
    scores = {
        name: scorer.fn(ScoreContext(name=name, weight=layer.weight, seed=cfg.seed))
        for name, layer in targets.items()
    }
    return allocate(cfg, scores)
