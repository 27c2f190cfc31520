"""fusejournal restore: the latest applied checkpoint, or a subtree, copied out byte-exact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Mounted, fj
from snapshot import assert_same, snapshot

pytestmark = pytest.mark.mount


def _populate(mp: Path) -> None:
    (mp / "d" / "e").mkdir(parents=True)
    (mp / "d" / "e" / "deep.txt").write_text("deep\n")
    (mp / "plain").write_bytes(os.urandom(100_000))
    with open(mp / "sparse", "wb") as f:
        f.seek(8 << 20)
        f.write(b"tail")
        f.seek(1 << 20)
        f.write(b"middle")
    os.symlink("plain", mp / "link")
    os.symlink("../../etc/passwd", mp / "d" / "escape")
    os.link(mp / "plain", mp / "d" / "hard")
    os.mkfifo(mp / "fifo", 0o640)
    os.chmod(mp / "plain", 0o604)
    os.chown(mp / "d" / "e" / "deep.txt", 65534, 65534)
    os.setxattr(mp / "plain", b"user.note", b"kept")
    os.setxattr(mp / "d", b"user.dir", b"too")
    os.utime(mp / "d" / "e" / "deep.txt", ns=(1, 1_000_000_123))
    (mp / "ro").mkdir()
    (mp / "ro" / "inside").write_text("in a read-only directory")
    os.chmod(mp / "ro", 0o500)


def _ready(mounted: Mounted) -> int:
    _populate(mounted.mountpoint)
    n = mounted.checkpoint("r")
    mounted.wait(n)
    return n


def test_restore_whole_tree_is_exact(mounted: Mounted, tmp_path: Path) -> None:
    n = _ready(mounted)
    dest = tmp_path / "out"
    r = fj("restore", mounted.mountpoint, dest)
    assert f"checkpoint {n}" in r.stdout
    assert_same(snapshot(mounted.source), snapshot(dest))
    # holes stay holes
    assert os.stat(dest / "sparse").st_blocks * 512 < 1 << 20
    # same again from the journal, and --checkpoint N with the applied one
    dest2 = tmp_path / "out2"
    fj("restore", mounted.journal, dest2, "--checkpoint", str(n))
    assert_same(snapshot(mounted.source), snapshot(dest2))


def test_restore_a_subtree_and_a_file(mounted: Mounted, tmp_path: Path) -> None:
    _ready(mounted)
    fj("restore", mounted.mountpoint, tmp_path / "sub", "--path", "d/e")
    assert_same(snapshot(mounted.source / "d" / "e"), snapshot(tmp_path / "sub"))
    fj("restore", mounted.mountpoint, tmp_path / "one", "--path", "/d/e/deep.txt")
    assert (tmp_path / "one" / "deep.txt").read_text() == "deep\n"
    st = os.stat(tmp_path / "one" / "deep.txt")
    assert (st.st_uid, st.st_mtime_ns) == (65534, 1_000_000_123)
    # a symlink is restored as a symlink, never followed
    fj("restore", mounted.mountpoint, tmp_path / "l", "--path", "d/escape")
    assert os.readlink(tmp_path / "l" / "escape") == "../../etc/passwd"


@pytest.mark.parametrize("path, words", [("../x", "'..' is not allowed"), ("d/../../x", "'..'"),
                                         ("link/x", "symlink is never followed"),
                                         ("nope/x", "does not exist"), ("d/nope", "does not exist")])
def test_restore_refuses_a_subpath_outside_the_tree(mounted: Mounted, tmp_path: Path, path: str,
                                                    words: str) -> None:
    _ready(mounted)
    dest = tmp_path / "out"
    r = fj("restore", mounted.mountpoint, dest, "--path", path, check=False)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not dest.exists() or not os.listdir(dest)


def test_restore_refuses_bad_destinations_and_checkpoints(mounted: Mounted, tmp_path: Path) -> None:
    n = _ready(mounted)
    mp = mounted.mountpoint
    for dest, words in ((mp / "inside", "inside the mount"), (mounted.shadow / "x", "inside the shadow"),
                        (mounted.journal / "x", "inside the journal")):
        r = fj("restore", mp, dest, check=False)
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert not os.path.exists(dest)
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine").write_text("keep me")
    r = fj("restore", mp, full, check=False)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (full / "mine").read_text() == "keep me"
    fj("prune", mp, "--keep-last", "1")                # older checkpoints are retained until pruned
    r = fj("restore", mp, tmp_path / "o", "--checkpoint", str(n - 1), check=False)
    assert r.returncode == 2 and "is not retained" in r.stderr
    r = fj("restore", mp, tmp_path / "o", "--checkpoint", str(n + 5), check=False)
    assert r.returncode == 2 and "not applied" in r.stderr
    assert not (tmp_path / "o").exists()


def test_restore_rerun_with_force_makes_dest_equal(mounted: Mounted, tmp_path: Path) -> None:
    _ready(mounted)
    dest = tmp_path / "out"
    fj("restore", mounted.mountpoint, dest)
    # an interrupted or damaged copy: a file half-written (no mtime set yet), an extra file,
    # a directory where a file belongs
    os.truncate(dest / "plain", 10)
    (dest / "extra").write_text("not in the checkpoint")
    os.chmod(dest / "ro", 0o700)
    (dest / "ro" / "more").mkdir()
    os.unlink(dest / "link")
    (dest / "link").mkdir()
    fj("restore", mounted.mountpoint, dest, "--force")
    assert_same(snapshot(mounted.source), snapshot(dest))


def test_restore_from_an_unmounted_journal_then_the_updater_continues(mounted: Mounted, tmp_path: Path) -> None:
    _ready(mounted)
    mounted.umount()
    fj("restore", mounted.journal, tmp_path / "out")
    assert_same(snapshot(mounted.source), snapshot(tmp_path / "out"))
    mounted.mount()
    (mounted.mountpoint / "after").write_text("x")
    mounted.wait(mounted.checkpoint())
    fj("restore", mounted.mountpoint, tmp_path / "out", "--force", "--path", "")
    assert (tmp_path / "out" / "after").read_text() == "x"


def test_restore_during_continuous_checkpoints_is_one_checkpoint(mounted: Mounted, tmp_path: Path) -> None:
    """The same counter in 60 files at every checkpoint, checkpoints taken all along:
    every restore holds one counter in every file (the shadow stood still during the copy)."""
    import threading
    mp = mounted.mountpoint

    def put(n: int) -> None:
        for i in range(60):
            (mp / f"f{i:02d}").write_bytes(b"%09d\n" % n * 400)

    put(0)
    mounted.wait(mounted.checkpoint())
    stop = threading.Event()
    errors: list = []

    def writer() -> None:
        n = 0
        try:
            while not stop.is_set():
                n += 1
                put(n)
                mounted.checkpoint(f"c{n}")
        except BaseException as e:   # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        seen = set()
        for k in range(6):
            dest = tmp_path / f"r{k}"
            r = fj("restore", mp, dest)
            values = {(dest / f"f{i:02d}").read_bytes() for i in range(60)}
            assert len(values) == 1, f"restore {k} mixes checkpoints: {sorted(v[:9] for v in values)}"
            assert r.stdout.startswith("restored checkpoint ")
            seen.add(values.pop())
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors


def test_restore_bad_arguments_are_one_line_and_write_nothing(mounted: Mounted, tmp_path: Path) -> None:
    _ready(mounted)
    (tmp_path / "afile").write_text("x")
    for args in (["restore", tmp_path / "nowhere", tmp_path / "o"],
                 ["restore", tmp_path, tmp_path / "o"],
                 ["restore", mounted.mountpoint, tmp_path / "no" / "parent"],
                 ["restore", mounted.mountpoint, tmp_path / "afile"],
                 ["restore", mounted.mountpoint, tmp_path / "o", "--path", "d/\udcff"],
                 ["restore", mounted.mountpoint, tmp_path / "o", "--checkpoint", "-1"]):
        r = fj(*args, check=False)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
    assert (tmp_path / "afile").read_text() == "x"


def test_restore_killed_midway_releases_the_shadow_and_reruns(mounted: Mounted, tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    from conftest import FJ
    mp = mounted.mountpoint
    (mp / "big").mkdir()
    for i in range(150):
        (mp / "big" / f"{i:03d}").write_bytes(os.urandom(256 << 10))
    mounted.wait(mounted.checkpoint())
    dest = tmp_path / "out"
    p = subprocess.Popen([*FJ, "restore", os.fspath(mp), os.fspath(dest)])
    deadline = time.monotonic() + 30
    while not (dest / "big").exists() or len(os.listdir(dest / "big")) < 10:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # its hold on the shadow died with it: the updater goes on
    (mp / "after").write_text("x")
    mounted.wait(mounted.checkpoint(), timeout=30)
    fj("restore", mp, dest, "--force")
    assert_same(snapshot(mounted.source), snapshot(dest))
