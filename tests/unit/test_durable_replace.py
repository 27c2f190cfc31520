"""treewalk.durable_replace, the one writer of the small state files (journal metadata,
log/end.json, needs_resync, the shadow's applied.json and shadow.json, the staging
cursor): relative to a directory fd, never through a symlink, and in the order that
makes the file durable (fsync of the file, rename, fsync of the directory)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fusejournal import layout, staging, treewalk
from fusejournal.shadow import Shadow


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """The fsyncs and renames made, in order (fsync: the st_ino of what was synced)."""
    seen: list[tuple[str, object]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        seen.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):   # noqa: ANN001, ANN202
        seen.append(("rename", os.fsdecode(dst)))
        real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return seen


def test_dir_fd_writes_into_the_directory_held_not_the_name(tmp_path: Path,
                                                             calls: list[tuple[str, object]]) -> None:
    d = tmp_path / "d"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(d, tmp_path / "moved")          # the name now leads elsewhere
        d.mkdir()
        calls.clear()
        treewalk.durable_replace("state.json", b"{}\n", dir_fd=fd)
        dino = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    assert (tmp_path / "moved" / "state.json").read_bytes() == b"{}\n"
    assert os.listdir(d) == []
    assert os.listdir(tmp_path / "moved") == ["state.json"]          # no temp file left
    fino = os.stat(tmp_path / "moved" / "state.json").st_ino
    assert calls == [("fsync", fino), ("rename", "state.json"), ("fsync", dino)]


def test_path_form_syncs_the_parent_after_the_rename(tmp_path: Path, calls: list[tuple[str, object]]) -> None:
    treewalk.durable_replace(tmp_path / "meta.json", b"x")
    assert (tmp_path / "meta.json").read_bytes() == b"x"
    assert calls == [("fsync", os.stat(tmp_path / "meta.json").st_ino),
                     ("rename", os.fspath(tmp_path / "meta.json")), ("fsync", os.stat(tmp_path).st_ino)]


def test_a_symlink_planted_as_the_temp_file_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, tmp_path / ("f" + layout.TMP_SUFFIX))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError):
            treewalk.durable_replace("f", b"new", dir_fd=fd)
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "f").exists()


def test_a_loose_leftover_temp_file_gets_the_private_mode(tmp_path: Path) -> None:
    leftover = tmp_path / ("f" + layout.TMP_SUFFIX)
    leftover.write_bytes(b"half")
    os.chmod(leftover, 0o666)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        treewalk.durable_replace("f", b"whole", dir_fd=fd)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"whole"
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == layout.PRIVATE_FILE_MODE


def test_shadow_state_files_are_replaced_in_the_pinned_root(tmp_path: Path,
                                                            calls: list[tuple[str, object]]) -> None:
    """applied.json and the staging cursor: the same durable sequence, in the shadow's own
    directories (reached by fd)."""
    sh = Shadow(tmp_path / "shadow", identity=Shadow.new_identity({"path": "/x", "dev": 1, "ino": 2}, "id"))
    sh.create()
    try:
        calls.clear()
        sh.set_applied(3)
        root_ino = os.stat(sh.root).st_ino
        assert calls == [("fsync", os.stat(sh.applied_path).st_ino), ("rename", layout.SHADOW_APPLIED),
                         ("fsync", root_ino)]
        assert sh.applied == 3
        calls.clear()
        cur = staging.StagingCursor(sh, 4)
        try:
            cur.begin(0)
            cur.advance(5)
        finally:
            cur.close()
        cpath = sh.staging / staging.CURSOR
        assert calls == [("fsync", os.stat(cpath).st_ino), ("rename", staging.CURSOR),
                         ("fsync", os.stat(sh.staging).st_ino)]
        c = staging.read_cursor(sh)
        assert c is not None and (c.checkpoint, c.index) == (4, 5)
        assert stat.S_IMODE(os.stat(cpath).st_mode) == layout.PRIVATE_FILE_MODE
        assert sorted(os.listdir(sh.staging)) == [staging.CURSOR]
    finally:
        sh.close()
