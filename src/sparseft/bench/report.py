"""The cost report: a page for someone deciding whether sparse fine-tuning is worth it.

It answers four questions from one results.json: how much quality is kept compared with full
fine-tuning, how much training time and memory is saved, what each tenant costs on disk, and what N
tasks or tenants would cost. Every figure cites the row id(s) of results.json it comes from.
A protocol test stage (``protocol.summary``) is judged on its seed means, never on its luckiest seed.

The page is built once as a list of blocks and rendered to Markdown or HTML, so both say the same.

Example:
    >>> write_report("runs/bench/results.json", html_page=True)  # doctest: +SKIP
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import check_out_file
from ..errors import ConfigError
from .plots import CURVES_PNG, TENANTS, base_model_bytes, curve_series, write_plots
from .results import (fmt_bytes, fmt_count, fmt_selection, machines_listing, ok_rows, read_results, row_label,
                      row_machines, row_trains)

PLOT_CAPTIONS = {
    "metric_vs_params.png": "Task metric vs trainable parameters (log x)",
    "cost_bars.png": "Median step time and peak memory per row",
    "storage_tenants.png": "Storage for N tenants: N diffs vs N LoRA adapters vs N full copies",
    CURVES_PNG: "Validation metric vs training step (ringed: each row's best point)",
}


@dataclass
class Block:
    kind: str  # h1 | h2 | p | ul | table | img
    text: str = ""
    items: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def cite(*row_ids: str) -> str:
    return "[" + ", ".join(f"row `{r}`" for r in row_ids) + "]"


# ---------------------------------------------------------------- picking rows


@dataclass
class Picked:
    metric: str
    base: dict[str, Any] | None
    full: dict[str, Any] | None
    lora: list[dict[str, Any]]
    sparse: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    means: SeedMeans | None = None  # a protocol test stage: quality is judged on these, not on single rows

    def value(self, row: dict[str, Any]) -> float:
        return float(row["metrics"][self.metric])

    def best_sparse(self) -> dict[str, Any] | None:
        return max(self.sparse, key=self.value, default=None)

    def lora_match(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """The LoRA row whose trainable count is closest to ``row``'s; of several (a learning-rate sweep),
        the best-scoring one, so a sparse row is never compared with a weaker LoRA guess than necessary."""
        return min(self.lora, key=lambda r: (abs(r["trainable_params"] - row["trainable_params"]), -self.value(r)),
                   default=None)


def pick_rows(results: dict[str, Any]) -> Picked:
    rows = ok_rows(results)
    metric = results.get("task", {}).get("primary_metric") or next(
        (next(iter(r["metrics"])) for r in rows if r.get("metrics")), "metric"
    )
    by_method = lambda m: [r for r in rows if r["method"] == m]  # noqa: E731
    score = lambda r: float(r["metrics"][metric])  # noqa: E731
    return Picked(
        metric=metric,
        base=next((r for r in rows if not row_trains(r)), None),
        # With several full FT rows (a learning-rate sweep) the sparse rows are held to the best of them.
        full=max(by_method("full"), key=score, default=None),
        lora=by_method("lora"),
        sparse=by_method("sparse"),
        failed=[r for r in results["rows"] if r.get("status") != "ok"],
        means=seed_means(results),
    )


# ---------------------------------------------------------------- numbers in words


def points(x: float) -> str:
    """A metric in [0, 1] as percentage points."""
    return f"{100 * x:.1f}"


def delta_points(a: float, b: float) -> str:
    return f"{100 * (a - b):+.1f} points"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "–"


def gain_kept(p: Picked, row: dict[str, Any]) -> str:
    """Share of full FT's gain over the base that ``row`` keeps."""
    if not (p.base and p.full):
        return "–"
    full_gain = p.value(p.full) - p.value(p.base)
    if full_gain <= 0:
        return "– (full FT did not improve on the base)"
    return f"{100 * (p.value(row) - p.value(p.base)) / full_gain:.0f}%"


# ---------------------------------------------------------------- seed means of a protocol test stage


