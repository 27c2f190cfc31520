"""Superseded writes (fusejournal/superseded.py): which writes of a batch the
updater skips, and that the shadow and every retained checkpoint stay exact
when it does.  Pure units first, then batches applied by the real updater."""

from __future__ import annotations

import os
import stat
import time
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_history import History
from test_updater import Env, superseded_indices

from fusejournal import updater as updater_mod
from fusejournal.log import LogError, Marker, OrderedLog
from fusejournal.records import Mknod, Setattr, Symlink, Unlink, Write
from fusejournal.superseded import Superseded


def skipped(records, window: int | None = None) -> set[int]:
    sup = Superseded(len(records)) if window is None else Superseded(len(records), window=window)
    for i, r in enumerate(records):
        sup.note(i, r)
    return {i for i in range(len(records) + 8) if i in sup}


def w(ino: int, off: int, data: bytes, mtime: int = 1) -> Write:
    return Write(ino, off, mtime, data)


# ------------------------------------------------------------------ which writes

def test_a_write_rewritten_whole_at_the_same_offset_is_skipped():
    assert skipped([w(5, 0, b"aaaa"), w(5, 0, b"bbbb")]) == {0}
    assert skipped([w(5, 0, b"aaaa"), w(5, 0, b"bbbbbb")]) == {0}      # longer: still covers it


def test_a_shorter_later_write_does_not_supersede():
    assert skipped([w(5, 0, b"aaaa"), w(5, 0, b"bb")]) == set()
    # and the shorter one, once rewritten whole, is skipped without taking the long one along
    assert skipped([w(5, 0, b"aaaa"), w(5, 0, b"bb"), w(5, 0, b"cc")]) == {1}


def test_other_objects_and_other_offsets_are_not_superseded():
    assert skipped([w(5, 0, b"aaaa"), w(6, 0, b"bbbb"), w(5, 1, b"cccc"), w(5, 4096, b"dddd")]) == set()


def test_a_chain_of_rewrites_keeps_only_the_last():
    recs = [w(5, 8192, b"p" * 8192, mtime=i) for i in range(10)]
    assert skipped(recs) == set(range(9))


def test_records_in_between_do_not_stop_it():
    recs = [w(5, 0, b"aaaa"), Setattr(5, 8, 0o644, 0, 0, 2, 0, 3, b""), Unlink(5, 4, b"x"),
            w(5, 0, b"bbbb")]
    assert skipped(recs) == {0}


@pytest.mark.parametrize("create", [Mknod(5, stat.S_IFREG | 0o644, 0, 0, 0, 1, 1, b"n"),
                                    Symlink(5, 0, 0, 1, 1, b"n", b"t")])
def test_a_key_created_again_is_a_new_object(create):
    """An inode key reused in the batch names a new object: a write to the new one never
    makes the old one's write skipped (conservative: the old one could not be seen)."""
    assert skipped([w(5, 0, b"aaaa"), create, w(5, 0, b"bbbb")]) == set()
    assert skipped([w(5, 0, b"aaaa"), create, w(5, 0, b"bbbb"), w(5, 0, b"cccc")]) == {2}


def test_a_full_window_forgets_but_never_skips_wrongly():
    recs = [w(5, 0, b"aaaa"), w(6, 0, b"x"), w(7, 0, b"y"), w(5, 0, b"bbbb"), w(5, 0, b"cccc")]
    # a window of 2: the third distinct place empties it, so write 0 is forgotten (applied)
    assert skipped(recs, window=2) == {3}
    assert skipped(recs) == {0, 3}


def test_more_records_than_the_hint():
    sup = Superseded(1)
    for i in range(100):
        sup.note(i, w(5, 0, b"z"))
    assert [i for i in range(100) if i in sup] == list(range(99))
    assert sup.count == 99 and sup.bytes == 99
    assert 1000 not in sup and -1 not in sup


# ------------------------------------------------------------------ the updater skips them, exactly

