"""A consistency group member's session (fusejournal/member.py) with the streamer
(fusejournal/streamer.py) running: the streamer is paused before the member reports
``ready`` (the epoch can move only after that) and resumes with the outcome, so the
records of operations admitted after the cut never reach the log before the cut's
marker (promise 2), and the streamer is never left paused by a session that took
nothing or was decided.

No FUSE: a real GroupMember (its group file, gate page, FIFO and socket in a scratch
group journal), a real TempStore, OrderedLog, Streamer and Checkpointer; the
coordinator is the test, on the other end of an in-memory channel, moving the epoch
with its own mapping of the gate page and waking the member through its FIFO, as
fusejournal/coordinator.py does."""

from __future__ import annotations

import errno
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from fusejournal import faults
from fusejournal import member as member_mod
from fusejournal.acquisition import Checkpointer
from fusejournal.coordinator import Channel
from fusejournal.group import CommitLog
from fusejournal.groupgate import SharedGate, Waker
from fusejournal.log import OrderedLog
from fusejournal.member import GroupMember
from fusejournal.records import Mkdir
from fusejournal.streamer import Streamer
from fusejournal.tempstore import TempStore


def rec(k: int) -> Mkdir:
    return Mkdir(0o40755, 0, 0, 1, 1, b"d%d" % k)


def nums(records: object) -> list[int]:
    return [int(r.path[1:]) for r in records]      # type: ignore[attr-defined]


class Env:
    """One member (its session served on an in-memory channel) and the coordinator's side."""

    def __init__(self, tmp: Path, nursery: trio.Nursery) -> None:
        (tmp / "src").mkdir()
        (tmp / "gj" / "run").mkdir(parents=True, mode=0o700)
        gfile = tmp / "g.toml"
        gfile.write_text('[group]\nname = "g"\njournal = "gj"\nhalt_timeout = 0.2\n\n'
                         '[[member]]\nname = "a"\nsource = "src"\n')
        self.member = GroupMember(gfile, "a")
        self.store = TempStore(None)
        self.halt = self.member.make_halt(self.store, None)
        self.olog = OrderedLog(tmp / "log")
        self.olog.open()
        # it streams only when a test makes it step (no timer, no chunk wake-up in between)
        self.streamer = Streamer(self.store, self.olog, wake_bytes=1 << 30, interval=3600.0)
        self.cp = Checkpointer(self.store, self.halt, self.olog, streamer=self.streamer)
        self.member.attach(self.cp, SimpleNamespace(checkpoint=None, checkpoint_id=None))
        self.coord = SharedGate(self.member.group.gate_path)
        self.nursery = nursery
        self.ch: Channel | None = None
        self.session_done = trio.Event()
        self.session_error: Exception | None = None

    async def op(self, k: int) -> None:
        """A mutating handler: the gate, then its record, no await in between."""
        await self.halt.enter()
        try:
            self.store.append(rec(k))
        finally:
            self.halt.leave()

    async def add(self, *ks: int) -> None:
        for k in ks:
            await self.op(k)

    async def stream(self) -> bool:
        """One step of the streamer, as if it woke now; True if it streamed anything."""
        return await self.streamer.step()

    async def streamed(self) -> bool:
        """Is everything in the store streamed after one more step (the streamer's task,
        woken by its resume, may have done it already)?"""
        await self.streamer.step()
        return self.store.operations == 0

    async def start(self, gid: int) -> dict[str, Any]:
        """The coordinator asks for group checkpoint ``gid``; the member's answer (``ready``)."""
        mine, theirs = trio.testing.memory_stream_pair()
        self.ch = Channel(theirs)
        self.session_done = trio.Event()

        async def serve() -> None:
            try:
                await self.member.session(Channel(mine))
            except Exception as e:            # as serve_unix: the daemon goes on
                self.session_error = e
            finally:
                self.session_done.set()

        self.nursery.start_soon(serve)
        await self.ch.send({"op": "take", "id": gid, "label": f"g{gid}"})
        return await self.ch.recv()

    def move_epoch(self, gid: int) -> None:
        """The coordinator's cut: the epoch moves (the member is not woken yet)."""
        self.coord.advance(gid)

    def wake(self) -> None:
        w = Waker([self.member.group.wake_path("a")])
        w.wake()
        w.close()

    async def recv(self) -> dict[str, Any]:
        assert self.ch is not None
        with trio.fail_after(10):
            return await self.ch.recv()

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.ch is not None
        await self.ch.send(msg)

    async def ended(self) -> None:
        with trio.fail_after(10):
            await self.session_done.wait()

    def marked(self) -> list[int]:
        """The records of every checkpoint closed by a marker, in log order, by checkpoint."""
        return [nums(self.olog.records(info)) for info in self.olog.checkpoints(0)]

    def close(self) -> None:
        self.member.close()
        self.coord.close_file()
        self.olog.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with trio.open_nursery() as nursery:
        e = Env(tmp_path, nursery)
        nursery.start_soon(e.member.notifier.run)
        nursery.start_soon(e.streamer.run)
        try:
            yield e
        finally:
            e.streamer.stop()
            nursery.cancel_scope.cancel()
    e.close()


