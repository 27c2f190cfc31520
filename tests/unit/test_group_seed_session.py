"""A group member's session (fusejournal/member.py) with an online seed attached
(fusejournal/groupseed.py's hooks, here a recording stand-in): the seed ready for its
final round holds the member's cut, its final round runs with the gate still closed
(an operation started then waits until it is done), and the outcome reaches the seed —
``committed`` before the batch is confirmed, ``failed`` on abort, ``in_doubt`` when
the coordinator is lost.  The test is the coordinator (tests/unit/test_group_streamer.py's
Env: a real session, gate, streamer and log)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_group_streamer import Env, nums


class FakeSeed:
    """Records what the session asks of the seed; its final round starts an operation
    and looks whether it was held."""

    def __init__(self, env: Env, hold: bool = True) -> None:
        self.env = env
        self.hold = hold
        self.calls: list[Any] = []
        self.final = False
        self.seen_in_final: tuple[bool, list[int]] | None = None

    def wants_hold(self) -> bool:
        self.calls.append("wants_hold")
        return self.hold

    async def at_cut(self) -> None:
        self.calls.append("at_cut")
        done: list[int] = []

        async def op() -> None:
            await self.env.op(99)
            done.append(99)
        self.env.nursery.start_soon(op)
        await trio.sleep(0.05)
        self.seen_in_final = (self.env.halt.held, list(done))
        self.final = True

    def marker_extra(self) -> dict[str, Any]:
        return {"seeding": "first complete" if self.final else "incomplete"}

    async def committed(self, gid: int, taken: Any, info: Any) -> None:
        self.calls.append(("committed", gid, info.marker.checkpoint, taken.batch.operations))

    def failed(self) -> None:
        self.calls.append("failed")

    def in_doubt(self, taken: Any) -> None:
        self.calls.append("in_doubt")


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


async def held_cut(e: Env, seed: FakeSeed, gid: int) -> None:
    """Group checkpoint ``gid`` up to ``durable``: the epoch moves, an operation (3) makes
    the cut inline and is held behind it; the member's task runs the final round."""
    e.member.seed = seed                                  # type: ignore[assignment]
    assert (await e.start(gid))["state"] == "ready" and e.halt.hold_next
    e.move_epoch(gid)
    e.nursery.start_soon(e.add, 3)
    await trio.sleep(0.05)
    cut = e.halt.cut
    assert cut is not None and cut.by_handler and e.halt.held and nums(cut.batch) == [1, 2]
    assert e.store.operations == 0                        # 3 waits behind the cut
    e.wake()
    durable = await e.recv()
    assert durable["state"] == "durable", durable
    assert seed.seen_in_final == (True, [])               # an operation in the final round waited
    assert not e.halt.held
    assert durable["cut_ns"] - durable["seen_ns"] >= 0.05e9     # the hold is the member's halt
    assert e.marked()[-1] == [1, 2]
    marker = e.olog.checkpoints(0)[-1].marker
    assert marker.extra["seeding"] == "first complete" and marker.extra["group_checkpoint"] == gid


async def test_the_final_round_runs_behind_a_held_cut_and_completes_at_the_commit(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    e = env
    seed = FakeSeed(e)
    order: list[str] = []
    real = e.cp.confirm
    monkeypatch.setattr(e.cp, "confirm", lambda t, i: (order.append("confirm"), real(t, i)))
    await e.add(1, 2)
    await held_cut(e, seed, 1)
    await trio.sleep(0.05)
    assert sorted(nums(e.store.take())) == [3, 99]        # after the cut: the next checkpoint's
    monkeypatch.setattr(seed, "committed", _recording(seed, order))
    await e.send({"op": "commit"})
    assert (await e.recv())["ok"] is True
    await e.ended()
    assert order == ["committed", "confirm"]              # the seed first: its periods
    assert seed.calls[:2] == ["wants_hold", "at_cut"] and "failed" not in seed.calls


def _recording(seed: FakeSeed, order: list[str]) -> Any:
    async def committed(gid: int, taken: Any, info: Any) -> None:
        order.append("committed")
        seed.calls.append(("committed", gid))
    return committed


async def test_an_aborted_group_checkpoint_drops_the_final_round(env: Env) -> None:
    e = env
    seed = FakeSeed(e)
    await e.add(1, 2)
    await held_cut(e, seed, 1)
    await e.send({"op": "abort", "error": "another member failed"})
    await e.recv()
    await e.ended()
    assert seed.calls[-1] == "failed" and not any(isinstance(c, tuple) for c in seed.calls)
    assert not e.halt.held and e.member.in_doubt is None


async def test_a_lost_coordinator_leaves_the_final_round_in_doubt(env: Env) -> None:
    e = env
    seed = FakeSeed(e)
    await e.add(1, 2)
    await held_cut(e, seed, 1)
    assert e.ch is not None
    await e.ch.aclose()
    await e.ended()
    assert seed.calls[-1] == "in_doubt" and e.member.in_doubt is not None


async def test_a_seed_not_ready_holds_nothing(env: Env) -> None:
    e = env
    seed = FakeSeed(e, hold=False)
    e.member.seed = seed                                  # type: ignore[assignment]
    await e.add(1)
    assert (await e.start(1))["state"] == "ready" and not e.halt.hold_next
    e.move_epoch(1)
    await e.add(2)                                        # cuts inline and goes on
    assert e.halt.cut is not None and not e.halt.held and e.store.operations == 1
    e.wake()
    assert (await e.recv())["state"] == "durable"
    await e.send({"op": "commit"})
    await e.recv()
    await e.ended()
    assert "at_cut" not in seed.calls and e.olog.checkpoints(0)[-1].marker.extra["seeding"] == "incomplete"
