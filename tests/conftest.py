"""Fixtures for real FUSE mounts.

Every mount is started with the real CLI in its own process (the daemon never
shares a process or a trio loop with the test), polled until ready by the
CLI itself, and torn down in a ``finally`` even if the test failed:
``fusermount3 -u -z`` and SIGKILL of the daemon if it is still alive.

Tests wait on state, never on time: CI runs them three files at a time on two
cores and a disk they share, where a sleep of 0.3 s proves nothing and a
"< 0.2 s" fails.  Something held is waited for by what says it is held: a
fault point's ``FLAG.reached`` file (fusejournal/faults.py), a group's epoch
moving, a thread waiting on a FUSE request (:func:`wait_in_fuse_request`).  A
count that follows a disk's speed gets a disk that does not (``fast_source``:
the original on a tmpfs).  A scenario whose premise the machine's timing can
miss (a seed that ends before the changes it should see) is made again, a few
times, not assumed.  A wait that gives up says why (``Mounted.diagnose``: the
status, and the daemon's task tree and log after ``SIGUSR1``).  Speed is
bench/'s, never an assertion here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

FJ = [sys.executable, "-m", "fusejournal.cli"]
ROOT = Path(__file__).resolve().parents[1]


def fj_as_nobody(*args: object) -> subprocess.CompletedProcess:
    """``fusejournal ARGS`` as uid/gid 65534 with no supplementary groups (another user),
    run from ``/`` with this checkout importable; output captured, never raises."""
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *FJ,
                           *map(os.fspath, args)],  # type: ignore[arg-type]
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.fspath(ROOT)}, cwd="/")


def can_mount() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


needs_fuse = pytest.mark.skipif(not can_mount(), reason="needs root, /dev/fuse and fusermount3")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "daemon_errors: the test provokes ERROR lines in the daemon's log")
    """CI (FJ_REQUIRE_MOUNTS=1, set by .ci/run) must run the real-mount tests, never skip them."""
    if os.environ.get("FJ_REQUIRE_MOUNTS") == "1" and not can_mount():
        raise pytest.UsageError("FJ_REQUIRE_MOUNTS=1 but real FUSE mounts are impossible here "
                                "(needs root, /dev/fuse and fusermount3): the real-mount tests would be skipped")


def fj(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([*FJ, *map(os.fspath, args)], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"fusejournal {' '.join(map(str, args))} failed ({r.returncode}): "
                             f"{r.stdout}{r.stderr}")
    return r


def alive(pid: int) -> bool:
    """True while the process runs; an exited, not yet reaped one (a zombie) is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
    except OSError:
        return False
    return line[line.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def is_mounted(path: Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(path: Path, pid: int | None = None) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", os.fspath(path)], capture_output=True)
    if pid:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.02)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@dataclass
class Mounted:
    source: Path
    mountpoint: Path
    journal: Path
    shadow: Path
    extra: list[str] = field(default_factory=list)
    pid: int | None = None

    @property
    def tree(self) -> Path:
        return self.shadow / "tree"

    def mount(self, *more: str, env: dict | None = None) -> subprocess.CompletedProcess:
        r = fj("mount", self.source, self.mountpoint, "--journal", self.journal, "--shadow", self.shadow,
               *self.extra, *more, env={**os.environ, **env} if env else None)
        self.pid = self.status()["pid"]
        return r

    def status(self) -> dict:
        return json.loads(os.getxattr(self.mountpoint, b"user.fusejournal.status"))

    def checkpoint(self, label: str = "t") -> int:
        os.setxattr(self.mountpoint, b"user.fusejournal.update_permission", label.encode())
        return int(os.getxattr(self.mountpoint, b"user.fusejournal.checkpoint"))

    def wait(self, checkpoint: int | None = None, timeout: float = 60) -> None:
        args = ["wait", self.mountpoint, "--timeout", str(timeout)]
        if checkpoint is not None:
            args += ["--checkpoint", str(checkpoint)]
        fj(*args)

    def umount(self) -> None:
        fj("umount", self.mountpoint)
        self.pid = None

    def kill(self) -> None:
        """SIGKILL the daemon (a crash) and clear the dead mount."""
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and alive(self.pid):
                time.sleep(0.01)
        self.pid = None

    def cleanup(self) -> None:
        force_unmount(self.mountpoint, self.pid)
        self.pid = None

    def diagnose(self, lines: int = 80) -> str:
        """For a test's failure message when the daemon did not do what it waited for:
        its status, and the tail of its log after a SIGUSR1 dump of its task tree (what
        each task awaits)."""
        out = []
        try:
            out.append(f"status: {json.dumps(self.status())}")
        except OSError as e:
            out.append(f"status: {e}")
        log = self.journal / "daemon.log"
        if self.pid and alive(self.pid):
            os.kill(self.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "running (this dump)" not in _read(log):
                time.sleep(0.05)
            time.sleep(0.2)
        out += _read(log).splitlines()[-lines:]
        return "\n".join(out)


def wait_in_fuse_request(tid: int, timeout: float = 30) -> None:
    """Until thread ``tid`` of this process waits for a FUSE request's answer (its wchan
    is the kernel's ``request_wait_answer``): its request is queued, e.g. behind a
    daemon a test stopped with SIGSTOP.  (Not a sleep: a loaded machine may be slow to
    run the thread at all.)"""
    deadline = time.monotonic() + timeout
    wchan = ""
    while wchan != "request_wait_answer":
        assert time.monotonic() < deadline, f"thread {tid} never waited on a FUSE request ({wchan!r})"
        time.sleep(0.005)
        try:
            with open(f"/proc/self/task/{tid}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            wchan = "(gone)"


def wait_reached(flag: Path, what: str, timeout: float = 30,
                 check: Callable[[], object] | None = None) -> None:
    """Until the daemon is held at the fault point paused on ``flag`` (faults.py writes
    ``FLAG.reached`` when it gets there).  ``check`` runs at every poll and may fail the
    wait early (a thread or a process that ended instead of being held)."""
    reached = Path(os.fspath(flag) + ".reached")
    deadline = time.monotonic() + timeout
    while not reached.exists():
        if check is not None:
            check()
        assert time.monotonic() < deadline, f"timed out waiting for {what} ({reached.name} never appeared)"
        time.sleep(0.01)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def daemon_errors(journal: Path, log: str = "daemon.log") -> list[str]:
    """The ERROR (and CRITICAL) lines of a journal's daemon.log (or another log in it)."""
    text = _read(journal / log)
    return [line for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line]


_watched_logs: list[Path] = []


def watch_daemon_logs(*logs: Path) -> None:
    """Have this test fail, like a `dirs` test, on an unexpected ERROR line in these logs
    too (a consistency group's member daemons and coordinator: tests/mount/test_groups.py)."""
    _watched_logs.extend(logs)


@pytest.fixture(autouse=True)
def _check_watched_logs(request: pytest.FixtureRequest):
    _watched_logs.clear()
    yield                                  # (torn down last: after the test's own cleanup)
    logs, _watched_logs[:] = list(dict.fromkeys(_watched_logs)), []
    errors = [f"{p}: {line}" for p in logs for line in daemon_errors(p.parent, p.name)]
    if errors and request.node.get_closest_marker("daemon_errors") is None:
        pytest.fail("a daemon logged an unexpected error (mark the test daemon_errors if it "
                    "provokes one):\n" + "\n".join(errors[:10]), pytrace=False)


@pytest.fixture
def dirs(tmp_path: Path, request: pytest.FixtureRequest) -> Mounted:
    """Directories for a mount (not mounted); unmounted at the end.  A test fails if
    the daemon logged an ERROR it did not expect: mark a test that provokes one
    ``@pytest.mark.daemon_errors``."""
    src = tmp_path / "src"
    mnt = tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    m = Mounted(src, mnt, tmp_path / "journal", tmp_path / "shadow")
    try:
        yield m
    finally:
        m.cleanup()
    errors = daemon_errors(m.journal)
    if errors and request.node.get_closest_marker("daemon_errors") is None:
        pytest.fail("the daemon logged an unexpected error (mark the test daemon_errors if it "
                    "provokes one):\n" + "\n".join(errors[:10]), pytrace=False)


@pytest.fixture
def fast_source(dirs: Mounted):
    """``dirs`` with its source on a tmpfs (root only), where fsync returns at once: for
    tests of where a sync runs (fusejournal/syncpolicy.py), whose counts must not follow
    the speed of a disk other tests share.  Unmounted after the mount over it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", os.fspath(dirs.source)],
                   check=True)
    try:
        yield dirs
    finally:
        dirs.cleanup()
        subprocess.run(["umount", "-l", os.fspath(dirs.source)], check=False)


@pytest.fixture
def mounted(dirs: Mounted) -> Mounted:
    """A fresh journaled mount of an empty source at a separate mountpoint."""
    if not can_mount():
        pytest.skip("needs root, /dev/fuse and fusermount3")
    dirs.mount()
    return dirs


def make_traversable(path: Path) -> None:
    """Let other users reach ``path`` (pytest's temp dirs are private to root)."""
    for p in [path, *path.parents]:
        if p == Path("/"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o011)


def checkpoint_and_compare(m: Mounted, label: str = "t") -> int:
    """Checkpoint, snapshot the original (quiescent), wait for the shadow, compare."""
    from snapshot import assert_same, snapshot
    n = m.checkpoint(label)
    # the original itself (the same bytes the mount shows; SEEK_HOLE works there, so sparse
    # files hash quickly)
    expected = snapshot(m.source)
    m.wait(n)
    assert_same(expected, snapshot(m.tree))
    return n
