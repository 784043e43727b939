"""The diff on disk: a directory with ``sparse_config.json`` and ``sparse_delta.safetensors``.

Layout of ``sparse_delta.safetensors`` (three tensors):

- ``gaps`` (int16 bits read as uint16, one per entry): index minus previous index of the same module
  (the first relative to -1), so every gap is >= 1; a gap of 0 is an escape meaning "take the next
  value of ``escapes``" for the rare gap over 65535. At density >= 0.1% the mean gap is <= 1000, so
  escapes are rare and indices cost ~2 bytes per entry.
- ``escapes`` (int64): the gaps that did not fit 16 bits, in order.
- ``values`` (bf16, fp16 or fp32 as ``value_dtype`` says).

Modules are concatenated in sorted name order; ``sparse_config.json["tensors"]`` gives each one's k.

With bf16 values a trained entry costs about 4 bytes on disk. Everything is validated before any
model is touched. A write goes to a temporary directory renamed into place (``atomic.replace_dir``):
a reader sees the previous diff or the new one, never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir
from .base_match import check_base_fingerprint, fingerprint, trained_over, trained_skip
from .config import DTYPES, SparseConfig
from .errors import (
    ConfigError,
    DiffCorruptError,
    DiffNotFoundError,
    DtypeMismatchError,
    InvalidIndicesError,
    NonFiniteValuesError,
    ShapeMismatchError,
    UnsupportedFormatError,
)
from .files import read_json_file
from .hub import CARD_NAME, model_card
from .targets import find_targets, matches

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "sparse_config.json"
DELTA_NAME = "sparse_delta.safetensors"
MAX_GAP = 65535
DELTA_STREAMS = ("gaps", "escapes", "values")  # the tensors of DELTA_NAME, and all of them
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass
class SparseDiff:
    """A diff in memory: which entries (``masks``), their ``values``, and what it was made from."""

    config: SparseConfig
    masks: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    base_model: str = ""
    base_fingerprint: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    file_hashes: dict[str, str] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        return sum(m.numel() for m in self.masks.values())


# ---------------------------------------------------------------- index coding


def encode_indices(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique flat indices -> (uint16 gaps stored as int16, int64 escapes)."""
    idx = indices.to(torch.long)
    gaps = torch.diff(idx, prepend=torch.tensor([-1], dtype=torch.long))
    big = gaps > MAX_GAP
    escapes = gaps[big].clone()
    gaps = gaps.masked_fill(big, 0)
    return gaps.to(torch.int32).to(torch.int16), escapes  # int32 -> int16 wraps 32768..65535 to negatives


def decode_indices(gaps: torch.Tensor, escapes: torch.Tensor) -> torch.Tensor:
    g = gaps.to(torch.long) & 0xFFFF
    escape_at = g == 0
    if int(escape_at.sum()) != escapes.numel():
        raise DiffCorruptError(f"index stream has {int(escape_at.sum())} escapes but {escapes.numel()} escape values")
    g[escape_at] = escapes.to(torch.long)
    return torch.cumsum(g, 0) - 1


# ---------------------------------------------------------------- the base a diff records


def recorded_skip(paths: Iterable[str | os.PathLike | None], quantize: str | None) -> list[str]:
    """The ``quantize_skip`` a base quantized with ``quantize`` needs for the sparse diffs at ``paths``: the layers
    their training runs left unquantized, as they record them, so that a command given ``--quantize`` rebuilds
    the mixed base a diff was trained over. One base serves every diff given, so they must agree. Empty without
    ``quantize``; None (no diff), a path holding no sparse diff (a PEFT adapter) or a diff trained over another
    scheme adds none. The same patterns in another order are the same base."""
    if not quantize:
        return []
    recorded: dict[frozenset[str], tuple[list[str], Path]] = {}
    for path in (Path(p) for p in paths if p is not None):
        provenance = provenance_of(path)
        if trained_over(provenance)[1] == quantize:
            skip = trained_skip(provenance)
            recorded.setdefault(frozenset(skip), (skip, path))
    if len(recorded) > 1:
        bases = "; ".join(f"{path}: {skip or 'none'}" for skip, path in recorded.values())
        raise ConfigError(f"the diffs were trained over different {quantize} bases (layers left unquantized: {bases}); "
                          "one base serves them all, so load them in separate runs")
    skip = next(iter(recorded.values()), ([], None))[0]
    if skip:
        log.info("quantizing the base with %s but for the layers %s, as the diff's training run did", quantize, skip)
    return skip


