"""The acquisition: on update permission, take the temporary store out under a
halt, then have the batch compressed and appended to the ordered log.

The order of one checkpoint (docs/design.md, "The halt"):

1. update permission arrives (setxattr on the mount root);
2. the barrier: every byte a reader of the mount can already see reaches the
   temporary store.  Pages still dirty in the kernel (stores through
   ``MAP_SHARED``; ``write(2)`` with the writeback cache) and WRITE requests
   the kernel has queued but not sent are waited for: each inode with a handle
   open for writing is opened *through the mount* and fsync'ed from a worker
   thread (:func:`sync_through_mount`), while the trio thread keeps serving
   the WRITE requests this causes.  At most ``barrier_timeout`` seconds;
   then :class:`BarrierTimeout`, and nothing has been taken;
3. the streamer (fusejournal/streamer.py) is paused: the append it has in
   flight finishes first, so what it streamed precedes the tail in the log;
4. the halt closes: new mutating operations wait, in-flight ones finish;
   the whole temporary store is taken out (:meth:`TempStore.take`, O(1)):
   the *tail*, what the streamer had not yet streamed;
5. the halt opens: operations flow again (a new activity period has begun);
6. outside the halt, in a worker thread, the tail is lz4-compressed and
   appended to the ordered log after the streamed entries, with the marker
   that closes them all, then fdatasync'ed;
7. only then the setxattr returns 0, the activity periods it covers are
   deleted, the streamer resumes, and the updater is signalled.

If step 2 fails or times out, the checkpoint fails before the halt: the
temporary store is untouched.  If step 6 fails (ENOSPC, EIO, ...) the tail is
put back in front of the temporary store, and what was streamed stays in the
log, unmarked: nothing captured is lost, it all belongs to the next
checkpoint.  A group member whose appended checkpoint is aborted gets the
whole checkpoint back in front of the store (:meth:`Checkpointer.restore`:
the streamed part is read back from the log); the streamer stays paused
from the take until the outcome is known (confirm or restore).

Cancellation: the barrier's thread is abandoned (it ends by itself once its
fsync returns; it holds nothing the daemon needs).  The log append runs in a
thread that cannot be abandoned (``abandon_on_cancel=False``), so a cancelled
checkpoint still either lands whole or is restored.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from .faults import fault
from .halt import Halt, HaltTimeout
from .log import CheckpointInfo, Marker, OrderedLog
from .streamer import Streamer
from .sysc import open_fuse_inode
from .tempstore import Batch, LogRef, TempStore

log = logging.getLogger(__name__)


class BarrierTimeout(HaltTimeout):
    """The barrier before the halt did not finish in time (the setxattr gets EBUSY)."""


#: how many times the barrier by path looks a renamed file up again before it fails
BY_PATH_TRIES = 8


def sync_through_mount(mountpoint: bytes, targets: Iterable[tuple[int, bytes | None]],
                       barrier_tids: set[int], source_path: bytes | None = None,
                       resolve: Callable[[int], bytes | None] | None = None) -> int:
    """The thread side of the barrier: open each target inode through the mount and
    fsync it; return how many were synced.  Runs in a worker thread, never in the
    trio thread (which serves the WRITE requests the fsyncs wait for).

    fuse_fsync() starts writeback of the inode's dirty pages, waits until every
    page under writeback is answered (since Linux 6.16 a folio stays under
    writeback until the WRITE reply) and for the inode's queued WRITE requests
    (fuse_sync_writes), flushes the kernel's cached times (writeback cache), and
    only then sends FSYNC, which the Operations answer at once for these handles
    (recognised by this thread's id in the OPEN request).

    1. register this thread's id in ``barrier_tids``;
    2. open the mount's root (not held between checkpoints: it would keep the
       mount busy);
    3. for each (FUSE inode, original path) in ``targets``: open the inode by its
       node id (:func:`open_fuse_inode`, no path lookup); an inode the kernel has
       forgotten (ESTALE) has no pages to wait for; without CAP_DAC_READ_SEARCH
       (EPERM) open the path under the mountpoint that corresponds to the
       original's path (relative to ``source_path``) and check it is that inode.
       A name renamed or replaced meanwhile (an atomic save: write a temporary
       file, close it, rename it over the real name) is looked up again with
       ``resolve(inode)``, the original's path now, up to :data:`BY_PATH_TRIES`
       times; None from it (no handle open for writing is left: the release
       wrote the pages back; or no link) means nothing to wait for.  fsync (a
       writeback error is logged, not raised: the application gets it at its
       own fsync or close); close;
    4. unregister the thread id (also on failure).

    An OSError says which inode could not be reached; the caller fails the
    checkpoint (before the halt, nothing taken).
    """
    tid = threading.get_native_id()
    barrier_tids.add(tid)
    try:
        mfd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mdev = os.fstat(mfd).st_dev
            n = 0
            for fino, path in targets:
                fd: int | None
                try:
                    fd = open_fuse_inode(mfd, fino)
                except OSError as e:
                    if e.errno == errno.ESTALE:
                        # forgotten since its last handle closed (close wrote its pages
                        # back itself), or a generation other than the one the Operations
                        # give (0): the tests of the barrier would show the latter
                        log.warning("barrier: the kernel does not know inode %d (ESTALE)", fino)
                        continue
                    if e.errno != errno.EPERM or path is None or source_path is None:
                        raise OSError(e.errno, f"cannot open inode {fino} through the mount: "
                                               f"{e.strerror}") from None
                    fd = _open_by_path(mountpoint, mdev, fino, path, source_path, resolve)
                    if fd is None:
                        continue
                try:
                    os.fsync(fd)
                except OSError as e:
                    # a WRITE of the writeback failed (ENOSPC, EIO): what it carried is
                    # in neither the original nor the checkpoint; the application is
                    # told at its own fsync/close (errors are per open file)
                    log.warning("barrier: writeback of inode %d failed: %s", fino, e.strerror)
                finally:
                    _close_quietly(fd)
                n += 1
            return n
        finally:
            os.close(mfd)
    finally:
        barrier_tids.discard(tid)


def _close_quietly(fd: int) -> None:
    """Close a barrier fd: its FLUSH has nothing to report that matters here."""
    try:
        os.close(fd)
    except OSError as e:
        log.debug("barrier: close: %s", e)


def mount_path(mountpoint: bytes, source_path: bytes, original: bytes) -> bytes | None:
    """Where the original's ``original`` path is seen under the mount, None if it is
    not under ``source_path`` (or is a deleted file's ``... (deleted)`` name)."""
    if original.endswith(b" (deleted)"):
        return None
    src = source_path.rstrip(b"/")
    if original == src:
        return mountpoint
    if not original.startswith(src + b"/"):
        return None
    return mountpoint.rstrip(b"/") + original[len(src):]


def _open_by_path(mountpoint: bytes, mdev: int, fino: int, original: bytes,
                  source_path: bytes, resolve: Callable[[int], bytes | None] | None = None
                  ) -> int | None:
    """Open inode ``fino`` through the mount by the path its original has now
    (a daemon without CAP_DAC_READ_SEARCH); None if it has no name any more, or
    (``resolve`` gives None) no handle open for writing any more.

    1. map the original's path to the mount (none: log, return None);
    2. open it (no O_NOFOLLOW: step 3 refuses whatever a symlink leads to);
    3. if the name is gone (ENOENT) or names another inode (it was renamed,
       or another file was renamed over it) and ``resolve`` is given, ask it
       for the original's path now and go back to 1, at most
       :data:`BY_PATH_TRIES` times; then raise (ENOENT or ESTALE).
    """
    for attempt in range(1, BY_PATH_TRIES + 1):
        path = mount_path(mountpoint, source_path, original)
        if path is None:
            log.warning("barrier: inode %d has no name under the mount a daemon without "
                        "CAP_DAC_READ_SEARCH can open (%r): pages the kernel still holds for "
                        "it may reach the next checkpoint instead", fino, original)
            return None
        fault("barrier.by_path")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ENOENT or resolve is None or attempt == BY_PATH_TRIES:
                raise OSError(e.errno, f"cannot open {os.fsdecode(path)!r} (inode {fino}) "
                                       f"through the mount: {e.strerror}") from None
        else:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mdev, fino):
                return fd
            os.close(fd)
            if resolve is None or attempt == BY_PATH_TRIES:
                raise OSError(errno.ESTALE, f"{os.fsdecode(path)!r} is no longer inode {fino} "
                                            f"(renamed during the checkpoint)")
        now = resolve(fino)
        if now is None:
            log.debug("barrier: inode %d has no handle open for writing left", fino)
            return None
        original = now
    raise AssertionError("unreachable")      # (the last attempt returns or raises)


