"""Units of the online seed (issue 12): the resumable, tolerant walk (seed.py) and the
reconciliation of the objects changed while it copied (seeding.py).

No FUSE.  An original tree is built with real os calls; the seeder copies it into a
shadow, is stopped and resumed at every possible entry, races with changes made
directly on the original (with the write intents the daemon's activity log would
have written), and the reconciliation must leave ``Shadow.verify_matches`` empty.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fusejournal import sysc
from fusejournal.activity import Intent, encode_intent, format_period_name
from fusejournal.seed import Seeder, count_tree, sweep_hidden_links
from fusejournal.seeding import progress_line, read_periods, reconcile, unique
from fusejournal.shadow import Shadow

ROOT = os.geteuid() == 0


class _Stop(Exception):
    pass


def build(orig: Path) -> int:
    """A small tree with every kind of entry; returns its number of entries (root excluded)."""
    (orig / "a").mkdir()
    (orig / "a" / "b").mkdir()
    (orig / "a" / "b" / "deep").write_bytes(b"deep" * 100)
    (orig / "a" / "f").write_bytes(b"f" * 5000)
    (orig / "a" / "sparse").write_bytes(b"")
    with open(orig / "a" / "sparse", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"end")
    os.link(orig / "a" / "f", orig / "hard")
    os.symlink("a/f", orig / "link")
    os.mkfifo(orig / "fifo")
    (orig / "z").mkdir()
    (orig / "z" / "y").write_bytes(b"y")
    os.setxattr(orig / "z" / "y", b"user.k", b"v")
    os.chmod(orig / "z", 0o751)
    return 10


def shadow_of(tmp: Path) -> tuple[Shadow, int]:
    sh = Shadow(tmp / "shadow")
    sh.create()
    return sh, os.open(tmp / "orig", os.O_RDONLY | os.O_DIRECTORY)


def test_walk_order_is_sorted_preorder_and_cursor_is_the_last_entry(tmp_path: Path) -> None:
    (tmp_path / "orig").mkdir()
    build(tmp_path / "orig")
    sh, fd = shadow_of(tmp_path)
    seen: list[tuple[bytes, ...]] = []
    try:
        s = Seeder(sh, fd, on_entry=lambda s: seen.append(s.cursor))
        assert s.run() == 10
    finally:
        os.close(fd)
    assert seen == sorted(seen)                   # tuples of components: pre-order, sorted
    assert seen[0] == (b"a",) and seen[-1] == (b"z", b"y")
    assert (b"a", b"b", b"deep") in seen and s.cursor == seen[-1]


@pytest.mark.parametrize("stop_after", range(1, 11))
def test_resume_after_any_entry_copies_exactly_the_rest(tmp_path: Path, stop_after: int) -> None:
    """Stopped after k entries (what a kill leaves, with the cursor made durable), a walk
    resumed at the cursor copies only the other 10 - k, and the copy is exact."""
    (tmp_path / "orig").mkdir()
    total = build(tmp_path / "orig")
    sh, fd = shadow_of(tmp_path)
    try:
        def stop(s: Seeder) -> None:
            if s.count == stop_after:
                raise _Stop()
        first = Seeder(sh, fd, on_entry=stop, tolerant=True)
        with pytest.raises(_Stop):
            first.run()
        cursor = first.cursor
        second = Seeder(sh, fd, resume=cursor, tolerant=True)
        n = second.run()
        assert n == total - stop_after, (cursor, n)
        sh.set_applied(0)
        assert sh.verify_matches(fd) == []
    finally:
        os.close(fd)


def test_resume_replaces_what_an_interrupted_walk_left_after_the_cursor(tmp_path: Path) -> None:
    """After the cursor the shadow may hold half-copied entries (copied after the last durable
    cursor): a tolerant walk replaces them, whatever their type."""
    (tmp_path / "orig").mkdir()
    build(tmp_path / "orig")
    sh, fd = shadow_of(tmp_path)
    try:
        tree = tmp_path / "shadow" / "tree"
        Seeder(sh, fd, tolerant=True).run()
        # pretend the durable cursor was at "a/b/deep": a/f half-written, hard a directory, ...
        (tree / "a" / "f").unlink()
        (tree / "a" / "f").write_bytes(b"half")
        os.unlink(tree / "hard")
        (tree / "hard").mkdir()
        (tree / "hard" / "junk").write_bytes(b"junk")
        os.unlink(tree / "link")
        (tree / "link").write_bytes(b"not a symlink")
        Seeder(sh, fd, resume=(b"a", b"b", b"deep"), tolerant=True).run()
        sweep_hidden_links(sh)
        sh.set_applied(0)
        assert sh.verify_matches(fd) == []
    finally:
        os.close(fd)


def test_strict_walk_refuses_a_type_change_tolerant_walk_skips_it(tmp_path: Path) -> None:
    orig = tmp_path / "orig"
    orig.mkdir()
    for i in range(5):
        (orig / f"d{i}").mkdir()
        (orig / f"d{i}" / "f").write_bytes(b"x")
    sh, fd = shadow_of(tmp_path)
    try:
        def swap(s: Seeder) -> None:
            if s.cursor == (b"d1", b"f"):           # d2 listed by the root, not copied yet
                (orig / "d2" / "f").unlink()
                (orig / "d2").rmdir()
                (orig / "d2").write_bytes(b"now a file")
                (orig / "d3" / "f").unlink()        # vanishes under the walk
        s = Seeder(sh, fd, on_entry=swap, tolerant=True)
        s.run()
        assert (tmp_path / "shadow" / "tree" / "d2").read_bytes() == b"now a file"
        assert not (tmp_path / "shadow" / "tree" / "d3" / "f").exists()
    finally:
        os.close(fd)


@pytest.mark.skipif(not ROOT, reason="file handles (open_by_handle_at) need root")
def test_changes_during_the_walk_are_reconciled_from_their_intents(tmp_path: Path) -> None:
    """Changes made on the original while it is walked (each preceded by the intent the
    activity log would write for the changed object or directory) are made exact by one
    reconciliation round applied to the shadow."""
    orig = tmp_path / "orig"
    orig.mkdir()
    for i in range(6):
        (orig / f"d{i}").mkdir()
        for j in range(4):
            (orig / f"d{i}" / f"f{j}").write_bytes(b"%d-%d" % (i, j) * 300)
    os.link(orig / "d0" / "f0", orig / "d5" / "hard")
    started = time.time_ns()
    sh, fd = shadow_of(tmp_path)
    intents: list[Intent] = []

    def intent(p: Path) -> None:
        o = os.open(p, os.O_PATH | os.O_NOFOLLOW)
        try:
            htype, handle = sysc.name_to_handle(o)
            st = os.fstat(o)
            intents.append(Intent(st.st_ino, os.path.isdir(p) and not os.path.islink(p), htype, handle))
        finally:
            os.close(o)

    def change(s: Seeder) -> None:
        if s.cursor != (b"d2", b"f1"):
            return
        intent(orig / "d0" / "f0")                  # copied: written (and its hard link)
        with open(orig / "d0" / "f0", "r+b") as f:
            f.write(b"NEW" * 50)
        intent(orig / "d4" / "f3")                  # not copied yet: truncated
        os.truncate(orig / "d4" / "f3", 7)
        intent(orig / "d1")                         # copied -> renamed into a later directory
        intent(orig / "d5")
        os.rename(orig / "d1" / "f2", orig / "d5" / "moved")
        intent(orig)                                # a copied directory replaced by a file
        for j in range(4):
            (orig / "d0" / f"f{j}").unlink() if j else os.rename(orig / "d0" / "f0", orig / "d3" / "kept")
        (orig / "d0").rmdir()
        (orig / "d0").write_bytes(b"was a directory")
        intent(orig / "d3")
    try:
        Seeder(sh, fd, on_entry=change, tolerant=True).run()
        sweep_hidden_links(sh)
        sh.set_applied(0)
        assert sh.verify_matches(fd) != []          # the walk alone is not exact
        n = reconcile(fd, sh, unique(intents), started, None)
        assert n > 0
        assert sh.verify_matches(fd) == []
        assert not (tmp_path / "shadow" / "staging" / "cursor").exists()
    finally:
        os.close(fd)


def test_read_periods_takes_exactly_the_range(tmp_path: Path) -> None:
    d = tmp_path / "activity"
    d.mkdir()
    for p in range(1, 6):
        (d / format_period_name(p)).write_bytes(encode_intent(Intent(p, False, 1, b"h%d" % p)))
    (d / "junk").write_bytes(b"x")
    assert [i.ino for i in read_periods(d, 1, 4)] == [2, 3, 4]
    assert [i.ino for i in read_periods(d, 0, 1 << 62)] == [1, 2, 3, 4, 5]
    assert read_periods(tmp_path / "missing", 0, 9) == []
    assert len(unique(read_periods(d, 0, 9) * 2)) == 5


def test_count_tree_and_hidden_link_sweep(tmp_path: Path) -> None:
    (tmp_path / "orig").mkdir()
    total = build(tmp_path / "orig")
    sh, fd = shadow_of(tmp_path)
    try:
        entries, nbytes = count_tree(fd)
        assert entries == total and nbytes >= 5000 + 4096
        Seeder(sh, fd).run()
        assert sweep_hidden_links(sh) == 0          # every hidden link has a name
        os.unlink(tmp_path / "shadow" / "tree" / "z" / "y")
        assert sweep_hidden_links(sh) == 1
    finally:
        os.close(fd)


def test_progress_line() -> None:
    st = {"phase": "copy", "state": "copying", "entries_copied": 50, "entries_total": 200,
          "bytes_copied": 1 << 20, "bytes_total": 4 << 20, "rate_bytes_per_s": 1 << 20, "eta_s": 3.0}
    line = progress_line(st)
    assert "25.0%" in line and "50/200 entries" in line and "3s left" in line, line
    st.update(entries_total=None, bytes_total=None, eta_s=None)
    assert "%" not in progress_line(st)
    st.update(state="waiting for space on the shadow's filesystem")
    assert "waiting for space" in progress_line(st)
    assert "copy done" in progress_line({"phase": "converge", "state": "converging (round 2)"})
