"""SparseModel: a Hugging Face model whose targeted linear layers carry sparse deltas.

The verbs follow PEFT (``get_sparse_model``, ``save_pretrained``, ``from_pretrained``, ``merge``,
``unmerge``, ``merge_and_unload``), so a PEFT user finds their way at once.

Several diffs of one base can be loaded and active at once, PEFT-style (``load_adapter`` /
``set_adapter`` / weighted adapters): the first one is ``"default"`` (the one trained and saved by
default); ``load_diff`` adds frozen named ones, ``set_active`` chooses which apply and with what
weight. The forward, ``merge`` and ``unmerge`` apply all active diffs (see ``sparseft.sparse_linear``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .base_match import fingerprints
from .config import SparseConfig
from .diffio import (
    SparseDiff,
    check_against_model,
    check_diff,
    check_shapes,
    read_diff,
    target_weights,
    write_diff,
)
from .errors import ConfigError, MergeStateError, UnknownDiffError
from .hub import resolve_diff
from .selection import select
from .sparse_linear import DEFAULT_DIFF, FrozenDelta, SparseLinear, merge_layers, unmerge_layers
from .targets import find_targets


def get_sparse_model(
    model: nn.Module, config: SparseConfig, masks: dict[str, torch.Tensor] | None = None
) -> "SparseModel":
    """Freeze ``model`` and give each targeted linear layer trainable values at ``masks``.

    Example:
        >>> cfg = SparseConfig(density=0.01, target_modules=["q_proj", "v_proj"], scorer="random")
        >>> sparse = get_sparse_model(base, cfg)  # doctest: +SKIP
        >>> sparse.print_trainable_parameters()  # doctest: +SKIP

    ``masks`` maps module names to flat indices; without it the data-free scorer of ``config``
    (random or magnitude) chooses them. Invalid masks raise before the model is changed.
    """
    targets = find_targets(model, config.target_modules)
    if masks is None:
        masks = select(model, config)
    if not masks:
        raise ConfigError(
            "masks select no module: pass {module name: flat indices} for at least one targeted layer "
            f"(e.g. {next(iter(targets))!r}), or masks=None to select with the config's scorer"
        )
    weights = {name: layer.weight for name, layer in targets.items()}
    probe = SparseDiff(
        config=config,
        masks={n: torch.as_tensor(m) for n, m in masks.items()},
        values={n: torch.zeros(torch.as_tensor(m).numel()) for n, m in masks.items()},
        shapes={n: tuple(weights[n].shape) if n in weights else () for n in masks},
    )
    check_shapes(probe.shapes, weights, where="masks")  # a fresh selection: no base to compare with
    check_diff(probe, where="masks")
    return SparseModel(model, config, probe.masks)


class SparseModel(nn.Module):
    """The wrapped model; forwards and generates exactly like it."""

    def __init__(
        self,
        model: nn.Module,
        config: SparseConfig,
        masks: dict[str, torch.Tensor],
        base_fingerprint: dict[str, str] | None = None,
        values: dict[str, torch.Tensor] | None = None,
    ):
        """Freeze ``model`` and wrap the layers named in ``masks`` (with ``values``, else zeros).
        If anything fails part-way, the wrapping and freezing are undone before the error propagates."""
        super().__init__()
        self.base_model = model
        self.sparse_config = config
        targets = find_targets(model, config.target_modules)
        self.base_fingerprint = base_fingerprint or fingerprints({n: targets[n].weight for n in masks})
        self._default_modules = set(masks)  # other diffs may wrap more layers (with k=0 of their own)
        self.frozen_diffs: dict[str, SparseDiff] = {}  # name -> the diff as read, for save_pretrained
        self._active: dict[str, float] = {DEFAULT_DIFF: 1.0}
        trainable = [p for p in model.parameters() if p.requires_grad]
        wrapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for param in trainable:
                param.requires_grad_(False)
            for name, indices in masks.items():
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                layer = SparseLinear(targets[name], indices.to(torch.long), None if values is None else values[name])
                setattr(parent, child, layer)
                wrapped.append((parent, child, targets[name]))
        except BaseException:
            for parent, child, original in reversed(wrapped):
                setattr(parent, child, original)
            for param in trainable:
                param.requires_grad_(True)
            raise

    # ------------------------------------------------------------ forwarding

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    # ------------------------------------------------------------ introspection

    def sparse_layers(self) -> dict[str, SparseLinear]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SparseLinear)}

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The values of every sparse layer; those of a layer with k=0 are empty and frozen."""
        return [layer.values for layer in self.sparse_layers().values()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_base_parameters(self) -> int:
        return sum(p.numel() for n, p in self.base_model.named_parameters() if not n.endswith(".values"))

    def print_trainable_parameters(self) -> None:
        trainable, total = self.num_trainable(), self.num_base_parameters()
        print(f"trainable entries: {trainable:,} || model parameters: {total:,} || trainable%: {100 * trainable / total:.4f}")

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.sparse_layers().values())

    # ------------------------------------------------------------ several diffs

    @property
    def diff_names(self) -> list[str]:
        """Every loaded diff: ``"default"`` first, then the ``load_diff`` ones in load order."""
        return [DEFAULT_DIFF, *self.frozen_diffs]

    @property
    def active_diffs(self) -> dict[str, float]:
        """``{name: weight}`` of the diffs the forward and ``merge`` apply, in merge order."""
        return dict(self._active)

    def load_diff(
        self, diff_directory: str | os.PathLike, name: str, weight: float = 1.0, active: bool = True
    ) -> None:
        """Load another diff of the same base as ``name``, frozen; if ``active``, apply it with ``weight``
        after the active ones. Validated first (name, base fingerprint, shapes); on any error the model
        is unchanged.

        Example:
            >>> model = SparseModel.from_pretrained(base, "diff-a")  # doctest: +SKIP
            >>> model.load_diff("diff-b", name="b", weight=0.5)  # doctest: +SKIP
            >>> model.active_diffs  # doctest: +SKIP
            {'default': 1.0, 'b': 0.5}
        """
        check_new_diff_name(name, self.diff_names)
        weight = check_diff_weight(name, weight)
        if self.merged:
            raise MergeStateError(f"cannot load diff {name!r} while the model is merged; call unmerge() first")
        diff = read_diff(diff_directory)
        check_against_model(diff, self._linear_weights(), where=str(diff_directory))
        self._attach_frozen(name, diff)
        self.frozen_diffs[name] = diff
        if active:
            self.set_active([*self._active, name], [*self._active.values(), weight])

    def set_active(self, names: str | Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Apply the loaded diffs ``names``, in this order, with ``weights`` (default 1 each); the others
        stay loaded but off. ``[]`` runs the plain base.

        Example: ``model.set_active(["default", "b"], weights=[1.0, -1.0])``
        """
        names = [names] if isinstance(names, str) else list(names)
        if unknown := [n for n in names if n not in self.diff_names]:
            raise UnknownDiffError(f"no diff named {unknown[0]!r} is loaded; loaded: {self.diff_names}")
        if len(set(names)) != len(names):
            raise ConfigError(f"set_active names a diff twice: {names}")
        weights = [1.0] * len(names) if weights is None else list(weights)
        if len(weights) != len(names):
            raise ConfigError(f"set_active got {len(weights)} weight(s) for {len(names)} diff(s); give one per diff")
        active = {n: check_diff_weight(n, w) for n, w in zip(names, weights)}
        if self.merged:
            raise MergeStateError("cannot change the active diffs while the model is merged; call unmerge() first")
        self._active = active
        for layer in self.sparse_layers().values():
            layer.active = dict(active)

    def _linear_weights(self) -> dict[str, torch.Tensor]:
        """The weight of every linear layer by its module name (a wrapped layer under its own name)."""
        layers = self.sparse_layers()
        wrapped = {f"{n}.base_layer" for n in layers}
        weights = {n: m.weight for n, m in self.base_model.named_modules() if isinstance(m, nn.Linear) and n not in wrapped}
        return {**weights, **{n: layer.weight for n, layer in layers.items()}}

    def _attach_frozen(self, name: str, diff: SparseDiff) -> None:
        """Give each module of ``diff`` a ``FrozenDelta`` ``name``, wrapping layers the default diff left
        plain (k=0 of their own); on any error, what was added is taken out again."""
        layers = self.sparse_layers()
        wrapped: list[tuple[nn.Module, str, nn.Linear]] = []
        attached: list[SparseLinear] = []
        try:
            for module in diff.masks:
                layer = layers.get(module)
                if layer is None:
                    parent_name, _, child = module.rpartition(".")
                    parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
                    linear = parent.get_submodule(child)
                    layer = SparseLinear(linear, torch.zeros(0, dtype=torch.long))
                    like = next(iter(layers.values()), layer)  # the kernels the model's layers use
                    layer.set_kernels(like.backend, like.forward_mode)
                    layer.active = dict(self._active)
                    setattr(parent, child, layer)
                    wrapped.append((parent, child, linear))
                device = layer.weight.device
                layer.frozen_deltas[name] = FrozenDelta(diff.masks[module].to(device), diff.values[module].to(device))
                attached.append(layer)
        except BaseException:
            for layer in attached:
                del layer.frozen_deltas[name]
            for parent, child, linear in reversed(wrapped):
                setattr(parent, child, linear)
            raise

    # ------------------------------------------------------------ apply / revert

    def merge(self) -> None:
        """Write W + Σ weight·S of every active diff into the targeted weights (keeping the overwritten
        entries for ``unmerge``); all layers or, if one fails, none."""
        if self.merged:
            raise MergeStateError("the model is already merged; call unmerge() first")
        merge_layers(self.sparse_layers())  # all layers or, if one fails, none

    def unmerge(self) -> None:
        """Restore the original entries: the weights are bitwise the base again."""
        if not self.merged:
            raise MergeStateError("the model is not merged; nothing to restore")
        unmerge_layers(self.sparse_layers())

    def merge_and_unload(self) -> nn.Module:
        """The base model with the diff merged in and the sparse wrappers removed (a plain HF model)."""
        if not self.merged:
            self.merge()
        return self._remove_wrappers()

    def unload(self) -> nn.Module:
        """The base model with the sparse wrappers removed and the diff taken out (unmerged first if
        merged): the weights are bitwise the base again. Its parameters stay frozen."""
        if self.merged:
            self.unmerge()
        return self._remove_wrappers()

    def _remove_wrappers(self) -> nn.Module:
        for name, layer in self.sparse_layers().items():
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, layer.base_layer)
        return self.base_model

    # ------------------------------------------------------------ save / load

    def to_diff(self, provenance: dict[str, Any] | None = None, diff_name: str = DEFAULT_DIFF) -> SparseDiff:
        """The diff ``diff_name`` as a ``SparseDiff``: the trained default one, or a loaded one as it was read."""
        if diff_name != DEFAULT_DIFF:
            if diff_name not in self.frozen_diffs:
                raise UnknownDiffError(f"no diff named {diff_name!r} is loaded; loaded: {self.diff_names}")
            diff = self.frozen_diffs[diff_name]
            return dataclasses.replace(diff, provenance={**diff.provenance, **(provenance or {})})
        layers = {n: layer for n, layer in self.sparse_layers().items() if n in self._default_modules}
        return SparseDiff(
            config=self.sparse_config,
            masks={n: layer.indices.detach().cpu() for n, layer in layers.items()},
            values={n: layer.values.detach().cpu() for n, layer in layers.items()},
            shapes={n: tuple(layer.weight.shape) for n, layer in layers.items()},
            base_model=str(getattr(getattr(self.base_model, "config", None), "_name_or_path", "") or ""),
            base_fingerprint=self.base_fingerprint,
            provenance={**default_provenance(), **(provenance or {})},
        )

    def save_pretrained(
        self, save_directory: str | os.PathLike, provenance: dict[str, Any] | None = None, diff_name: str = DEFAULT_DIFF
    ) -> Path:
        """Write the diff ``diff_name`` (default: the trained one) atomically to ``save_directory``; returns its path."""
        return write_diff(self.to_diff(provenance, diff_name), save_directory)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        diff_directory: str | os.PathLike,
        is_trainable: bool = False,
        allow_unverified_base: bool = False,
    ) -> "SparseModel":
        """Load a diff onto ``model``. Everything is validated and every value tensor prepared before the
        model is touched, and a failure while wrapping undoes it: on any error ``model`` is unchanged.

        A diff that records no base fingerprint is refused (``UnverifiedBaseError``) unless
        ``allow_unverified_base=True``, which loads it with a logged warning."""
        diff_directory = resolve_diff(diff_directory)  # a local directory, or a Hub id org/name[@rev]
        diff = read_diff(diff_directory)
        check_against_model(diff, target_weights(model, diff.config), where=str(diff_directory),
                            allow_unverified_base=allow_unverified_base)
        values = {name: diff.values[name].to(torch.float32) for name in diff.masks}
        sparse = cls(model, diff.config, diff.masks, base_fingerprint=diff.base_fingerprint or None, values=values)
        for layer in sparse.sparse_layers().values():
            layer.values.requires_grad_(is_trainable and layer.k > 0)  # k=0: nothing to train (see SparseLinear)
        return sparse


def default_provenance() -> dict[str, Any]:
    import transformers

    from . import __version__

    # No timestamp: the same run must give the same bytes, so diffs can be compared by hash.
    return {
        "versions": {"sparseft": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


DIFF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def check_new_diff_name(name: str, loaded: list[str]) -> None:
    """``name`` can name one more diff: letters, digits, ``_`` or ``-``, not taken, not reserved."""
    if not isinstance(name, str) or not DIFF_NAME.fullmatch(name):
        raise ConfigError(f"a diff name must be letters, digits, '_' or '-' (e.g. 'style_b'), got {name!r}")
    if name in loaded:
        raise ConfigError(f"a diff named {name!r} is already loaded (loaded: {loaded}); pick another name")
    if hasattr(nn.ModuleDict(), name):  # layers keep frozen diffs in a ModuleDict, whose attributes it would shadow
        raise ConfigError(f"{name!r} is reserved (an attribute of torch's ModuleDict); pick another diff name")


def check_diff_weight(name: str, weight: float) -> float:
    """``weight`` as a finite float, or a ``ConfigError`` naming the diff."""
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise ConfigError(f"the weight of diff {name!r} must be a number, got {weight!r}") from None
    if not math.isfinite(weight):
        raise ConfigError(f"the weight of diff {name!r} must be finite, got {weight}")
    return weight