class ActivityPeriods(Protocol):
    """What the acquisition needs of the activity log (activity.py ActivityLog)."""

    def new_period(self) -> int: ...

    def confirmed(self, up_to: int) -> None: ...


class Checkpointer:
    def __init__(self, store: TempStore, halt: Halt, ordered_log: OrderedLog, *,
                 halt_timeout: float = 5.0, activity: ActivityPeriods | None = None,
                 barrier: Callable[[], Awaitable[object]] | None = None,
                 barrier_timeout: float = 30.0,
                 on_confirmed: Callable[[CheckpointInfo], None] | None = None,
                 streamer: Streamer | None = None) -> None:
        self.store = store
        self.streamer = streamer
        self.halt = halt
        self.olog = ordered_log
        self.halt_timeout = halt_timeout
        self.activity = activity
        self.barrier = barrier
        self.barrier_timeout = barrier_timeout
        self.on_confirmed = on_confirmed
        self._lock = trio.Lock()
        self.last_error: str | None = None
        self.last_halt_ns = 0
        self.last_barrier_ns = 0
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

    async def take(self, label: str, hold: Callable[[], Awaitable[None]] | None = None,
                   before_halt: Callable[[], Awaitable[None]] | None = None) -> Taken:
        """Steps 2-4: the barrier, halt, take the temporary store out, start a new
        activity period, open.

        A group member passes ``before_halt``, awaited after the barrier (nothing
        taken yet; if it raises, nothing happened), and ``hold``, awaited with
        the gate still closed, after the take; if that raises, the batch goes
        back into the store before the gate opens, and the exception
        propagates.  Both must bound themselves.
        """
        wall = time.time_ns()
        self.last_barrier_ns = 0
        if self.barrier is not None:
            await self._barrier(label)
        if before_halt is not None:
            await before_halt()
        if self.streamer is not None:
            await self.streamer.pause()       # step 3: its append in flight lands first
        try:
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
        except BaseException:
            self._resume()
            raise
        opened_ns = time.monotonic_ns()
        fault("acquisition.after_take")
        self.last_halt_ns = self.halt.last_duration_ns
        self.halt_history.append(self.last_halt_ns)
        del self.halt_history[:-1000]
        return Taken(label, wall, batch, period, closed_ns, opened_ns, paused=self.streamer is not None)

    def _resume(self, taken: Taken | None = None) -> None:
        """The streamer goes on (once per take)."""
        if self.streamer is None or (taken is not None and not taken.paused):
            return
        if taken is not None:
            taken.paused = False
        self.streamer.resume()

    async def append(self, taken: Taken, extra: dict[str, object] | None = None) -> CheckpointInfo:
        """Step 5: compress and append the batch with its marker, durably.

        On failure the batch goes back in front of the temporary store."""
        batch, label = taken.batch, taken.label
        marker = Marker(checkpoint=self.olog.last_checkpoint + 1, label=label, time_ns=taken.wall_ns,
                        operations=batch.operations, raw_bytes=batch.raw_bytes,
                        stored_bytes=0, halt_ns=self.last_halt_ns, extra=dict(extra or {}))
        try:
            info = await trio.to_thread.run_sync(self.olog.append, batch, marker)
        except BaseException as e:
            self.store.restore(batch)
            self._resume(taken)
            streamed = self.olog.unmarked[0] if self.streamer is not None else 0
            self.last_error = f"checkpoint {marker.checkpoint} ({label!r}) failed: {e}"
            log.error("%s; its %d operation(s) stay pending%s", self.last_error,
                      marker.operations + streamed,
                      f" ({streamed} of them streamed into the log, unmarked)" if streamed else "")
            raise
        taken.info = info
        return info

    def confirm(self, taken: Taken, info: CheckpointInfo) -> None:
        """Step 6: the checkpoint counts: drop the batch, close the activity period, wake the updater."""
        taken.batch.close()
        self._resume(taken)
        self.confirmed_raw_bytes += info.marker.raw_bytes
        self.confirmed_stored_bytes += info.marker.stored_bytes
        if self.activity is not None:
            self.activity.confirmed(taken.period)   # those intents are covered now
        self.last_error = None
        log.info("checkpoint %d %r: %d operation(s), %d bytes raw, %d stored, barrier %.3f ms, "
                 "halt %.3f ms", info.marker.checkpoint, taken.label, info.marker.operations,
                 info.marker.raw_bytes, info.marker.stored_bytes, self.last_barrier_ns / 1e6,
                 self.last_halt_ns / 1e6)
        if self.on_confirmed is not None:
            self.on_confirmed(info)

    def restore(self, taken: Taken, why: str) -> None:
        """A durably appended batch that will never be applied (its group checkpoint
        aborted): its records go back in front of the temporary store.

        With streaming, most of them are only in the log now: the whole
        checkpoint is put back as a :class:`LogRef`, read back from the log
        (chunk by chunk) when streamed or appended again."""
        info = taken.info
        ops = info.marker.operations if info is not None else taken.batch.operations
        if info is not None and info.marker.operations != taken.batch.operations:
            taken.batch.close()
            self.store.restore(Batch([LogRef(lambda: self.olog.records(info), info.marker.raw_bytes,
                                             info.marker.operations)],
                                     info.marker.operations, info.marker.raw_bytes,
                                     [info.marker.raw_bytes]))
        else:
            self.store.restore(taken.batch)
        self._resume(taken)
        self.last_error = why
        log.error("%s; its %d operation(s) stay pending", why, ops)


    async def _barrier(self, label: str) -> None:
        """Step 2: bounded; fails the checkpoint before the halt (nothing taken)."""
        what = f"checkpoint {self.olog.last_checkpoint + 1} ({label!r}) failed before the halt"
        barrier = self.barrier
        if barrier is None:                  # callers call it only when there is one
            return
        start = time.perf_counter_ns()
        with trio.move_on_after(self.barrier_timeout) as scope:
            try:
                await barrier()
            except OSError as e:
                self.last_error = f"{what}: the barrier: {e.strerror or e}"
                log.error("%s", self.last_error)
                raise
        if scope.cancelled_caught:
            self.last_error = (f"{what}: the barrier (the kernel writing back pages that readers "
                               f"of the mount already see) took longer than {self.barrier_timeout:g} s")
            log.error("%s", self.last_error)
            raise BarrierTimeout(self.last_error)
        self.last_barrier_ns = time.perf_counter_ns() - start


@dataclass
class Taken:
    """A batch taken out of the temporary store, not yet confirmed."""
    label: str
    wall_ns: int
    batch: Batch
    period: int
    closed_ns: int      # CLOCK_MONOTONIC just before the gate closed
    opened_ns: int      # ... just after it opened again
    paused: bool = False                # the streamer is paused for it (until confirm/restore)
    info: CheckpointInfo | None = None  # once appended
