"""audit --repro: re-running a diff's recorded training on CPU gives the same bytes, or says where not."""

import json
import re
import shutil

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from sparseft import SparseConfig, get_sparse_model
from sparseft.audit.repro import reproduce, rerun_values
from sparseft.cli import main
from sparseft.diffio import read_diff, write_diff
from sparseft.errors import NotReproducibleError
from sparseft.training import TrainConfig, run_training

EDITED = "model.layers.1.self_attn.v_proj"
LOOSE = ["--max-kl", "1e9", "--min-agreement", "0", "--max-pair-drift", "1e9"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    base = root / "base"
    make_tiny_llama().save_pretrained(base)
    make_tiny_tokenizer().save_pretrained(base)
    data = root / "train.jsonl"
    rows = [{"prompt": f"review: {w} ->", "completion": c} for w, c in [("good", " pos"), ("bad", " neg")] * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig.from_dict(dict(model=str(base), data=str(data), out=str(root / "run"), density=0.1, steps=3,
                                     lr=1e-2, batch_size=4, max_length=32, seed=3, progress=False, value_dtype="float32"))
    run_training(cfg)
    probes = root / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "review: good ->", "pair": "review: bad ->"}) + "\n")
    return base, data, root / "run", probes


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def test_same_config_and_seed_reproduce_the_diff(trained, tmp_path, capsys):
    base, _, run, probes = trained
    code = main(["audit", "--model", str(base), "--diff", str(run), "--probe", str(probes), "--out", str(tmp_path / "out"),
                 "--repro", *LOOSE])
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert code == 0, capsys.readouterr().out
    result = report["reproducibility"]
    assert result["reproduced"] and result["rerun_sha256"] == result["original_sha256"]
    assert result["config"]["device"] == "cpu" and result["config"]["seed"] == 3
    assert "PASS reproduced" in capsys.readouterr().out
    assert "reproduced: same tensor-file sha256" in (tmp_path / "out" / "audit.md").read_text()


def test_an_edited_module_is_named(trained, tmp_path, capsys):
    base, _, run, probes = trained
    run = copy_run(run, tmp_path)
    diff = read_diff(run)
    with torch.no_grad():
        diff.values[EDITED][2] += 0.25  # re-written with a fresh hash: only a re-run can tell
    write_diff(diff, run)
    code = main(["audit", "--model", str(base), "--diff", str(run), "--probe", str(probes), "--out", str(tmp_path / "out"),
                 "--repro", *LOOSE])
    assert code == 1
    assert "FAIL reproduced" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "audit.json").read_text())["reproducibility"]
    differing = [m for m in result["modules"] if m["status"] != "same"]
    assert [m["module"] for m in differing] == [EDITED]
    assert differing[0]["same_entries"] and differing[0]["values_differing"] == 1
    assert differing[0]["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert EDITED in result["reason"]


def test_changed_data_is_reported_without_a_rerun(trained, tmp_path):
    _, data, run, _ = trained
    other = tmp_path / "train.jsonl"
    other.write_text(data.read_text() + json.dumps({"prompt": "x", "completion": " y"}) + "\n")
    result = reproduce(run, data=str(other))
    assert not result["reproduced"] and "changed since training" in result["reason"]
    assert "rerun_sha256" not in result


def test_diff_without_training_record_is_refused(tmp_path):
    path = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05)).save_pretrained(tmp_path / "diff")
    with pytest.raises(NotReproducibleError, match="no training config"):
        reproduce(path)


def edit_record(run, tmp_path, train_config=None, yaml_text=None):
    """A copy of ``run`` whose provenance records ``train_config`` (dropped when None), with ``train_config.yaml``
    beside it holding ``yaml_text`` (when given)."""
    run = copy_run(run, tmp_path)
    meta = json.loads((run / "sparse_config.json").read_text())
    meta["provenance"].pop("train_config")
    if train_config is not None:
        meta["provenance"]["train_config"] = train_config
    (run / "sparse_config.json").write_text(json.dumps(meta))
    if yaml_text is not None:
        (run / "train_config.yaml").write_text(yaml_text)
    return run


@pytest.mark.parametrize("record, match", [
    ({"data": 5}, r"sparse_config\.json: provenance\.train_config: data must be a string, got 5"),
    ({"lr": "fast"}, r"sparse_config\.json: provenance\.train_config: lr must be a number"),
    ("lr: [1e-3\n", r"train_config\.yaml:line 2: not valid YAML"),
    ("- lr: 1e-3\n", r"train_config\.yaml: expected a mapping of TrainConfig fields, got list"),
    ("data: 5\n", r"train_config\.yaml: data must be a string, got 5"),
])
def test_a_mistyped_training_record_names_where_it_is_recorded(trained, tmp_path, record, match):
    # Was a TypeError from Path(5), a yaml ParserError, or a ConfigError that named no file.
    _, _, run, _ = trained
    if isinstance(record, dict):
        recorded = json.loads((run / "sparse_config.json").read_text())["provenance"]["train_config"]
        run = edit_record(run, tmp_path, train_config={**recorded, **record})
    else:
        run = edit_record(run, tmp_path, yaml_text=record)
    with pytest.raises(NotReproducibleError, match=match):
        reproduce(run)  # the recorded data path, as the audit takes it without --repro-data


def test_recorded_masks_that_are_gone_are_named_before_the_rerun(trained, tmp_path):
    # Was train's "--masks X: no such diff directory or mask file", a flag the audit's user never gave.
    _, _, run, _ = trained
    recorded = json.loads((run / "sparse_config.json").read_text())["provenance"]["train_config"]
    gone = str(tmp_path / "moved-away")
    run = edit_record(run, tmp_path, train_config={**recorded, "masks": gone})
    with pytest.raises(NotReproducibleError, match=rf"train_config: the recorded masks '{re.escape(gone)}' are not"):
        rerun_values(run)


def test_a_hand_edited_data_hash_is_named_not_reported_as_changed_data(trained, tmp_path):
    # Was "the data file … changed since training": any recorded value that is not the data's hash differs.
    _, _, run, _ = trained
    run = copy_run(run, tmp_path)
    meta = json.loads((run / "sparse_config.json").read_text())
    meta["provenance"]["data_sha256"] = 5
    (run / "sparse_config.json").write_text(json.dumps(meta))
    with pytest.raises(NotReproducibleError, match=r"sparse_config\.json: provenance\.data_sha256 must be a sha256 "
                                                   r"\(64 hex digits\), got 5"):
        reproduce(run)


def test_audit_refuses_a_bad_training_record_before_it_audits(trained, tmp_path, capsys):
    base, _, run, probes = trained
    run = edit_record(run, tmp_path, yaml_text="lr: [1e-3\n")
    code = main(["audit", "--model", str(base), "--diff", str(run), "--probe", str(probes), "--out", str(tmp_path / "out"),
                 "--repro", *LOOSE])
    assert code == 2 and "train_config.yaml:line 2: not valid YAML" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
