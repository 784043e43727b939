"""Assemble a server from what the command line names: a base model, diff directories, a registry directory."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..errors import ConfigError, ModelNotFoundError
from ..loading import load_model, load_tokenizer
from .app import ServeLimits, create_app
from .batching import BatchingEngine
from .engine import Engine
from .metrics import ServeMetrics
from .registry import DiffRegistry


def build_app(
    model: str,
    diffs: list[tuple[str, str]] = (),
    registry_dir: str | os.PathLike | None = None,
    served_name: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    limits: ServeLimits | None = None,
    admin_token: str | None = None,
    strategy: str = "auto",
    max_batch_size: int = 16,
    max_batch_tokens: int | None = None,
    allow_unverified_base: bool = False,
):
    """Load the base and its tokenizer, restore the registry, load ``diffs`` (NAME, DIR), return the app.

    Example:
        >>> app = build_app("smollm2-135m", [("support", "diffs/support")])  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    limits = limits or ServeLimits()
    base = load_model(model, dtype=dtype).to(device)
    try:
        tokenizer = load_tokenizer(model)
    except ModelNotFoundError as e:  # load_tokenizer already names the path and the cause
        raise ModelNotFoundError(f"{e}; serving needs one next to the model") from e
    engine = make_engine(base, tokenizer, ServeMetrics(), limits.max_queue, strategy, max_batch_size, max_batch_tokens,
                         allow_unverified_base)
    base_name = served_name or str(model)
    registry = DiffRegistry(engine.validated_entries, reserved_names=(base_name,), directory=registry_dir)
    for name, path in diffs:
        registry.ensure(name, path)
    return create_app(engine, registry, base_name, limits, admin_token)


STRATEGIES = ("auto", "merged", "mixed")


@dataclass(frozen=True)
class EngineOptions:
    """How an app's engine serves requests: the strategy, its batch limits, and whether diffs that record no
    base fingerprint load. Given to ``build_app`` as keywords (``**options.as_kwargs()``); a Ray replica gets one."""

    strategy: str = "auto"
    max_batch_size: int = 16
    max_batch_tokens: int | None = None
    allow_unverified_base: bool = False

    def __post_init__(self) -> None:  # checked where the options are given, not later in each replica
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.max_batch_size < 1 or (self.max_batch_tokens is not None and self.max_batch_tokens < 1):
            raise ConfigError("max_batch_size and max_batch_tokens must be >= 1, got "
                              f"{self.max_batch_size} and {self.max_batch_tokens}")

    def as_kwargs(self) -> dict:
        return asdict(self)


def make_engine(model, tokenizer, metrics: ServeMetrics, max_queue: int, strategy: str = "auto",
                max_batch_size: int = 16, max_batch_tokens: int | None = None,
                allow_unverified_base: bool = False) -> Engine:
    """The engine for ``strategy``: ``merged`` (one request at a time, merge on switch) or a batching one.

    ``mixed``: continuous batching, every row unmerged with its own diff. ``auto``: continuous
    batching that merges the diff when every row of a step uses the same one, unmerged otherwise.
    """
    if strategy == "merged":
        return Engine(model, tokenizer, metrics, max_queue=max_queue, allow_unverified_base=allow_unverified_base)
    if strategy in ("auto", "mixed"):
        return BatchingEngine(model, tokenizer, metrics, max_queue=max_queue, strategy=strategy,
                              max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                              allow_unverified_base=allow_unverified_base)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
