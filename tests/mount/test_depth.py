"""Changes deep in the tree are journaled at any depth (issue 7, item 5).

A chain of directories deeper than 4096 levels (paths far beyond PATH_MAX,
walked one component at a time with ``dir_fd``); a file created, written and
renamed at the bottom through the mount must reach the shadow.  And a handler
that could not name what it changes refuses before touching the original.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pyfuse3
import pytest

from fusejournal.fs import ROOT, Operations
from fusejournal.halt import Halt
from fusejournal.tempstore import TempStore

from conftest import Mounted, can_mount

DEPTH = 4100
CTX = pyfuse3.RequestContext()


def make_chain(top: Path, depth: int) -> None:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", 0o755, dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """``rm -rf`` of a tree of any depth (no recursion, no joined paths): pytest's own
    clean-up of old temporary directories would fail on these chains."""
    if not os.path.lexists(path):
        return
    stack = [os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)]
    try:
        while stack:
            fd = stack[-1]
            sub = None
            for e in os.scandir(fd):
                if e.is_dir(follow_symlinks=False):
                    sub = e.name
                    break
                os.unlink(e.name, dir_fd=fd)
            if sub is None:
                os.close(stack.pop())          # empty now: its parent removes it next
                continue
            try:
                os.rmdir(sub, dir_fd=fd)
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
                stack.append(os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd))
    finally:
        for fd in stack:
            os.close(fd)
    os.rmdir(path)


def bottom(top: Path, depth: int, flags: int = os.O_PATH) -> int:
    """An fd of the directory ``depth`` levels of ``d`` below ``top`` (one lookup per level)."""
    fd = os.open(top, os.O_PATH | os.O_DIRECTORY)
    for _ in range(depth):
        try:
            nfd = os.open("d", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
    rfd = os.open(".", flags | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    return rfd


def chain_listing(top: Path, depth: int) -> list:
    """Every level's entry names, and the bottom's entries with their stat (no paths used)."""
    out = []
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            out.append(sorted(os.listdir(fd)))
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        rows = []
        for name in sorted(os.listdir(fd)):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            data = None
            if stat.S_ISREG(st.st_mode):
                f = os.open(name, os.O_RDONLY, dir_fd=fd)
                data = os.read(f, 1 << 16)
                os.close(f)
            rows.append((name, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_mtime_ns, data))
        out.append(rows)
        out.append(os.fstat(fd).st_mtime_ns)
    finally:
        os.close(fd)
    return out


@pytest.mark.skipif(not can_mount(), reason="needs root, /dev/fuse and fusermount3")
def test_changes_below_4096_levels_reach_the_shadow(dirs: Mounted) -> None:
    try:
        deep_changes(dirs)
    finally:
        dirs.cleanup()
        remove_tree(dirs.source)
        remove_tree(dirs.shadow)


def deep_changes(dirs: Mounted) -> None:
    make_chain(dirs.source, DEPTH)                 # before mounting: seeded as checkpoint 0
    dirs.mount()
    fd = bottom(dirs.mountpoint, DEPTH)
    try:
        f = os.open("leaf", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=fd)
        os.write(f, b"deep down\n")
        os.close(f)
        os.mkdir("sub", 0o700, dir_fd=fd)
        os.mkdir("gone", 0o700, dir_fd=fd)
        os.rmdir("gone", dir_fd=fd)
        os.rename("leaf", "leaf2", src_dir_fd=fd, dst_dir_fd=fd)
        os.link("leaf2", "sub/hard", src_dir_fd=fd, dst_dir_fd=fd)
        os.chmod(f"/proc/self/fd/{fd}/leaf2", 0o604)
        os.setxattr(f"/proc/self/fd/{fd}/sub", "user.deep", b"yes")
    finally:
        os.close(fd)
    cp = dirs.checkpoint("deep")
    dirs.wait(cp)
    st = dirs.status()
    # (>=: on a loaded machine the seed may outlast --seed-wait and complete at a later
    # checkpoint, which includes cp: wait --checkpoint says so)
    assert st["shadow_checkpoint"] >= cp and not st["updater_error"], st
    expected = chain_listing(dirs.source, DEPTH)
    assert [r[0] for r in expected[-2]] == ["leaf2", "sub"]
    assert chain_listing(dirs.tree, DEPTH) == expected
    sfd = bottom(dirs.tree, DEPTH, os.O_RDONLY)
    try:
        assert os.getxattr(f"/proc/self/fd/{sfd}/sub", "user.deep") == b"yes"
        assert os.stat("sub/hard", dir_fd=sfd).st_ino == os.stat("leaf2", dir_fd=sfd).st_ino
    finally:
        os.close(sfd)
    dirs.umount()


@pytest.mark.skipif(not can_mount(), reason="needs root, /dev/fuse and fusermount3")
def test_a_crash_resync_reaches_below_4096_levels(dirs: Mounted) -> None:
    """Recovery after kill -9 resyncs the objects the lost temporary store touched: a
    directory 4,100 levels down cannot be named by /proc/self/fd (ENAMETOOLONG), so the
    resync finds its path by walking up (failed before: the resync stopped on it, and an
    online seed that had to reconcile such a directory never completed)."""
    try:
        make_chain(dirs.source, DEPTH)
        dirs.mount()
        fd = bottom(dirs.mountpoint, DEPTH)
        try:
            f = os.open("lost", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=fd)
            os.write(f, b"only the original has me\n")
            os.close(f)
            os.mkdir("lostdir", 0o700, dir_fd=fd)
        finally:
            os.close(fd)
        dirs.kill()                              # the temporary store is gone
        dirs.mount()
        cp = dirs.checkpoint("after the crash")
        dirs.wait(cp)
        st = dirs.status()
        # (>=: the seed may outlast --seed-wait and complete at a later checkpoint)
        assert st["shadow_checkpoint"] >= cp and not st["updater_error"], st
        expected = chain_listing(dirs.source, DEPTH)
        assert [r[0] for r in expected[-2]] == ["lost", "lostdir"]
        assert chain_listing(dirs.tree, DEPTH) == expected
        dirs.umount()
    finally:
        dirs.cleanup()
        remove_tree(dirs.source)
        remove_tree(dirs.shadow)


# ---------------------------------------------------------------- Operations called directly


@pytest.fixture
def ops(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    o = Operations(fd, store=TempStore(None), halt=Halt())
    o.src = src
    yield o
    o.close_all()
    os.close(fd)
    remove_tree(src)


async def test_deep_directories_are_named_in_records(ops: Operations) -> None:
    make_chain(ops.src, 4100)
    parent = ROOT
    for _ in range(4100):
        parent = (await ops.lookup(parent, b"d", CTX)).st_ino
    fi, _ = await ops.create(parent, b"f", 0o644, os.O_WRONLY, CTX)
    await ops.release(fi.fh)
    await ops.mkdir(parent, b"e", 0o755, CTX)
    recs = list(ops.store.take())
    assert [r.path for r in recs] == [b"d/" * 4100 + b"f", b"d/" * 4100 + b"e"]


async def test_what_cannot_be_named_is_refused_before_the_original_is_touched(ops: Operations) -> None:
    a = (await ops.mkdir(ROOT, b"a", 0o755, CTX)).st_ino
    fi, attr = await ops.create(a, b"f", 0o644, os.O_WRONLY, CTX)
    await ops.release(fi.fh)
    ops.store.take()
    ops.inodes.get(a).name = None          # a directory whose name is lost (never happens by itself)
    for call in (lambda: ops.mkdir(a, b"new", 0o755, CTX),
                 lambda: ops.create(a, b"g", 0o644, os.O_WRONLY, CTX),
                 lambda: ops.symlink(a, b"s", b"t", CTX),
                 lambda: ops.link(attr.st_ino, a, b"h", CTX),
                 lambda: ops.unlink(a, b"f", CTX),
                 lambda: ops.rename(a, b"f", ROOT, b"out", 0, CTX),
                 lambda: ops.setxattr(a, b"user.x", b"1", CTX)):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await call()
        assert e.value.errno == errno.EIO
    assert sorted(os.listdir(ops.src / "a")) == ["f"] and os.listdir(ops.src) == ["a"]
    assert os.listxattr(ops.src / "a") == []
    assert list(ops.store.take()) == []
