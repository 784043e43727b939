"""The two-stage protocol: choose on validation, compare on test with several seeds.

One config, two stages (``sparseft bench CONFIG --stage validation|test --out DIR``):

- ``validation`` (→ ``DIR/validation/``): every row (each point of each lr grid) trains on the
  training rows and is scored on the validation split (``validation_task`` on ``validation_data``),
  which shares no example with the training rows nor with the scored test split.
- ``test`` (→ ``DIR/test/``): per method, the row with the best validation score (first in config
  order on a tie) is run once per seed of ``seeds`` and scored on the test split (``eval_task`` on
  ``eval_data``). The results then hold, per method, mean ± std over seeds and, for sparse − LoRA and
  sparse − full, a paired bootstrap interval over test examples (``bench.stats``).

The learning rate, and for sparse the scorer, is thus never chosen on the examples it is scored on.
With ``validation_every``, each validation row also records its validation curve (the metric of the
model being trained, every N steps and at the last); the test stage then says per method whether the
chosen row's best point was its last step, i.e. whether ``steps`` may have been too short.
A tiny model (``model: {tiny: ...}``) is built once into ``DIR/tiny-model`` from every split's text,
so both stages train the same model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..atomic import check_dir_to_write_into
from ..errors import ConfigError
from ..methods import get_method
from .config import BenchConfig
from .grid import RESULTS_NAME, check_grid_out, run_grid, save
from .stats import CONFIDENCE, mean_std, paired_bootstrap, seed_averaged

STAGES = ("validation", "test")
COMPARISONS = (("sparse", "lora"), ("sparse", "full"))


def stage_dir(out: str | os.PathLike, stage: str) -> Path:
    return Path(out) / stage


def require_protocol(cfg: BenchConfig, stage: str) -> None:
    if stage not in STAGES:
        raise ConfigError(f"--stage must be one of {STAGES}, got {stage!r}")
    missing = [name for name in ("validation_task", "validation_data", "seeds") if getattr(cfg, name) is None]
    if missing:
        raise ConfigError(f"{cfg.source}: --stage needs {', '.join(missing)} in the config (the validation split "
                          "and the test seeds)")
    check_one_base_per_method(cfg)


def check_one_base_per_method(cfg: BenchConfig) -> None:
    """Refuse rows of one method over different bases (``dtype`` / ``quantize``): the test stage keeps one
    row per method, so choosing among them on validation would silently choose the base too.

    Checked when a stage starts, not when the config loads: as a plain grid (no ``--stage``) such rows
    are a fine side-by-side of bases, which is what ``smollm2_sst2_quant.yaml`` is."""
    bases: dict[str, dict[str, list[str]]] = {}
    for run in cfg.runs:
        bases.setdefault(run.method, {}).setdefault(run_base(run), []).append(run.id)
    mixed = {method: by_base for method, by_base in bases.items() if len(by_base) > 1}
    if not mixed:
        return
    detail = "; ".join(
        f"{method}: " + ", ".join(f"{' '.join(ids)} over {base}" for base, ids in by_base.items())
        for method, by_base in mixed.items()
    )
    raise ConfigError(f"{cfg.source}: the protocol chooses one row per method on validation, but rows of one method "
                      f"train over different bases ({detail}); give each base its own protocol config")


def run_base(run: Any) -> str:
    """The base a row trains over, in words: ``float32``, ``bfloat16``, ``int8 from float32``."""
    dtype = run.dtype or "float32"
    return f"{run.quantize} from {dtype}" if run.quantize else dtype


def for_validation(cfg: BenchConfig) -> BenchConfig:
    """Every row scored on the validation split (no base row: nothing is chosen from it)."""
    return dataclasses.replace(
        cfg, name=f"{cfg.name}-validation", eval_task=cfg.validation_task, eval_data=cfg.validation_data,
        eval_limit=cfg.validation_limit, eval_base=False,
    )


def best_rows(cfg: BenchConfig, validation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{method: {"row", "metric", "value", "lr"}}``: per method, the best ok validation row of this config."""
    if validation.get("protocol", {}).get("stage") != "validation":
        raise ConfigError("the validation results are not from a validation stage (no protocol.stage 'validation')")
    specs = {run.id: run for run in cfg.runs}
    chosen: dict[str, dict[str, Any]] = {}
    for row in validation["rows"]:
        spec = specs.get(row["id"])
        if row.get("status") != "ok" or spec is None or spec.method != row.get("method"):
            continue
        metric = row["primary_metric"]
        value = float(row["metrics"][metric])
        if spec.method not in chosen or value > chosen[spec.method]["value"]:
            chosen[spec.method] = {"row": spec.id, "metric": metric, "value": value, "lr": spec.lr,
                                   "scorer": spec.scorer, **curve_facts(row)}
    missing = sorted({run.method for run in cfg.runs} - set(chosen))
    if missing:
        raise ConfigError(f"no ok validation row for method(s) {', '.join(missing)}: run or --resume the validation "
                          "stage first")
    return chosen


