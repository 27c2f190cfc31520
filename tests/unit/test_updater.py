"""Tests of the shadow (seed, verify) and the updater (applying batches of records).

No FUSE: an *original* tree is built with real os calls by :class:`Recorder`,
which also produces the records fusejournal would have produced (built from
a post-operation lstat, like the FUSE layer does).  A shadow seeded from the
original at the start must, after the batches are applied, equal the
original (``Shadow.verify_matches(orig_fd) == []``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusejournal import sysc
from fusejournal import updater as updater_mod
from fusejournal.records import (
    ATTR_ATIME,
    ATTR_GID,
    ATTR_MODE,
    ATTR_MTIME,
    ATTR_SIZE,
    ATTR_UID,
    Link,
    Mkdir,
    Mknod,
    Removexattr,
    Rename,
    Rmdir,
    Setattr,
    Setxattr,
    Symlink,
    Unlink,
    Write,
    decode,
    encode,
    mkdir_record,
    mknod_record,
    setattr_record,
    symlink_record,
)
from fusejournal.shadow import Shadow, ShadowError
from fusejournal.superseded import Superseded
from fusejournal.updater import Cursor, Updater, UpdaterError, apply_records, read_cursor

from snapshot import assert_same
from snapshot import snapshot as tree_snapshot
from unithelp import create_reusing

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (chown, trusted.* xattrs, devices)")


# ------------------------------------------------------------------ test helpers

def _parent(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]


class Recorder:
    """Performs operations on the original tree and records them like fusejournal would.

    Every method does the real os call (under ``root``), then builds the
    record from an lstat taken after it.  A failing os call raises and
    records nothing.
    """

    def __init__(self, root: Path) -> None:
        self.root = os.fsencode(root)
        self.records: list = []

    def p(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel if rel else self.root

    def lst(self, rel: bytes) -> os.stat_result:
        return os.lstat(self.p(rel))

    def pm(self, rel: bytes) -> int:
        return self.lst(_parent(rel)).st_mtime_ns

    def take(self) -> list:
        recs, self.records = self.records, []
        return recs

    # -- creating
    def create(self, rel: bytes, mode: int = 0o644, data: bytes = b"") -> int:
        fd = os.open(self.p(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            s = os.fstat(fd)
            self.records.append(mknod_record(s, self.pm(rel), rel))
        finally:
            os.close(fd)
        if data:
            self.write(rel, 0, data)
        return s.st_ino

    def mknod(self, rel: bytes, mode: int, rdev: int = 0) -> None:
        os.mknod(self.p(rel), mode, rdev)
        s = self.lst(rel)
        self.records.append(mknod_record(s, self.pm(rel), rel))

    def mkdir(self, rel: bytes, mode: int = 0o755) -> None:
        os.mkdir(self.p(rel), mode)
        s = self.lst(rel)
        self.records.append(mkdir_record(s, self.pm(rel), rel))

    def symlink(self, rel: bytes, target: bytes) -> None:
        os.symlink(target, self.p(rel))
        s = self.lst(rel)
        self.records.append(symlink_record(s, self.pm(rel), rel, target))

    def link(self, src: bytes, rel: bytes) -> None:
        os.link(self.p(src), self.p(rel), follow_symlinks=False)
        self.records.append(Link(self.lst(rel).st_ino, self.pm(rel), rel))

    # -- removing, renaming
    def unlink(self, rel: bytes) -> None:
        ino = self.lst(rel).st_ino
        os.unlink(self.p(rel))
        self.records.append(Unlink(ino, self.pm(rel), rel))

    def rmdir(self, rel: bytes) -> None:
        os.rmdir(self.p(rel))
        self.records.append(Rmdir(self.pm(rel), rel))

    def rename(self, old: bytes, new: bytes, flags: int = 0) -> None:
        s = self.lst(old)
        ino = 0 if stat.S_ISDIR(s.st_mode) else s.st_ino
        sysc.renameat2(sysc.AT_FDCWD, self.p(old), sysc.AT_FDCWD, self.p(new), flags)
        self.records.append(Rename(flags, ino, self.pm(old), self.pm(new), old, new))

    # -- data
    def write(self, rel: bytes, off: int, data: bytes) -> None:
        fd = os.open(self.p(rel), os.O_WRONLY | os.O_NOFOLLOW)
        try:
            self.write_fd(fd, off, data)
        finally:
            os.close(fd)

    def write_fd(self, fd: int, off: int, data: bytes) -> None:
        assert os.pwrite(fd, data, off) == len(data)
        s = os.fstat(fd)
        self.records.append(Write(s.st_ino, off, s.st_mtime_ns, data))

    # -- attributes
    def _setattr(self, rel: bytes, mask: int, before: os.stat_result) -> None:
        """Record a Setattr like fs.py: post-op values, S_IMODE mode, directories by path.

        Like the FUSE kernel module, a mode change the kernel made on its own
        (setuid/setgid cleared by chown) is sent as a mode update (ATTR_MODE).
        """
        s = self.lst(rel)
        if s.st_mode != before.st_mode:
            mask |= ATTR_MODE
        if stat.S_ISDIR(s.st_mode):
            ino, path = 0, rel
        else:
            ino, path = s.st_ino, b""
        self.records.append(setattr_record(ino, mask, s, path))

    def truncate(self, rel: bytes, size: int) -> None:
        before = self.lst(rel)
        os.truncate(self.p(rel), size)
        self._setattr(rel, ATTR_SIZE, before)

    def chmod(self, rel: bytes, mode: int) -> None:
        before = self.lst(rel)
        os.chmod(self.p(rel), mode)
        self._setattr(rel, ATTR_MODE, before)

    def chown(self, rel: bytes, uid: int, gid: int) -> None:
        before = self.lst(rel)
        os.chown(self.p(rel), uid, gid, follow_symlinks=False)
        self._setattr(rel, (ATTR_UID if uid != -1 else 0) | (ATTR_GID if gid != -1 else 0), before)

    def utime(self, rel: bytes, atime_ns: int, mtime_ns: int) -> None:
        before = self.lst(rel)
        os.utime(self.p(rel), ns=(atime_ns, mtime_ns), follow_symlinks=False)
        self._setattr(rel, ATTR_ATIME | ATTR_MTIME, before)

    def _ref(self, rel: bytes) -> tuple[int, bytes]:
        s = self.lst(rel)
        return (0, rel) if stat.S_ISDIR(s.st_mode) else (s.st_ino, b"")

    def setxattr(self, rel: bytes, name: bytes, value: bytes) -> None:
        os.setxattr(self.p(rel), name, value, follow_symlinks=False)
        self.records.append(Setxattr(*self._ref(rel), name, value))

    def removexattr(self, rel: bytes, name: bytes) -> None:
        os.removexattr(self.p(rel), name, follow_symlinks=False)
        self.records.append(Removexattr(*self._ref(rel), name))


class Info:
    def __init__(self, n: int) -> None:
        self.marker = SimpleNamespace(checkpoint=n, time_ns=1_700_000_000_000_000_000 + n)


class CorruptLog(Exception):
    pass


class FakeLog:
    """The three methods of fusejournal.log.OrderedLog the updater uses.

    Batches go through encode/decode, as they would in the real log.
    """

    def __init__(self) -> None:
        self.batches: dict[int, bytes | list] = {}     # encoded, or raw records
        self.corrupt: set[int] = set()

    def add(self, records: list) -> int:
        n = len(self.batches) + 1
        self.batches[n] = encode(records)
        return n

    def checkpoints(self, after: int) -> list[Info]:
        return [Info(n) for n in sorted(self.batches) if n > after]

    def verify(self, info: Info, each=None, chunk=None) -> None:   # (reports no entries)
        if info.marker.checkpoint in self.corrupt:
            raise CorruptLog(f"bad checksum in checkpoint {info.marker.checkpoint}")
        if each is not None:                  # the same pass validates every record
            for i, rec in enumerate(self.records(info)):
                each(i, rec)

    def records(self, info: Info, start=None):
        assert start is None, "verify reported no entries"
        batch = self.batches[info.marker.checkpoint]
        return iter(batch) if isinstance(batch, list) else decode(batch)


def superseded_indices(records: list) -> set[int]:
    """The indices of ``records`` the updater skips (superseded.py)."""
    sup = Superseded(len(records))
    for i, rec in enumerate(records):
        sup.note(i, rec)
    return {i for i in range(len(records)) if i in sup}


class Env:
    """An original tree, its recorder, a seeded shadow, a fake log and an updater."""

    def __init__(self, base: Path, populate=None) -> None:
        self.orig = base / "orig"
        self.orig.mkdir()
        self.rec = Recorder(self.orig)
        if populate is not None:
            populate(self.rec)
            self.rec.take()
        self.orig_fd = os.open(self.orig, os.O_RDONLY | os.O_DIRECTORY)
        self.shadow = Shadow(base / "shadow")
        self.shadow.create()
        self.seeded = self.shadow.seed(self.orig_fd)
        self.log = FakeLog()
        self.updater = Updater(self.log, self.shadow)

    def close(self) -> None:
        os.close(self.orig_fd)
        self.updater.close()
        self.shadow.close()

    def checkpoint(self) -> int:
        return self.log.add(self.rec.take())

    def sync(self, kill: tuple[int, str] | None = None) -> None:
        """Checkpoint, apply, and assert the shadow equals the original.

        ``kill=(k, where)``: first simulate a kill of the updater just
        before/after the effect of record k (modulo the batch's length, so that
        every kill lands; an empty batch has nothing to kill), then resume
        with a new updater.
        """
        records = self.rec.take()
        n = self.log.add(records)
        if kill is not None and records:
            skipped = superseded_indices(records)       # never applied: never killed in
            k, where = kill[0] % len(records), kill[1]
            while k in skipped:
                k = (k + 1) % len(records)
            at = k                  # the cursor is not moved past superseded writes alone
            while at - 1 in skipped:
                at -= 1
            real = updater_mod._Applier.apply_one

            def apply_one(ap, rec, index):
                if index == k and where == "before":
                    raise KeyboardInterrupt("killed")
                real(ap, rec, index)
                if index == k:
                    raise KeyboardInterrupt("killed")
            with mock.patch.object(updater_mod._Applier, "apply_one", apply_one):
                with pytest.raises(KeyboardInterrupt):     # a kill past the batch's end is a test bug
                    self.updater.run_once()
                assert read_cursor(self.shadow).index == at
            self.updater.close()            # what the killed process's exit would have closed
            self.updater = Updater(self.log, self.shadow)
        assert self.updater.run_once() == n
        assert self.shadow.applied == n
        assert self.updater.error is None
        assert read_cursor(self.shadow) is None
        self.check()

    def check(self) -> None:
        """The project's verifier, and an independent comparer (tests/snapshot.py)."""
        assert self.shadow.verify_matches(self.orig_fd) == []
        assert_same(tree_snapshot(self.orig), tree_snapshot(self.shadow.tree))

    def inode_keys(self) -> set[str]:
        return set(os.listdir(self.shadow.inodes))


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.close()


