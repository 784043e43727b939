"""PEFT interop: a sparseft diff as a PEFT SHiRA adapter, and PEFT sparse adapters as sparseft diffs.

SHiRA (``peft.ShiraConfig``) is PEFT's sparse adapter. Its files, as ``peft.tuners.shira`` writes and
reads them:

- ``adapter_config.json``: ``peft_type: "SHIRA"``, one global ``r`` and ``target_modules``.
- ``adapter_model.safetensors``: for each adapted linear ``<name>`` (named inside the base model),
  ``base_model.model.<name>.shira_weight`` (float32, ``r * (in + out)`` values) and
  ``base_model.model.<name>.shira_indices`` (int32, shape ``(2, r * (in + out))``: row then column).
  The layer adds ``sparse_coo_tensor(indices, weight, (out, in))`` to the base weight (scaling 1).

SHiRA needs exactly ``r * (in + out)`` entries in every layer, a diff has any k per layer. Export picks
the smallest ``r`` that holds the densest layer and fills the rest of every layer with zero values at
positions the diff does not use; ``ExportReport`` says what that padding costs.

Import reads SHiRA and (when the installed peft has it) Super-Tuning (``SUPERTUNING``: flat int32
``supertuning_indices`` and float32 ``supertuning_values`` per layer) and records the base's fingerprint,
so the diff is checked against its base like any trained one. Zero values are dropped by default: they
change nothing and are what export's padding writes.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_dir
from .config import DTYPES, SparseConfig
from .base_match import fingerprints
from .diffio import CONFIG_NAME, DELTA_NAME, SparseDiff, check_diff
from .errors import AdapterFormatError, ShapeMismatchError
from .files import read_json_file
from .targets import find_targets

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before a module name in its saved state dict
VALUE_DTYPE_KEY = "sparseft_value_dtype"  # safetensors metadata: the diff's own dtype, for a lossless import
SHIRA_TENSORS = ("shira_weight", "shira_indices")
SUPERTUNING_TENSORS = ("supertuning_values", "supertuning_indices")


# ---------------------------------------------------------------- export


@dataclass
class ExportReport:
    """The SHiRA adapter written for a diff and what SHiRA's fixed entry count cost."""

    r: int
    diff_entries: int
    padded_entries: int  # zero-valued entries added so every layer holds r * (in + out)
    adapter_bytes: int  # size of adapter_model.safetensors
    diff_bytes: int | None  # size of the diff's own files, when it was read from a directory
    densest_module: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shira_rank(diff: SparseDiff) -> tuple[int, str]:
    """``(r, module)``: the smallest SHiRA r with ``r * (in + out) >= k`` for every layer, and the layer that sets it."""
    needs = {name: math.ceil(int(diff.masks[name].numel()) / sum(shape)) for name, shape in diff.shapes.items()}
    densest = max(sorted(needs), key=lambda n: needs[n])
    return max(1, needs[densest]), densest


def padded_flat_indices(indices: torch.Tensor, numel: int, total: int) -> torch.Tensor:
    """``indices`` plus the lowest ``total - len(indices)`` positions they do not use, sorted."""
    free = torch.ones(numel, dtype=torch.bool)
    free[indices.to(torch.long)] = False
    filler = free.nonzero().flatten()[: total - indices.numel()]
    return torch.sort(torch.cat([indices.to(torch.long), filler])).values


