"""pyfuse3's wait for a request, replaced (fusejournal/fuseloop.py), through real mounts.

* the replacement serves the session (status says so and counts its waits), and
  ``FUSEJOURNAL_FUSE_LOOP=stock`` keeps pyfuse3's own;
* a handler that blocks does not block the others: while a mutating operation is
  held in flight, many threads' stats, reads and listings are all served (the
  held handler woke a parked task to wait on the fd in its place);
* the session ends both ways with every worker task parked: unmounted from
  outside, and terminated by SIGTERM (the daemon exits, the mount is gone);
* the wait spins before it sleeps: a program that waits for each answer has
  its next request found while spinning; ``FUSEJOURNAL_SPIN_US=0`` never
  spins; a bad value is refused by ``mount`` in one line, nothing mounted.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import Mounted, alive, fj, is_mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]


def _many_requests(mp: Path, n: int = 300) -> None:
    """More requests than pyfuse3's 99 worker tasks, so every one of them is parked."""
    for i in range(n):
        (mp / f"f{i}").write_bytes(b"x")
        os.stat(mp / f"f{i}")


def _ended(pid: int, timeout: float = 30) -> bool:
    """The process ``pid`` ended within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def test_the_replacement_serves_the_session(dirs: Mounted) -> None:
    dirs.mount()
    before = dirs.status()
    assert before["fuse_loop"] == "fusejournal"
    _many_requests(dirs.mountpoint, 50)
    after = dirs.status()
    # each file: LOOKUP, CREATE, WRITE, GETXATTR, FLUSH, RELEASE, ... (at least 4 each)
    assert after["fuse_loop_waits"] - before["fuse_loop_waits"] >= 200
    assert sorted(os.listdir(dirs.mountpoint)) == sorted(f"f{i}" for i in range(50))


def test_stock_keeps_pyfuse3s_own_loop(dirs: Mounted) -> None:
    dirs.mount(env={"FUSEJOURNAL_FUSE_LOOP": "stock"})
    _many_requests(dirs.mountpoint, 20)
    st = dirs.status()
    assert st["fuse_loop"] == "pyfuse3"
    assert st["fuse_loop_waits"] == 0


def test_a_held_operation_does_not_hold_the_others(dirs: Mounted, tmp_path: Path) -> None:
    pause = tmp_path / "pause"
    pause.write_text("")
    (dirs.source / "sub").mkdir()
    (dirs.source / "data").write_bytes(b"d" * 10000)
    dirs.mount(env={"FUSEJOURNAL_FAULT": "halt.in_operation:1:pause",
                    "FUSEJOURNAL_FAULT_PAUSE": os.fspath(pause)})
    mp = dirs.mountpoint
    held_done = threading.Event()

    def held() -> None:
        os.mkdir(mp / "sub" / "held")    # the first mutating operation: held in flight
        held_done.set()

    th = threading.Thread(target=held, daemon=True)
    th.start()
    try:
        time.sleep(0.2)
        assert not held_done.is_set()
        results: list[object] = []

        def reader(k: int) -> None:
            try:
                for _ in range(20):
                    assert (mp / "data").read_bytes() == b"d" * 10000
                    os.stat(mp / "sub")
                    assert "data" in os.listdir(mp)
                results.append(k)
            except BaseException as e:   # reported below
                results.append(e)

        readers = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(8)]
        for r in readers:
            r.start()
        for r in readers:
            r.join(30)
        assert sorted(results, key=str) == list(range(8)), results
        assert not held_done.is_set()    # all of that was served while the mkdir was held
        assert dirs.status()["fuse_loop_standbys"] >= 1   # the held handler woke a waiter
    finally:
        pause.unlink()
        th.join(30)
    assert held_done.is_set()
    assert (dirs.source / "sub" / "held").is_dir()


def test_unmounted_from_outside_with_every_task_parked(dirs: Mounted) -> None:
    dirs.mount()
    _many_requests(dirs.mountpoint)
    pid = dirs.pid
    assert pid is not None
    dirs.umount()
    assert _ended(pid)
    assert not is_mounted(dirs.mountpoint)


@pytest.mark.parametrize("loop", ["fusejournal", "stock"])
def test_sigterm_ends_the_session_with_every_task_parked(dirs: Mounted, loop: str) -> None:
    dirs.mount(env={"FUSEJOURNAL_FUSE_LOOP": loop})
    _many_requests(dirs.mountpoint)
    pid = dirs.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert _ended(pid), "the daemon did not end on SIGTERM"
    assert not is_mounted(dirs.mountpoint)
    dirs.pid = None
    assert (dirs.source / "f299").read_bytes() == b"x"


def test_sigusr1_logs_what_every_task_awaits(dirs: Mounted, tmp_path: Path) -> None:
    # a handler held at a fault point: the dump shows it, down to the fault's wait
    flag = tmp_path / "pause"
    flag.touch()
    dirs.mount(env={"FUSEJOURNAL_FAULT": "halt.in_operation:1:pause",
                    "FUSEJOURNAL_FAULT_PAUSE": os.fspath(flag)})
    th = threading.Thread(target=os.mkdir, args=(dirs.mountpoint / "held",))
    th.start()
    try:
        deadline = time.monotonic() + 30
        while not Path(os.fspath(flag) + ".reached").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert dirs.pid is not None
        os.kill(dirs.pid, signal.SIGUSR1)
        log = dirs.journal / "daemon.log"
        while "SIGUSR1" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "no task tree in the log"
            time.sleep(0.02)
        time.sleep(0.2)                                   # (one write, but let it land)
        text = log.read_text(errors="replace").split("SIGUSR1", 1)[1]
        assert "running (this dump)" in text
        # the held handler's chain: the handler, the halt's gate, the fault's pause
        held = [line for line in text.splitlines() if "mkdir (fs.py:" in line]
        assert held and "operation (halt.py:" in held[0] and "hold (faults.py:" in held[0], text[:3000]
        assert th.is_alive()
    finally:
        flag.unlink()
        th.join(30)
    assert (dirs.source / "held").is_dir()
    assert dirs.status()["pid"] == dirs.pid          # the daemon goes on


def _small_writes(mp: Path, n: int = 2000, think: float = 0.0) -> None:
    """Synchronous 4 KiB writes (each a WRITE, and a GETXATTR where killpriv_v2 was not granted), ``think`` seconds of
    this process's CPU between them."""
    fd = os.open(mp / "w.dat", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(n):
            os.pwrite(fd, b"w" * 4096, i * 4096)
            until = time.perf_counter() + think
            while time.perf_counter() < until:
                pass
    finally:
        os.close(fd)


def test_close_requests_are_found_while_spinning(dirs: Mounted) -> None:
    dirs.mount()
    before = dirs.status()
    assert before["fuse_loop_spin_limit_us"] == 50
    # the next request comes 20 µs after each reply: later than the waiter's first
    # look, within its spin window.  On a loaded machine (CI's parallel tests) this
    # process or the daemon is descheduled often enough that the window may shrink
    # to nothing for a while: more rounds, until a minute has gone by
    deadline = time.monotonic() + 60
    while True:
        _small_writes(dirs.mountpoint, think=20e-6)
        st = dirs.status()
        if st["fuse_loop_spin_hits"] > before["fuse_loop_spin_hits"] or time.monotonic() > deadline:
            break
    assert st["fuse_loop_spin_hits"] - before["fuse_loop_spin_hits"] > 0, st
    # most of those requests were read without a pass of trio's scheduler (step 4)
    assert st["fuse_loop_direct_reads"] - before["fuse_loop_direct_reads"] > 0
    assert 0 <= st["fuse_loop_spin_window_us"] <= 50
    assert (dirs.source / "w.dat").read_bytes() == b"w" * 4096 * 2000


def test_a_spin_limit_of_zero_never_spins(dirs: Mounted) -> None:
    dirs.mount(env={"FUSEJOURNAL_SPIN_US": "0"})
    _small_writes(dirs.mountpoint, 500)
    st = dirs.status()
    assert st["fuse_loop"] == "fusejournal"
    assert (st["fuse_loop_spin_limit_us"], st["fuse_loop_spin_window_us"]) == (0, 0)
    assert (st["fuse_loop_spin_hits"], st["fuse_loop_spin_misses"]) == (0, 0)
    assert st["fuse_loop_waits"] >= 500      # a WRITE each (and a GETXATTR without killpriv_v2)
    assert (dirs.source / "w.dat").stat().st_size == 4096 * 500


@pytest.mark.parametrize("value", ["fast", "-5", "99999999",
                                   pytest.param("\udcff\udcfe", id="not-utf-8"),
                                   pytest.param("9" * 100_000, id="huge")])
def test_a_bad_spin_limit_is_refused_in_one_line(dirs: Mounted, value: str) -> None:
    r = fj("mount", dirs.source, dirs.mountpoint, "--journal", dirs.journal, "--shadow", dirs.shadow,
           check=False, env={**os.environ, "FUSEJOURNAL_SPIN_US": value})
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "FUSEJOURNAL_SPIN_US" in lines[0] and len(lines[0]) < 200, r.stderr[:300]
    assert not is_mounted(dirs.mountpoint)
    assert not dirs.journal.exists()


@pytest.mark.parametrize("var", ["FUSEJOURNAL_KILLPRIV_V2", "FUSEJOURNAL_AUTO_INVAL_DATA",
                                 "FUSEJOURNAL_FSYNC_THREADS"])
def test_a_bad_measurement_switch_is_refused_in_one_line(dirs: Mounted, var: str) -> None:
    r = fj("mount", dirs.source, dirs.mountpoint, "--journal", dirs.journal, "--shadow", dirs.shadow,
           check=False, env={**os.environ, var: "yes"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and var in r.stderr, r.stderr[:300]
    assert not is_mounted(dirs.mountpoint)
    assert not dirs.journal.exists()


def test_browse_refuses_a_bad_spin_limit_too(dirs: Mounted, tmp_path: Path) -> None:
    dirs.mount()
    bp = tmp_path / "bp"
    bp.mkdir()
    r = fj("browse", dirs.mountpoint, bp, check=False, env={**os.environ, "FUSEJOURNAL_SPIN_US": "soon"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "FUSEJOURNAL_SPIN_US" in r.stderr
    assert not is_mounted(bp)