@pytest.fixture
def no_flush(monkeypatch):
    """Make fsync/syncfs no-ops for tests that apply hundreds of batches.

    Durability cannot be observed without pulling the plug; the other tests
    run the real calls.  On a shared disk each flush can take tens of ms.
    """
    monkeypatch.setattr(updater_mod.os, "fsync", lambda fd: None)
    monkeypatch.setattr(sysc, "syncfs", lambda fd: None)


def snapshot(path: Path) -> dict:
    """Everything observable about a directory tree (to prove nothing changed)."""
    out = {}
    root = os.fsencode(path)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [b""] + dirnames + filenames if dirpath == root else dirnames + filenames:
            p = os.path.join(dirpath, name) if name else dirpath
            s = os.lstat(p)
            item = [s.st_mode, s.st_uid, s.st_gid, s.st_size, s.st_mtime_ns, s.st_nlink, s.st_ino]
            if stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    item.append(hashlib.sha256(f.read()).hexdigest())
            if stat.S_ISLNK(s.st_mode):
                item.append(os.readlink(p))
            else:
                item.append(sorted((n, os.getxattr(p, n)) for n in os.listxattr(p)))
            out[p] = item
    return out


# ------------------------------------------------------------------ shadow: seed and verify

def _rich_tree(r: Recorder) -> None:
    r.mkdir(b"d", 0o750)
    r.mkdir(b"d/sub")
    r.create(b"d/sub/f", 0o640, b"hello" * 1000)
    r.create(b"empty")
    r.create(b"caf\xe9-\xff", 0o600, b"latin-1 name")
    r.create(b"sparse")
    r.write(b"sparse", 5 << 30, b"tail")              # > 4 GiB offset, hole before
    r.write(b"sparse", 4096 * 3, b"x" * 5000)
    r.link(b"d/sub/f", b"hard1")
    r.link(b"d/sub/f", b"d/hard2")
    r.symlink(b"ln", b"d/sub/f")
    r.symlink(b"dangling", b"/nonexistent/\xfe")
    r.mknod(b"fifo", stat.S_IFIFO | 0o620)
    r.chmod(b"empty", 0o4755)
    r.mkdir(b"sticky", 0o1777)
    r.setxattr(b"d/sub/f", b"user.color", b"blue")
    r.setxattr(b"d", b"user.dir", b"\x00\x01binary")
    r.setxattr(b"", b"user.root", b"r")
    if ROOT:
        r.mknod(b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        r.mknod(b"sock", stat.S_IFSOCK | 0o755)
        r.chown(b"d/sub/f", 1234, 5678)
        r.chown(b"ln", 4321, 8765)
        r.chown(b"d", 1234, 5678)
        r.setxattr(b"d/sub/f", b"trusted.t", b"trust")
        r.setxattr(b"ln", b"trusted.l", b"on a symlink")
        r.setxattr(b"fifo", b"trusted.f", b"on a fifo")
    r.utime(b"d/sub", 1, 123456789012345678)
    r.utime(b"ln", 5, 987654321987654321)
    r.utime(b"", 7, 111111111222222222)


def test_seed_copies_everything(tmp_path):
    calls = []
    orig = tmp_path / "orig"
    orig.mkdir()
    _rich_tree(Recorder(orig))
    fd = os.open(orig, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sh = Shadow(tmp_path / "shadow")
        assert not sh.exists()
        sh.create()
        n = sh.seed(fd, calls.append)
        assert sh.exists() and sh.applied == 0
        assert n == calls[-1] == len(calls) == sum(1 for _ in os.walk(orig)) - 1 + sum(
            len(f) for _, _, f in os.walk(orig))
        assert sh.verify_matches(fd) == []
        # holes stay holes: the 5 GiB sparse file takes a few blocks only
        assert os.lstat(sh.tree / "sparse").st_blocks * 512 < 1 << 20
        # hidden links: one per non-directory of the original, named by its st_ino
        t = os.lstat(sh.tree / "d/sub/f")
        k = os.lstat(sh.inodes / str(os.lstat(orig / "d/sub/f").st_ino))
        assert (t.st_ino, t.st_nlink) == (k.st_ino, 4)
        assert os.stat(sh.tree).st_mtime_ns == 111111111222222222
        with pytest.raises(ShadowError):
            sh.seed(fd)                                # tree/ is not empty
    finally:
        os.close(fd)


def test_shadow_applied_state(tmp_path):
    sh = Shadow(tmp_path / "s")
    sh.create()
    sh.create()                                        # idempotent
    assert not sh.exists()
    with pytest.raises(ShadowError):
        sh.applied
    sh.set_applied(7)
    assert sh.exists() and sh.applied == 7
    assert sh.applied_checkpoint_time_ns is None        # not given: unknown, never the write time
    sh.set_applied(8, 1_700_000_000_123_456_789)
    assert sh.applied == 8 and sh.applied_checkpoint_time_ns == 1_700_000_000_123_456_789
    sh.applied_path.write_text("{not json")
    with pytest.raises(ShadowError):
        sh.applied
    sh.applied_path.write_text('{"applied": -3}')
    with pytest.raises(ShadowError):
        sh.applied


def test_verify_matches_reports_differences(tmp_path):
    e = Env(tmp_path, _rich_tree)
    try:
        e.check()
        t = e.shadow.tree
        os.pwrite(os.open(t / "d/sub/f", os.O_WRONLY), b"J", 10) and None
        os.chmod(t / "empty", 0o644)
        os.setxattr(t / "d", "user.dir", b"changed")
        os.utime(t / "d/sub", ns=(0, 5))
        (t / "extra").write_bytes(b"")
        os.unlink(t / "hard1")
        (t / "hard1").write_bytes(b"hello" * 1000)
        os.symlink("elsewhere", t / "ln2")
        diffs = "\n".join(e.shadow.verify_matches(e.orig_fd))
        for needle in ("/d/sub/f: contents differ at offset 10", "/empty: mode", "/d: xattr user.dir",
                       "/d/sub: mtime", "/extra: not in the original", "/hard1: hard links differ",
                       "/ln2: not in the original", "/: mtime"):
            assert needle in diffs
        os.unlink(e.shadow.inodes / str(os.lstat(e.orig / "fifo").st_ino))
        os.link(t / "extra", e.shadow.inodes / "99999999")
        diffs = "\n".join(e.shadow.verify_matches(e.orig_fd))
        assert "/fifo: hidden link" in diffs and "stale hidden link inodes/99999999" in diffs
    finally:
        e.close()


# ------------------------------------------------------------------ records

def test_every_record_type(tmp_path):
    e = Env(tmp_path, lambda r: (r.mkdir(b"old"), r.create(b"old/f", 0o644, b"abc")))
    try:
        r = e.rec
        r.mkdir(b"a", 0o2775)
        r.create(b"a/file", 0o600, b"0123456789")
        r.mknod(b"a/fifo", stat.S_IFIFO | 0o644)
        r.symlink(b"a/sym", b"file")
        r.link(b"a/file", b"a/file2")
        r.write(b"a/file", 5, b"XY")
        r.truncate(b"a/file", 100)
        r.chmod(b"a/file", 0o755)
        r.setxattr(b"a/file", b"user.k", b"v")
        r.setxattr(b"a", b"user.dk", b"dv")
        r.setxattr(b"a/file2", b"user.gone", b"x")
        r.removexattr(b"a/file", b"user.gone")
        r.utime(b"a", 10, 20)
        r.rename(b"old/f", b"a/moved")
        r.unlink(b"a/file2")
        r.rmdir(b"old")
        r.mkdir(b"a/dir2")
        r.rename(b"a/dir2", b"dir3")
        r.chmod(b"dir3", 0o700)
        e.sync()
        kinds = {type(x).__name__ for x in decode(e.log.batches[1])}
        assert kinds == {"Mknod", "Mkdir", "Symlink", "Link", "Unlink", "Rmdir", "Rename", "Write",
                         "Setattr", "Setxattr", "Removexattr"}
        r.truncate(b"a/file", 3)
        r.write(b"a/file", 1, b"q")
        e.sync()
    finally:
        e.close()


def test_hard_links(env):
    r = env.rec
    r.mkdir(b"x")
    r.create(b"x/a", 0o644, b"one")
    r.link(b"x/a", b"b")
    r.link(b"b", b"x/c")
    r.write(b"b", 3, b" two")                         # reaches every link
    env.sync()
    r.unlink(b"x/a")
    r.write(b"x/c", 0, b"ONE")
    r.rename(b"x/c", b"b")                            # both names of one inode: no-op
    env.sync()
    r.unlink(b"b")
    r.unlink(b"x/c")
    env.sync()
    assert env.inode_keys() == set()


def test_rename_over_existing_removes_hidden_link(env):
    r = env.rec
    r.create(b"target", 0o644, b"old contents")
    r.create(b"other")
    env.sync()
    assert len(env.inode_keys()) == 2
    r.create(b"target.tmp", 0o644, b"new contents")   # the atomic-save pattern
    r.rename(b"target.tmp", b"target")
    r.link(b"other", b"other2")
    r.create(b"t2", 0o600, b"x")
    r.rename(b"t2", b"other")                         # replaced, but still linked as other2
    env.sync()
    assert len(env.inode_keys()) == 3                 # target, other2, other (new)


def test_rename_exchange(env):
    r = env.rec
    r.mkdir(b"d1")
    r.mkdir(b"d2")
    r.create(b"d1/f", 0o644, b"in d1")
    r.create(b"d2/g", 0o644, b"in d2")
    r.mkdir(b"d2/sub")
    r.create(b"d2/sub/h", 0o644, b"deep")
    env.sync()
    r.rename(b"d1/f", b"d2/g", sysc.RENAME_EXCHANGE)  # two files
    r.rename(b"d1", b"d2/sub", sysc.RENAME_EXCHANGE)  # two directories
    r.rename(b"d2/g", b"d1", sysc.RENAME_EXCHANGE)    # a file and a directory
    r.write(b"d2/g/h", 0, b"DE")
    r.write(b"d2/sub/f", 0, b"IN")
    env.sync()


def test_rename_noreplace_and_directory_with_contents(env):
    r = env.rec
    r.mkdir(b"a")
    r.mkdir(b"a/b")
    r.create(b"a/b/f", 0o644, b"data")
    r.symlink(b"a/b/s", b"f")
    r.mkdir(b"z")
    env.sync()
    r.rename(b"a", b"z/a2", sysc.RENAME_NOREPLACE)
    r.write(b"z/a2/b/f", 4, b"more")
    r.mkdir(b"empty")
    r.rename(b"z/a2/b", b"empty")                     # a directory over an empty one
    r.create(b"empty/new")
    env.sync()


def test_unlinked_open_file_writes_are_ignored(env):
    r = env.rec
    r.create(b"f", 0o644, b"data")
    env.sync()
    fd = os.open(r.p(b"f"), os.O_RDWR)
    try:
        r.write_fd(fd, 0, b"DATA")
        r.unlink(b"f")
        r.write_fd(fd, 100, b"after unlink")
        os.ftruncate(fd, 2)                           # unrecorded here; a Setattr for a gone ino:
        ino = os.fstat(fd).st_ino
        r.records.append(Setattr(ino, ATTR_SIZE, 0o100644, 0, 0, 2, 0, 0, b"f"))
        r.records.append(Setxattr(ino, b"f", b"user.x", b"y"))
        r.records.append(Removexattr(ino, b"f", b"user.x"))
        env.sync()
    finally:
        os.close(fd)
    assert env.inode_keys() == set()


def test_unlink_keeps_other_links_reachable(env):
    r = env.rec
    r.create(b"f", 0o644, b"data")
    r.link(b"f", b"g")
    env.sync()
    fd = os.open(r.p(b"f"), os.O_RDWR)
    try:
        r.unlink(b"f")
        r.write_fd(fd, 0, b"DATA")                    # still reachable as g
        env.sync()
    finally:
        os.close(fd)
    assert (env.shadow.tree / "g").read_bytes() == b"DATA"


def test_inode_number_reuse(env):
    r = env.rec
    r.create(b"a", 0o644, b"first life")
    env.sync()
    ino = r.lst(b"a").st_ino
    r.write(b"a", 0, b"FIRST")                        # deferred mtime for ino ...
    r.unlink(b"a")
    time.sleep(0.02)                                  # (so a leaked mtime would be visible)
    create_reusing(r, b"b", ino)                     # ... must not leak into the new file
    env.sync()
    assert env.inode_keys() == {str(ino)}
    r.write(b"b", 0, b"second life")
    env.sync()
    # replaced by a rename: the hidden link lingers until the end of the batch
    r.create(b"c", 0o644, b"c data")
    env.sync()
    ino_c = r.lst(b"c").st_ino
    r.create(b"new", 0o644, b"replacement")
    r.rename(b"new", b"c")
    create_reusing(r, b"d", ino_c)
    r.write(b"d", 0, b"d data")
    env.sync()


def test_inode_key_reuse_handcrafted(env):
    """The same as above with hand-built records, so it never depends on the filesystem."""
    X = 4_000_000_001
    env.log.add([Mknod(X, 0o100644, 0, 0, 0, 10, 11, b"a"), Write(X, 0, 12, b"first life"),
                 Link(X, 13, b"a2"), Unlink(X, 14, b"a"), Unlink(X, 15, b"a2"),
                 Mknod(X, 0o100600, 0, 0, 0, 16, 17, b"b"),              # the number is reused
                 Mknod(X + 1, 0o100644, 0, 0, 0, 18, 19, b"c"), Write(X + 1, 0, 20, b"c"),
                 Mknod(X + 2, 0o100644, 0, 0, 0, 21, 22, b"tmp"), Rename(0, X + 2, 23, 23, b"tmp", b"c"),
                 Symlink(X + 1, 0, 0, 24, 25, b"s", b"b")])              # ... by a symlink
    env.updater.run_once()
    t = env.shadow.tree
    b = os.lstat(t / "b")
    assert (b.st_size, stat.S_IMODE(b.st_mode), b.st_mtime_ns, b.st_nlink) == (0, 0o600, 16, 2)
    assert os.lstat(env.shadow.inodes / str(X)).st_ino == b.st_ino
    s = os.lstat(t / "s")
    assert s.st_mtime_ns == 24 and os.lstat(env.shadow.inodes / str(X + 1)).st_ino == s.st_ino
    assert os.lstat(t / "c").st_ino == os.lstat(env.shadow.inodes / str(X + 2)).st_ino
    assert env.inode_keys() == {str(X), str(X + 1), str(X + 2)}
    assert sorted(os.listdir(t)) == ["b", "c", "s"] and os.stat(t).st_mtime_ns == 25


def test_non_utf8_names(env):
    r = env.rec
    r.mkdir(b"\xff\xfe")
    r.create(b"\xff\xfe/\x80abc", 0o644, b"x")
    r.symlink(b"\xc3(", b"\xff\xfe/\x80abc")
    r.rename(b"\xff\xfe/\x80abc", b"\xff\xfe/ok\xe9")
    r.setxattr(b"\xff\xfe", b"user.\xe9", b"v")
    env.sync()
    assert (env.shadow.tree / os.fsdecode(b"\xff\xfe/ok\xe9")).read_bytes() == b"x"


def test_sparse_large_offsets(env):
    r = env.rec
    r.create(b"big")
    r.write(b"big", (4 << 30) + 12345, b"beyond 4 GiB")
    r.write(b"big", 1 << 20, b"a" * 70000)
    env.sync()
    r.truncate(b"big", (6 << 30) + 1)
    r.write(b"big", 6 << 30, b"z")
    env.sync()
    s = os.lstat(env.shadow.tree / "big")
    assert s.st_size == (6 << 30) + 1 and s.st_blocks * 512 < 4 << 20


def test_xattrs(env):
    r = env.rec
    r.mkdir(b"d")
    r.create(b"d/f")
    r.setxattr(b"d/f", b"user.a", b"1")
    r.setxattr(b"d/f", b"user.b", b"\x00" * 1000)
    r.setxattr(b"d", b"user.dir", b"d")
    r.setxattr(b"", b"user.root", b"root!")
    if ROOT:
        r.symlink(b"s", b"d/f")
        r.setxattr(b"s", b"trusted.sym", b"on the link itself")
        r.setxattr(b"d/f", b"trusted.t", b"t")
    env.sync()
    r.setxattr(b"d/f", b"user.a", b"2")
    r.removexattr(b"d/f", b"user.b")
    r.removexattr(b"", b"user.root")
    if ROOT:
        r.removexattr(b"s", b"trusted.sym")
    env.sync()


def test_mtimes_exact(env):
    r = env.rec
    r.mkdir(b"d")
    r.create(b"d/f", 0o644, b"x")
    r.symlink(b"d/s", b"f")
    env.sync()
    r.write(b"d/f", 0, b"y")
    r.utime(b"d/f", 1, 1_000_000_001)                 # a later setattr overrides the write's mtime
    r.utime(b"d/s", 3, 1_234_567_891_234_567_891)
    r.utime(b"d", 4, 999)
    r.utime(b"", 5, 42)
    env.sync()
    assert os.lstat(env.shadow.tree / "d/f").st_mtime_ns == 1_000_000_001
    r.utime(b"d/f", 1, 7)
    r.write(b"d/f", 1, b"z")                          # ... and a later write overrides the setattr
    env.sync()


@needs_root
def test_modes_and_owners(env):
    r = env.rec
    r.mkdir(b"d", 0o755)
    r.chmod(b"d", 0o3775)                             # setgid + sticky directory
    r.create(b"d/suid", 0o755, b"#!")
    r.chmod(b"d/suid", 0o4755)
    r.create(b"d/sgid", 0o755)
    r.chmod(b"d/sgid", 0o2711)
    r.chown(b"d", 1234, 5678)
    r.create(b"d/inherits", 0o644)                    # gid 5678 through setgid dir
    r.mkdir(b"d/subdir")                              # setgid bit and gid inherited
    r.chown(b"d/suid", 1234, 5678)                    # clears setuid in both trees
    r.chown(b"d/sgid", -1, 42)
    r.symlink(b"d/ln", b"suid")
    r.chown(b"d/ln", 77, 88)
    r.mknod(b"d/tty", stat.S_IFCHR | 0o620, os.makedev(5, 0))
    r.chown(b"d/tty", 0, 5)
    env.sync()
    s = os.lstat(env.shadow.tree / "d/inherits")
    assert (s.st_uid, s.st_gid) == (0, 5678)
    assert stat.S_IMODE(os.lstat(env.shadow.tree / "d").st_mode) == 0o3775


def test_chown_restores_the_recorded_mode(env):
    """After a chown the recorded mode wins, even if the original kept bits the shadow's kernel cleared."""
    r = env.rec
    r.create(b"f", 0o755)
    r.chmod(b"f", 0o6755)
    env.sync()
    ino = r.lst(b"f").st_ino
    env.log.add([Setattr(ino, ATTR_UID | ATTR_GID, 0o6755, 0, 0, 0, 0, r.lst(b"f").st_mtime_ns, b"")])
    env.updater.run_once()
    env.check()                                       # ext4 cleared 0o6000 on the chown; restored


# ------------------------------------------------------------------ path safety

BAD_PATHS = [b"../x", b"/etc/x", b"a/../../x", b"a\0b", b"a//b", b"./x", b"a/.", b"x/"]


def _bad_records(p: bytes) -> list:
    return [Mknod(99, 0o100644, 0, 0, 0, 1, 1, p), Mkdir(0o755, 0, 0, 1, 1, p),
            Symlink(99, 0, 0, 1, 1, p, b"t"), Link(99, 1, p), Unlink(99, 1, p), Rmdir(1, p),
            Rename(0, 99, 1, 1, b"ok", p), Rename(0, 99, 1, 1, p, b"ok"),
            Setattr(0, ATTR_MODE, 0o777, 0, 0, 0, 0, 0, p), Setxattr(0, p, b"user.a", b"b"),
            Removexattr(0, p, b"user.a")]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_malicious_paths_change_nothing(tmp_path, path):
    e = Env(tmp_path, lambda r: (r.mkdir(b"a"), r.create(b"ok", 0o644, b"ok")))
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "x").write_bytes(b"canary")
    try:
        for bad in _bad_records(path):
            before = snapshot(e.shadow.tree), snapshot(e.shadow.inodes), snapshot(canary)
            # benign records first: they must not be applied either
            good = [Mknod(12345, 0o100644, 0, 0, 0, 1, 1, b"a/new"), Write(12345, 0, 1, b"data")]
            e.log.batches.clear()
            e.log.batches[1] = good + [bad]
            with pytest.raises(UpdaterError, match=r"checkpoint 1: record 2 \((\w+)\) rejected"):
                e.updater.run_once()
            assert "checkpoint 1" in e.updater.error
            assert e.shadow.applied == 0
            assert read_cursor(e.shadow) is None
            assert (snapshot(e.shadow.tree), snapshot(e.shadow.inodes), snapshot(canary)) == before
        assert e.shadow.verify_matches(e.orig_fd) == []
    finally:
        e.close()


def test_malicious_inode_keys_rejected(env):
    for bad in [Write(0, 0, 1, b"x"), Write(-5, 0, 1, b"x"), Link(0, 1, b"a"), Write(1, -1, 1, b"x"),
                Mknod(5, 0o040755, 0, 0, 0, 1, 1, b"d"), Rename(3, 0, 1, 1, b"a", b"b"),
                Setattr(0, 1 << 10, 0, 0, 0, 0, 0, 0, b""), Setxattr(0, b"", b"", b"v"),
                Symlink(5, 0, 0, 1, 1, b"s", b"")]:
        env.log.batches.clear()
        env.log.batches[1] = [bad]                    # some cannot even be encoded
        with pytest.raises(UpdaterError, match="rejected"):
            env.updater.run_once()
    env.check()


def test_symlink_inside_shadow_is_never_followed(tmp_path):
    e = Env(tmp_path, lambda r: (r.mkdir(b"dir"), r.symlink(b"evil", os.fsencode(tmp_path / "canary"))))
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "x").write_bytes(b"canary")
    (canary / "sub").mkdir()
    (canary / "sub" / "y").write_bytes(b"canary")
    os.setxattr(canary, "user.c", b"1")
    before = snapshot(canary)
    deep = [Mknod(99, 0o100644, 0, 0, 0, 1, 1, b"evil/sub/new"), Mkdir(0o755, 0, 0, 1, 1, b"evil/sub/d"),
            Unlink(99, 1, b"evil/sub/y"), Rename(0, 0, 1, 1, b"evil/sub/y", b"dir/y"),
            Setattr(0, ATTR_MODE, 0o777, 0, 0, 0, 0, 0, b"evil/sub"),
            Setxattr(0, b"evil/sub", b"user.c", b"2")]
    try:
        for bad in deep + [Mknod(99, 0o100644, 0, 0, 0, 1, 1, b"evil/new"), Mkdir(0o755, 0, 0, 1, 1, b"evil/d"),
                    Symlink(99, 0, 0, 1, 1, b"evil/s", b"t"), Unlink(99, 1, b"evil/x"),
                    Rmdir(1, b"evil/x"), Rename(0, 0, 1, 1, b"evil/x", b"dir/x"),
                    Rename(0, 0, 1, 1, b"dir", b"evil/dir"),
                    Rename(2, 0, 1, 1, b"dir", b"evil/x"),
                    Setattr(0, ATTR_MODE | ATTR_MTIME, 0o777, 0, 0, 0, 0, 0, b"evil"),
                    Setattr(0, ATTR_MODE, 0o777, 0, 0, 0, 0, 0, b"evil/x"),
                    Setxattr(0, b"evil", b"user.c", b"2"), Removexattr(0, b"evil", b"user.c"),
                    Rmdir(1, b"evil")]:
            e.log.batches.clear()
            e.log.batches[1] = encode([bad])
            with pytest.raises(UpdaterError, match="checkpoint 1: record 0"):
                e.updater.run_once()
            assert snapshot(canary) == before
            os.unlink(e.shadow.staging / "cursor")
        assert e.shadow.verify_matches(e.orig_fd) == []
    finally:
        e.close()


