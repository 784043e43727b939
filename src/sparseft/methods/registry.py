"""The method registry: what a training method is, and the one table of them.

A method (sparse, full, lora; ``base`` in benchmarks, which trains nothing) is one object that owns
everything about it: how it checks its part of a TrainConfig, prepares a model for the loop, saves
its artifact, recognises and attaches that artifact for evaluation, and how a benchmark row of it
is configured and labelled. The rest of the package asks the registry and never branches on a
method's name, so a new method is one new file plus one ``register_method`` line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import ConfigError, DiffNotFoundError

if TYPE_CHECKING:  # type hints only: training imports the registry, not the other way round
    from ..training.checkpoint import Checkpoint
    from ..training.config import TrainConfig
    from ..training.data import Example

Prepared = tuple[nn.Module, "dict[str, Any] | None", dict[str, Any]]


class Method:
    """One training method. Subclasses set the class attributes and override what differs.

    Attributes:
        name: what ``--method`` / a bench row's ``method`` says.
        artifact_kind: what a run saves (``diff``, ``checkpoint``, ``adapter``); None for a method
            that trains nothing (the base model's evaluation).
        help: one line for ``sparseft train --method``.
        run_knobs: the bench RunSpec fields this method reads (another method's rows may not set them).
        not_applicable: bench row fields that stay null for this method (e.g. a full row has no scorer).
        takes_masks: whether ``masks`` (a mask file of entries to train, from ``sparseft select``) applies.
        reselects: whether ``reselect_every`` (moving a sparse mask during training) applies.
        shards_base / quantizes_base: whether ``fsdp`` / ``quantize`` apply: the prepared model keeps
            its base frozen beside a small replicated trainable part (a SparseModel).
        artifact_description: what ``detect`` looks for, for errors (methods that attach to a base).
    """

    name: str = ""
    artifact_kind: str | None = None
    help: str = ""
    run_knobs: tuple[str, ...] = ()
    not_applicable: frozenset[str] = frozenset()
    takes_masks: bool = False
    reselects: bool = False
    shards_base: bool = False
    quantizes_base: bool = False
    artifact_description: str = ""

    @property
    def trains(self) -> bool:
        return self.artifact_kind is not None

    # ------------------------------------------------------------ training

    def validate(self, cfg: "TrainConfig") -> None:
        """Raise a ConfigError for values of ``cfg`` this method cannot train with."""

    def prepare(
        self, cfg: "TrainConfig", model: nn.Module, examples: "list[Example]", pad_id: int, ckpt: "Checkpoint | None"
    ) -> Prepared:
        """``(model to train, sparse masks or None, facts worth reporting)``."""
        raise ConfigError(f"method {self.name!r} trains nothing")

    def save(self, model: nn.Module, tokenizer, path: Path, provenance: dict[str, Any]) -> None:
        """Write the trained artifact into the (empty, staging) directory ``path``."""
        raise ConfigError(f"method {self.name!r} saves no artifact")

    def base_parameters(self, model: nn.Module) -> int:
        """Parameters of the underlying base model (the denominator of "trainable %")."""
        return sum(p.numel() for p in model.parameters())

    # ------------------------------------------------------------ evaluation

    def detect(self, path: Path) -> bool:
        """True when ``path`` holds this method's artifact in a form that attaches to a base."""
        return False

    def attach(self, model: nn.Module, path: str | os.PathLike, allow_unverified_base: bool = False) -> nn.Module:
        """``model`` with the artifact at ``path`` loaded on it (unmerged). ``allow_unverified_base``: load an
        artifact that records no base fingerprint with a warning instead of refusing it, where the method checks one."""
        raise ConfigError(f"method {self.name!r} has no artifact to attach to a base")

    def load_for_eval(
        self, base: str, artifact: str | None, dtype: str = "float32", quantize: str | None = None,
        quantize_skip: Sequence[str] = (),
    ) -> nn.Module:
        """The model a benchmark row scores: the artifact on the base it was trained over (loaded in
        ``dtype``, quantized as ``quantize`` and ``quantize_skip`` say), merged, so every row evaluates at the base's speed;
        over a quantized base it stays unmerged (nothing can be written into codes)."""
        model = self.attach(load_base(base, dtype, quantize, quantize_skip), artifact)
        return model if quantize else model.merge_and_unload()

    # ------------------------------------------------------------ benchmarks

    def check_run(self, run: Any, at: str) -> None:
        """Raise a ConfigError for a bad value of one of this method's ``run_knobs`` in a bench row."""

    def complete_run(self, run: dict[str, Any], grid_density: float) -> dict[str, Any]:
        """A bench row's knobs with the grid's defaults filled in (what the worker and the row record)."""
        return run

    def train_fields(self, run: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        """TrainConfig fields (flat) of a bench row of this method, from its knobs."""
        return {}

    def row_facts(self, result: Any, cfg: "TrainConfig") -> dict[str, Any]:
        """Row fields only known after training (e.g. the rank or density the run ended with)."""
        return {}

    def label(self, row: dict[str, Any]) -> str:
        """Method and its knob for a report row, e.g. ``sparse/fisher``, ``lora r=2``, ``full``."""
        return self.name


def load_base(base: str, dtype: str = "float32", quantize: str | None = None, quantize_skip: Sequence[str] = ()) -> nn.Module:
    """The base model as a run trained over it: loaded in ``dtype``, then weight-only quantized when
    ``quantize`` is ``int8`` / ``int4`` / ``nf4``, but for the layers ``quantize_skip`` names
    (deterministic, so a diff's base fingerprint matches again)."""
    from ..loading import load_model

    model = load_model(base, dtype=dtype)
    if quantize:
        from ..quantize import quantize_base

        model = quantize_base(model, quantize, quantize_skip)
    return model


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry under ``method.name`` (a second one of that name is an error)."""
    if not method.name:
        raise ConfigError(f"{type(method).__name__}: a method needs a name")
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ConfigError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def training_methods() -> list[str]:
    """Names of the methods that train (what ``--method`` and a bench row may say)."""
    return [name for name, m in METHODS.items() if m.trains]


def detect_artifact(path: str | os.PathLike) -> Method:
    """The method whose artifact is at ``path`` (a sparse diff, a LoRA adapter, ...)."""
    path = Path(path)
    for method in METHODS.values():
        if method.detect(path):
            return method
    kinds = " nor ".join(m.artifact_description for m in METHODS.values() if m.artifact_description)
    raise DiffNotFoundError(f"{path}: not {kinds} directory")