def not_paused(e: Env) -> None:
    assert not e.streamer.paused and e.streamer.status()["stream_paused"] is False


async def test_records_after_the_cut_never_reach_the_log_before_its_marker(env: Env) -> None:
    """The cut is made inline by the first operation after the epoch moved; operations
    go on, the streamer wakes before the member's task appends the batch: checkpoint 1
    must hold exactly the records from before the cut (streamed ones, then the tail),
    and those after it come later (promise 2: none that started after it returned)."""
    e = env
    await e.add(1, 2, 3)
    assert await e.stream()                          # streamed ahead: entries of checkpoint 1
    await e.add(4, 5)
    assert (await e.start(1))["state"] == "ready"
    e.move_epoch(1)
    await e.add(6)                                   # cuts inline (4, 5), then goes on
    assert e.halt.cut is not None and e.halt.cut.by_handler and nums(e.halt.cut.batch) == [4, 5]
    await e.add(7)
    # the streamer runs between the cut and the append (paused: it takes nothing; else
    # it would append 6 and 7 ahead of the tail, and the marker would cover them)
    await e.stream()
    e.wake()                                         # the member's task: append, durable
    durable = await e.recv()
    assert durable["state"] == "durable" and durable["by_handler"] is True
    assert e.marked() == [[1, 2, 3, 4, 5]]
    assert e.streamer.paused and e.streamer.status()["stream_paused"] is True   # until the outcome
    await e.send({"op": "commit"})
    assert (await e.recv())["ok"] is True
    await e.ended()
    not_paused(e)
    assert e.member.last_group == 1
    # what came after the cut is streamed now, after the marker: the next checkpoint's
    assert await e.streamed() and e.olog.unmarked[0] == 2
    assert e.marked() == [[1, 2, 3, 4, 5]]
    # ... and the next group checkpoint closes it, cut by its own task this time
    await e.add(8)
    assert (await e.start(2))["state"] == "ready"
    e.move_epoch(2)
    e.wake()
    assert (await e.recv())["state"] == "durable"
    await e.send({"op": "commit"})
    assert (await e.recv())["ok"] is True
    await e.ended()
    assert e.marked() == [[1, 2, 3, 4, 5], [6, 7, 8]]
    not_paused(e)


