"""The server's diff registry: named diffs, numbered versions, one current version per name, rollback.

Loading a diff under a name adds version ``max + 1`` and makes it current; ``rollback`` makes the
version before the current one current again (newer versions stay addressable as ``NAME@VERSION``);
``unload`` forgets a name with all its versions.

With a directory the state survives restarts: each loaded version is copied to
``DIR/diffs/<name>/v<version>/`` (so later edits to the source directory change nothing served) and
``DIR/registry.json`` (plain JSON, replaced atomically) records names, versions and current pointers.
Every stored version is read and validated against the base again at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_dir, atomic_file
from ..delta import Entries  # module name -> (flat indices, values rounded to the weight's dtype)
from ..diffio import CONFIG_NAME, DELTA_NAME, SparseDiff, file_sha256, read_diff
from ..errors import DiffRegistryError, InvalidModelError, SparseFTError, UnknownDiffError
from ..files import read_json_file

REGISTRY_FILE = "registry.json"
REGISTRY_FORMAT = "sparseft-serve-registry"
REGISTRY_VERSION = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Validates a diff against the served base and returns its entries (``Engine.validated_entries``).
ValidatedEntries = Callable[[SparseDiff, str], Entries]


@dataclass(eq=False)  # identity matters: the engine compares "is this the version merged now?"
class DiffVersion:
    """One loaded version of a named diff."""

    name: str
    version: int
    source: str
    content_sha256: str
    num_entries: int
    loaded_at: float
    entries: Entries
    stored_at: str | None = None  # relative to the registry directory

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def record(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": self.source,
            "path": self.stored_at,
            "content_sha256": self.content_sha256,
            "num_entries": self.num_entries,
            "loaded_at": self.loaded_at,
        }


def content_sha256(path: Path) -> str:
    """One hash over both files of a diff directory: same hash, same diff."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, DELTA_NAME):
        h.update(file_sha256(path / name).encode())
    return h.hexdigest()


VERSION_PATTERN = re.compile(r"[0-9]{1,12}")


