"""Reading data and config files with errors that name the file, the line and the field."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from .atomic import given_path
from .errors import ConfigError, DataFormatError


def existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such data file")
    return path


def existing_data(path: str | os.PathLike, flag: str = "--data") -> Path | str:
    """``path`` when a data file or datasets directory is there. Verbs call it before loading a model, so a
    typo is reported at once rather than after the model has loaded. A Hugging Face dataset name
    (``hf:NAME[:CONFIG]:SPLIT``) passes as it is: it is checked when it loads. ``flag``: what the error names.
    An empty path is refused: as Path("") it is the working directory, which exists, so it passed here."""
    from .hfdata import is_dataset_spec

    if is_dataset_spec(path):
        return path
    path = given_path(path, flag, what="a data file or a Hugging Face dataset hf:NAME[:CONFIG]:SPLIT")
    if not path.exists():
        raise DataFormatError(f"{flag} {path}: no such data file")
    return path


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for each non-blank line; ``where`` is ``file:line N`` for error messages.

    The one JSON Lines reader: task data, probe files and training data (``sparseft.training.data``).
    """
    path = existing_file(path)
    with open(path, "rb") as handle:  # bytes, so a bad byte is reported with its line
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # a column at the end stays on this line
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataFormatError(f"{where}: JSON nested too deeply to read") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def read_objects(source: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for each row of a JSON Lines file or of a Hugging Face dataset split
    (``hf:NAME[:CONFIG]:SPLIT``, see ``sparseft.hfdata``): the task loaders read either the same way."""
    from .hfdata import dataset_rows, is_dataset_spec

    return dataset_rows(source) if is_dataset_spec(source) else read_jsonl(source)


def text_field(obj: dict[str, Any], field: str, where: str) -> str:
    """A required, non-empty string field."""
    if field not in obj:
        raise DataFormatError(f"{where}: missing field {field!r} (fields present: {sorted(obj)})")
    value = obj[field]
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{where}: field {field!r} must be a non-empty string, got {value!r:.60}")
    return value


def take(records: list, limit: int | None, path: str | os.PathLike, what: str = "examples") -> list:
    """The first ``limit`` records (all when ``limit`` is None) read from ``path``; none is an error there."""
    if not records:
        raise DataFormatError(f"{path}: no {what}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of examples, got {limit}")
    return records if limit is None else records[:limit]


def records_sha256(records: Iterable[dict[str, Any]]) -> str:
    """sha256 of rows as canonical JSON, in order: the same examples hash alike wherever their file lies (a
    loaded eval split, a Hugging Face dataset's rows)."""
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(record, sort_keys=True, default=str).encode() + b"\n")
    return h.hexdigest()


def read_text_file(path: str | os.PathLike, error: type[Exception]) -> str:
    """The text of the UTF-8 file ``path``; a byte that is not UTF-8 raises ``error`` naming the file and
    its line, as :func:`read_jsonl` does, so every reader of a text file refuses it the same way."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        at = f"{e.reason} at byte {e.start - line_start} of the line"
        raise error(f"{path}:line {line}: not UTF-8 text ({at})") from None


def read_yaml_file(path: str | os.PathLike, error: type[Exception]) -> tuple[Any, str]:
    """``(value, text)`` of the YAML file ``path`` (the text for :func:`yaml_key_lines`). Text that is not
    UTF-8, not YAML (reported with its line) or nested too deeply for the parser raises ``error`` naming
    the file: the one rule for bench configs, task files and train configs."""
    text = read_text_file(path, error)
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise error(f"{path}: YAML nested too deeply to read") from None


def read_json_file(path: Path, error: type[Exception]) -> Any:
    """The JSON value in ``path``; unreadable JSON (bad syntax, bad UTF-8, nesting too deep for the
    parser) raises ``error`` naming the file, so every reader of a JSON file refuses it the same way."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read") from None


def yaml_key_lines(text: str, nested: tuple[str, ...] = ()) -> dict[str, int]:
    r"""``{key: 1-based line}`` of the top-level keys of the YAML mapping in ``text``, and of the keys one
    level under each key in ``nested``: where an error about a field points. ``{}`` for text that is
    not a YAML mapping (the caller's own parse reports that).

    Example:
        >>> yaml_key_lines("a: 1\nb:\n  c: 2\n", nested=("b",))
        {'a': 1, 'b': 2, 'c': 3}
    """
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    lines = {}
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        lines[key.value] = key.start_mark.line + 1
        if key.value in nested and isinstance(value, yaml.MappingNode):
            lines.update({k.value: k.start_mark.line + 1 for k, _ in value.value if isinstance(k, yaml.ScalarNode)})
    return lines


def yaml_item_lines(text: str, key: str) -> list[int]:
    r"""The 1-based line of each item of the list under top-level ``key`` in the YAML ``text`` (``[]`` when
    there is none): where an error about ``key[i]`` points.

    Example:
        >>> yaml_item_lines("runs:\n  - {id: a}\n  - id: b\n    lr: 1\n", "runs")
        [2, 3]
    """
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return []
    if not isinstance(node, yaml.MappingNode):
        return []
    for k, value in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []
