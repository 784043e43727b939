"""Atomic directory replacement: a reader sees the old version or the new one, and a failed swap never
throws the new content away."""

from __future__ import annotations

import os

import pytest

from sparseft import atomic
from sparseft.atomic import atomic_dir
from sparseft.errors import AtomicReplaceError


def write(target, text):
    with atomic_dir(target) as tmp:
        (tmp / "f.txt").write_text(text)


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_a_stale_aside_directory_does_not_block_the_replace(tmp_path):
    # The old version used to be moved to a fixed `.NAME.old-PID`; one left by a crash (or by another
    # process with the same pid, as in containers) made the rename fail and the new content was deleted.
    target = tmp_path / "diff"
    write(target, "old")
    stale = tmp_path / f".diff.old-{os.getpid()}"
    stale.mkdir()
    (stale / "leftover.txt").write_text("from a crashed run")
    write(target, "new")
    assert (target / "f.txt").read_text() == "new"
    assert (stale / "leftover.txt").read_text() == "from a crashed run"  # not ours to delete
    assert siblings(target) == [stale.name]  # nothing else left behind


def test_a_failed_swap_keeps_the_new_content_and_names_both_paths(tmp_path, monkeypatch):
    target = tmp_path / "diff"
    write(target, "old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):  # moving the new version into place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(AtomicReplaceError) as raised:
        write(target, "new")
    monkeypatch.undo()
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".diff.tmp-")]
    assert len(staged) == 1 and (staged[0] / "f.txt").read_text() == "new"  # the new content is kept
    assert str(staged[0]) in str(raised.value) and str(target) in str(raised.value)
    assert (target / "f.txt").read_text() == "old"  # the old version was put back
    assert siblings(target) == [staged[0].name]


def test_a_failed_first_write_keeps_the_new_content_too(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(13, "Permission denied")))
    with pytest.raises(AtomicReplaceError, match="Permission denied"):
        write(tmp_path / "out", "new")
    monkeypatch.undo()
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(staged) == 1 and (staged[0] / "f.txt").read_text() == "new"
    assert not (tmp_path / "out").exists()


def test_an_error_inside_the_block_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "diff"
    write(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "f.txt").write_text("half")
            raise RuntimeError("boom")
    assert (target / "f.txt").read_text() == "old"
    assert siblings(target) == []


def test_a_file_at_the_target_is_replaced_by_the_directory(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    write(target, "new")
    assert (target / "f.txt").read_text() == "new" and siblings(target) == []


@pytest.fixture(params=[0o022, 0o027])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return path.stat().st_mode & 0o777


def test_outputs_follow_the_umask_like_mkdir_and_open(tmp_path, mask):
    """tempfile's owner-only modes must not reach the user: a diff reads like any file the user writes."""
    from conftest import make_tiny_llama
    from sparseft import SparseConfig, get_sparse_model
    from sparseft.atomic import atomic_file

    diff = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05)).save_pretrained(tmp_path / "diff")
    assert mode(diff) == 0o777 & ~mask
    for f in diff.iterdir():
        assert mode(f) == 0o666 & ~mask, f.name
    with atomic_file(tmp_path / "train_config.yaml") as tmp:
        tmp.write_text("a: 1\n")
    assert mode(tmp_path / "train_config.yaml") == 0o666 & ~mask
