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
3. the waiting task waits until the fd is readable, then, with no checkpoint
   between that and the loop's read, answers True; it wakes no one: the
   request it is about to read is most often answered without the handler
   ever blocking, and the same task is back to wait right after (one pass of
   trio's scheduler per request);
4. a handler that blocks (its coroutine yields to trio for the first time:
   a thread, the halt's gate, the streamer's back-pressure, a fault's pause)
   first wakes one parked task to wait on the fd in its place (:func:`standby`),
   so the requests behind it are served meanwhile, as pyfuse3's spare task did;
5. a waiter woken by ``notify_closing`` (pyfuse3.terminate) or by an error on
   the fd (the mount went away: the read that follows gets ENODEV and ends
   that task) marks the session ended and wakes every parked task, which
   leave by 1.

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
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import pyfuse3
import trio

log = logging.getLogger("fusejournal")

_STOCK_NAME = "_wait_fuse_readable"


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


class _Loop:
    """State of the replacement for one FUSE session (one per process)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
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
    try:
        await trio.lowlevel.wait_readable(loop.fd)       # 3.
    except trio.ClosedResourceError:                     # 5.
        loop.busy = False
        loop.end()
        return False
    except BaseException:
        loop.busy = False
        loop.lot.unpark()                                # someone else waits instead
        raise
    loop.busy = False
    for _, events in loop.poller.poll(0):                # 5.
        if events & _ERROR:
            loop.end()
    return True


def standby() -> None:
    """A handler is about to block: have a parked task wait on the fd meanwhile (4.)."""
    loop = _loop
    if loop is not None and not loop.busy and not loop.exited:
        loop.standbys += 1
        loop.lot.unpark()


@types.coroutine
def _drive(coro: Coroutine[Any, Any, Any]) -> Generator[Any, Any, Any]:
    """Run a handler's coroutine as ``await coro`` would, calling :func:`standby`
    when it first yields to trio (4.); a handler that never blocks costs one
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
    for name in _handler_names():
        setattr(ops, name, _watched(getattr(ops, name)))
    _loop = _Loop(fd)
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
