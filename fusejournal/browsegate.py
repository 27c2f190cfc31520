"""The browse gate: a browse mount never shows the shadow half-way through a batch.

The updater changes ``SHADOW/tree`` in place, one record after another; a
browse daemon (another process) reads the same tree.  They meet at one lock
file, ``SHADOW/browse.lock``, with two POSIX byte-range locks:

* byte 0, **want**: the updater holds it exclusively from the moment it wants
  to apply a batch until the batch is applied and ``applied.json`` says so;
* byte 1, **gate**: the updater holds it exclusively while it changes the tree;
  the browse daemon holds it shared while any of its requests is in flight.

The updater (:func:`updating`, in a worker thread of the journaled daemon):

1. takes *want* (only the updater takes it exclusively, so this never waits
   for long);
2. takes *gate*, polling, at most ``bound`` seconds: the browse daemon admits
   no new request while *want* is held, so the requests in flight drain
   (each is a few system calls); if the bound expires (a browse daemon that
   is stopped or hung) it goes on anyway and logs it: readers of that
   browse mount may then see the batch half-applied;
3. applies the batch and writes ``applied.json``;
4. releases both.

A browse request (:meth:`BrowseGate.request`, in the browse daemon's trio
loop) is admitted only when *want* is free; the first request in flight takes
*gate* shared (without blocking: it retries after a short sleep), the last
one releases it.  On taking it, the browse daemon looks at ``applied.json``
(its inode changes at every atomic replace): a change bumps
:attr:`BrowseGate.generation`, which open files compare against.

If the process holding a lock dies, the kernel releases it.  An updater that
stops half-way through a batch (a full shadow filesystem, an error, a kill)
leaves the staging cursor: while it exists, the browse gate answers EIO
rather than show the half-applied tree.

Both sides use POSIX record locks (``fcntl.lockf``), which belong to the
process: the lock file is opened once per process and never closed while
locks are held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from . import layout

log = logging.getLogger(__name__)

LOCK_NAME = layout.SHADOW_BROWSE_LOCK
_WANT = 0
_GATE = 1
_CURSOR = "cursor"


def _open_lock(shadow_root: str | os.PathLike[str]) -> int:
    return os.open(Path(shadow_root) / LOCK_NAME,
                   os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, layout.PRIVATE_FILE_MODE)


def _try(fd: int, kind: int, byte: int) -> bool:
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB, 1, byte)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


class UpdaterSide:
    """The updater's half, one per journaled daemon (its lock file stays open)."""

    def __init__(self, shadow_root: str | os.PathLike[str], bound: float = 10.0) -> None:
        self.root = Path(shadow_root)
        self.bound = bound
        self._fd: int | None = None

    @contextlib.contextmanager
    def updating(self) -> Iterator[None]:
        """Hold the tree against browse readers for one batch (steps 1-4 above)."""
        if self._fd is None:
            self._fd = _open_lock(self.root)
        fd = self._fd
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, _WANT)
        try:
            deadline = time.monotonic() + self.bound
            delay = 0.0005
            while not _try(fd, fcntl.LOCK_EX, _GATE):
                if time.monotonic() > deadline:
                    log.warning("a browse mount of %s did not let the updater in within %.0f s: "
                                "going on; its readers may see this batch half-applied",
                                self.root, self.bound)
                    break
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 2, 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class BrowseGate:
    """The browse daemon's half.  ``async with gate.request():`` around every request
    that reads the tree; FUSEError-free: raises OSError(EIO) for a half-applied tree."""

    def __init__(self, shadow_root: str | os.PathLike[str]) -> None:
        self.root = Path(shadow_root)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fd = _open_lock(self.root)
        self._inflight = 0
        self._stamp: tuple[int, int] | None = None
        #: bumped whenever the browse daemon sees that the shadow moved to another checkpoint
        self.generation = 0
        self._half_logged = False

    def _look(self) -> None:
        try:
            st = os.stat(layout.SHADOW_APPLIED, dir_fd=self._root_fd, follow_symlinks=False)
            stamp = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            self._stamp = stamp
            self.generation += 1
        try:
            os.stat(f"{layout.SHADOW_STAGING}/{_CURSOR}", dir_fd=self._root_fd, follow_symlinks=False)
        except FileNotFoundError:
            self._half_logged = False
            return
        if not self._half_logged:
            log.error("the shadow %s is half-way through a batch and its updater is not running: "
                      "reads answer EIO until it resumes", self.root)
            self._half_logged = True
        raise OSError(errno.EIO, "the shadow is half-way through a batch")

    async def _admit(self) -> None:
        import trio
        delay = 0.0005
        while True:
            if _try(self._fd, fcntl.LOCK_SH, _WANT):
                if self._inflight or _try(self._fd, fcntl.LOCK_SH, _GATE):
                    # want is only tested: release it at once (our own gate lock stays)
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _WANT)
                    return
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _WANT)
            elif self._inflight:
                # the updater wants in: new requests wait until those in flight are done
                pass
            await trio.sleep(delay)
            delay = min(delay * 2, 0.01)

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        await self._admit()
        self._inflight += 1
        try:
            if self._inflight == 1:
                self._look()
            yield
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _GATE)

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._root_fd)
