"""Assemble a server from what the command line names: a base model, diff directories, a registry directory."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Sequence

from ..errors import ConfigError, ModelNotFoundError
from ..diffio import recorded_skip
from ..quantize import check_scheme, require_torchao, skip_patterns
from ..loading import load_tokenizer, resolve_device
from ..methods.registry import load_base
from .app import ServeLimits, create_app
from .batching import BatchingEngine
from .engine import MERGED_OVER_QUANTIZED, Engine
from .metrics import ServeMetrics
from .registry import DiffRegistry, stored_paths


def build_app(
    model: str,
    diffs: list[tuple[str, str]] = (),
    registry_dir: str | os.PathLike | None = None,
    served_name: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",  # auto, cpu, cuda or cuda:N (check_device)
    limits: ServeLimits | None = None,
    admin_token: str | None = None,
    strategy: str = "auto",
    max_batch_size: int = 16,
    max_batch_tokens: int | None = None,
    allow_unverified_base: bool = False,
    quantize: str | None = None,
    quantize_skip: Sequence[str] | str = (),
):
    """Load the base and its tokenizer, restore the registry, load ``diffs`` (NAME, DIR), return the app.

    ``quantize`` (``int8`` / ``int4`` / ``nf4``): load the base weight-only quantized, as a diff's training run
    over it did (same ``dtype``); every diff then runs unmerged over the codes (strategy ``auto`` or ``mixed``).
    ``quantize_skip``: the linear layers left unquantized (a mixed base), a list or one comma-separated string;
    by default those the training runs of ``diffs`` and the registry's stored diffs left so, as they record
    (``recorded_skip``).

    Example:
        >>> app = build_app("smollm2-135m", [("support", "diffs/support")])  # doctest: +SKIP
        >>> app = build_app("smollm2-135m", [("q4", "runs/q4")], dtype="bfloat16", quantize="nf4")  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    limits = limits or ServeLimits()
    device = resolve_device(device)  # 'gpu0' or a missing GPU: refused here, not by torch after the load
    # Checked before anything loads (e.g. 'merged' over a quantized base); the skip patterns come normalised.
    options = EngineOptions(strategy=strategy, quantize=quantize, quantize_skip=quantize_skip)
    served = [path for _, path in diffs] + stored_paths(registry_dir)
    base = load_base(model, dtype, quantize, options.quantize_skip or recorded_skip(served, quantize)).to(device)
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
    """How an app's engine serves requests: the strategy, its batch limits, whether diffs that record no
    base fingerprint load, and the weight-only quantization of the base it serves (None: as loaded), with the
    layers it leaves unquantized. Given to ``build_app`` as keywords (``**options.as_kwargs()``); a Ray replica
    gets one."""

    strategy: str = "auto"
    max_batch_size: int = 16
    max_batch_tokens: int | None = None
    allow_unverified_base: bool = False
    quantize: str | None = None
    quantize_skip: tuple[str, ...] | str = ()  # a comma-separated string (the flag) is split here

    def __post_init__(self) -> None:  # checked where the options are given, not later in each replica
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.max_batch_size < 1 or (self.max_batch_tokens is not None and self.max_batch_tokens < 1):
            raise ConfigError("max_batch_size and max_batch_tokens must be >= 1, got "
                              f"{self.max_batch_size} and {self.max_batch_tokens}")
        if self.quantize is not None:
            check_scheme(self.quantize)
            require_torchao(self.quantize)
            if self.strategy == "merged":
                raise ConfigError(MERGED_OVER_QUANTIZED)
        if self.quantize_skip:
            if self.quantize is None:
                raise ConfigError("quantize_skip (--quantize-skip) names layers to leave unquantized: "
                                  "it needs quantize")
            object.__setattr__(self, "quantize_skip", tuple(skip_patterns(self.quantize_skip)))
        else:
            object.__setattr__(self, "quantize_skip", ())

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
