"""Task metrics on hand-computed cases, data loaders on the real file formats, and label scoring on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import sparseft
from conftest import make_tiny_llama
from sparseft.bench.shapes import word_level_tokenizer
from sparseft.errors import ConfigError, DataFormatError
from sparseft.tasks import ROUTING_DATA, ROUTING_DEPARTMENTS, get_task
from sparseft.tasks.base import completion_text, encode_completion, encode_prompt
from sparseft.tasks.classification import read_sst2_tsv
from sparseft.tasks.inference import batches, generate_texts, score_completions
from sparseft.tasks.qa import best_over_references, exact_match, normalize_answer, read_squad_json, token_f1
from sparseft.tasks.summarization import read_dialogue_jsonl, rouge_scores

# ../shared/data next to the repository; SPARSEFT_SHARED_DATA points elsewhere (e.g. from a git worktree).
SHARED_DATA = Path(os.environ.get("SPARSEFT_SHARED_DATA") or Path(__file__).parents[1].parent / "shared" / "data")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids 4..99): fits the tiny Llama's 128-entry vocabulary."""
    vocab = ["<unk>", "<s>", "</s>", "<pad>", *(chr(c) for c in range(32, 127)), "\n"]
    return word_level_tokenizer(
        vocab, pre_tokenizer=pre_tokenizers.Split(Regex("."), behavior="isolated"),
        chat_template=CHAT_TEMPLATE if chat else None,
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )


# ---------------------------------------------------------------- QA metrics (official SQuAD v1.1 rules)


def test_normalize_answer_drops_case_punctuation_articles_and_extra_space():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("An apple, a pear") == "apple pear"
    # "the" inside a word is not an article
    assert normalize_answer("Theory of anthems") == "theory of anthems"


def test_exact_match_after_normalisation():
    assert exact_match("an Apple.", "apple") == 1.0
    assert exact_match("apples", "apple") == 0.0


def test_token_f1_hand_computed():
    # pred tokens: cat sat on mat (4); ref: cat on mat (3); common 3 -> P=3/4, R=1, F1=6/7
    assert token_f1("The cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # repeated tokens count as a bag: common y,y -> P=R=2/3
    assert token_f1("x y y", "y y z") == pytest.approx(2 / 3)
    assert token_f1("nothing shared", "other words") == 0.0


def test_best_over_references_takes_the_maximum():
    refs = ["Denver Broncos", "the Broncos", "Broncos"]
    assert best_over_references(exact_match, "broncos", refs) == 1.0
    # against "Denver Broncos": P=1/3, R=1/2 -> 0.4; against "Broncos": P=1/3, R=1 -> 0.5
    assert best_over_references(token_f1, "the broncos won easily", refs) == pytest.approx(0.5)


# ---------------------------------------------------------------- ROUGE


def test_rouge_on_known_strings():
    scores = rouge_scores(["the cat sat"], ["the cat sat on the mat"])
    # unigram overlap 3: P=3/3, R=3/6 -> F=2/3; bigram overlap 2: P=2/2, R=2/5 -> F=4/7; LCS 3 -> 2/3
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(4 / 7)
    assert scores["rougeL"] == pytest.approx(2 / 3)


def test_rouge_uses_stemming_and_averages_over_examples():
    scores = rouge_scores(["cats running", "blue"], ["cat run", "red"])
    assert scores["rouge1"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2: stems match in the first pair


# ---------------------------------------------------------------- loaders


def test_sst2_reader_keeps_quotes_and_strips_trailing_space(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text('sentence\tlabel\nit \'s a " charming " film \t1\nawful . \t0\n', encoding="utf-8")
    records = read_sst2_tsv(path, ["negative", "positive"])
    assert records == [{"text": 'it \'s a " charming " film', "label": 1}, {"text": "awful .", "label": 0}]


def test_sst2_reader_names_the_bad_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\nfine \t1\nbroken \t7\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"dev.tsv:line 3: field 'label'"):
        read_sst2_tsv(path, ["negative", "positive"])


def test_dialogue_reader_normalises_line_endings(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"dialogue": "Ann: hi\r\nBob: hello\nAnn: bye", "summary": "They greet. \n"}) + "\n")
    assert read_dialogue_jsonl(path) == [{"dialogue": "Ann: hi\nBob: hello\nAnn: bye", "summary": "They greet."}]


