"""lora: a peft LoRA adapter on the targeted modules; the artifact is a peft adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SparseConfig
from ..errors import ConfigError
from ..targets import find_targets
from .registry import Method, Prepared

LORA_CONFIG_NAME = "adapter_config.json"


class LoraMethod(Method):
    name = "lora"
    artifact_kind = "adapter"
    help = "train a peft LoRA adapter on the targeted modules"
    run_knobs = ("lora_rank",)
    not_applicable = frozenset({"scorer", "density"})
    artifact_description = f"a PEFT adapter ({LORA_CONFIG_NAME})"

    def prepare(self, cfg, model: nn.Module, examples, pad_id: int, ckpt) -> Prepared:
        targets = cfg.selection.target_modules
        rank = cfg.lora_rank
        if cfg.lora_match_sparse:
            rank = lora_rank_matching(model, targets, sparse_budget(model, cfg.sparse_config()))
        return prepare_lora(model, targets, rank, cfg.lora_alpha, cfg.seed), None, {"lora_rank": rank}

    def save(self, model: nn.Module, tokenizer, path: Path, provenance: dict[str, Any]) -> None:
        model.save_pretrained(str(path))

    def base_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)

    def detect(self, path: Path) -> bool:
        return (path / LORA_CONFIG_NAME).is_file()

    def attach(self, model: nn.Module, path, allow_unverified_base: bool = False) -> nn.Module:
        from peft import PeftModel  # a PEFT adapter records no base fingerprint: nothing to allow

        return PeftModel.from_pretrained(model, str(path))

    def check_run(self, run, at: str) -> None:
        rank = run.lora_rank
        if rank is None:
            raise ConfigError(f"{at} ({run.id}): a lora row needs lora_rank (an integer or 'match')")
        if rank != "match" and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
            raise ConfigError(f"{at} ({run.id}): lora_rank must be a positive integer or 'match', got {rank!r}")

    def train_fields(self, run: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        if run["lora_rank"] == "match":
            # Rank chosen so LoRA trains as many numbers as a sparse row at the grid's density.
            return dict(lora_match_sparse=True, density=job["grid_density"])
        return dict(lora_rank=int(run["lora_rank"]))

    def row_facts(self, result, cfg) -> dict[str, Any]:
        return {"lora_rank": int(result.extra.get("lora_rank", cfg.lora_rank))}

    def label(self, row: dict[str, Any]) -> str:
        return f"lora r={row.get('lora_rank')}"


def sparse_budget(model: nn.Module, sparse_cfg: SparseConfig) -> int:
    """How many entries a sparse run with ``sparse_cfg`` trains on ``model`` (without selecting them)."""
    from ..selection.budget import module_budgets, total_budget

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
