"""Streaming the temporary store into the ordered log (fusejournal/streamer.py) and what
the log, the store and the checkpointer do for it: entries streamed ahead of their
marker belong to the next marker, never to a reader before it; a crash cuts them, a
clean close keeps them; nothing is lost or reordered when an append fails."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import trio

from fusejournal import log as log_mod
from fusejournal.acquisition import Checkpointer
from fusejournal.halt import Halt
from fusejournal.log import Marker, OrderedLog, fsck, read_log
from fusejournal.records import Mkdir, Write, encode
from fusejournal.streamer import Streamer
from fusejournal.tempstore import TempStore


def writes(n: int, start: int = 0, size: int = 1000) -> list[Write]:
    return [Write(7, i * size, i, bytes([i % 251]) * size) for i in range(start, start + n)]


def marker(cp: int, label: str = "t") -> Marker:
    return Marker(checkpoint=cp, label=label, time_ns=1, operations=0, raw_bytes=0, stored_bytes=0)


def opened(path: Path, **kw) -> OrderedLog:
    olog = OrderedLog(path, **kw)
    olog.open()
    return olog


def all_records(olog: OrderedLog) -> list:
    out = []
    for info in olog.checkpoints(0):
        olog.verify(info)
        out.extend(olog.records(info))
    return out


# ------------------------------------------------------------ the log

def test_the_marker_closes_every_entry_streamed_since_the_previous_one(tmp_path: Path) -> None:
    olog = opened(tmp_path / "log", chunk_bytes=4000)
    first = writes(10)
    olog.append(first[:2], marker(1))
    assert olog.append_unmarked(first[2:6]) == (4, sum(len(encode([r])) for r in first[2:6]))
    olog.sync()
    olog.append_unmarked(first[6:8])
    assert olog.last_checkpoint == 1 and len(olog.checkpoints(0)) == 1   # not readable yet
    info = olog.append(first[8:], marker(2))
    assert info.marker.operations == 8
    assert list(olog.records(info)) == first[2:]
    assert olog.unmarked == (0, 0)
    olog.close()
    again = opened(tmp_path / "log")
    assert all_records(again) == first          # the scan reads all entries since marker 1 as batch 2
    assert again.checkpoints(1)[0].marker == info.marker
    assert fsck(tmp_path / "log").clean


def test_unmarked_entries_left_by_a_crash_are_cut_and_never_read(tmp_path: Path) -> None:
    olog = opened(tmp_path / "log")
    olog.append(writes(2), marker(1))
    size = os.path.getsize(olog.segments()[-1][1])
    olog.append_unmarked(writes(5, 2))
    olog.sync()                                  # durable, but no marker: not committed
    # (no close: a crash)
    markers, damage, torn, last = read_log(tmp_path / "log")
    assert [m.checkpoint for m in markers] == [1] and damage is None and last == 1
    assert torn is not None and "not closed by a marker" in torn
    again = OrderedLog(tmp_path / "log")
    warnings = again.open()
    assert warnings and "torn tail" in warnings[0]
    assert os.path.getsize(again.segments()[-1][1]) == size and again.unmarked == (0, 0)
    info = again.append(writes(1, 9), marker(2))
    assert list(again.records(info)) == writes(1, 9)


def test_a_clean_close_keeps_unmarked_entries_for_the_next_marker(tmp_path: Path) -> None:
    olog = opened(tmp_path / "log")
    olog.append(writes(1), marker(1))
    olog.append_unmarked(writes(3, 1))
    olog.close()
    assert fsck(tmp_path / "log").clean         # named in end.json: not a torn tail
    again = OrderedLog(tmp_path / "log")
    assert again.open() == []
    assert again.unmarked[0] == 3 and again.last_checkpoint == 1
    again.append_unmarked(writes(2, 4))
    info = again.append(writes(1, 6), marker(2))
    assert list(again.records(info)) == writes(6, 1)
    again.close()
    assert all_records(opened(tmp_path / "log")) == writes(7)


def test_kept_entries_extended_then_crashed_are_cut(tmp_path: Path) -> None:
    """end.json names exactly the entries of the clean close: more streamed after the
    remount and a crash make the whole unmarked tail an uncommitted one."""
    olog = opened(tmp_path / "log")
    olog.append(writes(1), marker(1))
    good = os.path.getsize(olog.segments()[-1][1])
    olog.append_unmarked(writes(3, 1))
    olog.close()
    again = opened(tmp_path / "log")
    again.append_unmarked(writes(1, 4))          # then a crash
    third = OrderedLog(tmp_path / "log")
    assert third.open() and third.unmarked == (0, 0)
    assert os.path.getsize(third.segments()[-1][1]) == good


def test_discard_unmarked(tmp_path: Path) -> None:
    olog = opened(tmp_path / "log")
    olog.append(writes(1), marker(1))
    olog.append_unmarked(writes(3, 1))
    olog.close()
    again = opened(tmp_path / "log")
    assert again.discard_unmarked() == 3 and again.unmarked == (0, 0)
    info = again.append(writes(1, 9), marker(2))
    assert list(again.records(info)) == writes(1, 9)
    again.close()
    assert all_records(opened(tmp_path / "log")) == writes(1) + writes(1, 9)


def test_a_failed_streamed_append_cuts_back_only_itself(tmp_path: Path, monkeypatch) -> None:
    olog = opened(tmp_path / "log", chunk_bytes=3000)
    olog.append(writes(1), marker(1))
    olog.append_unmarked(writes(3, 1))
    size = os.path.getsize(olog.segments()[-1][1])
    real = log_mod._write_packed
    calls = []

    def full(fd, cp, packed):
        calls.append(1)
        if len(calls) == 2:                       # the second chunk does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, cp, packed)
    monkeypatch.setattr(log_mod, "_write_packed", full)
    with pytest.raises(OSError):
        olog.append_unmarked(writes(6, 4))
    assert os.path.getsize(olog.segments()[-1][1]) == size and olog.unmarked[0] == 3
    monkeypatch.setattr(log_mod, "_write_packed", real)
    info = olog.append(writes(1, 10), marker(2))
    assert list(olog.records(info)) == writes(3, 1) + writes(1, 10)


def test_a_failed_tail_append_keeps_the_streamed_entries(tmp_path: Path, monkeypatch) -> None:
    olog = opened(tmp_path / "log")
    olog.append_unmarked(writes(3))               # the first checkpoint's entries, new segment
    monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(OSError):
        olog.append(writes(1, 3), marker(1))
    monkeypatch.undo()
    assert olog.last_checkpoint == 0 and olog.unmarked[0] == 3
    info = olog.append(writes(1, 3), marker(1))
    assert list(olog.records(info)) == writes(4)
    olog.close()
    assert all_records(opened(tmp_path / "log")) == writes(4)


def test_streamed_entries_start_a_new_segment_and_the_checkpoint_stays_in_it(tmp_path: Path) -> None:
    olog = opened(tmp_path / "log", segment_limit=300, chunk_bytes=2000)
    olog.append(writes(6), marker(1))             # the segment is past its limit now
    olog.append_unmarked(writes(3, 6))
    olog.append_unmarked(writes(8, 9))            # still the same segment: one checkpoint
    info = olog.append(writes(1, 17), marker(2))
    assert info.start.segment == info.end.segment == 2 and info.start.offset == log_mod._FILE_HEADER.size
    olog.close()
    assert all_records(opened(tmp_path / "log")) == writes(18)


# ------------------------------------------------------------ the store

def test_take_front_takes_the_oldest_parts_and_restore_puts_them_back(tmp_path: Path) -> None:
    store = TempStore(tmp_path, memory_limit=20_000, chunk_bytes=5000)
    recs = writes(60)
    for r in recs:
        store.append(r)
    assert store.spilled_bytes > 0
    raw, ops = store.raw_bytes, store.operations
    front = store.take_front(12_000)
    assert 12_000 <= front.raw_bytes < 12_000 + 6000 and list(front) == recs[:front.operations]
    assert store.raw_bytes == raw - front.raw_bytes and store.operations == ops - front.operations
    store.append(Mkdir(0o40755, 0, 0, 1, 1, b"later"))
    store.restore(front)
    assert list(store.take()) == recs + [Mkdir(0o40755, 0, 0, 1, 1, b"later")]
    assert store.memory_bytes == 0 and store.operations == 0


def test_take_front_of_the_part_being_filled(tmp_path: Path) -> None:
    store = TempStore(None, chunk_bytes=1 << 20)
    store.append(Mkdir(0o40755, 0, 0, 1, 1, b"a"))
    front = store.take_front(1 << 20)
    assert front.operations == 1 and store.operations == 0 and store.memory_bytes == 0
    store.append(Mkdir(0o40755, 0, 0, 1, 1, b"b"))       # a new part, not the taken list
    assert [r.path for r in front] == [b"a"] and [r.path for r in store.take()] == [b"b"]


# ------------------------------------------------------------ the streamer and the checkpointer

class FlakyLog(OrderedLog):
    fail = 0

    def append_unmarked(self, records):
        if self.fail:
            self.fail -= 1
            list(records)
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().append_unmarked(records)


def setup(tmp_path: Path) -> tuple[TempStore, FlakyLog, Streamer, Checkpointer]:
    store = TempStore(tmp_path, memory_limit=1 << 20, chunk_bytes=4000)
    olog = FlakyLog(tmp_path / "log", chunk_bytes=4000)
    olog.open()
    streamer = Streamer(store, olog, wake_bytes=4000, step_bytes=8000, interval=0.01, retry_max=0.05)
    cp = Checkpointer(store, Halt(), olog, halt_timeout=1.0, streamer=streamer)
    return store, olog, streamer, cp


async def test_streamed_then_checkpointed_in_order(tmp_path: Path) -> None:
    store, olog, streamer, cp = setup(tmp_path)
    recs = writes(40)
    for r in recs[:30]:
        store.append(r)
    while await streamer.step():
        pass
    assert store.operations == 0 and olog.unmarked[0] == 30
    for r in recs[30:]:
        store.append(r)
    m = await cp.checkpoint("one")
    assert m.operations == 40 and not streamer.paused
    assert all_records(olog) == recs


async def test_a_failed_streamed_append_puts_the_records_back_in_front(tmp_path: Path) -> None:
    store, olog, streamer, cp = setup(tmp_path)
    recs = writes(20)
    for r in recs[:10]:
        store.append(r)
    olog.fail = 1
    assert not await streamer.step()
    assert streamer.last_error and "No space" in streamer.last_error
    assert store.operations == 10
    for r in recs[10:]:
        store.append(r)
    await trio.sleep(0.06)                        # the retry delay
    while await streamer.step():
        pass
    assert streamer.last_error is None and olog.unmarked[0] == 20
    await cp.checkpoint("after the failure")
    assert all_records(olog) == recs


async def test_a_failed_checkpoint_keeps_the_streamed_part_for_the_next(tmp_path: Path, monkeypatch) -> None:
    store, olog, streamer, cp = setup(tmp_path)
    recs = writes(30)
    for r in recs[:20]:
        store.append(r)
    while await streamer.step():
        pass
    for r in recs[20:25]:
        store.append(r)
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(OSError):
        await cp.checkpoint("fails")
    monkeypatch.setattr(os, "fdatasync", real)
    assert not streamer.paused and olog.last_checkpoint == 0
    assert olog.unmarked[0] == 20 and store.operations == 5
    for r in recs[25:]:
        store.append(r)
    m = await cp.checkpoint("again")
    assert m.operations == 30 and all_records(olog) == recs


async def test_pause_waits_for_the_append_in_flight(tmp_path: Path) -> None:
    store, olog, streamer, cp = setup(tmp_path)
    entered = trio.Event()
    release = trio.Event()
    real = olog.append_unmarked
    token = trio.lowlevel.current_trio_token()

    def slow(records):
        trio.from_thread.run_sync(entered.set, trio_token=token)
        trio.from_thread.run(release.wait, trio_token=token)
        return real(records)
    olog.append_unmarked = slow
    for r in writes(5):
        store.append(r)
    order = []
    async with trio.open_nursery() as n:
        n.start_soon(streamer.step)
        await entered.wait()

        async def pauser() -> None:
            await streamer.pause()
            order.append(("paused", olog.unmarked[0]))
        n.start_soon(pauser)
        await trio.sleep(0.05)
        assert order == []                        # still waiting for the append
        release.set()
    assert order == [("paused", 5)]
    store.append(Write(1, 0, 0, b"x"))
    assert not await streamer.step()              # paused: takes nothing
    streamer.resume()
    assert await streamer.step()


async def test_an_aborted_group_checkpoint_comes_back_whole_and_in_front(tmp_path: Path) -> None:
    store, olog, streamer, cp = setup(tmp_path)
    recs = writes(30)
    for r in recs[:20]:
        store.append(r)
    while await streamer.step():
        pass
    for r in recs[20:25]:
        store.append(r)
    taken = await cp.take("g")
    assert streamer.paused
    await cp.append(taken, {"group": "g", "group_checkpoint": 1})
    assert streamer.paused                        # in doubt until the outcome is known
    for r in recs[25:]:
        store.append(r)                           # arrived after the release
    cp.restore(taken, "group checkpoint 1 aborted")
    assert not streamer.paused
    assert store.operations == 30
    while await streamer.step():
        pass
    m = await cp.checkpoint("next")
    assert m.checkpoint == 2 and m.operations == 30
    assert list(olog.records(olog.checkpoints(1)[0])) == recs


async def test_the_task_streams_by_size_and_by_time_and_stops(tmp_path: Path) -> None:
    store, olog, streamer, cp = setup(tmp_path)
    streamer.interval = 0.05
    async with trio.open_nursery() as n:
        await n.start(streamer.run)
        store.append(Write(1, 0, 0, b"small"))    # below wake_bytes: streamed by time
        with trio.fail_after(5):
            while olog.unmarked[0] < 1:
                await trio.sleep(0.01)
        for r in writes(20):                      # chunks fill: woken by size
            store.append(r)
        with trio.fail_after(5):
            while store.operations:
                await trio.sleep(0.01)
        streamer.stop()
    assert olog.unmarked[0] == 21 and store.on_chunk is None


def test_streamed_spill_ranges_give_their_space_back(tmp_path: Path) -> None:
    """With the streamer draining spilled chunks, the spill file must not keep their
    space until the next checkpoint (a small journal filled up with dead spill data)."""
    store = TempStore(tmp_path, memory_limit=8000, chunk_bytes=4000)
    for r in writes(40):
        store.append(r)
    spill = store._spill
    assert spill is not None and os.fstat(spill.fd).st_size > 20_000
    while store.operations:
        store.take_front(10_000).close()         # streamed: dropped after the append
    assert os.fstat(spill.fd).st_size == 0 and spill.size == 0
    for r in writes(10):                          # the file is reused from its start
        store.append(r)
    assert list(store.take()) == writes(10)


async def test_writers_wait_for_room_while_the_streamer_runs_not_while_it_is_paused(tmp_path: Path) -> None:
    store = TempStore(tmp_path, memory_limit=40_000, chunk_bytes=4000)
    olog = opened(tmp_path / "log", chunk_bytes=4000)
    streamer = Streamer(store, olog, wake_bytes=1 << 30, step_bytes=8000, interval=3600)
    assert streamer.high_water == 30_000
    for r in writes(35):
        store.append(r)
    assert not streamer.congested()              # not running: nothing to wait for
    async with trio.open_nursery() as n:
        await n.start(streamer.run)
        assert streamer.congested()
        with trio.fail_after(5):
            n.start_soon(streamer.step)           # (woken by size in real life)
            await streamer.room()                 # returns once a step made room
        assert not streamer.congested() and olog.unmarked[0] > 0
        for r in writes(10, 35):
            store.append(r)
        assert streamer.congested()
        await streamer.pause()
        assert not streamer.congested()           # a checkpoint holds it: spill, never wait
        streamer.resume()
        streamer.stop()
    assert store.spilled_total == 0


async def test_streamed_entries_are_synced_once_writers_stop(tmp_path: Path) -> None:
    store, olog, streamer, cp = setup(tmp_path)
    streamer.sync_interval = 3600.0               # (no clock can pass it during the step)
    streamer.sync_bytes = 1 << 30
    for r in writes(3):
        store.append(r)
    streamer._synced_at = time.monotonic()       # (as if it had just synced)
    assert await streamer.step()
    assert olog._dirty                            # written, not yet synced
    streamer._synced_at -= 3601                   # the interval has passed
    assert not await streamer.step()              # nothing to take: it syncs instead
    assert not olog._dirty and streamer._unsynced == 0


def test_the_space_estimate_counts_what_the_streamer_took(tmp_path: Path, monkeypatch) -> None:
    """check_space asks statvfs at most every 50 ms / 8 MiB and estimates in between.
    A chunk the streamer takes leaves the pending bytes but is written to the log while
    its spill copy stays allocated: the estimate must count it spent, or a fast streamer
    lets writes eat the reserve kept for the next checkpoint (which then failed with
    ENOSPC in test_full_journal_refuses_writes_before_the_original, about 1 run in 3,
    once the CRC-32 got faster).  Writes of 1 MiB, each checked and recorded, the
    streamer taking 3 MiB after every second one, against a filesystem of 40 MiB that
    holds the spill file and the log: until the first refusal, the journal can always
    hold what is pending plus the reserve."""
    spill = tmp_path / "spill"
    spill.mkdir()
    store = TempStore(spill, memory_limit=1 << 20, chunk_bytes=1 << 20)
    size = 40 << 20
    logged = {"bytes": 0}

    class Fake:
        f_frsize = 4096

        @property
        def f_bavail(self) -> int:
            return (size - store.spilled_total - logged["bytes"]) // 4096

    monkeypatch.setattr(os, "statvfs", lambda p: Fake())
    refused = False
    for i in range(64):
        try:
            store.check_space(1 << 20)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            refused = True
            break
        store.append(Write(1, i << 20, 0, bytes(1 << 20)))
        if i % 2:
            batch = store.take_front(3 << 20)
            logged["bytes"] += batch.raw_bytes
            batch.close()
        free = size - store.spilled_total - logged["bytes"]
        assert free >= store.raw_bytes + TempStore.RESERVE - 4096, (i, free, store.raw_bytes)
    assert refused