@dataclass
class MethodMean:
    """One method's test metric over seeds (``protocol.summary.methods``) and the row its costs are read from."""
    mean: float
    std: float
    rows: list[str]
    cost_row: dict[str, Any]

    def shown(self, metric: str = "") -> str:
        named = f" {metric}" if metric else ""
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}{named} (mean ± std, {len(self.rows)} seeds)"


@dataclass
class SeedMeans:
    """A protocol test stage's seed statistics, so quality figures compare means rather than the luckiest seed."""
    methods: dict[str, MethodMean]
    intervals: dict[str, dict[str, Any]]

    def difference(self, a: str, b: str) -> str:
        """``a``'s mean minus ``b``'s, in points, with the paired bootstrap interval where one was computed."""
        diff = f"{100 * (self.methods[a].mean - self.methods[b].mean):+.2f} points"
        ci = self.intervals.get(f"{a}-{b}")
        if not ci:
            return diff + " (no paired interval: rows kept no per-example scores)"
        return (diff + f", {100 * ci['confidence']:.0f}% paired bootstrap interval "
                f"[{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}]")


def cost_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed whose median step time is the median of the method's seeds (the lower one of an even count):
    one real row to read time, memory and bytes from, chosen without looking at the metric."""
    ordered = sorted(rows, key=lambda r: (r["median_step_s"], r.get("seed") or 0))
    return ordered[(len(ordered) - 1) // 2]


def seed_means(results: dict[str, Any]) -> SeedMeans | None:
    """The seed statistics of ``results["protocol"]["summary"]``; None for a file without one."""
    summary = (results.get("protocol") or {}).get("summary")
    if not summary:
        return None
    by_id = {r["id"]: r for r in ok_rows(results)}
    methods = {}
    for method, stats in summary["methods"].items():
        rows = [by_id[i] for i in stats.get("rows", []) if i in by_id]
        if rows:
            ids = [r["id"] for r in rows]
            methods[method] = MethodMean(float(stats["mean"]), float(stats["std"]), ids, cost_row(rows))
    return SeedMeans(methods, summary.get("paired_bootstrap") or {})


def mean_gain_kept(p: Picked, m: SeedMeans) -> str:
    """Share of full FT's mean gain over the base that sparse's mean keeps."""
    if not (p.base and "full" in m.methods):
        return "–"
    full_gain = m.methods["full"].mean - p.value(p.base)
    if full_gain <= 0:
        return "– (full FT did not improve on the base)"
    return f"{100 * (m.methods['sparse'].mean - p.value(p.base)) / full_gain:.0f}%"


def means_bottom_line(p: Picked, m: SeedMeans) -> list[str]:
    """The Bottom line's bullets from seed means; costs from each method's ``cost_row``."""
    sparse, lora, full = m.methods.get("sparse"), m.methods.get("lora"), m.methods.get("full")
    if not sparse:
        return []
    s = sparse.cost_row
    base_ids = [p.base["id"]] if p.base else []
    what = (f"Sparse fine-tuning, {row_label(s)} with {fmt_count(s['trainable_params'])} trained entries "
            f"({s['trainable_pct']:.2f}% of the model), scores {sparse.shown(p.metric)}")
    if full:
        items = [f"**Quality.** {what} vs {full.shown()} for full fine-tuning: {m.difference('sparse', 'full')}; it "
                 f"keeps {mean_gain_kept(p, m)} of full FT's mean gain over the base "
                 f"({points(p.value(p.base)) if p.base else '–'}) {cite(*sparse.rows, *full.rows, *base_ids)}."]
    elif p.base:
        items = [f"**Quality.** {what} vs {points(p.value(p.base))} for the base; no full fine-tuning row to compare "
                 f"with {cite(*sparse.rows, *base_ids)}."]
    else:
        items = []
    if lora:
        items.append(f"**Against LoRA at a similar budget.** {row_label(lora.cost_row)} trains "
                     f"{fmt_count(lora.cost_row['trainable_params'])} numbers and scores {lora.shown()}; sparse minus LoRA: "
                     f"{m.difference('sparse', 'lora')} {cite(*sparse.rows, *lora.rows)}.")
    items.append("**Costs below are single rows:** per method, the seed whose median step time is the median of "
                 "its seeds (picked without looking at the metric); every seed is in the Side by side table.")
    if full:
        f = full.cost_row
        items.append(
            f"**Training cost.** Median step {s['median_step_s']:.2f} s vs {f['median_step_s']:.2f} s for full FT "
            f"({ratio(s['median_step_s'], f['median_step_s'])}); peak memory {fmt_bytes(s['peak_memory_bytes'])} vs "
            f"{fmt_bytes(f['peak_memory_bytes'])} ({ratio(s['peak_memory_bytes'], f['peak_memory_bytes'])}); optimizer "
            f"state {fmt_bytes(s['optimizer_state_bytes'])} vs {fmt_bytes(f['optimizer_state_bytes'])} "
            f"{cite(s['id'], f['id'])}.")
    storage = [f"a diff is {fmt_bytes(s['artifact_bytes'])} {cite(s['id'])}"]
    if lora:
        storage.append(f"a LoRA adapter {fmt_bytes(lora.cost_row['artifact_bytes'])} {cite(lora.cost_row['id'])}")
    if full:
        storage.append(f"a full copy {fmt_bytes(full.cost_row['artifact_bytes'])} {cite(full.cost_row['id'])}")
    return items + ["**Storage per tenant.** " + ", ".join(storage) + "."]


def means_target_blocks(p: Picked, m: SeedMeans) -> list[Block]:
    """The targets checked on seed means (quality) and on each method's cost row (memory, bytes)."""
    sparse, lora, full = m.methods.get("sparse"), m.methods.get("lora"), m.methods.get("full")
    if not (sparse and lora):
        return []
    s, l = sparse.cost_row, lora.cost_row  # noqa: E741
    checks = [
        (sparse.mean >= lora.mean, f"{100 * sparse.mean:.2f} vs {100 * lora.mean:.2f}: {m.difference('sparse', 'lora')}"),
        (full is not None and sparse.mean >= full.mean - 0.01,
         m.difference("sparse", "full") if full else "no full row"),
        (s["peak_memory_bytes"] <= l["peak_memory_bytes"],
         f"{fmt_bytes(s['peak_memory_bytes'])} vs {fmt_bytes(l['peak_memory_bytes'])} {cite(s['id'], l['id'])}"),
        (s["artifact_bytes"] <= l["artifact_bytes"],
         f"{s['artifact_bytes']:,} B vs {l['artifact_bytes']:,} B {cite(s['id'], l['id'])}"),
    ]
    methods = [("sparse", sparse), ("lora", lora)] + ([("full", full)] if full else [])
    label = "; ".join(f"{name} mean of " + ", ".join(f"`{r}`" for r in mm.rows) for name, mm in methods)
    return [
        Block("h2", "Targets"),
        Block("p", f"Quality on the seed means of each method's chosen row ({p.metric} in points, with the paired "
                   "bootstrap interval of the difference); peak memory and artifact bytes on the cost rows named in "
                   "the Bottom line."),
        Block("table", header=["rows", f"{p.metric} ≥ LoRA", "within 1 point of full FT", "peak memory ≤ LoRA",
                               "artifact bytes ≤ LoRA"],
              rows=[[label] + [("met" if ok else "**not met**") + f" ({detail})" for ok, detail in checks]]),
    ]


