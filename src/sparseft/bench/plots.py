"""The benchmark's pictures (PNG, matplotlib's Agg backend, so no display is needed).

- ``metric_vs_params.png``: task metric against trainable parameters (log x), one marker per method;
- ``cost_bars.png``: median step time and peak memory, one bar per row;
- ``storage_tenants.png``: bytes on disk for N tenants: one base + N diffs, one base + N LoRA
  adapters, N full copies;
- ``validation_curves.png`` (rows with ``validation_every`` only): the validation metric against the
  step, one line per row (in a protocol's test stage, per chosen row), its best point marked.

Every point is a row of results.json (labelled by its id), so a picture can be traced to its numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .results import ok_rows, row_label, row_trains  # noqa: E402

# The comparison's usual methods; another registered method gets matplotlib's next colour.
METHOD_STYLE = {
    "full": dict(color="#444444", marker="s"),
    "lora": dict(color="#1f77b4", marker="^"),
    "sparse": dict(color="#d62728", marker="o"),
}
TENANTS = [1, 10, 100, 1000, 10000]
LINESTYLES = ["-", "--", ":", "-."]
CURVES_PNG = "validation_curves.png"


def training_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in ok_rows(results) if row_trains(r)]


def primary_metric(results: dict[str, Any]) -> str:
    return results.get("task", {}).get("primary_metric") or "metric"


def plot_metric_vs_params(results: dict[str, Any], path: Path) -> Path:
    metric = primary_metric(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in training_rows(results):
        by_method.setdefault(r["method"], []).append(r)
    for method, rows in by_method.items():
        ax.scatter([r["trainable_params"] for r in rows], [r["metrics"][metric] for r in rows], s=60,
                   label=method, **METHOD_STYLE.get(method, {}))
    base = next((r for r in ok_rows(results) if not row_trains(r)), None)
    if base:
        ax.axhline(base["metrics"][metric], color="gray", linestyle="--", linewidth=1, label=f"base ({base['id']})")
    ax.set_xscale("log")
    label_points(ax, training_rows(results), metric)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(metric)
    ax.set_title(f"{results.get('task', {}).get('name')}: {metric} vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def label_points(ax, rows: list[dict[str, Any]], metric: str) -> None:
    """Label every point with its row id and value. Rows at (nearly) the same budget sit on top of each
    other, so their labels are stacked in metric order beside the column, each with a thin leader line."""
    if not rows:
        return
    low, high = ax.get_ylim()
    step = 0.055 * (high - low)  # one label line, in data units
    right_edge = max(r["trainable_params"] for r in rows)
    columns: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        columns.setdefault(round(10 * math.log10(max(r["trainable_params"], 1))), []).append(r)
    for column in columns.values():
        column.sort(key=lambda r: -r["metrics"][metric])
        top = column[0]["metrics"][metric]
        for i, r in enumerate(column):
            x, y = r["trainable_params"], r["metrics"][metric]
            leftwards = x == right_edge and len(columns) > 1
            ax.annotate(f"{r['id']} ({y:.3f})", xy=(x, y), xytext=(x / 1.8 if leftwards else x * 1.8, top - i * step),
                        textcoords="data", fontsize=8, va="center", ha="right" if leftwards else "left",
                        arrowprops=dict(arrowstyle="-", color="gray", lw=0.5))


def plot_cost_bars(results: dict[str, Any], path: Path) -> Path:
    rows = training_rows(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    labels = [r["id"] for r in rows]
    colors = [METHOD_STYLE[r["method"]]["color"] for r in rows]
    left.bar(labels, [r["median_step_s"] for r in rows], color=colors)
    left.set_ylabel("median step time (s)")
    left.set_title("time per optimizer step")
    kind = "peak GPU memory allocated" if any(r.get("peak_memory_kind", "").startswith("cuda") for r in rows) else "peak RSS"
    right.bar(labels, [r["peak_memory_bytes"] / 1e9 for r in rows], color=colors)
    right.set_ylabel(f"{kind} (GB)")
    right.set_title("peak memory while training")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return save(fig, path)


# What N tenants store, by the kind of artifact a row saved: a checkpoint is a whole model per tenant,
# anything else (a diff, an adapter) sits beside one shared base.
ARTIFACT_WORDS = {"diff": "diffs", "adapter": "LoRA adapters"}


def storage_series(results: dict[str, Any]) -> dict[str, tuple[str, list[float]]]:
    """``{label: (row id, bytes for each N in TENANTS)}``: what N tenants cost on disk per kind of artifact."""
    rows = training_rows(results)
    base_bytes = base_model_bytes(results)
    series: dict[str, tuple[str, list[float]]] = {}
    for kind in dict.fromkeys(r["artifact_kind"] for r in rows if r["artifact_kind"] != "checkpoint"):
        row = next(r for r in rows if r["artifact_kind"] == kind)
        label = f"base + N {ARTIFACT_WORDS.get(kind, kind + 's')} ({row['id']})"
        series[label] = (row["id"], [base_bytes + n * row["artifact_bytes"] for n in TENANTS])
    full = full_copy_row(results)
    if full:
        series[f"N full copies ({full['id']})"] = (full["id"], [n * full["artifact_bytes"] for n in TENANTS])
    return series


def full_copy_row(results: dict[str, Any]) -> dict[str, Any] | None:
    """The first row whose artifact is a whole model (a full fine-tuning checkpoint)."""
    return next((r for r in training_rows(results) if r["artifact_kind"] == "checkpoint"), None)


def base_model_bytes(results: dict[str, Any]) -> float:
    """Bytes of the one shared base: the full checkpoint's size when measured, else 4 bytes/parameter."""
    full = full_copy_row(results)
    if full:
        return float(full["artifact_bytes"])
    return 4.0 * float(results.get("model", {}).get("total_params") or 0)


