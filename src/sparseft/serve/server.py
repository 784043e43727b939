"""Assemble a server from what the command line names: a base model, diff directories, a registry directory."""

from __future__ import annotations

import os

from ..errors import ModelNotFoundError
from ..loading import load_model, load_tokenizer
from .app import ServeLimits, create_app
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
    engine = Engine(base, tokenizer, ServeMetrics(), max_queue=limits.max_queue, allow_unverified_base=allow_unverified_base)
    base_name = served_name or str(model)
    registry = DiffRegistry(engine.validated_entries, reserved_names=(base_name,), directory=registry_dir)
    for name, path in diffs:
        registry.ensure(name, path)
    return create_app(engine, registry, base_name, limits, admin_token)