# ---------------------------------------------------------------- sections


def header_blocks(results: dict[str, Any], results_path: Path) -> list[Block]:
    cfg, machine, model = results.get("config", {}), results.get("machine", {}), results.get("model", {})
    read_as = f" (as task `{cfg['eval_task']}`)" if cfg.get("eval_task") else ""
    protocol = results.get("protocol") or {}
    seeds = (f"seeds {protocol['seeds']} (one row per method and seed)" if protocol.get("summary") and protocol.get("seeds")
             else f"seed {cfg.get('seed')}")
    return [
        Block("h1", f"Cost report: sparse fine-tuning vs full fine-tuning vs LoRA ({results.get('name')})"),
        Block("p", (
            f"Model `{model.get('name')}` ({fmt_count(model.get('total_params'))} parameters), task "
            f"`{results.get('task', {}).get('name')}`, {cfg.get('train_rows_used', cfg.get('train_limit'))} training rows, "
            f"{cfg.get('steps')} steps of batch {cfg.get('batch_size')}×{cfg.get('grad_accum')} at max length "
            f"{cfg.get('max_length')}, {seeds} — the same for every row. Evaluated on "
            f"{cfg.get('eval_limit') or 'all'} examples of `{Path(str(cfg.get('eval_data'))).name}`{read_as}. "
            f"Device: {machine.get('device')} ({machine.get('device_name')}, {machine.get('cpu_count')} cores). "
            f"Source: `{results_path.name}` (every figure below cites its row id there)."
        )),
    ]