def test_jsonl_reader_names_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hello", "label": "billing"}\n{"text": "hi"}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:line 2: missing field 'label'"):
        get_task("routing").load(path)
    path.write_text('{"text": "hello", "label": "marketing"}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:line 1: field 'label' is 'marketing'"):
        get_task("routing").load(path)


def squad_file(tmp_path, n_articles=3) -> Path:
    data = [
        {
            "title": f"A{a}",
            "paragraphs": [
                {"context": f"Article {a} text.", "qas": [{"id": f"q{a}", "question": f"Which {a}?", "answers": [{"text": f"{a}", "answer_start": 8}]}]}
            ],
        }
        for a in range(n_articles)
    ]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


def test_squad_reader_splits_by_article(tmp_path):
    path = squad_file(tmp_path)
    assert [r["id"] for r in read_squad_json(path)] == ["q0", "q1", "q2"]
    assert [r["id"] for r in read_squad_json(path, slice(2, None))] == ["q2"]
    assert read_squad_json(path)[1]["answers"] == ["1"]


def broken_squad(tmp_path, break_it) -> Path:
    """The 3-article file of ``squad_file`` after ``break_it(data)`` changed one item in place."""
    document = json.loads(squad_file(tmp_path).read_text())
    break_it(document["data"])
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: d[1]["paragraphs"][0].pop("context"), r"data\[1\]\.paragraphs\[0\]: missing field 'context'"),
        (lambda d: d[1]["paragraphs"][0].update(context=None), r"data\[1\]\.paragraphs\[0\]: field 'context' must be a non-empty string"),
        (lambda d: d[2]["paragraphs"][0]["qas"][0]["answers"][0].update(text=None), r"data\[2\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]\.text: expected a string, got None"),
        (lambda d: d[2]["paragraphs"][0]["qas"][0]["answers"].__setitem__(0, "2"), r"data\[2\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]: expected a JSON object, got str"),
        (lambda d: d[0]["paragraphs"][0]["qas"][0].update(question=None), r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: field 'question' must be a non-empty string"),
        (lambda d: d[0]["paragraphs"][0]["qas"][0].update(id=7), r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.id: expected a string, got 7"),
        (lambda d: d[0]["paragraphs"][0]["qas"][0].pop("answers"), r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'answers'"),
        (lambda d: d[0]["paragraphs"][0]["qas"][0]["answers"][0].update(text=" "), r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers: needs at least one answer"),
        (lambda d: d[0]["paragraphs"][0].update(qas={}), r"data\[0\]\.paragraphs\[0\]\.qas: expected a list, got dict"),
        (lambda d: d[0].pop("paragraphs"), r"data\[0\]: missing field 'paragraphs'"),
        (lambda d: d.__setitem__(1, None), r"data\[1\]: expected a JSON object, got NoneType"),
    ],
)
def test_squad_reader_names_the_malformed_item(tmp_path, break_it, message):
    path = broken_squad(tmp_path, break_it)
    with pytest.raises(DataFormatError, match=r"broken\.json: " + message):
        read_squad_json(path)


def test_squad_reader_names_absolute_item_in_a_split_and_skips_other_articles(tmp_path):
    path = broken_squad(tmp_path, lambda d: d[2]["paragraphs"][0].pop("context"))
    assert [r["id"] for r in read_squad_json(path, slice(0, 2))] == ["q0", "q1"]
    with pytest.raises(DataFormatError, match=r"data\[2\]\.paragraphs\[0\]: missing field 'context'"):
        read_squad_json(path, slice(1, None))


@pytest.mark.parametrize("content", ['{"data": {"title": "x"}}', "[1, 2]", '{"version": "1.1"}', "{not json", b"\xff\xfe{}"])
def test_squad_reader_rejects_files_that_are_not_squad(tmp_path, content):
    path = tmp_path / "squad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataFormatError, match=r"squad\.json: not a SQuAD JSON file"):
        read_squad_json(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"summary": "s"}', r"val.jsonl:line 2: missing field 'dialogue'"),
        ('{"dialogue": "A: hi", "summary": null}', r"val.jsonl:line 2: field 'summary' must be a non-empty string, got None"),
        ('{"dialogue": ["A: hi"], "summary": "s"}', r"val.jsonl:line 2: field 'dialogue' must be a non-empty string"),
    ],
)
def test_dialogue_reader_names_line_and_field(tmp_path, line, message):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"dialogue": "A: hi", "summary": "They greet."}) + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=message):
        read_dialogue_jsonl(path)


