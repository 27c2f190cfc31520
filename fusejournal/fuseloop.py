"""pyfuse3's wait for the next request, without a trio Lock and a second task per request.

pyfuse3's request loop (``_session_loop``, internal.pxi) waits for each request
in ``_wait_fuse_readable``: it takes a ``trio.Lock`` (so that one task at a time
waits on the FUSE fd), waits until the fd is readable, releases the lock, and
the loop then reads and dispatches one request; when no other task is waiting
it starts one, so that a handler that blocks does not hold up the requests
behind it.  An uncontended ``trio.Lock.acquire`` is a trip through trio's
scheduler, paid per request: py-spy put 15 % of the daemon's FUSE loop in the
lock's ``__aenter__``/``__aexit__`` while a program created small files
(docs/performance-analysis.md, "pyfuse3's wait for a request").  And every
extra pass of trio's scheduler releases the GIL in ``epoll_wait``, where the
log's compressor threads can take it for up to the switch interval.

:func:`install` replaces that function (looked up by name in pyfuse3's module
dict at every call, so the compiled loop calls the replacement) with
:func:`_wait_readable`, and wraps the Operations' handlers on the instance
(:func:`_watched`).  The contract kept:

1. if the session is ending (:func:`terminate`, or the fd reported an error),
   answer False: the task leaves the loop;
2. at most one task waits on the fd: the others park until they are needed;
3. the waiting task, if no request is waiting, polls the fd for a short while
   when no other task is runnable (the spin window, below), then sleeps in
   trio's ``wait_readable`` until the fd is readable; it answers True with no
   checkpoint between that and the loop's read, and wakes no one: the request
   it is about to read is most often answered without the handler ever
   blocking, and the same task is back to wait right after;
4. a request found waiting (at once, or while spinning) is read without a pass
   of trio's scheduler, unless the last pass was more than ``YIELD_NS``
   (200 µs) ago: then it goes through one (``trio.lowlevel.checkpoint``).  The
   other tasks (timers, worker threads' results, a checkpoint's own handler)
   wait at most that plus one handler's run for their turn;
5. a handler that blocks (its coroutine yields to trio for the first time:
   a thread, the halt's gate, the streamer's back-pressure, a fault's pause)
   first wakes one parked task to wait on the fd in its place (:func:`standby`),
   so the requests behind it are served meanwhile, as pyfuse3's spare task did;
6. a waiter woken by ``notify_closing`` (pyfuse3.terminate) or that sees an
   error on the fd (the mount went away: the read that follows gets ENODEV and
   ends that task) marks the session ended and wakes every parked task, which
   leave by 1.

Why 3 and 4.  A program that waits for each answer (a ``write(2)`` is a
GETXATTR then a WRITE; a commit a WRITE then an FSYNC; creating a file five
requests or more) sends its next request a few microseconds after the reply.
If the daemon has gone to sleep in ``epoll_wait`` meanwhile, its CPU idles,
and waking an idle virtual CPU is a trip through the hypervisor (a guest's
``HLT`` exits to the host; this machine's kernel runs with
``haltpoll.guest_halt_poll_ns=0``, no polling in the guest's idle loop).  And
a pass of trio's scheduler (``epoll_ctl`` and ``epoll_wait``, its run queue)
costs more than many a handler.  Measured with fio, 4 KiB writes through fresh
mounts, alternating: 25.7/27.3 MB/s before, 38.6/38.8 with the spin,
44.2–44.8 with a found request taking one plain checkpoint instead of
``wait_readable``, 55.6–58.0 without a scheduler pass for most (pyfuse3's
reference passthrough: 47–50).

The spin window adapts, as the kernel's cpuidle-haltpoll governor's does
(:class:`_Spin`): a wait that found its request within the window keeps it; a
wait that slept and whose whole idle time was longer than the limit halves it
(requests far apart: do not burn the CPU for them); a wait that slept but
whose idle time was within the limit doubles it again, up to the limit.  The
limit is ``FUSEJOURNAL_SPIN_US`` (microseconds, default 50, at most 10,000;
0: never spin; ``mount`` refuses another value in one line).  Its cost is
bounded: at most one window of CPU per wait that sleeps, and the spinning
thread calls ``sched_yield`` between polls, so it only takes a CPU that nothing
else waits for (on two cores, the application and the log's thread had been
kept waiting by it: a client that computed 20 µs between its writes found the
daemon spinning its whole window 250–380 times in 2,000 writes, and then
almost never).  Nothing else in trio waits for it: the spin does not begin,
and stops, as soon as trio has other work (:func:`_other_work`: a runnable
task, a worker thread's result queued, a deadline passed).  ``poll`` releases
the GIL, so the log's and the updater's threads run meanwhile.  ``mount`` and
``browse`` refuse a bad limit; :func:`install` falls back to the default
with a warning for any other caller.

What the replacement does not keep: pyfuse3 counts its waiting tasks
(``active_readers``, not reachable from Python) to start a new worker task
when none is waiting and to end extra idle ones.  The count stays 0, so the
loop starts a new worker after each request until it has ``max_tasks`` and
ends none; they park here.  Each worker keeps libfuse's receive buffer
(``max_write`` plus a page: 1 MiB) once it has read a request, so :func:`standby`
wakes the task parked last (:class:`_Parked`): the few that take turns are the
only ones whose buffers are ever written to.  (Woken in FIFO order, the
workers took turns through all 99, and a 10 GiB burst of 1 MiB writes touched
every buffer: 175 MiB of RSS.)  Up to 99 requests may be in flight at once, as
before.

Cancellation: a parked or waiting task that is cancelled raises Cancelled (as
the lock and ``wait_readable`` did); a waiter that leaves by an exception
wakes one parked task to wait in its place.

:func:`install` checks that the pyfuse3 it patches has the function it
replaces and that the session's fd can be told; otherwise it leaves pyfuse3's
own loop in place and says so in the log.  ``FUSEJOURNAL_FUSE_LOOP=stock``
keeps pyfuse3's own (to measure the difference).
"""