def bottom_line_blocks(p: Picked) -> list[Block]:
    if p.means and "sparse" in p.means.methods:
        return [Block("h2", "Bottom line"), Block("ul", items=means_bottom_line(p, p.means))]
    items = []
    best = p.best_sparse()
    if best and p.full:
        items.append(
            f"**Quality.** The best sparse row, {row_label(best)} with {fmt_count(best['trainable_params'])} trained "
            f"entries ({best['trainable_pct']:.2f}% of the model), scores {points(p.value(best))} {p.metric} vs "
            f"{points(p.value(p.full))} for full fine-tuning ({delta_points(p.value(best), p.value(p.full))}); it keeps "
            f"{gain_kept(p, best)} of full FT's gain over the base ({points(p.value(p.base)) if p.base else '–'}) "
            f"{cite(best['id'], p.full['id'], *([p.base['id']] if p.base else []))}."
        )
    elif best and p.base:
        items.append(
            f"**Quality.** The best sparse row, {row_label(best)} with {fmt_count(best['trainable_params'])} trained "
            f"entries ({best['trainable_pct']:.2f}% of the model), scores {points(p.value(best))} {p.metric} vs "
            f"{points(p.value(p.base))} for the base ({delta_points(p.value(best), p.value(p.base))}); no full "
            f"fine-tuning row to compare with {cite(best['id'], p.base['id'])}."
        )
    if best:
        lora = p.lora_match(best)
        if lora:
            items.append(
                f"**Against LoRA at a similar budget.** {row_label(lora)} trains {fmt_count(lora['trainable_params'])} "
                f"numbers and scores {points(p.value(lora))}; the best sparse row is "
                f"{delta_points(p.value(best), p.value(lora))} from it {cite(best['id'], lora['id'])}."
            )
        if p.full:
            items.append(
                f"**Training cost.** Median step {best['median_step_s']:.2f} s vs {p.full['median_step_s']:.2f} s for "
                f"full FT ({ratio(best['median_step_s'], p.full['median_step_s'])}); peak memory "
                f"{fmt_bytes(best['peak_memory_bytes'])} vs {fmt_bytes(p.full['peak_memory_bytes'])} "
                f"({ratio(best['peak_memory_bytes'], p.full['peak_memory_bytes'])}); optimizer state "
                f"{fmt_bytes(best['optimizer_state_bytes'])} vs {fmt_bytes(p.full['optimizer_state_bytes'])} "
                f"{cite(best['id'], p.full['id'])}."
            )
        storage = [f"a diff is {fmt_bytes(best['artifact_bytes'])} {cite(best['id'])}"]
        if lora:
            storage.append(f"a LoRA adapter {fmt_bytes(lora['artifact_bytes'])} {cite(lora['id'])}")
        if p.full:
            storage.append(f"a full copy {fmt_bytes(p.full['artifact_bytes'])} {cite(p.full['id'])}")
        items.append("**Storage per tenant.** " + ", ".join(storage) + ".")
    if not items:
        items.append("Not enough finished rows for a comparison (see the table below).")
    return [Block("h2", "Bottom line"), Block("ul", items=items)]


