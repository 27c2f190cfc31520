"""fusejournal verify MOUNTPOINT: checkpoint, wait, compare the shadow with the original."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FJ, Mounted, fj

pytestmark = pytest.mark.mount


def _populate(mp: Path) -> None:
    (mp / "d").mkdir()
    (mp / "d" / "a").write_text("alpha")
    (mp / "b").write_bytes(b"b" * 5000)
    os.symlink("b", mp / "l")
    os.link(mp / "b", mp / "d" / "hb")
    os.setxattr(mp / "b", b"user.x", b"1")


def test_verify_a_good_backup(mounted: Mounted) -> None:
    _populate(mounted.mountpoint)
    r = fj("verify", mounted.mountpoint)
    assert "the shadow equals the original" in r.stdout
    # it took a checkpoint and waited for it
    assert (mounted.tree / "d" / "a").read_text() == "alpha"


def test_verify_lists_every_difference_and_fails(mounted: Mounted) -> None:
    _populate(mounted.mountpoint)
    mounted.wait(mounted.checkpoint())
    time.sleep(1.2)           # the original's objects are older than the verify's margin
    t = mounted.tree
    with open(t / "b", "r+b") as f:
        f.seek(100)
        f.write(b"X")
    os.chmod(t / "d" / "a", 0o600)
    (t / "d" / "extra").write_text("?")
    os.setxattr(t / "b", b"user.x", b"2")
    r = fj("verify", mounted.mountpoint, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "/b: contents differ at offset 100" in out
    assert "/d/a: mode" in out
    assert "/d/extra: not in the original" in out
    assert "/b: xattr user.x" in out
    assert "difference(s)" in r.stderr


def test_objects_changed_after_the_checkpoint_are_left_out(mounted: Mounted) -> None:
    """The updater is held (a shared lock on the browse gate's hold byte) so verify's
    checkpoint is not applied yet; a file changed meanwhile differs from the shadow at that
    checkpoint, rightly: it is left out, and the rest still compared."""
    _populate(mounted.mountpoint)
    mounted.wait(mounted.checkpoint())
    time.sleep(1.2)
    lock = os.open(mounted.shadow / "browse.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(lock, fcntl.LOCK_SH, 1, 2)
    try:
        p = subprocess.Popen([*FJ, "verify", os.fspath(mounted.mountpoint)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while mounted.status()["last_checkpoint"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (mounted.mountpoint / "b").write_bytes(b"changed after the checkpoint")
        (mounted.mountpoint / "d" / "new").write_text("new")
        # and damage the shadow of an object nobody changes: still found
        (mounted.tree / "d" / "a").write_text("alphX")
    finally:
        fcntl.lockf(lock, fcntl.LOCK_UN, 1, 2)
        os.close(lock)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, out + err
    assert "/d/a: contents differ" in out
    assert "/b:" not in out and "/d/hb:" not in out
    assert "/d/new" not in out
    assert "left out" in err


def test_verify_an_in_place_mount(dirs: Mounted) -> None:
    from conftest import can_mount
    if not can_mount():
        pytest.skip("needs root")
    _populate(dirs.source)
    dirs.mountpoint = dirs.source
    dirs.mount()
    (dirs.source / "later").write_text("through the mount")
    r = fj("verify", dirs.source)
    assert "equals the original" in r.stdout


def test_verify_refuses_what_is_not_a_mount(tmp_path: Path) -> None:
    r = fj("verify", tmp_path, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
