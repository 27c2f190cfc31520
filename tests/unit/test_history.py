"""Retained checkpoints without FUSE: the .rev format, and the tree at K rebuilt from the mirror
and the reverse batches, compared with the original as it was at K.

The original is changed with real os calls by test_updater's Recorder (which makes the records
fusejournal would make); after each checkpoint the original is snapshotted (tests/snapshot.py);
at the end every retained checkpoint is restored through history_view.TreeAt and compared with
its snapshot — names, types, contents, holes, modes, owners, symlinks, hard links, xattrs, mtimes.
"""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_updater import ROOT, Env, _random_op

from fusejournal import history, layout, sysc
from fusejournal.history import (
    Attr,
    Data,
    Entry,
    HistoryError,
    Hole,
    Move,
    Policy,
    decode,
    encode,
    frame,
    parse_duration,
    parse_rev,
    read_frames,
)
from fusejournal.history_view import NotRetained, TreeAt
from fusejournal.restore import Source, ViewRestorer, _Ref, resolve_view_subpath

from snapshot import assert_same
from snapshot import snapshot as tree_snapshot

# ------------------------------------------------------------------ format


RECS = [
    Entry(1, 2, stat.S_IFREG, 77, 3, b"n\xff", b"d/e", b""),
    Entry(1, 0, 0, 0, 4, b"gone", b"", b""),
    Attr(2, 0o100644, 0, 0, 0, 10, -5, 15_000_000_000 * 10**9 + 7, history.encode_xattrs({"user.a": b"\0x"})),
    Data(2, 1 << 40, b"\0" * 10 + b"abc"),
    Hole(2, 0, 4096),
    Move(2, 9, b"a/b", b"c"),
]


def test_rev_records_round_trip():
    assert [r for r, _ in decode(encode(RECS))] == RECS
    assert history.decode_xattrs(RECS[2].xattrs) == {b"user.a": b"\0x"}


@pytest.mark.parametrize("cut", [1, 5, 20])
def test_truncated_record_is_an_error(cut):
    raw = encode(RECS)
    with pytest.raises(HistoryError):
        list(decode(raw[:-cut]))


def _rev(records, checkpoint=3, end=True):
    meta = frame(history.FRAME_META, b'{"format": 1, "checkpoint": %d, "next": %d}' % (checkpoint, checkpoint + 1))
    body = frame(history.FRAME_RECORDS, history.compress(encode(records)))
    tail = frame(history.FRAME_END, b'{"records": %d}' % len(records)) if end else b""
    return meta + body + tail


def test_parse_rev_checks_everything():
    data = _rev(RECS)
    rev = parse_rev(data)
    assert rev.checkpoint == 3 and [r for r, _, _ in rev.records] == RECS
    with pytest.raises(HistoryError, match="incomplete"):
        parse_rev(_rev(RECS, end=False))
    for i in range(0, len(data), 7):            # any flipped bit is caught
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(HistoryError):
            parse_rev(bytes(bad))
    frames, good, why = read_frames(data[:-3])
    assert len(frames) == 2 and why is not None and good < len(data)


def test_end_frame_counts_records():
    data = _rev(RECS)
    # an END that claims one record more than the frames hold
    bad = data[:data.rindex(history.FRAME_MAGIC)] + frame(history.FRAME_END, b'{"records": 7}')
    with pytest.raises(HistoryError, match="END says"):
        parse_rev(bad)
    assert zlib.crc32(data) != zlib.crc32(bad)


def test_policy_and_durations():
    cps = [history.Checkpoint(i, i * 10**9, "") for i in range(10)]
    assert Policy(keep_last=3).drop(cps, 0) == list(range(7))
    assert Policy(keep_last=0).drop(cps, 0) == list(range(9))       # the latest always stays
    assert Policy(keep_last=None, keep_within=4.5).drop(cps, 9 * 10**9) == [0, 1, 2, 3, 4]
    assert Policy(keep_last=None, keep_within=1000).drop(cps, 9 * 10**9) == []
    assert parse_duration("90") == 90 and parse_duration("15m") == 900 and parse_duration("2w") == 14 * 86400
    for bad in ["", "-1h", "1y", "h", "0", "1e9", "1h30"]:
        with pytest.raises(ValueError):
            parse_duration(bad)


