"""Looking inside a diff: what it changes, where, by how much, and what it cost on disk.

Besides per-module counts and value statistics, the report groups entries by layer and by module
type (q_proj, ..., down_proj) and family (attention vs MLP), and flags outlier values: entries whose
|Δ| lies beyond median(|Δ|) + 10·MAD(|Δ|) over the whole diff. A handful of huge edits in an
otherwise quiet diff is what a targeted manipulation (or a training blow-up) looks like.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import torch

from ..config import LLAMA_PROJECTIONS
from ..diffio import CONFIG_NAME, DELTA_NAME, SparseDiff, read_diff

OUTLIER_MADS = 10.0
TOP_OUTLIERS = 10
ATTENTION_PARTS = {"self_attn", "attn", "attention", "cross_attn"}
MLP_PARTS = {"mlp", "feed_forward", "ffn"}
ATTENTION_TYPES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn"}
MLP_TYPES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "c_proj"}
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


# ---------------------------------------------------------------- naming


def module_type(name: str) -> str:
    """The module's own name: ``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def module_family(name: str) -> str:
    """``attention``, ``mlp`` or ``other``, from the parent block's name or else the module's own."""
    parts = set(name.split("."))
    if parts & ATTENTION_PARTS:
        return "attention"
    if parts & MLP_PARTS:
        return "mlp"
    kind = module_type(name)
    return "attention" if kind in ATTENTION_TYPES else "mlp" if kind in MLP_TYPES else "other"


def layer_index(name: str) -> int | None:
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- statistics


def value_stats(values: torch.Tensor) -> dict[str, float]:
    v = values.float()
    if v.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0, "std": 0.0}
    return {"mean_abs": float(v.abs().mean()), "max_abs": float(v.abs().max()), "std": float(v.std(correction=0))}


def outlier_threshold(abs_values: torch.Tensor, mads: float = OUTLIER_MADS) -> float:
    """median + ``mads`` · MAD of |Δ| (robust: a few huge values cannot hide themselves by inflating it)."""
    if abs_values.numel() == 0:
        return math.inf
    median = abs_values.median()
    mad = (abs_values - median).abs().median()
    return float(median + mads * mad)


