"""The shared cut of a consistency group: one byte every member's handlers check.

A group halt used to be three message rounds between processes (``halt`` →
``taken`` → ``release`` through the coordinator), each a process wake-up, all
with every member's gate closed (docs/performance-groups.md: 2.3 ms p50 on an
idle machine, 4-14 ms on a busy one, against 0.02 ms for one tree).  Now no
member waits for another process while it holds operations:

* ``GROUPJOURNAL/run/gate`` is a small file the coordinator and every member's
  daemon ``mmap`` shared (:class:`SharedGate`).  It holds the *epoch*, one
  byte, and beside it the group checkpoint id G the epoch was last moved for
  and when (CLOCK_MONOTONIC, one clock for every process on the machine).
* The coordinator, once every member has run its barrier and answered
  ``ready``, moves the epoch (:meth:`SharedGate.advance`): one store of one
  byte, seen by every member at the same instant.  This is the trigger's cut.
  Then it writes a byte to every member's FIFO (``run/w-NAME``,
  :class:`Waker`) so that a member with no traffic wakes up too.
* Every mutating handler of a member compares the epoch with the one its
  member last cut at (:class:`GroupHalt`: ``enter`` / ``wait_open``, the
  single tree's gate points).  Equal: it goes on, as with an open gate.
  Different: the member's cut is due *before this operation*: if no operation
  is in flight, the handler makes it at once, inline (:meth:`GroupHalt.cut_now`:
  the temporary store taken out, O(1), and a new activity period — exactly a
  single tree's acquisition), and goes on; if one is in flight, it waits until
  the last one leaves (the single tree's drain), bounded by the member's
  checkpoint task (the halt bound T).  The member's checkpoint task, woken by
  its FIFO, makes the cut itself if no operation came first.

Why the cut is consistent across the members without holding any member for
another: every mutating operation reads the one epoch byte after it started
and records its effect before its reply, with no ``await`` in between
(docs/design.md, "The halt"), and a member's cut happens in its own trio
thread, between two operations.  Reads of one memory location are ordered
(cache coherence), so for an operation X that completed before an operation Y
started — on any members — Y reads an epoch at least as new as X's.  X in G+1
(it saw the new epoch) therefore implies Y in G+1; equivalently Y in G implies X
in G: a write to A followed by a dependent write to B can never be in G
without the write to A.  An operation completed before the trigger read the
old epoch and was recorded before its member's cut: it is in G.  One that
started after the setxattr returned reads the new epoch: not in G.

So the halt of a member is only what a single tree's is: from the moment the
member first needed its cut (a handler found the epoch moved, or its task was
woken) to the end of its take.  The halt of the group is the longest of them.
The *spread* of the cuts (from the epoch's move to the last member's cut)
holds nobody: a member whose cut comes late had no operation meanwhile; it is
recorded beside the halt in the commit line.

The epoch moves only while a member's checkpoint task expects it (its session
holds :attr:`GroupHalt.expecting`); an epoch a member does not expect (a
coordinator that moved it and died, a member that started meanwhile) is
adopted without a cut: that checkpoint cannot be committed without this
member's batch, and its records simply stay pending.  A cut whose batch is not
appended (the checkpoint aborted, the coordinator lost) goes back in front of
the temporary store (:meth:`TempStore.restore`), so operations admitted since
stay after it, in order.  Nothing ever stays closed: there is no closed state
another process has to lift.

A member seeding online (fusejournal/groupseed.py) may ask, before it answers
``ready``, for its next cut to be *held* (:attr:`GroupHalt.hold_next`): the
cut is made exactly as above (by an operation or by the task), but the gate
stays closed behind it — later operations of this member wait, as in a single
tree's halt — until the member's own checkpoint task has run the seed's final
round and calls :meth:`GroupHalt.release` (or the session ends: :meth:`finish`
releases it).  The cut itself is unchanged, so the consistency argument above
is too: holding only delays this member's operations *after* its cut; no other
member waits for it.  The hold is the member's halt (``cut_ns`` moves to the
release), bounded by the final round's own deadline (the group's halt bound).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from .faults import fault
from .halt import Halt, HaltTimeout
from .tempstore import Batch, TempStore

log = logging.getLogger("fusejournal.groupgate")

PAGE = 4096
_EPOCH = 0                              # the byte every handler reads
_HEADER = struct.Struct("<QQ")          # at 8: the group checkpoint id, the epoch's move (monotonic ns)
_MAGIC_OFF = PAGE - 8
_MAGIC = b"fjgate02"


class GateError(Exception):
    """The gate file or a FIFO is unusable (the message is one line)."""


def _check_private(st: os.stat_result, path: Path, kind: str) -> None:
    if st.st_uid != os.geteuid():
        raise GateError(f"{path} belongs to uid {st.st_uid}, not to this user")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise GateError(f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o})")
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        raise GateError(f"{path} is not a regular file")
    if kind == "fifo" and not stat.S_ISFIFO(st.st_mode):
        raise GateError(f"{path} is not a FIFO")


@dataclass(frozen=True)
class Epoch:
    value: int          # the byte
    gid: int            # the group checkpoint it was moved for
    moved_ns: int       # CLOCK_MONOTONIC of the move


class SharedGate:
    """The mapped gate page of one group (``run/gate``), opened or created.

    Writers (the coordinator's :meth:`advance`) and readers of the whole header
    (:meth:`read`) hold ``flock`` on it; a handler reads only the epoch byte."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise GateError(f"cannot open the group gate {path}: {e.strerror}") from None
        try:
            _check_private(os.fstat(fd), path, "file")
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < PAGE:       # new (or torn at its creation)
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, PAGE)
                    os.pwrite(fd, _MAGIC, _MAGIC_OFF)
                elif os.pread(fd, 8, _MAGIC_OFF) != _MAGIC:
                    raise GateError(f"{path} is not a fusejournal group gate")
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self.mm = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def close_file(self) -> None:
        self.mm.close()
        os.close(self._fd)

    def epoch(self) -> int:
        return self.mm[_EPOCH]

    def read(self) -> Epoch:
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            gid, moved = _HEADER.unpack_from(self.mm, 8)
            return Epoch(self.mm[_EPOCH], gid, moved)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def advance(self, gid: int) -> Epoch:
        """The coordinator's cut of group checkpoint ``gid``: the header, then the
        epoch byte (the one store every member sees)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            moved = time.monotonic_ns()
            _HEADER.pack_into(self.mm, 8, gid, moved)
            value = (self.mm[_EPOCH] + 1) & 0xFF
            self.mm[_EPOCH] = value
            return Epoch(value, gid, moved)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


# -------------------------------------------------------------------- FIFOs: waking a process


def make_fifo(path: Path) -> int:
    """Create (or reuse) a member's wake FIFO; return a non-blocking fd reading it
    (opened read-write, so it never sees end-of-file)."""
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            os.unlink(path)
            os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _check_private(os.fstat(fd), path, "fifo")
    except BaseException:
        os.close(fd)
        raise
    return fd


class Waker:
    """Write ends of the members' FIFOs, opened before the epoch moves."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.fds: list[int] = []
        for p in paths:
            try:
                fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as e:
                # ENXIO: nobody reads it (that member's daemon is gone: its connection
                # fails the checkpoint); ENOENT: never started
                log.debug("wake FIFO %s: %s", p, e.strerror)
                continue
            self.fds.append(fd)

    def wake(self) -> None:
        for fd in self.fds:
            try:
                os.write(fd, b"\0")
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EPIPE):   # full: it wakes anyway
                    log.warning("waking a member: %s", e.strerror)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class Notifier:
    """The read end of this member's FIFO, turned into trio wake-ups.

    :meth:`run` (a background task) waits for the FIFO to be readable, drains it
    and sets :attr:`changed`, replacing it by a fresh event; a waiter takes the
    current event, checks its condition, then waits on that event.  :meth:`poke`
    does the same from inside the process."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.changed = trio.Event()

    def poke(self) -> None:
        ev, self.changed = self.changed, trio.Event()
        ev.set()

    def drain(self) -> None:
        while True:
            try:
                if not os.read(self.fd, 4096):
                    return
            except BlockingIOError:
                return

    async def run(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            self.drain()
            self.poke()


# -------------------------------------------------------------------- the member's halt


class _Activity(Protocol):
    def new_period(self) -> int: ...


@dataclass
class Cut:
    """One member's cut of group checkpoint ``gid``: its batch, not yet appended."""
    gid: int
    batch: Batch
    period: int
    seen_ns: int        # CLOCK_MONOTONIC: the member first needed the cut
    cut_ns: int         # ... the cut was made (the operations it held went on)
    by_handler: bool    # made inline by the operation that found the epoch moved


