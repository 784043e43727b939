"""The training loop, built from small parts: schedule, loss, one step, metrics, checkpoints.

The same loop trains a SparseModel (only the k values require grad), a fully trainable model and a
peft LoRA model: it optimises whatever parameters require grad, so the three methods are compared
like with like (same data order, schedule, clipping and metrics).

Loss normalisation: each step's loss is the sum of token losses over the whole global batch (all
micro-batches of all processes) divided by the number of completion tokens in it. Gradient
accumulation and data parallelism therefore give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..loading import resolve_device
from ..model import SparseModel
from .checkpoint import checkpoint_dir, save_checkpoint
from .config import TrainConfig
from .data import IGNORE_INDEX, Example, make_batches
from .reselect import ReselectSchedule, check_same_everywhere, reselect
from .sharding import ShardedSparseModel

METRICS_NAME = "metrics.jsonl"


# ---------------------------------------------------------------- processes and devices


@dataclass
class Distributed:
    """Where this process sits in a (possibly 1-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Distributed:
    """Read torchrun / accelerate's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, "device", local_rank)  # gpu0 or a missing GPU: refused before the model loads
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    initialized_here = False
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        initialized_here = True
    return Distributed(rank, world_size, local_rank, dev, initialized_here)


def all_reduce_sum(value: torch.Tensor, dist: Distributed) -> torch.Tensor:
    if dist.enabled:
        value = value.clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
    return value


def autocast_for(device: torch.device, precision: str = "auto"):
    """bf16 autocast (fp32 master values, bf16 matmuls) on CUDA by default or when asked; else plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by torch on CUDA; otherwise the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


# ---------------------------------------------------------------- optimisation parts


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of everything that requires grad, in a fixed order (checkpoints rely on it)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def make_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: for a sparse run its state is 2 × k numbers."""
    return torch.optim.AdamW([p for _, p in named_params], lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )


def warmup_steps_of(cfg: TrainConfig, total_steps: int) -> int:
    return int(cfg.warmup_steps) if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))


def lr_at(step: int, total_steps: int, warmup: int, peak_lr: float, min_lr_ratio: float) -> float:
    """Linear warm-up to ``peak_lr`` over ``warmup`` steps, then cosine decay to ``min_lr_ratio × peak_lr``."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def completion_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label is not -100."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int  # non-padding input tokens of the global batch


def train_step(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    max_grad_norm: float | None,
    dist: Distributed,
    precision: str = "auto",
) -> StepResult:
    """One optimizer step over this process's micro-batches (gradients all-reduced by DDP, or the FSDP
    wrapper, on the last)."""
    local = torch.tensor([sum(count_loss_tokens(b) for b in micro_batches), sum(int(b["attention_mask"].sum()) for b in micro_batches)])
    loss_tokens, input_tokens = all_reduce_sum(local, dist).tolist()
    # DDP (and ShardedSparseModel) average gradients over processes; multiplying by world_size turns
    # that into the global sum.
    scale = dist.world_size / max(1, loss_tokens)
    loss_sum = torch.zeros((), device=dist.device)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not dist.enabled else model.no_sync()
        with sync:
            with autocast_for(dist.device, precision):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            token_loss_sum = completion_loss_sum(logits, batch["labels"])
            (token_loss_sum * scale).backward()
        loss_sum += token_loss_sum.detach()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = float(all_reduce_sum(loss_sum, dist)) / max(1, loss_tokens)
    return StepResult(loss=loss, grad_norm=grad_norm, tokens=int(input_tokens))


# ---------------------------------------------------------------- dynamic re-selection (sparse runs)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP or FSDP wrapper (or the model itself)."""
    return model.module if isinstance(model, (DistributedDataParallel, ShardedSparseModel)) else model


def sparse_layers_of(model: nn.Module) -> dict | None:
    """``{module name: SparseLinear}`` of a sparse run (names as in its masks), else None."""
    inner = unwrap(model)
    return inner.sparse_layers() if isinstance(inner, SparseModel) else None


def live_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The masks as trained now: re-selection moves them, so checkpoints take them from the layers."""
    layers = sparse_layers_of(model)
    return {name: layer.indices for name, layer in layers.items()} if layers else masks


def reselect_schedule(cfg: TrainConfig, total_steps: int) -> ReselectSchedule | None:
    if not cfg.reselecting:
        return None
    return ReselectSchedule(cfg.reselect_every, cfg.reselect_fraction, total_steps)


def growth_loss(model: nn.Module, batch: dict[str, torch.Tensor], dist: Distributed, precision: str) -> torch.Tensor:
    """The summed completion loss of one micro-batch: what ranks the candidates to grow."""
    batch = {k: v.to(dist.device) for k, v in batch.items()}
    with autocast_for(dist.device, precision):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return completion_loss_sum(logits, batch["labels"])


def growth_batches(step_batches: list[dict[str, torch.Tensor]], count: int,
                   next_batches: Callable[[int], list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """The ``count`` micro-batches whose summed gradient ranks the candidates before a step: the
    step's own first, then those of the following steps in data order (``next_batches(ahead)``: the
    micro-batches of the step ``ahead`` steps later). They depend only on the step, so a resumed run
    draws the same ones."""
    chosen, ahead = list(step_batches[:count]), 1
    while len(chosen) < count:
        chosen += next_batches(ahead)[:count - len(chosen)]
        ahead += 1
    return chosen


def process_ops(distributed: bool):
    """In-place sum / max / min over processes (None for one process)."""
    if not distributed:
        return None, None, None
    op = torch_dist.ReduceOp
    return tuple((lambda t, o=o: torch_dist.all_reduce(t, op=o)) for o in (op.SUM, op.MAX, op.MIN))


LossOf = Callable[[nn.Module], torch.Tensor]


def reselect_step(model: nn.Module, optimizer, schedule: ReselectSchedule, step: int,
                  loss_of: LossOf | Sequence[LossOf], distributed: bool) -> int:
    """Re-select with the gradient of ``loss_of(unwrapped model)`` (the loop: of the step's first
    micro-batch), or of the summed losses of a sequence of them (eval mode: no dropout); returns
    entries swapped.

    The unwrapped model runs the extra pass, so DDP's gradient sync is not involved; the dense
    gradients are summed over processes instead, and the resulting masks checked to agree.
    """
    inner, layers = unwrap(model), sparse_layers_of(model)
    total, high, low = process_ops(distributed)
    was_training = inner.training
    inner.eval()
    try:
        losses = [loss_of] if callable(loss_of) else list(loss_of)
        swapped = reselect(layers, optimizer, schedule, step, [lambda f=f: f(inner) for f in losses], total)
    finally:
        inner.train(was_training)
    if distributed:
        check_same_everywhere(layers, high, low)
    return sum(swapped.values())


# ---------------------------------------------------------------- metrics


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step. On resume, lines past the resumed step are dropped,
    and so is a partial last line (a crash in the middle of writing it), with a warning."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.is_file():
            kept = [line for line, record in read_metrics(path) if record["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """``(line, record)`` for every record of a metrics.jsonl. An unparseable last line is what a crash
    while writing leaves: it is skipped with a warning. Anywhere else it is a ConfigError naming it."""
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a metrics record with an integer 'step'")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if i == len(lines) - 1:
                warnings.warn(f"{path}:line {number}: dropping a partial last line (the interrupted run stopped while "
                              f"writing it): {line[:60]!r}", stacklevel=2)
                break
            raise ConfigError(f"{path}:line {number}: cannot resume, the metrics log is damaged ({e}); move the file "
                              "away to resume without the earlier steps' metrics") from e
        records.append((line, record))
    return records


# ---------------------------------------------------------------- the loop


@dataclass
class LoopStats:
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_time_s: float = 0.0  # the loop's own time: the ``on_step`` hook's time is apart, in ``on_step_s``
    on_step_s: float = 0.0
    peak_memory_bytes: int = 0
    optimizer_state_bytes: int = 0

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_times) if self.step_times else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / sum(self.step_times) if self.step_times else 0.0


def reselect_due(model: nn.Module, optimizer, schedule: ReselectSchedule, step: int, cfg: TrainConfig,
                 dist: Distributed, batches: list[dict[str, torch.Tensor]],
                 batches_at: Callable[[int], list[dict[str, torch.Tensor]]]) -> dict:
    """Move the mask at ``step`` (its growth gradients over this step's batches and the next ones, as
    ``cfg.reselect_growth_batches`` asks); returns the metrics fields: entries swapped and the time it took."""
    t0 = time.perf_counter()
    growth = growth_batches(batches, cfg.reselect_growth_batches, lambda ahead: batches_at(step + ahead))
    swapped = reselect_step(model, optimizer, schedule, step,
                            [lambda m, b=b: growth_loss(m, b, dist, cfg.precision) for b in growth], dist.enabled)
    return {"reselected": swapped, "reselect_time_s": time.perf_counter() - t0}


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    named_params: list[tuple[str, nn.Parameter]],
    examples: list[Example],
    cfg: TrainConfig,
    pad_id: int,
    total_steps: int,
    dist: Distributed,
    start_step: int = 0,
    out: Path | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    run_info: dict | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> LoopStats:
    """Train from ``start_step`` to ``total_steps``; log to ``out/metrics.jsonl`` and checkpoint every
    ``cfg.save_every`` steps (rank 0 writes; every rank computes the same update).

    ``on_step(steps_done, model)``, when given, runs on every process after each optimizer step with the
    unwrapped model (in train mode; a hook that evaluates switches modes itself and restores them). Its
    time is kept out of ``wall_time_s``, so the loop's cost reads the same with or without a hook.
    """
    params = [p for _, p in named_params]
    warmup = warmup_steps_of(cfg, total_steps)
    schedule = reselect_schedule(cfg, total_steps)
    write = out is not None and dist.is_main
    metrics = MetricsLog(out / METRICS_NAME, write, resume_step=start_step if start_step else None) if out else None
    stats = LoopStats()
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)  # report the training peak, not loading's
    started = time.perf_counter()
    model.train()
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc=f"train ({cfg.method})",
               disable=not (cfg.progress and dist.is_main), dynamic_ncols=True)

    def batches_at(step: int) -> list[dict[str, torch.Tensor]]:  # this process's micro-batches of ``step``
        return make_batches(examples, cfg.batch_size, pad_id, cfg.seed, step, cfg.grad_accum, dist.rank, dist.world_size)

    for step in bar:
        lr = lr_at(step, total_steps, warmup, cfg.lr, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = batches_at(step)
        reselected = {}
        if schedule is not None and schedule.due(step):
            reselected = reselect_due(model, optimizer, schedule, step, cfg, dist, batches, batches_at)
        t0 = time.perf_counter()
        result = train_step(model, batches, optimizer, params, cfg.max_grad_norm, dist, cfg.precision)
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        elapsed = time.perf_counter() - t0
        stats.losses.append(result.loss)
        stats.step_times.append(elapsed)
        stats.tokens += result.tokens
        bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / elapsed:,.0f}")
        done = step + 1
        if metrics and (done % cfg.log_every == 0 or done == total_steps or reselected):
            metrics.write({
                "step": done, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                "tokens_per_s": result.tokens / elapsed, "step_time_s": elapsed,
                "peak_memory_bytes": peak_memory_bytes(dist.device),
                "epoch": done * cfg.batch_size * cfg.grad_accum * dist.world_size / len(examples),
                **reselected,
            })
        if write and cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
            save_checkpoint(checkpoint_dir(out, done), done, named_params, optimizer, live_masks(model, masks), run_info)
        if on_step is not None:
            t0 = time.perf_counter()
            on_step(done, unwrap(model))
            stats.on_step_s += time.perf_counter() - t0
    bar.close()
    stats.wall_time_s = time.perf_counter() - started - stats.on_step_s
    stats.peak_memory_bytes = peak_memory_bytes(dist.device)
    stats.optimizer_state_bytes = optimizer_state_bytes(optimizer)
    return stats