def test_inode_key_that_is_a_symlink_is_never_written_through(env, tmp_path):
    """A crafted log makes inodes/<ino> a symlink to a file outside: writes, truncates,
    chmods and times are never applied through it."""
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "file").write_bytes(b"precious")
    os.chmod(canary / "file", 0o600)
    before = snapshot(canary)
    recs = [Symlink(777, 0, 0, 1, 2, b"evil", os.fsencode(canary / "file")),
            Write(777, 0, 5, b"OVERWRITTEN"),
            Setattr(777, ATTR_SIZE | ATTR_MODE, 0o100777, 0, 0, 0, 0, 0, b""),
            Setattr(777, ATTR_MTIME, 0, 0, 0, 0, 0, 123, b"")]
    env.log.add(recs)
    env.updater.run_once()
    assert snapshot(canary) == before
    assert os.readlink(env.shadow.tree / "evil") == os.fspath(canary / "file")


# ------------------------------------------------------------------ log errors

def test_corrupt_checkpoint_stops_the_updater_before_it(env):
    r = env.rec
    r.create(b"a", 0o644, b"1")
    n1 = env.checkpoint()
    r.create(b"b", 0o644, b"2")
    n2 = env.checkpoint()
    env.log.corrupt.add(n2)
    with pytest.raises(CorruptLog):
        env.updater.run_once()
    assert env.shadow.applied == n1
    assert env.updater.error.startswith(f"checkpoint {n2}: CorruptLog")
    assert not (env.shadow.tree / "b").exists()
    env.log.corrupt.clear()
    assert env.updater.run_once() == n2
    assert env.updater.error is None
    env.check()


