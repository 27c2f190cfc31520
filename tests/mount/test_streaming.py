"""Streaming the temporary store into the ordered log, on real mounts.

- what was streamed ahead of the marker is in the checkpoint, exactly;
- SIGKILL with streamed entries not yet closed by a marker (written and not
  synced; synced; the tail written and the marker not): the last confirmed
  checkpoint is exactly as before, and the next one equals the original;
- power loss: the unsynced streamed entries cut at a random point;
- a clean unmount keeps the streamed entries for the first checkpoint after the
  remount;
- a streamed append that fails: nothing is lost, the mount keeps serving, and
  streaming resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mounted, alive, daemon_errors, fj, is_mounted, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

MiB = 1 << 20
UPDATE = b"user.fusejournal.update_permission"


def until(pred, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def streamed(m: Mounted) -> int:
    return m.status()["streamed_unmarked_operations"]


@contextlib.contextmanager
def held_streamer(m: Mounted) -> Iterator[None]:
    """Mount ``m`` with its streamer held at its first step while the body runs: what the
    log holds unmarked is then only what an earlier run left (the recovery's resync
    records are not streamed meanwhile, however slow the body is on a loaded machine)."""
    flag = m.journal.parent / "hold-streamer"
    flag.touch()
    try:
        m.mount(env={"FUSEJOURNAL_FAULT": "streamer.step:1:pause", "FUSEJOURNAL_FAULT_PAUSE": os.fspath(flag)})
        yield
    finally:
        flag.unlink()


def segments(m: Mounted) -> list[Path]:
    return sorted((m.journal / "log").glob("*.fjlog"))


def period_two(mp: Path, data_mib: int = 6) -> None:
    """Changes to pre-existing objects (covered by write intents) and new ones, with
    enough data to fill several stream chunks."""
    with open(mp / "old", "r+b") as f:
        f.seek(10)
        f.write(b"CHANGED")
    os.rename(mp / "olddir" / "x", mp / "moved")
    (mp / "olddir" / "new").write_text("new in period 2")
    os.chmod(mp / "a", 0o600)
    rng = random.Random(3)
    with open(mp / "olddir" / "data", "wb") as f:
        for _ in range(data_mib):
            f.write(rng.randbytes(MiB))


def prepare(m: Mounted) -> dict:
    """Checkpoint 1 through a first, clean mount; returns its snapshot."""
    (m.source / "old").write_bytes(b"existed before the mount" * 100)
    (m.source / "olddir").mkdir()
    (m.source / "olddir" / "x").write_text("x")
    m.mount()
    (m.mountpoint / "a").write_text("checkpoint one")
    assert m.checkpoint("one") == 1
    s1 = snapshot(m.mountpoint)
    m.wait(1)
    m.umount()
    return s1


def test_streamed_records_are_in_the_checkpoint_exactly(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    (mp / "d").mkdir()
    rng = random.Random(1)
    for i in range(5):
        with open(mp / "d" / f"f{i}", "wb") as f:
            f.write(rng.randbytes(2 * MiB + i))
    os.rename(mp / "d" / "f0", mp / "g")
    until(lambda: streamed(mounted) > 0, what="the streamer")
    st = mounted.status()
    assert st["pending_bytes"] >= 10 * MiB
    with open(mp / "d" / "f1", "r+b") as f:                    # the tail
        f.write(b"tail")
    n = mounted.checkpoint("streamed")
    st = mounted.status()
    assert st["streamed_unmarked_operations"] == 0 and st["pending_operations"] == 0
    expected = snapshot(mounted.source)
    mounted.wait(n)
    assert_same(expected, snapshot(mounted.tree))
    markers = json.loads(fj("log", "--json", mounted.journal).stdout)
    assert markers[-1]["checkpoint"] == n and markers[-1]["raw_bytes"] >= 10 * MiB   # streamed + tail


@pytest.mark.parametrize("point", ["log.stream_written:1", "log.stream_synced:1", "log.before_marker:1",
                                   "power loss"])
def test_kill_with_streamed_entries_not_yet_marked(dirs: Mounted, point: str) -> None:
    s1 = prepare(dirs)
    mp = dirs.mountpoint
    fault = "log.stream_written:2" if point == "power loss" else point
    dirs.mount(env={"FUSEJOURNAL_FAULT": fault})
    synced = {p: p.stat().st_size for p in segments(dirs)}    # fsync'ed: checkpoint 1 and before
    pid = dirs.pid
    try:
        period_two(mp)
    except OSError:
        pass                                                   # the daemon died under the writer
    if point.startswith("log.before_marker"):
        until(lambda: not alive(pid) or streamed(dirs) > 0, what="the streamer")
        if alive(pid):
            with pytest.raises(OSError):
                os.setxattr(mp, UPDATE, b"two")                # dies between the stream and the marker
    if not point.startswith("log.before_marker"):
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:      # more until the streamer gets there
            try:
                with open(mp / "more", "ab") as f:
                    f.write(os.urandom(MiB))
            except OSError:
                break
            time.sleep(0.2)
    until(lambda: not alive(pid), what="the daemon to die at " + point)
    dirs.pid = None
    if point == "power loss":
        # what was written after the last fdatasync may be gone, partly or wholly
        rng = random.Random(11)
        for p in segments(dirs):
            if p in synced:
                os.truncate(p, rng.randrange(synced[p], p.stat().st_size + 1))
            else:
                os.unlink(p)
    expected_now = snapshot(dirs.source)                      # the original keeps every change
    with held_streamer(dirs):                                  # clears the dead mount itself
        st = dirs.status()
        assert st["last_checkpoint"] == 1 and st["streamed_unmarked_operations"] == 0, st
    dirs.wait(1)
    assert_same(s1, snapshot(dirs.tree))                      # the confirmed checkpoint, exactly
    n = dirs.checkpoint("after restart")
    assert n == 2
    dirs.wait(n)
    assert_same(expected_now, snapshot(dirs.tree))            # nothing silently dropped


def test_a_clean_unmount_keeps_streamed_entries_for_the_next_checkpoint(dirs: Mounted) -> None:
    prepare(dirs)
    mp = dirs.mountpoint
    dirs.mount()
    period_two(mp)
    until(lambda: streamed(dirs) > 0, what="the streamer")
    (mp / "after-the-stream").write_text("in the store at unmount")
    dirs.umount()
    until(lambda: not is_mounted(mp), what="the unmount")
    end = json.loads((dirs.journal / "log" / "end.json").read_text())
    assert end["unmarked"]["checkpoint"] == 2 and end["unmarked"]["operations"] > 0
    expected = snapshot(dirs.source)
    dirs.mount()
    st = dirs.status()
    assert st["streamed_unmarked_operations"] == end["unmarked"]["operations"], st
    n = dirs.checkpoint("after remount")
    assert n == 2
    dirs.wait(n)
    assert_same(expected, snapshot(dirs.tree))
    log_text = (dirs.journal / "daemon.log").read_text(errors="replace")
    assert "torn tail" not in log_text


def test_clean_unmount_then_crash_after_remount_resyncs(dirs: Mounted) -> None:
    """The streamed entries kept by the clean unmount are not applied on top of a resync:
    after a crash in the next run they are dropped and the objects resynced."""
    s1 = prepare(dirs)
    mp = dirs.mountpoint
    dirs.mount()
    period_two(mp)
    until(lambda: streamed(dirs) > 0, what="the streamer")
    dirs.umount()
    until(lambda: not is_mounted(mp), what="the unmount")
    dirs.mount()
    (mp / "olddir" / "third").write_text("after the remount")
    dirs.kill()
    expected_now = snapshot(dirs.source)
    with held_streamer(dirs):
        st = dirs.status()
        assert st["last_checkpoint"] == 1 and st["streamed_unmarked_operations"] == 0, st
    dirs.wait(1)
    assert_same(s1, snapshot(dirs.tree))
    n = dirs.checkpoint("after the crash")
    dirs.wait(n)
    assert_same(expected_now, snapshot(dirs.tree))


@pytest.mark.daemon_errors
def test_a_failing_stream_append_loses_nothing_and_the_mount_keeps_serving(dirs: Mounted) -> None:
    """The first streamed append fails (EIO injected after its entries were written):
    the log is cut back, the records go back in front of the store, the mount keeps
    serving, the streamer retries, and the checkpoint is exact.  (ENOSPC cannot come
    from the mount's own writes: they are refused while the journal could not hold
    them plus a reserve; tests/unit/test_streamer.py fails the append with ENOSPC.)"""
    dirs.mount(env={"FUSEJOURNAL_FAULT": "log.stream_written:1:error"})
    mp = dirs.mountpoint
    rng = random.Random(5)
    with open(mp / "first", "wb") as f:
        f.write(rng.randbytes(6 * MiB))
    seen: list[dict] = []           # (one status: the streamer's retry, 1 s on, clears the error)
    until(lambda: seen.append(dirs.status()) or seen[-1]["stream_error"] is not None,
          what="the failed stream append")
    st = seen[-1]
    assert "injected fault" in st["stream_error"] and st["pending_bytes"] >= 6 * MiB, st
    (mp / "meanwhile").write_text("the mount keeps serving")
    with open(mp / "first", "r+b") as f:
        f.seek(100)
        f.write(b"overwritten after the failure")
    until(lambda: dirs.status()["stream_error"] is None, what="streaming to resume")
    until(lambda: streamed(dirs) > 0, what="the retried stream")
    n = dirs.checkpoint("after the retry")
    expected = snapshot(dirs.source)
    dirs.wait(n)
    assert_same(expected, snapshot(dirs.tree))
    errors = daemon_errors(dirs.journal)
    assert any("streaming into the ordered log failed" in e for e in errors), errors
