import csv
import hashlib
import json

import pytest
import torch

from conftest import TINY_CHAT_TEMPLATE
from sparseft.errors import DataFormatError
from sparseft.training.data import (
    IGNORE_INDEX,
    collate,
    encode_rows,
    load_examples,
    load_rows,
    make_batches,
    read_rows,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "3+3=", "completion": " 6"}]


def test_jsonl_csv_and_datasets_files_give_the_same_rows(tmp_path):
    import datasets

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(ROWS)
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "d_dir"))
    for name in ("d.jsonl", "d.csv", "d.parquet", "d_dir"):
        assert load_rows(tmp_path / name) == ROWS, name
    assert load_rows(jsonl) == ROWS


def test_loss_only_on_completion_tokens(tiny_tokenizer, tmp_path):
    [example] = load_examples(write_jsonl(tmp_path / "d.jsonl", ROWS[:1]), tiny_tokenizer)
    completion_ids = tiny_tokenizer(" 4", add_special_tokens=False)["input_ids"]
    trained = [label for label in example.labels if label != IGNORE_INDEX]
    assert trained == completion_ids + [tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer.decode(example.input_ids[:-1]) == "2+2= 4"  # this tokenizer adds no BOS of its own


def test_the_tokenizers_own_bos_is_kept(tiny_tokenizer, tmp_path):
    from tokenizers.processors import TemplateProcessing

    bos = tiny_tokenizer.bos_token_id
    tiny_tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    [example] = load_examples(write_jsonl(tmp_path / "d.jsonl", ROWS[:1]), tiny_tokenizer)
    assert example.input_ids[0] == bos and example.input_ids[1:].count(bos) == 0
    assert example.labels[0] == IGNORE_INDEX


def test_messages_rows_train_on_assistant_turns_only(tiny_tokenizer, tmp_path):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ok"},
    ]
    [example] = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]), tiny_tokenizer)
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(example.input_ids) == rendered
    trained_text = tiny_tokenizer.decode([i for i, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX])
    # Each assistant reply and its end-of-turn marker; no user text, no role tags.
    assert trained_text == "yo</s>\nok</s>\n"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a"}\n', "line 1: missing field 'completion'"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "  "}\n', "line 2: field 'completion' is empty"),
        ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n', "line 3: invalid JSON"),
        ('{"text": "a"}\n', "line 1: missing field 'prompt' and 'completion'"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', "line 1: field 'messages' has no 'assistant' turn"),
        ('{"messages": [{"role": "user"}]}\n', "line 1: messages[0]: missing field 'content'"),
        ('{"prompt": 3, "completion": "b"}\n', "line 1: field 'prompt' must be a string"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError) as info:
        read_rows(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_csv_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\na,b\nc,\n")
    with pytest.raises(DataFormatError, match=r"bad.csv:line 3: field 'completion' is empty"):
        load_rows(path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.csv", b"prompt,completion\na,b\nc,d \xff\n",
         r"bad.csv:line 3: not UTF-8 text \(invalid start byte at byte 4 of the line\)"),
        ("big.csv", b"prompt,completion\na," + b"b" * 200_000 + b"\n",
         r"big.csv:line 2: unreadable CSV row \(field larger than"),
        ("deep.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": ' + b"[" * 100_000 + b"]" * 100_000
         + b', "completion": "b"}\n', r"deep.jsonl:line 2: JSON nested too deeply to read"),
        ("deep.csv", b'prompt,completion,messages\na,b,"' + b"[" * 50_000 + b"]" * 50_000 + b'"\n',
         r"deep.csv:line 2: field 'messages' is JSON nested too deeply to read"),
        ("x.parquet", b"garbage", r"x.parquet: not a readable .parquet file \(Parquet file size is 7 bytes"),
        ("x.arrow", b"garbage", r"x.arrow: not a readable .arrow file"),
    ],
)
def test_unreadable_files_name_the_file_and_what_was_expected(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataFormatError, match=message):
        load_rows(tmp_path / name)