def test_shadow_changed_by_hand_stops_the_updater(env):
    r = env.rec
    r.mkdir(b"d")
    r.create(b"d/f", 0o644, b"one")
    env.sync()
    shutil.rmtree(env.shadow.tree / "d")              # somebody "tidies up" the shadow
    r.create(b"d/g", 0o644, b"two")
    n = env.checkpoint()
    for _ in range(2):                                # stays stopped at the same record
        with pytest.raises(UpdaterError, match=f"checkpoint {n}: record 0 .*missing.*--reseed"):
            env.updater.run_once()
        assert env.shadow.applied == n - 1
        assert read_cursor(env.shadow)[:2] == (n, 0)
    assert "--reseed" in env.updater.error


def test_nothing_to_do(env):
    assert env.updater.run_once() == 0
    env.sync()                                        # an empty batch


def test_applied_json_keeps_the_checkpoint_time(env):
    """Recovery needs when the applied checkpoint was taken after the log rolled past
    its marker (recovery.py): the updater writes the marker's time with it."""
    env.rec.create(b"f", 0o644, b"x")
    env.sync()
    env.sync()
    assert env.shadow.applied == 2
    assert env.shadow.applied_checkpoint_time_ns == Info(2).marker.time_ns


# ------------------------------------------------------------------ resume after a kill

