"""A full disk in the default layout: the journal and the shadow share one small filesystem.

Running out of space while the updater applies a batch is a state to wait
out: status says "waiting for space" (not "changed by hand ... --reseed"),
`wait` keeps waiting (or times out) instead of failing on a stale error, and
once space is freed the updater resumes by itself at the staging cursor and
the shadow ends equal to the original.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from fusejournal.shadow import Shadow
from fusejournal.updater import read_cursor

from conftest import Mounted, fj, is_mounted, needs_fuse, wait_reached
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 16 MiB tmpfs for the journal and the shadow (the source stays elsewhere)."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", os.fspath(d)], check=True)
    try:
        yield d
    finally:
        for _ in range(50):
            if not is_mounted(d):
                break
            r = subprocess.run(["umount", os.fspath(d)], capture_output=True)
            if r.returncode != 0:
                time.sleep(0.1)
        if is_mounted(d):
            subprocess.run(["umount", "-l", os.fspath(d)], capture_output=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``path``'s filesystem."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        f.write(b"\xa5" * max(0, _free(path) - leave))
    return filler


def _status(m: Mounted) -> dict:
    return json.loads(os.getxattr(m.mountpoint, b"user.fusejournal.status"))


def _until(pred, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_full_shadow_disk_is_waited_out_and_resumed(tmp_path: Path, small_fs: Path) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "old.txt").write_bytes(b"before the mount\n")
    m = Mounted(src, mnt, small_fs / "journal", small_fs / "shadow")
    # the updater holds before its first batch until the test has filled the disk: where
    # the space goes before that (the streamer's appends, the temporary store's periods
    # freed by the checkpoint) depends on timing, the space left for the updater does not
    pause = tmp_path / "pause"
    pause.touch()
    try:
        m.mount(env={"FUSEJOURNAL_FAULT": "updater.before_batch:1:pause",
                     "FUSEJOURNAL_FAULT_PAUSE": os.fspath(pause)})
        # 2.4 MiB of incompressible data, accepted while the journal has room for it (the
        # daemon refuses writes the journal could not hold) ...
        for i in range(6):
            (mnt / f"f{i}.bin").write_bytes(os.urandom(400 * 1024))
        n = m.checkpoint("full")
        wait_reached(pause, "the updater's first batch")
        # ... then something else fills the disk: the log holds the checkpoint, the
        # shadow has room for two of the six files
        filler = _fill(small_fs, MiB)
        pause.unlink()
        _until(lambda: _status(m)["updater_state"].startswith("waiting for space"), what="waiting for space")
        st = _status(m)
        assert st["updater_error"] is None, st
        assert "reseed" not in st["updater_state"] and "by hand" not in st["updater_state"], st
        assert st["shadow_checkpoint"] < n
        # a half-applied batch: the staging cursor stands inside checkpoint n
        cur = read_cursor(Shadow(m.shadow))
        assert cur is not None and cur.checkpoint == n and cur.index > 0, cur

        # status tells the truth, and is not "damaged"
        r = fj("status", mnt, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "waiting for space" in r.stdout
        # wait keeps waiting (here: until its timeout), it does not fail on an error
        r = fj("wait", mnt, "--timeout", "2", check=False)
        assert r.returncode == 5, r.stdout + r.stderr
        assert "waiting for space" in r.stderr and "Traceback" not in r.stderr

        # a further checkpoint: the journal may be full too (then it fails, nothing lost);
        # either way wait still waits instead of exiting on a stale error
        try:
            (mnt / "later.txt").write_bytes(b"after the disk filled\n")
        except OSError as e:        # refused before it reaches the original: the journal is full
            assert e.errno == errno.ENOSPC, e
        r = fj("checkpoint", mnt, "--label", "later", check=False)
        assert r.returncode in (0, 6), r.stdout + r.stderr
        r = fj("wait", mnt, "--timeout", "2", check=False)
        assert r.returncode == 5, r.stdout + r.stderr

        # space comes back: the updater resumes by itself (no new checkpoint needed)
        filler.unlink()
        r = fj("wait", mnt, "--checkpoint", str(n), "--timeout", "60", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        _until(lambda: _status(m)["updater_state"] in ("idle", "applying")
               or _status(m)["updater_state"].startswith("applying"), what="updater idle")
        st = _status(m)
        assert st["updater_error"] is None, st
        # everything still pending lands in one more checkpoint; then the shadow equals the original
        m.checkpoint("after")
        m.wait()
        assert_same(snapshot(src), snapshot(m.tree))
        m.umount()
        r = fj("fsck", m.journal, "--verify-shadow", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "equals" in r.stdout
    finally:
        pause.unlink(missing_ok=True)
        m.cleanup()
