"""A browse starts fast (issue 10: "browsing an old checkpoint ... starts in under a second"):
one interpreter, and only what the read-only daemon needs.  Speed itself is never asserted
here (docs/performance-history.md measures it); what makes it is:

- plain ``browse`` (the latest checkpoint) forks its daemon from the command once it has
  imported what the daemon needs, as ``--checkpoint``/``--all`` do: the daemon's command line
  is the command's own (it was ``... --tree --foreground --ready-fd N``: a second interpreter
  that imported everything again), and it is detached the same way (its own session, stdio
  on /dev/null, no pipe of the command left open);
- no browse command imports the journaled mount's machinery (fusejournal.mount, the
  acquisition, the updater, seeding, the streamer) nor anything of the tests or the bench;
- the promises hold for the forked daemon: read-only, private to its owner unless
  ``-o allow_other``, and a bad browse point is one clear line with nothing left mounted.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_browse_history_startup import _gone, _pid

from conftest import Mounted, alive, fj, is_mounted, make_traversable

pytestmark = pytest.mark.mount

#: modules a browse command must not import (the journaled mount's side; tests; the bench)
NOT_NEEDED = ("fusejournal.mount", "fusejournal.acquisition", "fusejournal.updater", "fusejournal.updatetask",
              "fusejournal.updaterproc", "fusejournal.seeding", "fusejournal.seed", "fusejournal.streamer",
              "fusejournal.recovery", "fusejournal.control", "fusejournal.resync", "fusejournal.coordinator",
              "fusejournal.member", "hypothesis", "pytest", "matplotlib", "numpy")


def _two_checkpoints(m: Mounted) -> None:
    (m.mountpoint / "f").write_bytes(b"one\n")
    m.wait(m.checkpoint("one"))
    (m.mountpoint / "f").write_bytes(b"two\n")
    (m.mountpoint / "g").write_bytes(b"new\n")
    m.wait(m.checkpoint("two"))


def test_plain_browse_forks_its_daemon(mounted: Mounted, tmp_path: Path) -> None:
    _two_checkpoints(mounted)
    point = tmp_path / "latest"
    point.mkdir()
    r = fj("browse", mounted.mountpoint, point)            # returns: no pipe of it left open
    assert "browsing" in r.stdout and r.stderr == ""
    pid = _pid(point)
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--ready-fd" not in cmd and b"--foreground" not in cmd, cmd   # the command's own
        assert b"browse" in cmd and os.fsencode(point) in cmd, cmd
        assert os.getsid(pid) == pid                                           # its own session
        fds = {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        assert fds["0"] == fds["1"] == fds["2"] == os.devnull, fds
        pipes = [t for t in fds.values() if t.startswith("pipe:")]
        assert all(pipes.count(t) == 2 for t in pipes), fds                   # trio's own only
        # what it serves: the latest checkpoint, moving with the shadow
        assert sorted(os.listdir(point)) == ["f", "g"] and (point / "f").read_bytes() == b"two\n"
        (mounted.mountpoint / "f").write_bytes(b"three\n")
        mounted.wait(mounted.checkpoint("three"))
        assert (point / "f").read_bytes() == b"three\n"
    finally:
        fj("umount", point)
    assert _gone(pid) and not is_mounted(point)


def test_the_forked_daemon_keeps_the_promises(mounted: Mounted, tmp_path: Path) -> None:
    """Read-only, and private to its owner: another user cannot even list it."""
    _two_checkpoints(mounted)
    make_traversable(tmp_path)
    point = tmp_path / "p"
    point.mkdir()
    fj("browse", mounted.mountpoint, point)
    try:
        for op in (lambda: (point / "f").write_bytes(b"x"), lambda: os.mkdir(point / "d"),
                   lambda: os.unlink(point / "f"), lambda: os.setxattr(point / "f", b"user.a", b"1")):
            with pytest.raises(OSError) as err:
                op()
            assert err.value.errno == errno.EROFS
        def as_nobody(*cmd: object) -> subprocess.CompletedProcess:
            return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                   *map(os.fspath, cmd)], capture_output=True, text=True)
        (tmp_path / "plain").mkdir()
        assert as_nobody("stat", tmp_path / "plain").returncode == 0        # the path is reachable
        r = as_nobody("stat", point)
        assert r.returncode != 0 and "ermission denied" in r.stderr, r
        r = as_nobody("cat", point / "f")
        assert r.returncode != 0 and "ermission denied" in r.stderr, r
        assert (mounted.mountpoint / "f").read_bytes() == b"two\n"
    finally:
        fj("umount", point)


def test_a_bad_browse_point_is_one_line_and_nothing_is_left(mounted: Mounted, tmp_path: Path) -> None:
    _two_checkpoints(mounted)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    for point, words in ((a_file, "not a directory"), (tmp_path / "missing", "does not exist"),
                         (mounted.mountpoint, "already a FUSE mount")):
        r = fj("browse", mounted.mountpoint, point, check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not is_mounted(a_file)
    for p in {p for p in os.listdir("/proc") if p.isdigit()} - before:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"browse\0" + os.fsencode(mounted.mountpoint) in cmd:
            deadline = time.monotonic() + 20        # (a loaded machine: it may be exiting)
            while alive(int(p)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not alive(int(p)), cmd


@pytest.mark.parametrize("args", [(), ("--checkpoint", "1"), ("--all",)])
def test_a_browse_imports_only_what_its_daemon_needs(mounted: Mounted, tmp_path: Path,
                                                     args: tuple[str, ...]) -> None:
    """``python -X importtime``: every module the command imported before it forked (the
    daemon's imports: it imports nothing more to serve)."""
    _two_checkpoints(mounted)
    point = tmp_path / "imports"
    point.mkdir()
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "fusejournal.cli", "browse", *args,
                        os.fspath(mounted.mountpoint), os.fspath(point)],
                       capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode == 0, r.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
                    if line.startswith("import time:")}
        assert {"pyfuse3", "trio", "fusejournal.browse", "fusejournal.session"} <= imported
        assert ("fusejournal.history_view" in imported) == bool(args)
        bad = sorted(m for m in imported if m in NOT_NEEDED or m.split(".")[0] in NOT_NEEDED)
        assert bad == [], bad
        assert sorted(os.listdir(point))                   # and it serves
    finally:
        fj("umount", point)