def _mixed_tree(r: Recorder) -> None:
    r.mkdir(b"d")
    r.mkdir(b"e")
    r.create(b"d/a", 0o644, b"a" * 100)
    r.create(b"d/b", 0o644, b"b" * 100)
    r.create(b"keep", 0o600, b"k")
    r.link(b"keep", b"e/keep2")
    r.symlink(b"s", b"d/a")


@pytest.fixture
def mixed_records(tmp_path_factory):
    """Build the mixed batch once, on a scratch tree, to know how many records it has
    and which of them are superseded writes (never applied, so never killed in)."""
    base = tmp_path_factory.mktemp("mixed")
    e = Env(base, _mixed_tree)
    try:
        _mixed_ops(e.rec)
        recs = e.rec.take()
        skipped = superseded_indices(recs)
        assert skipped, "the mixed batch has a superseded write (e/b2's first bytes)"
        return len(recs), skipped
    finally:
        e.close()


def _mixed_ops(r: Recorder) -> None:
    r.write(b"d/a", 10, b"XX")
    r.create(b"d/tmp", 0o640, b"new")
    r.write(b"d/tmp", 3, b"+more")
    r.rename(b"d/tmp", b"d/b")                        # over an existing file
    r.link(b"d/b", b"e/b2")
    r.rename(b"d", b"e/d", sysc.RENAME_NOREPLACE)
    r.rename(b"e/d/a", b"keep", sysc.RENAME_EXCHANGE)
    r.mkdir(b"x")
    r.rename(b"x", b"e/d", sysc.RENAME_EXCHANGE)      # directories
    r.unlink(b"e/keep2")
    r.write(b"keep", 0, b"K")
    r.truncate(b"e/b2", 2)
    r.unlink(b"x/b")                                  # e/b2 still links it
    r.symlink(b"e/s2", b"../keep")
    r.rename(b"e/s2", b"s")                           # a symlink over a symlink
    r.setxattr(b"keep", b"user.k", b"v")
    r.mknod(b"e/fifo", stat.S_IFIFO | 0o600)
    r.rmdir(b"e/d")
    r.chmod(b"e", 0o711)
    r.utime(b"e/b2", 1, 2)
    r.write(b"e/b2", 0, b"last")


