"""The halt: a gate that holds new mutating operations while in-flight ones finish.

Every mutating handler runs inside ``async with halt.operation():`` (the
write path, which never awaits after the gate, only waits on it).  A
checkpoint runs ``async with halt.halted(timeout):``; inside it no mutating
operation is in flight and none can start, so the temporary store can be taken
out atomically.  A fresh :class:`trio.Event` is used per halt, so an operation
that waited on one halt can never be confused by the next.

Most handlers never await between entering the gate and recording their
record (the original-tree syscall is made inline), so the wait for in-flight
operations is usually empty and a halt costs a few microseconds.  The timeout
bounds the wait for operations that do await (e.g. an fsync in a worker
thread is *not* gated, but a future threaded write would be): when it expires
the gate reopens and :class:`HaltTimeout` is raised, so the checkpoint fails
and everything captured stays pending.

Cancellation: if the task inside ``halted()`` is cancelled, the gate reopens
before the cancellation propagates; waiting operations then proceed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from . import faults


class HaltTimeout(Exception):
    """In-flight mutating operations did not finish within the halt bound."""


class Halt:
    def __init__(self) -> None:
        self._inflight = 0
        self._gate: trio.Event | None = None      # set while halted; waited on by new operations
        self._drained: trio.Event | None = None   # set when in-flight reaches 0 during a halt
        self.last_duration_ns = 0
        self.count = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def is_halted(self) -> bool:
        return self._gate is not None

    async def wait_open(self) -> None:
        """Wait until no halt is in progress (for handlers that never await after the gate)."""
        while self._gate is not None:
            await self._gate.wait()

    async def enter(self) -> None:
        """Wait until no halt is in progress, then count this operation as in flight."""
        while self._gate is not None:
            await self._gate.wait()
        self._inflight += 1

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._drained is not None:
            self._drained.set()

    @asynccontextmanager
    async def operation(self) -> AsyncIterator[None]:
        await self.enter()
        try:
            if faults.armed("halt.in_operation"):     # tests: an operation that stays in flight
                await faults.hold("halt.in_operation")
            yield
        finally:
            self.leave()

    @asynccontextmanager
    async def halted(self, timeout: float) -> AsyncIterator[None]:
        """Hold new mutating operations and wait (at most ``timeout`` s) for in-flight ones."""
        if self._gate is not None:
            raise RuntimeError("halts do not nest")
        start = time.perf_counter_ns()
        gate = self._gate = trio.Event()
        try:
            if self._inflight:
                self._drained = trio.Event()
                with trio.move_on_after(timeout):
                    await self._drained.wait()
                self._drained = None
                if self._inflight:
                    raise HaltTimeout(
                        f"{self._inflight} operation(s) still in flight after {timeout:g} s")
            yield
        finally:
            self._gate = None
            self._drained = None
            gate.set()
            self.last_duration_ns = time.perf_counter_ns() - start
            self.count += 1