@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path, lambda r: (r.create(b"f", 0o644, b"hello world, this is f"),
                                 r.create(b"g", 0o600, b"g" * 10000)))
    yield e
    e.close()


def _count_writes(monkeypatch) -> list[int]:
    real = updater_mod._Applier._write
    calls: list[int] = []

    def counting(self, rec, index):
        calls.append(index)
        real(self, rec, index)
    monkeypatch.setattr(updater_mod._Applier, "_write", counting)
    return calls


def test_a_rewritten_page_is_written_to_the_shadow_once(env, monkeypatch):
    """A WAL-like batch: the same 8 KiB page written 50 times, growing; the shadow gets the last."""
    calls = _count_writes(monkeypatch)
    r = env.rec
    page = bytearray(8192)
    for i in range(50):
        page[i * 100:(i + 1) * 100] = bytes([65 + i % 26]) * 100
        r.write(b"g", 8192, bytes(page))
    env.sync()                                      # asserts the shadow equals the original
    assert len(calls) == 1


def test_what_comes_between_is_kept(env, monkeypatch):
    """Truncates, shorter rewrites, renames and a new link between rewrites: each file ends
    as the original (sizes, holes, bytes, mtimes: Env.sync compares them all)."""
    calls = _count_writes(monkeypatch)
    r = env.rec
    r.write(b"f", 0, b"XXXXXXXXXX")
    r.truncate(b"f", 2)                             # the rewrite below extends it again
    r.write(b"f", 0, b"YYYYYYYYYYYY")
    r.write(b"g", 100, b"long long long")
    r.write(b"g", 100, b"short")                    # shorter: the long one is applied too
    r.rename(b"g", b"g2")
    r.link(b"g2", b"g3")
    r.write(b"g3", 100, b"S")                       # shorter again
    r.write(b"g2", 100, b"SHORT")                   # supersedes "S" (not "short": the
                                                    # place remembers only its last write)
    r.truncate(b"g2", 50000)                        # a hole after the data
    r.utime(b"g3", 7, 8)
    env.sync()
    assert calls == [2, 3, 4, 8]                    # YYY..., long, short, SHORT


def test_resumed_after_a_kill_at_every_applied_record(tmp_path):
    """A batch of rewrites killed after each applied record, then resumed: exact every time."""
    def populate(r):
        r.create(b"wal", 0o600, b"\0" * 16384)

    def ops(r):
        for i in range(6):
            r.write(b"wal", 0, b"%d" % i * 8192)
            r.write(b"wal", 8192, b"%d" % i * (1000 * (i + 1)))
        r.truncate(b"wal", 9000)
        r.write(b"wal", 0, b"end" * 3000)

    (tmp_path / "probe").mkdir()
    probe = Env(tmp_path / "probe", populate)
    try:
        ops(probe.rec)
        n = len(probe.rec.take())
    finally:
        probe.close()
    for k in range(n):
        (tmp_path / f"k{k}").mkdir()
        e = Env(tmp_path / f"k{k}", populate)
        try:
            ops(e.rec)
            e.sync(kill=(k, "after"))               # Env.sync kills only at applied records
        finally:
            e.close()


def test_every_retained_checkpoint_restores_after_rewrites(tmp_path):
    """Reverse batches keep the bytes of the previous checkpoint, not a skipped write's."""
    h = History(tmp_path, lambda r: (r.create(b"db", 0o644, bytes(range(256)) * 64),))
    try:
        r = h.e.rec
        for cp in range(4):
            for i in range(5):
                r.write(b"db", 4096, bytes([cp * 10 + i]) * 4096)
                r.write(b"db", 0, bytes([200 + i]) * (100 + i))
            if cp == 2:
                r.truncate(b"db", 5000)
            h.sync()
        assert len(h.check_all()) >= 4
    finally:
        h.e.close()


