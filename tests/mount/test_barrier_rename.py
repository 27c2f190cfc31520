"""The barrier by path (a daemon without CAP_DAC_READ_SEARCH) while files open for
writing are renamed, replaced or removed: the checkpoint still succeeds.

Such a daemon cannot open an inode by its node id, so the barrier opens the path the
original had when the checkpoint began (acquisition._open_by_path).  Before
2026-12-03 a name renamed in between failed the checkpoint with ENOENT or ESTALE: under
rsync's temporary-file renames 30 of about 70 checkpoints failed.  Now the barrier asks
the daemon for the path again, and skips a file with no handle open for writing left
(its release wrote its pages back) or with no link.

Each case pauses the barrier's thread just before it opens the path (the fault point
``barrier.by_path``), makes the change from this process while the trigger waits, and
lets the barrier go on.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from test_online_seed_nonroot import mount_nocap

from conftest import Mounted, checkpoint_and_compare, needs_fuse, wait_reached

pytestmark = [needs_fuse, pytest.mark.mount]

DATA = b"written before the trigger\n" * 1000


def _atomic_save(d: Path, fd: int) -> None:
    os.close(fd)                                # the release writes the pages back
    os.rename(d / "f.tmp", d / "f")


def _renamed_while_open(d: Path, fd: int) -> None:
    os.rename(d / "f.tmp", d / "renamed")


def _another_file_on_the_name(d: Path, fd: int) -> None:
    os.rename(d / "f.tmp", d / "renamed")
    (d / "f.tmp").write_bytes(b"another inode on the same name")


def _unlinked_while_open(d: Path, fd: int) -> None:
    os.unlink(d / "f.tmp")


CASES: dict[str, Callable[[Path, int], None]] = {
    "atomic save": _atomic_save,
    "renamed while open": _renamed_while_open,
    "another file renamed onto the name": _another_file_on_the_name,
    "unlinked while open": _unlinked_while_open,
}


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_survives_a_rename_during_the_barrier(dirs: Mounted, tmp_path: Path,
                                                           case: str) -> None:
    pause = tmp_path / "pause"
    pause.touch()
    mount_nocap(dirs, "--writeback-cache", wait0=False,
                env={"FUSEJOURNAL_FAULT": "barrier.by_path:1:pause",
                     "FUSEJOURNAL_FAULT_PAUSE": str(pause)})
    d = dirs.mountpoint / "d"
    d.mkdir()
    fd = os.open(d / "f.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
    closed = False
    trigger = None
    try:
        os.write(fd, DATA)                      # in the kernel's cache (writeback cache)
        trigger = subprocess.Popen(["setfattr", "-n", "user.fusejournal.update_permission",
                                    "-v", case, str(dirs.mountpoint)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tr = trigger

        def still_waiting() -> None:
            assert tr.poll() is None, tr.communicate()

        wait_reached(pause, "the barrier to open by path", check=still_waiting)
        CASES[case](d, fd)                      # while the barrier's thread waits
        closed = case == "atomic save"
        pause.unlink()
        _, err = trigger.communicate(timeout=60)
        assert trigger.returncode == 0, err     # before the fix: ENOENT or ESTALE
    finally:
        pause.unlink(missing_ok=True)
        if trigger is not None and trigger.poll() is None:
            trigger.kill()
            trigger.wait()
        if not closed:
            os.close(fd)
    n = int(os.getxattr(dirs.mountpoint, b"user.fusejournal.checkpoint"))
    dirs.wait(n)
    if case != "unlinked while open":           # the bytes written before the trigger
        shadowed = {p.name: p.read_bytes() for p in (dirs.tree / "d").iterdir()}
        assert DATA in shadowed.values(), sorted(shadowed)
    checkpoint_and_compare(dirs)
    dirs.umount()