class GroupHalt(Halt):
    """A member's halt: the gate is the group's epoch, not a local event.

    The single tree's :class:`Halt` is unchanged; :meth:`Halt.halted` is not
    used by a member (its checkpoint task calls :meth:`cut_for`)."""

    def __init__(self, gate: SharedGate, notifier: Notifier, store: TempStore,
                 activity: _Activity | None) -> None:
        super().__init__()
        self.gate = gate
        self._mm = gate.mm
        self.notifier = notifier
        self.store = store
        self.activity = activity
        self._cut_at = gate.epoch()     # a member starting adopts the epoch as it is
        self.expecting: int | None = None   # the gid of the checkpoint task's session
        self.cut: Cut | None = None
        self._seen_ns = 0
        self._settled = trio.Event()    # set when a due cut is made or given up
        # a member seeding online (groupseed.py): its session asks for the next cut to be
        # *held* (the gate stays closed after the take until :meth:`release`), so that the
        # seed's final round reads an original that does not move
        self.hold_next = False
        self._held = False
        self._held_value = 0

    # the gate points (fs.py) ------------------------------------------------

    @property
    def is_halted(self) -> bool:
        return self._mm[_EPOCH] != self._cut_at

    async def wait_open(self) -> None:
        while self._mm[_EPOCH] != self._cut_at:
            await self._due()

    async def enter(self) -> None:
        while self._mm[_EPOCH] != self._cut_at:
            await self._due()
        self._inflight += 1

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._mm[_EPOCH] != self._cut_at:
            self._settle()          # a cut is due: whoever waits for it retries it now

    @asynccontextmanager
    async def halted(self, timeout: float) -> AsyncIterator[None]:
        raise RuntimeError("a group member is not halted alone: its cut is the group's (cut_for)")
        yield  # (unreachable: makes this an async generator)

    async def _due(self) -> None:
        """The epoch moved: this member's cut is due before the calling operation.
        No await unless an operation is in flight (or the cut is held)."""
        if self._held:              # cut already, held until the session releases it
            await self._settled.wait()
            return
        if self.expecting is None:
            self.adopt("the epoch moved for a checkpoint this member is not part of")
            return
        if self._inflight == 0:
            self.cut_now(by_handler=True)
            return
        if not self._seen_ns:
            self._seen_ns = time.monotonic_ns()
            self.notifier.poke()    # the checkpoint task bounds this wait
        await self._settled.wait()

    def _settle(self) -> None:
        ev, self._settled = self._settled, trio.Event()
        ev.set()

    # the member's checkpoint task -------------------------------------------

    def cut_now(self, by_handler: bool = False) -> None:
        """Make the cut the moved epoch asks for (no operation in flight): take the
        temporary store out (O(1)) and start a new activity period."""
        value = self._mm[_EPOCH]
        now = time.monotonic_ns()
        seen = self._seen_ns or now
        fault("group.member_cut")       # tests: the member's process stalls at its cut
        ep = self.gate.read()
        if ep.value != value or ep.gid != self.expecting or self.cut is not None:
            self.adopt(f"the epoch moved for group checkpoint {ep.gid}, not the one expected "
                       f"({self.expecting})", value)
            return
        batch = self.store.take()
        period = self.activity.new_period() if self.activity is not None else 0
        done = time.monotonic_ns()
        if self.hold_next:          # the gate stays closed until release()
            self._held, self._held_value = True, value
        else:
            self._cut_at = value
        self.cut = Cut(ep.gid, batch, period, seen, done, by_handler)
        self._seen_ns = 0
        self.last_duration_ns = done - seen
        self.count += 1
        self._settle()

    @property
    def held(self) -> bool:
        """A cut is made and the gate is still closed behind it (:attr:`hold_next`)."""
        return self._held

    def release(self) -> None:
        """End a held cut: the operations waiting go on.  The cut's ``cut_ns`` (the end
        of this member's halt) becomes now.  No-op if nothing is held."""
        if not self._held:
            return
        self._held = False
        self._cut_at = self._held_value
        now = time.monotonic_ns()
        if self.cut is not None:
            self.cut.cut_ns = now
            self.last_duration_ns = now - self.cut.seen_ns
        self._settle()

    def adopt(self, why: str, value: int | None = None) -> None:
        """Go on at the current epoch without a cut (nothing taken: the records stay);
        a held cut is released."""
        if value is None:
            value = self._mm[_EPOCH]
        if value != self._cut_at and not self._held:
            log.info("group gate: %s: adopted without a cut", why)
        self._held = False
        self._cut_at = value
        self._seen_ns = 0
        self._settle()

    def moved(self, gid: int) -> bool:
        """Has the epoch moved for ``gid`` (the coordinator's cut)?"""
        if self._mm[_EPOCH] == self._cut_at:
            return self.cut is not None and self.cut.gid == gid
        return self.gate.read().gid == gid

    async def cut_for(self, gid: int, timeout: float) -> Cut:
        """The checkpoint task, once the epoch moved for ``gid``: the cut, made by an
        operation already or now; waiting at most ``timeout`` for operations in
        flight (then the cut is given up, the operations waiting go on, and
        :class:`HaltTimeout` is raised: nothing was taken)."""
        if self.cut is None and self._mm[_EPOCH] != self._cut_at:
            if self._inflight == 0:
                self.cut_now()
            else:
                if not self._seen_ns:
                    self._seen_ns = time.monotonic_ns()
                with trio.move_on_after(timeout):
                    while self.cut is None and self._mm[_EPOCH] != self._cut_at:
                        if self._inflight == 0:
                            self.cut_now()
                            break
                        await self._settled.wait()
                if self.cut is None:
                    n = self._inflight
                    self.adopt(f"{n} operation(s) still in flight after {timeout:g} s")
                    raise HaltTimeout(f"{n} operation(s) still in flight after {timeout:g} s")
        if self.cut is None or self.cut.gid != gid:
            raise HaltTimeout(f"no cut for group checkpoint {gid}")
        return self.cut

    def finish(self) -> Cut | None:
        """The session ends: stop expecting, release a held cut; return a cut nobody
        consumed (to put back)."""
        self.expecting = None
        self.hold_next = False
        if self._held:
            self.release()
        cut, self.cut = self.cut, None
        if self._mm[_EPOCH] != self._cut_at:
            self.adopt("the session ended")
        return cut
