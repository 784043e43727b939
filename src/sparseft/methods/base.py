"""base: the base model as it is, trained by nothing (the reference row of a benchmark)."""

from __future__ import annotations

from torch import nn

from .registry import Method


class BaseMethod(Method):
    name = "base"
    artifact_kind = None  # trains nothing, so `sparseft train` and bench rows cannot choose it

    def load_for_eval(self, base: str, artifact: str | None) -> nn.Module:
        from ..loading import load_model

        return load_model(base)

    def label(self, row) -> str:
        return "base"