# ------------------------------------------------------------------ the tree at K

def restore_at(shadow: Path, k: int, dest: Path, subpath: str = "") -> None:
    src = Source(shadow, k, None)
    try:
        with src.step() as view:
            node, name = resolve_view_subpath(view, subpath)
        ViewRestorer(src, force=False).run(_Ref(node, subpath.encode(), src.gen), name, dest)
    finally:
        src.close()


class History:
    """An Env plus the original's snapshot at every checkpoint."""

    def __init__(self, base: Path, populate=None) -> None:
        self.base = base
        self.e = Env(base, populate)
        self.expected = {0: tree_snapshot(self.e.orig)}

    def sync(self, kill=None) -> int:
        self.e.sync(kill)
        n = self.e.shadow.applied
        self.expected[n] = tree_snapshot(self.e.orig)
        return n

    def check_all(self) -> list[int]:
        cps = history.retained(self.e.shadow.root, self.e.shadow.applied)
        for c in cps:
            dest = self.base / f"restored-{c.id}"
            restore_at(self.e.shadow.root, c.id, dest)
            assert_same(self.expected[c.id], tree_snapshot(dest))
        return [c.id for c in cps]


@pytest.fixture
def hist(tmp_path):
    h = History(tmp_path, lambda r: (r.mkdir(b"d"), r.create(b"d/f", 0o644, b"one"),
                                     r.create(b"big", 0o600, os.urandom(70000))))
    yield h
    h.e.close()


def test_every_kind_of_change_is_undone(hist):
    r = hist.e.rec
    r.write(b"d/f", 1, b"XYZW")                      # overwrite and extend
    r.create(b"new", 0o640, b"fresh")
    r.truncate(b"big", 100)                          # a truncate destroys 69900 bytes
    r.setxattr(b"d/f", b"user.k", b"v1")
    r.chmod(b"d", 0o700)
    assert hist.sync() == 1
    r.link(b"d/f", b"hard")
    r.rename(b"d", b"e")                             # a directory moves
    r.unlink(b"new")                                 # a file loses its last name
    r.write(b"big", 1 << 20, b"far")                 # a hole, then data
    r.symlink(b"sym", b"e/f")
    r.removexattr(b"e/f", b"user.k")
    assert hist.sync() == 2
    r.mkdir(b"e/sub")
    r.create(b"e/sub/x", 0o600, b"x" * 5000)
    r.rename(b"hard", b"e/sub/x")                    # over an existing file
    r.unlink(b"e/f")
    r.rmdir(b"e/sub") if False else None
    r.truncate(b"big", 0)
    assert hist.sync() == 3
    r.unlink(b"e/sub/x")
    r.rmdir(b"e/sub")                                # a removed directory is held
    r.mkdir(b"e/sub")                                # a new one with the same name
    r.utime(b"e", 7, 123456789)
    assert hist.sync() == 4
    assert hist.check_all() == [0, 1, 2, 3, 4]


def test_latest_is_the_mirror_and_unknown_ids_are_refused(hist):
    hist.e.rec.write(b"d/f", 0, b"two")
    hist.sync()
    with pytest.raises(NotRetained, match="not applied"):
        TreeAt(hist.e.shadow.root, 5)
    with TreeAt(hist.e.shadow.root, 1) as v:
        assert v.read(v.resolve(b"d/f"), 0, 100) == b"two"
    with TreeAt(hist.e.shadow.root, 0) as v:
        assert v.read(v.resolve(b"d/f"), 0, 100) == b"one"
        assert v.resolve(b"d/nothing") is None


