"""Retained checkpoints on real mounts: restore --checkpoint K, browse --all, prune, retention,
kill -9 of the updater while it writes history, and history's privacy (promise 5)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Mounted, alive, fj, is_mounted, make_traversable
from snapshot import assert_same, snapshot

pytestmark = pytest.mark.mount


def _step(mp: Path, i: int) -> None:
    """Checkpoint i's changes: every kind of operation, some on objects of earlier ones."""
    if i == 1:
        (mp / "d" / "e").mkdir(parents=True)
        (mp / "d" / "e" / "deep.txt").write_text("deep one\n")
        (mp / "plain").write_bytes(os.urandom(100_000))
        with open(mp / "sparse", "wb") as f:
            f.seek(4 << 20)
            f.write(b"tail")
        os.symlink("plain", mp / "link")
        os.link(mp / "plain", mp / "d" / "hard")
        os.setxattr(mp / "plain", b"user.note", b"one")
        os.chown(mp / "d" / "e" / "deep.txt", 65534, 65534)
    elif i == 2:
        with open(mp / "plain", "r+b") as f:          # overwrite in the middle, through a hard link
            f.seek(5000)
            f.write(b"X" * 3000)
        with open(mp / "sparse", "r+b") as f:         # data into a hole
            f.seek(1 << 20)
            f.write(b"middle")
        os.truncate(mp / "d" / "e" / "deep.txt", 4)
        os.rename(mp / "d", mp / "moved")
        os.setxattr(mp / "plain", b"user.note", b"two")
        os.chmod(mp / "plain", 0o600)
    elif i == 3:
        os.unlink(mp / "moved" / "hard")              # one of two names
        os.unlink(mp / "link")
        (mp / "new.txt").write_text("new in 3\n")
        os.rename(mp / "new.txt", mp / "moved" / "e" / "deep.txt")   # over an existing file
        os.removexattr(mp / "plain", b"user.note")
        os.utime(mp / "moved", ns=(1, 2_000_000_000))
    elif i == 4:
        os.unlink(mp / "moved" / "e" / "deep.txt")
        os.rmdir(mp / "moved" / "e")                  # a directory removed
        os.truncate(mp / "plain", 10)                 # most of the file destroyed
        os.mkfifo(mp / "fifo", 0o640)
        os.symlink("moved/nothing", mp / "dangling")
    elif i == 5:
        os.unlink(mp / "plain")                       # its last name: the object goes to history
        (mp / "moved" / "e").mkdir()                  # same name, another directory
        (mp / "moved" / "e" / "deep.txt").write_text("deep five\n")
        os.truncate(mp / "sparse", 0)


def _five(m: Mounted) -> dict[int, dict]:
    expected = {0: snapshot(m.source)}
    for i in range(1, 6):
        _step(m.mountpoint, i)
        n = m.checkpoint(f"step {i}/x")
        expected[n] = snapshot(m.source)
        m.wait(n)
    return expected


def test_restore_any_retained_checkpoint_is_exact(mounted: Mounted, tmp_path: Path) -> None:
    expected = _five(mounted)
    log = fj("log", mounted.journal).stdout
    assert "retained in the shadow (6;" in log and "step 3/x" in log
    for k in range(6):
        dest = tmp_path / f"out{k}"
        r = fj("restore", mounted.mountpoint, dest, "--checkpoint", str(k))
        assert f"checkpoint {k} " in r.stdout
        assert_same(expected[k], snapshot(dest))
    # a subtree and a single file of an old checkpoint
    fj("restore", mounted.journal, tmp_path / "sub", "--checkpoint", "2", "--path", "moved/e")
    assert (tmp_path / "sub" / "deep.txt").read_text() == "deep"
    fj("restore", mounted.journal, tmp_path / "one", "--checkpoint", "1", "--path", "plain")
    assert (tmp_path / "one" / "plain").stat().st_size == 100_000
    # --force over a newer restore makes DEST equal to the older checkpoint
    fj("restore", mounted.journal, tmp_path / "out5", "--checkpoint", "1", "--force")
    assert_same(expected[1], snapshot(tmp_path / "out5"))


