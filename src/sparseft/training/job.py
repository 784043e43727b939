"""``run_training``: the whole job, read top to bottom.

load model + tokenizer → read and validate all data (nothing written yet) → the method prepares the
trainable parameters (sparse masks, all weights, or LoRA; see ``sparseft.methods``) → optimizer (+ checkpoint on resume) → train loop →
save the artifact and train_config.yaml (with metrics.jsonl and checkpoints) into ``out`` atomically.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
from torch import nn

from ..atomic import atomic_dir, atomic_file, check_out_dir, given_path, link_into, recover_dir, remove_leftovers
from ..diffio import CONFIG_NAME as DIFF_CONFIG_NAME
from ..errors import ConfigError
from ..files import existing_data
from ..hub import CARD_NAME
from ..loading import load_model, load_tokenizer, pad_token_id
from ..methods import get_method
from ..methods.sparse import SELECTION_WALL
from ..quantize import add_deferred_correction, check_quantize_skip, quantize_base, quantize_sparse_model
from .checkpoint import (
    CHECKPOINTS_DIR,
    Checkpoint,
    check_checkpoint_dir,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    restore_checkpoint,
)
from .config import TrainConfig
from .data import data_sha256, load_examples
from .loop import METRICS_NAME, Distributed, LoopStats, make_optimizer, setup_distributed, train_loop, trainable_parameters
from .sharding import shard_sparse_model

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
    on_step_s: float = 0.0  # time spent in the ``on_step`` hook (not in ``wall_time_s``)

    @property
    def selection_wall_s(self) -> float | None:
        """Seconds spent choosing the trained entries (a sparse run that selected them; else None).
        Outside ``wall_time_s`` (the loop), inside the run's own wall time."""
        return self.extra.get(SELECTION_WALL)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "out"}, "out": str(self.out)}


