"""A held cut (fusejournal/groupgate.py, ``GroupHalt.hold_next``): a group member seeding
online keeps its gate closed after its cut until its final seed round has run
(fusejournal/groupseed.py), whoever made the cut (an operation or the checkpoint task).
Without FUSE: GroupHalts driven directly, as in tests/unit/test_group_gate.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_group_gate import Member, nums, rec

from fusejournal.groupgate import SharedGate


@pytest.fixture
def run(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


async def test_a_held_cut_made_by_an_operation_keeps_the_member_waiting(run: Path) -> None:
    coord, a, b = SharedGate(run / "gate"), Member(run, "a"), Member(run, "b")
    try:
        await a.op(1)
        a.halt.expecting = b.halt.expecting = 3
        a.halt.hold_next = True
        coord.advance(3)
        done: list[int] = []

        async def op(k: int) -> None:
            await a.op(k)
            done.append(k)
        async with trio.open_nursery() as n:
            n.start_soon(op, 2)                 # makes a's cut, then waits behind it
            n.start_soon(op, 3)
            await trio.sleep(0.05)
            assert done == [] and a.halt.held and a.halt.is_halted
            cut = a.halt.cut
            assert cut is not None and cut.by_handler and nums(cut.batch) == [1]
            await b.op(10)                      # b is not held for a: it cuts and goes on
            assert b.halt.cut is not None and not b.halt.is_halted
            assert await a.halt.cut_for(3, 1.0) is cut      # the task finds it made, still held
            assert a.halt.held and done == []
            seen = cut.cut_ns
            a.halt.release()
        assert sorted(done) == [2, 3] and not a.halt.held and not a.halt.is_halted
        assert sorted(nums(a.store.take())) == [2, 3]       # after the cut, not in it
        assert cut.cut_ns > seen and a.halt.last_duration_ns == cut.cut_ns - cut.seen_ns
        assert a.halt.finish() is cut and not a.halt.hold_next
    finally:
        a.close()
        b.close()
        coord.close_file()


async def test_a_held_cut_made_by_the_task_and_released_by_the_session_end(run: Path) -> None:
    coord, a = SharedGate(run / "gate"), Member(run, "a")
    try:
        await a.op(1)
        a.halt.expecting = 4
        a.halt.hold_next = True
        coord.advance(4)
        cut = await a.halt.cut_for(4, 1.0)
        assert not cut.by_handler and a.halt.held and nums(cut.batch) == [1]
        got: list[int] = []

        async def op() -> None:
            await a.op(2)
            got.append(2)
        async with trio.open_nursery() as n:
            n.start_soon(op)
            await trio.sleep(0.05)
            assert got == []                    # held behind the cut
            assert a.halt.finish() is cut       # the session ends (e.g. it failed): released
        assert got == [2] and not a.halt.held and nums(a.store.take()) == [2]
        # the next checkpoint is not held unless asked again
        a.halt.expecting = 5
        coord.advance(5)
        await a.op(3)
        assert a.halt.cut is not None and not a.halt.held and a.store.operations == 1
        a.halt.finish()
    finally:
        a.close()
        coord.close_file()


async def test_a_held_cut_waits_for_an_operation_in_flight_first(run: Path) -> None:
    """An operation in flight when the epoch moves is in the cut; the hold starts after it."""
    coord, a = SharedGate(run / "gate"), Member(run, "a")
    try:
        a.halt.expecting = 6
        a.halt.hold_next = True
        release_inflight = trio.Event()
        order: list[str] = []

        async def slow() -> None:
            await a.halt.enter()
            try:
                await release_inflight.wait()
                a.store.append(rec(1))
                order.append("in flight")
            finally:
                a.halt.leave()

        async def later() -> None:
            await a.op(2)
            order.append("later")
        async with trio.open_nursery() as n:
            n.start_soon(slow)
            await trio.sleep(0.01)
            coord.advance(6)
            n.start_soon(later)
            await trio.sleep(0.05)
            assert order == [] and a.halt.cut is None
            release_inflight.set()
            cut = await a.halt.cut_for(6, 1.0)
            await trio.sleep(0.05)
            assert order == ["in flight"] and a.halt.held and nums(cut.batch) == [1]
            a.halt.release()
        assert order == ["in flight", "later"] and nums(a.store.take()) == [2]
        a.halt.finish()
    finally:
        a.close()
        coord.close_file()
