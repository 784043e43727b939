"""Outputs that a reader sees whole: the old version or the new one, never a partial one.

Everything sparseft writes for a user (diffs, checkpoints, adapters, converted models, registry copies)
goes to a temporary sibling first and is renamed into place at the end, so a crash part-way never
leaves a half-written directory where a reader (or ``--resume``) would take it for a finished one.

A file is replaced in one atomic rename. A directory cannot be renamed over a non-empty one, so
replacing one takes two renames (the old one aside, the new one in): between them the path briefly
does not exist, and a crash exactly there leaves the old version at ``.NAME.old-XXXXXXXX/NAME`` and
the new one at ``.NAME.tmp-XXXXXXXX`` beside the target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import AtomicReplaceError, ConfigError

# Files by which a directory shows it holds a sparseft output (a diff, a training run, an exported adapter, a
# merged model): only such a directory, or an empty one, may be replaced whole by a command's --out.
MERGE_RECORD = "sparseft_merge.json"  # beside a model `sparseft apply` merged: its base and diff
OUTPUT_MARKERS = ("sparse_config.json", "train_config.yaml", "metrics.jsonl", "checkpoints", "adapter_config.json",
                  MERGE_RECORD)
# ... and by which a directory shows it is one artifact, whoever wrote it: a model has config.json.
ARTIFACT_FILES = OUTPUT_MARKERS + ("config.json",)


def umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it is read by setting it and putting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_umask_mode(path: Path, mode: int) -> Path:
    """Give ``path`` the mode a plain ``mkdir`` / ``open`` would: ``mode`` less the umask. tempfile creates
    owner-only (0700 / 0600) entries, which must not leak into what the user gets."""
    os.chmod(path, mode & ~umask())
    return path


def follow_umask(root: Path) -> None:
    """Give every entry under ``root`` the mode ``mkdir`` / ``open`` would: libraries that write through
    temporary files (safetensors, tempfile) leave them owner-only."""
    mask = umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def check_out_dir(
    path: str | os.PathLike, flag: str = "--out", inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """``path`` when a command may write a directory there: it is absent, empty, or an earlier sparseft output
    (``OUTPUT_MARKERS``). Anything else would be replaced whole (``replace_dir``), so it is refused: a model
    directory given as ``--out`` by mistake, a data file, a folder of the user's own. So is a path that is, or
    holds, one of the command's ``inputs`` (None and paths that do not exist, such as model aliases, are skipped)."""
    path = check_dir_path(path, flag)
    if path.is_dir():
        held = sorted(p.name for p in path.iterdir())
        if held and not any(name in held for name in OUTPUT_MARKERS):
            shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            raise ConfigError(f"{flag} {path}: exists and holds files sparseft did not write ({shown}); writing "
                              "there would replace the whole directory: choose another path or remove it")
    check_not_an_input(path, inputs, flag)
    return path


