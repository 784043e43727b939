import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama
from sparseft import SparseConfig, get_sparse_model
from sparseft.cli import VERBS, build_parser, main
from sparseft.config import DTYPES
from sparseft.diffio import read_diff
from sparseft.errors import ConfigError
from sparseft.loading import resolve_dtype
from test_bench import TINY  # the tiny grid config, found from any working directory


def test_help_for_every_verb(capsys):
    for verb in VERBS:
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0
        assert verb in capsys.readouterr().out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "sparseft", "--help"], capture_output=True, text=True, check=True)
    assert "inspect" in out.stdout and "apply" in out.stdout


@pytest.fixture
def trained_diff(tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_sparse_model(base, SparseConfig(density=0.05, value_dtype="float32"))
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.normal_(0, 0.1)
    return model, model.save_pretrained(tmp_path / "diff", provenance={"note": "unit test"})


def test_inspect_json_reports_modules_and_size(trained_diff, capsys):
    model, path = trained_diff
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_entries"] == model.num_trainable()
    assert len(report["modules"]) == 14
    assert report["provenance"]["note"] == "unit test"
    assert report["bytes_per_entry"] > 0
    assert main(["inspect", str(path)]) == 0
    assert "bytes/entry" in capsys.readouterr().out


def test_apply_writes_merged_model(trained_diff, tiny_model_dir, tmp_path):
    model, path = trained_diff
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert main(["apply", "--model", str(tiny_model_dir), "--diff", str(path), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_outputs_replace_only_what_sparseft_wrote(trained_diff, tiny_model_dir, tmp_path, capsys):
    """An output directory is replaced whole, so the base model's own directory, a data file or a folder of the
    user's never is; an earlier output of the same kind is (a merged model records what it was made from)."""
    _, path = trained_diff
    merged = tmp_path / "merged"
    assert main(["apply", "--model", str(tiny_model_dir), "--diff", str(path), "--out", str(merged)]) == 0
    record = json.loads((merged / "sparseft_merge.json").read_text())
    assert record["base_model"] == str(tiny_model_dir) and record["diff"] == str(path)
    assert main(["apply", "--model", str(tiny_model_dir), "--diff", str(path), "--out", str(merged)]) == 0

    before = sorted(p.name for p in tiny_model_dir.iterdir())
    assert main(["apply", "--model", str(tiny_model_dir), "--diff", str(path), "--out", str(tiny_model_dir)]) == 2
    assert "holds files sparseft did not write (config.json" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    assert main(["compose", str(path), str(path), "--out", str(data)]) == 2
    assert f"--out {data}: is a file; expected a directory" in capsys.readouterr().err
    assert main(["export", "--to", "peft", str(path), str(data / "sub")]) == 2
    assert f"OUT {data / 'sub'}: cannot be created, {data} is a file" in capsys.readouterr().err
    assert main(["select", "--model", str(tiny_model_dir), "--scorer", "random", "--out", str(tmp_path)]) == 2
    assert "is a directory; expected a file path" in capsys.readouterr().err
    assert data.read_text() == "{}\n"


def test_a_command_that_adds_files_to_a_directory_refuses_a_diff_or_a_model(trained_diff, tiny_model_dir, capsys):
    # bench --out, serve --registry, audit --out and demo --out add their files to the directory given; a diff or a
    # model given there had kept working but held files not its own (a Hub upload of it carried them).
    _, diff = trained_diff
    before = {d: sorted(p.name for p in d.iterdir()) for d in (diff, tiny_model_dir)}
    cases = [(["bench", str(TINY), "--out", str(diff)], f"--out {diff}: holds sparse_config.json"),
             (["serve", "--model", str(tiny_model_dir), "--registry", str(tiny_model_dir)],
              f"--registry {tiny_model_dir}: holds config.json"),
             (["audit", "--model", str(tiny_model_dir), "--diff", str(diff), "--out", str(diff)],
              f"--out {diff}: holds sparse_config.json"),
             (["demo", "--model", str(tiny_model_dir), "--out", str(tiny_model_dir)],
              f"--out {tiny_model_dir}: holds config.json")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert {d: sorted(p.name for p in d.iterdir()) for d in (diff, tiny_model_dir)} == before


def test_apply_over_its_own_diff_or_base_is_refused_and_keeps_them(trained_diff, tiny_model_dir, tmp_path, capsys):
    # A diff directory, or a model apply merged earlier, holds marker files that let it pass as an earlier output.
    _, path = trained_diff
    assert main(["apply", "--model", str(tiny_model_dir), "--diff", str(path), "--out", str(path)]) == 2
    assert f"--out {path}: is {path}, an input of this command" in capsys.readouterr().err
    assert read_diff(path).num_entries > 0 and not (path / "config.json").exists()

    merged = tmp_path / "merged"
    assert main(["apply", "--model", str(tiny_model_dir), "--diff", str(path), "--out", str(merged)]) == 0
    before = (merged / "model.safetensors").read_bytes()
    assert main(["apply", "--model", str(merged), "--diff", str(path), "--out", str(merged)]) == 2
    assert "an input of this command" in capsys.readouterr().err
    assert (merged / "model.safetensors").read_bytes() == before

    run_dir = path.parent / "run"  # an earlier output (metrics.jsonl marks it) that now holds the diff
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    path.rename(run_dir / "diff")
    assert main(["apply", "--model", str(tiny_model_dir), "--diff", str(run_dir / "diff"), "--out", str(run_dir)]) == 2
    assert f"--out {run_dir}: holds {run_dir / 'diff'}" in capsys.readouterr().err
    assert read_diff(run_dir / "diff").num_entries > 0


def test_compose_and_select_refuse_to_write_over_their_inputs(trained_diff, tiny_model_dir, tmp_path, capsys):
    # compose A B --out A replaced A with the sum; select --out DATA replaced the data file with masks.
    _, path = trained_diff
    before = read_diff(path)
    assert main(["compose", str(path), str(path), "--out", str(path), "--allow-unverified-base"]) == 2
    assert f"--out {path}: is {path}, an input of this command" in capsys.readouterr().err
    assert read_diff(path).values.keys() == before.values.keys()
    assert all(torch.equal(read_diff(path).values[n], v) for n, v in before.values.items())

    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["select", "--model", str(tiny_model_dir), "--scorer", "random", "--data", str(data),
                 "--out", str(data)]) == 2
    assert f"--out {data}: is {data}, an input of this command" in capsys.readouterr().err
    assert data.read_text() == '{"prompt": "a", "completion": "b"}\n'


def test_select_names_missing_calibration_data_before_loading_the_model(tmp_path, capsys):
    missing = tmp_path / "no-such.jsonl"
    assert main(["select", "--model", str(tmp_path / "no-model"), "--scorer", "fisher", "--data", str(missing),
                 "--out", str(tmp_path / "masks.safetensors")]) == 2
    assert f"--data {missing}: no such data file" in capsys.readouterr().err


def test_an_empty_out_or_diff_path_is_refused_not_taken_as_the_working_directory(
        trained_diff, tiny_model_dir, tmp_path, monkeypatch, capsys):
    # Path("") is "."; an unset shell variable (--out "$OUT") had an empty working directory replaced whole.
    _, path = trained_diff
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    assert main(["apply", "--model", str(tiny_model_dir), "--diff", str(path), "--out", ""]) == 2
    assert "--out is empty ('')" in capsys.readouterr().err
    assert main(["export", "--to", "peft", str(path), ""]) == 2
    assert "OUT is empty ('')" in capsys.readouterr().err
    assert main(["select", "--model", str(tiny_model_dir), "--scorer", "random", "--out", ""]) == 2
    assert "--out is empty ('')" in capsys.readouterr().err
    assert list(workdir.iterdir()) == []
    for argv in (["inspect", ""], ["verify", "--diff", ""], ["diff-stats", str(path), ""]):
        assert main(argv) == 2
        assert "the diff path is empty ('')" in capsys.readouterr().err


def test_an_empty_input_path_is_refused_naming_its_flag(trained_diff, tmp_path, capsys):
    # Path("") is "."; an unset shell variable gave ". : no such data file" (eval --data), ". : results file not
    # found" (report), ". : ... got no extension" (inspect --plot), and audit --probe / --repro-data fell back
    # to the shipped probes / the recorded data without a word. The model does not exist: none may load.
    _, diff = trained_diff
    model = str(tmp_path / "no-such-model")
    cases = [(["eval", "--model", model, "--task", "routing", "--data", ""], "--data is empty ('')"),
             (["audit", "--model", model, "--diff", str(diff), "--probe", ""], "--probe is empty ('')"),
             (["audit", "--model", model, "--diff", str(diff), "--repro-data", ""], "--repro-data is empty ('')"),
             (["report", ""], "RESULTS.json is empty ('')")]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(diff), "--plot", ""])
    assert exit_info.value.code == 2
    assert "argument --plot: the heat map path is empty ('')" in capsys.readouterr().err


def test_a_missing_diff_is_bad_input_named_before_the_model_loads(tmp_path, capsys):
    # Was: eval, serve and apply loaded the base and only then named the missing diff; verify printed
    # 'FAIL config' and exited 1, as for a diff that fails a check. The model does not exist: had it been
    # loaded first, the error would name it instead.
    model, missing, data = str(tmp_path / "no-such-model"), tmp_path / "no-such-diff", tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a b", "label": "x"}) + "\n")
    for argv in (["eval", "--task", "classification", "--data", str(data), "--diff", str(missing)],
                 ["verify", "--diff", str(missing)],
                 ["serve", "--diff", f"a={missing}"],
                 ["apply", "--diff", str(missing), "--out", str(tmp_path / "merged")]):
        assert main(argv + ["--model", model]) == 2
        assert f"--diff {missing}: no such diff directory" in capsys.readouterr().err
    assert main(["audit", "--diff", str(missing), "--model", model, "--out", str(tmp_path / "audit")]) == 2
    assert f"--diff {missing}: no such diff directory" in capsys.readouterr().err
    for argv in (["inspect", str(missing)], ["export", "--to", "peft", str(missing), str(tmp_path / "adapter")]):
        assert main(argv) == 2  # a positional diff: its path is named
        assert f"error: {missing}: no such diff directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # nothing written
    not_a_diff = tmp_path / "empty"  # a directory, but neither a diff nor an adapter
    not_a_diff.mkdir()
    assert main(["eval", "--model", model, "--task", "classification", "--data", str(data),
                 "--diff", str(not_a_diff)]) == 2
    assert f"{not_a_diff}: not a sparse diff" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_apply_refuses_other_base_with_clear_error(trained_diff, tmp_path, capsys):
    _, path = trained_diff
    other = tmp_path / "other-base"
    make_tiny_llama(seed=3).save_pretrained(other)
    assert main(["apply", "--model", str(other), "--diff", str(path), "--out", str(tmp_path / "m")]) == 2
    assert "different base" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_unknown_model_is_named(tmp_path, capsys):
    assert main(["apply", "--model", str(tmp_path / "nope"), "--diff", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["apply", "audit", "eval", "select", "serve", "train", "verify"])
def test_unknown_dtype_is_a_usage_error(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--dtype", "float64", "--help"])
    assert exit_info.value.code == 2
    assert "--dtype" in capsys.readouterr().err and "float64" not in list(DTYPES)


def test_resolve_dtype_raises_config_error():
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'.*bfloat16"):
        resolve_dtype("fp8")


def unloadable_models(tmp_path):
    empty = tmp_path / "empty"  # a directory, but no config.json
    empty.mkdir()
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{oops")
    truncated = tmp_path / "truncated"
    make_tiny_llama().save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return [empty, bad_json, truncated]


def test_an_unloadable_model_directory_exits_2_naming_it(trained_diff, tmp_path, capsys):
    # 1 means "a check failed"; a base that cannot be loaded is unusable input: 2, as the docs say.
    _, diff = trained_diff
    for model_dir in unloadable_models(tmp_path):
        assert main(["verify", "--diff", str(diff), "--model", str(model_dir)]) == 2
        err = capsys.readouterr().err
        assert f"sparseft verify: error: {model_dir}: cannot be loaded" in err and "Traceback" not in err
        assert main(["apply", "--model", str(model_dir), "--diff", str(diff), "--out", str(tmp_path / "m")]) == 2
        assert str(model_dir) in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_model_directory_without_tokenizer_exits_2_when_one_is_needed(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    args = ["select", "--model", str(tiny_model_dir), "--data", str(data), "--scorer", "fisher", "--out", str(tmp_path / "m")]
    assert main(args) == 2
    assert f"{tiny_model_dir}: no tokenizer can be loaded" in capsys.readouterr().err


def test_parser_builds():
    assert build_parser().prog == "sparseft"


@pytest.mark.parametrize("verb", ["train", "audit"])
def test_a_missing_data_file_is_reported_before_the_model_loads(verb, trained_diff, tmp_path, monkeypatch, capsys):
    import sparseft.loading
    import sparseft.training.job

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(sparseft.loading, "load_model", no_model)
    monkeypatch.setattr(sparseft.training.job, "load_model", no_model)
    missing = tmp_path / "nope.jsonl"
    if verb == "train":
        argv = ["train", "--model", "tiny", "--data", str(missing), "--out", str(tmp_path / "out")]
    else:
        argv = ["audit", "--model", "tiny", "--diff", str(trained_diff[1]), "--probe", str(missing)]
    assert main(argv) == 2
    assert f"{missing}: no such data file" in capsys.readouterr().err


def test_apply_refuses_a_diff_without_fingerprint_unless_told(trained_diff, tmp_path, capsys):
    _, path = trained_diff
    meta = json.loads((path / "sparse_config.json").read_text())
    del meta["base_fingerprint"]
    (path / "sparse_config.json").write_text(json.dumps(meta))
    other = tmp_path / "other-base"  # nothing shows the diff was not made for it: that is the point
    make_tiny_llama(seed=3).save_pretrained(other)
    argv = ["apply", "--model", str(other), "--diff", str(path), "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    assert "--allow-unverified-base" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main(argv + ["--allow-unverified-base"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert main(["verify", "--model", str(other), "--diff", str(path)]) == 1  # verify has no opt-out


@pytest.mark.parametrize("verb", ["audit", "compose", "diff-stats"])
def test_audit_compose_and_diff_stats_take_allow_unverified_base(trained_diff, tiny_model_dir, tmp_path, capsys, verb):
    _, path = trained_diff
    meta = json.loads((path / "sparse_config.json").read_text())
    del meta["base_fingerprint"]
    (path / "sparse_config.json").write_text(json.dumps(meta))
    probes = tmp_path / "probes.jsonl"  # token ids: the tiny base has no tokenizer
    probes.write_text(json.dumps({"id": "a", "prompt_ids": [3, 4, 5]}) + "\n")
    argv = {"audit": ["audit", "--diff", str(path), "--probe", str(probes), "--out", str(tmp_path / "audit"),
                      "--max-kl", "1e9", "--min-agreement", "0", "--max-pair-drift", "1e9"],
            "compose": ["compose", str(path), "--out", str(tmp_path / "composed")],
            "diff-stats": ["diff-stats", str(path), str(path)]}[verb] + ["--model", str(tiny_model_dir)]
    assert main(argv) == 2
    assert "--allow-unverified-base" in capsys.readouterr().err
    assert main(argv + ["--allow-unverified-base"]) == 0


def test_a_path_the_file_system_refuses_is_one_error_line_not_a_traceback(trained_diff, capsys):
    _, path = trained_diff
    assert main(["compose", str(path), str(path), "--out", "/proc/sparseft-test-out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseft compose: error: ") and "/proc/" in err and "Traceback" not in err