def provenance_of(path: Path) -> dict[str, Any] | None:
    """The provenance a sparse diff directory's config records, read leniently: None where there is no such
    config or it does not parse (loading the diff itself then says what is wrong, in its own words)."""
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    provenance = meta.get("provenance") if isinstance(meta, dict) else None
    return provenance if isinstance(provenance, dict) else None


# ---------------------------------------------------------------- validation


def check_indices(name: str, indices: torch.Tensor, numel: int, where: str) -> None:
    if indices.dtype not in (torch.int64, torch.int32):
        raise InvalidIndicesError(f"{where}: indices of {name} must be integers, got {indices.dtype}")
    if indices.dim() != 1:
        raise InvalidIndicesError(f"{where}: indices of {name} must be 1-D, got shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        raise InvalidIndicesError(f"{where}: indices of {name} span [{lo}, {hi}], outside [0, {numel - 1}]")
    steps = torch.diff(indices)
    if bool((steps == 0).any()):
        pos = int((steps == 0).nonzero()[0]) + 1
        raise InvalidIndicesError(f"{where}: indices of {name} repeat {int(indices[pos])} at position {pos}")
    if bool((steps < 0).any()):
        pos = int((steps < 0).nonzero()[0]) + 1
        raise InvalidIndicesError(f"{where}: indices of {name} are not sorted ascending at position {pos}")


def check_values(name: str, values: torch.Tensor, k: int, where: str) -> None:
    if values.dim() != 1:
        raise DiffCorruptError(f"{where}: values of {name} must be 1-D, got shape {tuple(values.shape)}")
    if values.numel() != k:
        raise DiffCorruptError(f"{where}: {name} has {values.numel()} values for {k} indices")
    bad = ~torch.isfinite(values.float())
    if bool(bad.any()):
        pos = int(bad.nonzero()[0])
        raise NonFiniteValuesError(f"{where}: values of {name} hold {int(bad.sum())} NaN/Inf (first at position {pos})")


def check_diff(diff: SparseDiff, where: str = "diff") -> None:
    """Self-consistency of a diff: valid indices and finite values of the right count for every module."""
    for name, idx in diff.masks.items():
        numel = 1
        for d in diff.shapes[name]:
            numel *= d
        check_indices(name, idx, numel, where)
        check_values(name, diff.values[name], idx.numel(), where)


def check_against_model(
    diff: SparseDiff,
    weights: dict[str, torch.Tensor],
    where: str,
    fingerprint_of: Callable[[dict[str, torch.Tensor]], str] = fingerprint,
    allow_unverified_base: bool = False,
) -> None:
    """The diff fits these base weights (``target_weights``): every module exists with the recorded shape,
    and the base is the one whose fingerprint the diff records (see ``check_base_fingerprint``)."""
    check_shapes(diff.shapes, weights, where)
    check_base_fingerprint(diff.base_fingerprint, diff.base_model, {n: weights[n] for n in diff.shapes}, where,
                           fingerprint_of, allow_unverified_base, diff.provenance)


def target_weights(model: torch.nn.Module, config: SparseConfig) -> dict[str, torch.Tensor]:
    """The weights a diff with this selection may change: loading, serving and verify all check against these."""
    return {name: layer.weight for name, layer in find_targets(model, config.target_modules).items()}


def check_shapes(shapes: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor], where: str) -> None:
    """Every module of the diff is a targeted weight of the model with the recorded shape."""
    for name, shape in shapes.items():
        if name not in weights:
            raise ShapeMismatchError(f"{where}: module {name} of the diff is not a targeted linear layer of the model")
        if tuple(weights[name].shape) != tuple(shape):
            raise ShapeMismatchError(
                f"{where}: {name} has shape {tuple(shape)} in the diff but {tuple(weights[name].shape)} in the model"
            )