@pytest.mark.parametrize("where", ["before", "after"])
def test_resume_after_kill_at_every_record(tmp_path, mixed_records, where, no_flush):
    """Kill the updater just before/after the effect of record k (the cursor
    still says k), or in the finishing step, then resume with a new updater.
    A superseded write is never applied: the batch goes through without a kill."""
    n, skipped = mixed_records
    real_apply, real_finish = updater_mod._Applier.apply_one, updater_mod._Applier.finish
    for k in range(n + 1):
        base = tmp_path / f"k{k}"
        base.mkdir()
        e = Env(base, _mixed_tree)
        try:
            _mixed_ops(e.rec)
            cp = e.checkpoint()

            def apply_one(self, rec, index):
                if index == k and where == "before":
                    raise KeyboardInterrupt("killed")
                real_apply(self, rec, index)
                if index == k:
                    raise KeyboardInterrupt("killed")

            def finish(self):
                if k == n and where == "before":
                    raise KeyboardInterrupt("killed")
                real_finish(self)
                if k == n:
                    raise KeyboardInterrupt("killed")

            with mock.patch.object(updater_mod._Applier, "apply_one", apply_one), \
                    mock.patch.object(updater_mod._Applier, "finish", finish):
                if k in skipped:
                    assert e.updater.run_once() == cp
                    e.check()
                    continue
                with pytest.raises(KeyboardInterrupt):
                    e.updater.run_once()
            assert e.shadow.applied == 0
            cur = read_cursor(e.shadow)
            at = k                  # the cursor is not moved past superseded writes alone
            while at - 1 in skipped:
                at -= 1
            assert cur is not None and cur.checkpoint == cp and cur.index == at
            # a fresh updater (a restarted daemon) resumes
            assert Updater(e.log, e.shadow).run_once() == cp
            e.check()
            assert read_cursor(e.shadow) is None
        finally:
            e.close()


