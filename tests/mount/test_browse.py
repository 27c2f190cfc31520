"""The browse mount is never stale and never torn (issue 10).

After ``fusejournal wait --checkpoint N`` returns, every read through the
browse mount (content, size, attributes, listings, lookups) shows N or later;
no single read shows a shadow half-way through a batch; a file opened before
the shadow moved either keeps reading the checkpoint it was opened at or gets
ESTALE, never a mix.
"""

from __future__ import annotations

import errno
import filecmp
import os
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import Mounted, fj, force_unmount, is_mounted

NFILES = 40
CHUNK = 4096
CHUNKS = 16          # each file is written as 16 write(2)s: 16 records the updater applies one by one


class Browse:
    def __init__(self, target: Path, point: Path) -> None:
        self.target = target
        self.point = point

    def __enter__(self) -> Path:
        self.point.mkdir(exist_ok=True)
        fj("browse", self.target, self.point)
        return self.point

    def __exit__(self, *exc: object) -> None:
        if is_mounted(self.point):
            fj("umount", self.point, check=False)
        force_unmount(self.point)


def _body(n: int) -> bytes:
    return (b"%015d\n" % n) * (CHUNK * CHUNKS // 16)


def _write_counter(mp: Path, n: int) -> None:
    piece = (b"%015d\n" % n) * (CHUNK // 16)
    for i in range(NFILES):
        fd = os.open(mp / f"f{i:03d}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for k in range(CHUNKS):
                os.pwrite(fd, piece, k * CHUNK)
        finally:
            os.close(fd)


def test_wait_then_read_is_exact(mounted: Mounted, tmp_path: Path) -> None:
    """The issue's report: 100 bytes at checkpoint 1, 200 at 2; after wait, 200 bytes."""
    mp = mounted.mountpoint
    (mp / "f").write_bytes(b"a" * 100)
    (mp / "d").mkdir()
    mounted.wait(mounted.checkpoint("one"))
    with Browse(mp, tmp_path / "b") as bp:
        assert (bp / "f").read_bytes() == b"a" * 100
        assert (bp / "f").stat().st_size == 100
        assert os.listdir(bp / "d") == []
        for _ in range(3):
            (mp / "f").write_bytes(b"b" * 200)
            (mp / "d" / "new").write_text("x")
            os.chmod(mp / "f", 0o600)
            mounted.wait(mounted.checkpoint("two"))
            assert (bp / "f").stat().st_size == 200
            assert (bp / "f").read_bytes() == b"b" * 200
            assert (bp / "f").stat().st_mode & 0o777 == 0o600
            assert os.listdir(bp / "d") == ["new"]
            assert (bp / "d" / "new").read_text() == "x"
            (mp / "f").write_bytes(b"a" * 100)
            os.chmod(mp / "f", 0o644)
            (mp / "d" / "new").unlink()
            mounted.wait(mounted.checkpoint("three"))
            assert (bp / "f").read_bytes() == b"a" * 100
            assert (bp / "f").stat().st_mode & 0o777 == 0o644
            assert not (bp / "d" / "new").exists()
            assert os.listdir(bp / "d") == []


def test_sqlite_copied_out_after_wait_is_that_checkpoint(mounted: Mounted, tmp_path: Path) -> None:
    mp = mounted.mountpoint
    db = sqlite3.connect(mp / "app.db")
    db.execute("create table t (n integer)")
    db.commit()
    with Browse(mp, tmp_path / "b") as bp:
        for n in range(1, 6):
            with db:
                db.executemany("insert into t values (?)", [(n,)] * (50 * n))
            mounted.wait(mounted.checkpoint(f"c{n}"))
            out = tmp_path / f"copy{n}"
            subprocess.run(["cp", "-a", os.fspath(bp), os.fspath(out)], check=True)
            c = sqlite3.connect(out / "app.db")
            try:
                assert c.execute("select count(*), max(n) from t").fetchone() == (sum(50 * k for k in range(1, n + 1)), n)
            finally:
                c.close()
    db.close()


def _same_tree(a: Path, b: Path) -> None:
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files, cmp.report()
    for name in cmp.common_files:
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).stat().st_mtime_ns == (b / name).stat().st_mtime_ns


def _reader(bp: Path, stop: threading.Event, seen: dict, errors: list) -> None:
    """Hammer the browse mount: readdir, stat, open+read (whole file in one read), and a
    long-lived open file read again and again.  Each read must be one counter throughout,
    and the counters a reader sees never go backwards."""
    last = -1
    held = None
    held_value = None
    try:
        while not stop.is_set():
            names = sorted(os.listdir(bp))
            for name in names:
                if not name.startswith("f"):
                    continue
                p = bp / name
                try:
                    st = os.stat(p)
                    fd = os.open(p, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    data = os.pread(fd, CHUNK * CHUNKS + 1, 0)
                except OSError as e:
                    # the shadow moved between this open and this read, and the file changed
                    assert e.errno == errno.ESTALE, e
                    seen["stale"] += 1
                    continue
                finally:
                    os.close(fd)
                seen["reads"] += 1
                assert len(data) == CHUNK * CHUNKS, (name, len(data), st.st_size)
                n = int(data[:15])
                assert data == _body(n), f"{name}: torn read (starts with {n})"
                # the shadow only moves forward and each read is one whole checkpoint
                assert n >= last, f"{name} at {n} after another file at {last}"
                last = n
            # a long-lived open file: reads the checkpoint it was opened at, or ESTALE
            if held is None:
                held = os.open(bp / "f000", os.O_RDONLY)
                held_value = None
            try:
                data = os.pread(held, CHUNK * CHUNKS, 0)
                n = int(data[:15])
                assert data == _body(n), "torn read of a long-lived open file"
                if held_value is None:
                    held_value = n
                assert n == held_value, f"open file moved from {held_value} to {n}"
                seen["held_reads"] += 1
            except OSError as e:
                assert e.errno == errno.ESTALE, e
                seen["stale"] += 1
                os.close(held)
                held = None
    except BaseException as e:       # noqa: BLE001 - reported by the test
        errors.append(e)
    finally:
        if held is not None:
            os.close(held)


def test_readers_never_see_a_torn_or_stale_view(mounted: Mounted, tmp_path: Path) -> None:
    """Same counter in many files at each checkpoint, written as many small writes (so
    the updater applies each file piece by piece); readers hammer the browse mount all
    along; after each wait a read and a cp -a out of the browse mount are that checkpoint."""
    mp = mounted.mountpoint
    _write_counter(mp, 0)
    mounted.wait(mounted.checkpoint("c0"))
    stop = threading.Event()
    errors: list = []
    seen = {"reads": 0, "held_reads": 0, "stale": 0}
    with Browse(mp, tmp_path / "b") as bp:
        readers = [threading.Thread(target=_reader, args=(bp, stop, seen, errors)) for _ in range(3)]
        for t in readers:
            t.start()
        try:
            for n in range(1, 13):
                _write_counter(mp, n)
                cp = mounted.checkpoint(f"c{n}")
                if n % 3 == 0:
                    mounted.wait(cp)
                    for i in (0, NFILES // 2, NFILES - 1):
                        assert (bp / f"f{i:03d}").read_bytes() == _body(n)
                    # the writer pauses: a copy out of the browse mount is checkpoint n
                    out = tmp_path / f"cp{n}"
                    subprocess.run(["cp", "-a", os.fspath(bp), os.fspath(out)], check=True)
                    _same_tree(out, mp)
                    subprocess.run(["rsync", "-a", "--delete", f"{bp}/", f"{out}-r/"], check=True)
                    _same_tree(Path(f"{out}-r"), mp)
                assert not errors, errors
        finally:
            stop.set()
            for t in readers:
                t.join(60)
    assert not errors, errors
    assert seen["reads"] > 0


def test_browse_mount_is_read_only_and_answers_pid(mounted: Mounted, tmp_path: Path) -> None:
    (mounted.mountpoint / "f").write_text("x")
    mounted.wait(mounted.checkpoint())
    with Browse(mounted.mountpoint, tmp_path / "b") as bp:
        with pytest.raises(OSError) as e:
            (bp / "f").write_text("y")
        assert e.value.errno == errno.EROFS
        assert int(os.getxattr(bp, b"user.fusejournal.pid")) > 0


def test_mmap_of_a_browse_file(mounted: Mounted, tmp_path: Path) -> None:
    """Files are opened direct_io (so that an open file never reads another checkpoint's
    pages): private read-only mappings work, shared ones are refused (ENODEV: libfuse 3.14
    cannot ask for FUSE_DIRECT_IO_ALLOW_MMAP).  Documented in docs/design.md."""
    import mmap
    (mounted.mountpoint / "f").write_bytes(b"x" * 10000)
    mounted.wait(mounted.checkpoint())
    with Browse(mounted.mountpoint, tmp_path / "b") as bp, open(bp / "f", "rb") as f:
        m = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ)
        try:
            assert m[:3] == b"xxx" and len(m) == 10000
        finally:
            m.close()
        with pytest.raises(OSError) as e:
            mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
        assert e.value.errno == errno.ENODEV