def test_prune_keeps_the_newest_and_frees_held_objects(hist):
    r = hist.e.rec
    for i in range(5):
        r.create(b"f%d" % i, 0o644, b"x" * 1000)
        if i:
            r.unlink(b"f%d" % (i - 1))
        hist.sync()
    hdir = hist.e.shadow.root / layout.SHADOW_HISTORY
    assert sorted(p.name for p in hdir.glob("*.rev")) == [f"{i}.rev" for i in range(5)]
    dropped = history.prune(hist.e.shadow.root, 5, Policy(keep_last=2))
    assert dropped == [0, 1, 2, 3]
    assert sorted(p.name for p in hdir.glob("*.rev")) == ["4.rev"]
    assert not any(hdir.glob("[0-3].held"))
    assert hist.check_all() == [4, 5]
    with pytest.raises(NotRetained, match="not retained"):
        TreeAt(hist.e.shadow.root, 2)


def test_the_updater_applies_the_default_policy(tmp_path):
    h = History(tmp_path)
    h.e.updater.history.policy = Policy(keep_last=3)
    for i in range(6):
        h.e.rec.create(b"f%d" % i, 0o644, b"%d" % i)
        h.sync()
    assert [c.id for c in history.retained(h.e.shadow.root, 6)] == [4, 5, 6]
    assert h.check_all() == [4, 5, 6]
    h.e.close()


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("k", range(0, 9))
def test_killed_anywhere_in_a_batch_the_chain_is_whole(hist, k, where):
    r = hist.e.rec
    hist.sync()
    r.write(b"d/f", 0, b"AAAA")
    r.write(b"d/f", 2, b"BBBBBB")
    r.rename(b"d/f", b"g")
    r.create(b"d/f", 0o600, b"other")
    r.unlink(b"g")
    r.truncate(b"big", 10)
    r.rmdir(b"d") if False else r.mkdir(b"m")
    r.rename(b"m", b"d/m")
    r.setxattr(b"d", b"user.q", b"1")
    hist.sync((k, where))
    assert hist.check_all() == [0, 1, 2]


