"""results.json: the schema of a benchmark's rows, atomic writing, reading back, and the Markdown table.

One file holds the whole grid: what was run (config, command), where (machine, versions, device)
and one row per run. Every number a report shows is read from a row, so it can cite the row id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
from ..errors import ResultsFormatError
from ..files import read_json_file
from ..methods import METHODS

SCHEMA_VERSION = 1

# Fields of every row that finished, whatever its method ("base" is evaluation only).
COMMON_FIELDS = (
    "id", "method", "status", "error", "metrics", "primary_metric", "eval_examples", "eval_wall_s",
    "total_params", "trainable_params", "trainable_pct", "seed", "device", "versions", "row_wall_s",
)
# Fields every training row (full / lora / sparse) fills.
TRAINING_FIELDS = (
    "scorer", "density", "lora_rank", "lr", "steps", "batch_size", "max_length", "train_examples",
    "train_wall_s", "median_step_s", "tokens_per_s", "final_loss", "first_loss",
    "peak_memory_bytes", "peak_memory_kind", "optimizer_state_bytes",
    "artifact_kind", "artifact_bytes", "artifact_path",
)
# Fields of a row that recorded a validation curve (``validation_every``, the protocol's validation stage).
CURVE_FIELDS = ("validation_curve", "curve_best_step", "curve_examples", "curve_wall_s")
# Fields legitimately null on some methods (e.g. a full row has no scorer) are each method's
# ``not_applicable`` (sparseft.methods).
TOP_LEVEL_FIELDS = ("schema_version", "name", "config", "command", "machine", "model", "task", "started_at", "rows")


def write_results(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``results`` as JSON atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=2, sort_keys=False)
        f.write("\n")
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Load a results.json, checking the parts a report relies on."""
    path = Path(path)
    if not path.is_file():
        raise ResultsFormatError(f"{path}: results file not found")
    results = read_json_file(path, ResultsFormatError)
    problems = schema_problems(results, require_complete=False)
    if problems:
        raise ResultsFormatError(f"{path}: " + "; ".join(problems[:5]))
    return results


def schema_problems(results: Any, require_complete: bool = True) -> list[str]:
    """What is missing or malformed; with ``require_complete`` every applicable field must be non-null."""
    if not isinstance(results, dict):
        return [f"expected a JSON object, got {type(results).__name__}"]
    problems = [f"missing top-level field {k!r}" for k in TOP_LEVEL_FIELDS if k not in results]
    if results.get("schema_version") not in (None, SCHEMA_VERSION):
        problems.append(f"schema_version {results.get('schema_version')!r} is not {SCHEMA_VERSION}")
    rows = results.get("rows")
    if not isinstance(rows, list):
        return problems + ["'rows' must be a list"]
    for i, row in enumerate(rows):
        problems += row_problems(row, f"rows[{i}]", require_complete)
    return problems


def row_problems(row: Any, where: str, require_complete: bool) -> list[str]:
    if not isinstance(row, dict):
        return [f"{where}: expected an object"]
    where = f"{where} ({row.get('id', '?')})"
    method = METHODS.get(row.get("method"))
    expected = COMMON_FIELDS + (TRAINING_FIELDS if method and method.trains else ())
    expected += CURVE_FIELDS if "validation_curve" in row else ()
    problems = [f"{where}: missing field {k!r}" for k in expected if k not in row]
    if not require_complete or row.get("status") != "ok":
        return problems
    optional = (method.not_applicable if method else set()) | {"error"}
    problems += [f"{where}: field {k!r} is null" for k in expected if k in row and row[k] is None and k not in optional]
    if not row.get("metrics"):
        problems.append(f"{where}: no metrics")
    return problems


def row_trains(row: dict[str, Any]) -> bool:
    """Whether the row trained something (every method but the base model's evaluation)."""
    method = METHODS.get(row.get("method"))
    return bool(method and method.trains)


def ok_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["rows"] if r.get("status") == "ok"]


