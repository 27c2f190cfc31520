"""Plain READDIR (FUSE_CAP_READDIRPLUS_AUTO, pyfuse3 with fusejournal's patch): the
Operations answer with each entry's name, inode number and type, take no lookup, and
list exactly what READDIRPLUS lists.  Called directly, with ``readdir_reply`` caught;
tests/mount/test_kernel_cache.py covers the same through the kernel."""

from __future__ import annotations

import os
import socket
import stat
import unittest.mock as mock
from types import SimpleNamespace

import pyfuse3
import pytest
from opshelp import ops  # noqa: F401  (ops is a fixture)

from fusejournal.fs import PLAIN_READDIR, ROOT, Operations, dir_fh

CTX = SimpleNamespace(pid=1, uid=0, gid=0, umask=0o022)


async def listing(o: Operations, inode: int, plus: bool, room: int = 1 << 30) -> list[tuple]:
    """(name, st_ino, S_IFMT) of every entry, asking again after ``room`` entries per
    request, as the kernel does when its buffer is full."""
    fh = dir_fh(await o.opendir(inode, CTX))
    got: list[tuple] = []
    token = SimpleNamespace(plus=plus)
    try:
        start = 0
        while True:
            n = 0

            def reply(tok: object, name: bytes, attr: pyfuse3.EntryAttributes, nid: int) -> bool:
                nonlocal n, start
                if n == room:
                    return False
                n += 1
                start = nid
                got.append((name, attr.st_ino, stat.S_IFMT(attr.st_mode)))
                return True
            with mock.patch.object(pyfuse3, "readdir_reply", reply):
                await o.readdir(fh, start, token)
            if n < room:
                return got
    finally:
        await o.releasedir(fh)


def make_every_type(d) -> None:
    d.mkdir()
    for i in range(40):
        (d / f"f{i}").write_bytes(b"x")
    (d / "sub").mkdir()
    os.symlink("f0", d / "ln")
    os.symlink("/nowhere", d / "dangling")
    os.link(d / "f1", d / "hard")
    os.mkfifo(d / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fspath(d / "sock"))
    s.close()
    os.mknod(d / "null", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    (d / "name\xff".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
     ).write_bytes(b"")


@pytest.mark.skipif(not PLAIN_READDIR, reason="pyfuse3 without fusejournal's patch (version 2)")
@pytest.mark.parametrize("room", [1 << 30, 7])
async def test_plain_lists_what_plus_lists_and_takes_no_lookup(ops: Operations, room: int) -> None:
    assert ops.readdirplus_auto
    make_every_type(ops.src / "d")
    d = (await ops.lookup(ROOT, b"d", CTX)).st_ino
    plain = await listing(ops, d, plus=False, room=room)
    # no entry was looked up by the plain listing: none is known to the Operations
    known = {os.stat(ops.src / "d" / n, follow_symlinks=False).st_ino
             for n in os.listdir(ops.src / "d")}
    assert all(ops.inodes.get(i) is None for i in known)
    plus = await listing(ops, d, plus=True, room=room)
    assert plain == plus
    want = {os.fsencode(n): (st.st_ino, stat.S_IFMT(st.st_mode))
            for n in os.listdir(ops.src / "d")
            for st in [os.stat(ops.src / "d" / n, follow_symlinks=False)]}
    assert {name: (ino, fmt) for name, ino, fmt in plain[2:]} == want
    assert [g[0] for g in plain[:2]] == [b".", b".."]
    assert ops.requests["readdir_plain"] >= 1


@pytest.mark.skipif(not PLAIN_READDIR, reason="pyfuse3 without fusejournal's patch (version 2)")
async def test_plain_after_changes_since_the_listing(ops: Operations) -> None:
    """As the kernel asks: the first chunk by READDIRPLUS (its names are the listing),
    the rest by plain READDIR.  Changes between the two show as READDIRPLUS would show
    them: a name removed since is left out, a name replaced by a directory has the
    directory's inode and type (the types are read at the first plain chunk)."""
    d = ops.src / "d"
    make_every_type(d)
    ino = (await ops.lookup(ROOT, b"d", CTX)).st_ino
    fh = dir_fh(await ops.opendir(ino, CTX))
    got: dict[bytes, tuple[int, int]] = {}

    def reply(tok: object, name: bytes, attr: pyfuse3.EntryAttributes, nid: int) -> bool:
        got[name] = (attr.st_ino, stat.S_IFMT(attr.st_mode))
        return len(got) < 3              # the first chunk: ".", ".." and one entry

    with mock.patch.object(pyfuse3, "readdir_reply", reply):
        await ops.readdir(fh, 0, SimpleNamespace(plus=True))
    first = set(got)
    names = [n for n in ops.dir_handles[fh].names if n not in first]
    gone, replaced = names[0], names[1]
    for n in (gone, replaced):
        p = d / os.fsdecode(n)
        os.rmdir(p) if p.is_dir() and not p.is_symlink() else os.unlink(p)
    p.mkdir()
    with mock.patch.object(pyfuse3, "readdir_reply", lambda t, n, a, i: reply(t, n, a, i) or True):
        await ops.readdir(fh, 3, SimpleNamespace(plus=False))
    await ops.releasedir(fh)
    assert gone not in got
    st = os.stat(p)
    assert got[replaced] == (st.st_ino, stat.S_IFDIR)
