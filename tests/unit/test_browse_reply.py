"""The browse mounts' one READDIR reply loop (browse._reply), and every listing of browse.py
served through it: the live browse (BrowseOperations), browse --all / --checkpoint
(HistoryBrowseOperations) and the group's time machine (GroupHistoryBrowseOperations).

The kernel asks for a listing in pieces: READDIR at offset 0, then at the offset of the
last entry it took, until a reply adds nothing; an entry that did not fit in its buffer
(``readdir_reply`` returned False) is asked for again.  So every entry must come exactly
once, in order, each with the offset of the next; and with READDIRPLUS each entry taken is
one lookup, so the live browse must count a lookup for the entries taken, never for the one
refused (the kernel would FORGET one lookup fewer than counted: an inode never freed).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyfuse3
import pytest
import trio

from fusejournal import browse
from fusejournal.browse import (
    BrowseOperations,
    GroupHistoryBrowseOperations,
    HistoryBrowseOperations,
    _reply,
)


class Kernel:
    """readdir_reply as the kernel's buffer takes it: ``room`` entries per READDIR."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.left = room
        self.got: list[tuple[bytes, int]] = []

    def reply(self, token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if self.left == 0:
            return False
        self.left -= 1
        self.got.append((name, next_id))
        return True

    def list(self, readdir) -> list[tuple[bytes, int]]:
        """READDIR from offset 0 until a reply adds nothing; every (name, next offset)."""
        offset = 0
        while True:
            self.left = self.room
            before = len(self.got)
            readdir(offset)
            if len(self.got) == before:
                return self.got
            offset = self.got[-1][1]


def _attr(ino: int) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    return e


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch):
    def make(room: int) -> Kernel:
        k = Kernel(room)
        monkeypatch.setattr(browse.pyfuse3, "readdir_reply", k.reply)
        return k
    return make


@pytest.mark.parametrize("room", [1, 3, 7, 100])
def test_every_entry_once_in_order_with_the_next_offset(kernel, room: int) -> None:
    listing = [(b"%d" % i, _attr(i + 10)) for i in range(20)]
    k = kernel(room)
    sent: list[int] = []
    got = k.list(lambda off: _reply(None, listing, off, sent.append))
    assert got == [(b"%d" % i, i + 1) for i in range(20)]
    assert sent == list(range(20))                   # each taken entry once; never the refused one


def test_an_offset_past_the_end_replies_nothing(kernel) -> None:
    k = kernel(5)
    _reply(None, [(b".", _attr(1)), (b"..", _attr(1))], 2)
    _reply(None, [(b".", _attr(1))], 7)
    assert k.got == []


def test_the_live_browse_counts_one_lookup_per_entry_taken(kernel, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    names = [f"f{i:02d}" for i in range(11)]
    for n in names:
        (d / n).write_bytes(b"x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    ops = BrowseOperations(fd, None)
    try:
        entry = trio.run(ops.lookup, 1, b"d", None)
        fh = trio.run(ops.opendir, entry.st_ino, None)
        k = kernel(4)
        got = k.list(lambda off: trio.run(ops.readdir, fh, off, None))
        assert [n for n, _ in got][:2] == [b".", b".."]
        assert sorted(n for n, _ in got[2:]) == sorted(os.fsencode(n) for n in names)
        assert [off for _, off in got] == list(range(1, len(names) + 3))
        for n in names:
            ino = os.lstat(d / n).st_ino
            assert ops.inodes[ino].lookups == 1, n   # the refused entry was not counted
        trio.run(ops.releasedir, fh)
    finally:
        ops.close_all()
        os.close(fd)


def test_browse_all_serves_its_listing_through_the_same_loop(kernel, tmp_path: Path) -> None:
    from test_updater import Env
    e = Env(tmp_path, lambda r: [r.create(b"f%d" % i, 0o644, b"x") for i in range(9)])
    ops = HistoryBrowseOperations(e.shadow.root, 0)          # --checkpoint 0: the tree at the root
    try:
        fh = trio.run(ops.opendir, pyfuse3.ROOT_INODE, None)
        k = kernel(2)
        got = k.list(lambda off: trio.run(ops.readdir, fh, off, None))
        assert [n for n, _ in got][:2] == [b".", b".."]
        assert sorted(n for n, _ in got[2:]) == [b"f%d" % i for i in range(9)]
        assert [off for _, off in got] == list(range(1, 12))
        trio.run(ops.releasedir, fh)
    finally:
        ops.close_all()
        e.close()


def test_the_group_time_machine_serves_its_listing_through_the_same_loop(kernel) -> None:
    ops = GroupHistoryBrowseOperations.__new__(GroupHistoryBrowseOperations)
    listing = [(b".", _attr(3)), (b"..", _attr(1))] + [(b"m%d" % i, _attr(7 + 3 * i)) for i in range(5)]
    ops.listings = {1: (3, listing)}
    k = kernel(3)
    # the listing was read whole at offset 0 (one group checkpoint); later pieces come from it
    k.left = 3
    trio.run(ops.readdir, 1, 2, None)
    k.left = 3
    trio.run(ops.readdir, 1, 5, None)
    assert k.got == [(b"m0", 3), (b"m1", 4), (b"m2", 5), (b"m3", 6), (b"m4", 7)]
