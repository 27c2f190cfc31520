"""The Operations class called directly (no kernel): records, errors, the halt."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pyfuse3
import pytest
import trio
from opshelp import fields, ops  # noqa: F401  (ops is a fixture)

from fusejournal import records as R
from fusejournal.acquisition import Checkpointer
from fusejournal.fs import ROOT, Operations
from fusejournal.halt import Halt, HaltTimeout
from fusejournal.tempstore import TempStore

CTX = pyfuse3.RequestContext()   # uid 0, gid 0


def taken(o: Operations) -> list:
    return list(o.store.take())


async def test_create_write_records(ops: Operations) -> None:
    old = os.umask(0)
    try:
        fi, attr = await ops.create(ROOT, b"f", stat.S_IFREG | 0o640, os.O_WRONLY | os.O_CREAT, CTX)
    finally:
        os.umask(old)
    assert stat.S_IMODE(attr.st_mode) == 0o640
    assert await ops.write(fi.fh, 0, b"hello") == 5
    assert await ops.write(fi.fh, 10, b"world") == 5
    await ops.release(fi.fh)
    assert (ops.src / "f").read_bytes() == b"hello\0\0\0\0\0world"
    recs = taken(ops)
    st = os.stat(ops.src / "f")
    assert [type(r) for r in recs] == [R.Mknod, R.Write, R.Write]
    assert recs[0].path == b"f" and recs[0].ino == st.st_ino and recs[0].mode == st.st_mode
    assert recs[1] == R.Write(st.st_ino, 0, recs[1].mtime_ns, b"hello")
    assert recs[2].offset == 10 and recs[2].mtime_ns == st.st_mtime_ns


async def test_failed_operations_are_not_recorded(ops: Operations) -> None:
    assert (await ops.lookup(ROOT, b"missing", CTX)).st_ino == 0    # a negative entry
    await ops.mkdir(ROOT, b"d", 0o755, CTX)
    taken(ops)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.mkdir(ROOT, b"d", 0o755, CTX)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.unlink(ROOT, b"nothing", CTX)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.rename(ROOT, b"nothing", ROOT, b"x", 0, CTX)
    assert e.value.errno == errno.ENOENT
    assert taken(ops) == []


async def test_unexpected_exception_becomes_eio(ops: Operations) -> None:
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.write(12345, 0, b"x")          # unknown file handle: a KeyError inside
    assert e.value.errno == errno.EIO
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(999999, CTX)
    assert e.value.errno == errno.ESTALE


async def test_directory_paths_follow_renames(ops: Operations) -> None:
    a = await ops.mkdir(ROOT, b"a", 0o755, CTX)
    b = await ops.mkdir(a.st_ino, b"b", 0o700, CTX)
    await ops.rename(ROOT, b"a", ROOT, b"z", 0, CTX)
    fi, attr = await ops.create(b.st_ino, b"f", 0o600, os.O_WRONLY, CTX)
    await ops.release(fi.fh)
    recs = taken(ops)
    assert [r.path for r in recs if hasattr(r, "path")][:2] == [b"a", b"a/b"]
    ren = recs[2]
    assert isinstance(ren, R.Rename) and (ren.old, ren.new, ren.ino) == (b"a", b"z", 0)
    assert recs[3].path == b"z/b/f"


async def test_setattr_records_post_op_values(ops: Operations) -> None:
    fi, attr = await ops.create(ROOT, b"f", 0o644, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"x" * 100)
    taken(ops)
    a = pyfuse3.EntryAttributes()
    a.st_size = 10
    a.st_mode = 0o600
    a.st_mtime_ns = 1_234_567_890_123
    await ops.setattr(attr.st_ino, a, fields(update_size=True, update_mode=True, update_mtime=True),
                      fi.fh, CTX)
    await ops.release(fi.fh)
    (rec,) = taken(ops)
    assert isinstance(rec, R.Setattr)
    assert rec.mask == R.ATTR_SIZE | R.ATTR_MODE | R.ATTR_MTIME
    assert (rec.size, rec.mode, rec.mtime_ns) == (10, 0o600, 1_234_567_890_123)
    assert os.stat(ops.src / "f").st_size == 10


async def test_unlinked_open_file_writes_are_not_recorded(ops: Operations) -> None:
    fi, attr = await ops.create(ROOT, b"f", 0o644, os.O_RDWR, CTX)
    await ops.unlink(ROOT, b"f", CTX)
    taken(ops)
    await ops.write(fi.fh, 0, b"invisible")
    await ops.release(fi.fh)
    assert taken(ops) == []


async def test_halt_holds_mutations_and_lets_reads_through(ops: Operations) -> None:
    fi, attr = await ops.create(ROOT, b"f", 0o644, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"abc")
    done = []

    async def writer() -> None:
        await ops.write(fi.fh, 3, b"def")
        done.append("write")

    async with trio.open_nursery() as n:
        async with ops.halt.halted(1.0):
            n.start_soon(writer)
            await trio.sleep(0.05)
            assert done == []                                  # held by the halt
            assert await ops.read(fi.fh, 0, 10) == b"abc"      # reads are not halted
            batch = ops.store.take()
        await trio.sleep(0.05)
        assert done == ["write"]
    assert [type(r) for r in batch] == [R.Mknod, R.Write]
    assert [type(r) for r in ops.store.take()] == [R.Write]
    await ops.release(fi.fh)


async def test_halt_timeout_releases_and_fails() -> None:
    h = Halt()
    await h.enter()                      # an operation that never finishes in time
    with pytest.raises(HaltTimeout):
        async with h.halted(0.05):
            pass
    assert not h.is_halted
    await h.enter()                      # new operations flow again
    h.leave()
    h.leave()


async def test_checkpoint_failure_keeps_operations_pending(ops: Operations) -> None:
    class FailingLog:
        last_checkpoint = 0

        def append(self, records, marker):
            list(records)
            raise OSError(errno.ENOSPC, "No space left on device")

    cp = Checkpointer(ops.store, ops.halt, FailingLog())
    fi, attr = await ops.create(ROOT, b"f", 0o644, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"keep me")
    with pytest.raises(OSError):
        await cp.checkpoint("full disk")
    await ops.write(fi.fh, 7, b"!")
    recs = taken(ops)
    assert [type(r) for r in recs] == [R.Mknod, R.Write, R.Write]
    assert recs[1].data == b"keep me" and recs[2].data == b"!"
    await ops.release(fi.fh)


def test_tempstore_spills_and_keeps_order(tmp_path: Path) -> None:
    store = TempStore(tmp_path, memory_limit=64 << 10, chunk_bytes=16 << 10)
    expected = [R.Write(7, i * 1000, i, bytes([i % 256]) * 1000) for i in range(500)]
    for r in expected:
        store.append(r)
    assert store.memory_bytes <= (64 << 10) + (16 << 10) + 2000
    assert store.spilled_bytes > 300_000
    batch = store.take()
    assert store.operations == 0
    assert list(batch) == expected
    store.append(R.Rmdir(1, b"after"))
    store.restore(batch)
    assert list(store.take()) == expected + [R.Rmdir(1, b"after")]


async def test_handle_lookup_of_a_forgotten_inode_is_estale_not_an_error(ops: Operations, caplog) -> None:
    """The barrier opens files by handle through the mount; the kernel resolves a handle
    whose inode it no longer caches with LOOKUP(nodeid, "."): after the file was closed
    and forgotten that is a race, answered ESTALE quietly; any other request for an
    unknown inode is still logged as the daemon's error."""
    import logging
    caplog.set_level(logging.DEBUG, logger="fusejournal")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(987654, b".", CTX)
    assert e.value.errno == errno.ESTALE
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(987654, b"name", CTX)
    assert e.value.errno == errno.ESTALE
    assert [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_writeback_cache_write_keeps_the_originals_mtime(tmp_path: Path, monkeypatch) -> None:
    """With the writeback cache the kernel owns the mtime: a WRITE leaves the original's
    as it was (the kernel's SETATTR sets it), and records that mtime.  A utimensat that
    fails after the pwrite fails nothing: the write is answered and recorded, with the
    mtime the original then has."""
    import fusejournal.fs as fsmod
    (tmp_path / "src").mkdir()
    fd = os.open(tmp_path / "src", os.O_RDONLY | os.O_DIRECTORY)
    ops = Operations(fd, store=TempStore(None), halt=Halt(), writeback=True)
    ops.src = tmp_path / "src"
    fi, _ = await ops.create(ROOT, b"f", stat.S_IFREG | 0o644, os.O_RDWR | os.O_CREAT, CTX)
    os.utime(ops.src / "f", ns=(1_000_000_000, 2_000_000_007))       # the kernel's SETATTR
    taken(ops)
    assert await ops.write(fi.fh, 0, b"hello") == 5
    st = os.stat(ops.src / "f")
    assert st.st_mtime_ns == 2_000_000_007 and st.st_size == 5
    assert taken(ops) == [R.Write(st.st_ino, 0, 2_000_000_007, b"hello")]

    def fails(*_a: object) -> None:
        raise OSError(errno.EIO, "injected")
    monkeypatch.setattr(fsmod, "utimens_path_fd", fails)
    assert await ops.write(fi.fh, 5, b"world") == 5
    st = os.stat(ops.src / "f")
    assert (ops.src / "f").read_bytes() == b"helloworld"
    assert taken(ops) == [R.Write(st.st_ino, 5, st.st_mtime_ns, b"world")]
    assert st.st_mtime_ns != 2_000_000_007                              # the pwrite's own
    await ops.release(fi.fh)
    ops.close_all()
    os.close(fd)
