"""The validation curve of a bench row (``validation_every`` / ``curve_limit``): config checks, where it
is recorded (validation stage only), the live model scoring like its saved artifact, and the test
stage's "best at last step" fact."""

from __future__ import annotations

import pytest
import torch
import yaml

from sparseft.bench import worker
from sparseft.bench.config import parse_bench_config
from sparseft.bench.grid import prepare_model, prepare_train_file, worker_spec
from sparseft.bench.plots import curve_series, plot_validation_curves
from sparseft.bench.protocol import best_rows, for_test, for_validation, protocol_markdown, summarize
from sparseft.bench.results import schema_problems
from sparseft.errors import ConfigError

from test_bench import TINY
from test_bench_protocol import protocol_config


def curve_config(**changes):
    """The tiny protocol (which has validation_every: 2) without a curve, then ``changes``."""
    return protocol_config(**{"validation_every": None, **changes})


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"validation_every": 0}, "validation_every must be a positive integer or absent, got 0"),
        ({"validation_every": "2"}, "validation_every must be a positive integer or absent, got '2'"),
        ({"validation_every": True}, "validation_every must be a positive integer or absent, got True"),
        ({"validation_every": 5}, "validation_every (5) is more than steps (4)"),
        ({"curve_limit": 8}, "curve_limit without validation_every"),
        ({"validation_every": 2, "curve_limit": 2.5}, "curve_limit must be a positive integer or absent, got 2.5"),
        ({"validation_every": 2, "validation_limit": 10, "curve_limit": 20},
         "curve_limit (20) is more than validation_limit (10)"),
        ({"runs": [{"id": "a", "method": "full", "lr": 1e-3, "validation_every": -1}]},
         "runs[0] (a): validation_every must be a positive integer"),
        ({"runs": [{"id": "a", "method": "full", "lr": 1e-3, "curve_limit": 4}]},
         "runs[0] (a): curve_limit without validation_every"),
        ({"runs": [{"id": "a", "method": "full", "lr": 1e-3, "validation_every": 2},
                   {"id": "b", "method": "full", "lr": 1e-3, "curve_limit": 4}]},
         "runs[1] (b): curve_limit without validation_every"),
    ],
)
def test_malformed_curve_keys_are_refused_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as err:
        curve_config(**changes)
    assert message in str(err.value) and "grid.yaml" in str(err.value)


def test_a_curve_needs_the_validation_split():
    raw = {**yaml.safe_load(TINY.read_text()), "validation_every": 2}
    with pytest.raises(ConfigError, match="grid.yaml: validation_every needs the validation split"):
        parse_bench_config(raw, where="grid.yaml", base_dir=TINY.parent)


def test_the_curve_is_in_validation_stage_specs_only(tmp_path):
    runs = [{"id": "full", "method": "full", "lr": 1e-3},
            {"id": "lora", "method": "lora", "lora_rank": 2, "lr": 1e-2, "validation_every": 1, "curve_limit": 5}]
    cfg = curve_config(validation_every=2, validation_limit=20, runs=runs)
    spec = lambda grid, run: worker_spec(grid, run, "m", tmp_path / "t.jsonl", tmp_path)  # noqa: E731
    validation = for_validation(cfg)
    assert spec(validation, validation.runs[0])["curve"] == {"every": 2, "limit": 20}  # the grid's, validation_limit
    assert spec(validation, validation.runs[1])["curve"] == {"every": 1, "limit": 5}  # the row's own
    assert all(key not in spec(validation, validation.runs[1])["run"] for key in ("validation_every", "curve_limit"))
    # Not scored on the validation split: no curve, and the spec is what it was before curves existed.
    test = for_test(cfg, {"full": {"row": "full"}, "lora": {"row": "lora"}})
    assert test.validation_every is None and all(r.validation_every is None for r in test.runs)
    for grid, run in ((test, test.runs[0]), (cfg, cfg.runs[1])):
        assert "curve" not in spec(grid, run)
    plain, curved = curve_config(), curve_config(validation_every=2)
    without = spec(for_validation(plain), plain.runs[0])
    assert "curve" not in without
    assert without == {k: v for k, v in spec(for_validation(curved), curved.runs[0]).items() if k != "curve"}


# ---------------------------------------------------------------- rows with a curve, in the worker


