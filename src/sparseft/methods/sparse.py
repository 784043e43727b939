"""sparse: train k chosen entries of the targeted weights; the artifact is a sparseft diff."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SparseConfig, check_budget_request, finite_number, positive_int_or_none
from ..diffio import CONFIG_NAME
from ..errors import ConfigError
from .registry import Method, Prepared


# A bench row's re-selection knobs: TrainConfig's fields of the same names (sparseft.training.reselect).
RESELECT_KNOBS = ("reselect_every", "reselect_fraction", "reselect_growth_batches")
# The ``extra`` fact of a run that selected its entries: seconds spent in ``select_masks``.
SELECTION_WALL = "selection_wall_s"


class SparseMethod(Method):
    name = "sparse"
    artifact_kind = "diff"
    help = "train k chosen weight entries, save a diff"
    run_knobs = ("scorer", "density", "num_params", "calibration_batches", "allocation", *RESELECT_KNOBS)
    not_applicable = frozenset({"lora_rank"})
    takes_masks = True
    reselects = True
    shards_base = True
    quantizes_base = True
    artifact_description = f"a sparse diff ({CONFIG_NAME})"

    def prepare(self, cfg, model: nn.Module, examples, pad_id: int, ckpt) -> Prepared:
        from ..model import get_sparse_model

        sparse_cfg = cfg.sparse_config()
        if cfg.masks:
            given, chosen_with = load_mask_file(cfg.masks)
            # The diff records how its entries were chosen (the mask file's scorer, allocation, seed, targets)
            # and the budget actually trained, not this run's selection flags, which chose nothing.
            sparse_cfg = dataclasses.replace(chosen_with, value_dtype=sparse_cfg.value_dtype,
                                             num_params=sum(int(m.numel()) for m in given.values()))
        facts: dict[str, Any] = {}
        if ckpt is not None and ckpt.masks:
            masks = ckpt.masks  # the entries trained when it was written (re-selection may have moved them)
        elif cfg.masks:
            masks = given
        else:
            started = time.perf_counter()
            masks = select_masks(model, sparse_cfg, examples, pad_id, cfg.batch_size)
            # What choosing the entries cost (calibration passes, scoring, allocation): part of the run's wall.
            facts[SELECTION_WALL] = time.perf_counter() - started
        return get_sparse_model(model, sparse_cfg, masks), masks, facts

    def save(self, model: nn.Module, tokenizer, path: Path, provenance: dict[str, Any]) -> None:
        model.save_pretrained(path, provenance=provenance)

    def base_parameters(self, model: nn.Module) -> int:
        return model.num_base_parameters()

    def detect(self, path: Path) -> bool:
        return (path / CONFIG_NAME).is_file()

    def attach(self, model: nn.Module, path, allow_unverified_base: bool = False) -> nn.Module:
        from ..model import SparseModel

        return SparseModel.from_pretrained(model, path, allow_unverified_base=allow_unverified_base)

    def check_run(self, run, at: str) -> None:
        from ..selection import SCORERS

        if not run.scorer:
            raise ConfigError(f"{at} ({run.id}): a sparse row needs a scorer (e.g. random, fisher, combined)")
        if not isinstance(run.scorer, str) or run.scorer not in SCORERS:
            raise ConfigError(f"{at} ({run.id}): unknown scorer {run.scorer!r}; available: {sorted(SCORERS)}")
        if run.density is not None and not (finite_number(run.density) and 0 < run.density <= 1):
            raise ConfigError(f"{at} ({run.id}): density must be in (0, 1], got {run.density!r}")
        if not positive_int_or_none(run.num_params):
            raise ConfigError(f"{at} ({run.id}): num_params must be a positive integer, got {run.num_params!r}")
        if not positive_int_or_none(run.calibration_batches):
            raise ConfigError(f"{at} ({run.id}): calibration_batches must be a positive integer, "
                              f"got {run.calibration_batches!r}")
        if run.allocation is not None:
            try:  # the budget's own rule, before any row runs
                check_budget_request(run.allocation, run.num_params)
            except ConfigError as e:
                raise ConfigError(f"{at} ({run.id}): {e}") from None
        check_reselect_knobs(run, at)

    def complete_run(self, run: dict[str, Any], grid_density: float) -> dict[str, Any]:
        if run.get("density") is None and run.get("num_params") is None:
            return {**run, "density": grid_density}  # a row without its own budget takes the grid's density
        return run

    def train_fields(self, run: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        fields = dict(scorer=run["scorer"], density=run.get("density"), num_params=run.get("num_params"))
        if run.get("calibration_batches"):
            fields["calibration_batches"] = int(run["calibration_batches"])
        if run.get("allocation"):
            fields["allocation"] = run["allocation"]
        fields.update({knob: run[knob] for knob in RESELECT_KNOBS if run.get(knob) is not None})
        return fields

    def row_facts(self, result, cfg) -> dict[str, Any]:
        from ..audit import inspect_diff

        # Share of the targeted entries the diff trains (what the budget became after rounding).
        facts: dict[str, Any] = {"density": float(inspect_diff(result.out)["density"]),
                                 "allocation": cfg.selection.allocation}
        if cfg.reselecting:
            facts.update({knob: getattr(cfg, knob) for knob in RESELECT_KNOBS})
        return facts

    def label(self, row: dict[str, Any]) -> str:
        label = f"sparse/{row.get('scorer')}"
        if row.get("allocation") not in (None, SparseConfig.allocation):  # None: a row from before the field
            label += f" {row['allocation']}"
        if row.get("reselect_every"):
            label += f" reselect/{row['reselect_every']}"
            if row.get("reselect_growth_batches", 1) != 1:
                label += f" growth×{row['reselect_growth_batches']}"
        return label


def check_reselect_knobs(run, at: str) -> None:
    """A row's re-selection knobs: their types here, their ranges as TrainConfig checks them."""
    from ..training.config import TrainConfig, check_reselect_ranges

    for knob, kind, what in (("reselect_every", int, "a whole number"), ("reselect_fraction", (int, float), "a number"),
                             ("reselect_growth_batches", int, "a whole number")):
        value = getattr(run, knob)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ConfigError(f"{at} ({run.id}): {knob} must be {what}, got {value!r}")
    unset = {knob: getattr(TrainConfig, knob) for knob in RESELECT_KNOBS}  # TrainConfig's defaults
    given = {knob: getattr(run, knob) for knob in RESELECT_KNOBS if getattr(run, knob) is not None}
    values = {**unset, **given}
    try:
        check_reselect_ranges(values["reselect_every"], float(values["reselect_fraction"]), values["reselect_growth_batches"])
    except ConfigError as e:
        raise ConfigError(f"{at} ({run.id}): {e}") from None


def select_masks(model: nn.Module, sparse_cfg: SparseConfig, examples, pad_id: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Masks from the configured scorer; data scorers see the first batches of the training stream
    (the same on every process, so all ranks choose the same entries)."""
    from ..selection import select
    from ..selection.scorers import get_scorer
    from ..training.data import calibration_batches

    if not get_scorer(sparse_cfg.scorer).needs_data_for(sparse_cfg.scorer_weights):
        return select(model, sparse_cfg)
    batches = calibration_batches(examples, batch_size, pad_id, sparse_cfg.seed, sparse_cfg.calibration_batches)
    return select(model, sparse_cfg, batches)


def load_mask_file(path: str) -> tuple[dict[str, torch.Tensor], SparseConfig]:
    """Masks and the selection config that chose them, from a diff directory (train the entries
    another run chose) or a mask file written by ``sparseft select``."""
    from ..diffio import read_diff
    from ..selection import read_mask_file

    if (Path(path) / CONFIG_NAME).is_file():
        diff = read_diff(path)
        return diff.masks, diff.config
    mask_file = read_mask_file(path)
    return mask_file.masks, mask_file.config