def run_training(
    cfg: TrainConfig, model: nn.Module | None = None, tokenizer=None,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train as ``cfg`` says and save into ``cfg.out``; usable in-process (pass ``model``/``tokenizer``)
    or from ``sparseft train`` / ``torchrun -m sparseft train``. ``on_step(steps_done, model)`` is called
    after every optimizer step with the model being trained (see ``train_loop``), e.g. to score it on
    held-out examples while it trains.

    Example:
        >>> cfg = TrainConfig(model="smollm2-135m", data="train.jsonl", out="runs/a", steps=50)  # doctest: +SKIP
        >>> result = run_training(cfg)  # doctest: +SKIP
        >>> result.losses[-1] < result.losses[0]  # doctest: +SKIP
        True
    """
    if not cfg.out or not cfg.data:
        raise ConfigError("a training run needs data (--data FILE) and an output directory (--out DIR)")
    # Never the base model's directory, a user's folder or one holding the data or the --masks diff (an earlier
    # run's, which passes as a replaceable output): it is replaced whole.
    out = check_out_dir(cfg.out, inputs=[cfg.data, cfg.model, cfg.masks])
    existing_data(cfg.data)  # before the model loads: a typo is reported at once
    check_masks_path(cfg.masks)
    settle_resume(cfg, out)
    dist = setup_distributed(cfg.device)
    try:
        if model is None:
            model = load_model(cfg.model, dtype=cfg.dtype)
        if tokenizer is None:
            tokenizer = load_training_tokenizer(cfg.model)
        examples = load_examples(cfg.data, tokenizer, cfg.max_length, cfg.truncation)
        info = run_info(cfg, dist.world_size)
        total_steps = steps_for(cfg, len(examples), dist.world_size)
        ckpt = resume_checkpoint(cfg, info, total_steps)
        torch.manual_seed(cfg.seed)
        model.to(dist.device)  # before selection, so data scorers run on the accelerator
        if cfg.quantize_skip:
            check_quantize_skip(model, cfg.quantize_skip, cfg.selection.target_modules)  # before selection runs
        if cfg.selects_over_quantized:
            quantize_base(model, cfg.quantize, cfg.quantize_skip)  # the entries are then chosen over the codes
        model, masks, extra = get_method(cfg.method).prepare(cfg, model, examples, pad_token_id(tokenizer), ckpt)
        quantized_after_selection = bool(cfg.quantize) and not cfg.selects_over_quantized
        if quantized_after_selection:
            model = quantize_sparse_model(model, cfg.quantize, cfg.quantize_init, cfg.quantize_skip)
        model.to(dist.device)
        named_params = trainable_parameters(model)
        optimizer = make_optimizer(named_params, cfg)
        if ckpt is not None:
            restore_checkpoint(ckpt, named_params, optimizer, where=cfg.resume)
        if dist.is_main:
            prepare_out_dir(out, cfg, resuming=ckpt is not None)
        trained = shard_sparse_model(model, dist.device, dist.world_size) if cfg.fsdp else wrap_ddp(model, dist)
        stats = train_loop(trained, optimizer, named_params, examples, cfg, pad_token_id(tokenizer), total_steps, dist,
                           start_step=ckpt.step if ckpt else 0, out=out, masks=masks, run_info=info, on_step=on_step)
        if quantized_after_selection:  # adds what quantize_init="correction-after" held back, else nothing;
            add_deferred_correction(model)  # after the last checkpoint: a resumed run re-derives the errors
        if dist.is_main:
            publish(out, lambda path: save_artifact(cfg, model, tokenizer, path, total_steps), cfg)
            if ckpt is not None:  # an interrupted publish may have left staging copies; this run replaced them
                remove_leftovers(out)
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


# Recorded only when re-selection is on, so checkpoints written before it existed still resume; the
# growth batches likewise only when not the default 1 (what every earlier run used).
RESELECT_FIELDS = ("reselect_every", "reselect_fraction")


def run_info(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    values = cfg.to_dict()
    fields = RESUME_FIELDS + (RESELECT_FIELDS if cfg.reselecting else ())
    if cfg.reselect_growth_batches != 1:
        fields += ("reselect_growth_batches",)
    if cfg.quantize_skip:
        fields += ("quantize_skip",)  # a mixed base: only then, so earlier checkpoints still resume
    return {**{k: values[k] for k in fields}, "world_size": world_size, "data_sha256": data_sha256(cfg.data)}


def check_masks_path(masks: str | None) -> None:
    """Before the model loads: a missing --masks was named only after the model and the data had loaded, and an
    empty one chose new entries instead, without a word."""
    if masks is not None and not given_path(masks, "--masks", "a diff directory or a mask file").exists():
        raise ConfigError(f"--masks {masks}: no such diff directory or mask file")


def settle_resume(cfg: TrainConfig, out: Path) -> None:
    """Set ``cfg.resume`` to the checkpoint directory it names, checked before the model loads: a missing one was
    named only after the model and the data had loaded, and an empty one started afresh, deleting the checkpoints
    in ``out`` that were to be resumed."""
    if cfg.resume is None:
        return
    given_path(cfg.resume, "--resume", "a checkpoint directory, or no value for the newest under --out")
    recover_dir(out)  # a crash between publish's two renames left out/ set aside
    path = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
    if path is None:
        raise ConfigError(f"--resume latest: no checkpoint under {out / CHECKPOINTS_DIR}")
    cfg.resume = str(check_checkpoint_dir(path, "--resume"))


def resume_checkpoint(cfg: TrainConfig, info: dict[str, Any], total_steps: int) -> Checkpoint | None:
    """The checkpoint ``settle_resume`` found (None for a fresh run), refused unless this run may continue it:
    same settings, and steps left to train (else the checkpoint would be published as the final result)."""
    if not cfg.resume:
        return None
    path = Path(cfg.resume)
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, info, str(path))
    if ckpt.step >= total_steps:
        raise ConfigError(f"{path}: the checkpoint is at step {ckpt.step}, and this run has {total_steps} steps in "
                          f"all, so there is nothing left to train; resume with --steps greater than {ckpt.step}")
    return ckpt


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
    get_method(cfg.method).save(model, tokenizer, path, provenance(cfg, total_steps))


# The run's logs and checkpoints, carried over into the published directory.
KEEP_ON_PUBLISH = (METRICS_NAME, CHECKPOINTS_DIR)
# Files of ``out`` that are not the artifact itself.
NOT_ARTIFACT = (*KEEP_ON_PUBLISH, TRAIN_CONFIG_NAME)


def publish(out: Path, write_artifact, cfg: TrainConfig) -> None:
    """Write the final artifact and its ``train_config.yaml`` into a staging sibling, link the run's logs
    and checkpoints into it, then swap it for ``out`` in one rename: ``out`` is never a half-written
    artifact, nor an earlier artifact beside this run's config. The logs and checkpoints are linked, not
    moved, so until the rename they are still in ``out``, where ``--resume`` looks after a crash."""
    with atomic_dir(out) as staging:
        write_artifact(staging)
        write_train_config(cfg, staging / TRAIN_CONFIG_NAME)
        for name in KEEP_ON_PUBLISH:
            if (out / name).exists():
                link_into(out / name, staging / name)


def directory_bytes(path: Path, skip: tuple[str, ...] = NOT_ARTIFACT) -> int:
    """Bytes of the artifact alone (not its config, logs or checkpoints)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name not in skip)


def artifact_bytes(out: Path) -> int:
    """``directory_bytes`` of the artifact; a sparse diff's model card (README.md, newer than these
    figures) is left out so diff sizes stay comparable with earlier runs. PEFT's card stays counted, as before."""
    if not out.is_dir():
        return 0
    is_diff = (out / DIFF_CONFIG_NAME).is_file()
    return directory_bytes(out, NOT_ARTIFACT + ((CARD_NAME,) if is_diff else ()))


def make_result(cfg: TrainConfig, out: Path, model: nn.Module, stats: LoopStats, total_steps: int, extra: dict) -> TrainResult:
    total = get_method(cfg.method).base_parameters(model)
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
        artifact_bytes=artifact_bytes(out),
        extra=extra,
        on_step_s=stats.on_step_s,
    )
