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
from typing import Callable

import trio

from .faults import fault
from .halt import Halt
from .log import CheckpointInfo, Marker, OrderedLog
from .tempstore import TempStore

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
            wall = time.time_ns()
            if self.flush is not None:
                # writeback cache: what the application wrote before the trigger may
                # still be dirty pages in the kernel; they reach us (and the store)
                # now, while WRITE requests are still served, not during the halt
                await self.flush()
            async with self.halt.halted(self.halt_timeout):
                batch = self.store.take()
                # a new activity period starts with the new temporary store
                period = self.activity.new_period() if self.activity is not None else 0
            fault("acquisition.after_take")
            self.last_halt_ns = self.halt.last_duration_ns
            self.halt_history.append(self.last_halt_ns)
            del self.halt_history[:-1000]
            marker = Marker(checkpoint=self.log.last_checkpoint + 1, label=label, time_ns=wall,
                            operations=batch.operations, raw_bytes=batch.raw_bytes,
                            stored_bytes=0, halt_ns=self.last_halt_ns)
            try:
                info = await trio.to_thread.run_sync(self.log.append, batch, marker)
            except BaseException as e:
                self.store.restore(batch)
                self.last_error = f"checkpoint {marker.checkpoint} ({label!r}) failed: {e}"
                log.error("%s; its %d operation(s) stay pending", self.last_error, marker.operations)
                raise
            batch.close()
            self.confirmed_raw_bytes += info.marker.raw_bytes
            self.confirmed_stored_bytes += info.marker.stored_bytes
            if self.activity is not None:
                self.activity.confirmed(period)   # those intents are covered now
            self.last_error = None
            log.info("checkpoint %d %r: %d operation(s), %d bytes raw, %d stored, halt %.3f ms",
                     info.marker.checkpoint, label, info.marker.operations, info.marker.raw_bytes,
                     info.marker.stored_bytes, self.last_halt_ns / 1e6)
            if self.on_confirmed is not None:
                self.on_confirmed(info)
            return info.marker
