"""Training data: rows from a file → validated, tokenised examples → padded batches.

A row is either ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``
(rendered with the tokenizer's chat template). The loss is taken only on completion tokens (the
assistant turns for ``messages``); every other label is -100.

Files: JSON Lines (``.jsonl``, ``.json`` with one object per line), CSV (``.csv``; a ``messages``
column holds a JSON list), and local ``datasets`` files (``.parquet``, ``.arrow``, or a directory
written by ``Dataset.save_to_disk``), or a Hugging Face dataset split named ``hf:NAME[:CONFIG]:SPLIT``
(``sparseft.hfdata``; offline from the local datasets cache). Every problem is reported as a :class:`DataFormatError` naming
the file, the line (row) and the field, before any training starts.

Example:
    >>> rows = load_rows("train.jsonl")  # doctest: +SKIP
    >>> examples = encode_rows(rows, tokenizer, max_length=512)  # doctest: +SKIP
    >>> batch = collate(examples[:8], pad_id=tokenizer.pad_token_id)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..diffio import file_sha256
from ..errors import DataFormatError
from ..files import read_jsonl, read_text_file
from ..hfdata import dataset_rows, dataset_sha256, is_dataset_spec
from ..loading import prompt_prefix

IGNORE_INDEX = -100
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
DATASETS_SUFFIXES = (".parquet", ".arrow")
SAVE_TO_DISK_FILES = ("state.json", "dataset_dict.json")  # what Dataset / DatasetDict.save_to_disk write


@dataclass
class Row:
    """One validated row and where it came from (for error messages)."""

    where: str  # "file:line N" or "file:row N"
    data: dict[str, Any]


@dataclass
class Example:
    """One tokenised row: ``labels`` is -100 wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_loss_tokens(self) -> int:
        """Labels the loss scores: the next-token loss predicts token t from tokens < t, so the label at
        position 0 never is (``training.loop.count_loss_tokens`` counts the same way)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


# ---------------------------------------------------------------- reading files


def data_sha256(path: str | os.PathLike) -> str:
    """sha256 of a data file; for a dataset directory, of each file's relative name and sha256; for a
    Hugging Face dataset spec, of its rows."""
    if is_dataset_spec(path):
        return dataset_sha256(path)
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(read_text_file(path, DataFormatError), newline=""))
    try:
        for row in reader:
            # reader.line_num is the physical line the row ended on (the header is line 1).
            where = f"{path}:line {reader.line_num}"
            if "messages" in row and row["messages"]:
                try:
                    row["messages"] = json.loads(row["messages"])
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{where}: field 'messages' is not a JSON list ({e.msg})") from e
                except RecursionError:
                    raise DataFormatError(f"{where}: field 'messages' is JSON nested too deeply to read") from None
            yield where, row
    except csv.Error as e:
        raise DataFormatError(f"{path}:line {reader.line_num + 1}: unreadable CSV row ({e})") from None


def read_datasets_file(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets
    import pyarrow

    if path.is_dir() and not any((path / name).is_file() for name in SAVE_TO_DISK_FILES):
        raise DataFormatError(f"{path}: a data directory must be one written by datasets' save_to_disk, with "
                              f"{' or '.join(SAVE_TO_DISK_FILES)}; found neither")
    kind = "datasets save_to_disk directory" if path.is_dir() else f"{path.suffix} file"
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        elif path.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path))
        else:
            ds = datasets.Dataset.from_file(str(path))
    except (pyarrow.ArrowException, json.JSONDecodeError, FileNotFoundError) as e:
        raise DataFormatError(f"{path}: not a readable {kind} ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataFormatError(f"{path}: dataset has splits {sorted(ds)}, expected a 'train' split")
        ds = ds["train"]
    for number, row in enumerate(ds):
        yield f"{path}:row {number}", row


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(where, raw_row)`` for every row of a data file (or Hugging Face dataset split), in order."""
    if is_dataset_spec(path):
        return dataset_rows(path)
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such data file")
    if path.is_dir() or path.suffix in DATASETS_SUFFIXES:
        return read_datasets_file(path)
    if path.suffix == ".csv":
        return read_csv(path)
    if path.suffix in JSONL_SUFFIXES:
        return read_jsonl(path)
    raise DataFormatError(
        f"{path}: unknown data format {path.suffix!r}; use JSON Lines ({', '.join(JSONL_SUFFIXES)}), .csv, "
        f"a datasets file ({', '.join(DATASETS_SUFFIXES)}) or a save_to_disk directory"
    )


