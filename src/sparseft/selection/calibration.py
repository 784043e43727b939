"""Calibration batches from a JSONL file, for ``sparseft select``.

Stop-gap: ``sparseft.training.data`` (rows → batches with completion-only labels) is being written
in parallel; once it lands, ``cli/select.py`` should call it and this module can go. Kept tiny and
self-contained for that reason.

Rows: ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}`` whose
last message is the assistant's answer. Labels are -100 on prompt tokens and padding, so the loss
(and hence the gradient statistics) comes from the completion only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import DataFormatError


def row_texts(row: object, where: str, tokenizer) -> tuple[str, str]:
    """(prompt, completion) of one row."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return row["prompt"], row["completion"]
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: expected string fields 'prompt' and 'completion', or a 'messages' list")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataFormatError(f"{where}: messages[{j}] must have string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(f"{where}: the last message must have role 'assistant' (the completion)")
    history = messages[:-1]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: "
    return prompt, messages[-1]["content"]


def encode_row(prompt: str, completion: str, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    completion_ids = completion_ids[:max_length]
    # Keep the end of the prompt: it is what the completion is conditioned on most directly.
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - len(completion_ids))) :]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def load_calibration_batches(
    path: str | os.PathLike, tokenizer, num_batches: int, batch_size: int = 4, max_length: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Up to ``num_batches`` batches from the first rows of ``path`` (reads no further than needed)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such data file")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows, batches = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if len(batches) == num_batches:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: not valid JSON ({e})") from e
            rows.append(encode_row(*row_texts(row, where, tokenizer), tokenizer, max_length))
            if len(rows) == batch_size:
                batches.append(collate(rows, pad_id))
                rows = []
    if rows and len(batches) < num_batches:
        batches.append(collate(rows, pad_id))
    if not batches:
        raise DataFormatError(f"{path}: holds no rows")
    return batches
