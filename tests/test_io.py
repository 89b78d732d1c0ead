"""Atomic, durable writes: the data reaches the disk before the rename, the rename after.

A power cut is not something a test can pull, so these tests check the order of the
system calls that make a write survive one: fsync of the new file (every file of a new
folder) before it is renamed over the real name, fsync of the folder after the rename.
"""

import os
from pathlib import Path

import pytest

from aekit import _io


@pytest.fixture
def calls(monkeypatch):
    """Every fsync (by the path its descriptor names) and rename, in order."""
    log = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        log.append(("replace", Path(src), Path(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def test_a_file_reaches_the_disk_before_its_rename_and_the_folder_after(tmp_path, calls):
    target = tmp_path / "config.json"
    _io.write_text_atomic(target, "{}\n")
    assert target.read_text() == "{}\n"
    renames = [c for c in calls if c[0] == "replace"]
    assert len(renames) == 1 and renames[0][2] == target
    tmp = renames[0][1]
    rename_at = calls.index(renames[0])
    assert ("fsync", tmp) in calls[:rename_at], calls          # the data, under the temporary name
    assert ("fsync", tmp_path) in calls[rename_at + 1:], calls  # the new name in its folder


def test_every_file_of_a_new_folder_reaches_the_disk_before_the_swap(tmp_path, calls):
    target = tmp_path / "maps"
    with _io.atomic_folder(target) as staging:
        (staging / "a.png").write_bytes(b"a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.png").write_bytes(b"b")
    swap = next(c for c in calls if c[0] == "replace" and c[2] == target)
    staging, swap_at = swap[1], calls.index(swap)
    before = {c[1] for c in calls[:swap_at] if c[0] == "fsync"}
    assert {staging / "a.png", staging / "sub" / "b.png", staging / "sub", staging} <= before, calls
    assert ("fsync", tmp_path) in calls[swap_at + 1:], calls
    assert (target / "sub" / "b.png").read_bytes() == b"b"


def test_a_new_folder_entry_is_flushed(tmp_path, calls):
    _io.make_folder(tmp_path / "run")
    assert ("fsync", tmp_path) in calls
    calls.clear()
    _io.make_folder(tmp_path / "run")  # already there: nothing to flush
    assert calls == []


def test_a_failed_write_leaves_nothing_and_flushes_nothing_under_the_real_name(tmp_path, calls):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), _io.atomic_path(target):
        raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"old"
    assert not [c for c in calls if c[0] == "replace"]
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_a_new_folder_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with _io.atomic_folder(tmp_path / "maps") as staging:
            (staging / "a.png").write_bytes(b"a")
    finally:
        os.umask(umask)
    assert (tmp_path / "maps").stat().st_mode & 0o777 == 0o755  # mkdtemp's own 0700 was private