def curve_facts(row: dict[str, Any]) -> dict[str, Any]:
    """A validation row's curve and its best step, when it recorded one (else nothing)."""
    if not row.get("validation_curve"):
        return {}
    return {"validation_curve": row["validation_curve"], "curve_best_step": row["curve_best_step"],
            "curve_last_step": row["validation_curve"][-1]["step"]}


def for_test(cfg: BenchConfig, chosen: dict[str, dict[str, Any]]) -> BenchConfig:
    """The chosen row of each method, once per seed, scored on the test split (no curves: those are
    scored on validation, and only in the validation stage). Seed by seed, every method in turn: a stage
    cut short (a session's end, a crash) then holds the same seeds for every method, a paired comparison."""
    specs = {run.id: run for run in cfg.runs}
    runs = [
        dataclasses.replace(specs[pick["row"]], id=f"{pick['row']}-seed{seed}", seed=seed, validation_every=None,
                            curve_limit=None)
        for seed in cfg.seeds or []
        for pick in chosen.values()
    ]
    return dataclasses.replace(cfg, name=f"{cfg.name}-test", runs=runs, validation_every=None, curve_limit=None)


def run_stage(
    cfg: BenchConfig, stage: str, out: str | os.PathLike, command: str = "", resume: bool = False,
    overwrite: bool = False, plots: bool = True, any_machine: bool = False,
) -> dict[str, Any]:
    """Run one stage of ``cfg`` into ``out/<stage>``; returns its results (also in ``results.json``).
    ``resume`` and ``any_machine`` as for ``run_grid``."""
    require_protocol(cfg, stage)
    check_grid_out(cfg, stage_dir(check_dir_to_write_into(out, "--out"), stage))  # before the tiny model is built
    cfg = with_shared_tiny_model(cfg, Path(out))
    if stage == "validation":
        protocol = {"stage": "validation", "validation_task": cfg.validation_task, "validation_data": cfg.validation_data}
        return run_grid(for_validation(cfg), stage_dir(out, stage), command=command, plots=plots, resume=resume,
                        overwrite=overwrite, protocol=protocol, any_machine=any_machine)
    from .results import read_results

    validation_path = stage_dir(out, "validation") / RESULTS_NAME
    if not validation_path.is_file():
        raise ConfigError(f"{validation_path} does not exist: run --stage validation with the same --out first")
    chosen = best_rows(cfg, read_results(validation_path))
    protocol = {"stage": "test", "seeds": list(cfg.seeds or []), "chosen_on_validation": chosen,
                "validation_results": str(validation_path)}
    results = run_grid(for_test(cfg, chosen), stage_dir(out, stage), command=command, plots=plots, resume=resume,
                       overwrite=overwrite, protocol=protocol, any_machine=any_machine)
    results["protocol"]["summary"] = summarize(results)
    save(results, stage_dir(out, stage))
    return results


def with_shared_tiny_model(cfg: BenchConfig, out: Path) -> BenchConfig:
    """A tiny model built once for both stages, its vocabulary covering every split's text."""
    if not isinstance(cfg.model, dict):
        return cfg
    from ..tasks import get_task
    from .shapes import build_tiny_model_dir

    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        texts = [v for row in get_task(cfg.task).training_rows(cfg.train_data, cfg.train_limit) for v in row.values()]
        for task_name, data, limit in ((cfg.validation_task, cfg.validation_data, cfg.validation_limit),
                                       (cfg.evaluated_task, cfg.eval_data, cfg.eval_limit)):
            task = get_task(task_name)
            texts += [task.prompt(None, r) + " " + task.target(r) for r in task.load(data, limit)]
        build_tiny_model_dir(model_dir, texts, shape=cfg.model.get("tiny") or {}, seed=cfg.seed)
    return dataclasses.replace(cfg, model=str(model_dir.resolve()))


# ---------------------------------------------------------------- the comparison


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per method: mean ± std of the primary metric over seeds; per comparison: the paired bootstrap interval."""
    metric = results["task"]["primary_metric"]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        if row.get("status") == "ok" and get_method(row["method"]).trains:  # the base row trains nothing
            by_method.setdefault(row["method"], []).append(row)
    chosen = (results.get("protocol") or {}).get("chosen_on_validation") or {}
    methods = {}
    for method, rows in by_method.items():
        mean, std = mean_std([float(r["metrics"][metric]) for r in rows])
        methods[method] = {"mean": mean, "std": std, "seeds": [r["seed"] for r in rows],
                           "rows": [r["id"] for r in rows], **best_step_facts(chosen.get(method) or {})}
    comparisons = {}
    for a, b in COMPARISONS:
        scores_a, scores_b = per_example(by_method.get(a, []), metric), per_example(by_method.get(b, []), metric)
        if scores_a is not None and scores_b is not None and len(scores_a) == len(scores_b):
            comparisons[f"{a}-{b}"] = paired_bootstrap(scores_a, scores_b).to_dict()
    return {"metric": metric, "methods": methods, "paired_bootstrap": comparisons}


def best_step_facts(pick: dict[str, Any]) -> dict[str, Any]:
    """Where the chosen row's validation curve peaked, and whether that was its last step (then longer
    training might still have helped); nothing when it recorded no curve."""
    if pick.get("curve_best_step") is None:
        return {}
    return {"curve_best_step": pick["curve_best_step"], "curve_last_step": pick["curve_last_step"],
            "best_at_last_step": pick["curve_best_step"] == pick["curve_last_step"]}


def curve_cell(stats: dict[str, Any] | None) -> str:
    """The method table's validation-curve cell."""
    if not stats or "curve_best_step" not in stats:
        return "–"
    if stats["best_at_last_step"]:
        return f"best at last step ({stats['curve_last_step']}): lengthen `steps`"
    return f"best at step {stats['curve_best_step']} of {stats['curve_last_step']}"


