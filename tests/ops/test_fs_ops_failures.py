"""Operations called directly, with a step failing after the change reached the original
(issue 7, item 4).

The rule (docs/design.md, "A failed step after the change"): afterwards either
the original is as it was (a creation taken back out, its directory's mtime
restored) and nothing is recorded, or the store holds a record of exactly what
reached the original, or the objects are in the needs-resync state (durable in
the journal, reported by status) -- never a change in the original that the
journal does not know about.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pyfuse3
import pytest
from opshelp import fields

from fusejournal import fs as fs_mod
from fusejournal import records as R
from fusejournal.fs import ROOT, Operations
from fusejournal.halt import Halt
from fusejournal.resyncflag import ResyncFlag
from fusejournal.tempstore import TempStore

CTX = pyfuse3.RequestContext()   # uid 0, gid 0
OLD_NS = 1_000_000_123_456_789


@pytest.fixture
def ops(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    flag = ResyncFlag(tmp_path / "needs_resync")
    o = Operations(fd, store=TempStore(None), halt=Halt(), resync_flag=flag)
    o.src = src
    o.flag = flag
    yield o
    o.close_all()
    os.close(fd)


def taken(o: Operations) -> list:
    return list(o.store.take())


def boom(*a, **kw):
    raise OSError(errno.EDQUOT, "injected")


def fail_records(monkeypatch, o: Operations) -> None:
    monkeypatch.setattr(o.store, "append", boom)
    monkeypatch.setattr(o.store, "append_write", boom)


def age(path: Path) -> None:
    """Give ``path`` an old mtime, so a change (or its undoing) is visible however fine the clock."""
    os.utime(path, ns=(OLD_NS, OLD_NS), follow_symlinks=False)


async def lookup(o: Operations, *names: bytes) -> int:
    ino = ROOT
    for n in names:
        ino = (await o.lookup(ino, n, CTX)).st_ino
    return ino


def flagged(o: Operations) -> list:
    """What the next mount would resync: read back from disk, not from memory."""
    return ResyncFlag(o.flag.path).load()


# ------------------------------------------------------------ creations are undone

async def _make(o: Operations, kind: str) -> None:
    if kind == "create":
        await o.create(ROOT, b"new", stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT, CTX)
    elif kind == "mknod":
        await o.mknod(ROOT, b"new", stat.S_IFIFO | 0o644, 0, CTX)
    elif kind == "mkdir":
        await o.mkdir(ROOT, b"new", 0o755, CTX)
    elif kind == "symlink":
        await o.symlink(ROOT, b"new", b"target", CTX)
    else:
        raise AssertionError(kind)


KINDS = ["create", "mknod", "mkdir", "symlink"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step", ["fchown", "fstat", "remember", "record"])
async def test_creation_failing_after_the_syscall_is_undone(ops: Operations, monkeypatch,
                                                            kind: str, step: str) -> None:
    age(ops.src)
    if step == "fchown":
        monkeypatch.setattr(fs_mod, "fchown_path_fd", boom)
    elif step == "fstat":
        real = os.fstat
        calls = []

        def fstat(fd):          # the parent's fstat before the syscall passes; the new object's fails
            calls.append(fd)
            if len(calls) > 1:
                raise OSError(errno.EIO, "injected")
            return real(fd)
        monkeypatch.setattr(fs_mod.os, "fstat", fstat)
    elif step == "remember":
        def remember(*a, **kw):
            os.close(a[0])
            raise pyfuse3.FUSEError(errno.EXDEV)
        monkeypatch.setattr(ops, "_remember", remember)
    else:
        fail_records(monkeypatch, ops)
    with pytest.raises(pyfuse3.FUSEError):
        await _make(ops, kind)
    monkeypatch.undo()
    assert os.listdir(ops.src) == []                          # the original is as it was
    assert os.stat(ops.src).st_mtime_ns == OLD_NS             # its directory's mtime too
    assert taken(ops) == [] and ops.flag.count == 0 and flagged(ops) == []
    assert [i.fino for i in ops.inodes.values()] == [ROOT] and ops.files == {}   # nothing registered, no fd kept
    await _make(ops, kind)                                    # the name is free again
    assert [type(r) for r in taken(ops)] == [R.Mkdir if kind == "mkdir" else
                                             R.Symlink if kind == "symlink" else R.Mknod]


@pytest.mark.parametrize("kind", KINDS)
async def test_creation_that_cannot_be_undone_needs_resync(ops: Operations, monkeypatch, kind: str) -> None:
    monkeypatch.setattr(fs_mod, "fchown_path_fd", boom)
    monkeypatch.setattr(fs_mod.os, "unlink", boom)
    monkeypatch.setattr(fs_mod.os, "rmdir", boom)
    with pytest.raises(pyfuse3.FUSEError):
        await _make(ops, kind)
    monkeypatch.undo()
    assert os.listdir(ops.src) == ["new"]       # still in the original, not recorded ...
    assert taken(ops) == []
    root = os.stat(ops.src)                     # ... so its directory is named for a resync
    assert [(i.ino, i.is_dir) for i in flagged(ops)] == [(root.st_ino, True)]
    assert ops.flag.count == 1 and "could not be undone" in ops.flag.reason


async def test_create_of_a_file_made_behind_the_mount_is_never_removed(ops: Operations, monkeypatch) -> None:
    """The kernel thought the name free; the original has it (made behind the mount): a
    failing create must not delete that file; it needs a resync instead."""
    (ops.src / "new").write_bytes(b"precious")
    monkeypatch.setattr(fs_mod, "fchown_path_fd", boom)
    with pytest.raises(pyfuse3.FUSEError):
        await ops.create(ROOT, b"new", stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT, CTX)
    monkeypatch.undo()
    assert (ops.src / "new").read_bytes() == b"precious"
    assert len(flagged(ops)) == 1 and ops.files == {}


async def test_link_failing_after_the_syscall_is_undone(ops: Operations, monkeypatch) -> None:
    (ops.src / "f").write_bytes(b"x")
    (ops.src / "d").mkdir()
    age(ops.src / "d")
    f = await lookup(ops, b"f")
    d = await lookup(ops, b"d")
    lookups = ops.inodes[f].lookups
    fail_records(monkeypatch, ops)
    with pytest.raises(pyfuse3.FUSEError):
        await ops.link(f, d, b"g", CTX)
    monkeypatch.undo()
    assert os.listdir(ops.src / "d") == [] and os.stat(ops.src / "f").st_nlink == 1
    assert os.stat(ops.src / "d").st_mtime_ns == OLD_NS
    assert ops.inodes[f].lookups == lookups
    assert taken(ops) == [] and flagged(ops) == []


# ------------------------------------------------------------ other changes are recorded, or need a resync

async def test_setattr_records_the_steps_that_reached_the_original(ops: Operations, monkeypatch) -> None:
    (ops.src / "f").write_bytes(b"0123456789")
    f = await lookup(ops, b"f")
    taken(ops)
    monkeypatch.setattr(fs_mod.os, "chmod", boom)         # truncate succeeds, chmod fails
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 3
    attr.st_mode = stat.S_IFREG | 0o600
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.setattr(f, attr, fields(update_size=True, update_mode=True), None, CTX)
    assert e.value.errno == errno.EDQUOT
    monkeypatch.undo()
    assert os.stat(ops.src / "f").st_size == 3
    recs = taken(ops)
    assert len(recs) == 1 and isinstance(recs[0], R.Setattr)
    assert recs[0].mask == R.ATTR_SIZE and recs[0].size == 3
    assert flagged(ops) == []


async def _change(o: Operations, kind: str) -> tuple[int, bool]:
    """Do one mutating operation on a prepared tree; return the (inode number, is_dir) the
    needs-resync state must name."""
    src = o.src
    root_ino = os.stat(src).st_ino
    if kind == "unlink":
        await o.unlink(ROOT, b"f", CTX)
        return root_ino, True
    if kind == "rmdir":
        await o.rmdir(ROOT, b"d", CTX)
        return root_ino, True
    if kind == "rename":
        await o.rename(ROOT, b"f", ROOT, b"g", 0, CTX)
        return root_ino, True
    f = await lookup(o, b"f")
    taken(o)
    fino = os.stat(src / "f").st_ino
    if kind == "setxattr":
        await o.setxattr(f, b"user.k", b"v", CTX)
    elif kind == "removexattr":
        await o.removexattr(f, b"user.old", CTX)
    elif kind == "setattr":
        attr = pyfuse3.EntryAttributes()
        attr.st_mode = stat.S_IFREG | 0o600
        got = await o.setattr(f, attr, fields(update_mode=True), None, CTX)
        assert stat.S_IMODE(got.st_mode) == 0o600
    elif kind == "write":
        fi = await o.open(f, os.O_WRONLY, CTX)
        assert await o.write(fi.fh, 0, b"NEW") == 3
        await o.release(fi.fh)
    elif kind == "open_trunc":
        fi = await o.open(f, os.O_WRONLY | os.O_TRUNC, CTX)
        await o.release(fi.fh)
    else:
        raise AssertionError(kind)
    return fino, False


def _original_changed(src: Path, kind: str) -> bool:
    names = sorted(os.listdir(src))
    f = src / ("g" if kind == "rename" else "f")
    return {
        "unlink": names == ["d"],
        "rmdir": names == ["f"],
        "rename": names == ["d", "g"],
        "setxattr": kind == "setxattr" and os.getxattr(f, "user.k") == b"v",
        "removexattr": kind == "removexattr" and "user.old" not in os.listxattr(f),
        "setattr": kind == "setattr" and stat.S_IMODE(os.stat(f).st_mode) == 0o600,
        "write": kind == "write" and f.read_bytes().startswith(b"NEW"),
        "open_trunc": kind == "open_trunc" and os.stat(f).st_size == 0,
    }[kind]


CHANGES = ["unlink", "rmdir", "rename", "setxattr", "removexattr", "setattr", "write", "open_trunc"]


@pytest.mark.parametrize("kind", CHANGES)
async def test_unrecordable_change_needs_resync(ops: Operations, monkeypatch, kind: str) -> None:
    (ops.src / "f").write_bytes(b"old data")
    os.setxattr(ops.src / "f", b"user.old", b"1")
    (ops.src / "d").mkdir()
    if kind not in ("unlink", "rmdir", "rename"):
        await lookup(ops, b"f")
    taken(ops)
    fail_records(monkeypatch, ops)
    assert ops.flag.count == 0
    # the change reached the original: the caller is told so (its view is the original's)
    ino, is_dir = await _change(ops, kind)
    monkeypatch.undo()
    assert _original_changed(ops.src, kind)
    assert taken(ops) == []
    assert [(i.ino, i.is_dir) for i in flagged(ops)] == [(ino, is_dir)]
    assert ops.flag.count == 1 and kind.split("_")[0] in ops.flag.reason


@pytest.mark.parametrize("kind", CHANGES)
async def test_recorded_change_sets_no_resync(ops: Operations, kind: str) -> None:
    """The same operations without a fault: recorded, no needs-resync (the test above can fail)."""
    (ops.src / "f").write_bytes(b"old data")
    os.setxattr(ops.src / "f", b"user.old", b"1")
    (ops.src / "d").mkdir()
    await _change(ops, kind)
    assert _original_changed(ops.src, kind)
    assert taken(ops) != [] and flagged(ops) == [] and ops.flag.count == 0


async def test_failing_resync_mark_is_still_reported(ops: Operations, monkeypatch, tmp_path: Path) -> None:
    """The state cannot be written (journal gone): it stays in memory, status reports it,
    and the daemon keeps daemon.json so the next mount recovers as after a crash."""
    (ops.src / "f").write_bytes(b"x")
    ops.flag.path = tmp_path / "no such dir" / "needs_resync"
    fail_records(monkeypatch, ops)
    await ops.unlink(ROOT, b"f", CTX)
    assert ops.flag.count == 1 and ops.flag.unsaved


# ------------------------------------------------------------ the state itself

def test_resync_flag_settle_keeps_what_came_later(tmp_path: Path) -> None:
    d = tmp_path / "x"
    d.mkdir()
    fd = os.open(d, os.O_PATH)
    try:
        first = ResyncFlag(tmp_path / "needs_resync")
        first.mark([(1, fd, True)], "one")
        second = ResyncFlag(tmp_path / "needs_resync")
        assert [i.ino for i in second.load()] == [1] and second.present and second.count == 1
        second.recovered = True             # the next mount resynced it
        assert second.count == 0
        second.mark([(2, fd, True)], "two")
        second.settle()                     # checkpoint durable: entry 1 done, entry 2 stays
        assert [i.ino for i in ResyncFlag(tmp_path / "needs_resync").load()] == [2]
        third = ResyncFlag(tmp_path / "needs_resync")
        third.load()
        third.recovered = True
        third.settle()
        assert not (tmp_path / "needs_resync").exists()
    finally:
        os.close(fd)


# ------------------------------------------------------------ control names are reserved

async def test_control_names_refused_below_the_root(ops: Operations) -> None:
    (ops.src / "d").mkdir()
    os.setxattr(ops.src / "d", b"user.fusejournal.checkpoint", b"stale")
    d = await lookup(ops, b"d")
    taken(ops)
    for name in (b"user.fusejournal.update_permission", b"user.fusejournal.x"):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.setxattr(d, name, b"v", CTX)
        assert e.value.errno == errno.EPERM
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.removexattr(d, name, CTX)
        assert e.value.errno == errno.EPERM
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getxattr(d, b"user.fusejournal.checkpoint", CTX)
    assert e.value.errno == errno.ENODATA
    assert await ops.listxattr(d, CTX) == []
    assert taken(ops) == []
    assert os.getxattr(ops.src / "d", b"user.fusejournal.checkpoint") == b"stale"   # untouched


# ------------------------------------------------------------ caller's open flags

async def test_open_flags_for_the_backing_fd(ops: Operations, monkeypatch) -> None:
    """O_NOFOLLOW (the daemon opens /proc/self/fd/N, a magic link) and O_DIRECT never reach
    the backing open; O_SYNC does; O_NOATIME is dropped when the backing open refuses it
    (a daemon not running as root, another user's file) rather than failing the open."""
    (ops.src / "f").write_bytes(b"data")
    f = await lookup(ops, b"f")
    seen = []
    real_open = os.open

    def spy(path, flags, *a, **kw):
        if flags & os.O_PATH:                # the inode table reopening its O_PATH fd
            return real_open(path, flags, *a, **kw)
        seen.append(flags)
        if flags & os.O_NOATIME:
            raise PermissionError(errno.EPERM, "not the owner")
        return real_open(path, flags, *a, **kw)
    monkeypatch.setattr(fs_mod.os, "open", spy)
    fi = await ops.open(f, os.O_RDWR | os.O_NOFOLLOW | os.O_NOATIME | os.O_SYNC | os.O_DIRECT, CTX)
    monkeypatch.undo()
    assert await ops.read(fi.fh, 0, 10) == b"data"
    assert await ops.write(fi.fh, 4, b"!") == 1          # unaligned: fine without O_DIRECT
    await ops.release(fi.fh)
    assert len(seen) == 2 and seen[0] & os.O_NOATIME and not seen[1] & os.O_NOATIME
    for fl in seen:
        assert not fl & (os.O_NOFOLLOW | os.O_DIRECT | os.O_APPEND)
        assert fl & os.O_SYNC == os.O_SYNC and fl & os.O_CLOEXEC and fl & os.O_ACCMODE == os.O_RDWR
    assert (ops.src / "f").read_bytes() == b"data!"