def test_prune_and_bad_input(mounted: Mounted, tmp_path: Path) -> None:
    expected = _five(mounted)
    for args, words in ((["--keep-last", "-1"], "must not be negative"),
                        (["--keep-last", "0"], "at least 1"),
                        (["--keep-within", "soon"], "not a duration"),
                        (["--keep-within=-3h"], "not a duration"),
                        (["--keep-last", "2", "--keep-within", "1h"], "not allowed with"),
                        ([], "required")):
        r = fj("prune", mounted.mountpoint, *args, check=False)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) <= 3 and "Traceback" not in r.stderr
    r = fj("prune", tmp_path, "--keep-last", "2", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    hist = mounted.shadow / "history"
    assert len(list(hist.glob("*.rev"))) == 5        # nothing was touched
    r = fj("prune", mounted.mountpoint, "--keep-last", "3")
    assert "pruned checkpoint(s) 0..2; retained: 3..5" in r.stdout
    assert sorted(p.name for p in hist.glob("*.rev")) == ["3.rev", "4.rev"]
    assert not (hist / "2.held").exists()             # held only by pruned checkpoints
    r = fj("restore", mounted.mountpoint, tmp_path / "o", "--checkpoint", "2", check=False)
    assert r.returncode == 2 and "not retained (retained: 3..5)" in r.stderr
    assert not (tmp_path / "o").exists()
    fj("restore", mounted.mountpoint, tmp_path / "o3", "--checkpoint", "3")
    assert_same(expected[3], snapshot(tmp_path / "o3"))
    r = fj("prune", mounted.journal, "--keep-within", "1h")
    assert "nothing to prune" in r.stdout
    r = fj("prune", mounted.journal, "--keep-within", "1s")
    time.sleep(0)
    assert "retained: 5" in r.stdout or "retained: 4..5" in r.stdout


def test_retention_policy_at_mount(dirs: Mounted, tmp_path: Path) -> None:
    from conftest import can_mount
    if not can_mount():
        pytest.skip("needs root")
    dirs.mount("--keep-last", "2")
    for i in range(1, 5):
        (dirs.mountpoint / f"f{i}").write_text(str(i))
        dirs.wait(dirs.checkpoint())
    assert sorted(p.name for p in (dirs.shadow / "history").glob("*.rev")) == ["3.rev"]
    log = fj("log", dirs.journal).stdout
    assert "retained in the shadow (2;" in log
    r = fj("mount", dirs.source, tmp_path / "x", "--keep-within", "forever", check=False)
    assert r.returncode == 2 and "not a duration" in r.stderr


def test_kill_9_while_the_updater_writes_history(dirs: Mounted, tmp_path: Path) -> None:
    """The daemon is killed at each history fault point; after a remount every checkpoint is
    still restorable exactly."""
    from conftest import can_mount
    if not can_mount():
        pytest.skip("needs root")
    points = ["history.after_capture:3", "history.torn_frame", "history.after_hold",
              "history.before_rename", "updater.before_applied"]
    dirs.mount()
    expected = {0: snapshot(dirs.source)}
    for i in range(1, 4):
        _step(dirs.mountpoint, i)
        n = dirs.checkpoint()
        expected[n] = snapshot(dirs.source)
        dirs.wait(n)
    dirs.umount()
    for j, point in enumerate(points):
        dirs.mount(env={"FUSEJOURNAL_FAULT": point})
        mp = dirs.mountpoint
        with open(mp / "acc", "ab") as f:
            f.write(b"more %d\n" % j)
        with open(mp / "acc", "r+b") as f:                 # an overwrite: a pre-image to keep
            f.write(b"%d" % j)
        (mp / f"gone{j}").write_text("x")
        os.unlink(mp / f"gone{j}")
        if j == 0:
            _step(mp, 4)
        pid = dirs.pid
        n = max(expected) + 1
        os.setxattr(mp, b"user.fusejournal.update_permission", b"k")   # durable once it returns
        expected[n] = snapshot(dirs.source)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), f"the fault point {point} was not reached"
        dirs.cleanup()
        dirs.mount()
        dirs.wait(n)
        dirs.umount()
    for k, snap in expected.items():
        dest = tmp_path / f"k{k}"
        fj("restore", dirs.journal, dest, "--checkpoint", str(k))
        assert_same(snap, snapshot(dest))