def per_example(rows: list[dict[str, Any]], metric: str) -> list[float] | None:
    """The method's per-example scores averaged over its seeds (None when a row did not keep them)."""
    lists = [(r.get("per_example") or {}).get(metric) for r in rows]
    if not lists or any(scores is None for scores in lists):
        return None
    return seed_averaged(lists)


def protocol_tables(results: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    """``[(header, rows)]`` of a test stage: per method its chosen row and mean ± std, then the intervals."""
    protocol, summary = results.get("protocol") or {}, (results.get("protocol") or {}).get("summary")
    if protocol.get("stage") != "test" or not summary:
        return []
    metric = summary["metric"]
    # The curve column only when some chosen row recorded a curve: tables of runs without one stay as they were.
    curves = any("curve_best_step" in stats for stats in summary["methods"].values())
    methods = []
    for method, pick in protocol.get("chosen_on_validation", {}).items():
        stats = summary["methods"].get(method)
        shown = f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}" if stats else "– (no ok row)"
        cells = [method, f"`{pick['row']}` ({100 * pick['value']:.2f})", shown, str(len(stats["seeds"]) if stats else 0)]
        methods.append(cells + ([curve_cell(stats)] if curves else []))
    intervals = []
    for name, ci in summary["paired_bootstrap"].items():
        excludes = ci["low"] > 0 or ci["high"] < 0
        intervals.append([name.replace("-", " − "), f"{100 * ci['mean']:+.2f}",
                          f"[{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}]", str(ci["examples"]), "yes" if excludes else "no"])
    return [
        (["method", f"chosen row (validation {metric})", f"test {metric}: mean ± std over seeds", "seeds"]
         + (["validation curve"] if curves else []), methods),
        ([f"difference ({metric}, points)", "mean", f"{100 * CONFIDENCE:.0f}% paired bootstrap interval", "examples",
          "excludes 0?"], intervals),
    ]


PROTOCOL_TITLE = "Protocol: chosen on validation, scored on test"
INTERVAL_NOTE = ("Intervals resample test examples (the same draw for both methods) over each method's per-example "
                 "scores averaged over its seeds; they cover the test set's sampling, not seed-to-seed variation "
                 "beyond that average. Other tables list single rows, one per seed; what is said of a method "
                 "as a whole (this section, and the cost report's Bottom line and targets) uses its mean over "
                 "seeds.")


def protocol_intro(results: dict[str, Any]) -> str:
    protocol = results["protocol"]
    return f"Seeds {protocol.get('seeds')}; rows chosen on `{protocol.get('validation_results')}`."


def protocol_markdown(results: dict[str, Any]) -> str:
    """The protocol section of results.md: what was chosen on validation, mean ± std, the intervals."""
    protocol = results.get("protocol") or {}
    if protocol.get("stage") == "validation":
        return (f"Validation stage: rows scored on `{protocol.get('validation_task')}` "
                f"(`{protocol.get('validation_data')}`), not on the test split; `--stage test` runs the best row "
                "of each method with every seed.\n" + curve_note(results))
    tables = protocol_tables(results)
    if not tables:
        return ""
    lines = [f"## {PROTOCOL_TITLE}", "", protocol_intro(results), ""]
    for header, rows in tables:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows] + [""]
    return "\n".join(lines + [INTERVAL_NOTE, ""])


def curve_note(results: dict[str, Any]) -> str:
    """A validation stage with curves: which rows were still best at their last step."""
    curved = [r for r in results.get("rows", []) if r.get("status") == "ok" and r.get("validation_curve")]
    if not curved:
        return ""
    at_last = [r["id"] for r in curved if r["curve_best_step"] == r["validation_curve"][-1]["step"]]
    listed = ", ".join(f"`{row_id}`" for row_id in at_last) or "none"
    return (f"\nValidation curves ({len(curved)} rows, `validation_curve` in results.json): best at the last step "
            f"(lengthen `steps`?): {listed}.\n")


def protocol_blocks(results: dict[str, Any]) -> list:
    """The same section as report blocks (``bench.report``), first in a test stage's report."""
    from .report import Block

    tables = protocol_tables(results)
    if not tables:
        return []
    blocks = [Block("h2", PROTOCOL_TITLE), Block("p", protocol_intro(results))]
    blocks += [Block("table", header=header, rows=rows) for header, rows in tables]
    return blocks + [Block("p", INTERVAL_NOTE)]
