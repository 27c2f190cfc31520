"""Where an FSYNC's sync runs (fusejournal/syncpolicy.py), through real mounts, with
pyfuse3's sync threads declined (``FUSEJOURNAL_FSYNC_THREADS=off``: the choice the
mount makes where pyfuse3 is not patched):

* small syncs run inline once the mount has seen fast ones; a file with more
  than 256 KiB written since its last sync, and the first sync of a file that
  existed before the daemon knew it, run on a worker (a file created through
  the mount is known from the start); directories' syncs have their own
  average; ``FUSEJOURNAL_FSYNC_INLINE_US=0`` never inlines;
* a sync that fails inline (an injected EIO) is the application's error, and
  its bytes are still owed: the next sync counts them;
* a disk that stalls once, inline: every request waits for it (the bet), and
  the syncs after it run on workers until fast ones bring the average back;
* a bad limit is refused by ``mount`` in one line, nothing mounted;
* whatever the path, the data is in the checkpoint and the shadow.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from conftest import Mounted, fj, is_mounted, needs_fuse, wait_reached

# the source on a tmpfs: a sync's duration is the policy's input, not a shared disk's
pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.usefixtures("fast_source")]

#: the highest limit mount accepts: far above a real sync of a few KiB, even on a CI
#: machine whose disk is shared by other tests' syncs
LIMIT_US = "100000"
#: for the stall: low enough that one sync stalled 0.5 s moves the average over it
STALL_LIMIT_US = "20000"
#: the inline-or-worker choice instead of pyfuse3's sync threads (tests/mount/test_fsync_threads.py)
POLICY = {"FUSEJOURNAL_FSYNC_THREADS": "off"}


def _sync_loop(path: Path, n: int, size: int = 4096) -> None:
    """``n`` times: write ``size`` bytes at the end of ``path`` and fdatasync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for i in range(n):
            os.write(fd, bytes([i % 251]) * size)
            os.fdatasync(fd)
    finally:
        os.close(fd)


def _dir_syncs(mp: Path, n: int) -> None:
    """``n`` times: a file ``j<i>`` made in ``mp``, then ``mp`` synced (SQLite's way)."""
    fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(n):
            (mp / f"j{i}").write_bytes(b"journal")
            os.fsync(fd)
    finally:
        os.close(fd)


def _counts(m: Mounted) -> tuple[int, int, int]:
    s = m.status()
    return s["fsync_inline"], s["fsync_worker"], s["fsync_slow_inline"]


def test_small_syncs_run_inline_large_and_first_ones_on_workers(dirs: Mounted) -> None:
    (dirs.source / "old").write_bytes(b"from before the mount")
    dirs.mount(env={**POLICY, "FUSEJOURNAL_FSYNC_INLINE_US": LIMIT_US})
    s = dirs.status()
    assert s["fsync_inline_limit_us"] == 100000
    assert _counts(dirs) == (0, 0, 0)
    _sync_loop(dirs.mountpoint / "wal", 40)
    inline, worker, slow = _counts(dirs)
    # created through the mount, but the average is not known yet: the first 6 on workers
    assert 6 <= worker <= 12 and inline == 40 - worker and slow == 0, (inline, worker)
    # more than 256 KiB written since the last sync: a worker
    _sync_loop(dirs.mountpoint / "wal", 1, size=1 << 20)
    assert _counts(dirs) == (inline, worker + 1, 0)
    # a file that was there before the mount: its first sync on a worker, then inline
    _sync_loop(dirs.mountpoint / "old", 3)
    assert _counts(dirs) == (inline + 2, worker + 2, 0)
    # a new file: inline from its first sync
    _sync_loop(dirs.mountpoint / "new", 3)
    assert _counts(dirs) == (inline + 5, worker + 2, 0)
    n = dirs.checkpoint()
    dirs.wait(n)
    for name in ("wal", "old", "new"):
        assert (dirs.tree / name).read_bytes() == (dirs.source / name).read_bytes()
    assert os.path.getsize(dirs.tree / "wal") == 40 * 4096 + (1 << 20)


def test_directory_syncs_have_their_own_average(dirs: Mounted) -> None:
    dirs.mount(env={**POLICY, "FUSEJOURNAL_FSYNC_INLINE_US": LIMIT_US})
    _dir_syncs(dirs.mountpoint, 30)
    s = dirs.status()
    assert s["fsyncdir_inline"] + s["fsyncdir_worker"] == 30
    assert 6 <= s["fsyncdir_worker"] <= 12 and s["fsyncdir_slow_inline"] == 0, s
    assert _counts(dirs) == (0, 0, 0)       # the files' policy saw none of them
    n = dirs.checkpoint()
    dirs.wait(n)
    assert sorted(os.listdir(dirs.tree)) == sorted(f"j{i}" for i in range(30))


