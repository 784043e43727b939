"""Compare groups of rows of one finished grid: mean ± std per group, a paired bootstrap per pair.

The protocol's test stage summarizes one chosen row per *method* over seeds (``protocol.summarize``).
A grid that varies something else (the base a sparse diff trains over, a knob) and repeats each
variant over seeds needs the same statistics over groups that the user names::

    python -m sparseft.bench.compare runs/sst2-quant/results.json \\
        --group fp32=sparse-fp32,sparse-fp32-s1,sparse-fp32-s2 \\
        --group nf4=sparse-nf4,sparse-nf4-s1,sparse-nf4-s2 --vs nf4:fp32

prints a markdown table per group (each seed's score, mean ± std) and, per ``--vs A:B``, the paired
bootstrap interval of A − B over the examples both scored (each group's per-example scores averaged
over its seeds first, as the protocol does). Several results files may be given when their grids scored
the same examples (same eval task, limit and examples: their content hash where the rows record it,
else the data file's path), e.g. a new variant against an earlier grid's rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .protocol import per_example
from .stats import mean_std, paired_bootstrap


def parse_group(text: str) -> tuple[str, list[str]]:
    """``NAME=ROW,ROW,...`` → (NAME, [ROW, ...])."""
    name, sep, ids = text.partition("=")
    rows = [i.strip() for i in ids.split(",") if i.strip()]
    if not sep or not name.strip() or not rows:
        raise ConfigError(f"--group {text!r}: expected NAME=ROW_ID[,ROW_ID...]")
    return name.strip(), rows


def parse_pair(text: str, groups: dict[str, list[str]]) -> tuple[str, str]:
    """``A:B`` → (A, B), both named by ``--group``."""
    a, sep, b = text.partition(":")
    if not sep or a not in groups or b not in groups:
        raise ConfigError(f"--vs {text!r}: expected A:B with A and B among the groups {sorted(groups)}")
    return a, b


def group_rows(results: dict[str, Any], groups: dict[str, list[str]]) -> dict[str, list[dict[str, Any]]]:
    """Each group's rows, in the order named; every row must exist and have finished ``ok``."""
    by_id = {row["id"]: row for row in results["rows"]}
    picked = {}
    for name, ids in groups.items():
        for row_id in ids:
            if row_id not in by_id:
                raise ConfigError(f"group {name}: no row {row_id!r} in the results (rows: {sorted(by_id)})")
            if by_id[row_id].get("status") != "ok":
                raise ConfigError(f"group {name}: row {row_id!r} did not finish ok ({by_id[row_id].get('status')})")
        picked[name] = [by_id[row_id] for row_id in ids]
    return picked


def check_results(results: Any, where: str = "") -> None:
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list) or \
            not isinstance(results.get("task"), dict) or "primary_metric" not in results["task"]:
        raise ConfigError(f"{where}not a grid's results.json: expected 'rows' and 'task.primary_metric' "
                          "(what sparseft bench writes)")


def examples_hash(rows: list[dict[str, Any]]) -> str | None:
    """The sha256 of the examples these rows scored, when every finished one records the same (rows since
    ``eval_examples_sha256``); None when one lacks it or they differ."""
    hashes = {row.get("eval_examples_sha256") for row in rows if row.get("status", "ok") == "ok"}
    return hashes.pop() if len(hashes) == 1 and None not in hashes else None


def scored_set(results: dict[str, Any], by_content: bool) -> tuple[Any, ...]:
    """What a grid's rows were scored on: the eval task, its examples (their content hash, or for older
    grids the data file's path), the limit, and the metric."""
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    examples = examples_hash(results["rows"]) if by_content else config.get("eval_data")
    return (results["task"].get("eval_task"), examples, config.get("eval_limit"), results["task"]["primary_metric"])


