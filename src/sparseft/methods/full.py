"""full: every weight trainable (the comparison's upper end); the artifact is a Hugging Face model directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .registry import Method, Prepared


class FullMethod(Method):
    name = "full"
    artifact_kind = "checkpoint"
    help = "train every weight, save an HF model directory"
    not_applicable = frozenset({"scorer", "density", "lora_rank"})

    def prepare(self, cfg, model: nn.Module, examples, pad_id: int, ckpt) -> Prepared:
        for param in model.parameters():
            param.requires_grad_(True)
        return model, None, {}

    def save(self, model: nn.Module, tokenizer, path: Path, provenance: dict[str, Any]) -> None:
        from ..loading import save_model_dir

        save_model_dir(model, tokenizer, path)

    def load_for_eval(
        self, base: str, artifact: str | None, dtype: str = "float32", quantize: str | None = None,
        quantize_skip: Sequence[str] = (),
    ) -> nn.Module:
        from ..loading import load_model

        return load_model(artifact, dtype=dtype)  # the checkpoint is a complete model directory, saved in dtype
