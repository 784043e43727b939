"""Reproducibility: re-run a diff's training from the config and seed it records, compare the result.

``sparseft train`` records the effective training config (minus where it was written) and the data
file's sha256 in the diff's provenance, and the same seed gives the same bytes. So re-running that
config on CPU must give a tensor file with the sha256 recorded at save time; when it does not, the
modules are compared one by one (same entries? same values? largest difference) to say where.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..diffio import CONFIG_NAME, DELTA_NAME, SHA256_HEX, file_sha256, read_config, read_diff
from ..errors import ConfigError, NotReproducibleError
from ..files import read_yaml_file
from ..training import TrainConfig, run_training
from ..training.data import data_sha256
from ..training.job import TRAIN_CONFIG_NAME

# How a re-run differs from the recorded run by design: where it goes, and CPU without resuming.
RERUN_FIELDS = {"device": "cpu", "resume": None, "progress": False, "save_every": 0}


def recorded_train_config(diff_path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The training config the diff records, and where (for errors): provenance ``train_config``, else
    ``train_config.yaml`` beside it."""
    path = Path(diff_path)
    recorded = read_config(path).get("provenance", {}).get("train_config")
    if isinstance(recorded, dict) and recorded:
        return dict(recorded), f"{path / CONFIG_NAME}: provenance.train_config"
    yaml_path = path / TRAIN_CONFIG_NAME
    if yaml_path.is_file():
        data = read_yaml_file(yaml_path, NotReproducibleError)[0] or {}
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise NotReproducibleError(f"{yaml_path}: expected a mapping of TrainConfig fields, got {kind}")
        return data, str(yaml_path)
    raise NotReproducibleError(
        f"{path}: the diff records no training config (provenance 'train_config' or {TRAIN_CONFIG_NAME}); "
        "only diffs written by sparseft train can be re-run"
    )


def rerun_values(diff_path: str | os.PathLike, model: str | None = None, data: str | None = None) -> dict[str, Any]:
    """The fields of the re-run: the recorded config with ``RERUN_FIELDS`` and the given model / data. Checked
    as a TrainConfig here, before any of them is used: a hand-edited record (``data: 5``) gets an error naming
    where it is recorded, not a TypeError; and the data must be there."""
    recorded, source = recorded_train_config(diff_path)
    values = {**recorded, **RERUN_FIELDS}
    values["model"] = model or values.get("model", "")
    values["data"] = data or values.get("data", "")
    try:
        TrainConfig.from_dict(values)
    except ConfigError as e:
        raise NotReproducibleError(f"{source}: {e}") from e
    if not values["data"] or not Path(values["data"]).exists():
        raise NotReproducibleError(f"{diff_path}: the training data {values['data']!r} is not available here; pass it")
    masks = values.get("masks")
    if masks and not Path(masks).exists():  # else named as train's --masks, after the whole audit had run
        raise NotReproducibleError(f"{source}: the recorded masks {masks!r} are not available here")
    check_recorded_data_sha256(diff_path)
    return values


def check_recorded_data_sha256(diff_path: str | os.PathLike) -> None:
    """A recorded training-data sha256 that is no hex digest (hand-edited) is refused: as a mismatch it would
    report the data as changed."""
    recorded = read_config(Path(diff_path)).get("provenance", {}).get("data_sha256")
    if recorded is not None and not (isinstance(recorded, str) and SHA256_HEX.fullmatch(recorded)):
        raise NotReproducibleError(f"{Path(diff_path) / CONFIG_NAME}: provenance.data_sha256 must be a sha256 "
                                   f"(64 hex digits), got {recorded!r:.80}")


