"""Seeding online without CAP_DAC_READ_SEARCH (issue 12): the daemon of a user who is not
root cannot open objects by handle, so its activity log names the objects changed during
the seed by fds it holds (fusejournal/activity.py, "by fd"); it seeds online all the same.

A real non-root mount cannot be made on this machine (/dev/fuse is 0600 root, and
fusermount3 opens it as the user), so the daemon runs as root with CAP_DAC_READ_SEARCH
dropped from its bounding and inheritable sets (``setpriv``): ``open_by_handle_at`` then
fails with EPERM exactly as for a user, and the daemon takes the unprivileged path
(``activity.handles_usable``), which each test checks in /proc.

The seeder is held at a chosen entry (the ``seed.entry:N:pause`` fault point), so the
mount is proven to return while the copy is still running (no timing), and the changes
below land on entries already copied and on entries not reached yet.  Several are
invisible to any comparison of sizes and mtimes (a rewrite with the mtime put back): only
an exact dirty set catches them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_online_seed import fill, pause_env, wait_paused
from test_online_seed import wait_complete as _wait_complete

from conftest import FJ, Mounted, alive, checkpoint_and_compare, fj, force_unmount, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

NOCAP = ["setpriv", "--inh-caps=-dac_read_search", "--bounding-set=-dac_read_search"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------- helpers

def can_read_search(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 2))
    raise AssertionError("no CapEff")


def mount_nocap(m: Mounted, *more: str, env: dict[str, str] | None = None, wait0: bool = True) -> None:
    """``fusejournal mount`` by a process without CAP_DAC_READ_SEARCH (returns when ready)."""
    r = subprocess.run([*NOCAP, *FJ, "mount", m.source, m.mountpoint, "--journal", m.journal,
                        "--shadow", m.shadow, *(["--seed-wait", "0"] if wait0 else []), *more],
                       env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    m.pid = m.status()["pid"]
    assert not can_read_search(m.pid), "the daemon can still open by handle"


def crash(m: Mounted) -> None:
    """kill -9 the daemon (its updater process follows it) and clear the dead mount."""
    pid = m.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(pid)
    force_unmount(m.mountpoint)
    m.pid = None


def wait_complete(m: Mounted, timeout: float = 90) -> int:
    return _wait_complete(m, timeout)


def rewrite_keeping_mtime(path: Path, data: bytes) -> None:
    """Same size, other bytes, the mtime put back: no size/mtime comparison can see it."""
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def changes_during_the_copy(mnt: Path) -> None:
    """Writes, renames, deletes, links through the mount; the seeder stands in d001."""
    size = os.stat(mnt / "d000" / "f001").st_size
    rewrite_keeping_mtime(mnt / "d000" / "f001", b"A" * size)      # copied already
    rewrite_keeping_mtime(mnt / "d007" / "f003", b"B" * size)      # not reached yet
    os.rename(mnt / "d000", mnt / "c_moved")         # a renamed directory: its file moves too
    rewrite_keeping_mtime(mnt / "c_moved" / "f002", b"C" * size)   # written after the move
    os.link(mnt / "c_moved" / "f004", mnt / "d008" / "hardlink")   # a second name
    rewrite_keeping_mtime(mnt / "d008" / "hardlink", b"D" * size)
    os.unlink(mnt / "c_moved" / "f004")              # the copied name goes, the inode stays
    os.unlink(mnt / "d001" / "f010")
    os.truncate(mnt / "d001" / "f011", 3)
    os.chmod(mnt / "d001" / "f012", 0o600)
    os.setxattr(mnt / "d001" / "f013", b"user.tag", b"v")
    os.rename(mnt / "d009" / "f000", mnt / "c_moved" / "from_d009")  # after the cursor -> before
    os.rename(mnt / "d001" / "f014", mnt / "d009" / "from_d001")     # before -> after
    (mnt / "d002" / "new").mkdir()
    (mnt / "d002" / "new" / "file").write_bytes(b"new")
    os.symlink("f001", mnt / "c_moved" / "link")
    (mnt / "d003").rename(mnt / "d006" / "nested")   # a directory moved below another


# ----------------------------------------------------------------- the tests

def test_low_priority_needs_no_privilege(tmp_path: Path) -> None:
    """The seed's threads lower their CPU and I/O priority as an ordinary user (uid 65534,
    no CAP_SYS_NICE): nice 19 and I/O class best-effort 7.  (The interpreter lives under
    /root: CAP_DAC_OVERRIDE alone lets uid 65534 run it.)"""
    code = ("import os, ctypes, threading; from fusejournal.seeding import set_low_priority;"
            "set_low_priority(); tid = threading.get_native_id();"
            "libc = ctypes.CDLL(None, use_errno=True);"
            "print(os.geteuid(), os.getpriority(os.PRIO_PROCESS, tid), libc.syscall(252, 1, tid),"
            "open('/proc/self/status').read().split('CapEff:')[1].split()[0])")
    r = subprocess.run([*NOBODY, "--inh-caps=+dac_override", "--ambient-caps=+dac_override",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": os.fspath(ROOT)})
    assert r.returncode == 0, r.stderr
    uid, nice, ioprio, capeff = r.stdout.split()
    assert int(uid) == 65534 and int(capeff, 16) == 1 << 1        # CAP_DAC_OVERRIDE only
    assert int(nice) == 19
    assert int(ioprio) == (2 << 13) | 7                            # best-effort, level 7


def test_mount_returns_while_the_copy_runs_and_the_first_complete_checkpoint_is_exact(
        dirs: Mounted, tmp_path: Path) -> None:
    fill(dirs.source, 10, 50)
    env, flag = pause_env(tmp_path, 60)
    mount_nocap(dirs, env=env)
    s = wait_paused(dirs, 60)
    assert s["phase"] == "copy" and s["entries_copied"] == 60, s     # mount returned mid-copy
    assert dirs.status()["shadow_checkpoint"] is None
    changes_during_the_copy(dirs.mountpoint)
    n = dirs.checkpoint("during the seed")
    flag.unlink()
    # more changes while the copy goes on and while it converges, until it is complete
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set():
                p = dirs.mountpoint / "d005" / f"f{i % 50:03d}"
                rewrite_keeping_mtime(p, bytes([65 + i % 26]) * os.stat(p).st_size)
                q = dirs.mountpoint / "d004"
                os.rename(q / f"f{i % 50:03d}", q / f"g{i % 50:03d}")
                os.rename(q / f"g{i % 50:03d}", q / f"f{i % 50:03d}")
                i += 1
                time.sleep(0.005)
        except BaseException as e:
            errors.append(e)
    t = threading.Thread(target=writer)
    t.start()
    try:
        first = wait_complete(dirs)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert first > n
    log = (dirs.journal / "daemon.log").read_text()
    assert "seed: complete" in log
    # every later checkpoint equals the original (the writer's last changes included)
    checkpoint_and_compare(dirs)
    st = dirs.status()
    assert st["activity_intents_written"] > 0
    # the seed is over: no fds held, no activity periods kept (the log was for the seed)
    assert st["activity_held_fds"] == 0
    assert not any(p.endswith(".act") for p in os.listdir(dirs.journal / "activity"))
    dirs.umount()
    r = fj("fsck", dirs.journal, "--verify-shadow")
    assert "the shadow equals" in r.stdout


def test_quiescent_after_the_copy_the_first_complete_checkpoint_equals_the_original(
        dirs: Mounted, tmp_path: Path) -> None:
    """No change after the pause: the first complete checkpoint's shadow is compared with
    the original as it was at it (nothing changed since)."""
    fill(dirs.source, 10, 50)
    env, flag = pause_env(tmp_path, 60)
    mount_nocap(dirs, env=env)
    wait_paused(dirs, 60)
    changes_during_the_copy(dirs.mountpoint)
    flag.unlink()
    first = wait_complete(dirs)
    assert dirs.status()["shadow_checkpoint"] == first
    assert_same(snapshot(dirs.source), snapshot(dirs.tree))
    dirs.umount()


def test_kill_mid_seed_then_remount_resumes_and_is_exact(dirs: Mounted, tmp_path: Path) -> None:
    """kill -9 while the copy is held: the dirty set is on disk by inode number only (the
    fds died with the daemon); the next mount finds those objects by a walk before it
    mounts, resumes the copy after its cursor, and completes exactly."""
    fill(dirs.source, 10, 50)
    env, flag = pause_env(tmp_path, 60)
    mount_nocap(dirs, env=env)
    wait_paused(dirs, 60)
    changes_during_the_copy(dirs.mountpoint)
    crash(dirs)
    flag.unlink()
    state = json.loads((dirs.shadow / "seeding.json").read_text())
    assert state["phase"] == "copy" and not (dirs.shadow / "applied.json").exists()
    mount_nocap(dirs)
    first = wait_complete(dirs)
    log = (dirs.journal / "daemon.log").read_text()
    assert "found in the original by a walk" in log, log[-2000:]
    assert dirs.status()["shadow_checkpoint"] == first
    assert_same(snapshot(dirs.source), snapshot(dirs.tree))
    checkpoint_and_compare(dirs)
    dirs.umount()


def test_another_user_cannot_touch_the_journal_or_the_shadow_while_seeding(
        dirs: Mounted, tmp_path: Path) -> None:
    """Promise 5 during an unprivileged seed: uid 65534 can neither read nor change the
    journal (the activity periods included), the shadow (seeding.json, the tree), nor take
    a checkpoint."""
    fill(dirs.source, 4, 20)
    for p in [tmp_path, *tmp_path.parents]:          # let nobody reach the directories
        if p == Path("/"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o011)
    env, flag = pause_env(tmp_path, 10)
    try:
        mount_nocap(dirs, env=env)
        wait_paused(dirs, 10)
        (dirs.mountpoint / "d000" / "f000").write_bytes(b"changed")     # an intent
        acts = [p for p in os.listdir(dirs.journal / "activity") if p.endswith(".act")]
        assert acts
        attempts = [
            ["ls", dirs.journal],
            ["cat", dirs.journal / "activity" / acts[0]],
            ["ls", dirs.shadow],
            ["cat", dirs.shadow / "seeding.json"],
            ["cat", dirs.shadow / "tree" / "d000" / "f001"],
            ["touch", dirs.shadow / "tree" / "planted"],
            ["rm", "-f", dirs.journal / "activity" / acts[0]],
            ["setfattr", "-n", "user.fusejournal.update_permission", "-v", "x", dirs.mountpoint],
        ]
        for cmd in attempts:
            r = subprocess.run([*NOBODY, *map(os.fspath, cmd)], capture_output=True, text=True,
                               timeout=30)
            assert r.returncode != 0, (cmd, r.stdout)
            assert "ermission denied" in r.stderr or "not permitted" in r.stderr, (cmd, r.stderr)
        assert not (dirs.shadow / "tree" / "planted").exists()
        assert (dirs.journal / "activity" / acts[0]).exists()
    finally:
        if flag.exists():
            flag.unlink()
    wait_complete(dirs)
    assert_same(snapshot(dirs.source), snapshot(dirs.tree))
    dirs.umount()


def test_reseed_without_handles_is_online_and_exact(dirs: Mounted, tmp_path: Path) -> None:
    """``--reseed`` by a daemon without handles: online as well (mount returns mid-copy)."""
    fill(dirs.source, 6, 40)
    mount_nocap(dirs)
    wait_complete(dirs)
    dirs.umount()
    env, flag = pause_env(tmp_path, 30)
    mount_nocap(dirs, "--reseed", env=env)
    s = wait_paused(dirs, 30)
    assert s["phase"] == "copy" and s["entries_copied"] == 30, s
    size = os.stat(dirs.mountpoint / "d000" / "f005").st_size
    rewrite_keeping_mtime(dirs.mountpoint / "d000" / "f005", b"R" * size)
    os.rename(dirs.mountpoint / "d000", dirs.mountpoint / "d005" / "inner")
    flag.unlink()
    wait_complete(dirs)
    assert_same(snapshot(dirs.source), snapshot(dirs.tree))
    dirs.umount()


def test_a_seed_done_before_the_mount_keeps_the_activity_log_by_inode_number(dirs: Mounted) -> None:
    """A small tree copied within --seed-wait: the shadow stands at checkpoint 0 at once, and
    a daemon without handles then keeps the activity log by inode number (no fd held; each
    intent durable; the periods go once a checkpoint covers them).  A crash is
    tests/mount/test_recovery_nonroot.py."""
    from fusejournal.activity import decode_intents
    from fusejournal.sysc import INO_ONLY
    fill(dirs.source, 2, 5)
    mount_nocap(dirs, "--seed-wait", "60", wait0=False)   # (not the default 1 s: under load)
    st = dirs.status()
    assert st["seeding"] is None and st["shadow_checkpoint"] == 0, st
    (dirs.mountpoint / "d000" / "f000").write_bytes(b"changed")
    os.rename(dirs.mountpoint / "d001", dirs.mountpoint / "moved")
    st = dirs.status()
    # the file written and the root (whose entry d001 was renamed)
    assert st["activity_held_fds"] == 0 and st["activity_intents_written"] >= 2, st
    acts = [p for p in os.listdir(dirs.journal / "activity") if p.endswith(".act")]
    assert len(acts) == 1
    intents = decode_intents((dirs.journal / "activity" / acts[0]).read_bytes())
    assert {i.handle_type for i in intents} == {INO_ONLY}
    assert os.stat(dirs.source / "d000" / "f000").st_ino in {i.ino for i in intents}
    assert os.stat(dirs.source).st_ino in {i.ino for i in intents if i.is_dir}
    checkpoint_and_compare(dirs)
    assert not [p for p in os.listdir(dirs.journal / "activity") if p.endswith(".act")]
    dirs.umount()
