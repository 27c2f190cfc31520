"""Pre-images of a run of consecutive writes and creations are captured together (issue 10,
"points in time are cheap"): few frames, each old byte kept once per batch, and every
retained checkpoint still restores exactly — also when the updater is killed inside a run.

The original is changed by test_updater's Recorder and every checkpoint is rebuilt through
history_view (test_history's History); the rev files are read with history.read_frames.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_history import History

from fusejournal import history, layout
from fusejournal.compression import decompress
from fusejournal.history import FRAME_RECORDS, Data, _merged, _Spans, read_frames

KiB = 1024


@pytest.fixture
def hist(tmp_path):
    h = History(tmp_path, lambda r: (r.mkdir(b"d"), r.create(b"d/f", 0o644, b"one"),
                                     r.create(b"big", 0o600, os.urandom(1 << 20))))
    yield h
    h.e.close()


def _rev(h: History, n: int) -> tuple[int, list[Data]]:
    """(number of RECORDS frames, the Data records) of rev ``n``."""
    raw = (h.e.shadow.root / layout.SHADOW_HISTORY / history.rev_name(n)).read_bytes()
    frames, _, why = read_frames(raw)
    assert why is None
    recs = [f for f in frames if f.kind == FRAME_RECORDS]
    data = [r for f in recs for r, _ in history.decode(decompress(f.payload)) if type(r) is Data]
    return len(recs), data


def test_consecutive_overwrites_are_kept_in_few_frames(hist):
    """256 overwrites of 4 KiB: one or two frames of about 1 MiB (it was one frame, with its lz4
    frame, two crc32 and a write(2), per record), holding each old byte once."""
    r = hist.e.rec
    for i in range(256):
        r.write(b"big", i * 4 * KiB, os.urandom(4 * KiB))
    hist.sync()
    frames, data = _rev(hist, 0)
    assert frames <= 2
    assert sum(len(d.data) for d in data) == 1 << 20
    assert hist.check_all() == [0, 1]


def test_creations_are_kept_in_one_frame(hist):
    r = hist.e.rec
    for i in range(200):
        r.create(b"d/n%d" % i, 0o644, b"%d" % i)
    hist.sync()
    assert _rev(hist, 0)[0] == 1
    assert hist.check_all() == [0, 1]


def test_old_bytes_are_kept_once_per_batch(hist):
    """Writes that overlap earlier ones of the same batch, in later runs, keep only the bytes
    not kept yet: the rev holds the size of the change (a write partly over kept bytes used to
    keep all of it again)."""
    r = hist.e.rec
    r.write(b"big", 0, b"a" * 10_000)
    r.chmod(b"d", 0o700)                        # not a write: the run ends
    r.write(b"big", 5_000, b"b" * 10_000)       # half over the first
    r.chmod(b"d", 0o755)
    r.write(b"big", 2_000, b"c" * 20_000)       # over both, and past them
    r.write(b"big", 100_000, b"d" * 10)
    r.write(b"big", 100_005, b"e" * 10)         # in the same run, overlapping
    hist.sync()
    _, data = _rev(hist, 0)
    kept = sorted((d.offset, d.offset + len(d.data)) for d in data)
    assert kept == [(0, 10_000), (10_000, 15_000), (15_000, 22_000), (100_000, 100_015)]
    assert hist.check_all() == [0, 1]


def _sparse_and_new_dirs(h: History) -> None:
    """One batch of writes and creations only (one run, split where a parent is made by an
    earlier record of it): holes, writes past the end, overlapping writes, hard links."""
    r = h.e.rec
    r.create(b"s", 0o644)
    r.truncate(b"s", 300 * KiB)
    r.write(b"s", 100 * KiB, b"data in the middle")
    h.sync()
    r.write(b"s", 8 * KiB, b"x" * 5000)           # into a hole
    r.write(b"s", 100 * KiB + 3, b"Y" * 10)       # over data, in the same run
    r.write(b"s", 8 * KiB + 100, b"z" * 100)      # over the first write of the run
    r.write(b"s", 400 * KiB, b"past the end")     # the hole before it stays a hole
    r.mkdir(b"x")
    r.create(b"x/f", 0o600, b"in a new directory")     # its parent is made in the run
    r.mkdir(b"x/y")
    r.symlink(b"x/y/l", b"../f")
    r.link(b"d/f", b"x/y/h")
    r.write(b"d/f", 1, b"NE")                     # a file that gained a name in the run
    r.create(b"d/g", 0o644, b"g")
    r.write(b"big", 4000, b"q" * 9000)
    h.sync()


def test_a_run_with_holes_and_new_directories_restores(hist):
    _sparse_and_new_dirs(hist)
    assert hist.check_all() == [0, 1, 2]


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("k", [0, 1, 3, 4, 5, 6, 8, 11, 12, 14])
def test_killed_inside_a_run_the_chain_is_whole(tmp_path: Path, k: int, where: str) -> None:
    """A kill before or after any record of a run: the run's frame was written before its
    first record was applied; the resumed run keeps again only what is not kept yet."""
    h = History(tmp_path, lambda r: (r.mkdir(b"d"), r.create(b"d/f", 0o644, b"one"),
                                     r.create(b"big", 0o600, os.urandom(1 << 16))))
    try:
        real_sync = h.sync
        calls = {"n": 0}

        def sync(kill=None):
            calls["n"] += 1
            return real_sync((k, where) if calls["n"] == 2 else None)
        h.sync = sync                                   # type: ignore[method-assign]
        _sparse_and_new_dirs(h)
        assert h.check_all() == [0, 1, 2]
    finally:
        h.e.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 20)), max_size=30))
def test_spans_are_the_set_of_bytes_added(ops):
    spans, model = _Spans(), set()
    for add, a, n in ops:
        b = a + n
        if add:
            spans.add(a, b)
            model |= set(range(a, b))
        else:
            assert [x for p, q in spans.missing(a, b) for x in range(p, q)] == \
                [x for x in range(a, b) if x not in model]
            assert [x for p, q in spans.present(a, b) for x in range(p, q)] == \
                [x for x in range(a, b) if x in model]
        got = spans.spans()
        assert all(p < q for p, q in got) and all(q1 < p2 for (_, q1), (p2, _) in zip(got, got[1:]))
        assert {x for p, q in got for x in range(p, q)} == model


def test_a_path_names_another_directory_after_a_rename(hist):
    """The parents of captured paths are cached (as the updater's walk): after a rename the
    path ``a`` names another directory, whose names must be kept, not the moved one's."""
    r = hist.e.rec
    r.mkdir(b"a")
    r.create(b"a/f", 0o644, b"A")
    r.mkdir(b"c")
    r.create(b"c/f", 0o644, b"C")
    hist.sync()
    r.create(b"a/h", 0o644, b"h")                   # "a" is walked, and cached
    r.rename(b"a", b"b")
    r.rename(b"c", b"a")
    r.unlink(b"a/f")                                # c's f, by its new path
    r.create(b"a/g", 0o600, b"new")
    hist.sync()
    assert hist.check_all() == [0, 1, 2]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)), min_size=1, max_size=20))
def test_merged_ranges_hold_the_same_bytes(ranges):
    got = _merged([(a, a + n) for a, n in ranges])
    assert all(p < q for p, q in got)
    assert all(q1 < p2 for (_, q1), (p2, _) in zip(got, got[1:]))
    assert {x for p, q in got for x in range(p, q)} == {x for a, n in ranges for x in range(a, a + n)}