def compare_diffs(original: str | os.PathLike, rerun: str | os.PathLike) -> list[dict[str, Any]]:
    """Module by module: whether the entries and values match, and the largest value difference."""
    a, b = read_diff(original), read_diff(rerun)
    rows = []
    for name in sorted(set(a.masks) | set(b.masks)):
        if name not in a.masks or name not in b.masks:
            rows.append({"module": name, "status": "only in " + ("rerun" if name in b.masks else "original")})
            continue
        same_entries = torch.equal(a.masks[name], b.masks[name])
        row = {"module": name, "k": int(a.masks[name].numel()), "same_entries": same_entries}
        if same_entries:
            gap = (a.values[name].float() - b.values[name].float()).abs()
            row["values_differing"] = int((gap > 0).sum())
            row["max_abs_diff"] = float(gap.max()) if gap.numel() else 0.0
        else:
            row["shared_entries"] = int(torch.isin(a.masks[name], b.masks[name]).sum())
        row["status"] = "same" if same_entries and row["values_differing"] == 0 else "differs"
        rows.append(row)
    return rows


def reproduce(
    diff_path: str | os.PathLike,
    model: str | None = None,
    data: str | None = None,
    work_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Re-run the diff's training on CPU and report whether the tensor file's sha256 matches.

    ``model`` / ``data`` replace the recorded paths (e.g. the base as named on this machine); the
    data must still have the recorded sha256. The re-run's diff is written under ``work_dir``
    (a temporary directory when None, removed afterwards).

    Example:
        >>> result = reproduce("runs/a", model="smollm2-135m")  # doctest: +SKIP
        >>> result["reproduced"]  # doctest: +SKIP
        True
    """

    diff_path = Path(diff_path)
    meta = read_config(diff_path)
    values = rerun_values(diff_path, model, data)
    result: dict[str, Any] = {
        "config": values,
        "original_sha256": meta["file_hashes"].get(DELTA_NAME, ""),
        "recorded_data_sha256": meta.get("provenance", {}).get("data_sha256"),  # checked by rerun_values
        "data_sha256": data_sha256(values["data"]),
    }
    if result["recorded_data_sha256"] and result["recorded_data_sha256"] != result["data_sha256"]:
        return {**result, "reproduced": False, "reason": f"the data file {values['data']} changed since training"}
    with tempfile.TemporaryDirectory(prefix="sparseft-repro-") as tmp:
        out = Path(work_dir) if work_dir else Path(tmp) / "rerun"
        run_training(TrainConfig.from_dict({**values, "out": str(out)}))
        result["rerun_dir"] = str(out) if work_dir else None
        result["rerun_sha256"] = file_sha256(out / DELTA_NAME)
        result["reproduced"] = result["rerun_sha256"] == result["original_sha256"]
        result["modules"] = [] if result["reproduced"] else compare_diffs(diff_path, out)
    differing = [m["module"] for m in result["modules"] if m["status"] != "same"]
    result["reason"] = ""
    if not result["reproduced"]:
        more = "…" if len(differing) > 5 else ""
        result["reason"] = f"{len(differing)} module(s) differ: {', '.join(differing[:5])}{more}"
    return result


def format_repro(result: dict[str, Any]) -> list[str]:
    """Markdown lines for the audit report."""
    lines = ["", "## Reproducibility", ""]
    verdict = "reproduced: same tensor-file sha256" if result["reproduced"] else f"NOT reproduced: {result['reason']}"
    lines += [f"**{verdict}**", "", f"- recorded sha256 `{result['original_sha256']}`"]
    if result.get("rerun_sha256"):
        lines.append(f"- re-run sha256 `{result['rerun_sha256']}` (CPU, seed {result['config'].get('seed')})")
    lines.append(f"- data `{result['config'].get('data')}` sha256 `{result['data_sha256']}` "
                 f"(recorded `{result['recorded_data_sha256']}`)")
    differing = [m for m in result.get("modules", []) if m["status"] != "same"]
    if differing:
        lines += ["", "| module | status | same entries | values differing | max abs diff |", "| --- | --- | --- | --- | --- |"]
        for m in differing:
            lines.append(f"| {m['module']} | {m['status']} | {m.get('same_entries', '')} | "
                         f"{m.get('values_differing', '')} | {m.get('max_abs_diff', '')} |")
    return lines
