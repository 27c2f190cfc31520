"""Real mounts: refusals that must leave nothing behind, and the needs-resync state (issue 7,
items 4 and 12)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from conftest import FJ, Mounted, checkpoint_and_compare, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

CONTROL = b"user.fusejournal.update_permission"


def fj_names(path: Path) -> list[str]:
    return [x for x in os.listxattr(path, follow_symlinks=False) if x.startswith("user.fusejournal")]


def test_control_attribute_only_on_the_mount_root(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    (mp / "sub").mkdir()
    (mp / "file").write_bytes(b"x")
    before = mounted.checkpoint("first")
    for name in ("sub", "file"):
        for attr in (CONTROL, b"user.fusejournal.checkpoint", b"user.fusejournal.anything"):
            with pytest.raises(OSError) as e:
                os.setxattr(mp / name, attr, b"label")
            assert e.value.errno == errno.EPERM, (name, attr)
            with pytest.raises(OSError) as e:
                os.removexattr(mp / name, attr)
            assert e.value.errno == errno.EPERM, (name, attr)
        # setfattr, as a user would type it
        r = subprocess.run(["setfattr", "-n", CONTROL.decode(), "-v", "x", os.fspath(mp / name)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "not permitted" in r.stderr, r.stderr
        assert fj_names(mp / name) == []
        assert fj_names(mounted.source / name) == []
    assert int(os.getxattr(mp, b"user.fusejournal.checkpoint")) == before   # none was taken
    n = checkpoint_and_compare(mounted)
    for name in ("sub", "file"):
        assert fj_names(mounted.tree / name) == []
    assert n == before + 1


def test_stale_control_names_on_the_original_are_hidden(dirs: Mounted) -> None:
    """A control name stored on a subdirectory before the fix is neither shown nor readable."""
    (dirs.source / "sub").mkdir()
    os.setxattr(dirs.source / "sub", b"user.fusejournal.update_permission", b"old")
    os.setxattr(dirs.source / "sub", b"user.other", b"v")
    dirs.mount()
    assert fj_names(dirs.mountpoint / "sub") == []
    assert "user.other" in os.listxattr(dirs.mountpoint / "sub")
    with pytest.raises(OSError) as e:
        os.getxattr(dirs.mountpoint / "sub", b"user.fusejournal.update_permission")
    assert e.value.errno == errno.ENODATA


@pytest.mark.daemon_errors      # an injected fault: the needs-resync error
def test_unrecordable_change_needs_resync_until_the_next_mount(dirs: Mounted) -> None:
    """A change that reached the original but could not be recorded (an injected EIO when
    its record is made): status says so, durably; the next mount resyncs exactly it and the
    checkpoint after that equals the original again."""
    s = dirs.source
    (s / "keep").mkdir()
    (s / "keep" / "victim").write_bytes(b"to be removed")
    (s / "other").write_bytes(b"x")
    dirs.mount(env={"FUSEJOURNAL_FAULT": "fs.record:1:error"})
    mp = dirs.mountpoint
    assert dirs.status()["needs_resync"] == 0
    os.unlink(mp / "keep" / "victim")                  # the first record fails: reached, not recorded
    assert not (s / "keep" / "victim").exists()
    st = dirs.status()
    assert st["needs_resync"] == 1 and "unlink" in st["needs_resync_reason"]
    assert (dirs.journal / "needs_resync").exists()
    r = subprocess.run([*FJ, "status", os.fspath(mp)], capture_output=True, text=True)
    assert "needs_resync: 1" in r.stdout and "could not be journaled" in r.stderr
    os.mkdir(mp / "keep" / "made")                     # later operations are journaled as usual
    n = dirs.checkpoint("diverged")
    dirs.wait(n)
    assert (dirs.tree / "keep" / "victim").exists()   # the known divergence, reported above
    dirs.umount()
    r = subprocess.run([*FJ, "status", os.fspath(dirs.journal)], capture_output=True, text=True)
    assert "needs_resync: 1" in r.stdout, r.stdout + r.stderr
    dirs.mount()                                       # recovery resyncs the named objects
    n = checkpoint_and_compare(dirs)
    assert not (dirs.tree / "keep" / "victim").exists()
    assert dirs.status()["needs_resync"] == 0
    assert not (dirs.journal / "needs_resync").exists()


@pytest.mark.parametrize("op", ["mkdir", "create", "symlink", "link"])
def test_creation_whose_record_fails_is_taken_back(dirs: Mounted, op: str) -> None:
    (dirs.source / "d").mkdir()
    (dirs.source / "f").write_bytes(b"x")
    dirs.mount(env={"FUSEJOURNAL_FAULT": "fs.record:1:error"})
    mp = dirs.mountpoint
    with pytest.raises(OSError) as e:
        if op == "mkdir":
            os.mkdir(mp / "d" / "new")
        elif op == "create":
            os.close(os.open(mp / "d" / "new", os.O_CREAT | os.O_WRONLY, 0o644))
        elif op == "symlink":
            os.symlink("target", mp / "d" / "new")
        else:
            os.link(mp / "f", mp / "d" / "new")
    assert e.value.errno == errno.EIO
    assert os.listdir(dirs.source / "d") == [] and os.listdir(mp / "d") == []
    assert dirs.status()["needs_resync"] == 0
    os.mkdir(mp / "d" / "new")                          # the name is free; this one is journaled
    checkpoint_and_compare(dirs)