def merge_results(files: list[tuple[str, Any]], wanted: set[str]) -> dict[str, Any]:
    """One results dict from several grids' (``[(path, results)]``) that scored the same examples, so their
    rows pair example by example; a ``wanted`` row id (one a group names) in two files is refused: the group
    could not say which it means. Other rows (e.g. each grid's ``base``) may repeat."""
    for path, results in files:
        check_results(results, f"{path}: ")
    (first, reference), *others = files
    seen = {row.get("id"): first for row in reference["rows"]}
    for path, results in others:
        # The same data under another data root is the same examples; a changed file at the same path is not.
        by_content = examples_hash(results["rows"]) is not None and examples_hash(reference["rows"]) is not None
        if scored_set(results, by_content) != scored_set(reference, by_content):
            raise ConfigError(f"{path} scored (eval task, {'examples' if by_content else 'data'}, limit, metric) "
                              f"{scored_set(results, by_content)}, {first} {scored_set(reference, by_content)}: "
                              "their rows cannot be paired example by example")
        for row in results["rows"]:
            if row.get("id") in seen and row.get("id") in wanted:
                raise ConfigError(f"row {row.get('id')!r} is in both {seen[row.get('id')]} and {path}")
            seen[row.get("id")] = path
    return {**reference, "rows": [row for _, results in files for row in results["rows"]]}


def compare(results: dict[str, Any], groups: dict[str, list[str]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``{"metric", "groups": {name: {mean, std, values, rows, seeds}}, "pairs": {"A:B": interval + a, b}}``;
    values in the metric's own units (accuracy as a fraction). Pairs are keyed as ``--vs`` names them:
    group names may hold "-" (e.g. ``nf4-corr``), so the key is never split again; the names ride along."""
    check_results(results)
    metric = results["task"]["primary_metric"]
    rows = group_rows(results, groups)
    stats = {}
    for name, members in rows.items():
        values = [float(r["metrics"][metric]) for r in members]
        mean, std = mean_std(values)
        stats[name] = {"mean": mean, "std": std, "values": values, "rows": [r["id"] for r in members],
                       "seeds": [r.get("seed") for r in members]}
    intervals = {}
    for a, b in pairs:
        scores_a, scores_b = per_example(rows[a], metric), per_example(rows[b], metric)
        hashes = {r.get("eval_examples_sha256") for r in rows[a] + rows[b]} - {None}
        if len(hashes) > 1:
            raise ConfigError(f"--vs {a}:{b}: the groups' rows scored different examples (eval_examples_sha256 "
                              f"{sorted(h[:12] for h in hashes)})")
        if scores_a is None or scores_b is None:
            raise ConfigError(f"--vs {a}:{b}: a row of these groups kept no per-example {metric} scores")
        if len(scores_a) != len(scores_b):
            raise ConfigError(f"--vs {a}:{b}: the groups scored different numbers of examples "
                              f"({len(scores_a)} and {len(scores_b)})")
        intervals[f"{a}:{b}"] = {"a": a, "b": b, **paired_bootstrap(scores_a, scores_b).to_dict()}
    return {"metric": metric, "groups": stats, "pairs": intervals}


def markdown(summary: dict[str, Any]) -> str:
    """The two tables, in percentage points for fractional metrics."""
    scale = 100.0 if all(0 <= v <= 1 for g in summary["groups"].values() for v in g["values"]) else 1.0
    metric = summary["metric"]
    lines = [f"| group | {metric} per seed | mean ± std | rows |", "| --- | --- | --- | --- |"]
    for name, g in summary["groups"].items():
        per_seed = " / ".join(f"{scale * v:.2f}" for v in g["values"])
        lines.append(f"| {name} | {per_seed} | {scale * g['mean']:.2f} ± {scale * g['std']:.2f} | "
                     f"{', '.join(g['rows'])} |")
    if summary["pairs"]:
        lines += ["", "| difference | mean | 95% paired bootstrap interval | examples |", "| --- | --- | --- | --- |"]
        for iv in summary["pairs"].values():
            lines.append(f"| {iv['a']} − {iv['b']} | {scale * iv['mean']:+.2f} | [{scale * iv['low']:+.2f}, "
                         f"{scale * iv['high']:+.2f}] | {iv['examples']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparseft.bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+",
                        help="a grid's results.json; several when their grids scored the same examples")
    parser.add_argument("--group", action="append", required=True, metavar="NAME=ROW,...",
                        help="a named group of row ids (e.g. the seeds of one variant); repeat per group")
    parser.add_argument("--vs", action="append", default=[], metavar="A:B",
                        help="also give the paired bootstrap interval of group A minus group B; repeatable")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of markdown")
    args = parser.parse_args(argv)
    try:
        groups = dict(parse_group(g) for g in args.group)
        pairs = [parse_pair(p, groups) for p in args.vs]
        wanted = {row_id for ids in groups.values() for row_id in ids}
        results = merge_results([(str(path), json.loads(path.read_text())) for path in args.results], wanted)
        summary = compare(results, groups, pairs)
    except (ConfigError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else markdown(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