def target_blocks(p: Picked) -> list[Block]:
    """The project's stated targets, checked for every sparse row against its closest LoRA row."""
    if p.means and "sparse" in p.means.methods:
        return means_target_blocks(p, p.means)
    if not (p.sparse and p.lora):
        return []
    rows = []
    for s in p.sparse:
        lora = p.lora_match(s)
        checks = [
            (p.value(s) >= p.value(lora), f"{points(p.value(s))} vs {points(p.value(lora))}"),
            (p.full is not None and p.value(s) >= p.value(p.full) - 0.01,
             f"{delta_points(p.value(s), p.value(p.full))}" if p.full else "no full row"),
            (s["peak_memory_bytes"] <= lora["peak_memory_bytes"],
             f"{fmt_bytes(s['peak_memory_bytes'])} vs {fmt_bytes(lora['peak_memory_bytes'])}"),
            # Exact bytes: diffs and adapters of equal trainable count are close in size.
            (s["artifact_bytes"] <= lora["artifact_bytes"], f"{s['artifact_bytes']:,} B vs {lora['artifact_bytes']:,} B"),
        ]
        rows.append(
            [f"`{s['id']}` vs `{lora['id']}`" + (f", `{p.full['id']}`" if p.full else "")]
            + [("met" if ok else "**not met**") + f" ({detail})" for ok, detail in checks]
        )
    return [
        Block("h2", "Targets"),
        Block("p", f"Each sparse row against the LoRA row with the closest trainable count (the best-scoring one where "
                           f"several share it) and the best full fine-tuning row; {p.metric} in points."),
        Block("table", header=["rows", f"{p.metric} ≥ LoRA", "within 1 point of full FT", "peak memory ≤ LoRA",
                               "artifact bytes ≤ LoRA"], rows=rows),
    ]


def full_reference(p: Picked) -> tuple[float | None, str, list[Block]]:
    """What the Side by side table's full-FT column compares each row with: full FT's seed mean in a
    protocol test stage (its best seed would be a lucky draw), else its best row; the column header and
    a note saying which."""
    if p.means and "full" in p.means.methods:
        full = p.means.methods["full"]
        note = Block("p", f"\"vs full FT mean\" compares each row with full FT's mean over its {len(full.rows)} seeds "
                          f"({100 * full.mean:.2f}; rows {', '.join(f'`{r}`' for r in full.rows)}), not with its best seed.")
        return full.mean, "vs full FT mean", [note]
    return (p.value(p.full) if p.full else None), "vs full FT", []


def side_by_side_blocks(p: Picked, results: dict[str, Any]) -> list[Block]:
    full_value, full_header, full_note = full_reference(p)
    rows = []
    for r in ok_rows(results):
        trains = row_trains(r)
        rows.append([
            f"`{r['id']}`", row_label(r),
            f"{fmt_count(r['trainable_params'])} ({r['trainable_pct']:.3f}%)" if trains else "–",
            points(p.value(r)),
            delta_points(p.value(r), p.value(p.base)) if p.base and trains else "–",
            delta_points(p.value(r), full_value) if full_value is not None and trains else "–",
            seconds(r["train_wall_s"]) if trains else "–",
            fmt_selection(r),
            f"{r['median_step_s']:.2f} s" if trains else "–",
            f"{r['tokens_per_s']:.0f}" if trains else "–",
            fmt_bytes(r["peak_memory_bytes"]) if trains else "–",
            fmt_bytes(r["optimizer_state_bytes"]) if trains else "–",
            f"{fmt_bytes(r['artifact_bytes'])} ({r['artifact_kind']})" if trains else "–",
        ])
    blocks = [
        Block("h2", "Side by side"),
        *load_warning(results),
        *machines_warning(results),
        Block("table", header=["row", "method", "trainable (% of model)", p.metric, "vs base", full_header,
                               "training wall", "selection s (% of wall)", "median step", "tokens/s", "peak memory",
                               "optimizer state", "artifact on disk"], rows=rows),
        *full_note,
        Block("p", "Training wall time covers the whole run (model load, entry selection, training loop, saving); "
                   "the selection column is the part of it spent choosing the entries (calibration passes for data "
                   "scorers, scoring, allocation; – where none were chosen or the row predates the timing). Peak "
                   "memory is that of the row's own process."),
    ]
    missing = rows_not_run(results)
    if missing:
        blocks.append(Block("p", "Rows in the config that have no result (the grid was stopped, or is still running): "
                                 + ", ".join(f"`{r}`" for r in missing) + "."))
    if p.failed:
        blocks.append(Block("p", "Rows that did not finish: " + "; ".join(
            f"`{r['id']}` ({(r.get('error') or '').strip().splitlines()[-1][:160] if r.get('error') else 'no error text'})"
            for r in p.failed)))
    return blocks


