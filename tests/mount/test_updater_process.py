"""The updater in its own process (issue 11): started by the daemon, ended at
unmount, restarted if it dies, killed with the daemon; kill -9 of either at the
worst moments of a batch resumes exactly (staging cursor)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import Mounted, alive, needs_fuse, wait_reached
from snapshot import assert_same, snapshot

pytestmark = needs_fuse


def _until(cond, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError("no PPid")


def _cursor(m: Mounted):
    from fusejournal.shadow import Shadow
    from fusejournal.staging import read_cursor
    return read_cursor(Shadow(m.shadow))


def _batch(mp: Path) -> None:
    """A mixed batch of some 30 records: creates, writes, a rename, a link, an unlink."""
    (mp / "d").mkdir()
    for i in range(10):
        (mp / "d" / f"f{i}").write_bytes(bytes([i]) * 5000)
    os.rename(mp / "d" / "f0", mp / "d" / "renamed")
    os.link(mp / "d" / "f1", mp / "link")
    os.unlink(mp / "d" / "f2")
    with open(mp / "d" / "f3", "r+b") as f:
        f.seek(100_000)
        f.write(b"after a hole")


def test_the_updater_runs_in_a_child_process_of_the_daemon(mounted: Mounted) -> None:
    st = mounted.status()
    child = st["updater_pid"]
    assert child and child != st["pid"] and _ppid(child) == st["pid"]
    (mounted.mountpoint / "f").write_text("one")
    n = mounted.checkpoint()
    mounted.wait(n)
    assert (mounted.tree / "f").read_text() == "one"
    assert mounted.status()["updater_state"] == "idle"
    mounted.umount()
    _until(lambda: not alive(child), 10, "the updater's process to end at unmount")


@pytest.mark.daemon_errors      # the daemon logs the death of its updater's process
@pytest.mark.parametrize("point", ["updater.before_batch:1", "updater.mid_batch:7",
                                   "updater.before_applied:1"])
def test_updater_process_killed_is_restarted_and_resumes(dirs: Mounted, tmp_path: Path, point: str) -> None:
    pause = tmp_path / "pause"
    pause.write_text("")
    dirs.mount(env={"FUSEJOURNAL_FAULT": f"{point}:pause", "FUSEJOURNAL_FAULT_PAUSE": os.fspath(pause)})
    mp = dirs.mountpoint
    _batch(mp)
    n = dirs.checkpoint("killed in the updater")
    expected = snapshot(dirs.source)
    child = dirs.status()["updater_pid"]
    if point.startswith("updater.mid_batch"):
        _until(lambda: (c := _cursor(dirs)) is not None and c.index == 7, what="the updater held mid-batch")
    else:                             # held at the point (pause): nothing more happens
        wait_reached(pause, "the updater held")
    assert dirs.status()["shadow_checkpoint"] == n - 1
    os.kill(child, signal.SIGKILL)     # the worst moment: the updater alone dies
    pause.unlink()                     # the next one is not held
    _until(lambda: not alive(child), what="the updater's process to die")
    st = _until(lambda: (s := dirs.status())["updater_pid"] not in (None, child) and s, what="a new process")
    assert st["pid"] == dirs.pid       # the daemon went on serving
    dirs.wait(n)
    assert_same(expected, snapshot(dirs.tree))
    assert _cursor(dirs) is None
    # and it goes on applying
    (mp / "later").write_text("after the restart")
    n = dirs.checkpoint()
    dirs.wait(n)
    assert_same(snapshot(dirs.source), snapshot(dirs.tree))
    assert "ended (killed by SIGKILL)" in (dirs.journal / "daemon.log").read_text()


@pytest.mark.parametrize("point", ["updater.mid_batch:7", "updater.before_applied:1"])
def test_daemon_killed_takes_its_updater_process_along(dirs: Mounted, tmp_path: Path, point: str) -> None:
    """kill -9 of the daemon while its updater is half-way through a batch: the updater's
    process dies with it (it never writes behind a new daemon's back), a new mount at
    once resumes the batch exactly."""
    pause = tmp_path / "pause"
    pause.write_text("")
    dirs.mount(env={"FUSEJOURNAL_FAULT": f"{point}:pause", "FUSEJOURNAL_FAULT_PAUSE": os.fspath(pause)})
    mp = dirs.mountpoint
    _batch(mp)
    n = dirs.checkpoint("daemon killed")
    expected = snapshot(dirs.source)
    child = dirs.status()["updater_pid"]
    _until(lambda: _cursor(dirs) is not None, what="the updater half-way")
    daemon = dirs.pid
    os.kill(daemon, signal.SIGKILL)
    _until(lambda: not alive(daemon), what="the daemon to die")
    _until(lambda: not alive(child), 5, "the updater's process to die with its daemon")
    pause.unlink()
    dirs.pid = None
    dirs.mount()                        # at once: the shadow is free
    dirs.wait(n)
    assert_same(expected, snapshot(dirs.tree))
    n = dirs.checkpoint("after")
    dirs.wait(n)
    assert_same(snapshot(dirs.source), snapshot(dirs.tree))


@pytest.mark.daemon_errors      # the daemon logs the deaths of its updater's process
def test_updater_killed_repeatedly_during_continuous_checkpoints(mounted: Mounted) -> None:
    """Kill the updater's process again and again while checkpoints keep coming: every
    checkpoint lands, the shadow is exact at the end, and `wait` never fails meanwhile."""
    mp = mounted.mountpoint
    (mp / "d").mkdir()
    last = 0
    for round_ in range(10):
        for i in range(20):
            (mp / "d" / f"f{(round_ * 7 + i) % 25}").write_bytes(os.urandom(3000))
        last = mounted.checkpoint(f"r{round_}")
        child = mounted.status()["updater_pid"]
        if child:
            os.kill(child, signal.SIGKILL)
            # at once: the daemon tells a process that may be dead (its socket closed)
            (mp / "d" / "f0").write_bytes(os.urandom(100))
            last = mounted.checkpoint(f"r{round_} right after the kill")
            _until(lambda c=child: not alive(c), what="the updater's process to die")
        st = mounted.status()
        assert st["pid"] == mounted.pid and not st["updater_state"].startswith("stopped"), st
    mounted.wait(last, timeout=90)
    assert_same(snapshot(mp), snapshot(mounted.tree))


def test_unmount_waits_for_the_pass_and_ends_the_process(dirs: Mounted, tmp_path: Path) -> None:
    """Unmounting while the updater is held mid-batch waits for that pass: the shadow is
    left whole at the checkpoint and no process remains."""
    pause = tmp_path / "pause"
    pause.write_text("")
    dirs.mount(env={"FUSEJOURNAL_FAULT": "updater.mid_batch:3:pause",
                    "FUSEJOURNAL_FAULT_PAUSE": os.fspath(pause)})
    _batch(dirs.mountpoint)
    n = dirs.checkpoint()
    expected = snapshot(dirs.source)
    child = dirs.status()["updater_pid"]
    _until(lambda: _cursor(dirs) is not None, what="the updater half-way")
    import threading
    threading.Timer(0.5, pause.unlink).start()
    dirs.umount()
    assert not alive(child)
    from fusejournal.shadow import Shadow
    assert Shadow(dirs.shadow).applied == n and _cursor(dirs) is None
    assert_same(expected, snapshot(dirs.tree))


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_the_updaters_memory_follows_the_memory_limit(dirs: Mounted) -> None:
    """A 384 MiB batch: the updater's process keeps at most --memory-limit of it between
    its verify and apply passes (updater._VerifyPass), then reads the rest again; the
    shadow is exact.  Its peak grows by about 22 MiB beside what it keeps (measured with
    a 1 MiB limit); with the default 64 MiB the same batch raised it by 83-97 MiB."""
    dirs.mount("--memory-limit", "4M")
    child = dirs.status()["updater_pid"]
    base = _hwm_kib(child)
    chunk = bytearray(os.urandom(1 << 20))
    with open(dirs.mountpoint / "big", "wb", buffering=0) as f:
        for i in range(384):
            chunk[:8] = i.to_bytes(8, "little")
            f.write(chunk)
    n = dirs.checkpoint("big")
    dirs.wait(n, timeout=120)
    assert dirs.status()["updater_pid"] == child
    grew = (_hwm_kib(child) - base) >> 10
    assert grew < 4 + 40, f"the updater's process grew by {grew} MiB"
    assert_same(snapshot(dirs.mountpoint), snapshot(dirs.tree))
