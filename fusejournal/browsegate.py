"""The browse gate: a browse mount never shows the shadow half-way through a batch.

The updater changes ``SHADOW/tree`` in place, one record after another; a
browse daemon (another process) reads the same tree.  They meet at one lock
file, ``SHADOW/browse.lock``, with two POSIX byte-range locks:

* byte 0, **want**: the updater holds it exclusively from the moment it wants
  to apply a batch until the batch is applied and ``applied.json`` says so;
* byte 1, **gate**: the updater holds it exclusively while it changes the tree;
  the browse daemon holds it shared while any of its requests is in flight.

and byte 2, **hold**: a long reader of the shadow (``fusejournal verify``;
:func:`holding`) holds it shared for its whole run; the updater takes it
exclusively first, waiting without bound.  Byte 3, **pin**: a reader of
retained checkpoints (``fusejournal restore``, :class:`StepReader`) holds it
shared, reading in short steps under *gate* like a browse request; pruning
history takes it exclusively (the updater skips pruning while it is held).

The updater (:meth:`UpdaterSide.updating`, in the updater's process, a child of the
journaled daemon: updaterproc.py):

0. takes *hold* (waits while a restore or verify runs; browse mounts are
   not held up meanwhile, *want* is not taken yet);
1. takes *want* (only the updater takes it exclusively, so this never waits
   for long);
2. takes *gate*, polling, at most ``bound`` seconds: the browse daemon admits
   no new request while *want* is held, so the requests in flight drain
   (each is a few system calls); if the bound expires (a browse daemon that
   is stopped or hung) it goes on anyway and logs it: readers of that
   browse mount may then see the batch half-applied;
3. applies the batch and writes ``applied.json``;
4. releases all three.

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
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from . import layout

log = logging.getLogger(__name__)

LOCK_NAME = layout.SHADOW_BROWSE_LOCK
_WANT = 0
_GATE = 1
_HOLD = 2
_PIN = 3
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


@contextlib.contextmanager
def holding(shadow_root: str | os.PathLike[str]) -> Iterator[None]:
    """Keep the shadow at the checkpoint it stands at, for a long reader (restore,
    verify): waits for a batch being applied to finish; the updater then waits
    (unbounded) until the block ends.  Browse mounts are not held up."""
    try:
        fd = _open_lock(shadow_root)
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        yield                 # a read-only shadow: no updater can change it
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH, 1, _HOLD)
        yield
    finally:
        os.close(fd)          # releases the lock


class UpdaterSide:
    """The updater's half, one per updater process (its lock file stays open)."""

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
        if not _try(fd, fcntl.LOCK_EX, _HOLD):
            log.info("the updater waits for a restore or verify reading %s", self.root)
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, _HOLD)
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
            fcntl.lockf(fd, fcntl.LOCK_UN, 3, 0)

    @contextlib.contextmanager
    def pinning(self, wait: bool) -> Iterator[bool]:
        """Keep *pin* (byte 3) exclusively, to prune history: yields False (and holds
        nothing) when a reader pins it and ``wait`` is False (see :class:`StepReader`)."""
        if self._fd is None:
            self._fd = _open_lock(self.root)
        fd = self._fd
        if wait:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, _PIN)
        elif not _try(fd, fcntl.LOCK_EX, _PIN):
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, _PIN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StepReader:
    """A long reader that does not hold the updater (``restore`` of a retained checkpoint).

    1. ``pin`` takes byte 3, *pin*, shared for the whole run: history is not pruned
       meanwhile (the updater skips its pruning while a reader pins; ``prune`` waits).
    2. Each ``step`` (a listing, an entry, a piece of a file) is admitted like a browse
       request: when *want* is free it takes *gate* shared (polling), so the updater
       never changes the tree during a step and waits at most one step; it yields
       True when ``applied.json`` changed since the previous step (the shadow moved:
       the reader reopens its view).  A staging cursor (an updater stopped half-way)
       raises OSError(EIO).
    A read-only shadow (no lock file can be made: no updater) needs no locks.
    """

    def __init__(self, shadow_root: str | os.PathLike[str]) -> None:
        self.root = Path(shadow_root)
        self._stamp: tuple[int, int] | None = None
        try:
            self._fd: int | None = _open_lock(self.root)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            self._fd = None

    def pin(self) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_SH, 1, _PIN)

    @contextlib.contextmanager
    def step(self) -> Iterator[bool]:
        fd = self._fd
        if fd is not None:
            delay = 0.0005
            while True:
                if _try(fd, fcntl.LOCK_SH, _WANT):
                    fcntl.lockf(fd, fcntl.LOCK_UN, 1, _WANT)
                    if _try(fd, fcntl.LOCK_SH, _GATE):
                        break
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
        try:
            if os.path.lexists(self.root / layout.SHADOW_STAGING / _CURSOR):
                raise OSError(errno.EIO, f"the shadow {self.root} is half-way through a batch (its "
                                         f"updater is stopped)")
            try:
                st = os.stat(self.root / layout.SHADOW_APPLIED)
                stamp = (st.st_ino, st.st_mtime_ns)
            except FileNotFoundError:
                stamp = (0, 0)
            moved = stamp != self._stamp
            self._stamp = stamp
            yield moved
        finally:
            if fd is not None:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, _GATE)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # releases every lock of this reader
            self._fd = None


