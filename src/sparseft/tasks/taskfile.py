"""Tasks declared in a YAML file (``--task path/to/task.yaml``) or by flags, without writing Python.

A task file names the family, the prompt template (its ``{placeholders}`` are fields of each JSON Lines
row), the field that holds the answer, the label words for classification (or ``from_data``), and the
headline metric. For example (docs/tasks.md walks through it)::

    family: classification
    template: "Which team should handle this ticket? Answer with one word: {labels}.\\n\\nTicket: {body}"
    label_field: team
    labels: [hardware, software, network]   # or: from_data
    metric: accuracy

Errors name the file, the line of the offending key and what was expected (``TaskFileError``).
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataFormatError, TaskFileError
from ..files import read_objects, read_yaml_file, take, text_field, yaml_key_lines
from .base import Record
from .classification import ClassificationTask
from .qa import QATask
from .summarization import SummarizationTask

FAMILIES = ("classification", "qa", "summarization")
METRICS = {
    "classification": ("accuracy",),
    "qa": ("f1", "exact_match"),
    "summarization": ("rouge1", "rouge2", "rougeL"),
}
ANSWER_KEYS = {"classification": "label_field", "qa": "answer_field", "summarization": "summary_field"}
DEFAULT_ANSWER_FIELDS = {"classification": "label", "qa": "answers", "summarization": "summary"}
COMMON_KEYS = {"name", "family", "template", "metric", "description"}
FAMILY_KEYS = {
    "classification": {"label_field", "labels"},
    "qa": {"answer_field", "max_new_tokens"},
    "summarization": {"summary_field", "max_new_tokens"},
}
LABELS_FROM_DATA = "from_data"
DEFAULT_CLASSIFICATION_TEMPLATE = "Classify this text. Answer with one word: {labels}.\n\nText: {text}"


def looks_like_task_file(name: str) -> bool:
    return str(name).endswith((".yaml", ".yml"))


# ---------------------------------------------------------------- records from JSON Lines


def template_fields(template: str, where: str) -> list[str]:
    """The placeholders of ``template`` (``{labels}`` excluded: the task fills it in)."""
    try:
        parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise TaskFileError(f"{where}: template is not a valid format string ({e}); write a literal brace as {{{{ or }}}}") from None
    names = [f for f, _, _ in parts]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise TaskFileError(f"{where}: template placeholder {{{bad[0]}}} must be a plain field name like {{text}}")
    # A format spec or conversion ({body:d}, {body!r}, {body:>99999999}) fails or blows up only when a prompt
    # is rendered, mid-evaluation: the fields are text and go in as they are.
    for name, spec, conv in parts:
        if spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise TaskFileError(f"{where}: placeholder {shown} may not carry a format spec or conversion; "
                                f"write {{{name}}}")
    return sorted(set(names) - {"labels"})


def read_fields(obj: dict[str, Any], fields: list[str], where: str) -> Record:
    return {f: text_field(obj, f, where) for f in fields}


@dataclass
class FileClassificationTask(ClassificationTask):
    """Classification over JSON Lines rows whose fields fill ``template`` and whose ``label_field`` is a label word."""

    reader: Any = field(default=None, repr=False)
    label_field: str = "label"
    labels_from_data: bool = False
    text_fields: list[str] = field(default_factory=list)
    primary_metric: str | None = "accuracy"

    def load(self, path, limit=None):
        rows = list(read_objects(path))
        if self.labels_from_data and not self.labels:
            # Sorted, so a train and an eval file with the same label set give the same order.
            self.labels = sorted({text_field(obj, self.label_field, where) for where, obj in rows})
        records = []
        for where, obj in rows:
            record = read_fields(obj, self.text_fields, where)
            label = text_field(obj, self.label_field, where)
            if label not in self.labels:
                raise DataFormatError(f"{where}: field {self.label_field!r} is {label!r}; expected one of {self.labels}")
            records.append({**record, "label": self.labels.index(label)})
        return take(records, limit, path)


@dataclass
class FileQATask(QATask):
    """Question answering over JSON Lines rows; ``answer_field`` holds one answer or a list of accepted ones."""

    answer_field: str = "answers"
    text_fields: list[str] = field(default_factory=list)

    def load(self, path, limit=None):
        records = []
        for where, obj in read_objects(path):
            answers = obj.get(self.answer_field)
            answers = [answers] if isinstance(answers, str) else answers
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or not any(a.strip() for a in answers):
                raise DataFormatError(
                    f"{where}: field {self.answer_field!r} must be a non-empty string or a list of strings, "
                    f"got {obj.get(self.answer_field)!r:.60}"
                )
            records.append({**read_fields(obj, self.text_fields, where), "answers": [a for a in answers if a.strip()]})
        return take(records, limit, path)


@dataclass
class FileSummarizationTask(SummarizationTask):
    """Summarization over JSON Lines rows; ``summary_field`` holds the reference summary."""

    summary_field: str = "summary"
    text_fields: list[str] = field(default_factory=list)
    primary_metric: str | None = "rouge1"

    def load(self, path, limit=None):
        records = [
            {**read_fields(obj, self.text_fields, where), "summary": text_field(obj, self.summary_field, where).strip()}
            for where, obj in read_objects(path)
        ]
        return take(records, limit, path)


# ---------------------------------------------------------------- building a task from a mapping


class Locator:
    """``where(key)``: ``file:line N: key 'x'`` for a key of the task file (or just the file)."""

    def __init__(self, source: str, lines: dict[str, int] | None = None):
        self.source, self.lines = source, lines or {}

    def __call__(self, key: str | None = None) -> str:
        if key is None:
            return self.source
        line = self.lines.get(key)
        return f"{self.source}:line {line}: key {key!r}" if line else f"{self.source}: key {key!r}"


def string_key(spec: dict[str, Any], key: str, where: Locator, default: str | None = None) -> str:
    value = spec.get(key, default)
    if value is None:
        raise TaskFileError(f"{where()}: missing key {key!r}")
    if not isinstance(value, str) or not value.strip():
        raise TaskFileError(f"{where(key)} must be a non-empty string, got {value!r:.60}")
    return value


def parse_labels(value: Any, where: Locator) -> list[str]:
    """A list of distinct label words, or [] for ``from_data``."""
    if value == LABELS_FROM_DATA:
        return []
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) and v.strip() for v in value):
        raise TaskFileError(f"{where('labels')} must be a list of two or more label words, or {LABELS_FROM_DATA!r}; got {value!r:.80}")
    if len(set(value)) != len(value):
        raise TaskFileError(f"{where('labels')} repeats a label: {value}")
    return list(value)


def task_from_spec(spec: Any, where: Locator, default_name: str = "custom") -> ClassificationTask | QATask | SummarizationTask:
    """A task from the mapping of a task file (or of flags); every key is checked before anything is built."""
    if not isinstance(spec, dict):
        raise TaskFileError(f"{where()}: expected a mapping of task keys (family, template, ...), got {type(spec).__name__}")
    family = spec.get("family")
    if family not in FAMILIES:
        raise TaskFileError(f"{where('family') if 'family' in spec else where() + ': key family'} must be one of {list(FAMILIES)}, got {family!r}")
    unknown = sorted(set(spec) - COMMON_KEYS - FAMILY_KEYS[family], key=str)  # YAML keys need not be strings (`1: x`)
    if unknown:
        allowed = sorted(COMMON_KEYS | FAMILY_KEYS[family])
        key = where(unknown[0]) if unknown[0] is not None else f"{where()}: key null"  # where(None) is the file alone
        raise TaskFileError(f"{key} is not a key of a {family} task; known keys: {allowed}")
    name = string_key(spec, "name", where, default_name)
    template = string_key(spec, "template", where, DEFAULT_CLASSIFICATION_TEMPLATE if family == "classification" else None)
    fields = template_fields(template, where("template"))
    if not fields:
        raise TaskFileError(f"{where('template')} has no {{field}} placeholder, so every prompt would be the same")
    answer_key = ANSWER_KEYS[family]
    answer_field = string_key(spec, answer_key, where, DEFAULT_ANSWER_FIELDS[family])
    metric = spec.get("metric", METRICS[family][0])
    if metric not in METRICS[family]:
        raise TaskFileError(f"{where('metric')} must be one of {list(METRICS[family])} for a {family} task, got {metric!r}")
    if family == "classification":
        if "labels" not in spec:
            raise TaskFileError(f"{where()}: missing key 'labels' (a list of label words, or {LABELS_FROM_DATA!r})")
        labels = parse_labels(spec["labels"], where)
        return FileClassificationTask(
            name=name, template=template, labels=labels, label_field=answer_field,
            labels_from_data=not labels, text_fields=fields, primary_metric=metric,
        )
    max_new = spec.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
        raise TaskFileError(f"{where('max_new_tokens')} must be a positive integer, got {max_new!r}")
    extra = {"max_new_tokens": max_new} if max_new is not None else {}
    if family == "qa":
        return FileQATask(name=name, template=template, answer_field=answer_field, text_fields=fields, primary_metric=metric, **extra)
    return FileSummarizationTask(
        name=name, template=template, summary_field=answer_field, text_fields=fields, primary_metric=metric, **extra
    )


def load_task_file(path: str | os.PathLike) -> ClassificationTask | QATask | SummarizationTask:
    """The task a YAML file declares; its name defaults to the file's stem.

    Example:
        >>> task = load_task_file("docs/examples/tickets/task.yaml")  # doctest: +SKIP
        >>> task.evaluate(model, tokenizer, task.load("docs/examples/tickets/test.jsonl"))  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such task file")
    spec, text = read_yaml_file(path, TaskFileError)
    return task_from_spec(spec, Locator(str(path), yaml_key_lines(text)), default_name=path.stem)


def classification_from_flags(
    labels: str | None, text_field_name: str = "text", label_field: str = "label", template: str | None = None
) -> ClassificationTask:
    """``--task classification --labels a,b,c --text-field text --label-field label`` as a task.
    Without ``labels`` they are taken from the data."""
    text_field_name = text_field_name or "text"
    spec: dict[str, Any] = {
        "family": "classification",
        "name": "classification",
        "label_field": label_field or "label",
        "labels": [w.strip() for w in labels.split(",")] if labels else LABELS_FROM_DATA,
        "template": template or DEFAULT_CLASSIFICATION_TEMPLATE.replace("{text}", "{" + text_field_name + "}"),
    }
    return task_from_spec(spec, Locator("--task classification"))