def test_history_is_private_to_the_owner(mounted: Mounted, tmp_path: Path) -> None:
    _five(mounted)
    make_traversable(mounted.shadow)
    hist = mounted.shadow / "history"
    for p in [hist, *hist.iterdir()]:
        mode = p.lstat().st_mode & 0o777
        assert mode in (0o700, 0o600), (p, oct(mode))
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    for target in (hist, hist / "0.rev", hist / "4.held"):
        r = subprocess.run([*nobody, "cat" if target.suffix == ".rev" else "ls", os.fspath(target)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (target, r.stderr)
    r = subprocess.run([*nobody, *__import__("conftest").FJ, "restore", os.fspath(mounted.journal),
                        os.fspath(tmp_path / "nob"), "--checkpoint", "1"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def _browse(m: Mounted, point: Path, *args: str) -> None:
    point.mkdir()
    fj("browse", *args, m.mountpoint, point)


def test_browse_all_shows_every_retained_checkpoint(mounted: Mounted, tmp_path: Path) -> None:
    expected = _five(mounted)
    point = tmp_path / "all"
    _browse(mounted, point, "--all")
    try:
        names = sorted(os.listdir(point))
        assert names == ["0", "1-step 1_x", "2-step 2_x", "3-step 3_x", "4-step 4_x", "5-step 5_x", "latest"]
        for k, name in enumerate(names[:-1]):
            assert_same(expected[k], snapshot(point / name))
        assert_same(expected[5], snapshot(point / "latest"))
        # a copy out of an old checkpoint with the usual tools
        subprocess.run(["cp", "-a", os.fspath(point / "2-step 2_x"), os.fspath(tmp_path / "cp2")], check=True)
        assert_same(expected[2], snapshot(tmp_path / "cp2"))
        # read-only
        with pytest.raises(OSError):
            (point / "latest" / "x").write_text("no")
        # latest moves at once; a file opened in latest keeps its checkpoint
        f = open(point / "latest" / "sparse", "rb")       # noqa: SIM115
        try:
            assert os.path.getsize(point / "latest" / "sparse") == 0
            (mounted.mountpoint / "sparse").write_bytes(b"six")
            (mounted.mountpoint / "plain").write_text("back")
            n = mounted.checkpoint("six")
            expected[n] = snapshot(mounted.source)
            mounted.wait(n)
            assert (point / "latest" / "sparse").read_bytes() == b"six"
            assert "6-six" in os.listdir(point)
            assert_same(expected[5], snapshot(point / "5-step 5_x"))     # now through one more rev
            assert f.read() == b""                                     # still checkpoint 5
        finally:
            f.close()
        # pruning removes the directories of the pruned checkpoints
        fj("prune", mounted.journal, "--keep-last", "2")
        assert sorted(os.listdir(point)) == ["5-step 5_x", "6-six", "latest"]
        assert_same(expected[5], snapshot(point / "5-step 5_x"))
    finally:
        fj("umount", point)


def test_browse_one_checkpoint_and_bad_ids(mounted: Mounted, tmp_path: Path) -> None:
    expected = _five(mounted)
    point = tmp_path / "three"
    _browse(mounted, point, "--checkpoint", "3")
    try:
        assert_same(expected[3], snapshot(point))
    finally:
        fj("umount", point)
    for args, words in ((["--checkpoint", "9"], "not applied to the shadow yet"),
                        (["--checkpoint", "-2"], "must not be negative")):
        p = tmp_path / f"p{args[1]}"
        p.mkdir()
        r = fj("browse", *args, mounted.mountpoint, p, check=False)
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert not is_mounted(p)
    fj("prune", mounted.mountpoint, "--keep-last", "1")
    p = tmp_path / "pruned"
    p.mkdir()
    r = fj("browse", "--checkpoint", "2", mounted.mountpoint, p, check=False)
    assert r.returncode == 2 and "not retained (retained: 5)" in r.stderr


def test_label_becomes_a_safe_name() -> None:
    from fusejournal.browse import checkpoint_dir_name
    assert checkpoint_dir_name(3, "a/b\0c\n") == b"3-a_b_c_"
    assert checkpoint_dir_name(4, "") == b"4"
    assert checkpoint_dir_name(5, "caf\udce9") == b"5-caf\\udce9"
    long = checkpoint_dir_name(6, "\u00e9" * 500)
    assert len(long) <= 202 and long.decode()             # cut on a character boundary


def test_a_restore_does_not_hold_the_updater(mounted: Mounted, tmp_path: Path) -> None:
    """A restore paused between two of its steps (a fault point) does not keep the updater out:
    checkpoints are applied meanwhile, and the restore still copies exactly its checkpoint.
    (It failed before: the restore held the shadow for its whole run and wait timed out.)"""
    from conftest import FJ
    mp = mounted.mountpoint
    (mp / "d").mkdir()
    for i in range(40):
        (mp / "d" / f"{i:02d}").write_bytes(b"%02d" % i * 5000)
    n = mounted.checkpoint("before")
    before = snapshot(mounted.source)
    mounted.wait(n)
    pause = tmp_path / "pause"
    pause.write_text("")
    dest = tmp_path / "out"
    env = {**os.environ, "FUSEJOURNAL_FAULT": "restore.step:30:pause", "FUSEJOURNAL_FAULT_PAUSE": os.fspath(pause)}
    p = subprocess.Popen([*FJ, "restore", os.fspath(mp), os.fspath(dest)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (dest / "d").exists() or len(os.listdir(dest / "d")) < 5:
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()
            time.sleep(0.01)
        for i in range(40):                                  # every file changes, twice
            (mp / "d" / f"{i:02d}").write_bytes(b"new")
        mounted.wait(mounted.checkpoint("during 1"), timeout=20)
        os.unlink(mp / "d" / "07")
        mounted.wait(mounted.checkpoint("during 2"), timeout=20)
        assert p.poll() is None                              # still paused
    finally:
        pause.unlink()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert f"restored checkpoint {n} " in out
    assert_same(before, snapshot(dest))
