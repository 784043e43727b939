"""``run_training``: the whole job, read top to bottom.

load model + tokenizer → read and validate all data (nothing written yet) → choose the trainable
parameters (sparse masks, all weights, or LoRA) → optimizer (+ checkpoint on resume) → train loop →
save the artifact and train_config.yaml (with metrics.jsonl and checkpoints) into ``out`` atomically.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from ..atomic import atomic_dir, atomic_file
from ..config import SparseConfig
from ..diffio import CONFIG_NAME, read_diff
from ..errors import ConfigError
from ..model import SparseModel, get_sparse_model
from ..loading import load_model, load_tokenizer
from ..quantize import quantize_sparse_model
from ..selection import read_mask_file, select
from ..selection.scorers import get_scorer
from ..loading import pad_token_id
from .baselines import lora_rank_matching, prepare_full, prepare_lora, save_full, save_lora, sparse_budget
from .checkpoint import (
    CHECKPOINTS_DIR,
    Checkpoint,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    restore_checkpoint,
)
from .config import TrainConfig
from .data import Example, calibration_batches, data_sha256, load_examples
from .sharding import shard_sparse_model
from .loop import METRICS_NAME, Distributed, LoopStats, make_optimizer, setup_distributed, train_loop, trainable_parameters

TRAIN_CONFIG_NAME = "train_config.yaml"


@dataclass
class TrainResult:
    """What a run produced and what it cost."""

    out: Path
    method: str
    steps: int
    losses: list[float]
    trainable: int
    total_params: int
    wall_time_s: float
    median_step_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    optimizer_state_bytes: int
    artifact_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "out"}, "out": str(self.out)}


def run_training(cfg: TrainConfig, model: nn.Module | None = None, tokenizer=None) -> TrainResult:
    """Train as ``cfg`` says and save into ``cfg.out``; usable in-process (pass ``model``/``tokenizer``)
    or from ``sparseft train`` / ``torchrun -m sparseft train``.

    Example:
        >>> cfg = TrainConfig(model="smollm2-135m", data="train.jsonl", out="runs/a", steps=50)  # doctest: +SKIP
        >>> result = run_training(cfg)  # doctest: +SKIP
        >>> result.losses[-1] < result.losses[0]  # doctest: +SKIP
        True
    """
    if not cfg.out or not cfg.data:
        raise ConfigError("a training run needs data (--data FILE) and an output directory (--out DIR)")
    out = Path(cfg.out)
    dist = setup_distributed(cfg.device)
    try:
        if model is None:
            model = load_model(cfg.model, dtype=cfg.dtype)
        if tokenizer is None:
            tokenizer = load_training_tokenizer(cfg.model)
        examples = load_examples(cfg.data, tokenizer, cfg.max_length, cfg.truncation)
        info = run_info(cfg, dist.world_size)
        total_steps = steps_for(cfg, len(examples), dist.world_size)
        ckpt = resume_checkpoint(cfg, out, info, total_steps)
        torch.manual_seed(cfg.seed)
        model.to(dist.device)  # before selection, so data scorers run on the accelerator
        model, masks, extra = prepare_method(cfg, model, examples, pad_token_id(tokenizer), ckpt)
        if cfg.quantize:
            model = quantize_sparse_model(model, cfg.quantize)  # selected on the full-precision base
        model.to(dist.device)
        named_params = trainable_parameters(model)
        optimizer = make_optimizer(named_params, cfg)
        if ckpt is not None:
            restore_checkpoint(ckpt, named_params, optimizer, where=cfg.resume)
        if dist.is_main:
            prepare_out_dir(out, cfg, resuming=ckpt is not None)
        trained = shard_sparse_model(model, dist.device, dist.world_size) if cfg.fsdp else wrap_ddp(model, dist)
        stats = train_loop(trained, optimizer, named_params, examples, cfg, pad_token_id(tokenizer), total_steps, dist,
                           start_step=ckpt.step if ckpt else 0, out=out, masks=masks, run_info=info)
        if dist.is_main:
            publish(out, lambda path: save_artifact(cfg, model, tokenizer, path, total_steps), cfg)
        if dist.enabled:
            torch_dist.barrier()
        return make_result(cfg, out, model, stats, total_steps, extra)
    finally:
        if dist.initialized_here:
            torch_dist.destroy_process_group()


# ---------------------------------------------------------------- parts of the job


def load_training_tokenizer(name: str):
    try:
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{name}: no tokenizer could be loaded from the model ({e}); training needs one") from e
    if tokenizer is None:
        raise ConfigError(f"{name}: the model has no tokenizer; training needs one")
    return tokenizer


def steps_for(cfg: TrainConfig, num_examples: int, world_size: int) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    return max(1, math.ceil(cfg.epochs * num_examples / per_step))


# What a checkpoint may only be resumed under (steps may grow: the schedule then follows the new total).
RESUME_FIELDS = ("method", "seed", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "warmup_ratio",
                 "min_lr_ratio", "max_grad_norm", "max_length", "truncation", "target_modules", "density", "num_params",
                 "scorer", "allocation", "masks", "lora_rank", "lora_alpha", "lora_match_sparse", "precision",
                 "quantize")


# Recorded only when re-selection is on, so checkpoints written before it existed still resume.
RESELECT_FIELDS = ("reselect_every", "reselect_fraction")


def run_info(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    values = cfg.to_dict()
    fields = RESUME_FIELDS + (RESELECT_FIELDS if cfg.reselecting else ())
    return {**{k: values[k] for k in fields}, "world_size": world_size, "data_sha256": data_sha256(cfg.data)}


def resume_checkpoint(cfg: TrainConfig, out: Path, info: dict[str, Any], total_steps: int) -> Checkpoint | None:
    """The checkpoint to continue from (None for a fresh run), refused unless this run may continue it:
    same settings, and steps left to train (else the checkpoint would be published as the final result)."""
    if not cfg.resume:
        return None
    path = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
    if path is None:
        raise ConfigError(f"--resume latest: no checkpoint under {out / CHECKPOINTS_DIR}")
    cfg.resume = str(path)
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, info, str(path))
    if ckpt.step >= total_steps:
        raise ConfigError(f"{path}: the checkpoint is at step {ckpt.step}, and this run has {total_steps} steps in "
                          f"all, so there is nothing left to train; resume with --steps greater than {ckpt.step}")
    return ckpt


def prepare_method(
    cfg: TrainConfig, model: nn.Module, examples: list[Example], pad_id: int, ckpt: Checkpoint | None
) -> tuple[nn.Module, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The model to train, the sparse masks (sparse runs) and facts worth reporting."""
    if cfg.method == "full":
        return prepare_full(model), None, {}
    if cfg.method == "lora":
        rank = cfg.lora_rank
        if cfg.lora_match_sparse:
            rank = lora_rank_matching(model, cfg.target_modules, sparse_budget(model, cfg.sparse_config()))
        return prepare_lora(model, cfg.target_modules, rank, cfg.lora_alpha, cfg.seed), None, {"lora_rank": rank}
    sparse_cfg = cfg.sparse_config()
    if cfg.masks:
        given, chosen_with = load_mask_file(cfg.masks)
        # The diff records how its entries were chosen (the mask file's scorer, allocation, seed, targets)
        # and the budget actually trained, not this run's selection flags, which chose nothing.
        sparse_cfg = dataclasses.replace(chosen_with, value_dtype=cfg.value_dtype,
                                         num_params=sum(int(m.numel()) for m in given.values()))
    if ckpt is not None and ckpt.masks:
        masks = ckpt.masks  # the entries trained when it was written (re-selection may have moved them)
    elif cfg.masks:
        masks = given
    else:
        masks = select_masks(model, sparse_cfg, examples, pad_id, cfg)
    return get_sparse_model(model, sparse_cfg, masks), masks, {}


