"""The updater's background task: applies each confirmed checkpoint to the
shadow, in the daemon, beside the FUSE session (like S3QL's CommitTask).

``run()`` loops (it is started by the session's nursery):

1. Run the updater (a worker thread) up to the last checkpoint; prune the
   segments the shadow has fully applied.
2. A full shadow filesystem (NoSpace) is a state to wait out, not an error:
   ``state()`` says "waiting for space", and the pass is retried on every new
   checkpoint (``wake()``) and by itself after 0.5 s, doubling up to 8 s; the
   staging cursor makes it resume exactly where it stopped.
3. Any other error stops the updater (``state()``: "stopped: ..."); it is
   retried on each new checkpoint only.
4. Then it waits for ``wake()`` (or the retry delay) and goes back to 1.

``stop()`` ends the loop after the pass that is running, if any.
Cancellation (unmount) may interrupt the wait, never a running pass (the
worker thread is not abandoned).
"""

from __future__ import annotations

import contextlib
import logging
import os

import trio

from .log import OrderedLog
from .shadow import Shadow
from .updater import NoSpace, Updater

log = logging.getLogger("fusejournal")


class UpdateTask:
    """The background loop around one Updater, and what status reports of it."""

    def __init__(self, updater: Updater, olog: OrderedLog, shadow: Shadow, applied: int) -> None:
        self.updater = updater
        self.olog = olog
        self.shadow = shadow
        self.applied = applied               # the checkpoint the shadow stands at
        self.error: str | None = None        # the updater stopped on this
        self.waiting: str | None = None      # a full shadow filesystem: waited out
        self.busy = False                    # a pass is running or about to run
        self._wake = trio.Event()
        self._stopped = False

    def wake(self) -> None:
        """A new checkpoint is durable: run a pass (status: catching up, not stopped)."""
        self.busy = True
        self._wake.set()

    def stop(self) -> None:
        """End ``run()`` once the running pass, if any, is over."""
        self._stopped = True
        self._wake.set()

    def state(self) -> str:
        """One line for status: idle, applying, waiting for space, or stopped (an error)."""
        if self.busy:
            return (f"applying checkpoints {self.applied + 1}..{self.olog.last_checkpoint}"
                    if self.olog.last_checkpoint > self.applied else "applying")
        if self.waiting:
            return self.waiting
        if self.error:
            return f"stopped: {self.error}"
        return "idle"

    def _shadow_space(self) -> str:
        try:
            st = os.statvfs(self.shadow.root)
            dev = os.stat(self.shadow.root).st_dev
        except OSError:
            return f"the shadow's filesystem ({self.shadow.root})"
        return (f"the shadow's filesystem ({self.shadow.root}, device {os.major(dev)}:{os.minor(dev)}): "
                f"{st.f_bavail * st.f_frsize} bytes, {st.f_favail} inodes free")

    async def run(self) -> None:
        """Apply each confirmed checkpoint to the shadow (the steps above)."""
        delay: float | None = None
        while not self._stopped:
            self._wake = trio.Event()          # a fresh event per pass: no wake-up is lost
            self.busy = True
            try:
                self.applied = await trio.to_thread.run_sync(self.updater.run_once)
                if self.waiting:
                    log.info("updater: space is back; caught up to checkpoint %d", self.applied)
                self.error = self.waiting = None
                delay = None
            except NoSpace as e:
                with contextlib.suppress(Exception):
                    self.applied = self.shadow.applied     # earlier batches may have landed
                if not self.waiting:
                    log.warning("updater: %s; waiting for space", e)
                self.waiting = f"waiting for space on {self._shadow_space()} ({e})"
                self.error = None
                delay = 0.5 if delay is None else min(delay * 2, 8.0)
            except Exception as e:             # CorruptLog, OSError ...: reported by status
                self.error = str(e)
                self.waiting = None
                delay = None
                log.error("updater: %s", e)
            try:
                # the shadow holds it now: segments it has fully applied are not needed
                # (this also frees space when the journal shares the shadow's filesystem)
                await trio.to_thread.run_sync(self.olog.prune, self.applied)
            except Exception as e:
                log.error("pruning the ordered log: %s", e)
            self.busy = self._wake.is_set()     # woken meanwhile: another pass follows
            if self._stopped:
                break
            if delay is None:
                await self._wake.wait()
            else:
                with trio.move_on_after(delay):
                    await self._wake.wait()
