"""Crash recovery keeps the original's sparse map (issue 7, item 8).

After a SIGKILL of the daemon, the mount's recovery resyncs the objects its
activity log names (fusejournal.resync).  The shadow must then equal the
original not only byte for byte but hole for hole: the same SEEK_DATA /
SEEK_HOLE map, and no blocks allocated beyond it on either side (st_blocks;
up to the filesystem's own extent-tree blocks, see METADATA_SLACK).  tests/snapshot.py digests holes and
zero blocks alike (it compares contents only), so the map is compared here
explicitly.

Both directions are checked: a region that is data in the shadow but a hole
in the original (truncated down, extended again), and a hole in the shadow
that is now data (zeros written into it, or bytes), in files that existed at
the checkpoint and in files created in the lost period.

1. Real mount: sparse files, checkpoint, change them, kill -9 before the
   next checkpoint, remount (recovery), checkpoint, wait, compare.
2. Without FUSE (resync() on a seeded shadow, as tests/unit/test_resync.py does):
   the individual cases, with exact maps.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from conftest import Mounted, needs_fuse
from snapshot import assert_same, snapshot

KiB, MiB = 1 << 10, 1 << 20


# ------------------------------------------------------------------ helpers

def sparse_map(path: os.PathLike | bytes | str) -> list[tuple[int, int]]:
    """The data extents of a file as SEEK_DATA/SEEK_HOLE report them, clipped to its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out: list[tuple[int, int]] = []
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            off = end
        return out
    finally:
        os.close(fd)


#: st_blocks may exceed the data extents by the filesystem's own metadata: ext4 needs an
#: extent-tree block once a file has more than 4 *physical* extents, which depends on
#: free-space fragmentation, not on holes (seen with fsx: equal maps, 192 vs 184 blocks)
METADATA_SLACK = 2 * 4096


def layout(path: os.PathLike | bytes | str) -> tuple:
    """What "the same holes" means: the size and the data extents."""
    return os.stat(path).st_size, sparse_map(path)