def test_limit_zero_never_inlines(dirs: Mounted) -> None:
    dirs.mount(env={**POLICY, "FUSEJOURNAL_FSYNC_INLINE_US": "0"})
    _sync_loop(dirs.mountpoint / "f", 30)
    fd = os.open(dirs.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert _counts(dirs) == (0, 30, 0)
    assert (dirs.status()["fsyncdir_inline"], dirs.status()["fsyncdir_worker"]) == (0, 1)


def test_an_inline_sync_that_fails_is_the_callers_error_and_its_bytes_stay_owed(dirs: Mounted) -> None:
    # the first sync that is chosen inline fails with EIO
    dirs.mount(env={**POLICY, "FUSEJOURNAL_FSYNC_INLINE_US": LIMIT_US, "FUSEJOURNAL_FAULT": "fsync_inline:1:error"})
    path = dirs.mountpoint / "db"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        s = dirs.status()
        while s["fsync_average_us"] > s["fsync_inline_limit_us"]:   # workers until it is known
            os.write(fd, b"w" * 4096)
            os.fdatasync(fd)
            s = dirs.status()
        inline, worker, _ = _counts(dirs)
        assert inline == 0 and 6 <= worker <= 12, (inline, worker)
        os.write(fd, b"a" * (200 << 10))      # 200 KiB: inline
        with pytest.raises(OSError) as e:
            os.fdatasync(fd)
        assert e.value.errno == errno.EIO     # as from the disk
        assert _counts(dirs) == (0, worker, 0)        # a failed sync is not counted
        os.write(fd, b"b" * (100 << 10))      # 300 KiB owed now: more than 256 KiB
        os.fdatasync(fd)
        assert _counts(dirs) == (0, worker + 1, 0)
        os.write(fd, b"c" * 4096)
        os.fdatasync(fd)
        assert _counts(dirs) == (1, worker + 1, 0)
    finally:
        os.close(fd)
    n = dirs.checkpoint()
    dirs.wait(n)
    assert (dirs.tree / "db").read_bytes() == (dirs.source / "db").read_bytes()


def test_a_stalled_inline_sync_sends_the_next_ones_to_workers(dirs: Mounted, tmp_path: Path) -> None:
    flag = tmp_path / "stall"
    flag.touch()
    # the 20th inline sync stalls until the flag is removed (the trio thread blocks: the
    # whole mount waits, as it would for a disk that stalls)
    dirs.mount(env={**POLICY, "FUSEJOURNAL_FSYNC_INLINE_US": STALL_LIMIT_US,
                    "FUSEJOURNAL_FAULT": "fsync_inline:20:pause",
                    "FUSEJOURNAL_FAULT_PAUSE": os.fspath(flag)})
    stop = threading.Event()
    errors: list[BaseException] = []

    def syncer() -> None:
        try:
            fd = os.open(dirs.mountpoint / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                while not stop.is_set():
                    os.write(fd, b"x" * 4096)
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        except BaseException as e:         # reported by the test below
            errors.append(e)

    t = threading.Thread(target=syncer)
    t.start()
    try:
        def syncing() -> None:
            assert not errors, errors

        wait_reached(flag, "the 20th inline sync", timeout=60, check=syncing)
        stop.set()
        time.sleep(0.5)                     # 25 × the limit: the average goes over it at once
    finally:
        flag.unlink()
        stop.set()
        t.join(60)
    assert not t.is_alive() and not errors, errors
    inline, worker, slow = _counts(dirs)
    # the stalled sync is slow; on a busy machine one of the 19 before it may have been too
    assert inline == 20 and slow >= 1, (inline, worker, slow)
    _sync_loop(dirs.mountpoint / "log", 1)
    assert _counts(dirs) == (20, worker + 1, slow)       # after the stall: a worker
    deadline = time.monotonic() + 60
    while (again := _counts(dirs))[0] == 20:             # fast syncs bring it back: inline
        assert time.monotonic() < deadline, again
        _sync_loop(dirs.mountpoint / "log", 1)
    assert again[1] - worker - 1 >= 1, again               # (after more than one on a worker)
    n = dirs.checkpoint()
    dirs.wait(n)
    assert (dirs.tree / "log").read_bytes() == (dirs.source / "log").read_bytes()


@pytest.mark.parametrize("value", ["fast", "-5", "100001", "nan", "7" * 5000])
def test_bad_limit_is_refused_in_one_line(dirs: Mounted, value: str) -> None:
    r = fj("mount", dirs.source, dirs.mountpoint, "--journal", dirs.journal, "--shadow", dirs.shadow,
           check=False, env={**os.environ, "FUSEJOURNAL_FSYNC_INLINE_US": value})
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "FUSEJOURNAL_FSYNC_INLINE_US=" in r.stderr
    assert len(r.stderr) < 300
    assert not is_mounted(dirs.mountpoint)
    assert not dirs.journal.exists()
