"""fusejournal/tasktree.py: every task of a trio run, with the chain of coroutines it
is suspended in (what ``kill -USR1`` logs for a daemon that stopped answering)."""

from __future__ import annotations

import types

import trio

from fusejournal.tasktree import task_tree


async def _waits_for(event: trio.Event) -> None:
    await _inner(event)


async def _inner(event: trio.Event) -> None:
    await event.wait()


@types.coroutine
def _generator_based(coro):            # like fuseloop._drive: drives a coroutine by hand
    y = coro.send(None)
    while True:
        try:
            y = coro.send((yield y))
        except StopIteration as done:
            return done.value


async def _via_generator(event: trio.Event) -> None:
    await _generator_based(_inner(event))


async def test_each_task_and_what_it_awaits() -> None:
    event = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_waits_for, event, name="alpha")
        nursery.start_soon(_via_generator, event, name="beta")
        await trio.sleep(0.01)               # both suspended
        lines = task_tree()
        event.set()
    by_name = {line.strip().split(":", 1)[0]: line for line in lines}
    alpha, beta = by_name["alpha"], by_name["beta"]
    # children are indented under the test's task, which shows as the one running
    assert alpha.startswith("  ") and beta.startswith("  ")
    assert any("running (this dump)" in line for line in lines)
    # the chain, outermost first, down to trio's own wait
    assert alpha.index("_waits_for (test_tasktree.py:") < alpha.index("_inner (test_tasktree.py:")
    assert "wait (" in alpha.split("_inner", 1)[1]
    assert beta.index("_via_generator") < beta.index("_generator_based") < beta.index("_inner")
    assert not lines[0].startswith(" ")       # the root task first, not indented


async def test_an_async_with_is_followed_into_its_context_manager() -> None:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def gate(event: trio.Event):
        await _inner(event)
        yield

    async def enters(event: trio.Event) -> None:
        async with gate(event):
            pass

    event = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(enters, event, name="gamma")
        await trio.sleep(0.01)
        lines = task_tree()
        event.set()
    gamma = next(line for line in lines if line.strip().startswith("gamma:"))
    assert gamma.index("enters (") < gamma.index("gate (") < gamma.index("_inner ("), gamma