def test_the_updater_computes_it_from_the_verify_pass(env):
    """Updater.run_once skips what superseded_indices finds, and nothing else."""
    r = env.rec
    for i in range(5):
        r.write(b"f", 3, b"%d" % i * 5)
    seen = []
    real = updater_mod._Applier.apply_one

    def spy(self, rec, index):
        seen.append(index)
        real(self, rec, index)
    with mock.patch.object(updater_mod._Applier, "apply_one", spy):
        records = env.rec.take()
        n = env.log.add(records)
        assert env.updater.run_once() == n
    env.check()
    assert set(seen) == set(range(len(records))) - superseded_indices(records)
    assert superseded_indices(records) == {0, 1, 2, 3}


# ------------------------------------------------------------------ one pass when the batch fits

def _count_reads(env, monkeypatch) -> list[int]:
    """How many times the batch is read (FakeLog's verify reads it once through records)."""
    real = env.log.records
    reads: list[int] = []

    def counting(info):
        reads.append(info.marker.checkpoint)
        return real(info)
    monkeypatch.setattr(env.log, "records", counting)
    return reads


def test_a_batch_that_fits_is_applied_from_the_verify_pass(env, monkeypatch):
    reads = _count_reads(env, monkeypatch)
    env.rec.write(b"f", 0, b"one")
    env.rec.create(b"h", 0o640, b"two")
    env.sync()
    assert reads == [1]                             # verify only: applied from what it kept


def test_a_batch_over_the_budget_is_read_again(env, monkeypatch):
    reads = _count_reads(env, monkeypatch)
    monkeypatch.setattr(updater_mod, "KEEP_BYTES", 3000)
    for i in range(4):
        env.rec.write(b"g", i * 1000, b"%d" % i * 1000)   # 4 x (1000 + 256) > 3000
    env.sync()
    assert reads == [1, 1]


def test_superseded_writes_free_their_place_in_the_budget(env, monkeypatch):
    """200 rewrites of one 16 KiB page: 3.2 MB of records, but only the last is kept."""
    reads = _count_reads(env, monkeypatch)
    monkeypatch.setattr(updater_mod, "KEEP_BYTES", 64 << 10)
    for i in range(200):
        env.rec.write(b"g", 4096, bytes([i]) * 16384)
    env.sync()
    assert reads == [1]


def test_the_verify_pass_keeps_none_for_superseded_writes():
    sup = Superseded(4)
    first = updater_mod._VerifyPass(1, sup, budget=10 << 20)
    recs = [w(5, 0, b"a" * 100), w(6, 0, b"b"), w(5, 0, b"c" * 100), w(5, 0, b"d" * 100)]
    for i, r in enumerate(recs):
        first(i, r)
    assert first.kept == [None, recs[1], None, recs[3]]
    assert first.kept_bytes == 2 * updater_mod._RECORD_OVERHEAD + 1 + 100


def test_resume_after_kills_when_the_batch_is_read_again(tmp_path, monkeypatch):
    """The kill-and-resume test above with nothing kept: the second pass reads the log."""
    monkeypatch.setattr(updater_mod, "KEEP_BYTES", 0)
    test_resumed_after_a_kill_at_every_applied_record(tmp_path)


class RealLog:
    """Env's log as a real OrderedLog, in entries of about 4 KiB (many per batch)."""

    def __init__(self, directory) -> None:
        self.olog = OrderedLog(directory, chunk_bytes=4096)
        self.olog.open()
        self.starts: list[int | None] = []

    def add(self, records) -> int:
        n = self.olog.last_checkpoint + 1
        self.olog.append(records, Marker(n, "t", time.time_ns(), 0, 0, 0))
        return n

    def checkpoints(self, after):
        return self.olog.checkpoints(after)

    def verify(self, info, each=None, chunk=None):
        self.olog.verify(info, each, chunk)

    def records(self, info, start=None):
        self.starts.append(start)
        return self.olog.records(info, start)


@pytest.fixture
def real(tmp_path):
    (tmp_path / "e").mkdir()
    e = Env(tmp_path / "e", lambda r: r.create(b"g", 0o600, b"g" * 100))
    e.log = RealLog(tmp_path / "log")
    e.updater.close()
    e.updater = updater_mod.Updater(e.log, e.shadow)
    yield e
    e.log.olog.close()
    e.close()