def test_a_directory_that_is_not_a_saved_dataset_is_refused(tmp_path):
    import datasets

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataFormatError, match=r"notes: a data directory must be one written by datasets' save_to_disk, "
                                              r"with state.json or dataset_dict.json; found neither"):
        load_rows(tmp_path / "notes")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for arrow in (tmp_path / "saved").glob("*.arrow"):
        arrow.write_bytes(b"junk")
    with pytest.raises(DataFormatError, match=r"saved: not a readable datasets save_to_disk directory"):
        load_rows(tmp_path / "saved")


def test_too_long_rejected_unless_truncation(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 40, "completion": " y"}])
    with pytest.raises(DataFormatError, match=r"d.jsonl:line 1: example is 43 tokens, longer than max_length=16"):
        load_examples(path, tiny_tokenizer, max_length=16)
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "x", "completion": " " + "y" * 40}])
    [example] = load_examples(path, tiny_tokenizer, max_length=16, truncation=True)
    assert len(example.input_ids) == 16
    # Truncating away every completion token leaves nothing to learn: an error, not a silent no-op.
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "x" * 40, "completion": " y"}])
    with pytest.raises(DataFormatError, match="no completion tokens after truncation"):
        load_examples(path, tiny_tokenizer, max_length=16, truncation=True)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataFormatError, match="unknown data format"):
        load_rows(tmp_path / "d.txt")
    with pytest.raises(DataFormatError, match="no such data file"):
        load_rows(tmp_path / "nope.jsonl")


def test_collate_pads_right_with_mask_and_ignored_labels(tiny_tokenizer):
    examples = encode_rows([{"prompt": "a", "completion": " b"}, {"prompt": "abcdef", "completion": " g"}], tiny_tokenizer)
    batch = collate(examples, pad_id=tiny_tokenizer.pad_token_id)
    # "a" + " b" + EOS = 4 tokens; "abcdef" + " g" + EOS = 9 tokens
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 9)
    assert batch["attention_mask"][0].tolist() == [1] * 4 + [0] * 5
    assert (batch["input_ids"][0, 4:] == tiny_tokenizer.pad_token_id).all()
    assert (batch["labels"][0, 4:] == IGNORE_INDEX).all()


def test_global_batch_is_the_same_however_it_is_split(tiny_tokenizer):
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(10)]
    examples = encode_rows(rows, tiny_tokenizer)

    def ids(batches):
        return sorted(tuple(r.tolist()) for b in batches for r in b["input_ids"])

    for step in range(4):  # crosses an epoch boundary: steps consume 4 rows each
        one = make_batches(examples, 4, 0, seed=3, step=step)
        accumulated = make_batches(examples, 2, 0, seed=3, step=step, grad_accum=2)
        ranks = make_batches(examples, 2, 0, seed=3, step=step, rank=0, world_size=2) + make_batches(
            examples, 2, 0, seed=3, step=step, rank=1, world_size=2
        )
        assert ids(one) == ids(accumulated) == ids(ranks)
    # every example is seen once per epoch, in a seeded order
    epoch = [tuple(r.tolist()) for s in range(5) for r in make_batches(examples, 2, 0, seed=3, step=s)[0]["input_ids"]]
    assert len(set(epoch)) == 10
    assert torch.equal(make_batches(examples, 2, 0, seed=3, step=1)[0]["input_ids"], make_batches(examples, 2, 0, seed=3, step=1)[0]["input_ids"])


def bos_adding_tokenizer(template: str | None):
    """The tiny tokenizer made to put BOS before every text (as Llama's do), with the given chat template."""
    from tokenizers.processors import TemplateProcessing

    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", ["{{ bos_token }}" + TINY_CHAT_TEMPLATE, TINY_CHAT_TEMPLATE, None],
                         ids=["template-writes-bos", "template-without-bos", "no-template"])
def test_training_sees_the_prompt_evaluation_scores(template):
    """A task's training row starts with exactly the ids evaluation feeds the model: one BOS, never two."""
    from sparseft.tasks import ROUTING_DATA, get_task
    from sparseft.tasks.base import encode_prompt

    tok, task = bos_adding_tokenizer(template), get_task("routing")
    rows = task.training_rows(ROUTING_DATA / "train.jsonl", limit=2, tokenizer=tok)
    records = task.load(ROUTING_DATA / "train.jsonl", limit=2)
    for example, record in zip(encode_rows(rows, tok), records):
        prompt_ids = encode_prompt(tok, task.prompt(tok, record))
        assert prompt_ids[0] == tok.bos_token_id and prompt_ids[1] != tok.bos_token_id
        assert example.input_ids[: len(prompt_ids)] == prompt_ids
        assert example.input_ids.count(tok.bos_token_id) == 1