def plot_storage(results: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = {r["id"]: r["method"] for r in training_rows(results)}
    for label, (row_id, values) in storage_series(results).items():
        ax.plot(TENANTS, [v / 1e9 for v in values], label=label, **METHOD_STYLE.get(methods[row_id], {}))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tenants / tasks (N)")
    ax.set_ylabel("storage on disk (GB)")
    ax.set_title("storage for N fine-tuned variants of one base model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def curve_series(results: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``[(row id, method, curve)]``: every ok row's validation curve, or in a test stage the chosen rows'."""
    protocol = results.get("protocol") or {}
    if protocol.get("stage") == "test":
        picks = protocol.get("chosen_on_validation") or {}
        return [(pick["row"], method, pick["validation_curve"]) for method, pick in picks.items()
                if pick.get("validation_curve")]
    return [(r["id"], r["method"], r["validation_curve"]) for r in ok_rows(results) if r.get("validation_curve")]


def plot_validation_curves(results: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric, seen = None, {}
    for row_id, method, curve in curve_series(results):
        metric = next(k for k in curve[0] if k != "step")
        steps, values = [p["step"] for p in curve], [p[metric] for p in curve]
        style = METHOD_STYLE.get(method, {})
        seen[method] = seen.get(method, -1) + 1  # rows of one method share its colour: tell them apart by line
        ax.plot(steps, values, label=row_id, color=style.get("color"), marker=style.get("marker"), markersize=4,
                linestyle=LINESTYLES[seen[method] % len(LINESTYLES)], alpha=0.8)
        best = max(range(len(values)), key=values.__getitem__)  # the earliest best, as curve_best_step
        ax.scatter([steps[best]], [values[best]], s=90, facecolors="none", edgecolors=style.get("color", "black"))
    ax.set_xlabel("training step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("validation curves (ringed: each row's best point)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], out: str | Path) -> list[Path]:
    """The plots into ``out/plots/``; a plot without data to show is skipped."""
    folder = Path(out) / "plots"
    written = []
    if training_rows(results):
        written.append(plot_metric_vs_params(results, folder / "metric_vs_params.png"))
        written.append(plot_cost_bars(results, folder / "cost_bars.png"))
    if storage_series(results):
        written.append(plot_storage(results, folder / "storage_tenants.png"))
    if curve_series(results):
        written.append(plot_validation_curves(results, folder / CURVES_PNG))
    return written


__all__ = ["write_plots", "storage_series", "base_model_bytes", "row_label", "TENANTS"]
