"""SparseConfig: the handful of plain values that define a sparse fine-tuning run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import ConfigError

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALLOCATIONS = ("global", "proportional", "per_module")
# The one name -> dtype table: diff values, model loading (--dtype) and the benchmarks all use it.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VALUE_DTYPES = tuple(DTYPES)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


# ---------------------------------------------------------------- field values from YAML / JSON / flags


def to_float(name: str, value: Any) -> float:
    """``value`` as a finite float. PyYAML reads ``1e-3`` (no dot) as a string, so numeric strings count."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return number


def to_int(name: str, value: Any) -> int:
    """``value`` as an int: an int, or a float / numeric string with no fractional part (``8.0``, ``1e3``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    number = to_float(name, value)
    if not number.is_integer():
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def positive_count(name: str, value: Any) -> int:
    """``value`` as a whole number of at least 1 (a batch size, a limit), or a ConfigError naming ``name``."""
    number = to_int(name, value)
    if number < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
    return number


def finite_number(value: Any) -> bool:
    """An int or float that is finite: YAML's ``true``, ``.nan`` and ``.inf`` are not learning rates or budgets."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int_or_none(value: Any) -> bool:
    """Absent, or a whole number of at least 1 given as an int (a YAML field checked as written, not converted)."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def convert_fields(obj: Any) -> None:
    """Store every numeric / boolean / string field of dataclass ``obj`` as its declared type (``int``,
    ``float``, ``bool``, ``str``, each possibly ``| None``), or raise a ConfigError naming the field.
    A path (``os.PathLike``) given for a string field is stored as its string."""
    for f in dataclasses.fields(obj):
        kinds = {part.strip() for part in str(f.type).split("|")}
        value = getattr(obj, f.name)
        if value is None and "None" in kinds:
            continue
        if "float" in kinds:
            setattr(obj, f.name, to_float(f.name, value))
        elif "int" in kinds:
            setattr(obj, f.name, to_int(f.name, value))
        elif "bool" in kinds and not isinstance(value, bool):
            raise ConfigError(f"{f.name} must be true or false, got {value!r}")
        elif "str" in kinds:
            setattr(obj, f.name, to_str(f.name, value))


def to_str(name: str, value: Any) -> str:
    """``value`` as a string: a string or a path; anything else (a number, a list) is refused, not stringified."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
    return value


def check_allocation(allocation: Any) -> None:
    """``allocation`` is one of ``ALLOCATIONS``; a ConfigError otherwise."""
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")


def check_budget_request(allocation: Any, num_params: int | None) -> None:
    """A selection asked for with ``allocation`` can keep ``num_params``: per_module fixes each module's
    density, so it cannot hit an exact total. Checked where a budget is requested (train config, bench
    rows, the budget itself), not in SparseConfig: a stored diff's config records its exact entry count
    whatever allocation chose the entries."""
    check_allocation(allocation)
    if allocation == "per_module" and num_params is not None:
        raise ConfigError("allocation='per_module' gives every module the same density and cannot hit an exact "
                          "num_params; use density=..., or allocation='proportional' / 'global' with num_params")


@dataclass
class SparseConfig:
    """What to train and how to store it.

    Example:
        >>> cfg = SparseConfig(density=0.01, target_modules=["q_proj", "v_proj"], scorer="random", seed=0)
        >>> cfg.density
        0.01

    Fields:
        density: share of the targeted weight entries to train (0 < density <= 1). Ignored when
            ``num_params`` is set.
        num_params: exact total number of entries to train, instead of a density (in a saved diff:
            the entries it holds).
        target_modules: names of ``nn.Linear`` modules to adapt; an entry matches a module whose
            qualified name equals it or ends with ``.<entry>``.
        scorer: how entries are chosen (see ``sparseft.selection``): random, magnitude, gradient,
            fisher, taylor, combined.
        allocation: how the budget is split over modules: ``global`` (one top-k over all),
            ``proportional`` (k per module proportional to its size) or ``per_module`` (same
            density in each; equals proportional up to rounding).
        calibration_batches: batches used by data-driven scorers.
        scorer_weights: weights of the parts of the ``combined`` score.
        value_dtype: dtype of the values in the saved diff file (training keeps fp32 values).
        seed: seeds random selection and anything else random in selection.
    """

    density: float | None = 0.01
    num_params: int | None = None
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    scorer: str = "random"
    allocation: str = "proportional"
    calibration_batches: int = 8
    scorer_weights: dict[str, float] = field(default_factory=lambda: {"gradient": 0.5, "fisher": 0.5})
    value_dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self) -> None:
        convert_fields(self)
        if isinstance(self.scorer_weights, dict):
            self.scorer_weights = {k: to_float(f"scorer_weights.{k}", v) for k, v in self.scorer_weights.items()}
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (what torch.manual_seed takes), "
                              f"got {self.seed}")
        if self.num_params is None:
            if self.density is None or not (0.0 < self.density <= 1.0):
                raise ConfigError(f"density must be in (0, 1], got {self.density!r}")
        elif self.num_params <= 0:
            raise ConfigError(f"num_params must be a positive integer, got {self.num_params!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not isinstance(self.target_modules, list) or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"target_modules must be a list of module names, got {self.target_modules!r}")
        if not self.target_modules:
            raise ConfigError("target_modules must name at least one module")
        if not isinstance(self.scorer_weights, dict):
            raise ConfigError(f"scorer_weights must map score names to weights, got {self.scorer_weights!r}")
        check_allocation(self.allocation)
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigError(f"value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}")
        if self.calibration_batches < 1:
            raise ConfigError(f"calibration_batches must be >= 1, got {self.calibration_batches!r}")
        if self.scorer == "combined":
            # Here, not at selection: a bad part is reported before a model is loaded or data is read.
            from .selection.scorers import combined_parts

            combined_parts(self.scorer_weights)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown SparseConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SparseConfig":
        from .files import read_yaml_file

        data = read_yaml_file(path, ConfigError)[0] or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of SparseConfig fields, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