async def test_records_after_a_cut_by_the_task_wait_for_the_next_checkpoint(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the cut made by the member's task (no operation came first), and
    operations arriving after it and the streamer running while the batch is being
    appended (held at the start of the append's thread until the streamer has run)."""
    e = env
    appending, go = threading.Event(), threading.Event()
    real = e.olog.append

    def held(*a: Any, **kw: Any) -> Any:
        appending.set()
        go.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(e.olog, "append", held)
    await e.add(1, 2)
    assert (await e.start(1))["state"] == "ready"
    e.move_epoch(1)
    e.wake()
    with trio.fail_after(10):
        while not appending.is_set():                # cut by the task, its append begun
            await trio.sleep(0.001)
    assert e.halt.cut is not None and not e.halt.cut.by_handler
    await e.add(3, 4)
    try:
        await e.stream()
    finally:
        go.set()
    assert (await e.recv())["state"] == "durable"
    assert e.marked() == [[1, 2]]
    await e.send({"op": "commit"})
    await e.recv()
    await e.ended()
    not_paused(e)
    assert await e.streamed() and e.olog.unmarked[0] == 2


async def test_an_aborted_checkpoint_puts_everything_back_and_resumes_the_streamer(env: Env) -> None:
    """Durable, then aborted by the coordinator: the whole checkpoint (streamed part
    included) goes back in front of the store, ahead of what came after the cut; the
    streamer goes on, and the next checkpoint holds all of it, in order."""
    e = env
    await e.add(1, 2)
    assert await e.stream()
    await e.add(3)
    assert (await e.start(1))["state"] == "ready"
    e.move_epoch(1)
    await e.add(4)                                   # cut inline: tail [3]; 4 after the cut
    await e.stream()
    e.wake()
    assert (await e.recv())["state"] == "durable"
    assert e.marked() == [[1, 2, 3]]
    await e.send({"op": "abort", "error": "member b failed"})
    assert (await e.recv())["ok"] is True
    await e.ended()
    not_paused(e)
    assert "aborted" in (e.member.last_error or "")
    assert await e.streamed()                        # streams again, the restored batch first
    assert e.olog.unmarked[0] == 4
    assert (await e.start(2))["state"] == "ready"
    e.move_epoch(2)
    e.wake()
    assert (await e.recv())["state"] == "durable"
    await e.send({"op": "commit"})
    await e.recv()
    await e.ended()
    assert e.marked() == [[1, 2, 3], [1, 2, 3, 4]]   # checkpoint 1 stays in the log, never applied
    not_paused(e)


async def test_a_session_aborted_before_the_cut_resumes_the_streamer(env: Env) -> None:
    e = env
    await e.add(1)
    assert (await e.start(1))["state"] == "ready"
    assert e.streamer.paused
    await e.send({"op": "abort", "error": "member b failed its barrier"})
    await e.ended()
    not_paused(e)
    assert "abandoned before the cut" in (e.member.last_error or "")
    await e.add(2)
    assert await e.streamed() and e.olog.unmarked[0] == 2


async def test_a_coordinator_gone_before_the_cut_leaves_the_streamer_running(env: Env) -> None:
    e = env
    await e.add(1)
    assert (await e.start(1))["state"] == "ready"
    assert e.ch is not None
    await e.ch.stream.aclose()
    await e.ended()
    not_paused(e)
    await e.add(2)
    assert await e.streamed() and e.olog.unmarked[0] == 2


async def test_an_epoch_that_never_moves_resumes_the_streamer(env: Env,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    e = env
    monkeypatch.setattr(member_mod, "HALT_ORDER_TIMEOUT", 0.05)
    await e.add(1)
    assert (await e.start(1))["state"] == "ready"
    await e.ended()
    not_paused(e)
    assert "did not move" in (e.member.last_error or "")
    assert await e.streamed()


async def test_a_cut_that_times_out_resumes_the_streamer(env: Env) -> None:
    """An operation still in flight past the halt bound: EBUSY, nothing taken."""
    e = env
    await e.add(1)
    assert (await e.start(1))["state"] == "ready"
    await e.halt.enter()                             # an operation in flight, admitted before the move
    try:
        e.move_epoch(1)
        e.wake()
        reply = await e.recv()
        assert reply["ok"] is False and reply["errno"] == errno.EBUSY
        await e.ended()
        not_paused(e)
        e.store.append(rec(2))
    finally:
        e.halt.leave()
    assert e.marked() == []
    assert await e.streamed() and e.olog.unmarked[0] == 2


async def test_a_failed_append_resumes_the_streamer(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    e = env
    await e.add(1)
    assert await e.stream()
    await e.add(2)

    def full(*a: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(e.olog, "append", full)
    assert (await e.start(1))["state"] == "ready"
    e.move_epoch(1)
    await e.add(3)
    e.wake()
    reply = await e.recv()
    assert reply["ok"] is False and reply["errno"] == errno.ENOSPC
    await e.ended()
    not_paused(e)
    monkeypatch.undo()
    # the tail back in front of the store, the streamed part left in the log, unmarked:
    # the streamer goes on, and the next checkpoint holds all of it, in order
    assert await e.streamed() and e.olog.unmarked[0] == 3
    assert (await e.start(2))["state"] == "ready"
    e.move_epoch(2)
    e.wake()
    assert (await e.recv())["state"] == "durable"
    await e.send({"op": "commit"})
    await e.recv()
    await e.ended()
    assert e.marked() == [[1, 2, 3]]
    not_paused(e)


async def in_doubt(e: Env) -> int:
    """Group checkpoint 1 made durable on this member, then the coordinator gone: in doubt.
    Records 1, 2 before the cut (1 streamed), 3 after it; returns the local checkpoint."""
    await e.add(1)
    assert await e.stream()
    await e.add(2)
    assert (await e.start(1))["state"] == "ready"
    e.move_epoch(1)
    await e.add(3)
    e.wake()
    durable = await e.recv()
    assert durable["state"] == "durable"
    assert e.ch is not None
    await e.ch.stream.aclose()
    await e.ended()
    assert e.member.in_doubt is not None and e.marked() == [[1, 2]]
    # (docs/design.md, "What fails, and what is kept": a batch in doubt keeps the
    # streamer paused until it is resolved; the store spills meanwhile)
    assert e.streamer.paused and not await e.stream() and e.store.operations == 1
    return int(durable["local"])


@pytest.mark.parametrize("committed", [True, False])
async def test_a_batch_in_doubt_resolved_at_unmount_resumes_the_streamer(env: Env, committed: bool) -> None:
    e = env
    local = await in_doubt(e)
    if committed:
        CommitLog(e.member.group.commits_path).append(
            {"commit": 1, "label": "g1", "time_ns": 1, "members": {"a": local}}, durable=False)
    e.member.shutdown()
    assert e.member.in_doubt is None
    not_paused(e)
    assert e.member.last_group == (1 if committed else 0)
    assert await e.streamed()
    assert e.olog.unmarked[0] == (1 if committed else 3)      # aborted: 1, 2 come again, then 3


async def test_a_batch_in_doubt_resolved_by_the_next_session_resumes_the_streamer(env: Env) -> None:
    """Resolved (not committed) at the next take; that session pauses the streamer again,
    so the next checkpoint holds the restored batch and what came after, nothing later."""
    e = env
    await in_doubt(e)
    assert (await e.start(2))["state"] == "ready"
    assert e.member.in_doubt is None
    e.move_epoch(2)
    await e.add(4)                                   # cut inline: 1, 2, 3; 4 after it
    await e.stream()
    e.wake()
    assert (await e.recv())["state"] == "durable"
    await e.send({"op": "commit"})
    await e.recv()
    await e.ended()
    assert e.marked() == [[1, 2], [1, 2, 3]]
    not_paused(e)


async def test_a_failure_right_after_the_cut_resumes_the_streamer(env: Env,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An error at the fault point just after the cut (``group.member_taken:1:error``):
    the session fails, the cut goes back in front of the store, and the streamer is not
    left paused."""
    e = env
    monkeypatch.setattr(faults, "_name", "group.member_taken")
    monkeypatch.setattr(faults, "_action", "error")
    monkeypatch.setattr(faults, "_remaining", 1)
    await e.add(1)
    assert (await e.start(1))["state"] == "ready"
    e.move_epoch(1)
    await e.add(2)
    e.wake()
    await e.ended()
    assert "injected fault at group.member_taken" in repr(e.session_error)   # (in a nursery's group)
    not_paused(e)
    assert e.marked() == []
    assert await e.streamed() and e.olog.unmarked[0] == 2
    assert (await e.start(2))["state"] == "ready"
    e.move_epoch(2)
    e.wake()
    assert (await e.recv())["state"] == "durable"
    await e.send({"op": "commit"})
    await e.recv()
    await e.ended()
    assert e.marked() == [[1, 2]]                    # in order: the cut, then what came after


async def test_a_failure_after_a_handler_cut_puts_it_back_before_the_streamer_goes_on(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch moved and an operation made the cut; then the member's task fails
    before it appends (``group.member_before_halt:1:error``) and answers the
    coordinator: the cut must be back in front of the store before the streamer,
    resumed, can take what came after it."""
    e = env
    monkeypatch.setattr(faults, "_name", "group.member_before_halt")
    monkeypatch.setattr(faults, "_action", "error")
    monkeypatch.setattr(faults, "_remaining", 1)
    await e.add(1)
    assert (await e.start(1))["state"] == "ready"
    e.move_epoch(1)
    await e.add(2)                                   # cut inline: [1]; 2 after it
    assert e.halt.cut is not None and e.halt.cut.by_handler
    e.wake()
    reply = await e.recv()
    assert reply["ok"] is False and reply["errno"] == errno.EIO
    await e.ended()
    not_paused(e)
    assert await e.streamed() and e.olog.unmarked[0] == 2
    assert (await e.start(2))["state"] == "ready"
    e.move_epoch(2)
    e.wake()
    assert (await e.recv())["state"] == "durable"
    await e.send({"op": "commit"})
    await e.recv()
    await e.ended()
    assert e.marked() == [[1, 2]]                    # in order: the cut, then what came after