def test_a_torn_frame_is_cut_on_resume(hist, monkeypatch):
    """A kill in the middle of writing a frame leaves half a frame: the resumed batch drops it."""
    w = hist.e.updater.history
    real = w._flush
    state = {"n": 0}

    def torn():
        state["n"] += 1
        if state["n"] == 2:
            payload = history.compress(encode(w.buf))
            data = frame(history.FRAME_RECORDS, payload)
            os.write(w.fd, data[:len(data) // 2])
            raise KeyboardInterrupt("killed mid-frame")
        real()
    monkeypatch.setattr(w, "_flush", torn)
    hist.e.rec.write(b"d/f", 0, b"zz")
    hist.e.rec.write(b"big", 0, b"yy")
    hist.e.log.add(hist.e.rec.take())
    with pytest.raises(KeyboardInterrupt):
        hist.e.updater.run_once()
    monkeypatch.undo()
    from fusejournal.updater import Updater
    hist.e.updater = Updater(hist.e.log, hist.e.shadow)
    assert hist.e.updater.run_once() == 1
    hist.expected[1] = tree_snapshot(hist.e.orig)
    assert hist.check_all() == [0, 1]


def test_history_is_private(hist):
    hist.e.rec.unlink(b"d/f")
    hist.sync()
    hdir = hist.e.shadow.root / layout.SHADOW_HISTORY
    assert stat.S_IMODE(hdir.stat().st_mode) == 0o700
    for p in hdir.iterdir():
        if p.is_dir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o700
        else:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600


@settings(max_examples=int(os.environ.get("FJ_RANDOM_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_random_operations_every_checkpoint_restores(tmp_path_factory, data):
    """Random operations, checkpoints at random (some with a kill mid-batch): every retained
    checkpoint, rebuilt through the reverse batches, equals the original as it was then."""
    base = tmp_path_factory.mktemp("hist")
    h = History(base, lambda r: (r.mkdir(b"a"), r.create(b"b", 0o644, b"seed"), r.create(b"a/c")))
    fds: list[int] = []
    try:
        for _ in range(data.draw(st.integers(1, 30), label="ops")):
            _random_op(h.e.rec, data, fds)
            if data.draw(st.integers(0, 5), label="checkpoint?") == 0:
                h.sync(data.draw(st.none() | st.tuples(st.integers(0, 30), st.sampled_from(["before", "after"])),
                                 label="kill"))
        h.sync()
        h.check_all()
    finally:
        for fd in fds:
            os.close(fd)
        h.e.close()


needs_root = pytest.mark.skipif(not ROOT, reason="needs root")


def test_a_write_past_the_end_keeps_the_hole_before_it(hist):
    """Found by the random test: a hole at the end of a file becomes data when a write past the
    end allocates its block; the hole must come back as a hole at the older checkpoint."""
    r = hist.e.rec
    r.create(b"h", 0o644)
    r.truncate(b"h", 232)
    hist.sync()
    r.write(b"h", 589, b"\0")
    hist.sync()
    r.write(b"h", 7, b"x")                         # into the block the last write allocated
    hist.sync()
    assert hist.check_all() == [0, 1, 2, 3]


def test_a_replaced_file_whose_inode_number_is_reused_in_the_same_batch_is_kept(hist):
    """Found by the random test: a file replaced by a rename loses its hidden link to a new file
    that got its inode number in the same batch; it must still be kept for the older checkpoint."""
    from unithelp import create_reusing
    r = hist.e.rec
    r.create(b"c", 0o644, b"c data")
    hist.sync()
    ino_c = r.lst(b"c").st_ino
    r.create(b"new", 0o644, b"replacement")
    r.rename(b"new", b"c")
    create_reusing(r, b"dd", ino_c)
    r.write(b"dd", 0, b"d data")
    hist.sync()
    assert hist.check_all() == [0, 1, 2]


def test_two_overlapping_writes_in_a_batch_keep_every_old_byte(hist):
    """Found by the random test: a 1-byte write marked its whole block as kept, so a second write
    over the next bytes kept nothing and checkpoint 1 showed the new bytes."""
    r = hist.e.rec
    r.write(b"d/f", 0, b"\0")
    r.write(b"d/f", 0, b"pid")
    hist.sync()
    assert hist.check_all() == [0, 1]


def test_every_retained_checkpoint_has_a_time(hist):
    """The seed (checkpoint 0) has no marker: its time is when the shadow reached it, so
    --keep-within does not take it for ancient."""
    hist.e.rec.write(b"d/f", 0, b"x")
    hist.sync()
    cps = history.retained(hist.e.shadow.root, 1)
    assert [c.id for c in cps] == [0, 1] and cps[0].time_ns > 0     # (this fake log's markers have none)


def test_exchange_then_link_then_unlink_every_checkpoint_restores(tmp_path):
    """The minimal example hypothesis found for test_random_operations_every_checkpoint_restores:
    B is exchanged with a/c while it has one name (its Entry has no inodes/ key: "held if it
    goes"), gains a name (c), loses the recorded one (a/c) and so is never held: checkpoint 0
    read EIO ('object N of checkpoint 0 is not where its reverse batch says') until TreeAt
    found such an object by its hidden link in inodes/."""
    h = History(tmp_path, lambda r: (r.mkdir(b"a"), r.create(b"b", 0o644, b"seed"), r.create(b"a/c")))
    fd = -1
    try:
        h.e.rec.rename(b"a/c", b"b", sysc.RENAME_EXCHANGE)
        h.sync()
        h.e.rec.link(b"a/c", b"c")
        h.sync()
        h.e.rec.truncate(b"b", 0)
        h.sync()
        fd = os.open(h.e.rec.p(b"b"), os.O_RDWR)
        h.e.rec.unlink(b"a/c")
        h.sync()
        h.check_all()
    finally:
        if fd >= 0:
            os.close(fd)
        h.e.close()