# ---------------------------------------------------------------- write


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def delta_tensors(diff: SparseDiff) -> dict[str, torch.Tensor]:
    dtype = DTYPES[diff.config.value_dtype]
    names = sorted(diff.masks)
    coded = [encode_indices(diff.masks[n]) for n in names]
    empty_long = torch.zeros(0, dtype=torch.long)
    return {
        "gaps": torch.cat([g for g, _ in coded]) if names else torch.zeros(0, dtype=torch.int16),
        "escapes": torch.cat([e for _, e in coded] + [empty_long]),
        "values": torch.cat([diff.values[n].detach().cpu().to(dtype) for n in names]),
    }


def config_json(diff: SparseDiff, delta_sha256: str) -> dict[str, Any]:
    return {
        "format": "sparseft-diff",
        "format_version": FORMAT_VERSION,
        "base_model": diff.base_model,
        "base_fingerprint": diff.base_fingerprint,
        "value_dtype": diff.config.value_dtype,
        "index_coding": "gap-uint16-escape-int64",
        "num_entries": diff.num_entries,
        "tensors": {n: {"shape": list(diff.shapes[n]), "k": int(diff.masks[n].numel())} for n in diff.masks},
        "selection": diff.config.to_dict(),
        "provenance": diff.provenance,
        "file_hashes": {DELTA_NAME: delta_sha256},
    }


def write_diff(diff: SparseDiff, path: str | os.PathLike, validate: bool = True) -> Path:
    """Write via a temporary sibling directory that replaces ``path`` at the end (``atomic.replace_dir``),
    so a crash while writing leaves any previous diff at ``path`` as it was."""
    if validate:
        check_diff(diff, where=str(path))
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(delta_tensors(diff), str(tmp / DELTA_NAME), metadata={"format": "sparseft-diff"})
        meta = config_json(diff, file_sha256(tmp / DELTA_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / CARD_NAME).write_text(model_card(diff))  # not in file_hashes: a card may be edited
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    diff.file_hashes = meta["file_hashes"]
    return path


# ---------------------------------------------------------------- read


def diff_file(path: Path, name: str) -> Path:
    """``path / name``, refused when it is (or goes through) a symlink that leads outside the diff directory:
    a diff is what its directory holds, so a reader is never pointed at some other file of the system."""
    file = path / name
    if os.path.lexists(file) and not file.resolve().is_relative_to(path.resolve()):
        raise DiffCorruptError(
            f"{file}: a symlink to {file.resolve()}, outside the diff directory; copy the file into the diff instead"
        )
    return file


def check_diff_dir(path: str | os.PathLike, flag: str | None = "--diff") -> Path:
    """``path`` when a directory is there; ``flag``, the option that gave it, is named in the error. Commands
    that load a base model check it first: a missing diff was named only after the model had loaded (and by
    verify as a failed check, exit 1, rather than as bad input)."""
    if not Path(path).is_dir():
        raise DiffNotFoundError(f"{f'{flag} ' if flag else ''}{path}: no such diff directory")
    return Path(path)


def read_config(path: Path) -> dict[str, Any]:
    """``sparse_config.json`` parsed, with every field a later step reads checked for presence and type."""
    check_diff_dir(path, flag=None)
    cfg_path = diff_file(path, CONFIG_NAME)
    if not cfg_path.is_file():
        raise DiffNotFoundError(f"{cfg_path}: missing; a diff directory holds {CONFIG_NAME} and {DELTA_NAME}")
    meta = read_json_file(cfg_path, DiffCorruptError)
    if not isinstance(meta, dict) or meta.get("format") != "sparseft-diff":
        raise DiffCorruptError(f"{cfg_path}: not a sparseft diff config (field 'format' must be 'sparseft-diff')")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{cfg_path}: format_version {version!r} is not supported (this sparseft reads version {FORMAT_VERSION})"
        )
    for key in ("tensors", "value_dtype", "selection", "file_hashes"):
        if key not in meta:
            raise DiffCorruptError(f"{cfg_path}: required field {key!r} is missing")
    check_field_types(meta, cfg_path)
    check_tensor_specs(meta, cfg_path)
    if not isinstance(meta["value_dtype"], str) or meta["value_dtype"] not in DTYPES:
        raise DtypeMismatchError(f"{cfg_path}: value_dtype {meta['value_dtype']!r} is not one of {sorted(DTYPES)}")
    return meta


