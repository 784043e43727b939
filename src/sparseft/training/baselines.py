"""The comparison methods, trained by the same loop: full fine-tuning and LoRA (through peft).

Each saves in its natural format: full → a Hugging Face model directory; LoRA → a peft adapter
directory (``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_dir
from ..config import SparseConfig
from ..loading import save_model_dir
from ..selection.budget import module_budgets, total_budget
from ..targets import find_targets


def prepare_full(model: nn.Module) -> nn.Module:
    """Every weight trainable."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def sparse_budget(model: nn.Module, sparse_cfg: SparseConfig) -> int:
    """How many entries a sparse run with ``sparse_cfg`` trains on ``model`` (without selecting them)."""
    sizes = {name: layer.weight.numel() for name, layer in find_targets(model, sparse_cfg.target_modules).items()}
    if sparse_cfg.allocation == "per_module":
        return sum(module_budgets(sparse_cfg, sizes).values())
    return total_budget(sparse_cfg, sum(sizes.values()))


def lora_rank_matching(model: nn.Module, target_modules: list[str], num_entries: int) -> int:
    """The LoRA rank whose trainable count (r × (in + out) per targeted layer) is closest to ``num_entries``."""
    per_rank = sum(layer.in_features + layer.out_features for layer in find_targets(model, target_modules).values())
    return max(1, int(round(num_entries / per_rank)))


def prepare_lora(model: nn.Module, target_modules: list[str], rank: int, alpha: float | None, seed: int) -> nn.Module:
    """A peft LoRA model on ``target_modules`` (dropout 0, so runs are deterministic)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A matrices are random: seed them so a run is reproducible
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=0.0,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in find_targets(model, target_modules)}),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_full(model: nn.Module, tokenizer, path: str | os.PathLike) -> Path:
    """An HF model directory (with the tokenizer), written atomically."""
    return save_model_dir(model, tokenizer, path)


def save_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """The peft adapter directory, written to a temporary sibling and renamed into place."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
    return path