def test_jsonl_reader_names_the_line_of_a_bad_byte(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_bytes(json.dumps({"dialogue": "A: hi", "summary": "s"}).encode() + b'\n{"dialogue": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"val.jsonl:line 2: not UTF-8 text"):
        read_dialogue_jsonl(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"sentence\tlabel\nfine \t1\nno label here\n", r"dev.tsv:line 3: expected 2 tab-separated fields \(sentence, label\), got 1"),
        (b"sentence\tlabel\nfine \t1\n\t0\n", r"dev.tsv:line 3: field 'sentence' is empty"),
        (b"sentence\tlabel\nfine \t1\nok \t\n", r"dev.tsv:line 3: field 'label' must be one of 0..1, got ''"),
        (b"sentence\tlabel\nfine \t1\nbad \xff byte\t0\n", r"dev.tsv:line 3: not UTF-8 text"),
        (b"sentence\n", r"dev.tsv:line 1: expected the header"),
    ],
)
def test_sst2_reader_names_line_and_field(tmp_path, content, message):
    path = tmp_path / "dev.tsv"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=message):
        read_sst2_tsv(path, ["negative", "positive"])


def test_unknown_task_and_bad_limit_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown task 'nope'; available: .*sst2"):
        get_task("nope")
    with pytest.raises(ConfigError, match="limit"):
        get_task("routing").load(ROUTING_DATA / "test.jsonl", limit=0)


def test_bundled_routing_data_is_valid_and_split_cleanly():
    task = get_task("routing")
    train, test = task.load(ROUTING_DATA / "train.jsonl"), task.load(ROUTING_DATA / "test.jsonl")
    assert len(train) >= 150 and len(test) >= 60
    assert {r["label"] for r in train} == {r["label"] for r in test} == set(range(len(ROUTING_DEPARTMENTS)))
    assert not {r["text"] for r in train} & {r["text"] for r in test}


def test_bundled_routing_data_is_package_data():
    """The demo's data lies inside the installed package, not in the source tree next to it."""
    package = Path(sparseft.__file__).resolve().parent
    assert ROUTING_DATA.resolve().is_relative_to(package / "data")
    assert {p.name for p in ROUTING_DATA.iterdir()} >= {"train.jsonl", "test.jsonl"}


@pytest.mark.slow
def test_wheel_ships_the_demo_data_and_reads_it_from_the_install(tmp_path):
    """Build a wheel from a copy of the source, unpack it like an install and load the demo data from there."""
    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("sparseft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"sparseft/data/support_routing/train.jsonl", "sparseft/data/support_routing/test.jsonl"} <= names
        archive.extractall(tmp_path / "site")
    script = (
        "import sparseft; from sparseft.tasks import ROUTING_DATA, get_task; "
        "print(sparseft.__file__); print(len(get_task('routing').load(ROUTING_DATA / 'test.jsonl')))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, check=True, capture_output=True, text=True)
    where, count = out.stdout.split()
    assert Path(where).is_relative_to(tmp_path / "site") and int(count) == len(get_task("routing").load(ROUTING_DATA / "test.jsonl"))


@pytest.mark.parametrize("relative", ["sst2/dev.tsv", "squad/dev-v1.1.json", "samsum/test.jsonl"])
def test_shared_data_files_load(relative):
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not present")
    task = {"sst2": "sst2", "squad": "squad-heldout", "samsum": "samsum"}[relative.split("/")[0]]
    records = get_task(task).load(path, limit=5)
    assert len(records) == 5 and all(get_task(task).target(r).strip() for r in records)


# ---------------------------------------------------------------- prompts shared by training and evaluation


@pytest.mark.parametrize("chat", [False, True])
def test_training_rows_use_the_evaluation_prompt(chat):
    tok, task = char_tokenizer(chat), get_task("routing")
    rows = task.training_rows(ROUTING_DATA / "train.jsonl", limit=3, tokenizer=tok)
    records = task.load(ROUTING_DATA / "train.jsonl", limit=3)
    assert len(rows) == 3
    for row, record in zip(rows, records):
        assert row["prompt"] == task.prompt(tok, record)
        assert row["completion"] == completion_text(tok, task.target(record))
        assert row["completion"].endswith("</s>") and record["text"] in row["prompt"]
        assert row["prompt"].startswith("<|user|>") == chat


# ---------------------------------------------------------------- scoring and generation on a tiny model


def naive_logp(model, prompt: list[int], completion: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0].float(), -1)
    return sum(float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(completion))


def test_score_completions_equals_unpadded_full_sequence_scores():
    model = make_tiny_llama()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 100, (n,), generator=gen).tolist() for n in (3, 9, 5, 12, 1)]
    completions = [[7], [8, 9, 2], [10, 2]]
    scores = score_completions(model, prompts, completions, batch_size=2, pad_id=3)
    expected = torch.tensor([[naive_logp(model, p, c) for c in completions] for p in prompts])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_classification_predicts_the_most_likely_label():
    model, tok, task = make_tiny_llama(), char_tokenizer(chat=True), get_task("routing")
    records = task.load(ROUTING_DATA / "test.jsonl", limit=6)
    metrics = task.evaluate(model, tok, records, batch_size=4, progress=False)
    completions = [encode_completion(tok, completion_text(tok, label)) for label in task.labels]
    predicted = [
        max(range(len(task.labels)), key=lambda i: naive_logp(model, encode_prompt(tok, task.prompt(tok, r)), completions[i]))
        for r in records
    ]
    expected = sum(p == r["label"] for p, r in zip(predicted, records)) / len(records)
    assert metrics["accuracy"] == pytest.approx(expected)


