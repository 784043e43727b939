"""Looking inside a diff: what it changes, where, by how much, and what it cost on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .diffio import CONFIG_NAME, DELTA_NAME, read_diff


def value_stats(values: torch.Tensor) -> dict[str, float]:
    v = values.float()
    if v.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0, "std": 0.0}
    return {"mean_abs": float(v.abs().mean()), "max_abs": float(v.abs().max()), "std": float(v.std(correction=0))}


def inspect_diff(path: str | os.PathLike) -> dict[str, Any]:
    """Statistics of a diff directory as a JSON-ready dict (validates the diff on the way)."""
    path = Path(path)
    diff = read_diff(path)
    modules = {}
    for name, idx in diff.masks.items():
        numel = 1
        for d in diff.shapes[name]:
            numel *= d
        modules[name] = {
            "shape": list(diff.shapes[name]),
            "k": int(idx.numel()),
            "density": idx.numel() / numel,
            **value_stats(diff.values[name]),
        }
    targeted = sum(m["k"] / m["density"] for m in modules.values() if m["density"] > 0)
    delta_bytes = (path / DELTA_NAME).stat().st_size
    total_bytes = delta_bytes + (path / CONFIG_NAME).stat().st_size
    entries = max(diff.num_entries, 1)
    return {
        "path": str(path),
        "base_model": diff.base_model,
        "base_fingerprint": diff.base_fingerprint,
        "value_dtype": diff.config.value_dtype,
        "num_entries": diff.num_entries,
        "targeted_entries": int(round(targeted)),
        "density": diff.num_entries / targeted if targeted else 0.0,
        "delta_file_bytes": delta_bytes,
        "total_bytes": total_bytes,
        "bytes_per_entry": delta_bytes / entries,
        "selection": diff.config.to_dict(),
        "provenance": diff.provenance,
        "file_hashes": diff.file_hashes,
        "values": value_stats(torch.cat([v.float() for v in diff.values.values()])) if diff.values else {},
        "modules": modules,
    }


def format_inspection(report: dict[str, Any]) -> str:
    """A human-readable table of ``inspect_diff``'s report."""
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
        "",
        f"{'module':<48} {'shape':>12} {'k':>9} {'density':>9} {'mean|Δ|':>10} {'max|Δ|':>10}",
    ]
    for name, m in report["modules"].items():
        shape = "x".join(str(d) for d in m["shape"])
        lines.append(
            f"{name:<48} {shape:>12} {m['k']:>9,} {m['density']:>9.4%} {m['mean_abs']:>10.3g} {m['max_abs']:>10.3g}"
        )
    if report["provenance"]:
        lines += ["", "provenance"] + [f"  {k}: {v}" for k, v in report["provenance"].items()]
    return "\n".join(lines)