@pytest.fixture(scope="module")
def validation_grid(tmp_path_factory):
    """The tiny protocol's validation stage, 5 steps with a point every 2: ``(cfg, model dir, train file, out)``."""
    cfg = for_validation(curve_config(steps=5, validation_every=2, validation_limit=16))
    out = tmp_path_factory.mktemp("curve")
    model = prepare_model(cfg, out)
    train_file, _, _ = prepare_train_file(cfg, model, out / "train.jsonl")
    return cfg, model, train_file, out


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # the worker sets the job's thread count in this process
    yield
    torch.set_num_threads(threads)


def row_job(validation_grid, row_id: str, tag: str) -> dict:
    cfg, model, train_file, out = validation_grid
    return worker_spec(cfg, next(r for r in cfg.runs if r.id == row_id), model, train_file, out / tag / row_id)


def run_row(job: dict) -> dict:
    row = worker.run_job(job)
    assert row["status"] == "ok", row["error"]
    return row


ROWS = ["full", "lora-matched", "sparse-combined-lr0.03"]


@pytest.mark.parametrize("row_id", ROWS)
def test_a_row_records_its_curve_and_the_last_point_is_its_final_score(validation_grid, row_id, keep_threads,
                                                                        monkeypatch):
    """The live model (SparseLinear / unmerged LoRA / all weights, still training) scores like the artifact
    it becomes: the same metric at the last step, and the same label log-likelihoods within float tolerance."""
    live_scores = {}
    score = worker.ValidationCurve.score

    def score_and_keep(self, model):  # the curve's own evaluation, plus the label log-likelihoods at each point
        metrics = score(self, model)
        assert model.training  # handed back to training in train mode
        model.eval()
        live_scores[len(live_scores)] = self.task.label_scores(model, self.tokenizer, self.records)
        model.train()
        return metrics

    monkeypatch.setattr(worker.ValidationCurve, "score", score_and_keep)
    job = row_job(validation_grid, row_id, "with")
    row = run_row(job)
    curve = row["validation_curve"]
    assert [point["step"] for point in curve] == [2, 4, 5]  # every 2 steps, and the last
    assert all(set(point) == {"step", "accuracy"} for point in curve)
    assert curve[-1]["accuracy"] == pytest.approx(row["metrics"]["accuracy"], abs=1e-6)
    assert row["curve_examples"] == row["eval_examples"] == 16 and row["curve_wall_s"] > 0
    # Choosing the entries is timed as a part of the training wall; full and LoRA rows choose none.
    if row["method"] == "sparse":
        assert 0 < row["selection_wall_s"] < row["train_wall_s"]
    else:
        assert row["selection_wall_s"] is None
    best = max(point["accuracy"] for point in curve)
    assert row["curve_best_step"] == next(point["step"] for point in curve if point["accuracy"] == best)

    artifact = worker.load_for_eval(job, row)
    curve = worker.ValidationCurve(job, "cpu")  # its task, tokenizer and examples
    saved_scores = curve.task.label_scores(artifact, curve.tokenizer, curve.records)
    # Sparse diffs store bf16 values: the saved model differs from the live one by that rounding only
    # (about 1e-4 here), far less than training moved the scores between the first and the last point.
    first, last = live_scores[0], live_scores[2]
    assert torch.allclose(last, saved_scores, atol=1e-3), (last - saved_scores).abs().max()
    assert not torch.allclose(first, saved_scores, atol=1e-2)

    # Scoring the curve changes nothing in training: the same losses as the row without a curve.
    plain_job = row_job(validation_grid, row_id, "without")
    del plain_job["curve"]
    plain = run_row(plain_job)
    assert plain["losses"] == row["losses"] and "validation_curve" not in plain
    rows = [{**r, "row_wall_s": 1.0} for r in (row, plain)]  # the grid times the worker's process
    assert schema_problems(results_of(rows), require_complete=True) == []


def test_the_best_step_is_the_earliest_best_point():
    assert worker.best_step([{"step": 2, "f1": 0.3}, {"step": 4, "f1": 0.5}, {"step": 6, "f1": 0.5}]) == 4
    assert worker.best_step([{"step": 2, "f1": 0.3}, {"step": 4, "f1": 0.2}, {"step": 5, "f1": 0.6}]) == 5
    assert worker.best_step([]) is None


def results_of(rows: list[dict]) -> dict:
    return {"schema_version": 1, "name": "t", "config": {}, "command": "", "machine": {}, "model": {},
            "task": {"primary_metric": "accuracy"}, "started_at": "", "rows": rows}


