"""Promises of docs/reliability.md checked through a real mount (each with the fault injected):

* a halt that cannot close in time fails the checkpoint with EBUSY after
  ``--halt-timeout``, lets operations flow again and loses nothing;
* device nodes and ``trusted.*`` xattrs reach the shadow exactly.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from conftest import Mounted, needs_fuse, wait_reached
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

UPDATE = b"user.fusejournal.update_permission"


@pytest.mark.daemon_errors      # the failed checkpoint is an error
def test_halt_timeout_fails_with_ebusy_and_loses_nothing(dirs: Mounted, tmp_path: Path) -> None:
    pause = tmp_path / "pause"
    pause.write_text("")
    # not in the mount root: the kernel holds a directory's lock during a mkdir in it, and
    # the update-permission setxattr needs the root's
    (dirs.source / "sub").mkdir()
    dirs.mount("--halt-timeout", "0.5", env={"FUSEJOURNAL_FAULT": "halt.in_operation:1:pause",
                                            "FUSEJOURNAL_FAULT_PAUSE": os.fspath(pause)})
    mp = dirs.mountpoint
    held: list[BaseException | None] = []
    granted: list[BaseException | None] = []

    def run(fn, out: list) -> threading.Thread:
        def body() -> None:
            try:
                fn()
                out.append(None)
            except BaseException as e:           # reported below
                out.append(e)
        th = threading.Thread(target=body, daemon=True)
        th.start()
        return th

    held_th = run(lambda: os.mkdir(mp / "sub" / "held"), held)   # the first mutating operation
    try:
        def not_done() -> None:
            assert held == [], held

        wait_reached(pause, "the mkdir in flight, held", check=not_done)
        assert held == []
        run(lambda: os.setxattr(mp, UPDATE, b"blocked"), granted).join(30)
        assert len(granted) == 1 and isinstance(granted[0], OSError), granted
        assert granted[0].errno == errno.EBUSY
        assert dirs.status()["last_checkpoint"] == 0
        (mp / "after").write_bytes(b"the gate reopened")   # operations flow again
        assert held == []
    finally:
        pause.unlink()
        held_th.join(30)
    assert held == [None]
    n = dirs.checkpoint("released")
    assert n == 1
    dirs.wait(n)
    assert_same(snapshot(dirs.source), snapshot(dirs.tree))
    assert (dirs.tree / "sub" / "held").is_dir()
    assert (dirs.tree / "after").read_bytes() == b"the gate reopened"


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and trusted.* need root")
def test_device_nodes_and_trusted_xattrs_reach_the_shadow(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    os.mknod(mp / "null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    os.mknod(mp / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.mknod(mp / "fifo", stat.S_IFIFO | 0o604)
    (mp / "f").write_bytes(b"data")
    (mp / "d").mkdir()
    os.setxattr(mp / "f", b"trusted.t", b"\x00binary\xff")
    os.setxattr(mp / "d", b"trusted.dir", b"on a directory")
    os.setxattr(mp / "fifo", b"trusted.fifo", b"on a fifo")
    os.setxattr(mp / "null", b"trusted.dev", b"on a device")
    assert os.getxattr(mp / "f", b"trusted.t") == b"\x00binary\xff"
    n = mounted.checkpoint("devices")
    mounted.wait(n)
    assert os.stat(mounted.tree / "null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(os.stat(mounted.tree / "blk").st_mode)
    assert os.getxattr(mounted.tree / "fifo", b"trusted.fifo") == b"on a fifo"
    assert_same(snapshot(mounted.source), snapshot(mounted.tree))
    os.removexattr(mp / "f", b"trusted.t")
    os.unlink(mp / "null")
    n = mounted.checkpoint("removed")
    mounted.wait(n)
    assert_same(snapshot(mounted.source), snapshot(mounted.tree))
