"""The streamer: the temporary store drained into the ordered log in the
background, so that a checkpoint only writes the tail and its marker.

Each step (docs/design.md, "Streaming the log"):

1. wait until the store holds at least ``wake_bytes`` (a filled chunk wakes
   it: :attr:`TempStore.on_chunk`) or ``interval`` seconds have passed with
   anything in it;
2. under the streamer's lock, unless paused: take the oldest parts of the
   store, up to ``step_bytes`` (:meth:`TempStore.take_front`, in the trio
   thread: atomic with respect to the handlers, which never await between
   their system call and their record);
3. in a worker thread: encode, lz4-compress and append them to the log as
   batch entries of the next checkpoint, not closed by a marker
   (:meth:`OrderedLog.append_unmarked`); every ``sync_bytes`` or
   ``sync_interval`` seconds, ``fdatasync`` (:meth:`OrderedLog.sync`), so that
   the checkpoint's own ``fdatasync`` has little left to write;
4. then drop the batch (frees its spill file ranges) and go on at once while
   the store still holds ``wake_bytes``; once the store is empty, what was
   streamed and not yet synced is synced after ``sync_interval``.

A checkpoint :meth:`pause` s the streamer before its halt (waiting for the
step in flight: the log then holds, in order, the streamed entries, then the
tail the acquisition takes, then the marker) and :meth:`resume` s it once the
marker is durable or the checkpoint failed.

Back-pressure: while the streamer runs and is neither paused nor failing,
a WRITE that finds ``high_water`` bytes or more of records in memory waits
(:meth:`room`, awaited by the write handler *before* the halt gate, so it is
as if the request arrived later) until a step has made room, at most
``max_wait`` seconds.  So a writer faster than the compressor is slowed to
its pace instead of the store spilling raw data that must be read back; the
spill file remains the valve while the streamer is paused (a checkpoint, a
group checkpoint in doubt) or failing, or a wait timed out.

Failure: if the append fails (ENOSPC, EIO: the log cut itself back), the
batch goes back in front of the temporary store, so nothing is lost and the
order is kept; the streamer waits (1 s, doubling up to 30 s) and tries again;
the mount keeps serving (the store spills beyond its memory limit meanwhile).
``last_error`` says why, once, in the daemon's log and in ``status``.

Cancellation: the append's thread is not abandoned (``abandon_on_cancel=False``),
so a cancelled step either landed whole or put its batch back.
"""

from __future__ import annotations

import logging
import time

import trio

from . import faults
from .log import OrderedLog
from .tempstore import TempStore

log = logging.getLogger(__name__)


