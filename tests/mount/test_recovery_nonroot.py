"""Recovery after a crash, for a daemon that cannot open objects by handle (not root).

Before 2026-12-02 such a daemon kept no activity log once the shadow was seeded, and a
kill -9 left the shadow different for files changed since the last checkpoint (a warning
said to re-seed).  Now it keeps the log by inode number, and the next mount finds those
objects by a metadata walk of the original before it mounts, then resyncs them exactly as
root's recovery does (fusejournal/activity.py, recovery.py).

As in test_online_seed_nonroot.py, the daemon runs as root with CAP_DAC_READ_SEARCH
dropped (a real non-root mount cannot be made on this machine); each mount checks in
/proc that it cannot open by handle.  The changes after the last checkpoint include ones
no size/mtime comparison can see (a rewrite with the mtime put back), an inode number
freed and likely reused, a directory renamed and one replaced: only an exact set of
changed objects brings the shadow to the original.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_online_seed import fill
from test_online_seed_nonroot import ROOT, crash, mount_nocap, rewrite_keeping_mtime

from conftest import FJ, Mounted, checkpoint_and_compare, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]


def changes_after_the_checkpoint(mnt: Path) -> None:
    size = os.stat(mnt / "d000" / "f001").st_size
    rewrite_keeping_mtime(mnt / "d000" / "f001", b"A" * size)      # invisible to size/mtime
    os.rename(mnt / "d001", mnt / "renamed")                     # a directory renamed ...
    rewrite_keeping_mtime(mnt / "renamed" / "f002", b"B" * size)   # ... and a file in it
    os.truncate(mnt / "d002" / "f003", 5)
    os.chmod(mnt / "d002" / "f004", 0o600)
    os.setxattr(mnt / "d002" / "f005", b"user.tag", b"v")
    os.unlink(mnt / "d003" / "f006")                             # its inode number freed ...
    (mnt / "d003" / "f006").write_bytes(b"a new file, maybe on the same inode")
    os.link(mnt / "d003" / "f007", mnt / "d000" / "second name")  # a second name
    os.unlink(mnt / "d003" / "f007")                              # the first one goes
    (mnt / "d004" / "new dir").mkdir()
    (mnt / "d004" / "new dir" / "file").write_bytes(b"new")
    os.symlink("f001", mnt / "d000" / "link")
    for n in os.listdir(mnt / "d005"):                            # a directory replaced
        os.unlink(mnt / "d005" / n)
    os.rmdir(mnt / "d005")
    (mnt / "d005").mkdir()
    (mnt / "d005" / "f000").write_bytes(b"replaced")


def test_kill_after_the_seed_then_remount_resyncs_exactly(dirs: Mounted) -> None:
    fill(dirs.source, 6, 12)
    mount_nocap(dirs, wait0=False)              # seeded before the mount returns
    (dirs.mountpoint / "d000" / "f000").write_bytes(b"in checkpoint 1")
    checkpoint_and_compare(dirs)
    changes_after_the_checkpoint(dirs.mountpoint)
    st = dirs.status()
    assert st["activity_intents_written"] > 0 and st["activity_held_fds"] == 0
    crash(dirs)
    expected = snapshot(dirs.source)            # the original, as the crash left it
    mount_nocap(dirs, wait0=False)
    log = (dirs.journal / "daemon.log").read_text()
    assert "found in the original by a walk" in log, log[-3000:]
    assert "kept no activity log" not in log
    n = dirs.checkpoint("after the crash")
    dirs.wait(n)
    assert_same(expected, snapshot(dirs.tree))
    # and the next run's changes journal as usual
    (dirs.mountpoint / "d000" / "f000").write_bytes(b"later")
    checkpoint_and_compare(dirs)
    dirs.umount()


def test_kill_right_after_an_online_seed_completed(dirs: Mounted) -> None:
    """The seed completes while mounted (by fd), then the log goes on by inode number:
    changes after the seed's checkpoint survive a kill -9 too."""
    fill(dirs.source, 6, 12)
    mount_nocap(dirs)                           # --seed-wait 0: the copy runs after the mount
    from test_online_seed_nonroot import wait_complete
    wait_complete(dirs)
    changes_after_the_checkpoint(dirs.mountpoint)
    assert dirs.status()["activity_held_fds"] == 0       # the seed's fds are closed
    crash(dirs)
    expected = snapshot(dirs.source)
    mount_nocap(dirs, wait0=False)
    n = dirs.checkpoint("after the crash")
    dirs.wait(n)
    assert_same(expected, snapshot(dirs.tree))
    dirs.umount()


def test_a_crash_of_a_daemon_that_kept_no_log_still_warns(dirs: Mounted) -> None:
    """daemon.json without "activity" (written by a daemon without handles before it kept
    a log): nothing to resync from, so the warning to re-seed stays."""
    import json
    fill(dirs.source, 2, 4)
    mount_nocap(dirs, wait0=False)
    crash(dirs)
    info = json.loads((dirs.journal / "daemon.json").read_text())
    assert info["activity"] == "inode numbers"
    del info["activity"]
    (dirs.journal / "daemon.json").write_text(json.dumps(info))
    mount_nocap(dirs, wait0=False)
    log = (dirs.journal / "daemon.log").read_text()
    assert "kept no activity log" in log
    dirs.umount()