def select_masks(model: nn.Module, sparse_cfg, examples: list[Example], pad_id: int, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Masks from the configured scorer; data scorers see the first batches of the training stream
    (the same on every process, so all ranks choose the same entries)."""
    if not get_scorer(sparse_cfg.scorer).needs_data_for(sparse_cfg.scorer_weights):
        return select(model, sparse_cfg)
    batches = calibration_batches(examples, cfg.batch_size, pad_id, cfg.seed, sparse_cfg.calibration_batches)
    return select(model, sparse_cfg, batches)


def load_mask_file(path: str) -> tuple[dict[str, torch.Tensor], SparseConfig]:
    """Masks and the selection config that chose them, from a diff directory (train the entries
    another run chose) or a mask file written by ``sparseft select``."""
    if (Path(path) / CONFIG_NAME).is_file():
        diff = read_diff(path)
        return diff.masks, diff.config
    mask_file = read_mask_file(path)
    return mask_file.masks, mask_file.config


def wrap_ddp(model: nn.Module, dist: Distributed) -> nn.Module:
    """DDP over the model: it all-reduces only parameters that require grad (the k values of a sparse run)."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def prepare_out_dir(out: Path, cfg: TrainConfig, resuming: bool) -> None:
    """Create ``out`` for the run's logs; a fresh run clears an earlier run's metrics and checkpoints.

    Whatever describes a finished result (the artifact, ``train_config.yaml``) is left alone until
    :func:`publish` replaces it in one rename, so a crash keeps an earlier result with its own config.
    The run in progress saves its config beside its checkpoints, to resume from
    (``--config out/checkpoints/train_config.yaml --resume``).
    """
    out.mkdir(parents=True, exist_ok=True)
    if not resuming:
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
        (out / METRICS_NAME).unlink(missing_ok=True)
    if cfg.save_every:
        write_train_config(cfg, out / CHECKPOINTS_DIR / TRAIN_CONFIG_NAME)


def write_train_config(cfg: TrainConfig, path: Path) -> None:
    """The effective config, without ``resume``, so ``--config`` with it repeats the run from the start."""
    with atomic_file(path) as tmp:
        dataclasses.replace(cfg, resume=None).to_yaml(tmp)


def provenance(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    return {
        "data_file": Path(cfg.data).name,
        "data_sha256": data_sha256(cfg.data),
        "train_config": cfg.provenance_dict(),
        "seed": cfg.seed,
        "steps": total_steps,
    }


def save_artifact(cfg: TrainConfig, model: nn.Module, tokenizer, path: Path, total_steps: int) -> None:
    if cfg.method == "sparse":
        assert isinstance(model, SparseModel)
        model.save_pretrained(path, provenance=provenance(cfg, total_steps))
    elif cfg.method == "full":
        save_full(model, tokenizer, path)
    else:
        save_lora(model, path)


# The run's logs and checkpoints, carried over into the published directory.
KEEP_ON_PUBLISH = (METRICS_NAME, CHECKPOINTS_DIR)
# Files of ``out`` that are not the artifact itself.
NOT_ARTIFACT = (*KEEP_ON_PUBLISH, TRAIN_CONFIG_NAME)


def publish(out: Path, write_artifact, cfg: TrainConfig) -> None:
    """Write the final artifact and its ``train_config.yaml`` into a staging sibling, move the run's logs
    and checkpoints into it, then swap it for ``out`` in one rename: ``out`` is never a half-written
    artifact, nor an earlier artifact beside this run's config."""
    with atomic_dir(out) as staging:
        write_artifact(staging)
        write_train_config(cfg, staging / TRAIN_CONFIG_NAME)
        for name in KEEP_ON_PUBLISH:
            if (out / name).exists():
                os.replace(out / name, staging / name)


def directory_bytes(path: Path, skip: tuple[str, ...] = NOT_ARTIFACT) -> int:
    """Bytes of the artifact alone (not its config, logs or checkpoints)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name not in skip)


def make_result(cfg: TrainConfig, out: Path, model: nn.Module, stats: LoopStats, total_steps: int, extra: dict) -> TrainResult:
    if isinstance(model, SparseModel):
        total = model.num_base_parameters()
    else:
        total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return TrainResult(
        out=out,
        method=cfg.method,
        steps=total_steps,
        losses=stats.losses,
        trainable=sum(p.numel() for _, p in trainable_parameters(model)),
        total_params=total,
        wall_time_s=stats.wall_time_s,
        median_step_s=stats.median_step_s,
        tokens_per_s=stats.tokens_per_s,
        peak_memory_bytes=stats.peak_memory_bytes,
        optimizer_state_bytes=stats.optimizer_state_bytes,
        artifact_bytes=directory_bytes(out) if out.is_dir() else 0,
        extra=extra,
    )
