"""The updater walks the shadow with treewalk's O_NOFOLLOW walk (``open_at``,
``ParentCache``): parents stay open across records, and a rename or rmdir makes it walk
afresh, so a record never lands in a directory that moved, and a symlink put where a
directory was is never followed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fusejournal.errors import UpdaterError
from fusejournal.records import Mkdir, Mknod, Record, Rename, Rmdir, Symlink, Unlink
from fusejournal.shadow import Shadow
from fusejournal.treewalk import ParentCache, open_at
from fusejournal.updater import apply_records

UID, GID = os.getuid(), os.getgid()


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


@pytest.fixture
def tree(tmp_path: Path):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "file").write_bytes(b"")
    os.symlink("/", tmp_path / "a" / "link")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def test_open_at_names_the_part_of_the_path_that_failed(tree) -> None:
    _, fd = tree
    for path, err, where in ((b"a/missing/x", errno.ENOENT, b"a/missing"),
                             (b"a/link/etc/passwd", errno.ENOTDIR, b"a/link"),
                             (b"a/file/x", errno.ENOTDIR, b"a/file"),
                             (b"a/b/c/nope", errno.ENOENT, b"a/b/c/nope")):
        with pytest.raises(OSError) as ei:
            os.close(open_at(fd, path, os.O_RDONLY))
        assert ei.value.errno in (err, errno.ELOOP) and ei.value.filename == where, path


def test_parent_cache_keeps_parents_open_and_closes_them(tree) -> None:
    root, fd = tree
    walk = ParentCache(fd, size=2)
    assert walk.parent(b"top") == (fd, b"top")
    p1, name = walk.parent(b"a/b/c/x")
    assert name == b"x" and os.path.samestat(os.fstat(p1), os.stat(root / "a/b/c"))
    assert walk.parent(b"a/b/c/y") == (p1, b"y")                # cached: no second walk
    p2, _ = walk.parent(b"a/b/z")
    p3, _ = walk.parent(b"a/z")
    assert _closed(p1) and not _closed(p2) and not _closed(p3)   # least recent evicted
    with pytest.raises(OSError) as ei:
        walk.parent(b"a/link/etc/passwd")
    assert ei.value.errno in (errno.ENOTDIR, errno.ELOOP) and ei.value.filename == b"a/link"
    walk.forget()
    assert _closed(p2) and _closed(p3) and not _closed(fd)


@pytest.fixture
def shadow(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    sh = Shadow(tmp_path / "shadow", identity=Shadow.new_identity({"path": str(src), "dev": 0, "ino": 0}, "x"))
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sh.seed(fd)
    finally:
        os.close(fd)
    yield sh
    sh.close()


def mkdir(path: bytes) -> Mkdir:
    return Mkdir(0o755, UID, GID, 1, 1, path)


def mknod(ino: int, path: bytes) -> Mknod:
    return Mknod(ino, 0o100644, UID, GID, 0, 1, 1, path)


def test_a_directory_renamed_in_the_batch_is_walked_afresh(shadow: Shadow) -> None:
    recs: list[Record] = [mkdir(b"a"), mkdir(b"a/d"), mknod(11, b"a/d/f1"),
                          Rename(0, 0, 1, 1, b"a", b"b"), mkdir(b"a"), mkdir(b"a/d"), mknod(12, b"a/d/f2")]
    apply_records(shadow, 1, recs)
    assert os.listdir(shadow.tree / "b" / "d") == ["f1"]
    assert os.listdir(shadow.tree / "a" / "d") == ["f2"]


def test_a_directory_removed_in_the_batch_is_walked_afresh(shadow: Shadow) -> None:
    recs: list[Record] = [mkdir(b"a"), mkdir(b"a/d"), mknod(11, b"a/d/f1"), Unlink(11, 1, b"a/d/f1"),
                          Rmdir(1, b"a/d"), mkdir(b"a/d"), mknod(12, b"a/d/f2")]
    apply_records(shadow, 1, recs)
    assert os.listdir(shadow.tree / "a" / "d") == ["f2"]


def test_a_symlink_put_where_a_walked_directory_was_is_not_followed(shadow: Shadow, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    recs: list[Record] = [mkdir(b"a"), mknod(11, b"a/f"), Rename(0, 0, 1, 1, b"a", b"b"),
                          Symlink(12, UID, GID, 1, 1, b"a", os.fsencode(canary)), mknod(13, b"a/g")]
    with pytest.raises(UpdaterError, match="record 4 .*symlink is never followed"):
        apply_records(shadow, 1, recs)
    assert os.listdir(canary) == []
    assert os.listdir(shadow.tree / "b") == ["f"]