def test_a_label_at_position_0_is_not_a_loss_token(tiny_tokenizer, tmp_path):
    """The shifted loss predicts token t from tokens < t: label 0 is never scored, so it does not count."""
    from sparseft.training.data import Example

    assert Example([5, 6, 7], [5, IGNORE_INDEX, IGNORE_INDEX]).num_loss_tokens == 0
    assert Example([5, 6, 7], [5, 6, 7]).num_loss_tokens == 2
    # A one-token conversation whose only token is the answer trains nothing: a clear error, not a silent no-op.
    tiny_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataFormatError, match=r"m.jsonl:line 1: field 'messages' leaves no completion tokens"):
        load_examples(path, tiny_tokenizer)


def test_a_conversation_starting_with_the_assistant_is_a_clear_error(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "assistant", "content": "hello"}]}])
    with pytest.raises(DataFormatError, match=r"m.jsonl:line 1: messages\[0\] is an assistant turn"):
        load_examples(path, tiny_tokenizer)


def test_one_file_hash_for_diffs_and_data(tmp_path):
    """training.data hashes with diffio's file_sha256 (one implementation); a dataset directory hashes
    its files' names and hashes, so renaming or editing any file changes it."""
    import datasets

    from sparseft import diffio
    from sparseft.audit import repro
    from sparseft.training import data, job

    assert data.file_sha256 is diffio.file_sha256 and repro.data_sha256 is job.data_sha256 is data.data_sha256
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert data.data_sha256(jsonl) == diffio.file_sha256(jsonl) == hashlib.sha256(jsonl.read_bytes()).hexdigest()
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "d_dir"))
    digest = data.data_sha256(tmp_path / "d_dir")
    assert digest == data.data_sha256(tmp_path / "d_dir") and len(digest) == 64
    (tmp_path / "d_dir" / "extra.txt").write_text("x")
    assert data.data_sha256(tmp_path / "d_dir") != digest


def test_training_and_task_files_share_one_jsonl_reader(tmp_path):
    from sparseft import files
    from sparseft.training import data

    assert data.read_jsonl is files.read_jsonl
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n[1, 2]\n')
    with pytest.raises(DataFormatError, match=r"d.jsonl:line 3: expected a JSON object, got list"):
        read_rows(path)
    path.write_text('{"text": "a", "label": "billing"}\n{"text": "b", "label": \n')
    with pytest.raises(DataFormatError, match=r"d.jsonl:line 2: invalid JSON \(Expecting value at column 24\)"):
        list(files.read_jsonl(path))


def test_one_pad_id_rule_for_training_and_evaluation(tiny_tokenizer):
    from sparseft.loading import pad_token_id
    from sparseft.training import data, job

    assert not hasattr(data, "pad_id_of") and job.pad_token_id is pad_token_id
    assert pad_token_id(tiny_tokenizer) == tiny_tokenizer.pad_token_id
    tiny_tokenizer.pad_token = None
    assert pad_token_id(tiny_tokenizer) == tiny_tokenizer.eos_token_id


def test_every_json_file_reader_refuses_bad_json_with_its_own_error(tmp_path):
    """One rule (files.read_json_file) for diff configs, checkpoints, registries, results and adapters:
    bad syntax, bad UTF-8 and nesting too deep for the parser each raise the caller's error class."""
    from sparseft.errors import AdapterFormatError, ConfigError
    from sparseft.files import read_json_file
    from sparseft.peft_interop import read_adapter
    from sparseft.training.checkpoint import load_checkpoint

    for name, text in {"syntax": b"{", "utf8": b'{"a": "\xff"}', "deep": b"[" * 100_000 + b"]" * 100_000}.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(text)
        with pytest.raises(ConfigError, match=f"{name}.json"):
            read_json_file(path, ConfigError)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="state.json: not valid JSON"):
        load_checkpoint(ckpt)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFormatError, match="nested too deeply"):
        read_adapter(adapter)
