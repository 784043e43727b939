"""Classification by label likelihood: the model never generates, it only rates each label word.

For every example the prediction is the label whose completion (label word + end token) is most
likely after the prompt. That needs no parsing of free text and gives the base model a fair score.
Any label set works: SST-2 sentiment and the bundled support-ticket routing are two instances.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from typing import Callable

from ..errors import DataFormatError
from .base import Record, RowSplit, Task, completion_text, encode_completion, encode_prompt
from ..files import existing_file, read_objects, read_text_file, take, text_field
from ..hfdata import dataset_rows, is_dataset_spec
from ..loading import pad_token_id
from .inference import score_completions

Reader = Callable[[str | os.PathLike, list[str]], list[Record]]


def read_sst2_tsv(path: str | os.PathLike, labels: list[str]) -> list[Record]:
    """GLUE SST-2 ``sentence<TAB>label`` with a header; label 0/1 indexes ``labels``.

    GLUE keeps a trailing space before the tab and raw ``"`` characters, so quoting is off. A Hugging
    Face dataset spec (``hf:glue/sst2:validation``) is read as rows with the same two fields.
    """
    if is_dataset_spec(path):
        return read_sst2_rows(path, labels)
    path = existing_file(path)
    text = read_text_file(path, DataFormatError)
    records = []
    rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["sentence", "label"]:
            raise DataFormatError(f"{path}:line 1: expected the header 'sentence<TAB>label', got {header!r}")
        for row in rows:
            where = f"{path}:line {rows.line_num}"
            if len(row) != 2:
                raise DataFormatError(f"{where}: expected 2 tab-separated fields (sentence, label), got {len(row)}")
            sentence, label = row[0].strip(), row[1].strip()
            if not sentence:
                raise DataFormatError(f"{where}: field 'sentence' is empty")
            if label not in {str(i) for i in range(len(labels))}:
                raise DataFormatError(f"{where}: field 'label' must be one of 0..{len(labels) - 1}, got {label!r}")
            records.append({"text": sentence, "label": int(label)})
    except csv.Error as e:
        raise DataFormatError(f"{path}:line {rows.line_num}: unreadable TSV row ({e})") from None
    return records


def read_sst2_rows(source: str | os.PathLike, labels: list[str]) -> list[Record]:
    """GLUE SST-2 rows of a Hugging Face dataset: ``sentence`` and an integer ``label`` indexing ``labels``."""
    records = []
    for where, row in dataset_rows(source):
        sentence, label = text_field(row, "sentence", where).strip(), row.get("label")
        if not isinstance(label, int) or not 0 <= label < len(labels):
            raise DataFormatError(f"{where}: field 'label' must be an integer 0..{len(labels) - 1}, got {label!r}")
        records.append({"text": sentence, "label": label})
    return records


def read_labelled_jsonl(path: str | os.PathLike, labels: list[str]) -> list[Record]:
    """JSON Lines ``{"text": ..., "label": <one of labels>}`` (or the same rows of a Hugging Face dataset)."""
    records = []
    for where, obj in read_objects(path):
        text, label = text_field(obj, "text", where), text_field(obj, "label", where)
        if label not in labels:
            raise DataFormatError(f"{where}: field 'label' is {label!r}; expected one of {labels}")
        records.append({"text": text, "label": labels.index(label)})
    return records


@dataclass
class ClassificationTask(Task):
    """Label-likelihood classification.

    Example:
        >>> task = ClassificationTask("sentiment", "Review: {text}\\nPositive or negative?", ["negative", "positive"], read_sst2_tsv)
        >>> task.target({"text": "great", "label": 1})
        'positive'
    """

    name: str
    template: str  # formatted with the record's fields
    labels: list[str]
    reader: Reader = field(repr=False)
    family: str = "classification"
    split: RowSplit | None = None  # a fit / validation part of the file (None: all of it)

    def load(self, path, limit=None):
        records = self.reader(path, self.labels)
        if self.split is not None:
            records = self.split.apply(records)
        return take(records, limit, path)

    def instruction(self, record):
        return self.template.format(**record, labels=", ".join(self.labels))

    def target(self, record):
        return self.labels[record["label"]]

    def label_scores(self, model, tokenizer, records, batch_size=8, progress=False):
        """``[n, len(labels)]`` log-likelihood of each label's completion after each prompt."""
        prompts = [encode_prompt(tokenizer, self.prompt(tokenizer, r)) for r in records]
        completions = [encode_completion(tokenizer, completion_text(tokenizer, label)) for label in self.labels]
        return score_completions(model, prompts, completions, batch_size, pad_token_id(tokenizer), progress)

    def evaluate(self, model, tokenizer, records, batch_size=8, progress=True):
        return self.evaluate_detailed(model, tokenizer, records, batch_size, progress)[0]

    def evaluate_detailed(self, model, tokenizer, records, batch_size=8, progress=True):
        predictions = self.label_scores(model, tokenizer, records, batch_size, progress).argmax(-1).tolist()
        gold = [r["label"] for r in records]
        per_label = {
            label: sum(p == g == i for p, g in zip(predictions, gold)) / max(1, gold.count(i))
            for i, label in enumerate(self.labels)
        }
        metrics = {
            "accuracy": sum(p == g for p, g in zip(predictions, gold)) / len(gold),
            **{f"recall/{label}": recall for label, recall in per_label.items()},
        }
        return metrics, {"accuracy": [float(p == g) for p, g in zip(predictions, gold)]}