def test_resume_with_start_skips_effects(env):
    r = env.rec
    r.create(b"f", 0o644, b"abc")
    recs = r.take()
    # apply only the first record, as if killed after it
    env.log.add(recs)
    assert apply_records(env.shadow, 1, recs[:1]) == 1
    assert read_cursor(env.shadow).index == 1
    assert Updater(env.log, env.shadow).run_once() == 1
    env.check()


def test_applied_but_cursor_left_behind(env):
    env.rec.create(b"f", 0o644, b"abc")
    env.sync()
    # killed after set_applied, before the cursor was removed
    (env.shadow.staging / "cursor").write_bytes(Cursor(1, 2, (0, 0), updater_mod.boot_id()).pack())
    assert env.updater.run_once() == 1
    assert read_cursor(env.shadow) is None
    env.check()


def test_interrupted_by_a_reboot_is_refused(env):
    """After a power loss mid-batch the cursor cannot be trusted: refuse rather than diverge."""
    env.rec.create(b"f", 0o644, b"abc")
    env.checkpoint()
    (env.shadow.staging / "cursor").write_bytes(Cursor(1, 1, (0, 0), b"another boot....").pack())
    with pytest.raises(UpdaterError, match="checkpoint 1 was being applied when the system went down"):
        env.updater.run_once()
    assert "seeded again" in env.updater.error
    (env.shadow.staging / "cursor").write_bytes(b"garbage")
    with pytest.raises(UpdaterError, match="damaged"):
        env.updater.run_once()


# ------------------------------------------------------------------ many large writes

def test_many_large_writes_in_one_batch_apply_exactly(env):
    """512 writes of 128 KiB over 8 files in one batch, applied in one pass (its speed is
    bench/'s to measure, docs/performance.md; not timed here)."""
    r = env.rec
    for i in range(8):
        r.create(b"f%d" % i)
    env.sync()
    chunk = os.urandom(128 << 10)
    for j in range(64):
        for i in range(8):
            r.write(b"f%d" % i, j * len(chunk), chunk)
    recs = env.rec.take()
    assert apply_records(env.shadow, 2, recs) == len(recs)
    env.shadow.set_applied(2)
    updater_mod.clear_cursor(env.shadow)
    env.check()


# ------------------------------------------------------------------ random operations

NAMES = [b"a", b"b", b"c", b"\xe9", b"d d"]


def _entries(r: Recorder) -> list[tuple[bytes, os.stat_result]]:
    out = []
    stack = [b""]
    while stack:
        d = stack.pop()
        for name in sorted(os.listdir(r.p(d))):
            rel = d + b"/" + name if d else name
            s = r.lst(rel)
            out.append((rel, s))
            if stat.S_ISDIR(s.st_mode):
                stack.append(rel)
    return out