def test_schema_asks_a_row_with_a_curve_for_its_curve_fields():
    row = {"id": "x", "method": "base", "status": "ok", "validation_curve": [{"step": 1, "accuracy": 0.5}]}
    assert "rows[0] (x): missing field 'curve_best_step'" in schema_problems(results_of([row]), require_complete=False)


# ---------------------------------------------------------------- the test stage says where each curve peaked


def chosen_validation(curves: dict[str, list[float]]) -> dict:
    methods = {"full": "full", "lora-matched": "lora"}
    rows = []
    for row_id, values in curves.items():
        curve = [{"step": 2 * (i + 1), "accuracy": v} for i, v in enumerate(values)]
        best = max(values)
        rows.append({"id": row_id, "method": methods.get(row_id, "sparse"), "status": "ok",
                     "primary_metric": "accuracy", "metrics": {"accuracy": values[-1]}, "validation_curve": curve,
                     "curve_best_step": next(p["step"] for p in curve if p["accuracy"] == best)})
    return {"protocol": {"stage": "validation"}, "rows": rows}


def test_the_summary_says_per_method_whether_the_best_point_was_the_last_step(tmp_path):
    cfg = curve_config(validation_every=2)
    validation = chosen_validation({"full": [0.5, 0.6], "lora-matched": [0.7, 0.6],
                                    "sparse-combined-lr0.001": [0.5, 0.5], "sparse-combined-lr0.03": [0.6, 0.8]})
    chosen = best_rows(cfg, validation)
    assert {m: (c["curve_best_step"], c["curve_last_step"]) for m, c in chosen.items()} == {
        "full": (4, 4), "lora": (2, 4), "sparse": (4, 4)}
    assert chosen["sparse"]["validation_curve"] == validation["rows"][3]["validation_curve"]
    test_rows = [{"id": f"{m}-seed0", "method": m, "status": "ok", "seed": 0, "metrics": {"accuracy": 0.5}}
                 for m in ("full", "lora", "sparse")]
    results = {"task": {"primary_metric": "accuracy"}, "rows": test_rows,
               "protocol": {"stage": "test", "seeds": [0], "validation_results": "v/results.json",
                            "chosen_on_validation": chosen}}
    summary = summarize(results)
    assert {m: s["best_at_last_step"] for m, s in summary["methods"].items()} == {
        "full": True, "lora": False, "sparse": True}
    results["protocol"]["summary"] = summary
    text = protocol_markdown(results)
    assert "| validation curve |" in text
    assert "| full | `full` (60.00) | 50.00 ± 0.00 | 1 | best at last step (4): lengthen `steps` |" in text
    assert "| lora | `lora-matched` (60.00) | 50.00 ± 0.00 | 1 | best at step 2 of 4 |" in text
    # One line per chosen row in the test stage's plots; the validation stage plots every row's curve.
    assert [(row_id, method) for row_id, method, _ in curve_series(results)] == [
        ("full", "full"), ("lora-matched", "lora"), ("sparse-combined-lr0.03", "sparse")]
    assert len(curve_series(validation)) == 4
    assert plot_validation_curves(results, tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "best at the last step (lengthen `steps`?): `full`, `sparse-combined-lr0.03`" in protocol_markdown(
        {**validation, "protocol": {"stage": "validation"}})


def test_without_curves_the_summary_and_tables_are_as_before():
    cfg = curve_config()
    validation = {"protocol": {"stage": "validation"}, "rows": [
        {"id": r.id, "method": r.method, "status": "ok", "primary_metric": "accuracy", "metrics": {"accuracy": 0.5}}
        for r in cfg.runs]}
    chosen = best_rows(cfg, validation)
    assert all(set(c) == {"row", "metric", "value", "lr", "scorer"} for c in chosen.values())
    results = {"task": {"primary_metric": "accuracy"}, "rows": [
        {"id": "full-seed0", "method": "full", "status": "ok", "seed": 0, "metrics": {"accuracy": 0.5}}],
        "protocol": {"stage": "test", "seeds": [0], "validation_results": "v", "chosen_on_validation": chosen}}
    summary = summarize(results)
    assert set(summary["methods"]["full"]) == {"mean", "std", "seeds", "rows"}
    results["protocol"]["summary"] = summary
    assert "validation curve" not in protocol_markdown(results)
    assert "Validation curves" not in protocol_markdown(validation)