def hidden_allocation(path: os.PathLike | bytes | str) -> int:
    """Bytes allocated (st_blocks) beyond the data extents: unwritten (preallocated) extents,
    blocks past EOF or metadata.  SEEK_DATA does not show the first two."""
    st = os.stat(path)
    blk = st.st_blksize or 4096
    data = sum(-(-e // blk) * blk - s // blk * blk for s, e in sparse_map(path))
    return st.st_blocks * 512 - data


def assert_same_layout(original: Path, shadow: Path, names: list[str]) -> None:
    bad = []
    for name in names:
        a, b = layout(original / name), layout(shadow / name)
        if a != b:
            bad.append(f"{name}:\n  original {a}\n  shadow   {b}")
        for p in (original / name, shadow / name):
            extra = hidden_allocation(p)
            if not 0 <= extra <= METADATA_SLACK:
                bad.append(f"{p}: {extra} bytes allocated beyond its data extents "
                           f"(st_blocks {os.stat(p).st_blocks})")
    assert not bad, "sparse maps differ:\n" + "\n".join(bad)


def pwrite(path: Path, data: bytes, off: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


def make_sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off, data in pieces:
            os.pwrite(fd, data, off)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


# ------------------------------------------------------------ on a real mount

FILES = ["sparse", "shrink", "fill", "new"]


@needs_fuse
@pytest.mark.mount
def test_recovery_after_kill_keeps_holes(dirs: Mounted) -> None:
    src = dirs.source
    rnd = os.urandom
    # before the mount: data, a hole of several MiB, data
    make_sparse(src / "sparse", 8 * MiB + 64 * KiB, [(0, rnd(64 * KiB)), (8 * MiB, rnd(64 * KiB))])
    make_sparse(src / "shrink", 4 * MiB, [(0, rnd(4 * MiB))])
    make_sparse(src / "fill", 16 * MiB, [(0, rnd(64 * KiB))])
    dirs.mount()
    mp = dirs.mountpoint
    n = dirs.checkpoint("one")
    dirs.wait(n)
    assert_same_layout(src, dirs.tree, FILES[:3])          # the seed keeps holes
    # the lost period: changes through the mount, then the daemon dies before a checkpoint
    pwrite(mp / "sparse", b"x" * 100, 1000)                 # into a data region
    pwrite(mp / "sparse", rnd(64 * KiB), 20 * MiB)          # extended past a new hole
    os.truncate(mp / "shrink", 512 * KiB)                   # data -> hole ...
    pwrite(mp / "shrink", rnd(64 * KiB), 3 * MiB)           # ... and data again further on
    pwrite(mp / "fill", bytes(64 * KiB), 4 * MiB)           # hole -> data (zeros)
    pwrite(mp / "fill", rnd(64 * KiB), 10 * MiB)            # hole -> data (bytes)
    make_sparse(mp / "new", 7 * MiB, [(0, rnd(64 * KiB)), (2 * MiB, bytes(64 * KiB)),
                                      (5 * MiB, rnd(64 * KiB))])
    dirs.kill()
    expected = snapshot(src)
    dirs.mount()                                            # recovery: resync from the activity log
    n = dirs.checkpoint("after the crash")
    dirs.wait(n)
    assert_same(expected, snapshot(dirs.tree))
    assert_same_layout(src, dirs.tree, FILES)
    # and the ordinary path keeps them from there on
    os.truncate(mp / "fill", 5 * MiB)
    pwrite(mp / "fill", b"y", 9 * MiB)
    n = dirs.checkpoint("after")
    dirs.wait(n)
    assert_same(snapshot(src), snapshot(dirs.tree))
    assert_same_layout(src, dirs.tree, FILES)
    dirs.umount()


# ------------------------------------------------ resync() alone (no FUSE)

from fusejournal.records import Setattr, Write  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="file handles (open_by_handle_at) need root")


@pytest.fixture
def env(tmp_path):
    from test_resync import Env  # the lost-period harness of the resync tests
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def _check(env, names: list[bytes]) -> list:
    """Resync, apply, compare contents (crash_and_resync) and then the maps; and check
    that no Write touched a hole of the original."""
    recs = env.crash_and_resync()
    tree = Path(env.shadow.tree)
    assert_same_layout(Path(os.fsdecode(env.root)), tree, [os.fsdecode(n) for n in names])
    for name in names:
        ino = env.lst(name).st_ino
        data = sparse_map(env.p(name))
        for w in (r for r in recs if type(r) is Write and r.ino == ino):
            lo, hi = w.offset, w.offset + len(w.data)
            assert any(s <= lo and hi <= e for s, e in data), \
                f"{name!r}: Write [{lo}, {hi}) covers a hole of the original {data}"
    return recs


@needs_root
def test_data_in_the_shadow_becomes_a_hole(env):
    env.put(b"f", os.urandom(4 * MiB))
    env.put(b"g", os.urandom(10_000))
    env.seed()
    env.truncate(b"f", 1 * MiB + 3 * KiB)            # cut mid-block, then extended
    env.truncate(b"f", 6 * MiB)
    env.write(b"f", 3 * MiB, b"after the hole")
    env.truncate(b"g", 5000)                          # a partial block stays data
    env.truncate(b"g", 2 * MiB)
    recs = _check(env, [b"f", b"g"])
    cuts = [r for r in recs if type(r) is Setattr and r.ino == env.lst(b"f").st_ino and r.size < 4 * MiB]
    assert cuts and cuts[0].size == 1 * MiB + 4 * KiB, cuts     # cut after the last data block


@needs_root
def test_a_hole_in_the_shadow_becomes_data(env):
    make_sparse(Path(os.fsdecode(env.p(b"f"))), 16 * MiB, [(0, b"head"), (15 * MiB, b"tail")])
    env.seed()
    env.write(b"f", 4 * MiB, bytes(64 * KiB))        # zeros: data in the original
    env.write(b"f", 8 * MiB + 100, b"bytes in a hole")
    env.write(b"f", 20 * MiB, bytes(4 * KiB))        # extended, ending in zeros
    recs = _check(env, [b"f"])
    assert sum(len(r.data) for r in recs if type(r) is Write) <= 64 * KiB + 3 * 4 * KiB + 4 * KiB


@needs_root
def test_both_directions_in_one_file_and_a_new_file(env):
    make_sparse(Path(os.fsdecode(env.p(b"f"))), 12 * MiB,
                [(0, os.urandom(2 * MiB)), (6 * MiB, os.urandom(6 * MiB))])
    env.dirs(b"d")
    env.seed()
    env.write(b"f", 3 * MiB, bytes(8 * KiB))         # hole -> zeros, below the cut
    env.truncate(b"f", 7 * MiB)                      # data -> hole above 7 MiB
    env.truncate(b"f", 12 * MiB)
    env.write(b"f", 9 * MiB, os.urandom(100))
    env.write(b"f", 100, b"changed in the data")
    env.create(b"d/new")
    env.write(b"d/new", 0, bytes(3 * MiB))           # all zeros, but data
    env.write(b"d/new", 8 * MiB, b"x")
    _check(env, [b"f", b"d/new"])


@needs_root
def test_unchanged_data_is_not_rewritten(env):
    env.put(b"f", os.urandom(8 * MiB))
    env.seed()
    env.write(b"f", 5 * MiB + 7, b"one change")
    recs = _check(env, [b"f"])
    assert [(w.offset, len(w.data)) for w in recs if type(w) is Write] == [(5 * MiB, MiB)]
    assert not [r for r in recs if type(r) is Setattr and r.size < 8 * MiB]


@needs_root
def test_without_seek_data_contents_still_match(env, monkeypatch):
    from fusejournal import resync as resync_mod
    monkeypatch.setattr(resync_mod, "data_map", lambda fd, size: None)
    make_sparse(Path(os.fsdecode(env.p(b"f"))), 6 * MiB, [(0, os.urandom(3 * MiB))])
    env.seed()
    env.truncate(b"f", 1 * MiB)
    env.truncate(b"f", 6 * MiB)
    env.write(b"f", 5 * MiB, b"x")
    env.create(b"new")
    env.write(b"new", 2 * MiB, b"y")
    env.crash_and_resync(holes=False)                # contents only: holes cannot be told