# ---------------------------------------------------------------- validating rows


def require_text(row: dict, field: str, where: str, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        raise DataFormatError(f"{where}: missing field {field!r}")
    value = row[field]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataFormatError(f"{where}: field {field!r} is empty")
    return value


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    clean = []
    for i, msg in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(msg, dict):
            raise DataFormatError(f"{at} must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = require_text(msg, "role", at)
        content = require_text(msg, "content", at, allow_empty=role != "assistant")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataFormatError(f"{where}: field 'messages' has no 'assistant' turn, so there is nothing to learn")
    return clean


def validate_row(raw: Any, where: str) -> dict[str, Any]:
    """The row reduced to its known fields, or a DataFormatError naming the problem."""
    if not isinstance(raw, dict):
        raise DataFormatError(f"{where}: expected an object with 'prompt'/'completion' or 'messages', got {type(raw).__name__}")
    if raw.get("messages") is not None:
        return {"messages": validate_messages(raw["messages"], where)}
    if "prompt" not in raw and "completion" not in raw:
        raise DataFormatError(f"{where}: missing field 'prompt' and 'completion' (or 'messages'); found {sorted(raw)}")
    return {"prompt": require_text(raw, "prompt", where, allow_empty=True), "completion": require_text(raw, "completion", where)}


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Every row of ``path``, validated, with its location."""
    rows = [Row(where, validate_row(raw, where)) for where, raw in read_records(path)]
    if not rows:
        raise DataFormatError(f"{path}: no rows")
    return rows


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Validated rows of a data file as plain dicts (``prompt``/``completion`` or ``messages``).

    Example:
        >>> load_rows("train.jsonl")[0]  # doctest: +SKIP
        {'prompt': 'Review: great film. Sentiment:', 'completion': ' positive'}
    """
    return [row.data for row in read_rows(path)]


# ---------------------------------------------------------------- tokenising


def chat_segments(messages: list[dict[str, str]], tokenizer, where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_completion)`` pieces: assistant turns are completions.

    Rendering grows the conversation one message at a time; each piece is what that message adds to
    the rendered text (the generation prompt before an assistant turn is not a completion).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataFormatError(f"{where}: a 'messages' row needs a tokenizer with a chat template; this one has none")

    def render(msgs: list[dict[str, str]], generation_prompt: bool = False) -> str:
        if not msgs and not generation_prompt:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            if i == 0:
                raise DataFormatError(f"{where}: messages[0] is an assistant turn; a conversation must start with a "
                                      "user or system turn for the reply to have a prompt")
            before = render(messages[:i], generation_prompt=True)
            segments.append((take_suffix(before, rendered, where), False))
            rendered = before
        after = render(messages[: i + 1])
        segments.append((take_suffix(after, rendered, where), msg["role"] == "assistant"))
        rendered = after
    return segments


def take_suffix(text: str, prefix: str, where: str) -> str:
    if not text.startswith(prefix):
        raise DataFormatError(
            f"{where}: the chat template does not render a conversation as a prefix of its continuation, "
            "so completion tokens cannot be told apart; use prompt/completion rows instead"
        )
    return text[len(prefix) :]


def row_segments(data: dict[str, Any], tokenizer, where: str) -> list[tuple[str, bool]]:
    if "messages" in data:
        return chat_segments(data["messages"], tokenizer, where)
    return [(data["prompt"], False), (data["completion"], True)]


def encode_row(row: Row, tokenizer, max_length: int | None, truncation: bool) -> Example:
    """Tokenise each piece on its own (so the completion boundary is exact) and concatenate.

    prompt/completion rows start with the tokenizer's own special prefix (e.g. BOS) unless the prompt
    text already carries it (the rule evaluation uses: ``loading.prompt_prefix``) and end with EOS,
    which is a completion token so the model learns to stop; chat rows rely on the template's markers.
    """
    is_chat = "messages" in row.data
    input_ids: list[int] = [] if is_chat else prompt_prefix(tokenizer, row.data["prompt"])
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    for text, is_completion in row_segments(row.data, tokenizer, row.where):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        input_ids += ids
        labels += ids if is_completion else [IGNORE_INDEX] * len(ids)
    if not is_chat and tokenizer.eos_token_id is not None and input_ids[-1:] != [tokenizer.eos_token_id]:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if max_length is not None and len(input_ids) > max_length:
        if not truncation:
            raise DataFormatError(
                f"{row.where}: example is {len(input_ids)} tokens, longer than max_length={max_length} "
                "(raise --max-length or allow truncation with --truncation)"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    example = Example(input_ids, labels)
    if example.num_loss_tokens == 0:
        field = "messages" if is_chat else "completion"
        raise DataFormatError(
            f"{row.where}: field {field!r} leaves no completion tokens"
            + (f" after truncation to max_length={max_length}" if truncation and max_length else "")
        )
    return example


def encode_rows(rows: list[Row] | list[dict], tokenizer, max_length: int | None = None, truncation: bool = False) -> list[Example]:
    """Tokenise validated rows. Plain dicts (from :func:`load_rows`) are accepted and named by index."""
    rows = [r if isinstance(r, Row) else Row(f"row {i}", validate_row(r, f"row {i}")) for i, r in enumerate(rows)]
    return [encode_row(r, tokenizer, max_length, truncation) for r in rows]


def load_examples(path: str | os.PathLike, tokenizer, max_length: int | None = None, truncation: bool = False) -> list[Example]:
    """Read, validate and tokenise a data file: every error is raised here, before any training."""
    return encode_rows(read_rows(path), tokenizer, max_length, truncation)


# ---------------------------------------------------------------- batching


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A seeded shuffle of one epoch; depends only on (seed, epoch), so a resumed run sees the same order."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(num_examples, generator=gen).tolist())


def stream_indices(num_examples: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start+count`` of the endless stream of shuffled epochs."""
    return [epoch_order(num_examples, seed, pos // num_examples)[pos % num_examples] for pos in range(start, start + count)]


def make_batches(
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    seed: int = 0,
    step: int = 0,
    grad_accum: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """The ``grad_accum`` micro-batches that ``rank`` trains on at optimizer step ``step``.

    One step consumes ``batch_size × grad_accum × world_size`` consecutive positions of the shuffled
    stream; micro-batch m of rank r is slice ``m·world_size + r`` of it. So the global batch of a step
    is the same however it is split over processes, which is what makes a 2-process run equal a
    1-process run with the same global batch.

    Example:
        >>> micro_batches = make_batches(examples, batch_size=8, pad_id=0, seed=0, step=0)  # doctest: +SKIP
    """
    per_step = batch_size * grad_accum * world_size
    positions = stream_indices(len(examples), seed, step * per_step, per_step)
    batches = []
    for m in range(grad_accum):
        chunk = m * world_size + rank
        ids = positions[chunk * batch_size : (chunk + 1) * batch_size]
        batches.append(collate([examples[i] for i in ids], pad_id))
    return batches


def calibration_batches(examples: list[Example], batch_size: int, pad_id: int, seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` batches of the training stream, for data-driven scorers (same on every rank)."""
    return [make_batches(examples, batch_size, pad_id, seed=seed, step=s)[0] for s in range(count)]
