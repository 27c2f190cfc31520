"""Named fault points, for crash tests.

``FUSEJOURNAL_FAULT=NAME`` (or ``NAME:N``, the N-th time it is reached) in the
daemon's environment makes :func:`fault` kill the process with SIGKILL at that
point, exactly as a crash would.  ``NAME:N:pause`` instead blocks the calling
thread while the file named by ``FUSEJOURNAL_FAULT_PAUSE`` exists (to hold the
updater still while a test damages the log); when it starts to, it creates that
name + ``.reached`` (so a test times the pause from when it began).  ``NAME:N:error`` raises
OSError(EIO) there, the N-th time only (a step failing after a change reached
the original).  :func:`for_sync_threads` hands ``pause`` and ``error`` to
pyfuse3's sync threads, which run no Python.  Unset (always, in production)
it costs one comparison.  The points are listed in docs/reliability.md.

:func:`hold` is the same for a point inside a trio task (a mutating
operation in flight): ``NAME:N:pause`` holds that one task, asynchronously,
while every other request is still served.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import trio

#: a process killed together with this one by a "kill" fault: the updater's process
#: (updaterproc.py) names its daemon, so a fault point in the updater is a crash of the
#: whole daemon, as the crash tests expect; a test kills the updater's process alone by pid
kill_also: int | None = None

_name, _n, _action = (os.environ.get("FUSEJOURNAL_FAULT", "").split(":") + ["", ""])[:3]
_remaining = int(_n) if _n.isdigit() else 1


def _reached(name: str) -> str | None:
    """Count one pass of ``name``; the action due now ("pause", "error", "kill"), else None."""
    global _remaining
    if not _name or name != _name:
        return None
    _remaining -= 1
    if _action in ("pause", "error"):
        return _action if _remaining == 0 else None
    return "kill" if _remaining <= 0 else None


def _pausing() -> bool:
    flag = os.environ.get("FUSEJOURNAL_FAULT_PAUSE", "")
    return bool(flag) and os.path.exists(flag)


def _paused_here() -> None:
    flag = os.environ.get("FUSEJOURNAL_FAULT_PAUSE", "")
    if flag:
        try:
            os.close(os.open(flag + ".reached", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        except OSError:
            pass


def fault(name: str) -> None:
    action = _reached(name)
    if action == "pause":
        _paused_here()
        while _pausing():
            time.sleep(0.01)
    elif action == "error":
        raise OSError(errno.EIO, f"injected fault at {name}")
    elif action == "kill":
        if kill_also is not None:
            os.kill(kill_also, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    """True if ``name`` is the configured fault point (a cheap test for hot paths)."""
    return _name == name


def for_sync_threads(name: str) -> tuple[int, int, bytes] | None:
    """The arguments of ``pyfuse3.sync_threads_fault`` when ``name`` is the configured
    point with ``pause`` or ``error`` (the N-th sync queued on pyfuse3's sync threads
    waits while the pause file exists, or fails with EIO; ``kill`` is not offered there,
    in C): ``(N, errno or 0, the pause file)``; else None."""
    if _name != name or _action not in ("pause", "error"):
        return None
    flag = os.fsencode(os.environ.get("FUSEJOURNAL_FAULT_PAUSE", ""))
    return _remaining, errno.EIO if _action == "error" else 0, flag


async def hold(name: str) -> None:
    """Like :func:`fault`, but ``pause`` awaits instead of blocking the thread."""
    action = _reached(name)
    if action == "pause":
        _paused_here()
        while _pausing():
            await trio.sleep(0.01)
    elif action == "error":
        raise OSError(errno.EIO, f"injected fault at {name}")
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
