"""The acquisition: on update permission, take the temporary store out under a
halt, then have the batch compressed and appended to the ordered log.

The order of one checkpoint (docs/design.md, "The halt"):

1. update permission arrives (setxattr on the mount root);
2. with the kernel's writeback cache on, dirty pages are flushed to the
   filesystem first (``syncfs`` of the mount, from a worker thread, while
   WRITE requests are still served); then the halt closes: new mutating
   operations wait, in-flight ones finish;
3. the whole temporary store is taken out (:meth:`TempStore.take`, O(1));
4. the halt opens: operations flow again (a new activity period has begun);
5. outside the halt, in a worker thread, the batch is lz4-compressed and
   appended to the ordered log with its marker, then fdatasync'ed;
6. only then the setxattr returns 0, the activity periods it covers are
   deleted, and the updater is signalled.

If step 5 fails (ENOSPC, EIO, ...) the batch is put back in front of the
temporary store: nothing captured is lost, it belongs to the next checkpoint.

Cancellation: the log append runs in a thread that cannot be abandoned
(``abandon_on_cancel=False``), so a cancelled checkpoint still either lands
whole or is restored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from .faults import fault
from .halt import Halt
from .log import CheckpointInfo, Marker, OrderedLog
from .tempstore import Batch, TempStore

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, store: TempStore, halt: Halt, ordered_log: OrderedLog, *,
                 halt_timeout: float = 5.0, activity=None, flush=None,
                 on_confirmed: Callable[[CheckpointInfo], None] | None = None) -> None:
        self.store = store
        self.halt = halt
        self.log = ordered_log
        self.halt_timeout = halt_timeout
        self.activity = activity
        self.flush = flush
        self.on_confirmed = on_confirmed
        self._lock = trio.Lock()
        self.last_error: str | None = None
        self.last_halt_ns = 0
        self.halt_history: list[int] = []
        self.confirmed_raw_bytes = 0      # since this daemon started
        self.confirmed_stored_bytes = 0

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def checkpoint(self, label: str) -> Marker:
        """Take a checkpoint; return its marker once it is durable in the ordered log."""
        async with self._lock:        # one checkpoint at a time, in order
            taken = await self.take(label)
            info = await self.append(taken)
            self.confirm(taken, info)
            return info.marker

    # The phases of :meth:`checkpoint`, also driven one by one by a consistency
    # group member (fusejournal/member.py), which holds :attr:`lock` throughout.

    @property
    def lock(self) -> trio.Lock:
        return self._lock

    async def take(self, label: str, hold: Callable[[], Awaitable[None]] | None = None) -> "Taken":
        """Steps 2-4: halt, take the temporary store out, start a new activity period, open.

        ``hold`` (a group member) is awaited with the gate still closed, after
        the take; if it raises, the batch goes back into the store before the
        gate opens, and the exception propagates.  It must bound itself.
        """
        wall = time.time_ns()
        if self.flush is not None:
            # writeback cache: what the application wrote before the trigger may
            # still be dirty pages in the kernel; they reach us (and the store)
            # now, while WRITE requests are still served, not during the halt
            await self.flush()
        closed_ns = time.monotonic_ns()
        async with self.halt.halted(self.halt_timeout):
            batch = self.store.take()
            # a new activity period starts with the new temporary store
            period = self.activity.new_period() if self.activity is not None else 0
            if hold is not None:
                try:
                    await hold()
                except BaseException:
                    self.store.restore(batch)
                    raise
        opened_ns = time.monotonic_ns()
        fault("acquisition.after_take")
        self.last_halt_ns = self.halt.last_duration_ns
        self.halt_history.append(self.last_halt_ns)
        del self.halt_history[:-1000]
        return Taken(label, wall, batch, period, closed_ns, opened_ns)

    async def append(self, taken: "Taken", extra: dict | None = None) -> CheckpointInfo:
        """Step 5: compress and append the batch with its marker, durably.

        On failure the batch goes back in front of the temporary store."""
        batch, label = taken.batch, taken.label
        marker = Marker(checkpoint=self.log.last_checkpoint + 1, label=label, time_ns=taken.wall_ns,
                        operations=batch.operations, raw_bytes=batch.raw_bytes,
                        stored_bytes=0, halt_ns=self.last_halt_ns, extra=dict(extra or {}))
        try:
            return await trio.to_thread.run_sync(self.log.append, batch, marker)
        except BaseException as e:
            self.store.restore(batch)
            self.last_error = f"checkpoint {marker.checkpoint} ({label!r}) failed: {e}"
            log.error("%s; its %d operation(s) stay pending", self.last_error, marker.operations)
            raise

    def confirm(self, taken: "Taken", info: CheckpointInfo) -> None:
        """Step 6: the checkpoint counts: drop the batch, close the activity period, wake the updater."""
        taken.batch.close()
        self.confirmed_raw_bytes += info.marker.raw_bytes
        self.confirmed_stored_bytes += info.marker.stored_bytes
        if self.activity is not None:
            self.activity.confirmed(taken.period)   # those intents are covered now
        self.last_error = None
        log.info("checkpoint %d %r: %d operation(s), %d bytes raw, %d stored, halt %.3f ms",
                 info.marker.checkpoint, taken.label, info.marker.operations, info.marker.raw_bytes,
                 info.marker.stored_bytes, self.last_halt_ns / 1e6)
        if self.on_confirmed is not None:
            self.on_confirmed(info)

    def restore(self, taken: "Taken", why: str) -> None:
        """A durably appended batch that will never be applied (its group checkpoint
        aborted): its records go back in front of the temporary store."""
        ops = taken.batch.operations
        self.store.restore(taken.batch)
        self.last_error = why
        log.error("%s; its %d operation(s) stay pending", why, ops)


@dataclass
class Taken:
    """A batch taken out of the temporary store, not yet confirmed."""
    label: str
    wall_ns: int
    batch: Batch
    period: int
    closed_ns: int      # CLOCK_MONOTONIC just before the gate closed
    opened_ns: int      # ... just after it opened again