def check_field_types(meta: dict[str, Any], cfg_path: Path) -> None:
    """The descriptive fields have the types the writer gives them (a clear error, not a TypeError later)."""
    if not isinstance(meta.get("base_model", ""), str):
        raise DiffCorruptError(f"{cfg_path}: field 'base_model' must be a string, got {meta['base_model']!r}")
    prints = meta.get("base_fingerprint", {})
    if not isinstance(prints, dict) or not all(isinstance(v, str) and SHA256_HEX.fullmatch(v) for v in prints.values()):
        raise DiffCorruptError(
            f"{cfg_path}: field 'base_fingerprint' must map dtype names to sha256 hex digests, got {prints!r:.200}"
        )
    for key in ("provenance", "selection"):
        if not isinstance(meta.get(key, {}), dict):
            raise DiffCorruptError(f"{cfg_path}: field {key!r} must be a mapping, got {meta[key]!r:.200}")
    hashes = meta["file_hashes"]
    if not isinstance(hashes, dict) or not all(isinstance(v, str) and SHA256_HEX.fullmatch(v) for v in hashes.values()):
        raise DiffCorruptError(f"{cfg_path}: field 'file_hashes' must map file names to sha256 hex digests")
    if DELTA_NAME not in hashes:  # without it nothing shows the tensor file is the one written with this config
        raise DiffCorruptError(f"{cfg_path}: field 'file_hashes' records no sha256 of {DELTA_NAME}")


def check_tensor_specs(meta: dict[str, Any], cfg_path: Path) -> None:
    """The fields later steps index into have the types they expect (a clear error, not a KeyError)."""
    if not isinstance(meta["tensors"], dict):
        raise DiffCorruptError(f"{cfg_path}: field 'tensors' must be a mapping")
    if not meta["tensors"]:
        raise DiffCorruptError(f"{cfg_path}: field 'tensors' lists no module; a diff changes at least one")
    for name, spec in meta["tensors"].items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        k = spec.get("k") if isinstance(spec, dict) else None
        shape_ok = isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape)
        if not shape_ok or type(k) is not int or k < 0:
            raise DiffCorruptError(
                f"{cfg_path}: tensors[{name!r}] must be {{'shape': [positive ints], 'k': int >= 0}}, got {spec!r:.200}"
            )


def check_file_hashes(path: Path, meta: dict[str, Any]) -> None:
    """Every file whose sha256 was recorded at save time exists and still has that hash."""
    for name, expected in sorted(meta["file_hashes"].items()):
        if Path(name).name != name or name in ("", ".", ".."):  # a hostile config must not point outside the diff
            raise DiffCorruptError(f"{path / CONFIG_NAME}: file_hashes names {name!r}, not a file of the diff directory")
        file_path = diff_file(path, name)
        if not file_path.is_file():
            raise DiffNotFoundError(f"{file_path}: missing")
        if file_sha256(file_path) != expected:
            raise DiffCorruptError(
                f"{file_path}: sha256 differs from the one recorded at save time; the file was modified or truncated"
            )


