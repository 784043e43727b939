"""SparseModel: a Hugging Face model whose targeted linear layers carry sparse deltas.

The verbs follow PEFT (``get_sparse_model``, ``save_pretrained``, ``from_pretrained``, ``merge``,
``unmerge``, ``merge_and_unload``), so a PEFT user finds their way at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import SparseConfig
from .delta import SparseLinear, merge_layers, unmerge_layers
from .diffio import SparseDiff, check_against_model, check_diff, fingerprints, read_diff, write_diff
from .errors import ConfigError, MergeStateError
from .selection import select
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
    check_against_model(probe, weights, where="masks")
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

    # ------------------------------------------------------------ apply / revert

    def merge(self) -> None:
        """Write W + S into every targeted weight (keeping the overwritten entries for ``unmerge``);
        all layers or, if one fails, none."""
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

    def to_diff(self, provenance: dict[str, Any] | None = None) -> SparseDiff:
        layers = self.sparse_layers()
        return SparseDiff(
            config=self.sparse_config,
            masks={n: layer.indices.detach().cpu() for n, layer in layers.items()},
            values={n: layer.values.detach().cpu() for n, layer in layers.items()},
            shapes={n: tuple(layer.weight.shape) for n, layer in layers.items()},
            base_model=str(getattr(getattr(self.base_model, "config", None), "_name_or_path", "") or ""),
            base_fingerprint=self.base_fingerprint,
            provenance={**default_provenance(), **(provenance or {})},
        )

    def save_pretrained(self, save_directory: str | os.PathLike, provenance: dict[str, Any] | None = None) -> Path:
        """Write the diff (atomically) to ``save_directory``; returns its path."""
        return write_diff(self.to_diff(provenance), save_directory)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, diff_directory: str | os.PathLike, is_trainable: bool = False
    ) -> "SparseModel":
        """Load a diff onto ``model``. Everything is validated and every value tensor prepared before the
        model is touched, and a failure while wrapping undoes it: on any error ``model`` is unchanged."""
        diff = read_diff(diff_directory)
        targets = find_targets(model, diff.config.target_modules)
        check_against_model(diff, {n: t.weight for n, t in targets.items()}, where=str(diff_directory))
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
