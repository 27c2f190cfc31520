"""browse --checkpoint K / --all start their daemon by forking the command (one interpreter's
start-up instead of two) and read old pre-images on demand (issue 10, "starts in under a
second", "without loading everything into memory").  What must hold, on real mounts:

- the daemon is detached as before: its own session, stdio on /dev/null, no pipe of the command
  left open (fj, which captures the command's output, returns at all), the ready pipe closed;
- bad input answered by the forked daemon is still one clear line and a non-zero exit, nothing
  mounted, no daemon left;
- a rev damaged after the view was opened reads as EIO through the mount, never as other bytes,
  and files it does not touch are still served.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from fusejournal import history, layout

from conftest import Mounted, alive, fj, is_mounted

pytestmark = pytest.mark.mount

OLD = bytes(range(256)) * 400                  # 100 KiB


def _two_checkpoints(m: Mounted) -> None:
    (m.mountpoint / "changed").write_bytes(OLD)
    (m.mountpoint / "same").write_bytes(b"same\n")
    m.wait(m.checkpoint("one"))
    with open(m.mountpoint / "changed", "r+b") as f:
        f.seek(1000)
        f.write(b"N" * 50_000)
    m.wait(m.checkpoint("two"))


def _pid(point: Path) -> int:
    return int(os.getxattr(point, layout.XATTR_PID))


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 20
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_the_forked_daemon_is_detached(mounted: Mounted, tmp_path: Path) -> None:
    _two_checkpoints(mounted)
    for args in (("--checkpoint", "1"), ("--all",)):
        point = tmp_path / args[0].strip("-")
        point.mkdir()
        r = fj("browse", *args, mounted.mountpoint, point)
        assert "browsing" in r.stdout and r.stderr == ""
        pid = _pid(point)
        try:
            assert pid != os.getpid() and os.getsid(pid) == pid          # its own session
            fds = {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
            assert fds["0"] == fds["1"] == fds["2"] == os.devnull, fds
            pipes = [t for t in fds.values() if t.startswith("pipe:")]
            assert all(pipes.count(t) == 2 for t in pipes), fds     # its own (trio's): both ends in it
            inside = point / "changed" if args[0] == "--checkpoint" else point / "1-one" / "changed"
            assert inside.read_bytes() == OLD
        finally:
            fj("umount", point)
        assert _gone(pid) and not is_mounted(point)


def test_bad_browse_points_are_refused_by_the_forked_daemon(mounted: Mounted, tmp_path: Path) -> None:
    _two_checkpoints(mounted)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    before = set(os.listdir("/proc"))
    for point, words in ((a_file, "not a directory"), (tmp_path / "missing", "does not exist"),
                         (mounted.mountpoint, "")):
        r = fj("browse", "--checkpoint", "1", mounted.mountpoint, point, check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not is_mounted(a_file)
    # no daemon left behind (a forked child that failed exits)
    for p in set(os.listdir("/proc")) - before:
        if p.isdigit() and alive(int(p)):
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if b"--checkpoint\x001\x00" + os.fsencode(mounted.mountpoint) in cmd:
                assert _gone(int(p)), cmd                 # (a loaded machine: it may be exiting)


def test_a_rev_damaged_while_browsed_reads_as_eio(mounted: Mounted, tmp_path: Path) -> None:
    _two_checkpoints(mounted)
    point = tmp_path / "b"
    point.mkdir()
    fj("browse", "--checkpoint", "1", mounted.mountpoint, point)
    try:
        assert sorted(os.listdir(point)) == ["changed", "same"]          # the view is open now
        sino = os.stat(mounted.shadow / "tree" / "changed").st_ino
        rev = mounted.shadow / layout.SHADOW_HISTORY / history.rev_name(1)
        frames, _, _ = history.read_frames(rev.read_bytes())
        at = next(f.offset for f in frames if f.kind == history.FRAME_RECORDS
                  and any(isinstance(r, history.Data) and r.sino == sino
                          for r, _ in history.decode(history.decompress(f.payload))))
        fd = os.open(rev, os.O_RDWR)
        try:
            b = os.pread(fd, 1, at + 10)
            os.pwrite(fd, bytes([b[0] ^ 0xFF]), at + 10)
        finally:
            os.close(fd)
        with pytest.raises(OSError) as err:
            (point / "changed").read_bytes()
        assert err.value.errno == errno.EIO
        with open(point / "changed", "rb") as f:                          # outside the pre-image
            f.seek(60_000)
            assert f.read(1000) == OLD[60_000:61_000]
        assert (point / "same").read_bytes() == b"same\n"
    finally:
        fj("umount", point)