@pytest.mark.daemon_errors      # (the group checkpoints failing after the kill)
def test_a_group_member_without_handles_killed_recovers_exactly(tmp_path: Path) -> None:
    """A consistency group mounted without CAP_DAC_READ_SEARCH (coordinator and members
    inherit the dropped capability): member b is killed while the bank transfers run
    across both trees and after changes no size/mtime comparison sees; the group mounted
    again resyncs b from its activity log by inode number, and the next group checkpoint
    equals both originals."""
    from test_groups import Group, check_bank, start_bank, stop_bank
    from test_online_seed_nonroot import NOCAP, can_read_search

    from conftest import fj, is_mounted
    srcs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for s in srcs.values():
        s.mkdir()
    fill(srcs["b"], 6, 12)
    g = Group(tmp_path, srcs)

    def mount_group() -> None:
        r = subprocess.run([*NOCAP, *FJ, "mount", "--group", os.fspath(g.file)], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        g.remember_pids()
        for name in srcs:
            assert not can_read_search(g.status(name)["pid"]), name

    try:
        mount_group()
        workers = 4
        procs, stop = start_bank(g, workers)
        try:
            time.sleep(0.3)
            g.wait(g.checkpoint("a", "before"))
            changes_after_the_checkpoint(srcs["b"])          # the members mount in place
            time.sleep(0.3)
            os.kill(g.status("b")["pid"], signal.SIGKILL)
            time.sleep(0.2)
        finally:
            errors = stop_bank(procs, stop)
        # the workers writing to b see its mount die (ENOTCONN, or ECONNABORTED mid-request)
        assert all("Errno 107" in e or "Errno 103" in e for e in errors), errors
        r = fj("umount", "--group", g.file)                  # clears b's dead mount
        assert not is_mounted(srcs["b"]), r.stdout
        expected = {name: snapshot(src) for name, src in srcs.items()}
        mount_group()
        log = (g.journal / "members" / "b" / "journal" / "daemon.log").read_text()
        assert "found in the original by a walk" in log, log[-3000:]
        assert "kept no activity log" not in log
        gid = g.checkpoint("a", "after")
        g.wait(gid)
        for name in srcs:
            assert_same(expected[name], snapshot(g.tree(name)))
        check_bank(g.tree("a"), g.tree("b"), workers)
    finally:
        g.cleanup()


@pytest.mark.daemon_errors      # an injected fault: the needs-resync error
@pytest.mark.parametrize("handle", ["kept", "none"])
def test_an_unrecordable_change_is_resynced_by_the_next_mount(dirs: Mounted, handle: str) -> None:
    """test_failure_paths' needs-resync case without handles: the flagged directory is found
    by a walk at the next mount (a clean unmount in between, no crash) and resynced.
    ``none``: the entry as written where the filesystem gives no handle (type -1), which
    the walk finds by inode number all the same."""
    s = dirs.source
    (s / "keep").mkdir()
    (s / "keep" / "victim").write_bytes(b"to be removed")
    mount_nocap(dirs, wait0=False, env={"FUSEJOURNAL_FAULT": "fs.record:1:error"})
    os.unlink(dirs.mountpoint / "keep" / "victim")     # reached the original, not recorded
    assert dirs.status()["needs_resync"] == 1
    dirs.wait(dirs.checkpoint("diverged"))
    assert (dirs.tree / "keep" / "victim").exists()   # the known divergence
    dirs.umount()
    if handle == "none":
        from fusejournal.activity import Intent, decode_intents, encode_intent
        from fusejournal.resyncflag import NO_HANDLE
        p = dirs.journal / "needs_resync"
        flagged = decode_intents(p.read_bytes())
        assert flagged
        p.write_bytes(b"".join(encode_intent(Intent(i.ino, i.is_dir, NO_HANDLE, b""))
                               for i in flagged))
    mount_nocap(dirs, wait0=False)
    assert "found in the original by a walk" in (dirs.journal / "daemon.log").read_text()
    checkpoint_and_compare(dirs)
    assert not (dirs.tree / "keep" / "victim").exists()
    assert dirs.status()["needs_resync"] == 0
    assert not (dirs.journal / "needs_resync").exists()
    dirs.umount()


@pytest.mark.daemon_errors      # the refused recovery is logged
def test_more_objects_than_the_open_file_limit_fails_in_one_line_then_recovers(dirs: Mounted) -> None:
    """The recovery holds every named object open: under a hard limit of 512 fds, 600
    changed files cannot be, and the mount says so in one line, touching nothing; with the
    usual limit the same journal then recovers exactly."""
    from test_online_seed_nonroot import NOCAP

    from conftest import FJ
    for i in range(600):
        (dirs.source / f"f{i:03d}").write_bytes(b"x" * 64)
    mount_nocap(dirs, wait0=False)
    for i in range(600):
        rewrite_keeping_mtime(dirs.mountpoint / f"f{i:03d}", b"%03d" % i * 21 + b"y")
    crash(dirs)
    expected = snapshot(dirs.source)
    before = snapshot(dirs.tree)
    r = subprocess.run(["prlimit", "--nofile=512:512", *NOCAP, *FJ, "mount", dirs.source,
                        dirs.mountpoint, "--journal", dirs.journal, "--shadow", dirs.shadow],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0
    err = r.stderr.strip()
    last = err.splitlines()[-1]               # after the progress line "recovering after ..."
    assert last.startswith("fusejournal: ") and "600 objects" in last and "ulimit -n" in last, err
    assert_same(before, snapshot(dirs.tree))             # nothing touched
    mount_nocap(dirs, wait0=False)
    n = dirs.checkpoint("after the crash")
    dirs.wait(n)
    assert_same(expected, snapshot(dirs.tree))
    dirs.umount()
