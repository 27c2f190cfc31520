"""Records are built in one place (fusejournal.records' factories): fs.py, resync.py
and the tests agree on what a record of a given object holds.

No FUSE: Operations is called directly, resync runs on real trees (root).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyfuse3
import pytest
from test_resync import Env

from fusejournal import records as R
from fusejournal.fs import ROOT, Operations
from fusejournal.halt import Halt
from fusejournal.resync import resync
from fusejournal.tempstore import TempStore

CTX = pyfuse3.RequestContext()   # uid 0, gid 0


async def test_fs_records_a_directory_as_the_factory_does(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    ops = Operations(fd, store=TempStore(None), halt=Halt())
    old = os.umask(0)
    try:
        await ops.mkdir(ROOT, b"d", stat.S_IFDIR | 0o1750, CTX)
        (rec,) = list(ops.store.take())
    finally:
        os.umask(old)
        ops.close_all()
        os.close(fd)
    st = os.lstat(src / "d")
    assert rec == R.mkdir_record(st, rec.pmtime_ns, b"d")
    assert rec.mode == 0o1750                  # permission bits only


@pytest.mark.skipif(os.geteuid() != 0, reason="file handles (open_by_handle_at) need root")
def test_resync_records_a_directory_as_fs_does(tmp_path: Path) -> None:
    """fs.py recorded a new directory's mode as its permission bits, resync as the
    whole st_mode (S_IFDIR included): the same directory gave two different records."""
    env = Env(tmp_path)
    try:
        env.dirs(b"d")
        env.seed()
        env.mkdir(b"d/sub", 0o750)
        recs = resync(env.src, env.shadow, list(env.intents), since_ns=None)
        (rec,) = [r for r in recs if type(r) is R.Mkdir]
        st = env.lst(b"d/sub")
        assert rec == R.mkdir_record(st, rec.pmtime_ns, b"d/sub")
        assert rec.mode == 0o750
    finally:
        env.close()


def test_factories_take_what_the_updater_applies(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 5)
    os.chmod(f, 0o4755)
    st = os.lstat(f)
    m = R.mknod_record(st, 7, b"f")
    assert (m.ino, m.mode, m.rdev, m.mtime_ns, m.pmtime_ns) == (st.st_ino, st.st_mode, 0, st.st_mtime_ns, 7)
    a = R.setattr_record(st.st_ino, R.ATTR_SIZE, st, size=2)
    assert (a.mode, a.size, a.mtime_ns, a.path) == (0o4755, 2, st.st_mtime_ns, b"")
    os.symlink("f", tmp_path / "l")
    lst = os.lstat(tmp_path / "l")
    assert R.symlink_record(lst, 1, b"l", b"f") == R.Symlink(lst.st_ino, lst.st_uid, lst.st_gid,
                                                              lst.st_mtime_ns, 1, b"l", b"f")
