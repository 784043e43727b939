"""base: the base model as it is, trained by nothing (the reference row of a benchmark)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .registry import Method, load_base


class BaseMethod(Method):
    name = "base"
    artifact_kind = None  # trains nothing, so `sparseft train` and bench rows cannot choose it

    def load_for_eval(
        self, base: str, artifact: str | None, dtype: str = "float32", quantize: str | None = None,
        quantize_skip: Sequence[str] = (),
    ) -> nn.Module:
        return load_base(base, dtype, quantize, quantize_skip)

    def label(self, row) -> str:
        return "base"