class BrowseGate:
    """The browse daemon's half.  ``async with gate.request():`` around every request
    that reads the tree; raises OSError (EIO for a half-applied tree, EAGAIN when the
    members of a group do not come together within ``bound``), never FUSEError.

    ``roots`` are the shadow directories read (several for a consistency group: the
    gate is then taken on every member's shadow, and ``together()`` must say that
    the members' shadows stand at one group checkpoint before a request is admitted).
    """

    def __init__(self, roots: list[Path] | Path, together: Callable[[], bool] | None = None,
                 bound: float = 30.0) -> None:
        self.roots = [Path(r) for r in (roots if isinstance(roots, list) else [roots])]
        self.together = together
        self.bound = bound
        self._root_fds: list[int] = []
        self._fds: list[int] = []
        try:
            for r in self.roots:
                self._root_fds.append(os.open(r, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                self._fds.append(_open_lock(r))
        except BaseException:
            self.close()
            raise
        self._inflight = 0
        self._stamp: tuple[tuple[int, int], ...] | None = None
        #: bumped whenever the browse daemon sees that the shadow moved to another checkpoint
        self.generation = 0
        self._half_logged = False

    def _look(self) -> None:
        stamps = []
        for rfd in self._root_fds:
            try:
                st = os.stat(layout.SHADOW_APPLIED, dir_fd=rfd, follow_symlinks=False)
                stamps.append((st.st_ino, st.st_mtime_ns))
            except FileNotFoundError:
                stamps.append((0, 0))
        stamp = tuple(stamps)
        if stamp != self._stamp:
            self._stamp = stamp
            self.generation += 1
        for root, rfd in zip(self.roots, self._root_fds, strict=True):
            try:
                os.stat(f"{layout.SHADOW_STAGING}/{_CURSOR}", dir_fd=rfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not self._half_logged:
                log.error("the shadow %s is half-way through a batch and its updater is not running: "
                          "reads answer EIO until it resumes", root)
                self._half_logged = True
            raise OSError(errno.EIO, "the shadow is half-way through a batch")
        self._half_logged = False

    def _take(self) -> bool:
        """Every want free and every gate held shared (the gates taken are released if not)."""
        taken = []
        ok = True
        for fd in self._fds:
            if not _try(fd, fcntl.LOCK_SH, _WANT):
                ok = False
                break
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, _WANT)     # want is only tested
            if not self._inflight:
                if not _try(fd, fcntl.LOCK_SH, _GATE):
                    ok = False
                    break
                taken.append(fd)
        if not ok:
            for fd in taken:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, _GATE)
        return ok

    def _release(self) -> None:
        for fd in self._fds:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, _GATE)

    async def _admit(self) -> None:
        import trio
        delay = 0.0005
        apart: float | None = None
        while True:
            if self._take():
                if self._inflight or self.together is None or self.together():
                    return
                self._release()       # the members are between two group checkpoints
                now = time.monotonic()
                apart = now if apart is None else apart
                if now - apart > self.bound:
                    log.error("the shadows of the group's members stayed at different group "
                              "checkpoints for %.0f s (an updater stopped?)", self.bound)
                    raise OSError(errno.EAGAIN, "the group's shadows are not at one checkpoint")
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
                self._release()

    def close(self) -> None:
        for fd in self._fds + self._root_fds:
            os.close(fd)
        self._fds, self._root_fds = [], []
