"""FSYNC and FSYNCDIR on pyfuse3's own sync threads (pyfuse3's patch, version 5;
docs/design.md, "Version 5"), through real mounts:

* a sync the policy does not run inline (fusejournal/syncpolicy.py: the first
  ones, before the disk's speed is known; more than 256 KiB owed; a file from
  before the mount; limit 0) is answered by the sync threads, never by trio's
  workers, and their durations bring the average under the limit; four
  concurrent committers, on both paths; the data reaches the checkpoint and
  the shadow;
* a sync held on a sync thread (a disk that stalls) holds only its caller:
  reads, writes, creates, listings and a checkpoint through the mount are
  served meanwhile, and the caller returns once the disk does;
* a sync that fails (an injected EIO) is the caller's error, and the next one
  succeeds;
* SIGTERM while a sync is held: the daemon answers it before the session
  goes, and ends; a remount is exact;
* ``FUSEJOURNAL_FSYNC_THREADS=off`` keeps the inline-or-worker choice
  (tests/mount/test_fsync_inline.py).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from fusejournal.fs import SYNC_THREADS  # (the daemon runs this checkout)

from conftest import Mounted, alive, is_mounted, needs_fuse, wait_reached
from test_fsync_inline import LIMIT_US, _dir_syncs, _sync_loop

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.usefixtures("fast_source"),   # (test_fsync_inline.py)
              pytest.mark.skipif(not SYNC_THREADS, reason="needs pyfuse3 with fusejournal's patch, "
                                                          "version 5 (scripts/setup-venv.sh)")]


def _held_sync(path: Path, result: list[object]) -> threading.Thread:
    """A thread that writes ``path`` and fsyncs it (or, for a directory, makes a file
    ``j`` in it and fsyncs the directory); ``result`` gets "ok" or the error."""
    def run() -> None:
        try:
            if path.is_dir():
                (path / "j").write_bytes(b"journal")
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                os.write(fd, b"held" * 1024)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            result.append("ok")
        except OSError as e:
            result.append(e)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_syncs_not_run_inline_go_to_the_sync_threads(dirs: Mounted) -> None:
    (dirs.source / "old").write_bytes(b"from before the mount")
    dirs.mount(env={"FUSEJOURNAL_FSYNC_INLINE_US": LIMIT_US})
    s = dirs.status()
    assert s["fsync_threads"] is True and s["fsync_thread_syncs"] == 0
    _sync_loop(dirs.mountpoint / "wal", 40)
    s = dirs.status()
    # the average is not known yet: the first ones on the threads, whose durations
    # bring it under the limit; then inline
    assert 6 <= s["fsync_thread"] <= 12 and s["fsync_inline"] == 40 - s["fsync_thread"], s
    assert s["fsync_thread_syncs"] == s["fsync_thread"] and s["fsync_worker"] == 0
    threaded = s["fsync_thread"]
    _sync_loop(dirs.mountpoint / "wal", 1, size=1 << 20)     # more than 256 KiB owed
    _sync_loop(dirs.mountpoint / "old", 3)                   # unknown dirty pages at first
    s = dirs.status()
    assert (s["fsync_thread"], s["fsync_inline"]) == (threaded + 2, 40 - threaded + 2), s
    _dir_syncs(dirs.mountpoint, 5)
    s = dirs.status()
    assert s["fsyncdir_thread"] + s["fsyncdir_inline"] == 5 and s["fsyncdir_worker"] == 0
    assert s["fsync_thread_syncs"] == threaded + 2 + s["fsyncdir_thread"]
    assert s["fsync_thread_failed"] == 0 and s["fsync_thread_queued"] == 0
    assert 1 <= s["fsync_thread_threads"] <= 8
    n = dirs.checkpoint()
    dirs.wait(n)
    for name in ("wal", "old", *(f"j{i}" for i in range(5))):
        assert (dirs.tree / name).read_bytes() == (dirs.source / name).read_bytes()
    assert os.path.getsize(dirs.tree / "wal") == 40 * 4096 + (1 << 20)


def test_limit_zero_sends_every_sync_to_the_threads(dirs: Mounted) -> None:
    dirs.mount(env={"FUSEJOURNAL_FSYNC_INLINE_US": "0"})
    _sync_loop(dirs.mountpoint / "wal", 30)
    s = dirs.status()
    assert (s["fsync_thread"], s["fsync_inline"], s["fsync_worker"]) == (30, 0, 0)
    assert s["fsync_thread_syncs"] == 30


def test_concurrent_committers_with_syncs_on_both_paths(dirs: Mounted) -> None:
    # four writers, each its own file, while each file's first syncs go to the threads
    # and the later ones run inline: every sync answered once, the data exact
    dirs.mount(env={"FUSEJOURNAL_FSYNC_INLINE_US": LIMIT_US})
    before = dirs.status()
    errors: list[BaseException] = []

    def committer(k: int) -> None:
        try:
            _sync_loop(dirs.mountpoint / f"c{k}", 200)
        except BaseException as e:          # reported below
            errors.append(e)

    ts = [threading.Thread(target=committer, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    s = dirs.status()
    total = (s["fsync_thread"] - before["fsync_thread"]) + (s["fsync_inline"] - before["fsync_inline"])
    assert total == 800 and s["fsync_worker"] == 0
    assert s["fsync_thread_syncs"] == s["fsync_thread"] and s["fsync_thread_failed"] == 0
    n = dirs.checkpoint()
    dirs.wait(n)
    for k in range(4):
        assert (dirs.tree / f"c{k}").read_bytes() == (dirs.source / f"c{k}").read_bytes()


def test_a_held_sync_holds_only_its_caller(dirs: Mounted, tmp_path: Path) -> None:
    flag = tmp_path / "stall"
    flag.touch()
    dirs.mount(env={"FUSEJOURNAL_FAULT": "fsync_thread:1:pause", "FUSEJOURNAL_FAULT_PAUSE": os.fspath(flag)})
    # a directory's sync: the checkpoint's barrier fsyncs the files open for writing
    # through the mount, and the kernel holds a file's inode lock for the length of an
    # FSYNC (fuse_fsync), so a held sync of a file delays a checkpoint as a slow disk would
    os.mkdir(dirs.mountpoint / "sub")
    result: list[object] = []
    t = _held_sync(dirs.mountpoint / "sub", result)
    try:
        wait_reached(flag, "the first sync on its thread")
        # the mount serves everything else while that sync is held
        (dirs.mountpoint / "other").write_bytes(b"o" * 10000)
        assert (dirs.mountpoint / "other").read_bytes() == b"o" * 10000
        os.mkdir(dirs.mountpoint / "d")
        assert sorted(os.listdir(dirs.mountpoint)) == ["d", "other", "sub"]
        _sync_loop(dirs.mountpoint / "wal", 5)         # other syncs (on other threads)
        n = dirs.checkpoint()                            # the halt does not wait for a sync
        s = dirs.status()
        assert s["fsync_thread"] + s["fsync_inline"] == 5 and s["fsync_thread_syncs"] == s["fsync_thread"], s
        assert t.is_alive() and result == []             # still held
    finally:
        flag.unlink()
        t.join(30)
    assert result == ["ok"]
    s = dirs.status()
    assert s["fsync_thread_syncs"] == s["fsync_thread"] + s["fsyncdir_thread"] and s["fsyncdir_thread"] == 1
    dirs.wait(n)
    assert (dirs.tree / "sub" / "j").read_bytes() == b"journal"     # made before the trigger
    assert (dirs.tree / "wal").read_bytes() == (dirs.source / "wal").read_bytes()


def test_a_sync_that_fails_is_the_callers_error(dirs: Mounted) -> None:
    dirs.mount(env={"FUSEJOURNAL_FAULT": "fsync_thread:3:error"})
    path = dirs.mountpoint / "db"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        outcomes = []
        for i in range(5):
            os.write(fd, bytes([65 + i]) * 4096)
            try:
                os.fdatasync(fd)
                outcomes.append(0)
            except OSError as e:
                outcomes.append(e.errno)
    finally:
        os.close(fd)
    assert outcomes == [0, 0, errno.EIO, 0, 0]
    s = dirs.status()
    assert s["fsync_thread_failed"] == 1 and s["fsync_thread_syncs"] == s["fsync_thread"] >= 3
    n = dirs.checkpoint()
    dirs.wait(n)
    assert (dirs.tree / "db").read_bytes() == b"".join(bytes([65 + i]) * 4096 for i in range(5))


def test_sigterm_answers_a_held_sync_and_a_remount_is_exact(dirs: Mounted, tmp_path: Path) -> None:
    flag = tmp_path / "stall"
    flag.touch()
    dirs.mount(env={"FUSEJOURNAL_FAULT": "fsync_thread:1:pause", "FUSEJOURNAL_FAULT_PAUSE": os.fspath(flag)})
    pid = dirs.pid
    assert pid is not None
    result: list[object] = []
    t = _held_sync(dirs.mountpoint / "db", result)
    try:
        wait_reached(flag, "the first sync on its thread")
        os.kill(pid, signal.SIGTERM)
        t.join(30)
        assert not t.is_alive(), "the held sync was not answered at SIGTERM"
        deadline = time.monotonic() + 30
        while alive(pid):
            assert time.monotonic() < deadline, "the daemon did not end on SIGTERM"
            time.sleep(0.02)
    finally:
        flag.unlink(missing_ok=True)
        t.join(30)
    # the sync ran before the session went (the stop ends the pause; it is not a failure)
    assert result == ["ok"]
    assert not is_mounted(dirs.mountpoint)
    dirs.pid = None
    assert (dirs.source / "db").read_bytes() == b"held" * 1024
    dirs.mount()
    n = dirs.checkpoint()
    dirs.wait(n)
    assert (dirs.tree / "db").read_bytes() == b"held" * 1024


def test_declined_trios_workers_take_them(dirs: Mounted) -> None:
    dirs.mount(env={"FUSEJOURNAL_FSYNC_THREADS": "off"})
    _sync_loop(dirs.mountpoint / "wal", 10)
    s = dirs.status()
    assert s["fsync_threads"] is False and "fsync_thread_syncs" not in s
    assert s["fsync_inline"] + s["fsync_worker"] == 10 and s["fsync_worker"] >= 1 and s["fsync_thread"] == 0