def parse_model_id(model_id: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None); ``"name@3"`` -> (name, 3)."""
    name, at, version = model_id.partition("@")
    if not at:
        return name, None
    if not VERSION_PATTERN.fullmatch(version):  # str.isdigit() would take '²' and then int() fails
        # Malformed, not merely unknown: the client's request is wrong (400, where an unknown version is 404).
        raise InvalidModelError(f"model {model_id!r}: the part after '@' must be a version number, got {version!r}")
    return name, int(version)


UNLOADED_PREFIX = ".unloaded-"


class DiffRegistry:
    """Thread-safe map of diff names to versions; persistent when given a directory."""

    def __init__(
        self,
        validated_entries: ValidatedEntries,
        reserved_names: tuple[str, ...] = (),
        directory: str | os.PathLike | None = None,
    ):
        self._validated_entries = validated_entries
        self._reserved = set(reserved_names)
        self._lock = threading.RLock()
        self._versions: dict[str, list[DiffVersion]] = {}
        self._current: dict[str, int] = {}
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self._restore()

    # ------------------------------------------------------------ queries

    def resolve(self, model_id: str) -> DiffVersion:
        """The version a request's ``model`` names: the current one for ``name``, or ``name@version``."""
        name, version = parse_model_id(model_id)
        with self._lock:
            versions = self._versions.get(name)
            if not versions:
                raise UnknownDiffError(f"the model `{model_id}` does not exist (no diff named {name!r} is loaded)")
            wanted = self._current[name] if version is None else version
            for v in versions:
                if v.version == wanted:
                    return v
            have = ", ".join(str(v.version) for v in versions)
        raise UnknownDiffError(f"the model `{model_id}` does not exist (diff {name!r} has versions {have})")

    def snapshot(self) -> list[tuple[str, list[DiffVersion]]]:
        """Every name with its versions, taken at one instant."""
        with self._lock:
            return [(name, list(versions)) for name, versions in sorted(self._versions.items())]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._versions)

    def versions(self, name: str) -> list[DiffVersion]:
        with self._lock:
            if name not in self._versions:
                raise UnknownDiffError(f"no diff named {name!r} is loaded")
            return list(self._versions[name])

    def current(self, name: str) -> DiffVersion:
        return self.resolve(name)

    def count_versions(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._versions.values())

    def listing(self) -> list[dict[str, Any]]:
        """What ``GET /admin/diffs`` shows: every name with its versions and which one is current."""
        with self._lock:
            return [
                {
                    "name": name,
                    "current": self._current[name],
                    "versions": [{k: v for k, v in ver.record().items() if k != "path"} for ver in versions],
                }
                for name, versions in sorted(self._versions.items())
            ]

    # ------------------------------------------------------------ changes

    def load(self, name: str, path: str | os.PathLike) -> DiffVersion:
        """Validate the diff at ``path`` against the base and make it the new current version of ``name``."""
        self._check_name(name)
        path = Path(path).resolve()
        diff = read_diff(path)
        entries = self._validated_entries(diff, str(path))
        sha = content_sha256(path)
        if diff.file_hashes.get(DELTA_NAME) and file_sha256(path / DELTA_NAME) != diff.file_hashes[DELTA_NAME]:
            raise DiffRegistryError(f"{path / DELTA_NAME}: changed while it was being loaded; load it again")
        with self._lock:
            number = max((v.version for v in self._versions.get(name, [])), default=0) + 1
            loaded = DiffVersion(name, number, str(path), sha, diff.num_entries, time.time(), entries)
            if self.directory is not None:
                loaded.stored_at = self._store_copy(path, name, number)
            self._versions.setdefault(name, []).append(loaded)
            previous = self._current.get(name)
            self._current[name] = number
            try:
                self._save()
            except BaseException:
                self._forget_version(loaded, previous)
                raise
        return loaded

    def ensure(self, name: str, path: str | os.PathLike) -> DiffVersion:
        """Start-up ``--diff NAME=DIR``: reuse a stored version with the same content (the registry's current
        pointer, e.g. after a rollback, is kept), otherwise load it as a new version."""
        self._check_name(name)
        sha = content_sha256(Path(path)) if (Path(path) / DELTA_NAME).is_file() else None
        with self._lock:
            for v in self._versions.get(name, []):
                if v.content_sha256 == sha:
                    return v
        return self.load(name, path)

    def unload(self, name: str) -> list[DiffVersion]:
        """Forget ``name`` and all its versions (and their stored copies).

        If ``registry.json`` cannot be written, the name stays loaded, in memory and on disk, as before.
        """
        with self._lock:
            if name not in self._versions:
                raise UnknownDiffError(f"no diff named {name!r} is loaded")
            removed, current = self._versions.pop(name), self._current.pop(name)
            try:
                self._save()
            except BaseException:
                self._versions[name], self._current[name] = removed, current
                raise
            # Moved aside under the lock, so a load of the same name right after cannot lose its new copy.
            doomed = self._set_aside(name)
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
        return removed

    def rollback(self, name: str, version: int | None = None) -> DiffVersion:
        """Make ``version`` (default: the one before the current) the current version of ``name``."""
        with self._lock:
            versions = self.versions(name)
            numbers = [v.version for v in versions]
            current = self._current[name]
            if version is None:
                earlier = [n for n in numbers if n < current]
                if not earlier:
                    raise DiffRegistryError(f"diff {name!r} has no version before {current} to roll back to")
                version = max(earlier)
            elif version not in numbers:
                raise UnknownDiffError(f"diff {name!r} has no version {version} (versions: {numbers})")
            self._current[name] = version
            try:
                self._save()
            except BaseException:
                self._current[name] = current
                raise
            return self.resolve(f"{name}@{version}")

    # ------------------------------------------------------------ internals

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise DiffRegistryError(
                f"diff name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if name in self._reserved:
            raise DiffRegistryError(f"diff name {name!r} is the base model's name; choose another")

    def _forget_version(self, loaded: DiffVersion, previous: int | None) -> None:
        self._versions[loaded.name].remove(loaded)
        if previous is None:
            del self._versions[loaded.name], self._current[loaded.name]
        else:
            self._current[loaded.name] = previous
        if loaded.stored_at:
            shutil.rmtree(self.directory / loaded.stored_at, ignore_errors=True)

    def _set_aside(self, name: str) -> Path | None:
        """Rename the stored copies of an unloaded ``name`` out of the way; the caller deletes them unlocked."""
        if self.directory is None:
            return None
        stored = self.directory / "diffs" / name
        aside = self.directory / "diffs" / f"{UNLOADED_PREFIX}{name}-{uuid.uuid4().hex}"  # no diff name starts with '.'
        try:
            stored.rename(aside)
        except FileNotFoundError:
            return None
        except OSError:  # cannot rename: delete in place, still under the lock
            shutil.rmtree(stored, ignore_errors=True)
            return None
        return aside

    def _store_copy(self, source: Path, name: str, number: int) -> str:
        relative = f"diffs/{name}/v{number}"
        target = self.directory / relative
        # Replaces a copy left over from a load whose registry.json write failed.
        with atomic_dir(target) as tmp:
            for file in (CONFIG_NAME, DELTA_NAME):
                shutil.copyfile(source / file, tmp / file)
        return relative

    def _state(self) -> dict[str, Any]:
        return {
            "format": REGISTRY_FORMAT,
            "format_version": REGISTRY_VERSION,
            "diffs": {
                name: {"current": self._current[name], "versions": [v.record() for v in versions]}
                for name, versions in sorted(self._versions.items())
            },
        }

    def _save(self) -> None:
        if self.directory is None:
            return
        with atomic_file(self.directory / REGISTRY_FILE) as tmp, open(tmp, "w") as f:
            json.dump(self._state(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    def _restore(self) -> None:
        # Copies set aside by an unload whose delete failed (crash, busy file): registry.json had already
        # forgotten them, so nothing refers to them any more.
        for leftover in (self.directory / "diffs").glob(f"{UNLOADED_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        file = self.directory / REGISTRY_FILE
        if not file.exists():
            return
        state = read_registry_file(file)
        for name, entry in state["diffs"].items():
            try:  # e.g. a restart whose base is served under this diff's name: requests for it would get the base
                self._check_name(name)
            except DiffRegistryError as e:
                raise DiffRegistryError(f"{file}: {e}") from None
            for record in entry["versions"]:
                self._restore_version(file, name, record)
            numbers = [v.version for v in self._versions.get(name, [])]
            if entry["current"] not in numbers:
                raise DiffRegistryError(f"{file}: diff {name!r} has current {entry['current']!r}, not among versions {numbers}")
            self._current[name] = entry["current"]

    def _restore_version(self, file: Path, name: str, record: dict[str, Any]) -> None:
        where = f"{file}: diff {name!r} version {record.get('version')!r}"
        try:
            stored = self.directory / record["path"]
            diff = read_diff(stored)
            entries = self._validated_entries(diff, str(stored))
            loaded = DiffVersion(
                name, int(record["version"]), record["source"], content_sha256(stored), diff.num_entries,
                float(record["loaded_at"]), entries, stored_at=record["path"],
            )
        except (KeyError, TypeError, ValueError, SparseFTError) as e:
            raise DiffRegistryError(f"{where} no longer loads: {e}") from e
        if loaded.content_sha256 != record["content_sha256"]:
            raise DiffRegistryError(f"{where}: stored files at {stored} were modified since they were registered")
        self._versions.setdefault(name, []).append(loaded)


def stored_paths(directory: str | os.PathLike | None) -> list[Path]:
    """Every version a registry directory stores, as it will restore them (none without a registry.json);
    read leniently: the restore itself names what is wrong with the file."""
    file = Path(directory) / REGISTRY_FILE if directory is not None else None
    if file is None or not file.is_file():
        return []
    try:
        diffs = read_registry_file(file)["diffs"]
    except DiffRegistryError:
        return []
    return [Path(directory) / record["path"] for entry in diffs.values() for record in entry["versions"]
            if isinstance(record, dict) and isinstance(record.get("path"), str)]


def read_registry_file(file: Path) -> dict[str, Any]:
    """Parse and shape-check ``registry.json``; every problem names the file and the field."""
    state = read_json_file(file, DiffRegistryError)
    if not isinstance(state, dict) or state.get("format") != REGISTRY_FORMAT:
        raise DiffRegistryError(f"{file}: not a sparseft serving registry (field 'format' must be {REGISTRY_FORMAT!r})")
    if state.get("format_version") != REGISTRY_VERSION:
        raise DiffRegistryError(
            f"{file}: format_version {state.get('format_version')!r} is not supported (expected {REGISTRY_VERSION})"
        )
    diffs = state.get("diffs")
    if not isinstance(diffs, dict):
        raise DiffRegistryError(f"{file}: field 'diffs' must be an object of name -> versions")
    for name, entry in diffs.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("versions"), list) or "current" not in entry:
            raise DiffRegistryError(f"{file}: diffs.{name} must hold 'current' and a list 'versions'")
        for i, record in enumerate(entry["versions"]):  # what restore reads: an object; a number int() would not bend
            at = f"{file}: diffs.{name}.versions[{i}]"
            if not isinstance(record, dict):
                raise DiffRegistryError(f"{at} must be an object, got {record!r:.100}")
            if type(record.get("version")) is not int or record["version"] < 1:
                raise DiffRegistryError(f"{at}.version must be a whole number >= 1, got {record.get('version')!r}")
            # The copy lives where _store_copy put it: a path edited to point elsewhere would serve files the
            # registry never copied (and an unload would delete them).
            expected = f"diffs/{name}/v{record['version']}"
            if record.get("path") != expected:
                raise DiffRegistryError(f"{at}.path must be {expected!r} (where the copy is stored), got {record.get('path')!r:.100}")
            for field in ("source", "content_sha256"):
                if not isinstance(record.get(field), str):
                    raise DiffRegistryError(f"{at}.{field} must be a string, got {record.get(field)!r:.100}")
        numbers = [record["version"] for record in entry["versions"]]
        if len(set(numbers)) != len(numbers):
            raise DiffRegistryError(f"{file}: diffs.{name} lists a version twice (versions: {numbers})")
    return state