def _random_op(r: Recorder, data, fds: list[int]) -> None:
    ents = _entries(r)
    dirs = [b""] + [p for p, s in ents if stat.S_ISDIR(s.st_mode)]
    files = [p for p, s in ents if stat.S_ISREG(s.st_mode)]
    nondirs = [p for p, s in ents if not stat.S_ISDIR(s.st_mode)]
    anything = [p for p, _ in ents]
    draw = data.draw

    def new_name() -> bytes:
        d = draw(st.sampled_from(dirs))
        n = draw(st.sampled_from(NAMES))
        return d + b"/" + n if d else n

    op = draw(st.sampled_from(["create", "create", "mkdir", "symlink", "link", "unlink", "rmdir",
                               "rename", "rename", "exchange", "write", "write", "truncate",
                               "chmod", "chown", "utime", "setxattr", "removexattr", "open",
                               "write_fd", "mknod"]))
    try:
        if op == "create":
            r.create(new_name(), draw(st.sampled_from([0o644, 0o600, 0o4755])),
                     draw(st.binary(max_size=50)))
        elif op == "mkdir":
            r.mkdir(new_name(), draw(st.sampled_from([0o755, 0o700, 0o1777])))
        elif op == "symlink":
            r.symlink(new_name(), draw(st.sampled_from(NAMES + [b"/x/y", b"../a"])))
        elif op == "mknod":
            r.mknod(new_name(), stat.S_IFIFO | 0o644)
        elif op == "link" and nondirs:
            r.link(draw(st.sampled_from(nondirs)), new_name())
        elif op == "unlink" and nondirs:
            r.unlink(draw(st.sampled_from(nondirs)))
        elif op == "rmdir" and len(dirs) > 1:
            r.rmdir(draw(st.sampled_from(dirs[1:])))
        elif op in ("rename", "exchange") and anything:
            old = draw(st.sampled_from(anything))
            new = draw(st.sampled_from(anything)) if op == "exchange" or draw(st.booleans()) else new_name()
            if (new + b"/").startswith(old + b"/") or (old + b"/").startswith(new + b"/"):
                return                                # into itself: EINVAL anyway
            flags = sysc.RENAME_EXCHANGE if op == "exchange" else draw(st.sampled_from([0, 0, 1]))
            r.rename(old, new, flags)
        elif op == "write" and files:
            r.write(draw(st.sampled_from(files)), draw(st.sampled_from([0, 3, 4096, 1 << 33])),
                    draw(st.binary(min_size=1, max_size=200)))
        elif op == "truncate" and files:
            r.truncate(draw(st.sampled_from(files)), draw(st.integers(0, 10000)))
        elif op == "chmod" and (files or dirs):
            r.chmod(draw(st.sampled_from(files + dirs)), draw(st.sampled_from([0o644, 0o2755, 0o1700])))
        elif op == "chown" and ROOT and anything:
            r.chown(draw(st.sampled_from(anything + [b""])), draw(st.sampled_from([-1, 0, 1234])),
                    draw(st.sampled_from([-1, 0, 5678])))
        elif op == "utime" and anything:
            r.utime(draw(st.sampled_from(anything + [b""])), 5, draw(st.integers(0, 1 << 62)))
        elif op == "setxattr" and (files or dirs):
            r.setxattr(draw(st.sampled_from(files + dirs)), draw(st.sampled_from([b"user.x", b"user.y"])),
                       draw(st.binary(max_size=20)))
        elif op == "removexattr" and (files or dirs):
            r.removexattr(draw(st.sampled_from(files + dirs)), draw(st.sampled_from([b"user.x", b"user.y"])))
        elif op == "open" and files and len(fds) < 5:
            fds.append(os.open(r.p(draw(st.sampled_from(files))), os.O_RDWR))
        elif op == "write_fd" and fds:
            r.write_fd(draw(st.sampled_from(fds)), draw(st.integers(0, 5000)), draw(st.binary(min_size=1, max_size=50)))
    except OSError as exc:
        # the operation failed on the original: nothing recorded, like fusejournal
        assert exc.errno in (errno.EEXIST, errno.ENOENT, errno.ENOTEMPTY, errno.ENOTDIR,
                             errno.EISDIR, errno.EINVAL, errno.ENODATA, errno.EPERM, errno.EXDEV), exc


@settings(max_examples=int(os.environ.get("FJ_RANDOM_EXAMPLES", "80")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_random_operations(tmp_path_factory, no_flush, data):
    base = tmp_path_factory.mktemp("random")
    e = Env(base, lambda r: (r.mkdir(b"a"), r.create(b"b", 0o644, b"seed"), r.create(b"a/c")))
    fds: list[int] = []
    try:
        for _ in range(data.draw(st.integers(1, 40), label="ops")):
            _random_op(e.rec, data, fds)
            if data.draw(st.integers(0, 9), label="checkpoint?") == 0:
                e.sync(data.draw(st.none() | st.tuples(st.integers(0, 30), st.sampled_from(["before", "after"])),
                                 label="kill"))
        e.sync()
    finally:
        for fd in fds:
            os.close(fd)
        e.close()


# ------------------------------------------------------------------ open-file limits

def test_a_low_open_file_limit_shrinks_the_caches_and_emfile_is_waited_out(env):
    """Under a low RLIMIT_NOFILE the updater's caches stay small (one batch writing
    200 files applies where 64 cached write fds would not fit), and an EMFILE in the
    middle of a batch is NoFds: transient, no error kept, nothing claimed, and the next
    pass resumes at the cursor and is exact (it used to be a permanent 'changed by
    hand? --reseed')."""
    import resource

    from fusejournal.errors import NoFds, NoSpace
    from fusejournal.treewalk import fd_cache_size

    for d in range(10):
        env.rec.mkdir(b"d%d" % d)
        for i in range(20):
            env.rec.create(b"d%d/f%d" % (d, i), data=b"x" * 10)
    env.sync()
    for d in range(10):
        for i in range(20):
            env.rec.write(b"d%d/f%d" % (d, i), 5, b"y")
    cp = env.checkpoint()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    real_getrlimit, real_open, calls = resource.getrlimit, os.open, {"n": 0}

    def as_if_64(what):
        return (64, hard) if what == resource.RLIMIT_NOFILE else real_getrlimit(what)

    def emfile_once(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(*a, **kw)

    # the caches are sized as under a limit of 64; the real limit leaves this process
    # (which holds the suite's other fds) 30 more than it has now
    opened = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 30, hard))
    try:
        with mock.patch("fusejournal.treewalk.resource.getrlimit", as_if_64):
            assert fd_cache_size(64, share=4) == 6 and fd_cache_size(16) == 3
            env.updater.close()
            env.updater = updater_mod.Updater(env.log, env.shadow)
            with mock.patch.object(updater_mod.os, "open", emfile_once):
                with pytest.raises(NoFds) as ei:
                    env.updater.run_once()
            assert isinstance(ei.value, NoSpace) and "open-file limit" in str(ei.value)
            assert env.updater.error is None and env.shadow.applied == cp - 1
            assert read_cursor(env.shadow) is not None
            assert env.updater.run_once() == cp
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    env.check()
