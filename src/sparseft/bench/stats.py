"""Statistics of a multi-seed comparison: mean ± std over seeds, and a paired bootstrap interval.

Two methods scored on the same test examples are compared example by example: the difference of their
per-example scores (each method's scores averaged over its seeds first), resampled over examples.
Pairing removes the between-example variance that both methods share, so the interval is much
narrower than one built from two independent means, and it is honest about the test set's size.

Example:
    >>> paired_bootstrap([1, 0, 1, 1], [0, 0, 1, 0], samples=1000).mean
    0.5
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean difference a − b over examples and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    confidence: float
    samples: int
    examples: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap of mean(a − b), resampling examples with replacement (the same draw for a and b).

    ``a[i]`` and ``b[i]`` are the two methods' scores on example i. Seeded: the same inputs give the
    same interval.
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or len(a) != len(b) or diff.size == 0:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty score lists, got {len(a)} and {len(b)}")
    if not 0 < confidence < 1 or samples < 1:
        raise ValueError(f"confidence must be in (0, 1) and samples >= 1, got {confidence} and {samples}")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 1000):  # chunks bound the index matrix to 1000 × examples
        count = min(1000, samples - start)
        picks = rng.integers(0, diff.size, size=(count, diff.size))
        means[start : start + count] = diff[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(diff.mean()), float(low), float(high), confidence, samples, int(diff.size))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def seed_averaged(per_seed: list[Sequence[float]]) -> list[float]:
    """Each example's score averaged over seeds (every seed scored the same examples in the same order)."""
    lengths = {len(scores) for scores in per_seed}
    if len(lengths) != 1:
        raise ValueError(f"the seeds scored different numbers of examples: {sorted(lengths)}")
    return [sum(column) / len(per_seed) for column in zip(*per_seed)]
