"""Hugging Face dataset names as data sources: ``hf:glue/sst2:validation`` wherever a data file is taken.

A spec is ``[hf:]NAME[@REVISION][:CONFIG]:SPLIT``. ``NAME`` is a dataset on the Hub (``squad``,
``rajpurkar/squad``) or ``NAME/CONFIG`` (``glue/sst2``, ``nyu-mll/glue/sst2``); ``SPLIT`` may carry a slice
(``validation[:200]``). ``@REVISION`` pins the dataset repository's commit, tag or branch
(``hf:rajpurkar/squad@7b6d24c:validation``), so a later push to the dataset cannot change what a
recorded run trained on; without it the default branch loads, as it is that day. Without the ``hf:``
prefix a string is read as a spec only when no local file of that name exists, so a file path always
means the file.

Loading goes through ``datasets.load_dataset``: online it downloads, offline (``HF_HUB_OFFLINE=1`` /
``HF_DATASETS_OFFLINE=1``) it reads the local datasets cache that an earlier online load filled.
``glue/sst2`` is ambiguous (repository ``glue/sst2``, or dataset ``glue`` with configuration ``sst2``):
the repository is tried first, then the configuration.

Example:
    >>> parse_dataset_spec("hf:glue/sst2:validation[:100]")
    DatasetSpec(name='glue/sst2', config=None, split='validation[:100]', revision=None)
    >>> rows = list(dataset_rows("glue/sst2:validation"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import DataFormatError
from .files import records_sha256

PREFIX = "hf:"
SPEC = re.compile(
    r"^(?P<name>[\w.-]+(?:/[\w.-]+){0,2})(?:@(?P<revision>[\w./-]+?))?(?::(?P<config>[\w.-]+))?"
    r":(?P<split>[\w.-]+(?:\[[^\]]*\])?)$"
)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set lives on the Hub: ``name`` (maybe ``NAME/CONFIG``), ``config``, ``split``, and the
    ``revision`` of its repository (None: the default branch)."""

    name: str
    config: str | None
    split: str
    revision: str | None = None

    def candidates(self) -> list[tuple[str, str | None]]:
        """``(path, config)`` pairs to try with ``load_dataset``, the literal reading first."""
        if self.config is not None:
            return [(self.name, self.config)]
        parts = self.name.split("/")
        if len(parts) == 3:
            return [("/".join(parts[:2]), parts[2])]
        if len(parts) == 2:
            return [(self.name, None), (parts[0], parts[1])]
        return [(self.name, None)]

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{self.name}{revision}{':' + self.config if self.config else ''}:{self.split}"


def parse_dataset_spec(source: str | os.PathLike) -> DatasetSpec | None:
    """The spec ``source`` names, or None when it is a local path (or does not look like a spec)."""
    text = os.fspath(source)
    explicit = text.startswith(PREFIX)
    if not explicit and (Path(text).exists() or not isinstance(source, str)):
        return None
    match = SPEC.match(text[len(PREFIX):] if explicit else text)
    if match is None:
        if explicit:
            raise DataFormatError(
                f"{text}: not a Hugging Face dataset spec; expected hf:NAME[@REVISION][:CONFIG]:SPLIT, "
                "e.g. hf:glue/sst2:validation"
            )
        return None
    return DatasetSpec(match["name"], match["config"], match["split"], match["revision"])


def is_dataset_spec(source: str | os.PathLike) -> bool:
    return parse_dataset_spec(source) is not None


def load_hf_dataset(spec: DatasetSpec):
    """The split as a ``datasets.Dataset``; a clear ``DataFormatError`` naming every reading tried."""
    import datasets

    failures = []
    for path, config in spec.candidates():
        try:
            return datasets.load_dataset(path, config, split=spec.split, revision=spec.revision)
        except Exception as e:  # datasets raises many types here (not found, offline, bad split, bad revision)
            pinned = f", revision={spec.revision!r}" if spec.revision else ""
            failures.append(f"load_dataset({path!r}, {config!r}, split={spec.split!r}{pinned}): "
                            f"{type(e).__name__}: {e}")
    offline = " (offline: only data sets already in the local datasets cache can load)" if datasets.config.HF_HUB_OFFLINE else ""
    raise DataFormatError(
        f"{spec}: no local file of that name, and the Hugging Face dataset could not be loaded{offline}; "
        + "; ".join(failures)
    )


def dataset_rows(source: str | os.PathLike | DatasetSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each row of the split; ``where`` is ``hf:NAME:SPLIT:row N`` for error messages."""
    spec = source if isinstance(source, DatasetSpec) else parse_dataset_spec(source)
    if spec is None:
        raise DataFormatError(f"{source}: not a Hugging Face dataset spec (hf:NAME[:CONFIG]:SPLIT)")
    for number, row in enumerate(load_hf_dataset(spec)):
        yield f"{spec}:row {number}", row


def dataset_sha256(source: str | os.PathLike) -> str:
    """sha256 of the split's rows (canonical JSON, in order): the same data gives the same hash on any machine."""
    return records_sha256(row for _, row in dataset_rows(source))