def load_warning(results: dict[str, Any]) -> list[Block]:
    """A warning when rows ran under clearly different machine load: their times are then not comparable."""
    loads = {r["id"]: r["load_average"]["start"] for r in ok_rows(results)
             if row_trains(r) and (r.get("load_average") or {}).get("start") is not None}
    if len(loads) < 2 or max(loads.values()) <= 1.5 * max(min(loads.values()), 1.0):
        return []
    listed = ", ".join(f"`{k}` {v:.1f}" for k, v in loads.items())
    return [Block("p", f"**Caution:** the machine's load average differed between rows ({listed}); training "
                       "times and tokens/s are not comparable across them. Memory, bytes and metrics are.")]


def machines_warning(results: dict[str, Any]) -> list[Block]:
    """A warning when a resumed grid's rows ran on different machines (``--any-machine``)."""
    listed = machines_listing(results, quote="`")
    if listed is None:
        return []
    count = len(row_machines(results))
    return [Block("p", f"**Caution:** the rows ran on {count} machines ({listed}); training times, "
                       "tokens/s and peak memory compare only within one. Scores and bytes compare across them.")]


def rows_not_run(results: dict[str, Any]) -> list[str]:
    cfg = results.get("config", {})
    planned = (["base"] if cfg.get("eval_base", True) else []) + [r.get("id") for r in cfg.get("runs", [])]
    done = {r.get("id") for r in results["rows"]}
    return [r for r in planned if r not in done]


def projection_blocks(p: Picked, results: dict[str, Any]) -> list[Block]:
    best, lora, full = projected_rows(p)
    if not (best or lora or full):
        return []
    base_bytes = base_model_bytes(results)
    base_src = f"the base's size, from {cite(full['id'])}" if full else "4 bytes per base parameter"
    columns = [(f"sparse diffs {cite(best['id'])}", best, base_bytes) if best else None,
               (f"LoRA adapters {cite(lora['id'])}", lora, base_bytes) if lora else None,
               (f"full copies {cite(full['id'])}", full, 0.0) if full else None]
    columns = [c for c in columns if c]
    storage_rows = [[f"{n:,}"] + [fmt_bytes(shared + n * row["artifact_bytes"]) for _, row, shared in columns] for n in TENANTS]
    time_rows = [[f"{n:,}"] + [hours(n * row["train_wall_s"]) for _, row, _ in columns] for n in TENANTS]
    return [
        Block("h2", "Projection for N tasks / tenants"),
        Block("p", f"Storage: one shared base ({fmt_bytes(base_bytes)}, {base_src}) plus one diff or adapter per "
                   "tenant, against one full copy per tenant. Training: N independent runs of the measured length on "
                   "this device."),
        Block("table", header=["N", *[f"storage, {name}" for name, _, _ in columns]], rows=storage_rows),
        Block("table", header=["N", *[f"training time, {name}" for name, _, _ in columns]], rows=time_rows),
    ]


def projected_rows(p: Picked) -> tuple[dict[str, Any] | None, ...]:
    """The sparse, LoRA and full rows the projection multiplies: a protocol's cost rows (not its luckiest seed),
    else the best sparse row and its LoRA match."""
    if p.means and "sparse" in p.means.methods:
        cost = {name: mm.cost_row for name, mm in p.means.methods.items()}
        return cost["sparse"], cost.get("lora"), cost.get("full")
    best = p.best_sparse()
    return best, p.lora_match(best) if best else next(iter(p.lora), None), p.full


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def plot_blocks(results_path: Path, results: dict[str, Any], out_path: Path) -> list[Block]:
    folder = results_path.parent / "plots"
    expected = [name for name in PLOT_CAPTIONS if name != CURVES_PNG or curve_series(results)]
    if not all((folder / name).is_file() for name in expected):
        write_plots(results, results_path.parent)
    blocks = [Block("h2", "Plots")]
    for name, caption in PLOT_CAPTIONS.items():
        if (folder / name).is_file():
            blocks.append(Block("img", text=os.path.relpath(folder / name, out_path.parent), items=[caption]))
    return blocks


