"""The demo's whole path on a tiny model: evaluate, train a diff, save, apply, evaluate, exact revert."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_llama
from sparseft.cli import main
from sparseft.demo import DemoConfig, format_report, run_demo
from sparseft.tasks import ROUTING_DATA
from test_tasks import char_tokenizer


def small_routing_copy(tmp_path, n_train=16, n_test=6):
    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("train", n_train), ("test", n_test)):
        lines = (ROUTING_DATA / f"{name}.jsonl").read_text().splitlines()[:n]
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return data


def tiny_chat_model_dir(tmp_path):
    path = tmp_path / "tiny"
    make_tiny_llama(max_position_embeddings=512).save_pretrained(path)
    char_tokenizer(chat=True).save_pretrained(path)
    return path


def test_demo_trains_saves_and_reverts_exactly(tmp_path):
    cfg = DemoConfig(
        model=str(tiny_chat_model_dir(tmp_path)),
        data_dir=str(small_routing_copy(tmp_path)),
        out=str(tmp_path / "demo"),
        density=0.05,
        epochs=1.0,
        batch_size=4,
        eval_batch_size=4,
    )
    lines = []
    report = run_demo(cfg, log=lines.append)
    assert report.num_train == 16 and report.num_test == 6 and report.train_steps == 4
    assert report.revert_bitwise_equal is True
    assert report.model_parameters == sum(p.numel() for p in make_tiny_llama().parameters())
    assert 0 < report.trained_entries < report.model_parameters and 0 < report.diff_bytes < report.model_bytes
    assert 0.0 <= report.before <= 1.0 and 0.0 <= report.after <= 1.0
    assert (tmp_path / "demo" / "diff" / "sparse_config.json").is_file()
    assert json.loads((tmp_path / "demo" / "demo_report.json").read_text())["trained_entries"] == report.trained_entries
    text = format_report(report)
    assert "bitwise equal to the base: True" in text and "->" in text
    assert any(line.startswith("before:") for line in lines)


def test_demo_help():
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "-1", "epochs must be > 0, got -1.0"),
    ("--density", "5", "density must be in (0, 1], got 5.0"),
    ("--scorer", "bogus", "unknown scorer 'bogus'; available: "),
    ("--lr", "0", "lr must be > 0, got 0.0"),
])
def test_demo_checks_its_flags_before_loading_anything(tmp_path, capsys, flag, value, message):
    # Was: the model loaded and the "before" evaluation ran (~2 min) before the flag was refused.
    # The model does not exist, so had it been loaded first the error would name it instead.
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tmp_path / "no-such-model"), "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"sparseft demo: error: {message}" in err, err
    assert not out.exists()


def test_demo_checks_its_out_before_loading_anything(tmp_path, monkeypatch, capsys):
    # Was: the model loaded and the "before" evaluation ran before a file as --out failed with a bare errno; ""
    # wrote the diff and the report into the working directory. The model does not exist, as above.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    mine = tmp_path / "mine"
    (mine / "diff").mkdir(parents=True)
    (mine / "diff" / "keep.txt").write_text("mine\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cases = [(str(a_file), f"--out {a_file}: is a file; expected a directory"),
             (str(a_file / "demo"), f"--out {a_file / 'demo'}: cannot be created, {a_file} is a file"),
             ("", "--out is empty ('')"),
             (str(mine), f"--out {mine / 'diff'}: exists and holds files sparseft did not write (keep.txt)")]
    for out, message in cases:
        assert main(["demo", "--model", str(tmp_path / "no-such-model"), "--out", out]) == 2
        assert f"sparseft demo: error: {message}" in capsys.readouterr().err
    assert a_file.read_text() == "mine\n" and list(work.iterdir()) == []
    assert sorted(p.name for p in mine.rglob("*")) == ["diff", "keep.txt"]