# ---------------------------------------------------------------- formatting


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_count(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def fmt_num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def row_label(row: dict[str, Any]) -> str:
    """Method and its knob, e.g. ``sparse/fisher``, ``lora r=2``, ``full``, and the base it trained
    over when that is not the fp32 one: ``sparse/combined (int8 base)``, ``full (bfloat16 base)``; a diff
    whose values started at the quantization error: ``sparse/combined (nf4 base, values from its error)``;
    that error added once trained: ``sparse/combined (nf4 base, its error added after)``;
    whose entries were chosen over the quantized base: ``sparse/combined (nf4 base, chosen over it)``; over a
    mixed base: ``sparse/combined (nf4 base, *.down_proj unquantized)``; with a warm-up: ``full, warm-up 10%``."""
    method = METHODS.get(row.get("method"))
    label = method.label(row) if method else str(row.get("method"))
    if row.get("warmup_ratio"):
        label += f", warm-up {row['warmup_ratio']:.0%}"
    base = base_weights(row)
    notes = [note for knob, value, note in (("quantize_init", "correction", "values from its error"),
                                            ("quantize_init", "correction-after", "its error added after"),
                                            ("select_over", "quantized", "chosen over it")) if row.get(knob) == value]
    if row.get("quantize_skip"):
        notes.append(f"{', '.join(row['quantize_skip'])} unquantized")
    return f"{label} ({', '.join([f'{base} base', *notes])})" if base else label


def base_weights(row: dict[str, Any]) -> str:
    """``int8`` / ``int4`` / ``bfloat16`` / ``int8 from bfloat16``; empty for the fp32 base (and rows
    written before rows could choose their base)."""
    dtype = row.get("dtype") if row.get("dtype") not in (None, "float32") else None
    if row.get("quantize") and dtype:
        return f"{row['quantize']} from {dtype}"
    return row.get("quantize") or dtype or ""


def results_table(results: dict[str, Any]) -> str:
    """The Markdown table of every row (failed rows included, with their error)."""
    metric = results.get("task", {}).get("primary_metric", "metric")
    header = (
        f"| row | method | trainable | % of model | {metric} | other metrics | train s | selection s (% of train) | "
        "median step s | "
        "tokens/s | peak mem | optimizer state | artifact | load avg | status |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in results["rows"]:
        metrics = row.get("metrics") or {}
        primary = row.get("primary_metric") or metric
        others = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != primary and isinstance(v, (int, float)))
        status = "ok" if row.get("status") == "ok" else f"FAILED: {first_line(row.get('error'))}"
        artifact = f"{fmt_bytes(row.get('artifact_bytes'))} ({row.get('artifact_kind')})" if row.get("artifact_kind") else "–"
        lines.append(
            f"| {row.get('id')} | {row_label(row)} | {fmt_count(row.get('trainable_params'))} | "
            f"{fmt_num(row.get('trainable_pct'), 3)} | {fmt_num(metrics.get(primary), 4)} | {others or '–'} | "
            f"{fmt_num(row.get('train_wall_s'), 1)} | {fmt_selection(row)} | {fmt_num(row.get('median_step_s'), 3)} | "
            f"{fmt_num(row.get('tokens_per_s'), 0)} | {fmt_bytes(row.get('peak_memory_bytes'))} | "
            f"{fmt_bytes(row.get('optimizer_state_bytes'))} | {artifact} | {fmt_load(row.get('load_average'))} | {status} |"
        )
    return "\n".join(lines)


def fmt_selection(row: dict[str, Any]) -> str:
    """Seconds spent choosing the entries and their share of the row's training wall, e.g. ``31.2 (23%)``;
    "–" for rows that chose none and rows written before selection was timed."""
    selection, train = row.get("selection_wall_s"), row.get("train_wall_s")
    if selection is None or not train:
        return "–"
    return f"{selection:.1f} ({100 * selection / train:.0f}%)"


def fmt_load(load: dict[str, float | None] | None) -> str:
    """The machine's 1-minute load average when the row started → ended (how shared the cores were)."""
    if not load or load.get("start") is None:
        return "–"
    return f"{load['start']:.1f}→{load['end']:.1f}"


def first_line(text: str | None, limit: int = 120) -> str:
    line = (text or "").strip().splitlines()[-1:] or [""]
    return line[0][:limit].replace("|", "/")


MACHINE_KEYS = ("device", "device_name", "cpu_count")  # what makes two rows' times comparable


def row_machine(machine: dict[str, Any]) -> dict[str, Any]:
    return {key: machine.get(key) for key in MACHINE_KEYS}


def row_machines(results: dict[str, Any]) -> dict[str, list[str]]:
    """Row ids by the machine each ran on (``device_name, N cores``), in order; one key when all ran on one."""
    by_machine: dict[str, list[str]] = {}
    for row in results.get("rows", []):
        machine = row.get("machine") or row_machine(results.get("machine", {}))
        by_machine.setdefault(f"{machine.get('device_name')}, {machine.get('cpu_count')} cores", []).append(row["id"])
    return by_machine


def machines_listing(results: dict[str, Any], quote: str = "") -> str | None:
    """For a grid resumed on other machines (``--any-machine``): which rows ran where, e.g.
    ``AMD EPYC, 2 cores: a, b; Intel(R) Xeon(R), 2 cores: c``; None when every row ran on one machine."""
    machines = row_machines(results)
    if len(machines) < 2:
        return None
    return "; ".join(f"{name}: " + ", ".join(f"{quote}{i}{quote}" for i in ids) for name, ids in machines.items())


def machines_line(results: dict[str, Any]) -> list[str]:
    listed = machines_listing(results)
    if listed is None:
        return []
    return [f"- **rows ran on {len(row_machines(results))} machines** ({listed}): compare times only within one"]


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: the table plus what produced it."""
    machine = results.get("machine", {})
    cfg = results.get("config", {})
    return "\n".join(
        [
            f"# Benchmark: {results.get('name')}",
            "",
            f"- model: `{results.get('model', {}).get('name')}` ({fmt_count(results.get('model', {}).get('total_params'))} parameters)",
            f"- task: `{results.get('task', {}).get('name')}`; train rows: {cfg.get('train_rows_used')} of "
            f"`{cfg.get('train_data')}` ({cfg.get('train_rows_skipped_too_long', 0)} skipped as longer than max length); "
            f"eval rows: {cfg.get('eval_limit') or 'all'} of `{cfg.get('eval_data')}`"
            + (f" (read as task `{cfg['eval_task']}`)" if cfg.get("eval_task") else ""),
            f"- same for every row: seed {cfg.get('seed')}, {cfg.get('steps')} steps, batch {cfg.get('batch_size')} × "
            f"grad-accum {cfg.get('grad_accum')}, max length {cfg.get('max_length')}",
            f"- device: {machine.get('device')} ({machine.get('device_name')}), {machine.get('cpu_count')} CPU cores, "
            f"torch threads {machine.get('torch_threads')}",
            *machines_line(results),
            f"- command: `{results.get('command')}`",
            f"- started {results.get('started_at')}, "
            + "".join(f"resumed {t}, " for t in results.get("resumed_at", []))
            + f"finished {results.get('finished_at') or '(still running)'}",
            "",
            results_table(results),
            "",
            protocol_section(results),
            "Peak memory is the peak resident set size of the row's own process (CPU) or "
            "`torch.cuda.max_memory_allocated` (GPU); every row runs in a fresh process. Load avg is the "
            "machine's 1-minute load average when the row started → ended: times of rows run under "
            "different load are not comparable.",
            "",
        ]
    )


def protocol_section(results: dict[str, Any]) -> str:
    """A stage of the validation/test protocol adds what it chose and the seed statistics (else nothing)."""
    if not results.get("protocol"):
        return ""
    from .protocol import protocol_markdown

    return protocol_markdown(results) + "\n"