from __future__ import annotations

import inspect
import logging
import os
import select
import stat
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import pyfuse3
import trio

from .checks import env_microseconds

log = logging.getLogger("fusejournal")

_STOCK_NAME = "_wait_fuse_readable"
#: a request found waiting is read without a pass of trio's scheduler unless the
#: last pass was longer ago than this (step 4)
YIELD_NS = 200_000


class _Parked:
    """Parked worker tasks, woken last parked first: the few tasks that take turns
    keep the only libfuse receive buffers that are ever written to (1 MiB each), the
    others' stay untouched (a FIFO, trio's ParkingLot, cycles through all of them:
    a 10 GiB burst of 1 MiB writes then touched every one, 175 MiB of RSS)."""

    def __init__(self) -> None:
        self._tasks: list[trio.lowlevel.Task] = []

    def __len__(self) -> int:
        return len(self._tasks)

    async def park(self) -> None:
        task = trio.lowlevel.current_task()
        self._tasks.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._tasks.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED
        await trio.lowlevel.wait_task_rescheduled(abort)

    def unpark(self) -> None:
        if self._tasks:
            trio.lowlevel.reschedule(self._tasks.pop())

    def unpark_all(self) -> None:
        while self._tasks:
            trio.lowlevel.reschedule(self._tasks.pop())


