"""Run a task on a base model, the base + a sparse diff, or the base + a PEFT LoRA adapter."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import positive_count
from .diffio import recorded_skip
from .errors import ConfigError
from .loading import load_tokenizer, resolve_device
from .methods import detect_artifact, get_method, training_methods
from .methods.registry import load_base
from .tasks import Task, get_task


@dataclass
class EvalResult:
    task: str
    model: str
    diff: str | None
    adapter: str  # "none", or the method whose artifact is attached ("sparse", "lora")
    num_examples: int
    metrics: dict[str, float]
    wall_time_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attach_diff(model, path: str | os.PathLike | None, allow_unverified_base: bool = False):
    """``(model, kind)``: the base with the diff or adapter at ``path`` loaded on it (unmerged).
    ``allow_unverified_base``: also a sparse diff that records no base fingerprint (logged as a warning)."""
    if path is None:
        return model, "none"
    method = detect_artifact(path)
    return method.attach(model, path, allow_unverified_base=allow_unverified_base), method.name


def check_artifact(diff: str | os.PathLike | None, quantize: str | None) -> None:
    """Checked before any model is loaded: ``diff`` is an artifact of a known method (a directory of neither
    kind was named only after the base had loaded), and ``quantize`` is refused for one of a method that does
    not train over a quantized base (a LoRA adapter): what bench rows and ``sparseft train`` refuse too."""
    method = detect_artifact(diff) if diff is not None else None
    if not quantize:
        return
    from .quantize import check_scheme, require_torchao

    check_scheme(quantize)
    require_torchao(quantize)
    if method is not None and not method.quantizes_base:
        able = "/".join(name for name in training_methods() if get_method(name).quantizes_base)
        raise ConfigError(f"{diff}: quantize={quantize!r} (--quantize) applies to the base alone or a {able} diff "
                          f"trained over that quantized base, not a {method.name} {method.artifact_kind}")


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model`` in eval mode (no dropout) inside the block, and back in the mode it had after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate(
    model,
    tokenizer,
    task: Task | str,
    data: str | os.PathLike,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict[str, float], int, float]:
    """``(metrics, number of examples, wall seconds)`` of ``model`` on ``task`` over the file ``data``.

    Example:
        >>> metrics, n, seconds = evaluate(model, tok, "routing", ROUTING_DATA / "test.jsonl")  # doctest: +SKIP
    """
    task = get_task(task) if isinstance(task, str) else task
    return evaluate_records(model, tokenizer, task, task.load(data, limit), batch_size, progress)


def evaluate_records(
    model, tokenizer, task: Task, records: list[dict], batch_size: int = 8, progress: bool = True
) -> tuple[dict[str, float], int, float]:
    """Like ``evaluate`` for records already loaded with ``task.load``."""
    start = time.perf_counter()
    with eval_mode(model):
        metrics = task.evaluate(model, tokenizer, records, batch_size=batch_size, progress=progress)
    return metrics, len(records), time.perf_counter() - start


def evaluate_records_detailed(
    model, tokenizer, task: Task, records: list[dict], batch_size: int = 8, progress: bool = True
) -> tuple[dict[str, float], dict[str, list[float]], int, float]:
    """Like ``evaluate_records``, plus each example's score per metric (``Task.evaluate_detailed``),
    which paired comparisons between models (``sparseft.bench.stats``) need."""
    start = time.perf_counter()
    with eval_mode(model):
        metrics, per_example = task.evaluate_detailed(model, tokenizer, records, batch_size=batch_size, progress=progress)
    return metrics, per_example, len(records), time.perf_counter() - start


def run_eval(
    model_name: str,
    task_name: str | Task,
    data: str | os.PathLike,
    diff: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    progress: bool = True,
    allow_unverified_base: bool = False,
    quantize: str | None = None,
    device: str = "auto",
) -> EvalResult:
    """Load ``model_name`` (+ ``diff``), evaluate it on ``task_name`` and time it (load time apart).
    ``task_name`` is a registered name, a task file path (``get_task``) or a ``Task``; ``allow_unverified_base``
    as for ``SparseModel.from_pretrained``. ``quantize`` (``int8`` / ``int4`` / ``nf4``): the base loaded
    in ``dtype`` and weight-only quantized as a bench row of that base loads it (but for the layers the diff's
    training run left unquantized, ``recorded_skip``), the diff unmerged over it. ``device``: ``auto``
    (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``, checked before anything loads."""
    target = resolve_device(device)
    batch_size = positive_count("batch_size", batch_size)
    limit = None if limit is None else positive_count("limit", limit)
    task = get_task(task_name) if isinstance(task_name, str) else task_name
    records = task.load(data, limit)  # bad data fails here, before time goes into loading the model
    check_artifact(diff, quantize)
    start = time.perf_counter()
    base = load_base(model_name, dtype, quantize, recorded_skip([diff], quantize))
    model, kind = attach_diff(base, diff, allow_unverified_base)
    model.to(target)
    tokenizer = load_tokenizer(model_name)
    load_s = time.perf_counter() - start
    metrics, n, wall = evaluate_records(model, tokenizer, task, records, batch_size, progress)
    return EvalResult(
        task=task.name,
        model=str(model_name),
        diff=str(diff) if diff is not None else None,
        adapter=kind,
        num_examples=n,
        metrics=metrics,
        wall_time_s=round(wall, 3),
        extra={"load_time_s": round(load_s, 3), "data": str(data), "threads": torch.get_num_threads(),
               "dtype": dtype, "quantize": quantize, "device": str(target)},
    )


def format_result(result: EvalResult) -> str:
    """A small table: one line per metric (shown in percent), then the run's facts."""
    lines = [f"{'metric':<20} {'value':>8}"]
    lines += [f"{name:<20} {100 * value:>7.2f}%" for name, value in result.metrics.items()]
    with_diff = f" + {result.adapter} {result.diff}" if result.diff else ""
    quantized = f" ({result.extra['quantize']} from {result.extra.get('dtype')})" if result.extra.get("quantize") else ""
    lines += [
        "",
        f"task {result.task} on {result.num_examples} examples of {result.extra.get('data')}",
        f"model {result.model}{quantized}{with_diff}",
        f"wall time {result.wall_time_s:.1f} s (model load {result.extra.get('load_time_s', 0):.1f} s apart)",
    ]
    return "\n".join(lines)