def shira_tensors(diff: SparseDiff, r: int) -> tuple[dict[str, torch.Tensor], int]:
    """The SHiRA state dict for ``diff`` at rank ``r`` and the number of padding entries it holds."""
    tensors, padded = {}, 0
    for name in sorted(diff.masks):
        out_features, in_features = diff.shapes[name]
        total, numel = r * (in_features + out_features), out_features * in_features
        if total > numel:
            raise AdapterFormatError(
                f"{name} ({out_features}x{in_features}) cannot hold SHiRA's r*(in+out) = {r}*{in_features + out_features} "
                f"= {total} entries (it has {numel}); r={r} is set by the diff's densest layer — export fewer modules "
                "or a sparser diff"
            )
        flat = padded_flat_indices(diff.masks[name], numel, total)
        values = torch.zeros(numel, dtype=torch.float32)
        values[diff.masks[name].to(torch.long)] = diff.values[name].to(torch.float32)
        key = PEFT_PREFIX + name
        tensors[f"{key}.shira_weight"] = values[flat].contiguous()
        tensors[f"{key}.shira_indices"] = torch.stack([flat // in_features, flat % in_features]).to(torch.int32)
        padded += total - int(diff.masks[name].numel())
    return tensors, padded


def export_shira(
    diff: SparseDiff, out: str | os.PathLike, base_model: str | None = None, diff_dir: str | os.PathLike | None = None
) -> ExportReport:
    """Write ``diff`` as a PEFT SHiRA adapter directory that ``PeftModel.from_pretrained(base, out)`` loads.

    The adapter's config is built by ``peft.ShiraConfig`` itself; ``target_modules`` lists the diff's
    modules by full name so PEFT adapts exactly those. Values are stored as float32 (what SHiRA trains),
    which holds bf16/fp16 values exactly.

    Example:
        >>> report = export_shira(read_diff("runs/routing"), "runs/routing-shira")  # doctest: +SKIP
        >>> PeftModel.from_pretrained(base, "runs/routing-shira")  # doctest: +SKIP
    """
    from peft import ShiraConfig

    check_diff(diff, where="diff")
    for name, shape in diff.shapes.items():
        if len(shape) != 2:
            raise AdapterFormatError(f"{name} has shape {tuple(shape)}; SHiRA adapts 2-D linear weights only")
    r, densest = shira_rank(diff)
    tensors, padded = shira_tensors(diff, r)
    config = ShiraConfig(
        r=r,
        target_modules=sorted(diff.masks),
        base_model_name_or_path=base_model if base_model is not None else (diff.base_model or None),
        inference_mode=True,
        random_seed=0,  # PEFT draws a random mask before loading ours over it; seeded, loading is deterministic
    )
    out = Path(out)
    with atomic_dir(out) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", VALUE_DTYPE_KEY: diff.config.value_dtype})
    # The diff's data files only: its README.md model card is documentation, not the diff.
    diff_bytes = sum((Path(diff_dir) / name).stat().st_size for name in (CONFIG_NAME, DELTA_NAME)) if diff_dir else None
    return ExportReport(
        r=r,
        diff_entries=diff.num_entries,
        padded_entries=padded,
        adapter_bytes=(out / ADAPTER_WEIGHTS).stat().st_size,
        diff_bytes=diff_bytes,
        densest_module=densest,
    )


def format_export_report(report: ExportReport, out: str) -> str:
    total = report.diff_entries + report.padded_entries
    lines = [
        f"wrote a PEFT SHiRA adapter (r={report.r}, set by {report.densest_module}) -> {out}",
        f"entries: {report.diff_entries:,} from the diff + {report.padded_entries:,} zero padding = {total:,} "
        f"({100 * report.padded_entries / max(1, total):.1f}% padding: SHiRA stores r*(in+out) per layer)",
    ]
    size = f"adapter_model.safetensors: {report.adapter_bytes:,} bytes (float32 values, int32 row/col indices)"
    if report.diff_bytes:
        size += f" vs {report.diff_bytes:,} bytes for the diff ({report.adapter_bytes / report.diff_bytes:.1f}x)"
    return "\n".join(lines + [size])


# ---------------------------------------------------------------- import


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """``(adapter_config, tensors, safetensors metadata)`` of a PEFT adapter directory, checked for presence."""
    path = Path(path)
    config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for required in (config_path, weights_path):
        if not required.is_file():
            raise AdapterFormatError(f"{required}: missing; a PEFT adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = read_json_file(config_path, AdapterFormatError)
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_path}: expected a JSON object")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"{weights_path}: unreadable safetensors file ({e})") from e
    return config, tensors, metadata


def group_by_module(tensors: dict[str, torch.Tensor], names: tuple[str, str], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (values, indices)}`` from keys ``base_model.model.<module>.<names[0] | names[1]>``."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, kind = key.rpartition(".")
        if kind in names:
            found.setdefault(stem.removeprefix(PEFT_PREFIX), {})[kind] = tensor
    if not found:
        raise AdapterFormatError(f"{where}: no {names[0]}/{names[1]} tensors; is this the adapter type its config says?")
    for module, parts in found.items():
        missing = [n for n in names if n not in parts]
        if missing:
            raise AdapterFormatError(
                f"{where}: {PEFT_PREFIX}{module}.{missing[0]} is missing "
                "(Super-Tuning adapters saved with save_precomputed_indices=False cannot be imported)"
            )
    return {module: (parts[names[0]], parts[names[1]]) for module, parts in found.items()}


def as_positions(indices: torch.Tensor, name: str, module: str, where: str) -> torch.Tensor:
    """``indices`` as int64. Float ones are taken (PEFT on Windows saves float32 indices) when they hold whole
    numbers; a fraction would be truncated to a neighbouring entry without a word."""
    if indices.is_floating_point() and not bool((torch.isfinite(indices) & (indices == indices.trunc())).all()):
        raise AdapterFormatError(f"{where}: {module}: {name} must hold whole numbers, got fractions or NaN/Inf "
                                 f"(dtype {str(indices.dtype).removeprefix('torch.')})")
    return indices.to(torch.long)


def shira_flat_indices(module: str, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], where: str) -> torch.Tensor:
    if indices.dim() != 2 or indices.shape[0] != 2 or values.dim() != 1 or indices.shape[1] != values.numel():
        raise AdapterFormatError(
            f"{where}: {module}: shira_indices must be (2, n) for n shira_weight values, "
            f"got {tuple(indices.shape)} and {tuple(values.shape)}"
        )
    indices = as_positions(indices, "shira_indices", module, where)
    rows, cols = indices[0], indices[1]
    if bool(((rows < 0) | (rows >= shape[0]) | (cols < 0) | (cols >= shape[1])).any()):
        raise AdapterFormatError(f"{where}: {module}: shira_indices fall outside the layer's {shape[0]}x{shape[1]} weight")
    return rows * shape[1] + cols


def supertuning_flat_indices(module: str, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], where: str) -> torch.Tensor:
    if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
        raise AdapterFormatError(
            f"{where}: {module}: supertuning_indices and supertuning_values must be 1-D of one length, "
            f"got {tuple(indices.shape)} and {tuple(values.shape)}"
        )
    flat = as_positions(indices, "supertuning_indices", module, where)
    if bool(((flat < 0) | (flat >= shape[0] * shape[1])).any()):
        raise AdapterFormatError(f"{where}: {module}: supertuning_indices fall outside the layer's {shape[0]}x{shape[1]} weight")
    return flat


