"""Real mounts: refusals that must leave nothing behind, and the needs-resync state (issue 7,
items 4 and 12)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from conftest import Mounted, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

CONTROL = b"user.fusejournal.update_permission"


def checkpoint_and_compare(m: Mounted, label: str = "t") -> int:
    n = m.checkpoint(label)
    expected = snapshot(m.source)
    m.wait(n)
    assert_same(expected, snapshot(m.tree))
    return n


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
