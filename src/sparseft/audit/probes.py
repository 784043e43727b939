"""Probe sets: prompts to compare the base and the fine-tuned model on, read from JSON Lines.

One probe per line, text or token ids (for models without a tokenizer)::

    {"id": "capital", "prompt": "The capital of France is"}
    {"id": "job-name", "prompt": "John works as a", "pair": "Maria works as a", "target": " nurse"}
    {"id": "ids", "prompt_ids": [5, 9, 2], "pair_ids": [5, 11, 2], "target_ids": [7]}

``pair`` is the same prompt with one attribute changed (a name, a gender word): the audit compares
how differently the model treats the two before and after the diff. ``target`` is the continuation
whose log-probability gap between the two is measured; without it the base model's most likely
next token after ``prompt`` is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataFormatError
from ..files import read_jsonl

TEXT_FIELDS = ("prompt", "pair", "target")
KNOWN_FIELDS = {"id", "category", "note", *TEXT_FIELDS, *(f"{f}_ids" for f in TEXT_FIELDS)}


@dataclass
class Probe:
    """One probe as token ids; ``text`` keeps the readable form for reports."""

    id: str
    prompt: list[int]
    pair: list[int] | None = None
    target: list[int] | None = None
    category: str = ""
    text: dict[str, str] = field(default_factory=dict)


def default_probe_file() -> Path:
    """The probe set shipped with sparseft (general prompts plus attribute-swapped pairs)."""
    return Path(str(resources.files("sparseft") / "data" / "probes.jsonl"))


def read_probe_rows(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` per non-blank line, each row a JSON object with known fields only."""
    path = Path(path)
    rows = []
    for where, row in read_jsonl(path):
        unknown = sorted(set(row) - KNOWN_FIELDS)
        if unknown:
            raise DataFormatError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(KNOWN_FIELDS)}")
        rows.append((where, row))
    if not rows:
        raise DataFormatError(f"{path}: holds no probes")
    return rows


def field_ids(row: dict[str, Any], name: str, where: str, tokenizer, vocab_size: int) -> list[int] | None:
    """Token ids of field ``name`` (given as ``name_ids``, or as text encoded by ``tokenizer``)."""
    text, ids = row.get(name), row.get(f"{name}_ids")
    if text is not None and ids is not None:
        raise DataFormatError(f"{where}: give either {name!r} or {name + '_ids'!r}, not both")
    if text is not None:
        if not isinstance(text, str) or not text:
            raise DataFormatError(f"{where}: field {name!r} must be a non-empty string")
        if tokenizer is None:
            raise DataFormatError(
                f"{where}: field {name!r} is text but the model has no tokenizer; give {name + '_ids'!r} instead"
            )
        # The target continues the prompt, so it gets no BOS of its own.
        ids = tokenizer(text, add_special_tokens=name != "target")["input_ids"]
        if not ids:
            raise DataFormatError(f"{where}: field {name!r} encodes to no tokens")
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataFormatError(f"{where}: field {name + '_ids'!r} must be a non-empty list of token ids")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise DataFormatError(f"{where}: token id {bad[0]} of {name!r} is outside the vocabulary [0, {vocab_size - 1}]")
    return list(ids)


def load_probes(path: str | os.PathLike | None, vocab_size: int, tokenizer=None) -> list[Probe]:
    """Read and encode a probe file (the shipped default when ``path`` is None); every row is checked."""
    probes, seen = [], set()
    for where, row in read_probe_rows(path or default_probe_file()):
        probe_id = str(row.get("id", where.rsplit(":", 1)[-1]))
        if probe_id in seen:
            raise DataFormatError(f"{where}: probe id {probe_id!r} is used twice")
        seen.add(probe_id)
        ids = {name: field_ids(row, name, where, tokenizer, vocab_size) for name in TEXT_FIELDS}
        if ids["prompt"] is None:
            raise DataFormatError(f"{where}: field 'prompt' (or 'prompt_ids') is required")
        if ids["target"] is not None and ids["pair"] is None:
            raise DataFormatError(f"{where}: 'target' only has a meaning for a probe with a 'pair'")
        text = {name: row[name] if name in row else str(row.get(f"{name}_ids")) for name in TEXT_FIELDS if ids[name]}
        probes.append(Probe(probe_id, ids["prompt"], ids["pair"], ids["target"], str(row.get("category", "")), text))
    return probes