def check_dir_to_write_into(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` when a command may add its files to it (a grid's results, a registry, an audit report): a
    directory that is not itself one artifact, or a path where one can be made. A diff, adapter, training run or
    model given there by mistake would keep working but hold files that are not its own (a Hub upload of it
    would carry them)."""
    path = check_dir_path(path, flag)
    held = [name for name in ARTIFACT_FILES if os.path.lexists(path / name)] if path.is_dir() else []
    if held:
        raise ConfigError(f"{flag} {path}: holds {held[0]}, so it is a diff, adapter, training run or model; "
                          "this command's files would mix with it: give a directory of their own")
    return path


def check_dir_path(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` when it is a directory, or a path where one can be made."""
    path = given_path(path, flag)
    check_creatable(path, flag)
    if os.path.lexists(path) and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file; expected a directory to write into (choose another path)")
    return path


def check_not_an_input(path: Path, inputs: Iterable[str | os.PathLike | None], flag: str) -> None:
    """Refuse an output directory that is, or contains, a path the command reads: replacing it would delete that
    input (a diff given as both --diff and --out), though its marker files let it pass as an earlier output."""
    out = path.resolve()
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue
        source = Path(given).resolve()
        if source == out or out in source.parents:
            what = "is" if source == out else "holds"
            raise ConfigError(f"{flag} {path}: {what} {given}, an input of this command; writing there would replace "
                              "it: choose another path")


def check_out_file(
    path: str | os.PathLike, flag: str = "--out", inputs: Iterable[str | os.PathLike | None] = (),
    example: str = "masks.safetensors",
) -> Path:
    """``path`` when a command may write a file there (absent, or a file it replaces in one rename), and it is
    none of the command's ``inputs``. ``example``: the file name the error suggests inside a directory given."""
    path = given_path(path, flag)
    check_creatable(path, flag)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; expected a file path (e.g. {path / example})")
    check_not_an_input(path, inputs, flag)
    return path


def given_path(
    path: str | os.PathLike, flag: str, what: str = "the path to write (use . for the working directory)",
) -> Path:
    """``path`` as a Path, refused when empty: Path("") is the working directory, which an unset shell variable
    (``--out "$OUT"``) would then have replaced whole, or taken as an input it is not. ``what``: what to give."""
    if not os.fspath(path).strip():
        raise ConfigError(f"{flag} is empty ({os.fspath(path)!r}); give {what}")
    return Path(path)


def check_creatable(path: Path, flag: str) -> None:
    """Refuse a path below a file (``data.jsonl/out``): no directory can be made there."""
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise ConfigError(f"{flag} {path}: cannot be created, {blocker} is a file")


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file rather than a folder; else None."""
    for parent in Path(path).absolute().parents:
        if os.path.lexists(parent):
            return None if parent.is_dir() else parent
    return None


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; when the block ends without an error it
    replaces ``target`` (``replace_dir``). If the block raises, the temporary directory is deleted and
    ``target`` is left as it was; if the final renames fail, the new content is kept (see ``replace_dir``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    follow_umask(tmp)
    replace_dir(tmp, target)


def replace_dir(new: Path, target: Path) -> None:
    """Rename the directory ``new`` to ``target``, replacing whatever is there.

    A reader of ``target`` sees the old version or the new one, never a mix: an existing ``target`` is
    first renamed into a fresh hidden sibling (``.NAME.old-XXXXXXXX/NAME``, unique per call, so a
    leftover from a crashed run is never in the way), then ``new`` is renamed to ``target``, and only
    then is the old version deleted. Between the two renames ``target`` does not exist; a crash there
    leaves the old version at the aside path. ``new`` is never deleted here: if a rename fails, the old
    version is put back where possible and AtomicReplaceError says where both versions are.
    """
    new, target = Path(new), Path(target)
    if not os.path.lexists(target):
        try:
            os.replace(new, target)
        except OSError as e:
            raise AtomicReplaceError(f"could not rename {new} to {target} ({e}); the new version is left at {new}") from e
        return
    aside_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    aside = aside_dir / target.name
    try:
        os.replace(target, aside)
    except OSError as e:
        shutil.rmtree(aside_dir, ignore_errors=True)
        raise AtomicReplaceError(
            f"could not move {target} aside to {aside} ({e}); {target} is unchanged and the new version is left at {new}"
        ) from e
    try:
        os.replace(new, target)
    except OSError as e:
        try:
            os.replace(aside, target)
            old_at = f"{target} still holds the old version"
            shutil.rmtree(aside_dir, ignore_errors=True)
        except OSError:
            old_at = f"the old version is at {aside}"
        raise AtomicReplaceError(f"could not rename {new} to {target} ({e}); the new version is left at {new} and {old_at}") from e
    shutil.rmtree(aside_dir, ignore_errors=True)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; on success it is renamed onto ``target`` in one
    atomic step, on error removed, so ``target`` always holds a complete file (the previous one until the rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    with_umask_mode(Path(tmp), 0o666)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_into(src: Path, dst: Path) -> None:
    """Put ``src`` (a file or a directory tree) at ``dst`` as hard links, copies where the filesystem
    has none: the original stays in place, so a crash before ``dst``'s directory is renamed in loses nothing."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if Path(src).is_dir():
        shutil.copytree(src, dst, copy_function=link_or_copy)
    else:
        link_or_copy(str(src), str(dst))


def leftovers(target: str | os.PathLike) -> list[Path]:
    """The staging (``.NAME.tmp-*``) and set-aside (``.NAME.old-*``) siblings that crashes left beside ``target``."""
    target = Path(target)
    return sorted(target.parent.glob(f".{target.name}.tmp-*")) + sorted(target.parent.glob(f".{target.name}.old-*"))


def remove_leftovers(target: str | os.PathLike) -> None:
    """Delete what ``leftovers`` finds; call it only when no other writer of ``target`` can be running."""
    for path in leftovers(target):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def recover_dir(target: str | os.PathLike) -> bool:
    """Put the old version of ``target`` back when a crash between ``replace_dir``'s two renames left the path
    missing (the old version at ``.NAME.old-*/NAME``); True when it did. The newest set-aside version wins."""
    target = Path(target)
    if os.path.lexists(target):
        return False
    aside = [p / target.name for p in target.parent.glob(f".{target.name}.old-*") if (p / target.name).is_dir()]
    if not aside:
        return False
    os.replace(max(aside, key=lambda p: p.stat().st_mtime), target)
    return True
