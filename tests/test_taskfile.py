"""Tasks from YAML files and from flags: the example task works end to end; bad files name the key and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparseft.cli import main
from sparseft.errors import ConfigError, DataFormatError, TaskFileError
from sparseft.tasks import classification_from_flags, get_task, load_task_file
from sparseft.files import records_sha256

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "tickets"


def write(tmp_path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_task_file_loads_and_renders_prompts():
    task = get_task(str(EXAMPLE / "task.yaml"))
    assert task.name == "tickets" and task.family == "classification" and task.primary_metric == "accuracy"
    assert task.labels == ["hardware", "software", "network"]
    records = task.load(EXAMPLE / "test.jsonl")
    assert len(records) == 9 and records[0]["label"] == 0
    prompt = task.instruction(records[0])
    assert "hardware, software, network" in prompt and "mouse cursor jumps" in prompt
    rows = task.training_rows(EXAMPLE / "train.jsonl")
    assert len(rows) == 12 and rows[-1]["completion"].strip() == "network"


def test_eval_cli_with_the_example_task_file(tiny_model_with_tokenizer_dir, capsys):
    code = main(["eval", "--model", str(tiny_model_with_tokenizer_dir), "--task", str(EXAMPLE / "task.yaml"),
                 "--data", str(EXAMPLE / "test.jsonl"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "tickets" and result["num_examples"] == 9
    assert set(result["metrics"]) == {"accuracy", "recall/hardware", "recall/software", "recall/network"}


def test_eval_cli_inline_classification(tiny_model_with_tokenizer_dir, capsys):
    code = main(["eval", "--model", str(tiny_model_with_tokenizer_dir), "--task", "classification",
                 "--labels", "hardware,software,network", "--text-field", "body", "--label-field", "team",
                 "--data", str(EXAMPLE / "test.jsonl"), "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 9


def test_flags_without_classification_are_refused(tiny_model_dir, capsys):
    code = main(["eval", "--model", str(tiny_model_dir), "--task", "sst2", "--labels", "a,b", "--data", "x"])
    assert code == 2 and "go with --task classification" in capsys.readouterr().err


def test_labels_from_data_are_sorted_distinct_values(tmp_path):
    task = classification_from_flags(None, text_field_name="body", label_field="team")
    task.load(EXAMPLE / "train.jsonl")
    assert task.labels == ["hardware", "network", "software"]


def test_qa_and_summarization_task_files(tmp_path):
    qa = load_task_file(write(tmp_path, "family: qa\ntemplate: 'Q: {question}'\nanswer_field: gold\nmetric: exact_match\n", "qa.yaml"))
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "2+2?", "gold": "4"}\n{"question": "Sky?", "gold": ["blue", "grey"]}\n')
    records = qa.load(data)
    assert qa.name == "qa" and qa.primary_metric == "exact_match"
    assert records[1]["answers"] == ["blue", "grey"] and qa.target(records[0]) == "4"

    summ = load_task_file(write(tmp_path, "family: summarization\ntemplate: 'Sum up: {notes}'\nmax_new_tokens: 12\n", "s.yaml"))
    data = tmp_path / "s.jsonl"
    data.write_text('{"notes": "a long day", "summary": "busy"}\n')
    assert summ.max_new_tokens == 12 and summ.instruction(summ.load(data)[0]) == "Sum up: a long day"


@pytest.mark.parametrize(
    "text, message",
    [
        ("family: regression\ntemplate: '{text}'\n", r"task.yaml:line 1: key 'family' must be one of"),
        ("family: classification\ntemplate: '{text}'\n", "missing key 'labels'"),
        ("family: classification\nlabels: [a]\n", r"line 2: key 'labels' must be a list of two or more"),
        ("family: classification\nlabels: [a, b]\nmetric: f1\n", r"line 3: key 'metric' must be one of \['accuracy'\]"),
        ("family: classification\nlabels: [a, b]\nlable_field: x\n", r"line 3: key 'lable_field' is not a key of a classification task"),
        ("family: qa\ntemplate: 'no placeholder'\n", r"line 2: key 'template' has no \{field\} placeholder"),
        ("family: qa\ntemplate: '{a b}'\n", "must be a plain field name"),
        ("family: qa\n", "missing key 'template'"),
        ("family: qa\ntemplate: 'Ticket: {body:d}'\n",
         r"task.yaml:line 2: key 'template': placeholder \{body:d\} may not carry a format spec or conversion; "
         r"write \{body\}"),
        ("family: qa\n\ntemplate: 'Ticket: {body!x}'\n", r"line 3: key 'template': placeholder \{body!x\} may not"),
        ("family: qa\ntemplate: 'Ticket: {body!r:>9}'\n", r"placeholder \{body!r:>9\} may not carry"),
        ("family: qa\ntemplate: 'Ticket: {body:{labels}}'\n", r"placeholder \{body:\{labels\}\} may not carry"),
        ("family: classification\nlabels: [a, b]\ntemplate: '{labels:>99999999999} {body}'\n",
         r"line 3: key 'template': placeholder \{labels:>99999999999\} may not carry"),
        ("family: summarization\ntemplate: '{x}'\nmax_new_tokens: 0\n", r"line 3: key 'max_new_tokens' must be a positive integer"),
        # Unknown keys that are not all strings were sorted together: a TypeError.
        ("family: classification\nlabels: [a, b]\n1: x\nlable_field: y\n", r"task.yaml: key 1 is not a key of"),
        ("family: classification\nlabels: [a, b]\n~: x\n", r"task.yaml: key null is not a key of"),
        ("- a list\n", "expected a mapping of task keys"),
        ("family: [unclosed\n", r"task.yaml:line \d+: not valid YAML"),
    ],
)
def test_bad_task_files_name_the_key_and_line(tmp_path, text, message):
    with pytest.raises(TaskFileError, match=message):
        load_task_file(write(tmp_path, text))


def test_a_task_file_that_is_not_utf8_or_nests_too_deep_names_the_file(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_bytes(b"family: qa\ntemplate: 'Q: \xff {q}'\n")
    with pytest.raises(TaskFileError, match=r"task.yaml:line 2: not UTF-8 text \(invalid start byte at byte 14 of"):
        load_task_file(path)
    path.write_text("family: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(TaskFileError, match=r"task.yaml: YAML nested too deeply to read"):
        load_task_file(path)


def test_a_missing_task_file_and_a_bad_row_are_clear(tmp_path):
    with pytest.raises(TaskFileError, match="no such task file"):
        get_task(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="or a task file"):
        get_task("nope")
    task = load_task_file(EXAMPLE / "task.yaml")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"body": "x", "team": "hardware"}\n{"body": "y", "team": "facilities"}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:line 2: field 'team' is 'facilities'"):
        task.load(data)


@pytest.mark.parametrize("text", [
    "family: classification\nlabels: [a, b]\n",
    "family: qa\ntemplate: 'Q: {question}'\n",
    "family: summarization\ntemplate: 'Sum up: {notes}'\n",
])
def test_a_data_file_with_no_rows_is_refused_by_every_family(tmp_path, text):
    task = load_task_file(write(tmp_path, text))
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    with pytest.raises(DataFormatError, match=r"empty.jsonl: no examples"):
        task.load(data, limit=5)


def test_bench_config_finds_a_task_file_next_to_it(tmp_path):
    from sparseft.bench.config import parse_bench_config

    (tmp_path / "task.yaml").write_text((EXAMPLE / "task.yaml").read_text())
    raw = {"model": "smollm2-135m", "task": "task.yaml", "train_data": str(EXAMPLE / "train.jsonl"),
           "eval_data": str(EXAMPLE / "test.jsonl"), "runs": [{"id": "a", "method": "sparse", "scorer": "random", "density": 0.01, "lr": 1e-3}]}
    cfg = parse_bench_config(raw, base_dir=tmp_path)
    assert cfg.task == str(tmp_path / "task.yaml") and get_task(cfg.task).name == "tickets"


@pytest.mark.slow
def test_bench_runs_a_task_file_with_no_python(tmp_path):
    """A data set of one's own (the docs' ticket example) benchmarked end to end from YAML alone."""

    tickets = Path(__file__).resolve().parents[1] / "docs" / "examples" / "tickets"
    config = tmp_path / "tickets_bench.yaml"
    config.write_text(
        "name: tickets-tiny\n"
        "model:\n  tiny: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2}\n"
        f"task: {tickets / 'task.yaml'}\ntrain_data: {tickets / 'train.jsonl'}\neval_data: {tickets / 'test.jsonl'}\n"
        "train_limit: 16\neval_limit: 8\nsteps: 2\nbatch_size: 4\nmax_length: 96\nseed: 0\ndensity: 0.05\nthreads: 1\n"
        "eval_base: false\nruns:\n  - {id: sparse-random, method: sparse, scorer: random, lr: 1.0e-2}\n"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "sparseft", "bench", str(config), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert row["status"] == "ok", row["error"]
    assert row["eval_examples"] == 8 and 0.0 <= row["metrics"]["accuracy"] <= 1.0
    # What bench.compare pairs grids by: the content of the 8 examples scored, wherever the file lies.
    assert row["eval_examples_sha256"] == records_sha256(get_task(str(tickets / "task.yaml")).load(
        tickets / "test.jsonl", 8))
    assert row["artifact_kind"] == "diff"