def load_delta_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The three streams of the tensor file, checked for presence, 1-D shape and index dtypes (not yet split)."""
    delta_path = diff_file(path, DELTA_NAME)
    if not delta_path.is_file():
        raise DiffNotFoundError(f"{delta_path}: missing")
    try:
        tensors = load_file(str(delta_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DiffCorruptError(f"{delta_path}: unreadable safetensors file ({e})") from e
    missing = set(DELTA_STREAMS) - set(tensors)
    if missing:
        raise DiffCorruptError(f"{delta_path}: tensors {sorted(missing)} are missing")
    extra = set(tensors) - set(DELTA_STREAMS)
    if extra:  # e.g. per-module tensors added by hand: reading would ignore them and load less than the file holds
        raise DiffCorruptError(
            f"{delta_path}: tensors {sorted(extra)} are not part of a sparseft diff, which holds {list(DELTA_STREAMS)} only"
        )
    for name in DELTA_STREAMS:
        if tensors[name].dim() != 1:
            raise DiffCorruptError(f"{delta_path}: tensor {name!r} must be 1-D, got shape {tuple(tensors[name].shape)}")
    if tensors["gaps"].dtype != torch.int16 or tensors["escapes"].dtype != torch.int64:
        raise DtypeMismatchError(
            f"{delta_path}: gaps/escapes must be int16/int64, got {tensors['gaps'].dtype}/{tensors['escapes'].dtype}"
        )
    return tensors


def split_modules(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str):
    """Cut the concatenated streams back into per-module (indices, values)."""
    names = sorted(meta["tensors"])
    ks = [int(meta["tensors"][n]["k"]) for n in names]
    if sum(ks) != tensors["gaps"].numel() or sum(ks) != tensors["values"].numel():
        raise DiffCorruptError(
            f"{where}: the config lists {sum(ks)} entries, the file holds {tensors['gaps'].numel()} indices "
            f"and {tensors['values'].numel()} values"
        )
    gaps = torch.split(tensors["gaps"], ks)
    values = torch.split(tensors["values"], ks)
    escape_counts = [int(((g.to(torch.long) & 0xFFFF) == 0).sum()) for g in gaps]
    if sum(escape_counts) != tensors["escapes"].numel():
        raise DiffCorruptError(f"{where}: {sum(escape_counts)} escapes coded, {tensors['escapes'].numel()} stored")
    escapes = torch.split(tensors["escapes"], escape_counts)
    masks, vals = {}, {}
    for name, g, e, v in zip(names, gaps, escapes, values):
        masks[name] = decode_indices(g, e)
        vals[name] = v.clone()
    return masks, vals


def check_value_dtype(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
    value_dtype = DTYPES[meta["value_dtype"]]
    if tensors["values"].dtype != value_dtype:
        raise DtypeMismatchError(f"{where}: values are {tensors['values'].dtype}, {CONFIG_NAME} declares {value_dtype}")


def parse_selection(meta: dict[str, Any], where: str) -> SparseConfig:
    """The ``selection`` field as a SparseConfig whose scorer exists and whose ``target_modules`` cover
    every module of the diff (else loading would look for the diff's modules among the wrong layers)."""
    from .selection import SCORERS  # selection imports this module's users; import late

    try:
        config = SparseConfig.from_dict(meta["selection"])
    except (TypeError, ValueError) as e:
        raise DiffCorruptError(f"{where}: field 'selection' is not a valid SparseConfig ({e})") from e
    if config.scorer not in SCORERS:
        raise DiffCorruptError(f"{where}: selection.scorer {config.scorer!r} is not one of {sorted(SCORERS)}")
    if config.value_dtype != meta["value_dtype"]:  # the writer records one dtype twice; later steps read either
        raise DiffCorruptError(
            f"{where}: selection.value_dtype {config.value_dtype!r} differs from value_dtype {meta['value_dtype']!r}; "
            "both name the dtype of the stored values"
        )
    outside = sorted(n for n in meta["tensors"] if not matches(n, config.target_modules))
    if outside:
        raise DiffCorruptError(
            f"{where}: module {outside[0]!r} of 'tensors' is not matched by selection.target_modules "
            f"{config.target_modules}" + (f" (and {len(outside) - 1} more)" if len(outside) > 1 else "")
        )
    return config


# ---------------------------------------------------------------- the checks of a read, in order


@dataclass
class DiffReading:
    """What reading a diff has established so far; each step of ``READ_STEPS`` adds to it."""

    path: Path
    meta: dict[str, Any] | None = None
    tensors: dict[str, torch.Tensor] | None = None
    masks: dict[str, torch.Tensor] | None = None
    values: dict[str, torch.Tensor] | None = None
    config: SparseConfig | None = None

    @property
    def where(self) -> str:
        return str(self.path / DELTA_NAME)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(spec["shape"]) for n, spec in self.meta["tensors"].items()}


