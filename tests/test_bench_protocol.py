"""The validation/test protocol of sparseft bench: lr grids, choosing on validation, seeded test rows,
mean ± std and the paired bootstrap interval (hand-computed cases), and the two stages end to end."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from sparseft.bench.config import load_bench_config, parse_bench_config
from sparseft.bench.grid import worker_spec
from sparseft.bench.protocol import (best_rows, for_test, for_validation, protocol_markdown, require_protocol,
                                     run_stage, summarize)
from sparseft.bench.stats import mean_std, paired_bootstrap, seed_averaged
from sparseft.errors import ConfigError

from test_bench import ROOT, run_cli

PROTOCOL = ROOT / "examples" / "bench" / "tiny_protocol.yaml"


def protocol_raw(**changes):
    raw = yaml.safe_load(PROTOCOL.read_text())
    raw.update(changes)
    return raw


def protocol_config(**changes):
    return parse_bench_config(protocol_raw(**changes), where="grid.yaml", base_dir=PROTOCOL.parent)


# ---------------------------------------------------------------- statistics


def test_bootstrap_of_identical_methods_is_centred_on_zero():
    scores = [float(i % 3 == 0) for i in range(200)]
    ci = paired_bootstrap(scores, scores, samples=2000)
    assert ci.mean == ci.low == ci.high == 0.0 and not ci.excludes_zero()
    # Same accuracy, different examples right: the interval contains 0 and is about symmetric.
    a = [float(i % 2 == 0) for i in range(400)]
    b = [float(i % 2 == 1) for i in range(400)]
    ci = paired_bootstrap(a, b, samples=4000)
    assert ci.mean == 0.0 and ci.low < 0 < ci.high
    assert abs(ci.low + ci.high) < 0.15 * (ci.high - ci.low)
    # The paired difference is ±1 on every example: its standard error is 1/sqrt(400) = 0.05.
    assert ci.high == pytest.approx(1.96 * 0.05, abs=0.012)


def test_bootstrap_of_a_method_always_better_excludes_zero():
    a = [0.8 + 0.001 * i for i in range(50)]
    b = [x - 0.1 for x in a]
    ci = paired_bootstrap(a, b, samples=1000)
    assert ci.low == pytest.approx(0.1) and ci.high == pytest.approx(0.1) and ci.excludes_zero()
    ci = paired_bootstrap([1.0] * 30 + [0.0] * 10, [0.0] * 30 + [0.0] * 10, samples=2000)
    assert ci.low > 0 and ci.excludes_zero()


def test_bootstrap_hand_computed_on_four_examples():
    # diff = [1, 0, 0, 1]: a resample's mean is k/4 with k ~ Binomial(4, 1/2). P(0) = P(1) = 1/16 > 2.5%,
    # so the 95% percentile interval is [0, 1] exactly; the mean is 0.5.
    ci = paired_bootstrap([1, 0, 1, 1], [0, 0, 1, 0], samples=20_000)
    assert (ci.mean, ci.low, ci.high, ci.examples) == (0.5, 0.0, 1.0, 4)
    assert paired_bootstrap([1, 0, 1, 1], [0, 0, 1, 0], samples=500) == paired_bootstrap([1, 0, 1, 1], [0, 0, 1, 0], samples=500)
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1, 0], [1])


def test_mean_std_and_seed_average():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert seed_averaged([[1.0, 0.0], [0.0, 0.0]]) == [0.5, 0.0]
    with pytest.raises(ValueError, match="different numbers"):
        seed_averaged([[1.0], [1.0, 0.0]])


# ---------------------------------------------------------------- config and stages


def test_lr_grid_rows_expand_and_protocol_fields_are_checked():
    cfg = protocol_config()
    assert [r.id for r in cfg.runs] == ["full", "lora-matched", "sparse-combined-lr0.001", "sparse-combined-lr0.03"]
    assert [r.lr for r in cfg.runs[2:]] == [1e-3, 3e-2] and cfg.seeds == [0, 1]
    bad = [
        ({"validation_data": None}, "validation_task and validation_data go together"),
        ({"seeds": [0, 0]}, "repeat a seed"),
        ({"seeds": "0,1"}, "non-empty list of integers"),
        ({"validation_data": "data/dev.tsv"}, "must differ from the training rows and the scored eval split"),
        ({"validation_task": "squad-val"}, "is a qa task"),
        ({"runs": [{"id": "a", "method": "full", "lr": []}]}, "non-empty list of positive numbers"),
    ]
    for changes, message in bad:
        with pytest.raises(ConfigError, match=message) as err:
            protocol_config(**changes)
        assert "grid.yaml" in str(err.value)


def test_validation_stage_scores_the_validation_split_and_the_test_stage_seeds_the_chosen_rows(tmp_path):
    cfg = protocol_config()
    validation = for_validation(cfg)
    assert (validation.eval_task, validation.eval_data, validation.eval_base) == ("sst2", cfg.validation_data, False)
    chosen = {"full": {"row": "full"}, "lora": {"row": "lora-matched"}, "sparse": {"row": "sparse-combined-lr0.03"}}
    test = for_test(cfg, chosen)
    # Seed-major, so a stage cut short holds the same seeds for every method.
    assert [r.id for r in test.runs] == ["full-seed0", "lora-matched-seed0", "sparse-combined-lr0.03-seed0",
                                         "full-seed1", "lora-matched-seed1", "sparse-combined-lr0.03-seed1"]
    assert test.eval_data == cfg.eval_data and {r.lr for r in test.runs if r.method == "sparse"} == {3e-2}
    jobs = [worker_spec(test, r, "m", tmp_path / "t.jsonl", tmp_path) for r in test.runs[::3]]
    assert [j["seed"] for j in jobs] == [0, 1]
    # A row without its own seed keeps the grid's, and its spec the keys it had (so --resume still matches).
    plain = worker_spec(cfg, cfg.runs[0], "m", tmp_path / "t.jsonl", tmp_path)
    assert plain["seed"] == cfg.seed and "seed" not in plain["run"]


def test_a_protocol_config_whose_rows_of_one_method_train_over_different_bases_is_refused(tmp_path):
    runs = protocol_raw()["runs"] + [{"id": "sparse-bf16", "method": "sparse", "scorer": "combined", "lr": 1e-3,
                                      "dtype": "bfloat16"}]
    cfg = protocol_config(runs=runs)  # as a plain grid, a side-by-side of bases is fine
    message = ("the protocol chooses one row per method on validation, but rows of one method train over different "
               "bases (sparse: sparse-combined-lr0.001 sparse-combined-lr0.03 over float32, sparse-bf16 over bfloat16)")
    for stage in ("validation", "test"):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            run_stage(cfg, stage, tmp_path / "out")
        assert "grid.yaml" in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written
    one_base_each = runs[:1] + [{**run, "dtype": "bfloat16"} for run in runs[1:3]]  # full fp32, the others bf16
    require_protocol(protocol_config(runs=one_base_each), "validation")  # bases differing across methods: allowed


def test_a_stage_refuses_an_out_it_cannot_write_before_it_builds_the_tiny_model(tmp_path, monkeypatch):
    # run_stage("") built tiny-model/ in the working directory before run_grid's own check refused the stage folder.
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, message in (("", r"--out is empty \(''\)"), (str(blocker), "is a file; expected a directory")):
        with pytest.raises(ConfigError, match=message):
            run_stage(protocol_config(), "validation", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def validation_results(values: dict[str, float], failed: tuple[str, ...] = ()) -> dict:
    methods = {"full": "full", "lora-matched": "lora"}
    rows = [{"id": row_id, "method": methods.get(row_id, "sparse"), "status": "failed" if row_id in failed else "ok",
             "primary_metric": "accuracy", "metrics": {"accuracy": value}} for row_id, value in values.items()]
    return {"protocol": {"stage": "validation"}, "rows": rows}


def test_best_row_per_method_is_chosen_on_validation_only():
    cfg = protocol_config()
    results = validation_results({"full": 0.6, "lora-matched": 0.7, "sparse-combined-lr0.001": 0.65,
                                  "sparse-combined-lr0.03": 0.8})
    chosen = best_rows(cfg, results)
    assert {m: c["row"] for m, c in chosen.items()} == {"full": "full", "lora": "lora-matched",
                                                       "sparse": "sparse-combined-lr0.03"}
    assert chosen["sparse"]["lr"] == 3e-2 and chosen["sparse"]["value"] == 0.8
    # A failed row is never chosen, however it scored; a tie keeps the first row in config order.
    results = validation_results({"full": 0.6, "lora-matched": 0.7, "sparse-combined-lr0.001": 0.65,
                                  "sparse-combined-lr0.03": 0.9}, failed=("sparse-combined-lr0.03",))
    assert best_rows(cfg, results)["sparse"]["row"] == "sparse-combined-lr0.001"
    tied = validation_results({"full": 0.5, "lora-matched": 0.5, "sparse-combined-lr0.001": 0.5,
                               "sparse-combined-lr0.03": 0.5})
    assert best_rows(cfg, tied)["sparse"]["row"] == "sparse-combined-lr0.001"
    with pytest.raises(ConfigError, match="no ok validation row for method"):
        best_rows(cfg, validation_results({"full": 0.6, "lora-matched": 0.7}))
    with pytest.raises(ConfigError, match="not from a validation stage"):
        best_rows(cfg, {**results, "protocol": {"stage": "test"}})


def test_summary_has_mean_std_per_method_and_paired_intervals():
    def row(method, seed, scores):
        return {"id": f"{method}-seed{seed}", "method": method, "status": "ok", "seed": seed,
                "metrics": {"accuracy": sum(scores) / len(scores)}, "per_example": {"accuracy": scores}}

    n = 60
    results = {"task": {"primary_metric": "accuracy"}, "rows": [
        {"id": "base", "method": "base", "status": "ok", "metrics": {"accuracy": 0.5}},
        *[row("sparse", s, [1.0] * n) for s in (0, 1)],
        row("lora", 0, [float(i % 2) for i in range(n)]), row("lora", 1, [float(i % 3 == 0) for i in range(n)]),
        *[row("full", s, [1.0] * n) for s in (0, 1)],
    ]}
    summary = summarize(results)
    assert summary["methods"]["sparse"] == {"mean": 1.0, "std": 0.0, "seeds": [0, 1],
                                            "rows": ["sparse-seed0", "sparse-seed1"]}
    lora_means = [0.5, 20 / 60]
    assert summary["methods"]["lora"]["mean"] == pytest.approx(sum(lora_means) / 2)
    assert summary["methods"]["lora"]["std"] == pytest.approx(math.sqrt(2 * (0.5 - sum(lora_means) / 2) ** 2))
    vs_lora, vs_full = summary["paired_bootstrap"]["sparse-lora"], summary["paired_bootstrap"]["sparse-full"]
    assert vs_lora["mean"] == pytest.approx(1 - sum(lora_means) / 2) and vs_lora["low"] > 0
    assert vs_full["mean"] == vs_full["low"] == vs_full["high"] == 0.0
    results["protocol"] = {"stage": "test", "seeds": [0, 1], "validation_results": "v/results.json", "summary": summary,
                           "chosen_on_validation": {m: {"row": m, "value": 0.7} for m in ("full", "lora", "sparse")}}
    text = protocol_markdown(results)
    assert "| sparse | `sparse` (70.00) | 100.00 ± 0.00 | 2 |" in text
    assert "| sparse − full | +0.00 | [+0.00, +0.00] | 60 | no |" in text


# ---------------------------------------------------------------- both stages end to end


@pytest.mark.slow
def test_tiny_protocol_chooses_on_validation_and_runs_the_test_stage_with_two_seeds(tmp_path):
    out = tmp_path / "protocol"
    first = run_cli("bench", str(PROTOCOL), "--stage", "test", "--out", str(out))
    assert first.returncode == 2 and "run --stage validation with the same --out first" in first.stderr
    for stage in ("validation", "test"):
        done = run_cli("bench", str(PROTOCOL), "--stage", stage, "--out", str(out), "--no-report")
        assert done.returncode == 0, done.stderr[-3000:]
    validation = json.loads((out / "validation" / "results.json").read_text())
    test = json.loads((out / "test" / "results.json").read_text())
    cfg = load_bench_config(PROTOCOL)
    assert {r["id"] for r in validation["rows"]} == {r.id for r in cfg.runs}
    assert validation["config"]["eval_data"] == cfg.validation_data
    # Every validation row scored the model it was training every validation_every steps; test rows did not.
    assert all([p["step"] for p in r["validation_curve"]] == [2, 4] for r in validation["rows"])
    assert not any("validation_curve" in r for r in test["rows"])
    assert (out / "validation" / "plots" / "validation_curves.png").is_file()

    # Each method's chosen row is its best on validation (the first on a tie), never a test score.
    for method, pick in test["protocol"]["chosen_on_validation"].items():
        rows = [r for r in validation["rows"] if r["method"] == method]
        best = max(r["metrics"]["accuracy"] for r in rows)
        assert pick["row"] == next(r["id"] for r in rows if r["metrics"]["accuracy"] == best)
    assert test["config"]["eval_data"] == cfg.eval_data
    assert sorted((r["method"], r["seed"]) for r in test["rows"]) == sorted(
        (m, s) for m in ("full", "lora", "sparse") for s in (0, 1))
    assert all(r["status"] == "ok" and len(r["per_example"]["accuracy"]) == cfg.eval_limit for r in test["rows"])
    summary = test["protocol"]["summary"]
    assert set(summary["methods"]) == {"full", "lora", "sparse"} and set(summary["paired_bootstrap"]) == {
        "sparse-lora", "sparse-full"}
    for method, stats in summary["methods"].items():
        pick = test["protocol"]["chosen_on_validation"][method]
        assert stats["best_at_last_step"] == (pick["curve_best_step"] == 4)
    assert "Protocol: chosen on validation, scored on test" in (out / "test" / "results.md").read_text()
    # Both stages trained the one tiny model built from every split's text.
    assert validation["model"]["path"] == test["model"]["path"] == str((out / "tiny-model").resolve())


def test_shipped_protocol_configs_parse_and_keep_three_disjoint_splits(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\ngood .\t1\n")
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\ngood .\t1\n")
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "dev-v1.1.json").write_text('{"data": []}')
    (tmp_path / "samsum").mkdir()
    for name in ("validation.jsonl", "test.jsonl"):
        (tmp_path / "samsum" / name).write_text('{"dialogue": "A: hi", "summary": "hi"}\n')
    for task in ("sst2", "squad", "samsum"):
        cfg = load_bench_config(ROOT / "examples" / "bench" / f"smollm2_{task}_protocol.yaml", data_root=str(tmp_path))
        assert len(cfg.seeds) >= 3 and cfg.validation_task.endswith("-val") and cfg.task.endswith("-fit")
        assert cfg.evaluated_task not in (cfg.task, cfg.validation_task)
        assert {r.method for r in cfg.runs} == {"full", "lora", "sparse"}
        assert all(len([r for r in cfg.runs if r.method == m]) >= 3 for m in ("full", "lora", "sparse"))
        # A validation curve of 4 points (every 10 of 40 steps) on fewer examples than the row's score.
        assert (cfg.steps, cfg.validation_every) == (40, 10) and cfg.curve_limit < cfg.validation_limit