IMPORTERS = {
    "SHIRA": (SHIRA_TENSORS, shira_flat_indices, "random"),
    "SUPERTUNING": (SUPERTUNING_TENSORS, supertuning_flat_indices, "magnitude"),
}


def sorted_entries(flat: torch.Tensor, values: torch.Tensor, keep_zeros: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique indices with their values; a repeated index sums its values (as both PEFT layers do)."""
    unique, slot = torch.unique(flat, sorted=True, return_inverse=True)
    summed = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, slot, values.to(torch.float64))
    keep = torch.ones_like(unique, dtype=torch.bool) if keep_zeros else summed != 0
    return unique[keep], summed[keep]


def import_adapter(
    path: str | os.PathLike,
    model: nn.Module,
    base_model: str = "",
    value_dtype: str | None = None,
    keep_zeros: bool = False,
) -> SparseDiff:
    """A sparseft diff holding the sparse update of the PEFT adapter at ``path``, for ``model`` (its base).

    ``value_dtype`` defaults to the dtype export recorded, else float32 (what PEFT stores: exact). Zero
    values are dropped unless ``keep_zeros``. Raises ``AdapterFormatError`` for an unsupported or
    inconsistent adapter and ``ShapeMismatchError`` when a module is not a linear layer of ``model``.

    Example:
        >>> diff = import_adapter("runs/shira", load_model("smollm2-135m"), "smollm2-135m")  # doctest: +SKIP
        >>> write_diff(diff, "runs/shira-as-diff")  # doctest: +SKIP
    """
    where = str(Path(path) / ADAPTER_WEIGHTS)
    config, tensors, metadata = read_adapter(path)
    peft_type = str(config.get("peft_type", ""))
    if peft_type not in IMPORTERS:
        raise AdapterFormatError(
            f"{Path(path) / ADAPTER_CONFIG}: peft_type {peft_type!r} is not a sparse adapter sparseft can import "
            f"(supported: {', '.join(IMPORTERS)}); LoRA-style adapters are dense updates"
        )
    if peft_type == "SUPERTUNING" and config.get("r") is not None:
        raise AdapterFormatError(
            f"{Path(path) / ADAPTER_CONFIG}: this Super-Tuning adapter has r={config['r']} (the 'Supra' hybrid): its "
            "LoRA part is a dense update that a sparse diff cannot hold"
        )
    names, to_flat, scorer = IMPORTERS[peft_type]
    given_by = "value_dtype" if value_dtype else f"metadata {VALUE_DTYPE_KEY}"
    value_dtype = value_dtype or metadata.get(VALUE_DTYPE_KEY) or "float32"
    if value_dtype not in DTYPES:
        raise AdapterFormatError(f"{where}: {given_by} {value_dtype!r} is not one of {sorted(DTYPES)}")
    modules = group_by_module(tensors, names, where)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    masks, values, shapes = {}, {}, {}
    for module, (vals, idx) in sorted(modules.items()):
        if module not in linears:
            raise ShapeMismatchError(f"{where}: module {module} of the adapter is not a linear layer of the model")
        shape = tuple(linears[module].weight.shape)
        flat = to_flat(module, vals, idx, shape, where)
        masks[module], summed = sorted_entries(flat, vals, keep_zeros)
        values[module], shapes[module] = summed.to(DTYPES[value_dtype]), shape
    num_entries = sum(m.numel() for m in masks.values())
    selection = SparseConfig(
        density=None, num_params=max(1, num_entries), target_modules=sorted(masks), scorer=scorer,
        allocation="per_module", value_dtype=value_dtype,
    )
    targets = find_targets(model, selection.target_modules)
    diff = SparseDiff(
        config=selection,
        masks=masks,
        values=values,
        shapes=shapes,
        base_model=base_model,
        base_fingerprint=fingerprints({n: targets[n].weight for n in masks}),
        provenance={"imported_from": {"peft_type": peft_type, "path": str(path), "peft_version": config.get("peft_version")}},
    )
    check_diff(diff, where=where)
    return diff