class Streamer:
    def __init__(self, store: TempStore, olog: OrderedLog, *, wake_bytes: int = 4 << 20,
                 step_bytes: int = 8 << 20, interval: float = 0.5, sync_bytes: int = 32 << 20,
                 sync_interval: float = 0.5, retry_max: float = 30.0,
                 high_water: int | None = None, max_wait: float = 1.0) -> None:
        self.store = store
        self.olog = olog
        self.wake_bytes = wake_bytes
        self.step_bytes = step_bytes
        self.interval = interval
        self.sync_bytes = sync_bytes
        self.sync_interval = sync_interval
        self.retry_max = retry_max
        #: writers wait from here (default: 16 MiB, two steps: enough to keep the streamer
        #: busy; at most 3/4 of the memory limit, so spilling stays rare).  It bounds the
        #: tail a checkpoint has to write when writers outrun the streamer.
        self.high_water = high_water if high_water is not None else max(
            2 * store.chunk_bytes, min(16 << 20, store.memory_limit * 3 // 4))
        self.max_wait = max_wait
        self._running = False
        self._room = trio.Event()
        self.waits = 0                    # writes that waited for room (status, tests)
        self._lock = trio.Lock()          # held by a step (take + append); pause() waits for it
        self._paused = 0
        self._wake = trio.Event()
        self._stopping = False
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._unsynced = 0
        self._synced_at = time.monotonic()
        self.last_error: str | None = None
        self.streamed_operations = 0      # since this daemon started
        self.streamed_bytes = 0
        self.steps = 0
        self.inflight = (0, 0)            # (operations, raw bytes) of the append in flight

    # ------------------------------------------------------------ the task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stream until :meth:`stop` (or cancelled)."""
        self.store.on_chunk = self.wake
        self._running = True
        task_status.started()
        try:
            while not self._stopping:
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                while not self._stopping and await self.step():
                    if self.store.raw_bytes < self.wake_bytes:
                        break
        finally:
            self.store.on_chunk = None
            self._running = False
            self._made_room()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self._paused > 0

    async def pause(self) -> None:
        """Stop taking from the store; returns once no append is in flight."""
        async with self._lock:
            self._paused += 1
        self._made_room()                 # writers waiting for the streamer: not now

    # ------------------------------------------------------------ back-pressure

    def congested(self) -> bool:
        """Should a write wait for the streamer (cheap: asked by every WRITE)?"""
        return (self.store.memory_bytes >= self.high_water and self._running
                and not self._paused and self.last_error is None)

    async def room(self) -> None:
        """Wait while :meth:`congested`, at most ``max_wait`` seconds."""
        self.waits += 1
        with trio.move_on_after(self.max_wait):
            while self.congested():
                await self._room.wait()

    def _made_room(self) -> None:
        self._room.set()
        self._room = trio.Event()

    def resume(self) -> None:
        if self._paused > 0:
            self._paused -= 1
        if not self._paused:
            self._wake.set()

    # ------------------------------------------------------------ one step

    async def step(self) -> bool:
        """Steps 2-4 once; True if something was streamed."""
        await faults.hold("streamer.step")         # (a test's streamer that never gets to run)
        async with self._lock:
            if self._paused or time.monotonic() < self._retry_at:
                return False
            if not self.store.operations:
                if self._unsynced and time.monotonic() - self._synced_at >= self.sync_interval:
                    await self._idle_sync()        # writers stopped: leave the marker little to do
                return False
            batch = self.store.take_front(self.step_bytes)
            self.inflight = (batch.operations, batch.raw_bytes)
            sync = False
            try:
                ops, raw = await trio.to_thread.run_sync(self.olog.append_unmarked, batch)
                self._unsynced += raw
                sync = (self._unsynced >= self.sync_bytes
                        or time.monotonic() - self._synced_at >= self.sync_interval)
                if sync:
                    await trio.to_thread.run_sync(self.olog.sync)
            except BaseException as e:
                self.inflight = (0, 0)
                if not sync:                       # the append failed: nothing of it is in the log
                    self.store.restore(batch)
                else:                              # appended, only the sync failed: retried later
                    batch.close()
                if not isinstance(e, Exception):
                    raise
                self._failed(e, sync)
                self._made_room()
                return False
            self.inflight = (0, 0)
            batch.close()
            if sync:
                self._unsynced = 0
                self._synced_at = time.monotonic()
            self.streamed_operations += ops
            self.streamed_bytes += raw
            self.steps += 1
            self._made_room()
            if self.last_error is not None:
                log.info("streaming into the ordered log works again")
                self.last_error = None
                self._retry_delay = 0.0
            return True

    async def _idle_sync(self) -> None:
        try:
            await trio.to_thread.run_sync(self.olog.sync)
        except Exception as e:
            self._failed(e, True)
            return
        self._unsynced = 0
        self._synced_at = time.monotonic()

    def _failed(self, e: Exception, synced: bool) -> None:
        self._retry_delay = min(self.retry_max, max(1.0, 2 * self._retry_delay))
        self._retry_at = time.monotonic() + self._retry_delay
        what = "syncing the streamed entries" if synced else "streaming into the ordered log"
        msg = f"{what} failed: {e}; the records stay pending, retried in {self._retry_delay:g} s"
        if self.last_error is None:
            log.error("%s", msg)
        self.last_error = msg

    def pending(self) -> tuple[int, int]:
        """(operations, raw bytes) captured but not yet in a checkpoint that are not in
        the temporary store: streamed into the log unmarked, or being streamed."""
        ops, raw = self.olog.unmarked
        return ops + self.inflight[0], raw + self.inflight[1]

    def status(self) -> dict[str, object]:
        ops, raw = self.olog.unmarked
        return {"stream_error": self.last_error, "streamed_unmarked_operations": ops,
                "streamed_unmarked_bytes": raw, "stream_paused": self.paused,
                "streamed_bytes": self.streamed_bytes, "spilled_total_bytes": self.store.spilled_total,
                "stream_waits": self.waits}
