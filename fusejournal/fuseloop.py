"""pyfuse3's wait for the next request, without a trio Lock per request.

pyfuse3's request loop (``_session_loop``, internal.pxi) waits for each request
in ``_wait_fuse_readable``: it takes a ``trio.Lock`` (so that one task at a time
waits on the FUSE fd), waits until the fd is readable, releases the lock, and
the loop then reads and dispatches one request.  An uncontended
``trio.Lock.acquire`` is a full trip through trio's scheduler
(``cancel_shielded_checkpoint``), paid once per request: py-spy put 15 % of the
daemon's FUSE loop in the lock's ``__aenter__``/``__aexit__`` while a program
created small files (docs/performance-analysis.md, "pyfuse3's wait for a
request").

:func:`install` replaces that function (looked up by name in pyfuse3's module
dict at every call, so the compiled loop calls the replacement) with
:func:`_wait_readable`, which keeps its contract:

1. if the session is ending (:func:`terminate` was called), answer False: the
   task leaves the loop;
2. at most one task waits on the fd: the others park until it is done (what
   the lock did), and check again when woken;
3. the waiting task waits until the fd is readable, then, with no checkpoint
   between that and the loop's read, answers True; a waiter woken by
   ``notify_closing`` (pyfuse3.terminate) answers False;
4. leaving (either way, also when cancelled) it wakes the next parked task.

What the replacement does not keep: pyfuse3 counts its waiting tasks
(``active_readers``, not reachable from Python) to start a new worker task
when none is waiting and to end extra idle ones.  The count stays 0, so the
loop starts a new worker after each request until it has ``max_tasks`` (99)
and ends none; they park here.  Up to 99 requests may be in flight at once,
as before.

Cancellation: a parked or waiting task that is cancelled raises Cancelled (as
the lock and ``wait_readable`` did) and wakes the next one.

:func:`install` checks that the pyfuse3 it patches has the function it
replaces; otherwise (another pyfuse3) it leaves pyfuse3's own loop in place
and says so in the log.  ``FUSEJOURNAL_FUSE_LOOP=stock`` keeps pyfuse3's own
(to measure the difference: bench/requests.py and bench/run.py pass it
through).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable

import pyfuse3
import trio

log = logging.getLogger("fusejournal")

_STOCK_NAME = "_wait_fuse_readable"


class _Loop:
    """State of the replacement for one FUSE session (one per process)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.busy = False            # a task is waiting on the fd
        self.exited = False          # terminate() was called
        self.lot = trio.lowlevel.ParkingLot()
        self.waits = 0               # waits served (tests: the replacement is in use)


_loop: _Loop | None = None
_stock: Callable[[], Awaitable[bool]] | None = None


async def _wait_readable() -> bool:
    loop = _loop
    assert loop is not None
    while loop.busy and not loop.exited:                 # 2.
        await loop.lot.park()
    if loop.exited:                                      # 1.
        loop.lot.unpark()                                # the next parked one leaves too
        return False
    loop.busy = True
    loop.waits += 1
    try:
        await trio.lowlevel.wait_readable(loop.fd)       # 3.
    except trio.ClosedResourceError:
        return False
    finally:
        loop.busy = False                                # 4.
        loop.lot.unpark()
    return True


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


def install(before: set[int]) -> bool:
    """Put :func:`_wait_readable` in place of pyfuse3's wait, for the session
    ``pyfuse3.init`` just opened; False (and pyfuse3's own loop) if it cannot."""
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
    _loop = _Loop(fd)
    _stock = stock
    setattr(pyfuse3, _STOCK_NAME, _wait_readable)
    return True


def terminate() -> None:
    """``pyfuse3.terminate``, and the replacement's tasks leave the loop (step 1)."""
    if _loop is not None:
        _loop.exited = True
        _loop.lot.unpark_all()
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
