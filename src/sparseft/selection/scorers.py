"""Scorer registry: each scorer rates every entry of a weight; higher means "train this one".

A new scorer is one function plus one ``register_scorer`` line.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class ScoreContext:
    """What a scorer may look at for one module."""

    name: str
    weight: torch.Tensor
    seed: int
    grad_sum: torch.Tensor | None = None  # Σ g over calibration batches (fp32, CPU)
    grad_sq_sum: torch.Tensor | None = None  # Σ g² over calibration batches (fp32, CPU)
    num_batches: int = 0


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[[ScoreContext], torch.Tensor]
    needs_data: bool


SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, needs_data: bool) -> Callable:
    def wrap(fn: Callable[[ScoreContext], torch.Tensor]) -> Callable:
        SCORERS[name] = Scorer(name, fn, needs_data)
        return fn

    return wrap


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; available: {sorted(SCORERS)}")
    return SCORERS[name]


def module_seed(seed: int, name: str) -> int:
    """A per-module seed, so a module's random choice does not depend on which other modules exist."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@register_scorer("random", needs_data=False)
def random_scores(ctx: ScoreContext) -> torch.Tensor:
    """Uniform random scores: top-k of them is a seeded uniform random subset (the baseline)."""
    gen = torch.Generator().manual_seed(module_seed(ctx.seed, ctx.name))
    return torch.rand(ctx.weight.shape, generator=gen)


@register_scorer("magnitude", needs_data=False)
def magnitude_scores(ctx: ScoreContext) -> torch.Tensor:
    """|W|: data-free; trains the entries that already carry the most weight."""
    return ctx.weight.detach().abs().float().cpu()