def step_config(r: DiffReading) -> None:
    r.meta = read_config(r.path)


def step_file_hashes(r: DiffReading) -> None:
    check_file_hashes(r.path, r.meta)


def step_tensors(r: DiffReading) -> None:
    tensors = load_delta_tensors(r.path)
    r.masks, r.values = split_modules(r.meta, tensors, r.where)
    r.tensors = tensors


def step_dtypes(r: DiffReading) -> None:
    check_value_dtype(r.meta, r.tensors, r.where)


def step_selection(r: DiffReading) -> None:
    r.config = parse_selection(r.meta, str(r.path / CONFIG_NAME))


def each_module(check: Callable[[str], None], names: list[str]) -> None:
    """Apply ``check`` to every module; raise the first failure, counting the other failing modules."""
    failures = []
    for name in names:
        try:
            check(name)
        except (InvalidIndicesError, DiffCorruptError, NonFiniteValuesError) as e:
            failures.append(e)
    if failures:
        more = f" (and {len(failures) - 1} more module(s))" if len(failures) > 1 else ""
        raise type(failures[0])(f"{failures[0]}{more}")


def step_indices(r: DiffReading) -> None:
    shapes = r.shapes
    each_module(lambda n: check_indices(n, r.masks[n], math.prod(shapes[n]), r.where), sorted(r.masks))


def step_values(r: DiffReading) -> None:
    each_module(lambda n: check_values(n, r.values[n], r.masks[n].numel(), r.where), sorted(r.masks))


@dataclass(frozen=True)
class ReadStep:
    """One named check of a read: what it needs established (``DiffReading`` fields) and the function."""

    name: str
    needs: tuple[str, ...]
    run: Callable[[DiffReading], None]


# The one list of what reading a diff checks: ``read_diff`` stops at the first failure, ``audit.verify``
# runs every step it can and reports each; so verify passes exactly the diffs that load (before the model).
READ_STEPS = (
    ReadStep("config", (), step_config),
    ReadStep("file_hashes", ("meta",), step_file_hashes),
    ReadStep("tensors", ("meta",), step_tensors),
    ReadStep("dtypes", ("tensors",), step_dtypes),
    ReadStep("selection", ("meta",), step_selection),
    ReadStep("indices", ("masks",), step_indices),
    ReadStep("values", ("masks",), step_values),
)


def read_diff(path: str | os.PathLike) -> SparseDiff:
    """Read and fully validate a diff directory (not yet against a model): every step of ``READ_STEPS``."""
    reading = DiffReading(Path(path))
    for step in READ_STEPS:
        step.run(reading)
    meta = reading.meta
    return SparseDiff(
        config=reading.config,
        masks=reading.masks,
        values=reading.values,
        shapes=reading.shapes,
        base_model=meta.get("base_model", ""),
        base_fingerprint=meta.get("base_fingerprint", {}),
        provenance=meta.get("provenance", {}),
        file_hashes=meta["file_hashes"],
    )