def top_outliers(diff: SparseDiff, threshold: float, limit: int = TOP_OUTLIERS) -> list[dict[str, Any]]:
    """The largest |Δ| beyond ``threshold``, each with its module, flat index and (row, col)."""
    found = []
    for name, values in diff.values.items():
        v = values.float()
        beyond = (v.abs() > threshold).nonzero().flatten()
        for pos in beyond[v[beyond].abs().argsort(descending=True)[:limit]].tolist():
            flat = int(diff.masks[name][pos])
            cols = diff.shapes[name][-1]
            found.append({"module": name, "index": flat, "row": flat // cols, "col": flat % cols, "value": float(v[pos])})
    return sorted(found, key=lambda o: -abs(o["value"]))[:limit]


def module_report(diff: SparseDiff, name: str, threshold: float) -> dict[str, Any]:
    k = int(diff.masks[name].numel())
    numel = math.prod(diff.shapes[name])
    values = diff.values[name].float()
    return {
        "shape": list(diff.shapes[name]),
        "layer": layer_index(name),
        "type": module_type(name),
        "family": module_family(name),
        "k": k,
        "numel": numel,
        "density": k / numel,
        **value_stats(values),
        "sum_abs": float(values.abs().sum()),
        "outliers": int((values.abs() > threshold).sum()),
    }


def group_report(modules: dict[str, dict[str, Any]], key: str, total_k: int) -> dict[str, dict[str, Any]]:
    """Counts and value statistics of the modules grouped by ``key`` (layer, type or family)."""
    groups: dict[str, dict[str, Any]] = {}
    for m in modules.values():
        g = groups.setdefault(str(m[key]), {"k": 0, "numel": 0, "sum_abs": 0.0, "max_abs": 0.0, "outliers": 0})
        g["k"] += m["k"]
        g["numel"] += m["numel"]
        g["sum_abs"] += m["sum_abs"]
        g["max_abs"] = max(g["max_abs"], m["max_abs"])
        g["outliers"] += m["outliers"]
    for g in groups.values():
        g["density"] = g["k"] / g["numel"] if g["numel"] else 0.0
        g["share"] = g["k"] / total_k if total_k else 0.0
        g["mean_abs"] = g["sum_abs"] / g["k"] if g["k"] else 0.0
    return dict(sorted(groups.items(), key=lambda kv: sort_key(kv[0])))


def sort_key(label: str) -> tuple[int, int, str]:
    """Layers by number, then the usual projection order (q, k, v, o, gate, up, down), then by name."""
    if label.isdigit():
        return (0, int(label), "")
    if label in LLAMA_PROJECTIONS:
        return (1, LLAMA_PROJECTIONS.index(label), "")
    return (2, 0, label)


def inspect_diff(path: str | os.PathLike) -> dict[str, Any]:
    """Statistics of a diff directory as a JSON-ready dict (validates the diff on the way).

    Example:
        >>> report = inspect_diff("my-diff")  # doctest: +SKIP
        >>> report["families"]["attention"]["share"]  # doctest: +SKIP
        0.31
    """
    path = Path(path)
    diff = read_diff(path)
    all_values = torch.cat([v.float() for v in diff.values.values()]) if diff.values else torch.zeros(0)
    all_abs = all_values.abs()
    threshold = outlier_threshold(all_abs)
    modules = {name: module_report(diff, name, threshold) for name in sorted(diff.masks)}
    targeted = sum(m["numel"] for m in modules.values())
    delta_bytes = (path / DELTA_NAME).stat().st_size
    total_bytes = delta_bytes + (path / CONFIG_NAME).stat().st_size
    entries = max(diff.num_entries, 1)
    return {
        "path": str(path),
        "base_model": diff.base_model,
        "base_fingerprint": diff.base_fingerprint,
        "value_dtype": diff.config.value_dtype,
        "num_entries": diff.num_entries,
        "targeted_entries": targeted,
        "density": diff.num_entries / targeted if targeted else 0.0,
        "delta_file_bytes": delta_bytes,
        "total_bytes": total_bytes,
        "bytes_per_entry": delta_bytes / entries,
        "selection": diff.config.to_dict(),
        "provenance": diff.provenance,
        "file_hashes": diff.file_hashes,
        "values": value_stats(all_values),
        "outliers": {
            "rule": f"|Δ| > median(|Δ|) + {OUTLIER_MADS:g}·MAD(|Δ|)",
            "threshold": threshold if math.isfinite(threshold) else None,
            "count": int((all_abs > threshold).sum()),
            "top": top_outliers(diff, threshold),
        },
        "families": group_report(modules, "family", diff.num_entries),
        "types": group_report(modules, "type", diff.num_entries),
        "layers": group_report(modules, "layer", diff.num_entries),
        "modules": modules,
    }


# ---------------------------------------------------------------- text


def format_group(title: str, groups: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["", f"{title:<16} {'k':>10} {'share':>8} {'density':>9} {'mean|Δ|':>10} {'max|Δ|':>10} {'outliers':>9}"]
    for label, g in groups.items():
        lines.append(
            f"{label:<16} {g['k']:>10,} {g['share']:>8.2%} {g['density']:>9.4%} {g['mean_abs']:>10.3g} "
            f"{g['max_abs']:>10.3g} {g['outliers']:>9,}"
        )
    return lines


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``(dotted.key, leaf)`` pairs."""
    if isinstance(data, dict) and data:
        return [pair for k, v in data.items() for pair in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, data)]


def format_provenance(provenance: dict[str, Any], width: int = 100) -> list[str]:
    """One line per top-level entry; a nested one (a training config, versions) as wrapped ``key=value`` pairs."""
    lines = []
    for key, value in provenance.items():
        if isinstance(value, dict) and value:
            pairs = " ".join(f"{k}={v}".replace(" ", "") for k, v in flatten(value))
            wrapped = textwrap.wrap(pairs, width - 4, break_long_words=False, break_on_hyphens=False)
            lines += [f"  {key}:"] + [f"    {line}" for line in wrapped]
        else:
            lines.append(f"  {key}: {value}")
    return lines


def format_inspection(report: dict[str, Any]) -> str:
    """A human-readable table of ``inspect_diff``'s report."""
    out = report["outliers"]
    lines = [
        f"diff            {report['path']}",
        f"base model      {report['base_model'] or '(unnamed)'}",
        *(f"fingerprint     {dt}: {fp}" for dt, fp in report["base_fingerprint"].items()),
        f"entries         {report['num_entries']:,} of {report['targeted_entries']:,} targeted "
        f"({report['density']:.4%})",
        f"selection       scorer={report['selection']['scorer']} allocation={report['selection']['allocation']} "
        f"seed={report['selection']['seed']}",
        f"size on disk    {report['total_bytes']:,} bytes; {report['bytes_per_entry']:.2f} bytes/entry "
        f"({report['value_dtype']} values)",
        f"values          mean|Δ|={report['values'].get('mean_abs', 0):.3g} max|Δ|={report['values'].get('max_abs', 0):.3g}",
        f"outliers        {out['count']:,} entries with {out['rule']}"
        + (f" = {out['threshold']:.3g}" if out["threshold"] is not None else ""),
    ]
    lines += [f"  {o['module']}[{o['row']}, {o['col']}] = {o['value']:+.4g}" for o in out["top"]]
    lines += format_group("family", report["families"])
    lines += format_group("type", report["types"])
    lines += format_group("layer", report["layers"])
    lines += ["", f"{'module':<48} {'shape':>12} {'k':>9} {'density':>9} {'mean|Δ|':>10} {'max|Δ|':>10} {'outliers':>9}"]
    for name, m in report["modules"].items():
        shape = "x".join(str(d) for d in m["shape"])
        lines.append(
            f"{name:<48} {shape:>12} {m['k']:>9,} {m['density']:>9.4%} {m['mean_abs']:>10.3g} {m['max_abs']:>10.3g} "
            f"{m['outliers']:>9,}"
        )
    if report["provenance"]:
        lines += ["", "provenance"] + format_provenance(report["provenance"])
    return "\n".join(lines)