class _Spin:
    """The adaptive spin window (microseconds of ``poll(0)`` before sleeping, step 3).

    ``limit_ns`` 0: never spins.  :meth:`slept` is told how long a wait that
    did not find its request within the window was idle in all."""

    def __init__(self, limit_ns: int) -> None:
        self.limit_ns = limit_ns
        self.window_ns = limit_ns
        self.hits = 0                # requests found while spinning
        self.misses = 0              # spins that ended in sleeping

    def slept(self, idle_ns: int) -> None:
        if idle_ns > self.limit_ns:              # far apart: spin less
            self.window_ns //= 2
            if self.window_ns < 1000:
                self.window_ns = 0
        elif idle_ns > self.window_ns:           # would have been caught: spin more
            self.window_ns = min(self.limit_ns, max(2 * self.window_ns, self.limit_ns // 8))


def spin_limit_ns(value: str | None) -> int:
    """``FUSEJOURNAL_SPIN_US`` in nanoseconds: a number of microseconds from 0 to
    10,000; ValueError with a one-line reason otherwise (None: the default, 50)."""
    return env_microseconds("FUSEJOURNAL_SPIN_US", value, 50, 10_000)


class _Loop:
    """State of the replacement for one FUSE session (one per process)."""

    def __init__(self, fd: int, spin_ns: int = 0) -> None:
        self.fd = fd
        self.spin = _Spin(spin_ns)
        self.yielded_ns = 0          # when a waiter last went through trio's scheduler
        self.skips = 0               # requests read without a pass of trio's scheduler
        self.busy = False            # a task is waiting on the fd
        self.exited = False          # the session is ending
        self.lot = _Parked()
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        self.waits = 0               # waits served (tests: the replacement is in use)
        self.standbys = 0            # tasks woken because a handler blocked

    def end(self) -> None:
        self.exited = True
        self.lot.unpark_all()


_loop: _Loop | None = None
_stock: Callable[[], Awaitable[bool]] | None = None
_ERROR = select.POLLERR | select.POLLHUP | select.POLLNVAL


async def _wait_readable() -> bool:
    loop = _loop
    assert loop is not None
    while loop.busy and not loop.exited:                 # 2.
        await loop.lot.park()
    if loop.exited:                                      # 1.
        return False
    loop.busy = True
    loop.waits += 1
    events, idle_from = _ready(loop)
    try:
        if not events:
            await trio.lowlevel.wait_readable(loop.fd)   # 3.
            events = _poll_events(loop)
            loop.yielded_ns = time.perf_counter_ns()
        elif time.perf_counter_ns() - loop.yielded_ns < YIELD_NS:
            loop.skips += 1                              # 4.
        else:
            await trio.lowlevel.checkpoint()
            loop.yielded_ns = time.perf_counter_ns()
    except trio.ClosedResourceError:                     # 6.
        loop.busy = False
        loop.end()
        return False
    except BaseException:
        loop.busy = False
        loop.lot.unpark()                                # someone else waits instead
        raise
    loop.busy = False
    if idle_from:
        loop.spin.slept(loop.yielded_ns - idle_from)
    if events & _ERROR:                                  # 6.
        loop.end()
    return True


def _poll_events(loop: _Loop) -> int:
    """The fd's poll events now (0: no request waiting)."""
    for _, events in loop.poller.poll(0):
        return events
    return 0


def _ready(loop: _Loop) -> tuple[int, int]:
    """The fd's poll events, after spinning for them if there were none (step 3):
    ``(events, 0)``, or ``(0, t)`` if the waiter is to sleep after all, ``t`` the
    time its wait began (0 when trio has other work: its scheduler is not going
    to sleep, so the wait does not spin, or stops spinning, and is not timed)."""
    events = _poll_events(loop)
    spin = loop.spin
    if events or not spin.limit_ns or _other_work():
        return events, 0
    start = time.perf_counter_ns()
    if spin.window_ns:
        deadline = start + spin.window_ns
        while not (events := _poll_events(loop)):
            if time.perf_counter_ns() > deadline:
                spin.misses += 1
                return 0, start
            if _other_work():
                return 0, 0
            os.sched_yield()
        spin.hits += 1
        return events, 0
    return 0, start


def _other_work() -> bool:
    """Has trio something else to do now: a runnable task, a worker thread's
    result (or another ``run_sync_soon`` callback) queued, a deadline passed?"""
    st = trio.lowlevel.current_statistics()
    return bool(st.tasks_runnable or st.run_sync_soon_queue_size or st.seconds_to_next_deadline <= 0)


def standby() -> None:
    """A handler is about to block: have a parked task wait on the fd meanwhile (5.)."""
    loop = _loop
    if loop is not None and not loop.busy and not loop.exited:
        loop.standbys += 1
        loop.lot.unpark()


@types.coroutine
def _drive(coro: Coroutine[Any, Any, Any]) -> Generator[Any, Any, Any]:
    """Run a handler's coroutine as ``await coro`` would, calling :func:`standby`
    when it first yields to trio (5.); a handler that never blocks costs one
    ``send``."""
    try:
        y = coro.send(None)
    except StopIteration as done:
        return done.value
    standby()
    while True:
        try:
            sent = yield y
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:       # trio resumes a task with an error: pass it in
            try:
                y = coro.throw(e)
            except StopIteration as done:
                return done.value
        else:
            try:
                y = coro.send(sent)
            except StopIteration as done:
                return done.value


def _watched(method: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    def handler(*args: Any, **kwargs: Any) -> Any:
        return _drive(method(*args, **kwargs))
    handler.__name__ = getattr(method, "__name__", "handler")
    return handler


def _handler_names() -> list[str]:
    return [n for n in dir(pyfuse3.Operations) if not n.startswith("_")
            and inspect.iscoroutinefunction(getattr(pyfuse3.Operations, n))]


def _fuse_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                fds.add(int(name))
        except OSError:
            pass
    return fds


def before_init() -> set[int]:
    """The /dev/fuse fds open before ``pyfuse3.init`` (to find the session's after it)."""
    return _fuse_fds()


def install(before: set[int], ops: pyfuse3.Operations) -> bool:
    """Put :func:`_wait_readable` in place of pyfuse3's wait, for the session
    ``pyfuse3.init`` just opened with ``ops``, and wrap ``ops``' handlers (on the
    instance); False (and pyfuse3's own loop) if it cannot."""
    global _loop, _stock
    if os.environ.get("FUSEJOURNAL_FUSE_LOOP") == "stock":
        return False
    stock = getattr(pyfuse3, _STOCK_NAME, None)
    if stock is None:
        log.info("pyfuse3 %s has no %s: its own request loop is used",
                 getattr(pyfuse3, "__version__", "?"), _STOCK_NAME)
        return False
    new = _fuse_fds() - before
    if len(new) != 1:
        log.info("the session's /dev/fuse fd is not known (%s): pyfuse3's own request loop "
                 "is used", sorted(new))
        return False
    fd = new.pop()
    if not stat.S_ISCHR(os.fstat(fd).st_mode):
        return False
    try:
        spin_ns = spin_limit_ns(os.environ.get("FUSEJOURNAL_SPIN_US"))
    except ValueError as e:
        spin_ns = spin_limit_ns(None)
        log.warning("%s: the default (%d µs) is used", e, spin_ns // 1000)
    for name in _handler_names():
        setattr(ops, name, _watched(getattr(ops, name)))
    _loop = _Loop(fd, spin_ns)
    _stock = stock
    setattr(pyfuse3, _STOCK_NAME, _wait_readable)
    return True


def terminate() -> None:
    """``pyfuse3.terminate``, and the replacement's tasks leave the loop (step 1)."""
    if _loop is not None:
        _loop.end()
    pyfuse3.terminate()


def uninstall() -> None:
    """Give pyfuse3 its own wait back (the session is closed)."""
    global _loop, _stock
    if _stock is not None:
        setattr(pyfuse3, _STOCK_NAME, _stock)
    _loop = None
    _stock = None


def installed() -> bool:
    """The replacement serves the current session."""
    return _loop is not None


def waits() -> int:
    """Requests waited for by the replacement so far (0 if not installed)."""
    return _loop.waits if _loop is not None else 0


def standbys() -> int:
    """Tasks woken to wait in place of a handler that blocked (0 if not installed)."""
    return _loop.standbys if _loop is not None else 0


def spin_stats() -> dict[str, int]:
    """The spin window's limit and current value (µs), its hits and misses
    (zeros if not installed)."""
    if _loop is None:
        return {"limit_us": 0, "window_us": 0, "hits": 0, "misses": 0}
    sp = _loop.spin
    return {"limit_us": sp.limit_ns // 1000, "window_us": sp.window_ns // 1000,
            "hits": sp.hits, "misses": sp.misses}


def direct_reads() -> int:
    """Requests read without a pass of trio's scheduler (step 4; 0 if not installed)."""
    return _loop.skips if _loop is not None else 0
