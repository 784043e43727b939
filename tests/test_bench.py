"""sparseft bench / report: the tiny grid end to end, failure isolation, config validation, report numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparseft.bench import load_bench_config, read_results, schema_problems
from sparseft.bench.config import parse_bench_config
from sparseft.bench.protocol import summarize
from sparseft.bench.report import build_report, pick_rows, render_html, render_markdown
from sparseft.bench.results import results_table, write_results
from sparseft.bench.shapes import text_tokenizer
from sparseft.cli import main
from sparseft.errors import ConfigError, ResultsFormatError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "bench" / "tiny.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the CI grid


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "sparseft", *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_tiny_grid_fills_every_field_and_writes_plots_and_report(tmp_path):
    cfg = load_bench_config(TINY)
    out = tmp_path / "bench"
    # Through the CLI in its own process, as CI users run it (and so this test leaves no model state here).
    assert run_cli("bench", str(TINY), "--out", str(out)).returncode == 0
    results = json.loads((out / "results.json").read_text())

    assert schema_problems(read_results(out / "results.json"), require_complete=True) == []
    rows = {r["id"]: r for r in results["rows"]}
    assert list(rows) == cfg.row_ids()
    assert all(r["status"] == "ok" for r in rows.values()), {k: r["error"] for k, r in rows.items()}
    training = [r for r in rows.values() if r["method"] != "base"]
    assert {r["method"] for r in training} == {"full", "lora", "sparse"}
    # Same data, seed and steps for every row.
    assert {(r["steps"], r["seed"], r["batch_size"], r["max_length"], r["train_examples"]) for r in training} == {
        (cfg.steps, cfg.seed, cfg.batch_size, cfg.max_length, cfg.train_limit)
    }
    total = rows["base"]["total_params"]
    assert rows["full"]["trainable_params"] == total
    sparse, lora = rows["sparse-random"], rows["lora-matched"]
    assert sparse["trainable_params"] == round(cfg.density * sparse["trainable_params"] / sparse["density"])
    # "match" picks the LoRA rank whose count is closest to the sparse budget: off by < one rank's worth.
    per_rank = lora["trainable_params"] / lora["lora_rank"]
    assert abs(lora["trainable_params"] - sparse["trainable_params"]) <= per_rank / 2 + 1
    assert sparse["artifact_kind"] == "diff" and Path(sparse["artifact_path"], "sparse_config.json").is_file()
    assert lora["artifact_kind"] == "adapter" and Path(lora["artifact_path"], "adapter_config.json").is_file()
    for r in training:
        # AdamW: fp32 exp_avg + exp_avg_sq per trained number, plus a 4-byte step counter per tensor.
        assert 0 <= r["optimizer_state_bytes"] - 8 * r["trainable_params"] < 1024
        assert r["peak_memory_kind"] == "peak_rss" and r["peak_memory_bytes"] > 0
        assert len(r["losses"]) == cfg.steps
    assert sparse["artifact_bytes"] < lora["artifact_bytes"] < rows["full"]["artifact_bytes"]

    for name in ("metric_vs_params.png", "cost_bars.png", "storage_tenants.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    assert "| sparse-random |" in (out / "results.md").read_text()

    text = (out / "report.md").read_text()
    for row_id in rows:
        assert f"row `{row_id}`" in text or f"`{row_id}`" in text
    assert "](plots/storage_tenants.png)" in text
    assert "<table>" in (out / "report.html").read_text()


@pytest.mark.slow
def test_a_failing_row_is_recorded_and_the_grid_goes_on_and_a_resume_keeps_the_finished_rows(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["eval_base"] = False
    raw["row_timeout_s"] = 900
    raw["runs"] = [
        # Valid as config, fails in the worker: the budget is larger than the tiny model's targeted weights.
        {"id": "broken", "method": "sparse", "scorer": "random", "num_params": 10**9, "lr": 1e-2},
        {"id": "sparse-random", "method": "sparse", "scorer": "random", "lr": 1e-2},
    ]
    raw["train_data"], raw["eval_data"] = (str(TINY.parent / raw[k]) for k in ("train_data", "eval_data"))
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = run_cli("bench", str(config), "--out", str(tmp_path), "--no-report")
    assert proc.returncode == 1 and "failed: broken" in proc.stdout
    broken, fine = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert broken["status"] == "failed" and "does not fit" in broken["error"]
    assert fine["status"] == "ok" and fine["metrics"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in on_disk["rows"]] == ["failed", "ok"]
    assert "FAILED" in (tmp_path / "results.md").read_text()

    # Running into the same folder again is refused; nothing there changes.
    before = (tmp_path / "results.json").read_bytes()
    proc = run_cli("bench", str(config), "--out", str(tmp_path), "--no-report")
    assert proc.returncode == 2 and "--resume keeps its finished rows" in proc.stderr
    assert (tmp_path / "results.json").read_bytes() == before

    # Fixed and resumed: only the failed row runs again; the finished one is kept as it was measured.
    raw["runs"][0]["num_params"] = 100
    config.write_text(yaml.safe_dump(raw))
    proc = run_cli("bench", str(config), "--out", str(tmp_path), "--no-report", "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "row sparse-random: kept from the earlier run" in proc.stdout and "row broken: starting" in proc.stdout
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in resumed["rows"]] == ["ok", "ok"]
    assert resumed["rows"][1] == fine and resumed["started_at"] == on_disk["started_at"]
    assert len(resumed["resumed_at"]) == 1 and "resumed " in (tmp_path / "results.md").read_text()

    # Earlier rows from another machine (recorded before rows named theirs): refused, unless --any-machine.
    resumed["machine"]["device_name"] = "Other CPU"
    resumed["rows"] = [{k: v for k, v in resumed["rows"][1].items() if k != "machine"}]  # broken runs again
    (tmp_path / "results.json").write_text(json.dumps(resumed))
    proc = run_cli("bench", str(config), "--out", str(tmp_path), "--no-report", "--resume")
    assert proc.returncode == 2 and "device_name 'Other CPU'" in proc.stderr and "--any-machine" in proc.stderr
    proc = run_cli("bench", str(config), "--out", str(tmp_path), "--no-report", "--resume", "--any-machine")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mixed = json.loads((tmp_path / "results.json").read_text())
    assert mixed["rows"][1]["machine"]["device_name"] == "Other CPU"
    assert mixed["rows"][0]["machine"]["device_name"] == mixed["machine"]["device_name"] != "Other CPU"
    assert "rows ran on 2 machines" in (tmp_path / "results.md").read_text()
    proc = run_cli("bench", str(config), "--out", str(tmp_path), "--no-report", "--resume")  # a kept row's machine
    assert proc.returncode == 2 and "device_name 'Other CPU'" in proc.stderr
    proc = run_cli("bench", str(config), "--out", str(tmp_path), "--no-report", "--any-machine")
    assert proc.returncode == 2 and "--any-machine goes with --resume" in proc.stderr


# ---------------------------------------------------------------- config validation


def test_a_resumed_grid_killed_in_its_first_row_keeps_the_earlier_rows_on_disk(tmp_path, monkeypatch):
    """The kept rows are in results.json from the resumed run's first save, in the config's order, not only
    once the loop reaches them: a session ending during the re-run row loses none of them."""
    from sparseft.bench import grid
    from sparseft.bench.worker import empty_row

    raw = tiny_raw(eval_base=False, runs=[{"id": "again", "method": "sparse", "scorer": "random", "lr": 1e-2},
                                         {"id": "done", "method": "sparse", "scorer": "random", "lr": 1e-3}])
    raw["train_data"], raw["eval_data"] = (str(TINY.parent / raw[k]) for k in ("train_data", "eval_data"))
    cfg = parse_bench_config(raw, base_dir=TINY.parent)

    def fake_row(status):
        def run_row(cfg, spec, model, train_file, out):  # what run_row leaves: the spec, then the row
            job = grid.worker_spec(cfg, spec, model, train_file, out / "runs" / spec.id)
            Path(job["row_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(job["row_dir"]) / "spec.json").write_text(json.dumps(job))
            row = empty_row(job)
            row["status"] = status(spec.id)
            row["machine"] = grid.row_machine(grid.machine_info(cfg))
            return row
        return run_row

    monkeypatch.setattr(grid, "run_row", fake_row(lambda rid: "ok" if rid == "done" else "failed"))
    grid.run_grid(cfg, tmp_path, plots=False)
    first = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["id"], r["status"]) for r in first] == [("again", "failed"), ("done", "ok")]

    def killed(*args):
        on_disk = json.loads((tmp_path / "results.json").read_text())["rows"]
        assert [(r["id"], r["status"]) for r in on_disk] == [("done", "ok")]  # already saved when this row starts
        raise KeyboardInterrupt

    monkeypatch.setattr(grid, "run_row", killed)
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid(cfg, tmp_path, plots=False, resume=True)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == [first[1]]

    monkeypatch.setattr(grid, "run_row", fake_row(lambda rid: "ok"))
    grid.run_grid(cfg, tmp_path, plots=False, resume=True)  # the order is the config's again
    assert [(r["id"], r["status"]) for r in json.loads((tmp_path / "results.json").read_text())["rows"]] == [
        ("again", "ok"), ("done", "ok")]


def test_a_resume_says_why_it_runs_an_earlier_ok_row_again(tmp_path, monkeypatch, capsys):
    """A row that finished ok but cannot be kept (its worker spec missing, or the config changed under it)
    is named on stdout with the reason, before hours of it are redone."""
    from sparseft.bench import grid
    from sparseft.bench.worker import empty_row

    runs = [{"id": "moved", "method": "sparse", "scorer": "random", "lr": 1e-2},
            {"id": "changed", "method": "sparse", "scorer": "random", "lr": 1e-3},
            {"id": "same", "method": "sparse", "scorer": "random", "lr": 1e-3}]
    raw = tiny_raw(eval_base=False, runs=runs)
    raw["train_data"], raw["eval_data"] = (str(TINY.parent / raw[k]) for k in ("train_data", "eval_data"))

    def run_row(cfg, spec, model, train_file, out):
        job = grid.worker_spec(cfg, spec, model, train_file, out / "runs" / spec.id)
        Path(job["row_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(job["row_dir"]) / "spec.json").write_text(json.dumps(job))
        row = empty_row(job)
        row.update(status="ok", machine=grid.row_machine(grid.machine_info(cfg)))
        return row

    monkeypatch.setattr(grid, "run_row", run_row)
    grid.run_grid(parse_bench_config(raw, base_dir=TINY.parent), tmp_path, plots=False)
    (tmp_path / "runs" / "moved").rename(tmp_path / "moved")
    runs[1]["lr"] = 3e-3
    capsys.readouterr()
    grid.run_grid(parse_bench_config(tiny_raw(**{**raw, "runs": runs}), base_dir=TINY.parent), tmp_path,
                  plots=False, resume=True)
    said = capsys.readouterr().out
    assert f"row moved: runs again: its worker spec {tmp_path / 'runs' / 'moved' / 'spec.json'} is missing" in said
    assert "row changed: runs again: " in said and "differs from what this config runs now (in run.lr)" in said
    assert "row same: kept from the earlier run" in said and "row same: runs again" not in said


def tiny_raw(**changes):
    raw = yaml.safe_load(TINY.read_text())
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"stepz": 3}, "unknown field(s) ['stepz']"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"runs": [{"id": "a", "method": "sparse", "lr": 1e-3}]}, "needs a scorer"),
        ({"runs": [{"id": "a", "method": "sparse", "scorer": "psychic", "lr": 1e-3}]}, "unknown scorer 'psychic'"),
        ({"runs": [{"id": "a", "method": "lora", "lr": 1e-3}]}, "needs lora_rank"),
        ({"runs": [{"id": "a", "method": "lora", "lora_rank": "big", "lr": 1e-3}]}, "positive integer or 'match'"),
        ({"runs": [{"id": "a", "method": "full", "lr": 1e-3, "scorer": "random"}]}, "sparse rows only"),
        ({"runs": [{"id": "a", "method": "dense", "lr": 1e-3}]}, "method must be one of"),
        ({"runs": [{"id": "a", "method": "full", "lr": 1e-3}, {"id": "a", "method": "full", "lr": 1e-3}]}, "used twice"),
        ({"runs": [{"id": "base", "method": "full", "lr": 1e-3}]}, "reserved 'base'"),
        ({"runs": [{"id": "a", "method": "full"}]}, "missing required field 'lr'"),
        ({"train_data": "data/nope.tsv"}, "nope.tsv does not exist"),
        ({"task": "sst3"}, "unknown task 'sst3'"),
        ({"eval_task": "squad-heldout"}, "eval_task 'squad-heldout' is a qa task but task 'sst2' is classification"),
        ({"runs": [{"id": "a", "method": "lora", "lora_rank": 2, "lr": 1e-3, "reselect_every": 5}]},
         "reselect_every applies to sparse rows only"),
        ({"runs": [{"id": "a", "method": "sparse", "scorer": "random", "lr": 1e-3, "reselect_growth_batches": 4}]},
         "(a): reselect_growth_batches applies only with reselect_every"),
        ({"runs": [{"id": "a", "method": "sparse", "scorer": "random", "lr": 1e-3, "reselect_every": 5,
                    "reselect_growth_batches": 0}]}, "reselect_growth_batches must be a whole number of micro-batches"),
        ({"runs": [{"id": "a", "method": "sparse", "scorer": "random", "lr": 1e-3, "reselect_every": 2.5}]},
         "reselect_every must be a whole number, got 2.5"),
        ({"runs": [{"id": "a", "method": "sparse", "scorer": "random", "lr": 1e-3, "reselect_every": 5,
                    "reselect_fraction": 2}]}, "reselect_fraction must be in (0, 1]"),
        ({"runs": [{"id": "f8", "method": "full", "lr": 1e-3, "quantize": "int8"}]},
         "runs[0] (f8): quantize applies to sparse rows only"),
        ({"runs": [{"id": "l8", "method": "lora", "lora_rank": 2, "lr": 1e-3, "quantize": "int8"}]},
         "runs[0] (l8): quantize applies to sparse rows only"),
        ({"runs": [{"id": "s3", "method": "sparse", "scorer": "random", "lr": 1e-3, "quantize": "int3"}]},
         "runs[0] (s3): quantize must be one of ('int8', 'int4', 'nf4', 'q4_1'), got 'int3'"),
        ({"runs": [{"id": "h", "method": "full", "lr": 1e-3, "dtype": "float16"}]},
         "runs[0] (h): dtype must be one of ('float32', 'bfloat16'), got 'float16'"),
        # Values of the wrong type: a ConfigError naming the field, never a traceback from float() or a dict lookup.
        ({"density": "abc"}, "grid.yaml: density must be in (0, 1], got 'abc'"),
        ({"density": [1]}, "grid.yaml: density must be in (0, 1], got [1]"),
        ({"runs": [{"id": "s", "method": "sparse", "scorer": "random", "lr": 1e-3, "density": "abc"}]},
         "runs[0] (s): density must be in (0, 1], got 'abc'"),
        ({"runs": [{"id": "s", "method": "sparse", "scorer": "random", "lr": 1e-3, "num_params": "abc"}]},
         "runs[0] (s): num_params must be a positive integer, got 'abc'"),
        ({"runs": [{"id": "s", "method": "sparse", "scorer": "random", "lr": 1e-3, "calibration_batches": "x"}]},
         "runs[0] (s): calibration_batches must be a positive integer, got 'x'"),
        ({"row_timeout_s": float("nan")}, "grid.yaml: row_timeout_s must be a positive number of seconds, got nan"),
        ({"task": ["sst2"]}, "grid.yaml: task must be a name or path (a non-empty string), got ['sst2']"),
        ({"eval_task": {"a": 1}}, "grid.yaml: eval_task must be a name or path (a non-empty string), got {'a': 1}"),
        ({"runs": [{"id": "s", "method": "sparse", "scorer": ["random"], "lr": 1e-3}]},
         "runs[0] (s): unknown scorer ['random']"),
        ({"runs": [{"id": "f", "method": ["full"], "lr": 1e-3}]}, "runs[0] (f): method must be one of"),
        ({"runs": [{"id": "f", "method": "full", "lr": 1e-3, 1: 2, "foo": 3}]}, "[0]: unknown field(s) [1, 'foo']"),
        ({"model": {"tiny": [1]}}, "grid.yaml: model.tiny must be a mapping of sizes like {hidden_size: 32}, got [1]"),
        ({"model": {"tiny": {"hidden_size": "abc"}}}, "model.tiny.hidden_size must be a positive integer, got 'abc'"),
        ({"model": {"tiny": {"vocab_size": 10}}}, "model.tiny: unknown field(s) ['vocab_size']"),
        # 10^5 layers of hidden 4096: a 25,000B-parameter "tiny" model would be built in every row.
        ({"model": {"tiny": {"hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 100_000}}},
         "model.tiny: these sizes make a 25166.6B-parameter model"),
        ({"model": {"tiny": {"hidden_size": 33}}},
         "model.tiny: not a shape a Llama can have (Class validation error for validator 'validate_architecture': "
         "ValueError: The hidden size (33) is not a multiple of the number of attention heads (4).)"),
        ({"seed": "abc"}, "grid.yaml: seed must be an integer, got 'abc'"),
        ({"seed": 2**64}, "grid.yaml: seed 18446744073709551616 is outside [-9223372036854775808, "),
        # A row's own seed too, when the grid loads: it used to fail in that row's worker, after the rows before it.
        ({"runs": [{"id": "f", "method": "full", "lr": 1e-3, "seed": 2**64}]},
         "runs[0] (f): seed 18446744073709551616 is outside [-9223372036854775808, "),
        ({"runs": [{"id": "f", "method": "full", "lr": float("nan")}]}, "lr must be a positive finite number"),
        ({"runs": [{"id": "f", "method": "full", "lr": float("inf")}]}, "got inf"),
        ({"runs": [{"id": "f", "method": "full", "lr": True}]}, "(f): lr must be a positive finite number, got True"),
        ({"runs": [{"id": "f", "method": "full", "lr": [1e-3, True]}]}, "an lr grid must be a non-empty list"),
        ({"runs": [{"id": "f", "method": "full", "lr": [float("inf")]}]}, "an lr grid must be a non-empty list"),
        # An lr grid row without an id (or with a number for one) ran as "None-lr0.001" / "1.5-lr0.001".
        ({"runs": [{"method": "full", "lr": [1e-3, 1e-2]}]}, "grid.yaml: runs[0]: missing required field 'id'"),
        ({"runs": [{"id": 1.5, "method": "full", "lr": [1e-3, 1e-2]}]}, "runs[0]: id 1.5 must be letters, digits"),
        ({"runs": [{"id": "l", "method": "lora", "lora_rank": True, "lr": 1e-3}]},
         "runs[0] (l): lora_rank must be a positive integer or 'match', got True"),
        ({"threads": "many"}, "grid.yaml: threads must be a positive integer or absent, got 'many'"),
        ({"threads": -3}, "grid.yaml: threads must be a positive integer or absent, got -3"),
        ({"row_timeout_s": "soon"}, "grid.yaml: row_timeout_s must be a positive number of seconds, got 'soon'"),
        ({"row_timeout_s": -1}, "grid.yaml: row_timeout_s must be a positive number of seconds, got -1"),
        ({"eval_base": "maybe"}, "grid.yaml: eval_base must be true or false, got 'maybe'"),
        ({"target_modules": 5}, "grid.yaml: target_modules must be a non-empty list of module names, got 5"),
        ({"name": ["a", "b"]}, "grid.yaml: name ['a', 'b'] must be letters, digits, '-', '_' or '.'"),
        ({"name": "../../escape"}, "grid.yaml: name '../../escape' must be letters, digits, '-', '_' or '.' (it names "
                                   "the output folder runs/bench-<name>)"),
        ({"steps": True}, "grid.yaml: steps must be a positive integer, got True"),
        ({"train_limit": True}, "grid.yaml: train_limit must be a positive integer or absent, got True"),
        ({"validation_limit": True}, "grid.yaml: validation_limit must be a positive integer or absent, got True"),
        # The one device check of train and serve: cuda:N is a form, gpu0 is not; a GPU this machine lacks is
        # refused when the grid loads, not in every row's worker.
        ({"device": "gpu0"}, "grid.yaml: device must be auto, cpu, cuda or cuda:N (N: a GPU index), got 'gpu0'"),
        ({"device": "cuda:7" if torch.cuda.is_available() else "cuda"}, "grid.yaml: device"),
    ],
)
def test_bad_config_is_named(changes, message):
    with pytest.raises(ConfigError) as err:
        parse_bench_config(tiny_raw(**changes), where="grid.yaml", base_dir=TINY.parent)
    assert message in str(err.value) and "grid.yaml" in str(err.value)


def test_a_bad_top_level_field_of_a_bench_file_names_its_line(tmp_path):
    raw = {**tiny_raw(), 1: 2, "foo": 3}
    with pytest.raises(ConfigError, match=r"grid.yaml: unknown field\(s\) \[1, 'foo'\]"):
        parse_bench_config(raw, where="grid.yaml", base_dir=TINY.parent)
    path = tmp_path / "b.yaml"
    raw = tiny_raw(train_data=str(TINY.parent / "data" / "train.tsv"), eval_data=str(TINY.parent / "data" / "dev.tsv"))
    path.write_text(yaml.safe_dump({**raw, "density": "abc"}, sort_keys=False))
    line = path.read_text().splitlines().index("density: abc") + 1
    with pytest.raises(ConfigError, match=rf"b.yaml:line {line}: density must be in \(0, 1\], got 'abc'"):
        load_bench_config(path)


def test_a_bad_row_of_a_bench_file_names_its_item_and_line_after_an_lr_list(tmp_path):
    # The first row's lr list becomes three rows; the error still names the second item of `runs` as written.
    raw = tiny_raw(train_data=str(TINY.parent / "data" / "train.tsv"), eval_data=str(TINY.parent / "data" / "dev.tsv"),
                   runs=[{"id": "full", "method": "full", "lr": [1e-4, 3e-4, 1e-3]},
                         {"id": "s", "method": "sparse", "scorer": "nope", "lr": 1e-3}])
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip() == "- id: s")
    with pytest.raises(ConfigError, match=rf"b.yaml:line {line}: runs\[1\] \(s\): unknown scorer 'nope'"):
        load_bench_config(path)


def test_a_bench_file_that_is_not_utf8_or_not_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"b.yaml:line 1: not UTF-8 text \(invalid start byte at byte 0 of the line\)"):
        load_bench_config(path)
    path.write_text("model: tiny\nruns: [unclosed\n")
    with pytest.raises(ConfigError, match=r"b.yaml:line 3: not valid YAML"):
        load_bench_config(path)


def test_only_keeps_the_named_rows_in_config_order():
    from sparseft.bench.config import only_rows

    cfg = load_bench_config(TINY)
    last, first = cfg.runs[-1].id, cfg.runs[0].id
    assert only_rows(cfg, [last, first]).row_ids() == [first, last]
    assert only_rows(cfg, ["base"]).row_ids() == ["base"]
    with pytest.raises(ConfigError, match="no row 'nope'"):
        only_rows(cfg, ["nope"])


def test_config_paths_resolve_against_the_file_and_data_root(tmp_path, monkeypatch):
    cfg = load_bench_config(TINY)
    assert Path(cfg.train_data) == TINY.parent / "data" / "train.tsv"
    (tmp_path / "sst2").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "sst2" / name).write_text("sentence\tlabel\ngood .\t1\n")
    raw = tiny_raw(train_data="${SPARSEFT_DATA}/sst2/train.tsv", eval_data="${SPARSEFT_DATA}/sst2/dev.tsv")
    cfg = parse_bench_config(raw, base_dir=TINY.parent, data_root=str(tmp_path))
    assert cfg.train_data == str(tmp_path / "sst2" / "train.tsv")
    # A relative data root is where the user stands, as in `--data-root ../shared/data`.
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cfg = parse_bench_config(raw, base_dir=TINY.parent, data_root="..")
    assert cfg.train_data == str(tmp_path / "sst2" / "train.tsv")


def test_bench_refuses_an_out_where_its_files_would_replace_an_input_before_anything_runs(tmp_path, monkeypatch, capsys):
    # --out data/ had replaced the user's data/train.jsonl with the grid's rendered rows; a file as --out failed
    # at mkdir with a bare errno; an empty --out fell back to runs/bench-<name>.
    data = tmp_path / "data"
    data.mkdir()
    rows = "".join(json.dumps({"text": f"message {i}", "label": "billing"}) + "\n" for i in range(4))
    for name in ("train.jsonl", "test.jsonl"):
        (data / name).write_text(rows)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(task="routing", train_data="data/train.jsonl",
                                              eval_data="data/test.jsonl")))
    monkeypatch.chdir(tmp_path)
    train = data / "train.jsonl"
    cases = [(str(data), f"--out {train}: is {train}, an input of this command"),
             (str(config), f"--out {config}: is a file; expected a directory"),
             (str(config / "out"), f"--out {config / 'out'}: cannot be created, {config} is a file"),
             ("", "--out is empty ('')")]
    for out, message in cases:
        assert main(["bench", str(config), "--out", out]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "grid.yaml"]
    assert sorted(p.name for p in data.iterdir()) == ["test.jsonl", "train.jsonl"] and train.read_text() == rows


def test_eval_task_scores_held_out_articles_the_rows_never_trained_on(tmp_path):
    from sparseft.bench.grid import new_results, worker_spec
    from sparseft.tasks import get_task

    articles = [{"title": f"t{a}", "paragraphs": [{"context": f"word{a} is here .", "qas": [
        {"id": f"q{a}", "question": f"which word {a}?", "answers": [{"text": f"word{a}", "answer_start": 0}]}]}]}
        for a in range(42)]
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"version": "1.1", "data": articles}))
    cfg = parse_bench_config(tiny_raw(task="squad-train", eval_task="squad-heldout", train_data=str(squad),
                                      eval_data=str(squad)), base_dir=TINY.parent)
    assert worker_spec(cfg, None, "m", tmp_path / "train.jsonl", tmp_path)["eval_task"] == "squad-heldout"
    assert new_results(cfg, "cmd", "m", 0, 0)["task"] == {"name": "squad-train", "eval_task": "squad-heldout",
                                                          "primary_metric": "f1"}
    trained = {r["completion"].strip() for r in get_task(cfg.task).training_rows(cfg.train_data, None)}
    scored = {r["answers"][0] for r in get_task(cfg.evaluated_task).load(cfg.eval_data)}
    assert trained == {f"word{a}" for a in range(40)} and scored == {"word40", "word41"}


def test_resume_refuses_another_machine_or_other_training_rows(tmp_path, tiny_model_with_tokenizer_dir):
    from sparseft.bench import run_grid
    from sparseft.bench.grid import machine_info, new_results, prepare_train_file

    cfg = parse_bench_config(tiny_raw(model=str(tiny_model_with_tokenizer_dir), max_length=512), base_dir=TINY.parent)
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_grid(cfg, tmp_path, resume=True)
    earlier = new_results(cfg, "cmd", cfg.model, 0, 0)
    earlier["machine"] = {**machine_info(cfg), "cpu_count": 512}
    write_results(earlier, tmp_path / "results.json")
    with pytest.raises(ConfigError, match="measured on another machine.*cpu_count 512"):
        run_grid(cfg, tmp_path, resume=True)

    train_file = tmp_path / "train.jsonl"
    prepare_train_file(cfg, cfg.model, train_file)
    written = train_file.read_bytes()
    prepare_train_file(cfg, cfg.model, train_file, keep_same=True)  # the same rows again: fine
    cfg.train_limit -= 1
    with pytest.raises(ConfigError, match="training rows differ"):
        prepare_train_file(cfg, cfg.model, train_file, keep_same=True)
    assert train_file.read_bytes() == written


def test_reselect_knobs_of_a_sparse_row_reach_its_train_config_and_unset_ones_stay_out_of_its_spec(tmp_path):
    from sparseft.bench.grid import worker_spec
    from sparseft.bench.worker import train_config

    runs = [{"id": "fixed", "method": "sparse", "scorer": "random", "lr": 1e-3},
            {"id": "moving", "method": "sparse", "scorer": "random", "lr": 1e-3, "reselect_every": 10,
             "reselect_fraction": 0.2, "reselect_growth_batches": 4}]
    cfg = parse_bench_config(tiny_raw(runs=runs), base_dir=TINY.parent)
    fixed, moving = (worker_spec(cfg, run, "tiny", tmp_path / "train.jsonl", tmp_path / run.id) for run in cfg.runs)
    # A row without re-selection has the spec it had before the knobs existed (so --resume keeps it).
    assert not any(key.startswith("reselect") for key in fixed["run"])
    assert not train_config(fixed, "cpu").reselecting
    moved = train_config(moving, "cpu")
    assert (moved.reselect_every, moved.reselect_fraction, moved.reselect_growth_batches) == (10, 0.2, 4)
    # and the report tells the rows apart
    from sparseft.bench.results import row_label

    assert row_label({"method": "sparse", "scorer": "random"}) == "sparse/random"
    assert row_label({"method": "sparse", "scorer": "random", "reselect_every": 10, "reselect_growth_batches": 1}) \
        == "sparse/random reselect/10"
    assert row_label({"method": "sparse", "scorer": "random", "reselect_every": 10, "reselect_growth_batches": 4}) \
        == "sparse/random reselect/10 growth×4"


def test_allocation_of_a_sparse_row_reaches_its_train_config_and_unset_it_stays_out_of_its_spec(tmp_path):
    from sparseft.bench.grid import worker_spec
    from sparseft.bench.results import row_label
    from sparseft.bench.worker import train_config

    runs = [{"id": "default", "method": "sparse", "scorer": "random", "lr": 1e-3},
            {"id": "global", "method": "sparse", "scorer": "random", "lr": 1e-3, "allocation": "global"}]
    cfg = parse_bench_config(tiny_raw(runs=runs), base_dir=TINY.parent)
    default, chosen = (worker_spec(cfg, run, "tiny", tmp_path / "train.jsonl", tmp_path / run.id) for run in cfg.runs)
    assert "allocation" not in default["run"]  # as before the knob existed: --resume keeps earlier rows
    assert train_config(default, "cpu").selection.allocation == "proportional"
    assert train_config(chosen, "cpu").selection.allocation == "global"
    assert row_label({"method": "sparse", "scorer": "fisher", "allocation": "global"}) == "sparse/fisher global"
    assert row_label({"method": "sparse", "scorer": "fisher", "allocation": "proportional"}) == "sparse/fisher"
    for run, message in [({"id": "f", "method": "full", "lr": 1e-3, "allocation": "global"},
                          "(f): allocation applies to sparse rows only"),
                         ({"id": "s", "method": "sparse", "scorer": "random", "lr": 1e-3, "allocation": "even"},
                          "(s): allocation must be one of ('global', 'proportional', 'per_module'), got 'even'"),
                         ({"id": "s", "method": "sparse", "scorer": "random", "lr": 1e-3, "allocation": "per_module",
                           "num_params": 100}, "(s): allocation='per_module' gives every module the same density and cannot hit an "
                          "exact num_params")]:
        with pytest.raises(ConfigError) as err:
            parse_bench_config(tiny_raw(runs=[run]), where="grid.yaml", base_dir=TINY.parent)
        assert message in str(err.value)


def test_warmup_ratio_of_any_training_row_reaches_its_train_config_and_unset_it_stays_out_of_its_spec(tmp_path):
    """Issue 15 searches warm-up per method: a row of any training method may set it; unset, its worker spec is
    as before the knob existed (--resume keeps earlier rows) and it trains without warm-up."""
    from sparseft.bench.grid import worker_spec
    from sparseft.bench.results import row_label
    from sparseft.bench.worker import train_config

    runs = [{"id": "plain", "method": "full", "lr": 1e-3},
            {"id": "warm", "method": "full", "lr": 1e-3, "warmup_ratio": 0.1},
            {"id": "warm-lora", "method": "lora", "lora_rank": 2, "lr": 1e-3, "warmup_ratio": 0.25}]
    cfg = parse_bench_config(tiny_raw(runs=runs), base_dir=TINY.parent)
    plain, warm, warm_lora = (worker_spec(cfg, run, "tiny", tmp_path / "train.jsonl", tmp_path / run.id)
                              for run in cfg.runs)
    assert "warmup_ratio" not in plain["run"]
    assert train_config(plain, "cpu").warmup_ratio == 0.0
    assert train_config(warm, "cpu").warmup_ratio == 0.1 and train_config(warm_lora, "cpu").warmup_ratio == 0.25
    assert row_label({"method": "full", "warmup_ratio": 0.1}) == "full, warm-up 10%"
    assert row_label({"method": "full", "warmup_ratio": 0.0}) == "full"
    for bad in (1, -0.1, "0.1", True, float("nan")):
        with pytest.raises(ConfigError) as err:
            parse_bench_config(tiny_raw(runs=[{"id": "w", "method": "full", "lr": 1e-3, "warmup_ratio": bad}]),
                               where="grid.yaml", base_dir=TINY.parent)
        assert "runs[0] (w): warmup_ratio must be a number in [0, 1)" in str(err.value)


def test_shipped_reselect_config_compares_growth_over_one_and_four_batches(tmp_path):
    (tmp_path / "sst2").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "sst2" / name).write_text("sentence\tlabel\ngood .\t1\n")
    cfg = load_bench_config(ROOT / "examples" / "bench" / "smollm2_sst2_reselect.yaml", data_root=str(tmp_path))
    rows = {(r.lr, r.reselect_every, r.reselect_growth_batches) for r in cfg.runs}
    assert rows == {(1e-3, None, None), (1e-3, 10, 1), (1e-3, 10, 4)}
    assert cfg.validation_task and cfg.seeds and all(r.method == "sparse" and r.scorer == "combined" for r in cfg.runs)


def test_base_weights_are_row_knobs_and_unset_ones_leave_the_worker_spec_as_it_was(tmp_path):
    from sparseft.bench.grid import worker_spec
    from sparseft.bench.results import row_label

    runs = [{"id": "sparse", "method": "sparse", "scorer": "random", "lr": 1e-2},
            {"id": "full-bf16", "method": "full", "lr": 1e-3, "dtype": "bfloat16"}]
    cfg = parse_bench_config(tiny_raw(runs=runs), base_dir=TINY.parent)
    plain, bf16 = (worker_spec(cfg, run, "m", tmp_path / "train.jsonl", tmp_path)["run"] for run in cfg.runs)
    assert "dtype" not in plain and "quantize" not in plain  # --resume still matches specs written before
    assert bf16["dtype"] == "bfloat16"
    assert row_label({"method": "sparse", "scorer": "combined", "quantize": "int8", "dtype": "float32"}) == \
        "sparse/combined (int8 base)"
    assert row_label({"method": "full", "dtype": "bfloat16"}) == "full (bfloat16 base)"
    assert row_label({"method": "sparse", "scorer": "random", "quantize": "int4", "dtype": "bfloat16"}) == \
        "sparse/random (int4 from bfloat16 base)"
    assert row_label({"method": "sparse", "scorer": "random"}) == "sparse/random"  # rows from before


def test_quantize_init_is_a_quantized_rows_knob_whose_zero_keeps_earlier_specs(tmp_path):
    """Rows over a quantized base ran with values starting at 0 before quantize_init existed: a row that
    says "zero" (or nothing: TrainConfig's default) keeps that worker spec (no key), so --resume still finds
    it; "correction" is named."""
    from sparseft.bench.grid import worker_spec
    from sparseft.bench.results import row_label
    from sparseft.bench.worker import train_config

    runs = [{"id": "zero", "method": "sparse", "scorer": "random", "lr": 1e-2, "quantize": "int8",
             "quantize_init": "zero"},
            {"id": "corr", "method": "sparse", "scorer": "random", "lr": 1e-2, "quantize": "int8",
             "quantize_init": "correction"},
            {"id": "unset", "method": "sparse", "scorer": "random", "lr": 1e-2, "quantize": "int8"},
            {"id": "plain", "method": "sparse", "scorer": "random", "lr": 1e-2}]
    cfg = parse_bench_config(tiny_raw(runs=runs), base_dir=TINY.parent)
    zero, corr, unset, plain = (worker_spec(cfg, run, "tiny", tmp_path / "train.jsonl", tmp_path) for run in cfg.runs)
    assert all("quantize_init" not in job["run"] for job in (zero, unset, plain))
    assert corr["run"]["quantize_init"] == "correction"
    assert [train_config(job, "cpu").quantize_init for job in (zero, corr, unset)] == ["zero", "correction", "zero"]
    assert row_label({"method": "sparse", "scorer": "combined", "quantize": "nf4", "quantize_init": "correction"}) == \
        "sparse/combined (nf4 base, values from its error)"
    assert row_label({"method": "sparse", "scorer": "combined", "quantize": "nf4", "quantize_init": "correction-after"}) \
        == "sparse/combined (nf4 base, its error added after)"
    for bad, message in ((dict(quantize_init="correction"), r"quantize_init applies to rows with quantize"),
                         (dict(quantize="int8", quantize_init="half"), r"quantize_init must be one of"),
                         (dict(quantize="int8", quantize_init="correction-after", reselect_every=5), "the entries move")):
        row = {"id": "bad", "method": "sparse", "scorer": "random", "lr": 1e-2, **bad}
        with pytest.raises(ConfigError, match=message):
            parse_bench_config(tiny_raw(runs=[row]), base_dir=TINY.parent)


def test_select_over_is_a_quantized_rows_knob_left_out_of_specs_when_unset(tmp_path):
    from sparseft.bench.grid import worker_spec
    from sparseft.bench.results import row_label
    from sparseft.bench.worker import train_config

    runs = [{"id": "over", "method": "sparse", "scorer": "fisher", "lr": 1e-2, "quantize": "nf4",
             "select_over": "quantized"},
            {"id": "unset", "method": "sparse", "scorer": "fisher", "lr": 1e-2, "quantize": "nf4"}]
    cfg = parse_bench_config(tiny_raw(runs=runs), base_dir=TINY.parent)
    over, unset = (worker_spec(cfg, run, "tiny", tmp_path / "train.jsonl", tmp_path) for run in cfg.runs)
    assert over["run"]["select_over"] == "quantized" and "select_over" not in unset["run"]  # --resume keeps old rows
    assert [train_config(job, "cpu").select_over for job in (over, unset)] == ["quantized", "full"]
    assert row_label({"method": "sparse", "scorer": "fisher", "quantize": "nf4", "select_over": "quantized"}) == \
        "sparse/fisher (nf4 base, chosen over it)"
    assert row_label({"method": "sparse", "scorer": "fisher", "quantize": "nf4", "select_over": "quantized",
                      "quantize_init": "correction"}) == \
        "sparse/fisher (nf4 base, values from its error, chosen over it)"
    for bad, message in ((dict(select_over="quantized"), r"select_over applies to rows with quantize"),
                         (dict(quantize="int8", select_over="codes"), r"select_over must be one of"),
                         (dict(quantize="int8", select_over="quantized", quantize_init="correction"),
                          r"needs the full-precision weights")):
        row = {"id": "bad", "method": "sparse", "scorer": "random", "lr": 1e-2, **bad}
        with pytest.raises(ConfigError, match=message):
            parse_bench_config(tiny_raw(runs=[row]), base_dir=TINY.parent)


def test_quantize_skip_is_a_quantized_rows_knob_left_out_of_specs_when_unset(tmp_path):
    from sparseft.bench.grid import worker_spec
    from sparseft.bench.results import row_label
    from sparseft.bench.worker import train_config

    runs = [{"id": "mixed", "method": "sparse", "scorer": "fisher", "lr": 1e-2, "quantize": "nf4",
             "quantize_skip": ["*.down_proj"]},
            {"id": "unset", "method": "sparse", "scorer": "fisher", "lr": 1e-2, "quantize": "nf4", "quantize_skip": []}]
    cfg = parse_bench_config(tiny_raw(runs=runs), base_dir=TINY.parent)
    mixed, unset = (worker_spec(cfg, run, "tiny", tmp_path / "train.jsonl", tmp_path) for run in cfg.runs)
    assert mixed["run"]["quantize_skip"] == ["*.down_proj"] and "quantize_skip" not in unset["run"]
    assert [train_config(job, "cpu").quantize_skip for job in (mixed, unset)] == [["*.down_proj"], []]
    assert row_label({"method": "sparse", "scorer": "fisher", "quantize": "nf4", "quantize_skip": ["*.down_proj"]}) \
        == "sparse/fisher (nf4 base, *.down_proj unquantized)"
    for bad, message in ((dict(quantize_skip=["*.down_proj"]), r"quantize_skip applies to rows with quantize"),
                         (dict(quantize="nf4", quantize_skip=[""]), r"quantize_skip must be a list of layer-name")):
        row = {"id": "bad", "method": "sparse", "scorer": "random", "lr": 1e-2, **bad}
        with pytest.raises(ConfigError, match=message):
            parse_bench_config(tiny_raw(runs=[row]), base_dir=TINY.parent)


@pytest.mark.slow
def test_an_int8_row_trains_and_is_scored_over_the_int8_base(tmp_path):
    pytest.importorskip("torchao")
    from sparseft import SparseModel
    from sparseft.bench import run_grid
    from sparseft.errors import FingerprintMismatchError
    from sparseft.evaluate import evaluate_records_detailed
    from sparseft.loading import load_model, load_tokenizer
    from sparseft.quantize import quantize_base
    from sparseft.tasks import get_task

    runs = [{"id": "sparse-fp32", "method": "sparse", "scorer": "random", "lr": 1e-2},
            {"id": "sparse-int8", "method": "sparse", "scorer": "random", "lr": 1e-2, "quantize": "int8"}]
    cfg = parse_bench_config(tiny_raw(runs=runs, eval_base=False, steps=3), base_dir=TINY.parent)
    out = tmp_path / "bench"
    rows = {r["id"]: r for r in run_grid(cfg, out, plots=False)["rows"]}
    assert [r["status"] for r in rows.values()] == ["ok", "ok"], {k: r["error"] for k, r in rows.items()}
    fp32, int8 = rows["sparse-fp32"], rows["sparse-int8"]
    assert (fp32["quantize"], fp32["dtype"]) == (None, "float32")
    assert (int8["quantize"], int8["dtype"]) == ("int8", "float32")
    assert "| sparse-int8 | sparse/random (int8 base) |" in (out / "results.md").read_text()
    assert int8["quantize_init"] == "zero" and fp32["quantize_init"] is None
    assert 0.25 < int8["base_bytes_vs_fp32"] < 0.9  # int8 codes + scales, the rest fp32
    assert "base_bytes_vs_fp32" not in fp32
    assert "| sparse-fp32 | sparse/random |" in (out / "results.md").read_text()

    # The int8 row's diff belongs to the int8 base: the fp32 base refuses it, so the worker cannot
    # have scored it over that one; over the int8 base (unmerged) it scores exactly what the row says.
    base_dir = out / "tiny-model"
    with pytest.raises(FingerprintMismatchError):
        SparseModel.from_pretrained(load_model(base_dir), int8["artifact_path"])
    model = SparseModel.from_pretrained(quantize_base(load_model(base_dir), "int8"), int8["artifact_path"])
    task = get_task(cfg.evaluated_task)
    metrics, per_example, _, _ = evaluate_records_detailed(
        model, load_tokenizer(base_dir), task, task.load(cfg.eval_data, cfg.eval_limit), progress=False)
    assert int8["metrics"] == {k: float(v) for k, v in metrics.items()}
    metric = int8["primary_metric"]
    assert int8["per_example"][metric] == [round(x, 6) for x in per_example[metric]]


def test_shipped_quantized_base_config_parses(tmp_path):
    pytest.importorskip("torchao")
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "sst2").mkdir(exist_ok=True)
        (tmp_path / "sst2" / name).write_text("sentence\tlabel\ngood .\t1\n")
    cfg = load_bench_config(ROOT / "examples" / "bench" / "smollm2_sst2_quant.yaml", data_root=str(tmp_path))
    protocol = load_bench_config(ROOT / "examples" / "bench" / "smollm2_sst2_protocol.yaml", data_root=str(tmp_path))
    bases = [(None, None), ("bfloat16", None), (None, "int8"), (None, "int4"), ("bfloat16", "nf4")]
    assert [(r.dtype, r.quantize, r.seed) for r in cfg.runs[:5]] == [(*base, None) for base in bases]
    # Then seeds 1 and 2 of the fp32, bf16 and bf16+nf4 bases, and nf4 over the fp32 rest with 3 seeds.
    seeded = [(None, None), ("bfloat16", None), ("bfloat16", "nf4")]
    assert [(r.dtype, r.quantize, r.seed) for r in cfg.runs[5:14]] == (
        [(*base, seed) for base in seeded for seed in (1, 2)] + [(None, "nf4", seed) for seed in (None, 1, 2)])
    # Those ran with values starting at 0; then both 4-bit bases again, values starting at the error.
    assert {r.quantize_init for r in cfg.runs[:14] if r.quantize} == {"zero"}
    assert [(r.dtype, r.quantize, r.quantize_init, r.seed) for r in cfg.runs[14:20]] == [
        (dtype, "nf4", "correction", seed) for dtype in (None, "bfloat16") for seed in (None, 1, 2)]
    # Then both again with the entries chosen over the quantized base.
    assert [(r.dtype, r.quantize, r.select_over, r.quantize_init, r.seed) for r in cfg.runs[20:26]] == [
        (dtype, "nf4", "quantized", None, seed) for dtype in (None, "bfloat16") for seed in (None, 1, 2)]
    # Then bf16+nf4 with the error added once trained.
    assert [(r.dtype, r.quantize, r.quantize_init, r.seed) for r in cfg.runs[26:29]] == [
        ("bfloat16", "nf4", "correction-after", seed) for seed in (None, 1, 2)]
    # Then GGUF's own Q4_1 blocks over the fp32 rest, the fp32 rows' seeds.
    assert [(r.dtype, r.quantize, r.quantize_init, r.seed) for r in cfg.runs[29:]] == [
        (None, "q4_1", "zero", seed) for seed in (None, 1, 2)]
    # One recipe, that of the protocol's sparse-combined row at lr 1e-3; only the base differs.
    (combined,) = [r for r in protocol.runs if r.id == "sparse-combined-lr0.001"]
    recipe = lambda r: (r.method, r.scorer, r.lr, r.density, r.num_params, r.calibration_batches)  # noqa: E731
    assert {recipe(r) for r in cfg.runs} == {recipe(combined)}
    shared = ("model", "task", "train_data", "train_limit", "steps", "batch_size", "grad_accum", "max_length",
              "seed", "density", "target_modules", "eval_task", "eval_data", "eval_limit")
    assert {k: getattr(cfg, k) for k in shared} == {k: getattr(protocol, k) for k in shared}
    assert cfg.eval_base


def test_shipped_real_config_parses(tmp_path):
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "sst2").mkdir(exist_ok=True)
        (tmp_path / "sst2" / name).write_text("sentence\tlabel\ngood .\t1\n")
    cfg = load_bench_config(ROOT / "examples" / "bench" / "smollm2_sst2.yaml", data_root=str(tmp_path))
    methods = [r.method for r in cfg.runs]
    assert {"full", "lora", "sparse"} <= set(methods)
    assert {"random", "fisher", "combined"} <= {r.scorer for r in cfg.runs if r.method == "sparse"}


def test_every_shipped_bench_config_loads(tmp_path):
    # Each file a config names under ${SPARSEFT_DATA} exists (content is read only when a grid runs).
    for name in ("sst2/train.tsv", "sst2/dev.tsv", "samsum/validation.jsonl", "samsum/test.jsonl", "squad/dev-v1.1.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x\n")
    configs = sorted((ROOT / "examples" / "bench").glob("*.yaml"))
    assert len(configs) >= 20
    for path in configs:
        assert load_bench_config(path, data_root=str(tmp_path)).runs, path


def test_tiny_tokenizer_keeps_task_words_distinct():
    tok = text_tokenizer(["Review: a good film .", "positive", "negative"])
    ids = tok("positive negative good", add_special_tokens=False)["input_ids"]
    assert len(set(ids)) == 3 and tok.unk_token_id not in ids
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


# ---------------------------------------------------------------- the report's numbers


def synthetic_results() -> dict:
    """Hand-made rows with round numbers, so every figure of the report can be checked by hand."""

    def row(id, method, acc, **kw):
        base = {
            "id": id, "method": method, "status": "ok", "error": None, "metrics": {"accuracy": acc},
            "primary_metric": "accuracy", "eval_examples": 100, "eval_wall_s": 1.0, "total_params": 1_000_000,
            "trainable_params": 0, "trainable_pct": 0.0, "seed": 0, "device": "cpu", "versions": {"torch": "x"},
            "row_wall_s": 1.0,
        }
        if method != "base":
            base.update({
                "scorer": None, "density": None, "lora_rank": None, "lr": 1e-3, "steps": 10, "batch_size": 8,
                "max_length": 64, "train_examples": 80, "train_wall_s": 100.0, "median_step_s": 1.0,
                "tokens_per_s": 500.0, "final_loss": 0.1, "first_loss": 1.0, "peak_memory_bytes": 4_000_000_000,
                "peak_memory_kind": "peak_rss", "optimizer_state_bytes": 8, "artifact_kind": "diff",
                "artifact_bytes": 4_000, "artifact_path": "x",
            })
        base.update(kw)
        return base

    rows = [
        row("base", "base", 0.60),
        row("full", "full", 0.90, trainable_params=1_000_000, trainable_pct=100.0, artifact_kind="checkpoint",
            artifact_bytes=4_000_000, median_step_s=2.0, peak_memory_bytes=5_000_000_000),
        row("lora", "lora", 0.84, trainable_params=5_000, trainable_pct=0.5, lora_rank=2, artifact_kind="adapter",
            artifact_bytes=25_000, peak_memory_bytes=4_500_000_000),
        row("sp-fisher", "sparse", 0.87, scorer="fisher", density=0.005, trainable_params=5_000, trainable_pct=0.5,
            artifact_bytes=20_000),
        row("sp-random", "sparse", 0.80, scorer="random", density=0.005, trainable_params=5_000, trainable_pct=0.5,
            artifact_bytes=20_000, peak_memory_bytes=4_600_000_000),
        {**row("sp-bad", "sparse", 0.0), "status": "failed", "error": "Traceback...\nValueError: boom", "metrics": None},
    ]
    return {
        "schema_version": 1, "name": "synthetic", "config": {"steps": 10}, "command": "by hand",
        "machine": {"device": "cpu"}, "model": {"name": "m", "total_params": 1_000_000},
        "task": {"name": "sst2", "primary_metric": "accuracy"}, "started_at": "t0", "finished_at": "t1", "rows": rows,
    }


def test_report_figures_are_computed_from_the_rows_they_cite(tmp_path):
    results = synthetic_results()
    path = write_results(results, tmp_path / "results.json")
    text = render_markdown(build_report(results, path, tmp_path / "report.md"))
    # Best sparse row (fisher): 87.0 vs full 90.0 → -3.0 points; keeps (0.87-0.60)/(0.90-0.60) = 90% of the gain.
    assert "scores 87.0 accuracy vs 90.0 for full fine-tuning (-3.0 points)" in text
    assert "keeps 90% of full FT's gain" in text and "[row `sp-fisher`, row `full`, row `base`]" in text
    assert "+3.0 points from it [row `sp-fisher`, row `lora`]" in text
    # Targets: fisher beats LoRA (met), is 3 points from full (not met), uses less memory and bytes (met);
    # random is below LoRA and uses more memory than LoRA.
    fisher_line = next(line for line in text.splitlines() if line.startswith("| `sp-fisher` vs"))
    assert fisher_line.count("**not met**") == 1 and "-3.0 points" in fisher_line
    random_line = next(line for line in text.splitlines() if line.startswith("| `sp-random` vs"))
    assert "**not met** (80.0 vs 84.0)" in random_line and "**not met** (4.6 GB vs 4.5 GB)" in random_line
    assert "met (20,000 B vs 25,000 B)" in random_line
    # Storage for 1,000 tenants: base 4 MB + 1000 × 20 KB = 24 MB; full copies 1000 × 4 MB = 4 GB.
    assert "| 1,000 | 24.0 MB | 29.0 MB | 4.0 GB |" in text
    assert "`sp-bad` (ValueError: boom)" in text
    assert "<strong>Quality.</strong>" in render_html(build_report(results, path, tmp_path / "report.md"))


def table_cell(text: str, header_start: str, row_start: str, column: str) -> str:
    """The cell of ``column`` in the row starting with ``row_start`` of the table whose header starts so."""
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith(header_start))
    row = next(line for line in lines[lines.index(header):] if line.startswith(row_start))
    return row.split(" | ")[header.split(" | ").index(column)]


def test_selection_share_of_the_training_wall_is_shown_and_older_rows_without_it_render(tmp_path):
    results = synthetic_results()  # its rows predate selection_wall_s, like results.json files written before it
    rows = {r["id"]: r for r in results["rows"]}
    rows["sp-fisher"]["selection_wall_s"] = 25.0  # of train_wall_s 100.0
    rows["lora"]["selection_wall_s"] = None  # a row that chose no entries
    path = write_results(results, tmp_path / "results.json")
    assert schema_problems(read_results(path), require_complete=True) == []

    report = render_markdown(build_report(read_results(path), path, tmp_path / "report.md"))
    cell = lambda row_id: table_cell(report, "| row | method |", f"| `{row_id}` |", "selection s (% of wall)")  # noqa: E731
    assert cell("sp-fisher") == "25.0 (25%)"
    assert cell("lora") == cell("sp-random") == cell("base") == "–"

    table = results_table(read_results(path))
    cell = lambda row_id: table_cell(table, "| row |", f"| {row_id} |", "selection s (% of train)")  # noqa: E731
    assert cell("sp-fisher") == "25.0 (25%)" and cell("sp-random") == cell("full") == "–"


def protocol_results() -> dict:
    """A protocol test stage by hand: sparse's luckiest seed beats every other row, but its seed mean is below
    LoRA's and more than a point below full FT's."""
    results = synthetic_results()
    template = {r["method"]: r for r in results["rows"] if r["method"] in ("full", "lora") or r["id"] == "sp-fisher"}
    seeded = {"full": (0.88, 0.90, 0.86), "lora": (0.84, 0.84, 0.84), "sparse": (0.80, 0.91, 0.80)}
    steps = {"full": (2.0, 2.2, 1.8), "lora": (1.0, 1.1, 0.9), "sparse": (1.0, 5.0, 1.2)}  # seed 0, 0, 2: median step
    rows = [results["rows"][0]]
    for method, accs in seeded.items():
        for seed, acc in enumerate(accs):
            right = round(acc * 100)
            rows.append({**template[method], "id": f"{method}-s{seed}", "seed": seed, "metrics": {"accuracy": acc},
                         "median_step_s": steps[method][seed],
                         "per_example": {"accuracy": [1.0] * right + [0.0] * (100 - right)}})
    results["rows"] = rows
    results["protocol"] = {"stage": "test", "seeds": [0, 1, 2], "validation_results": "v/results.json",
                           "chosen_on_validation": {m: {"row": m, "value": 0.9} for m in seeded}}
    results["protocol"]["summary"] = summarize(results)
    return results


def test_protocol_report_judges_quality_on_seed_means_not_the_best_seed(tmp_path):
    results = protocol_results()
    path = write_results(results, tmp_path / "results.json")
    text = render_markdown(build_report(results, path, tmp_path / "report.md"))
    # Means: sparse (0.80 + 0.91 + 0.80) / 3 = 83.67, full 88.00 ± 2.00, LoRA 84.00 ± 0.00.
    assert "scores 83.67 ± 6.35 accuracy (mean ± std, 3 seeds) vs 88.00 ± 2.00 (mean ± std, 3 seeds) for full " \
           "fine-tuning: -4.33 points, 95% paired bootstrap interval [" in text
    assert "sparse minus LoRA: -0.33 points, 95% paired bootstrap interval [" in text
    assert "91.0" not in text.split("## Side by side")[0]  # the lucky seed is not the headline
    # Costs come from one named row per method, the seed of median step time: full 2.0 (seed 0), sparse 1.2 (seed 2).
    assert "Median step 1.20 s vs 2.00 s for full FT" in text and "[row `sparse-s2`, row `full-s0`]" in text
    targets = next(line for line in text.splitlines() if line.startswith("| sparse mean of"))
    assert targets.count("**not met**") == 2 and "**not met** (83.67 vs 84.00: -0.33 points" in targets
    assert "**not met** (-4.33 points" in targets and "met (20,000 B vs 25,000 B" in targets
    assert "seeds [0, 1, 2] (one row per method and seed)" in text
    # The same rows without the protocol summary: the old best-row report, which the lucky seed wins.
    del results["protocol"]
    plain = render_markdown(build_report(results, path, tmp_path / "report.md"))
    assert "scores 91.0 accuracy vs 90.0 for full fine-tuning (+1.0 points)" in plain


def side_by_side_line(text: str, row_id: str) -> list[str]:
    section = text.split("## Side by side")[1]
    return next(line for line in section.splitlines() if line.startswith(f"| `{row_id}` |")).split(" | ")


def test_protocol_side_by_side_compares_rows_with_full_fts_seed_mean(tmp_path):
    results = protocol_results()
    path = write_results(results, tmp_path / "results.json")
    text = render_markdown(build_report(results, path, tmp_path / "report.md"))
    header = next(line for line in text.split("## Side by side")[1].splitlines() if line.startswith("| row |"))
    assert header.split(" | ")[5] == "vs full FT mean"
    # The lucky sparse seed (91.0) against full FT's mean 88.00, not its best seed 90.0; a full seed against it too.
    assert side_by_side_line(text, "sparse-s1")[5] == "+3.0 points" and side_by_side_line(text, "full-s1")[5] == "+2.0 points"
    assert ("\"vs full FT mean\" compares each row with full FT's mean over its 3 seeds (88.00; rows `full-s0`, "
            "`full-s1`, `full-s2`), not with its best seed.") in text
    # The protocol note no longer claims every other figure is a single seed.
    assert "single seeds." not in text and "Bottom line and targets) uses its mean over seeds" in text

    del results["protocol"]  # a plain grid: the best full FT row, as before
    plain = render_markdown(build_report(results, path, tmp_path / "report.md"))
    assert side_by_side_line(plain, "sparse-s1")[5] == "+1.0 points" and "vs full FT mean" not in plain


def test_report_refuses_an_out_that_is_its_results_a_directory_or_empty(tmp_path, capsys):
    # --out RESULTS.json had replaced the measurements with the Markdown page.
    path = write_results(synthetic_results(), tmp_path / "results.json")
    before = path.read_bytes()
    cases = [(str(path), f"--out {path}: is {path}, an input of this command"),
             (str(tmp_path), f"--out {tmp_path}: is a directory; expected a file path (e.g. {tmp_path / 'report.md'})"),
             (str(path / "report.md"), f"--out {path / 'report.md'}: cannot be created, {path} is a file"),
             ("", "--out is empty ('')")]
    for out, message in cases:
        assert main(["report", str(path), "--out", out]) == 2
        assert message in capsys.readouterr().err
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_write_report_refuses_its_own_results_or_a_directory_as_a_page(tmp_path):
    # The check was the CLI's alone: a library call write_report(p, p) replaced the measurements.
    from sparseft.bench import write_report

    path = write_results(synthetic_results(), tmp_path / "results.json")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="an input of this command"):
        write_report(path, path)
    (tmp_path / "page.html").mkdir()
    with pytest.raises(ConfigError, match=f"--out {tmp_path / 'page.html'}: is a directory"):
        write_report(path, tmp_path / "page.md", html_page=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "results.json"]


def test_report_names_rows_the_grid_never_reached(tmp_path):
    results = synthetic_results()
    results["config"]["runs"] = [{"id": r["id"]} for r in results["rows"][1:]] + [{"id": "sp-late"}]
    results["finished_at"] = None
    path = write_results(results, tmp_path / "results.json")
    text = render_markdown(build_report(results, path, tmp_path / "report.md"))
    assert "no result (the grid was stopped, or is still running): `sp-late`." in text


def test_report_warns_when_rows_ran_under_different_load(tmp_path):
    results = synthetic_results()
    for row, load in zip(results["rows"][1:5], (1.0, 1.2, 6.0, 1.1)):
        row["load_average"] = {"start": load, "end": load}
    path = write_results(results, tmp_path / "results.json")
    text = render_markdown(build_report(results, path, tmp_path / "report.md"))
    assert "**Caution:** the machine's load average differed between rows" in text and "`sp-fisher` 6.0" in text
    for row in results["rows"][1:5]:
        row["load_average"] = {"start": 2.0, "end": 2.0}
    assert "Caution" not in render_markdown(build_report(results, path, tmp_path / "report.md"))


def test_pick_rows_ignores_failed_rows():
    picked = pick_rows(synthetic_results())
    assert picked.best_sparse()["id"] == "sp-fisher"
    assert [r["id"] for r in picked.failed] == ["sp-bad"]


def test_sweep_rows_are_compared_with_the_best_lora_and_full_rows():
    results = synthetic_results()
    weak = [dict(r) for r in results["rows"] if r["method"] in ("lora", "full")]
    for r in weak:
        r["id"], r["metrics"] = r["id"] + "-weak-lr", {"accuracy": 0.70}
    results["rows"] = weak + results["rows"]  # the weaker guesses come first, as in a sweep file
    picked = pick_rows(results)
    assert picked.full["id"] == "full"
    assert picked.lora_match(picked.best_sparse())["id"] == "lora"


def test_report_cli_writes_markdown_and_html(tmp_path, capsys):
    path = write_results(synthetic_results(), tmp_path / "results.json")
    assert main(["report", str(path), "--html"]) == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()
    assert (tmp_path / "plots" / "storage_tenants.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("flags", [["--html"], []])
def test_report_refuses_an_html_out_as_the_markdown_page_goes_there(tmp_path, capsys, flags):
    # Was: --out page.html wrote Markdown into page.html; with --html the HTML page then overwrote it.
    path = write_results(synthetic_results(), tmp_path / "results.json")
    out = tmp_path / "page.html"
    assert main(["report", str(path), "--out", str(out), *flags]) == 2
    assert f"--out {out}: --out takes the Markdown page; give a .md path, e.g. --out {tmp_path / 'page.md'}" in (
        capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == [path]
    assert main(["report", str(path), "--out", str(tmp_path / "page.md"), *flags]) == 0
    assert (tmp_path / "page.md").read_text().startswith("#")
    assert (tmp_path / "page.html").is_file() == bool(flags)


def test_report_rejects_a_broken_results_file(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    assert main(["report", str(bad)]) == 2
    assert "results.json: not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"rows": [{"id": "x"}]}))
    with pytest.raises(ResultsFormatError, match="missing top-level field 'config'"):
        read_results(bad)
    assert not (tmp_path / "report.md").exists()


def test_schema_check_finds_a_null_field():
    results = synthetic_results()
    results["rows"][2]["median_step_s"] = None
    assert schema_problems(results) == ["rows[2] (lora): field 'median_step_s' is null"]


def test_build_llama_is_seeded_and_refuses_an_unknown_shape():
    from sparseft.bench.shapes import build_llama

    a, b, c = build_llama("tiny", seed=0), build_llama("tiny", seed=0), build_llama("tiny", seed=1)
    assert a.config.hidden_size == 32 and a.config.vocab_size == 128 and not a.training
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])
    with pytest.raises(ConfigError, match="'huge'.*tiny"):
        build_llama("huge")


def test_select_cost_times_each_phase_of_select_and_leaves_select_as_it_was():
    from conftest import make_tiny_llama
    from sparseft import SparseConfig, select
    from sparseft.bench.select_cost import timed_select
    from sparseft.selection import gradstats, scorers, selector

    originals = (selector.accumulate_gradients, selector.get_scorer, selector.make_allocator,
                 gradstats.StatSum.add, gradstats.StatSum.value, scorers.quantile_normalise, scorers.top_quantiles)
    model = make_tiny_llama()
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (2, 10), generator=gen) for _ in range(2)]
    batches = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]
    cfg = SparseConfig(density=0.05, scorer="combined", calibration_batches=2)
    masks, cost = timed_select(model, cfg, batches)
    wall = {phase: c["wall_s"] for phase, c in cost["phases"].items()}
    assert all(wall[p] > 0 for p in ("passes", "hooks", "scoring", "quantiles", "allocation")), wall
    assert wall["hooks"] < wall["passes"] and wall["quantiles"] < wall["scoring"]
    assert wall["passes"] + wall["unpack"] + wall["scoring"] + wall["allocation"] <= cost["wall_s"]
    assert (selector.accumulate_gradients, selector.get_scorer, selector.make_allocator, gradstats.StatSum.add,
            gradstats.StatSum.value, scorers.quantile_normalise, scorers.top_quantiles) == originals
    plain = select(model, cfg, batches)
    assert all(torch.equal(masks[n], plain[n]) for n in plain)


def test_a_kept_rows_eval_data_matches_by_content_or_by_normalized_path():
    from sparseft.bench.grid import same_job

    spec = {"run": {"id": "a", "lr": 1e-3}, "eval_data": "/data/sst2/dev.tsv", "eval_data_sha256": "aa", "row_dir": "x"}
    assert same_job(spec, {**spec, "eval_data": "/mnt/other-root/sst2/dev.tsv", "row_dir": "y"})  # same data elsewhere
    assert not same_job(spec, {**spec, "eval_data_sha256": "bb"})  # a changed file at the same path
    assert not same_job(spec, {**spec, "run": {"id": "a", "lr": 3e-3}})
    written_before_hashes = {k: v for k, v in spec.items() if k != "eval_data_sha256"}
    assert same_job({**written_before_hashes, "eval_data": "/data/main/../sst2/dev.tsv"}, spec)
    assert not same_job(written_before_hashes, {**spec, "eval_data": "/elsewhere/sst2/dev.tsv"})