def test_past_the_budget_the_log_is_read_again_from_that_entry(real, monkeypatch):
    monkeypatch.setattr(updater_mod, "KEEP_BYTES", 20 << 10)
    for i in range(40):                         # 40 x 1.5 KiB at distinct offsets: ~70 KiB kept
        real.rec.write(b"g", i * 2000, bytes([i]) * 1500)
    real.rec.write(b"g", 0, b"z" * 1500)        # and one superseded write, in the kept part
    real.sync()
    assert len(real.log.starts) == 1 and real.log.starts[0] is not None
    info = real.log.olog.checkpoints(0)[-1]
    assert info.start.offset < real.log.starts[0] < info.end.offset
    everything = list(real.log.olog.records(info))
    again = list(real.log.olog.records(info, real.log.starts[0]))
    assert everything[-len(again):] == again and 0 < len(again) < len(everything)


def test_a_batch_that_fits_is_never_read_again(real):
    for i in range(10):
        real.rec.write(b"g", 0, bytes([i]) * 3000)
    real.sync()
    assert real.log.starts == []


def test_records_refuses_a_start_outside_the_checkpoint(real):
    real.rec.write(b"g", 0, b"x")
    real.sync()
    info = real.log.olog.checkpoints(0)[-1]
    for bad in (info.start.offset - 1, info.end.offset, 10**12):
        with pytest.raises(LogError, match="outside"):
            list(real.log.olog.records(info, bad))


# ------------------------------------------------------------------ rewrites at random

NAMES = [b"a", b"b", b"c"]


@settings(max_examples=int(os.environ.get("FJ_RANDOM_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_random_rewrites_every_checkpoint_restores(tmp_path_factory, data):
    """Mostly writes at a few offsets and lengths (so that many are superseded), with
    truncates, renames over names, links, unlinks and files created again under a name
    between them; checkpoints at random, some with a kill after an applied record.
    The shadow equals the original at every checkpoint, and every retained checkpoint
    rebuilt through the reverse batches equals it as it was then."""
    base = tmp_path_factory.mktemp("rewrites")
    h = History(base, lambda r: (r.create(b"a", 0o644, b"seed" * 1000),))
    r = h.e.rec
    draw = data.draw
    try:
        for _ in range(draw(st.integers(1, 40), label="ops")):
            files = [n for n in NAMES if os.path.lexists(r.p(n))]
            op = draw(st.sampled_from(["write"] * 6 + ["truncate", "rename", "link", "unlink", "create"]))
            if op == "write" and files:
                size = draw(st.sampled_from([1, 100, 4096, 8192]))
                r.write(draw(st.sampled_from(files)), draw(st.sampled_from([0, 100, 4096, 8192])),
                        bytes([draw(st.integers(0, 255))]) * size)
            elif op == "truncate" and files:
                r.truncate(draw(st.sampled_from(files)), draw(st.sampled_from([0, 50, 5000, 20000])))
            elif op == "rename" and files:
                old, new = draw(st.sampled_from(files)), draw(st.sampled_from(NAMES))
                if old != new:
                    r.rename(old, new)
            elif op == "link" and files:
                new = draw(st.sampled_from(NAMES))
                if not os.path.lexists(r.p(new)):
                    r.link(draw(st.sampled_from(files)), new)
            elif op == "unlink" and len(files) > 1:
                r.unlink(draw(st.sampled_from(files)))
            elif op == "create":
                name = draw(st.sampled_from(NAMES))
                if not os.path.lexists(r.p(name)):
                    r.create(name, 0o644, b"new" * draw(st.integers(0, 3000)))
            if draw(st.integers(0, 6), label="checkpoint?") == 0:
                h.sync(draw(st.none() | st.tuples(st.integers(0, 40), st.just("after")), label="kill"))
        h.sync()
        h.check_all()
    finally:
        h.e.close()
