"""Tests that fail when a promise's mechanism is removed (Operations, units; no kernel).

Each test here was written against a deliberately broken copy of the code and
fails on it (issue 8, item 7):

* a mutating handler that ignores the halt: the change would reach the
  original while halted (and land in the wrong checkpoint);
* an acquisition that takes the temporary store without halting, or before
  the operations in flight have finished;
* an activity log whose intent is not fdatasync'ed before the change it
  announces reaches the original (after a power cut, recovery would not know
  what to resync);
* a shadow that claims a checkpoint (``applied.json``) before its changes are
  on disk (``syncfs``);
* a shadow verifier that overlooks owners, or names missing from the shadow.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from opshelp import fields, ops  # noqa: F401  (ops is a fixture)

from fusejournal import records as R
from fusejournal import sysc
from fusejournal.acquisition import Checkpointer
from fusejournal.activity import ActivityLog
from fusejournal.fs import ROOT, Operations
from fusejournal.halt import Halt
from fusejournal.shadow import Shadow
from fusejournal.tempstore import TempStore

CTX = pyfuse3.RequestContext()   # uid 0, gid 0
IS_ROOT = os.geteuid() == 0


async def _ino(ops: Operations, name: bytes) -> int:
    return (await ops.lookup(ROOT, name, CTX)).st_ino


def _attr(**kw) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    for k, v in kw.items():
        setattr(a, k, v)
    return a


# ------------------------------------------------------------------ the halt

# name -> (set-up in the original, the handler call, "did it reach the original?", record type)
Case = tuple[Callable[[Path], None], Callable[[Operations], Awaitable[object]], Callable[[Path], bool], type]


def _file(src: Path, data: bytes = b"data") -> None:
    (src / "a").write_bytes(data)


async def _open_trunc(o: Operations) -> None:
    fi = await o.open(await _ino(o, b"a"), os.O_WRONLY | os.O_TRUNC, CTX)
    await o.release(fi.fh)


async def _create(o: Operations) -> None:
    fi, _ = await o.create(ROOT, b"f", 0o644, os.O_RDWR, CTX)
    await o.release(fi.fh)


CASES: dict[str, Case] = {
    "mkdir": (lambda s: None, lambda o: o.mkdir(ROOT, b"d", 0o755, CTX),
              lambda s: (s / "d").is_dir(), R.Mkdir),
    "mknod": (lambda s: None, lambda o: o.mknod(ROOT, b"p", stat.S_IFIFO | 0o644, 0, CTX),
              lambda s: (s / "p").exists(), R.Mknod),
    "create": (lambda s: None, _create, lambda s: (s / "f").exists(), R.Mknod),
    "symlink": (lambda s: None, lambda o: o.symlink(ROOT, b"l", b"a", CTX),
                lambda s: os.path.islink(s / "l"), R.Symlink),
    "link": (_file, lambda o: _then(_ino(o, b"a"), lambda i: o.link(i, ROOT, b"b", CTX)),
             lambda s: (s / "b").exists(), R.Link),
    "unlink": (_file, lambda o: o.unlink(ROOT, b"a", CTX), lambda s: not (s / "a").exists(), R.Unlink),
    "rmdir": (lambda s: (s / "d").mkdir(), lambda o: o.rmdir(ROOT, b"d", CTX),
              lambda s: not (s / "d").exists(), R.Rmdir),
    "rename": (_file, lambda o: o.rename(ROOT, b"a", ROOT, b"b", 0, CTX),
               lambda s: (s / "b").exists(), R.Rename),
    "chmod": (_file, lambda o: _then(_ino(o, b"a"), lambda i: o.setattr(
                  i, _attr(st_mode=stat.S_IFREG | 0o600), fields(update_mode=True), None, CTX)),
              lambda s: stat.S_IMODE((s / "a").stat().st_mode) == 0o600, R.Setattr),
    "truncate": (_file, lambda o: _then(_ino(o, b"a"), lambda i: o.setattr(
                     i, _attr(st_size=1), fields(update_size=True), None, CTX)),
                 lambda s: (s / "a").stat().st_size == 1, R.Setattr),
    "utimens": (_file, lambda o: _then(_ino(o, b"a"), lambda i: o.setattr(
                    i, _attr(st_atime_ns=5, st_mtime_ns=7), fields(update_atime=True, update_mtime=True),
                    None, CTX)),
                lambda s: (s / "a").stat().st_mtime_ns == 7, R.Setattr),
    "setxattr": (_file, lambda o: _then(_ino(o, b"a"), lambda i: o.setxattr(i, b"user.k", b"v", CTX)),
                 lambda s: b"v" == _getx(s / "a"), R.Setxattr),
    "removexattr": (lambda s: (_file(s), os.setxattr(s / "a", b"user.k", b"v")),
                    lambda o: _then(_ino(o, b"a"), lambda i: o.removexattr(i, b"user.k", CTX)),
                    lambda s: _getx(s / "a") is None, R.Removexattr),
    "open O_TRUNC": (_file, _open_trunc, lambda s: (s / "a").stat().st_size == 0, R.Setattr),
}
if IS_ROOT:
    CASES["chown"] = (_file, lambda o: _then(_ino(o, b"a"), lambda i: o.setattr(
                          i, _attr(st_uid=4321, st_gid=4321), fields(update_uid=True, update_gid=True),
                          None, CTX)),
                      lambda s: (s / "a").stat().st_uid == 4321, R.Setattr)


async def _then(first: Awaitable[int], then: Callable[[int], Awaitable[object]]) -> object:
    return await then(await first)


def _getx(p: Path) -> bytes | None:
    try:
        return os.getxattr(p, b"user.k")
    except OSError:
        return None


@pytest.mark.parametrize("name", sorted(CASES))
async def test_every_mutating_handler_waits_for_the_halt(ops: Operations, name: str) -> None:
    """Held while halted: nothing reaches the original, nothing is recorded into
    the batch being taken; once the halt lifts the operation completes and its
    record goes to the next batch."""
    setup, act, reached, rtype = CASES[name]
    setup(ops.src)
    if (ops.src / "a").exists():
        await ops.lookup(ROOT, b"a", CTX)      # the kernel knows the inode before it acts on it
    ops.store.take()
    done: list[str] = []

    async def run() -> None:
        await act(ops)
        done.append(name)

    async with trio.open_nursery() as n:
        async with ops.halt.halted(1.0):
            n.start_soon(run)
            await trio.sleep(0.05)
            assert done == [], f"{name} completed during the halt"
            assert not reached(ops.src), f"{name} reached the original during the halt"
            batch = list(ops.store.take())
        with trio.fail_after(5):
            while not done:
                await trio.sleep(0.01)
    assert reached(ops.src)
    assert batch == []
    assert rtype in [type(r) for r in ops.store.take()]


async def test_acquisition_takes_the_store_only_halted_and_drained() -> None:
    """The take happens inside the halt, after the in-flight operation left."""
    halt = Halt()
    store = TempStore(None)
    store.append(R.Rmdir(1, b"x"))
    seen: list[tuple[bool, int]] = []
    real_take = store.take

    def take():
        seen.append((halt.is_halted, halt.inflight))
        return real_take()
    store.take = take

    class Log:
        last_checkpoint = 0

        def append(self, records, marker):
            list(records)
            self.last_checkpoint = marker.checkpoint
            return SimpleNamespace(marker=marker)

    cp = Checkpointer(store, halt, Log(), halt_timeout=5)
    left: list[float] = []

    async def slow_operation() -> None:
        async with halt.operation():
            await trio.sleep(0.1)
            left.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(slow_operation)
        await trio.sleep(0.01)
        assert halt.inflight == 1
        await cp.checkpoint("t")
        assert left, "the checkpoint did not wait for the operation in flight"
    assert seen == [(True, 0)]


# ------------------------------------------------------------------ write intents

def _handles_supported(path: Path) -> bool:
    fd = os.open(path, os.O_PATH)
    try:
        sysc.name_to_handle(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("what", ["mkdir", "write"])
async def test_write_intent_is_durable_before_the_change(tmp_path: Path, monkeypatch, what: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"old")
    if not _handles_supported(src):
        pytest.skip("the test filesystem has no file handles")
    act = ActivityLog(tmp_path / "activity", enabled=True)
    act.open()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    o = Operations(fd, store=TempStore(None), halt=Halt(), activity=act)
    events: list[str] = []
    real_fdatasync, real_mkdir, real_pwrite = os.fdatasync, os.mkdir, os.pwrite

    def fdatasync(f: int) -> None:
        real_fdatasync(f)
        if f == act._fd:
            events.append("intent durable")

    def mkdir(*a, **kw):
        events.append("change")
        return real_mkdir(*a, **kw)

    def pwrite(*a, **kw):
        events.append("change")
        return real_pwrite(*a, **kw)
    try:
        if what == "write":
            fi = await o.open(await _ino(o, b"a"), os.O_WRONLY, CTX)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "pwrite", pwrite)
        if what == "mkdir":
            await o.mkdir(ROOT, b"d", 0o755, CTX)
        else:
            await o.write(fi.fh, 0, b"new")
        monkeypatch.undo()
        if what == "write":
            await o.release(fi.fh)
        assert events == ["intent durable", "change"]
        intents = ActivityLog(tmp_path / "activity").open()
        want = os.stat(src).st_ino if what == "mkdir" else os.stat(src / "a").st_ino
        assert [i.ino for i in intents] == [want]
    finally:
        monkeypatch.undo()
        o.close_all()
        os.close(fd)
        act.close()


# ------------------------------------------------------------------ the shadow

def test_shadow_is_synced_before_it_claims_a_checkpoint(tmp_path: Path, monkeypatch) -> None:
    orig = tmp_path / "orig"
    orig.mkdir()
    fd = os.open(orig, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sh = Shadow(tmp_path / "shadow")
        sh.create()
        sh.seed(fd)
    finally:
        os.close(fd)
    events: list[str] = []
    real_syncfs, real_rename = sysc.syncfs, os.rename

    def syncfs(f: int) -> None:
        real_syncfs(f)
        if os.fstat(f).st_dev == os.stat(sh.root).st_dev:
            events.append("syncfs")

    def rename(a, b, *args, **kw):
        real_rename(a, b, *args, **kw)
        if os.fsdecode(b).endswith("applied.json"):
            events.append("applied.json")
    monkeypatch.setattr(sysc, "syncfs", syncfs)
    monkeypatch.setattr(os, "rename", rename)
    sh.set_applied(3)
    monkeypatch.undo()
    assert events == ["syncfs", "applied.json"]
    assert sh.applied == 3


def _seeded(tmp_path: Path) -> tuple[Path, Shadow, int]:
    orig = tmp_path / "orig"
    (orig / "d").mkdir(parents=True)
    (orig / "d" / "f").write_bytes(b"x" * 100)
    (orig / "g").write_bytes(b"y")
    fd = os.open(orig, os.O_RDONLY | os.O_DIRECTORY)
    sh = Shadow(tmp_path / "shadow")
    sh.create()
    sh.seed(fd)
    assert sh.verify_matches(fd) == []
    return orig, sh, fd


def test_verifier_reports_names_missing_from_the_shadow(tmp_path: Path) -> None:
    orig, sh, fd = _seeded(tmp_path)
    try:
        ino = os.stat(orig / "d" / "f").st_ino
        os.unlink(sh.tree / "d" / "f")
        os.unlink(sh.inodes / str(ino))
        diffs = "\n".join(sh.verify_matches(fd))
        assert "/d/f: missing in the shadow" in diffs
        os.unlink(sh.tree / "g")
        os.unlink(sh.inodes / str(os.stat(orig / "g").st_ino))
        os.rmdir(sh.tree / "d")
        diffs = "\n".join(sh.verify_matches(fd))
        assert "/d: missing in the shadow" in diffs and "/g: missing in the shadow" in diffs
    finally:
        os.close(fd)


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_verifier_reports_owners(tmp_path: Path) -> None:
    orig, sh, fd = _seeded(tmp_path)
    try:
        os.chown(sh.tree / "d" / "f", 1234, -1)
        os.chown(sh.tree / "d", -1, 4321)
        diffs = "\n".join(sh.verify_matches(fd))
        assert "/d/f: owner 0:0 in the original, 1234:0 in the shadow" in diffs
        assert "/d: owner 0:0 in the original, 0:4321 in the shadow" in diffs
    finally:
        os.close(fd)


async def test_the_halt_does_no_data_io_whatever_is_pending(tmp_path: Path, monkeypatch) -> None:
    """Promise 7: the halt's work does not grow with pending data.  Structurally: while
    the gate is closed nothing is read, written or synced, with 40 MiB pending of
    which most is spilled to disk."""
    halt = Halt()
    store = TempStore(tmp_path, memory_limit=1 << 20, chunk_bytes=256 << 10)
    for i in range(160):
        store.append(R.Write(7, i << 18, i, os.urandom(256 << 10)))
    assert store.spilled_bytes > 30 << 20
    io_while_halted: list[str] = []
    for name in ("read", "write", "pread", "pwrite", "preadv", "pwritev", "fsync", "fdatasync",
                 "sendfile", "copy_file_range"):
        real = getattr(os, name)

        def spy(*a, _real=real, _name=name, **kw):
            if halt.is_halted:
                io_while_halted.append(_name)
            return _real(*a, **kw)
        monkeypatch.setattr(os, name, spy)

    class Log:
        last_checkpoint = 0

        def append(self, records, marker):
            assert sum(1 for _ in records) == 160
            self.last_checkpoint = marker.checkpoint
            return SimpleNamespace(marker=marker)

    act = ActivityLog(tmp_path / "activity", enabled=True)
    act.open()
    cp = Checkpointer(store, halt, Log(), activity=act)
    await cp.checkpoint("big")
    act.close()
    assert io_while_halted == []
    assert halt.count == 1
