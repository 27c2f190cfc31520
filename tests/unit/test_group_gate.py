"""The shared cut of a consistency group (fusejournal/groupgate.py), without FUSE:
the gate page, the wake FIFOs, and members' halts (GroupHalt) driven directly,
several "members" in one trio loop sharing one gate file as separate processes do."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from fusejournal.groupgate import GateError, GroupHalt, Notifier, SharedGate, Waker, make_fifo
from fusejournal.halt import HaltTimeout
from fusejournal.records import Mkdir
from fusejournal.tempstore import TempStore


def rec(k: int) -> Mkdir:
    return Mkdir(0o40755, 0, 0, 1, 1, b"d%d" % k)


def names(records: object) -> list[bytes]:
    return [r.path for r in records]          # type: ignore[attr-defined]


def nums(records: object) -> list[int]:
    return [int(p[1:]) for p in names(records)]


class Member:
    """One member: its own mapping of the gate (as its own process would have), its FIFO,
    its temporary store and its GroupHalt."""

    def __init__(self, run: Path, name: str) -> None:
        self.gate = SharedGate(run / "gate")
        self.fifo = make_fifo(run / f"w-{name}")
        self.notifier = Notifier(self.fifo)
        self.store = TempStore(None)
        self.halt = GroupHalt(self.gate, self.notifier, self.store, None)

    async def op(self, k: int) -> None:
        """A mutating handler: gate, then the record, no await in between."""
        await self.halt.enter()
        try:
            self.store.append(rec(k))
        finally:
            self.halt.leave()

    def close(self) -> None:
        os.close(self.fifo)
        self.gate.close_file()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


def test_the_gate_page_is_shared_and_checked(run: Path) -> None:
    a, b = SharedGate(run / "gate"), SharedGate(run / "gate")
    assert a.epoch() == b.epoch() == 0 and b.read().gid == 0
    ep = a.advance(7)
    assert ep.value == 1 and b.epoch() == 1 and b.read().gid == 7 and b.read().moved_ns == ep.moved_ns
    for _ in range(255):
        a.advance(8)
    assert b.epoch() == 0                               # one byte: it wraps
    a.close_file()
    b.close_file()
    os.chmod(run / "gate", 0o644)
    with pytest.raises(GateError, match="open to other users"):
        SharedGate(run / "gate")
    (run / "other").write_bytes(b"x" * 4096)
    os.chmod(run / "other", 0o600)
    with pytest.raises(GateError, match="not a fusejournal group gate"):
        SharedGate(run / "other")
    os.symlink(run / "gate", run / "link")
    with pytest.raises(GateError):
        SharedGate(run / "link")


async def test_the_first_operation_after_the_move_makes_the_cut(run: Path) -> None:
    coord, a = SharedGate(run / "gate"), Member(run, "a")
    try:
        await a.op(1)
        a.halt.expecting = 5
        await a.op(2)
        assert not a.halt.is_halted and a.halt.cut is None
        coord.advance(5)
        assert a.halt.is_halted and a.halt.moved(5)
        await a.op(3)                                   # cuts inline, then goes on
        cut = a.halt.cut
        assert cut is not None and cut.gid == 5 and cut.by_handler
        assert names(cut.batch) == [b"d1", b"d2"] and names(a.store.take()) == [b"d3"]
        assert not a.halt.is_halted and a.halt.moved(5)
        assert await a.halt.cut_for(5, 1.0) is cut      # the checkpoint task finds it made
        assert a.halt.finish() is cut and a.halt.cut is None and a.halt.expecting is None
    finally:
        a.close()
        coord.close_file()


async def test_the_checkpoint_task_cuts_when_no_operation_comes(run: Path) -> None:
    coord, a = SharedGate(run / "gate"), Member(run, "a")
    try:
        await a.op(1)
        a.halt.expecting = 2
        coord.advance(2)
        cut = await a.halt.cut_for(2, 1.0)
        assert not cut.by_handler and names(cut.batch) == [b"d1"] and a.store.operations == 0
        await a.op(2)
        assert a.store.operations == 1 and a.halt.cut is cut     # no second cut
    finally:
        a.close()
        coord.close_file()


async def test_an_epoch_nobody_expected_is_adopted_without_a_cut(run: Path) -> None:
    coord, a = SharedGate(run / "gate"), Member(run, "a")
    try:
        await a.op(1)
        coord.advance(9)                                # no session expects it
        await a.op(2)
        assert a.halt.cut is None and names(a.store.take()) == [b"d1", b"d2"]
        a.halt.expecting = 10                           # expecting 10, the epoch moved for 11
        coord.advance(11)
        await a.op(3)
        assert a.halt.cut is None and a.store.operations == 1
        # a member starting adopts the epoch as it finds it
        b = Member(run, "b")
        b.halt.expecting = 12
        assert not b.halt.is_halted and not b.halt.moved(12)
        b.close()
    finally:
        a.close()
        coord.close_file()


async def test_an_operation_in_flight_holds_the_cut_and_the_ones_after_it(run: Path) -> None:
    coord, a = SharedGate(run / "gate"), Member(run, "a")
    order: list[str] = []
    try:
        await a.op(1)
        a.halt.expecting = 3
        release = trio.Event()

        async def slow_op() -> None:                    # admitted before the move, awaits inside
            await a.halt.enter()
            try:
                await release.wait()
                a.store.append(rec(2))
                order.append("slow recorded")
            finally:
                a.halt.leave()

        async def late_op() -> None:                    # arrives after the move
            await a.op(4)
            order.append("late recorded")

        async with trio.open_nursery() as n:
            n.start_soon(slow_op)
            await trio.testing.wait_all_tasks_blocked()
            coord.advance(3)
            n.start_soon(late_op)
            await trio.testing.wait_all_tasks_blocked()
            assert a.halt.is_halted and a.halt.cut is None and order == []
            n.start_soon(lambda: a.halt.cut_for(3, 5.0))
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        cut = a.halt.cut
        assert cut is not None and order == ["slow recorded", "late recorded"]
        assert names(cut.batch) == [b"d1", b"d2"] and names(a.store.take()) == [b"d4"]
        assert cut.cut_ns >= cut.seen_ns and a.halt.last_duration_ns == cut.cut_ns - cut.seen_ns
    finally:
        a.close()
        coord.close_file()


async def test_the_checkpoint_task_alone_waits_for_the_operation_in_flight(run: Path) -> None:
    coord, a = SharedGate(run / "gate"), Member(run, "a")
    try:
        a.halt.expecting = 6
        release = trio.Event()
        async with trio.open_nursery() as n:
            async def slow_op() -> None:
                await a.halt.enter()
                try:
                    await release.wait()
                    a.store.append(rec(1))
                finally:
                    a.halt.leave()
            n.start_soon(slow_op)
            await trio.testing.wait_all_tasks_blocked()
            coord.advance(6)
            n.start_soon(a.halt.cut_for, 6, 5.0)       # no other operation comes
            await trio.testing.wait_all_tasks_blocked()
            assert a.halt.cut is None
            release.set()
        cut = a.halt.cut
        assert cut is not None and not cut.by_handler and names(cut.batch) == [b"d1"]
    finally:
        a.close()
        coord.close_file()


async def test_an_operation_stuck_in_flight_fails_the_cut_and_lets_the_others_go(run: Path) -> None:
    coord, a = SharedGate(run / "gate"), Member(run, "a")
    try:
        await a.op(1)
        a.halt.expecting = 4
        stuck = trio.Event()
        async with trio.open_nursery() as n:
            async def stuck_op() -> None:
                await a.halt.enter()
                try:
                    await stuck.wait()
                finally:
                    a.halt.leave()
            n.start_soon(stuck_op)
            await trio.testing.wait_all_tasks_blocked()
            coord.advance(4)
            n.start_soon(a.op, 2)                       # waits behind the one in flight
            await trio.testing.wait_all_tasks_blocked()
            assert a.store.operations == 1
            with pytest.raises(HaltTimeout, match="still in flight after 0.2 s"):
                await a.halt.cut_for(4, 0.2)
            await trio.testing.wait_all_tasks_blocked()
            assert a.halt.cut is None and names(a.store.take()) == [b"d1", b"d2"]   # nothing taken
            stuck.set()
        assert not a.halt.is_halted and a.halt.finish() is None
    finally:
        a.close()
        coord.close_file()


async def test_the_fifo_wakes_a_member(run: Path) -> None:
    a = Member(run, "a")
    try:
        waker = Waker([run / "w-a", run / "w-nobody"])  # a FIFO that does not exist is skipped
        assert len(waker.fds) == 1
        async with trio.open_nursery() as n:
            n.start_soon(a.notifier.run)
            ev = a.notifier.changed
            waker.wake()
            with trio.fail_after(5):
                await ev.wait()
            n.cancel_scope.cancel()
        waker.close()
    finally:
        a.close()
    # nobody reading: the write end cannot be opened (the member is gone), skipped
    os.mkfifo(run / "w-gone", 0o600)
    assert Waker([run / "w-gone"]).fds == []


async def test_dependent_operations_on_two_members_are_cut_consistently(run: Path) -> None:
    """Transfers: a debit on a, *then* a credit on b (each a completed operation).  The
    epoch moves at a random moment; each member's checkpoint task makes its cut at a random
    later moment, and operations keep flowing meanwhile.  b's batch must never hold a credit
    whose debit is not in a's batch, and no operation may be lost or taken twice."""
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    print("seed", seed)
    for gid in range(1, 41):
        coord, a, b = SharedGate(run / "gate"), Member(run, "a"), Member(run, "b")
        try:
            a.halt.expecting = b.halt.expecting = gid
            move_at = rnd.randrange(0, 40)
            task_cut = {m: rnd.randrange(move_at, 60) for m in ("a", "b")}
            done = 0
            for step in range(60):
                if step == move_at:
                    coord.advance(gid)
                for name, m in (("a", a), ("b", b)):
                    if step == task_cut[name] and m.halt.moved(gid):
                        await m.halt.cut_for(gid, 1.0)
                if rnd.random() < 0.7:
                    await a.op(step)                    # the debit ...
                    if rnd.random() < 0.9:              # ... and (mostly at once) its credit
                        await b.op(step)
                        done += 1
            for m in (a, b):
                await m.halt.cut_for(gid, 1.0)
            cut_a, cut_b = a.halt.finish(), b.halt.finish()
            assert cut_a is not None and cut_b is not None
            debits, credits = nums(cut_a.batch), nums(cut_b.batch)
            assert set(credits) <= set(debits), (seed, gid, credits, debits)
            after_a, after_b = nums(a.store.take()), nums(b.store.take())
            assert sorted(debits + after_a) == debits + after_a           # in order, none lost
            assert len(credits + after_b) == done and sorted(credits + after_b) == credits + after_b
        finally:
            a.close()
            b.close()
            coord.close_file()
