"""sparseft eval on a tiny model: base, base + sparse diff, base + LoRA adapter, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama
from sparseft import SparseConfig, get_sparse_model
from sparseft.cli import main
from sparseft.errors import DiffNotFoundError
from sparseft.evaluate import evaluate
from sparseft.methods import detect_artifact
from sparseft.tasks import ROUTING_DATA
from test_tasks import char_tokenizer

TEST_FILE = str(ROUTING_DATA / "test.jsonl")


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama with a chat-templated character tokenizer, saved like a real model directory."""
    path = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(path)
    char_tokenizer(chat=True).save_pretrained(path)
    return path


def run_json(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_base_reports_metrics_count_and_time(model_dir, capsys):
    report = run_json(capsys, "--model", str(model_dir), "--task", "routing", "--data", TEST_FILE, "--limit", "5")
    assert report["num_examples"] == 5 and report["adapter"] == "none"
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0 and report["wall_time_s"] > 0
    # the same numbers as the library call
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    metrics, n, _ = evaluate(model, char_tokenizer(chat=True), "routing", TEST_FILE, limit=5, progress=False)
    assert metrics == report["metrics"] and n == 5


def test_eval_table_output(model_dir, capsys):
    assert main(["eval", "--model", str(model_dir), "--task", "routing", "--data", TEST_FILE, "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "2 examples" in out


def scores_of(model):
    from sparseft.tasks import get_task

    task = get_task("routing")
    return task.label_scores(model, char_tokenizer(chat=True), task.load(TEST_FILE, 4))


def test_eval_with_sparse_diff_scores_the_changed_model(model_dir, tmp_path, capsys):
    sparse = get_sparse_model(AutoModelForCausalLM.from_pretrained(model_dir), SparseConfig(density=0.2, value_dtype="float32"))
    with torch.no_grad():
        for layer in sparse.sparse_layers().values():
            layer.values.normal_(0, 0.5)
    diff = sparse.save_pretrained(tmp_path / "diff")
    assert detect_artifact(diff).name == "sparse"
    report = run_json(capsys, "--model", str(model_dir), "--diff", str(diff), "--task", "routing", "--data", TEST_FILE, "--limit", "4")
    assert report["adapter"] == "sparse" and report["num_examples"] == 4
    base_scores = scores_of(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    assert not torch.allclose(scores_of(sparse.eval()), base_scores)


def test_eval_refuses_a_diff_without_fingerprint_unless_told(model_dir, tmp_path, capsys):
    sparse = get_sparse_model(AutoModelForCausalLM.from_pretrained(model_dir), SparseConfig(density=0.2, value_dtype="float32"))
    diff = sparse.save_pretrained(tmp_path / "diff")
    meta = json.loads((diff / "sparse_config.json").read_text())
    del meta["base_fingerprint"]
    (diff / "sparse_config.json").write_text(json.dumps(meta))
    argv = ["eval", "--model", str(model_dir), "--diff", str(diff), "--task", "routing", "--data", TEST_FILE, "--limit", "2"]
    assert main(argv) == 2
    assert "--allow-unverified-base" in capsys.readouterr().err
    report = run_json(capsys, *argv[1:], "--allow-unverified-base")
    assert report["adapter"] == "sparse" and report["num_examples"] == 2


def test_eval_with_lora_adapter(model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert detect_artifact(tmp_path / "lora").name == "lora"
    report = run_json(capsys, "--model", str(model_dir), "--diff", str(tmp_path / "lora"), "--task", "routing", "--data", TEST_FILE, "--limit", "3")
    assert report["adapter"] == "lora" and report["num_examples"] == 3


def test_eval_rejects_a_directory_that_is_no_diff(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffNotFoundError):
        detect_artifact(tmp_path / "empty").name
    argv = ["eval", "--model", str(model_dir), "--diff", str(tmp_path / "empty"), "--task", "routing", "--data", TEST_FILE]
    assert main(argv) == 2
    assert "not a sparse diff" in capsys.readouterr().err


def test_eval_rejects_bad_data_before_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "label": "nope"}\n')
    argv = ["eval", "--model", str(tmp_path / "no-such-model"), "--task", "routing", "--data", str(bad)]
    assert main(argv) == 2
    assert "bad.jsonl:line 1: field 'label'" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--limit", "0"),
                                         ("--limit", "-3"), ("--batch-size", "two")])
def test_eval_refuses_a_count_below_one_at_the_flag(tmp_path, capsys, flag, value):
    # --batch-size -1 used to score nothing and print accuracy 100%; 0 a ValueError from range()
    argv = ["eval", "--model", str(tmp_path / "no-such-model"), "--task", "routing", "--data", TEST_FILE, flag, value]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected a whole number of at least 1, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("field, kwargs", [("batch_size", {"batch_size": 0}), ("batch_size", {"batch_size": -1}),
                                           ("limit", {"limit": 0})])
def test_run_eval_refuses_a_count_below_one_before_loading(tmp_path, field, kwargs):
    from sparseft.errors import ConfigError
    from sparseft.evaluate import run_eval

    with pytest.raises(ConfigError, match=f"{field} must be a whole number of at least 1, got -?[0-9]"):
        run_eval(str(tmp_path / "no-such-model"), "routing", TEST_FILE, **kwargs)


def test_eval_runs_on_the_device_asked_and_refuses_one_it_cannot_use_before_loading(model_dir, tmp_path, capsys):
    report = run_json(capsys, "--model", str(model_dir), "--task", "routing", "--data", TEST_FILE, "--limit", "2",
                      "--device", "cpu")
    assert report["extra"]["device"] == "cpu" and report["num_examples"] == 2
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    for device, message in [("gpu0", "--device must be auto, cpu, cuda or cuda:N"), (missing, f"--device {missing!r}")]:
        argv = ["eval", "--model", str(tmp_path / "no-such-model"), "--task", "routing", "--data", TEST_FILE,
                "--device", device]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
