"""A PNG heat map of where a diff's changes sit: layers down, module types across."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..atomic import file_in_the_way, given_path
from ..errors import ConfigError
from .inspection import sort_key

PANELS = (("density", "density (entries trained / entries)"), ("mean_abs", "mean |Δ| of trained entries"))
# What matplotlib writes by itself; other extensions go to PIL, which refuses most (e.g. .txt) only at the end.
PLOT_FORMATS = ("png", "pdf", "svg")


def check_plot_path(out: str | os.PathLike) -> Path:
    """``out`` as a Path a heat map can be written to: a supported extension, not a folder, and no file in
    the place of one of its parent folders. Checked before anything is computed or written."""
    formats = ", ".join(f".{f}" for f in PLOT_FORMATS)
    out = given_path(out, "the heat map path", what=f"a file name ending {formats}")  # "" was read as "."
    if out.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        got = f"'{out.suffix}'" if out.suffix else "no extension"
        raise ConfigError(f"{out}: a heat map is written as {formats}; got {got}")
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give the heat map's file name ({formats})")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ConfigError(f"{out}: cannot write there, {blocker} is a file, not a folder")
    return out


def heat_grid(report: dict[str, Any], field: str) -> tuple[list[str], list[str], list[list[float]]]:
    """(layer labels, type labels, rows of ``field`` per layer × type) from ``inspect_diff``'s modules.

    Cells hold the k-weighted ``field`` over every module of that layer and type (one module for
    Llama); a layer × type without modules in the diff is NaN (drawn blank).
    """
    cells: dict[tuple[str, str], list[float]] = {}
    types: list[str] = []
    for m in report["modules"].values():
        layer = "-" if m["layer"] is None else str(m["layer"])
        if m["type"] not in types:
            types.append(m["type"])
        acc = cells.setdefault((layer, m["type"]), [0.0, 0.0, 0.0])  # sum_abs, k, numel
        acc[0] += m["sum_abs"]
        acc[1] += m["k"]
        acc[2] += m["numel"]
    layers = sorted({layer for layer, _ in cells}, key=sort_key)
    types.sort(key=sort_key)

    def value(layer: str, kind: str) -> float:
        if (layer, kind) not in cells:
            return float("nan")
        sum_abs, k, numel = cells[(layer, kind)]
        return k / numel if field == "density" else (sum_abs / k if k else 0.0)

    return layers, types, [[value(layer, kind) for kind in types] for layer in layers]


def plot_heatmap(report: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write the heat map of ``inspect_diff``'s report to ``out`` (PNG, or PDF / SVG by its extension)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe on CI machines
    import matplotlib.pyplot as plt
    import numpy as np

    out = check_plot_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.5 * len(PANELS), 2.6 + 0.3 * len(report["layers"])))
    for ax, (field, title) in zip(axes, PANELS):
        layers, types, grid = heat_grid(report, field)
        cells = np.ma.masked_invalid(np.array(grid, dtype=float))
        # From 0: a colour scale stretched over 1.0000%..1.0001% would paint rounding as structure.
        image = ax.imshow(cells, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(cells.max()), 1e-12))
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("module type")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(image, ax=ax).formatter.set_useOffset(False)
    fig.suptitle(f"{Path(report['path']).name}: {report['num_entries']:,} entries ({report['density']:.3%})")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