def test_batches_group_prompts_longest_first_and_cover_each_once():
    assert list(batches([3, 9, 5, 12, 1, 9], batch_size=2)) == [[3, 1], [5, 2], [0, 4]]
    with pytest.raises(ConfigError):
        list(batches([1, 2], batch_size=0))


def test_batched_greedy_generation_equals_one_by_one():
    model, tok = make_tiny_llama(), char_tokenizer()
    texts = ("Hello there", "Q?", "A longer prompt here", "Mid size", "x")
    prompts = [tok(text)["input_ids"] for text in texts]
    batched = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=2)  # run longest first, returned in order
    single = [generate_texts(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single and all(isinstance(t, str) for t in batched)


# ---------------------------------------------------------------- per-example scores and validation splits


def test_classification_per_example_scores_average_to_the_unchanged_accuracy():
    model, tok, task = make_tiny_llama(), char_tokenizer(chat=True), get_task("routing")
    records = task.load(ROUTING_DATA / "test.jsonl", limit=6)
    metrics, per_example = task.evaluate_detailed(model, tok, records, batch_size=4, progress=False)
    assert metrics == task.evaluate(model, tok, records, batch_size=4, progress=False)
    assert len(per_example["accuracy"]) == len(records) and set(per_example["accuracy"]) <= {0.0, 1.0}
    assert sum(per_example["accuracy"]) / len(records) == metrics["accuracy"]


def test_qa_per_example_scores_average_to_the_unchanged_metrics(tmp_path):
    model, tok, task = make_tiny_llama(), char_tokenizer(), get_task("squad")
    records = task.load(squad_file(tmp_path))
    metrics, per_example = task.evaluate_detailed(model, tok, records, batch_size=2, progress=False)
    assert metrics == task.evaluate(model, tok, records, batch_size=2, progress=False)
    predictions = task.predict(model, tok, records, batch_size=2)
    assert per_example["f1"] == [best_over_references(token_f1, p, r["answers"]) for p, r in zip(predictions, records)]
    for name in ("f1", "exact_match"):
        assert sum(per_example[name]) / len(records) == metrics[name]


def test_rouge_per_example_scores_average_to_the_unchanged_means():
    from sparseft.tasks.summarization import rouge_scores_detailed

    predictions, references = ["the cat sat on the mat", "dogs bark"], ["the cat sat", "a cat sleeps"]
    means, per_example = rouge_scores_detailed(predictions, references)
    assert means == rouge_scores(predictions, references)
    assert per_example["rouge1"][0] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # precision 3/6, recall 3/3
    assert per_example["rouge1"][1] == 0.0
    assert sum(per_example["rougeL"]) / 2 == means["rougeL"]


def test_validation_splits_are_disjoint_from_fit_and_cover_the_file(tmp_path):
    sst2 = tmp_path / "train.tsv"
    sst2.write_text("sentence\tlabel\n" + "".join(f"sentence {i} .\t{i % 2}\n" for i in range(120)))
    fit, val = (get_task(n).load(sst2) for n in ("sst2-fit", "sst2-val"))
    assert [r["text"] for r in val] == [f"sentence {i} ." for i in (0, 50, 100)]
    assert len(fit) == 117 and not {r["text"] for r in fit} & {r["text"] for r in val}
    samsum = tmp_path / "dialogues.jsonl"
    samsum.write_text("".join(json.dumps({"dialogue": f"A: hi {i}", "summary": f"s{i}"}) + "\n" for i in range(12)))
    fit, val = (get_task(n).load(samsum) for n in ("samsum-fit", "samsum-val"))
    assert [r["summary"] for r in val] == ["s0", "s5", "s10"] and len(fit) == 9
    assert get_task("samsum-val").load(samsum, limit=2) == val[:2]  # the limit applies within the split
    squad = squad_file(tmp_path, n_articles=48)
    parts = {n: {r["id"] for r in get_task(n).load(squad)} for n in ("squad-fit", "squad-val", "squad-heldout")}
    assert sum(map(len, parts.values())) == len(get_task("squad").load(squad))
    assert not (parts["squad-fit"] & parts["squad-val"] or parts["squad-val"] & parts["squad-heldout"])
