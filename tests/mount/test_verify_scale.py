"""`fusejournal verify` at scale (issue 10): its memory does not follow the tree; killed
while it holds the shadow, it leaves nothing behind and a rerun verifies.

The memory test fails on the verifier before this change (a path → inode map of
every file on both sides: peak RSS 48 MiB at 2,000 files, 74 MiB at 42,000; after
it, 48 and 48 MiB).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import FJ, Mounted, can_mount, fj

pytestmark = pytest.mark.mount


def _tree(top: Path, files: int) -> None:
    """``files`` small files in directories of 1,000; every tenth file has a second name
    in the next directory (hard links across directories)."""
    for d in range(files // 1000):
        dd = top / f"d{d:03}"
        dd.mkdir()
        for i in range(1000):
            (dd / f"f{i:04}").write_bytes(b"%d" % i)
    for d in range(files // 1000 - 1):
        for i in range(0, 1000, 10):
            os.link(top / f"d{d:03}" / f"f{i:04}", top / f"d{d + 1:03}" / f"l{i:04}")


def _mount(base: Path, files: int) -> Mounted:
    base.mkdir()
    m = Mounted(base / "src", base / "mnt", base / "journal", base / "shadow")
    m.source.mkdir()
    m.mountpoint.mkdir()
    _tree(m.source, files)
    m.mount()
    try:
        m.wait(m.checkpoint(), timeout=600)          # the online seed, then checkpoint 1
    except BaseException:
        m.cleanup()
        raise
    return m


def _verify_peak_rss(mp: Path) -> tuple[int, int, str]:
    """(exit code, peak RSS in KiB, stdout) of `fusejournal verify MP`, run as a child."""
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen([*FJ, "verify", os.fspath(mp)], stdout=out, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return p.returncode, ru.ru_maxrss, out.read().decode()


def test_verify_memory_does_not_follow_the_tree(tmp_path: Path) -> None:
    if not can_mount():
        pytest.skip("needs root, /dev/fuse and fusermount3")
    rss = {}
    for n in (2_000, 42_000):
        m = _mount(tmp_path / str(n), n)
        try:
            code, rss[n], out = _verify_peak_rss(m.mountpoint)
            assert code == 0 and "the shadow equals the original" in out, out
        finally:
            m.cleanup()
    assert rss[42_000] - rss[2_000] < 8 * 1024, rss


def _holds_shadow(pid: int, shadow: Path) -> bool:
    """Whether ``pid`` holds a lock on SHADOW/browse.lock (verify's shared *hold*)."""
    try:
        ino = os.stat(shadow / "browse.lock").st_ino
    except FileNotFoundError:
        return False
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 5 and parts[4] == str(pid) and parts[5].endswith(f":{ino}"):
                return True
    return False


def test_verify_killed_midway_then_rerun(tmp_path: Path) -> None:
    if not can_mount():
        pytest.skip("needs root, /dev/fuse and fusermount3")
    m = _mount(tmp_path / "m", 20_000)
    try:
        tmp = tmp_path / "tmpdir"                   # where its temporary database would go
        tmp.mkdir()
        p = subprocess.Popen([*FJ, "verify", os.fspath(m.mountpoint)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": os.fspath(tmp)})
        try:
            deadline = time.monotonic() + 120
            while not _holds_shadow(p.pid, m.shadow):
                assert p.poll() is None, "verify ended before it was seen holding the shadow"
                assert time.monotonic() < deadline
                time.sleep(0.005)
            time.sleep(0.2)                         # well into the comparison
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL
        assert list(tmp.iterdir()) == []            # SQLite unlinks it as it creates it
        # the hold went with it: the updater applies the next checkpoint, a rerun verifies
        (m.mountpoint / "after").write_text("after the kill")
        m.wait(m.checkpoint())
        assert (m.tree / "after").read_text() == "after the kill"
        r = fj("verify", m.mountpoint, timeout=300)
        assert "the shadow equals the original" in r.stdout
    finally:
        m.cleanup()
