"""Mask files: which entries to train, chosen once by ``sparseft select`` and reused by ``train --masks``.

One safetensors file: one int64 tensor of sorted flat indices per module (named by the module) and
string metadata ``format``, ``format_version``, ``config`` (the SparseConfig as JSON), ``shapes``
(each module's weight shape, JSON) and ``base_model``. Everything is validated on load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_file
from ..config import SparseConfig
from ..diffio import check_indices
from ..errors import ConfigError, MaskFileError

MASK_FORMAT = "sparseft-masks"
MASK_FORMAT_VERSION = 1


@dataclass
class MaskFile:
    """Everything a mask file holds: the masks and how they were chosen (``read_mask_file``)."""

    masks: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    config: SparseConfig
    base_model: str = ""

    @property
    def num_entries(self) -> int:
        return sum(m.numel() for m in self.masks.values())


def save_masks(
    path: str | os.PathLike,
    masks: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    config: SparseConfig,
    base_model: str = "",
) -> Path:
    """Validate and write masks atomically (a crash leaves any previous file at ``path`` intact).

    Example:
        >>> save_masks("masks.safetensors", masks, {n: l.weight.shape for n, l in find_targets(model, cfg.target_modules).items()}, cfg)  # doctest: +SKIP
    """
    path = Path(path)
    tensors = {name: torch.as_tensor(idx).to(torch.long).contiguous() for name, idx in masks.items()}
    shapes = {name: tuple(int(d) for d in shapes[name]) for name in tensors if name in shapes}
    check_masks(tensors, shapes, where=str(path))
    meta = {
        "format": MASK_FORMAT,
        "format_version": str(MASK_FORMAT_VERSION),
        "config": config.to_json(),
        "shapes": json.dumps({name: list(s) for name, s in shapes.items()}, sort_keys=True),
        "base_model": base_model,
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The validated masks ``{module: sorted flat int64 indices}`` of a mask file.

    Example:
        >>> model = get_sparse_model(base, cfg, masks=load_masks("masks.safetensors"))  # doctest: +SKIP
    """
    return read_mask_file(path).masks


def read_mask_file(path: str | os.PathLike) -> MaskFile:
    """Read and validate a mask file: format, config, shapes, and indices (int64, 1-D, sorted,
    unique, within the module's weight). Raises MaskFileError / InvalidIndicesError naming the
    file and module; nothing is returned unless everything is valid.

    Example:
        >>> mf = read_mask_file("masks.safetensors")  # doctest: +SKIP
        >>> model = get_sparse_model(base, mf.config, masks=mf.masks)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"{path}: no such mask file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise MaskFileError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != MASK_FORMAT:
        raise MaskFileError(f"{path}: not a sparseft mask file (metadata 'format' must be {MASK_FORMAT!r})")
    if meta.get("format_version") != str(MASK_FORMAT_VERSION):
        raise MaskFileError(
            f"{path}: mask format_version {meta.get('format_version')!r} is not supported "
            f"(this sparseft reads version {MASK_FORMAT_VERSION})"
        )
    config = parse_config(meta, path)
    shapes = parse_shapes(meta, path)
    check_masks(tensors, shapes, where=str(path))
    return MaskFile(masks=tensors, shapes=shapes, config=config, base_model=meta.get("base_model", ""))


def parse_config(meta: dict[str, str], path: Path) -> SparseConfig:
    try:
        return SparseConfig.from_dict(json.loads(meta["config"]))
    except KeyError:
        raise MaskFileError(f"{path}: metadata field 'config' is missing") from None
    except (json.JSONDecodeError, TypeError, ConfigError) as e:
        raise MaskFileError(f"{path}: metadata field 'config' is not a valid SparseConfig ({e})") from e


def parse_shapes(meta: dict[str, str], path: Path) -> dict[str, tuple[int, ...]]:
    try:
        raw = json.loads(meta["shapes"])
        return {name: tuple(int(d) for d in shape) for name, shape in raw.items()}
    except KeyError:
        raise MaskFileError(f"{path}: metadata field 'shapes' is missing") from None
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise MaskFileError(f"{path}: metadata field 'shapes' must map module names to shapes ({e})") from e


def check_masks(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    if not tensors:
        raise MaskFileError(f"{where}: holds no modules")
    missing = sorted(set(tensors) - set(shapes))
    extra = sorted(set(shapes) - set(tensors))
    if missing or extra:
        raise MaskFileError(f"{where}: modules without a recorded shape {missing}, shapes without indices {extra}")
    for name, idx in tensors.items():
        if idx.dtype != torch.int64:
            raise MaskFileError(f"{where}: indices of {name} must be int64, got {idx.dtype}")
        numel = 1
        for d in shapes[name]:
            numel *= d
        check_indices(name, idx, numel, where)
    if sum(idx.numel() for idx in tensors.values()) == 0:
        raise MaskFileError(f"{where}: selects no entries at all")