def provenance_blocks(results: dict[str, Any]) -> list[Block]:
    versions = next((r.get("versions") for r in results["rows"] if r.get("versions")), {}) or {}
    return [
        Block("h2", "How these numbers were made"),
        Block("ul", items=[
            f"Command: `{results.get('command') or '(not recorded)'}`",
            f"Started {results.get('started_at')}, finished {results.get('finished_at') or '(unfinished)'}",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
            "Each row ran in a fresh process; the same data file, seed, steps, batch size and sequence length "
            "for every row; learning rates per method as in the config.",
        ]),
    ]


def build_report(results: dict[str, Any], results_path: Path, out_path: Path) -> list[Block]:
    from .protocol import protocol_blocks

    p = pick_rows(results)
    return (
        header_blocks(results, results_path)
        + protocol_blocks(results)  # a protocol's test stage: seed statistics before any single-seed figure
        + bottom_line_blocks(p)
        + target_blocks(p)
        + side_by_side_blocks(p, results)
        + projection_blocks(p, results)
        + plot_blocks(results_path, results, out_path)
        + provenance_blocks(results)
    )


# ---------------------------------------------------------------- rendering


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            out += [f"# {b.text}", ""]
        elif b.kind == "h2":
            out += [f"## {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "ul":
            out += [f"- {item}" for item in b.items] + [""]
        elif b.kind == "table":
            out += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            out += ["| " + " | ".join(cells) + " |" for cells in b.rows] + [""]
        elif b.kind == "img":
            out += [f"![{b.items[0]}]({b.text})", ""]
    return "\n".join(out)


def inline_html(text: str) -> str:
    """Markdown's ``code`` and **bold** as HTML, everything else escaped."""
    import re

    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def render_html(blocks: list[Block]) -> str:
    body: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "p"):
            body.append(f"<{b.kind}>{inline_html(b.text)}</{b.kind}>")
        elif b.kind == "ul":
            body.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{inline_html(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "img":
            cap = html.escape(b.items[0])
            body.append(f'<figure><img src="{html.escape(b.text)}" alt="{cap}"><figcaption>{cap}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;font-size:.9em}"
             "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}")
    title = inline_html(blocks[0].text) if blocks else "report"
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def markdown_out(out: str | os.PathLike, results_path: Path) -> Path:
    """``out`` when it can take the Markdown page. An HTML path is refused: the page written there would be
    Markdown (without --html), or the HTML page beside it would overwrite it (with --html)."""
    out_path = check_out_file(out, inputs=[results_path], example="report.md")
    if out_path.suffix.lower() in (".html", ".htm"):
        raise ConfigError(f"--out {out_path}: --out takes the Markdown page; give a .md path, e.g. --out "
                          f"{out_path.with_suffix('.md')}, and add --html for an HTML page beside it "
                          f"({out_path.with_suffix('.html')})")
    return out_path


def write_report(results_path: str | os.PathLike, out: str | os.PathLike | None = None, html_page: bool = False) -> list[Path]:
    """Write ``report.md`` (default: next to results.json) and, with ``html_page``, ``report.html``."""
    results_path = Path(results_path)
    # --out RESULTS.json had replaced the measurements with the page; a directory failed with an errno.
    out_path = results_path.parent / "report.md" if out is None else markdown_out(out, results_path)
    html_path = check_out_file(out_path.with_suffix(".html"), inputs=[results_path]) if html_page else None
    results = read_results(results_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    blocks = build_report(results, results_path, out_path)
    out_path.write_text(render_markdown(blocks))
    written = [out_path]
    if html_path is not None:
        html_path.write_text(render_html(blocks))
        written.append(html_path)
    return written
