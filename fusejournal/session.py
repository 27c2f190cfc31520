"""The FUSE session: the one place besides fs.py that speaks pyfuse3.

pyfuse3 keeps module-level state, so a process has one session: the journaled
mount and each browse mount are separate daemons (mount.py, daemonize.py).

serve_session:
0. the interpreter's GIL switch interval is lowered to :data:`GIL_SWITCH_INTERVAL`
   (docs/performance-analysis.md, "pgbench: where the time goes"): a worker
   thread finishing an fsync, or the FUSE loop woken by it, waits at most that
   long for the GIL while another thread runs Python code, instead of 5 ms;
1. ``pyfuse3.init`` mounts the Operations (a failure is a UserError of one line),
   and pyfuse3's wait for each request is replaced by fusejournal/fuseloop.py's
   (no trio Lock per request);
2. ``on_ready`` is called (the mount is usable: the waiting command returns);
3. ``pyfuse3.main`` serves requests, with the background tasks (the updater's
   task, a group member's connection) and a signal watcher beside it in one
   nursery;
4. SIGTERM/SIGINT/SIGHUP call ``fuseloop.terminate`` (``pyfuse3.terminate``): no new request is read,
   in-flight handlers finish, main returns; SIGUSR1 logs what every task awaits
   (fusejournal/tasktree.py);
5. when main returns (unmounted or terminated) the background tasks are
   cancelled, and the session is always closed, unmounting it if it was not
   unmounted from outside.
An exception in a background task cancels main and propagates after step 5.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import fuseloop
from .errors import UserError

log = logging.getLogger("fusejournal")

#: seconds a thread waiting for the GIL lets the holder run on (CPython's default: 0.005)
GIL_SWITCH_INTERVAL = 0.0005


async def _terminate_on_signal(terminated: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for signum in sigs:
            log.info("signal %d: unmounting", signum)
            terminated.append(signum)
            fuseloop.terminate()
            return


async def _dump_on_signal() -> None:
    """Log every trio task's await chain at each SIGUSR1 (fusejournal/tasktree.py)."""
    from .tasktree import task_tree
    with trio.open_signal_receiver(signal.SIGUSR1) as sigs:
        async for _ in sigs:
            log.warning("SIGUSR1: the daemon's tasks and what each awaits:\n%s",
                        "\n".join(task_tree()))


#: what serve_session mounts (for the wiring, which does not import pyfuse3)
FuseOperations = pyfuse3.Operations


async def serve_session(ops: pyfuse3.Operations, mountpoint: Path, opts: set[str],
                        on_ready: Callable[[], None], *background: Callable[[], Any]) -> None:
    """Mount ``ops`` (one FUSE session per process), call ``on_ready``, serve until
    unmounted or signalled, with ``background`` tasks alongside; always close the session."""
    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
    fuse_fds = fuseloop.before_init()
    try:
        pyfuse3.init(ops, os.fspath(mountpoint), opts)
    except RuntimeError as e:
        raise UserError(f"cannot mount at {mountpoint}: {e}") from None
    unmounted = False
    try:
        fuseloop.install(fuse_fds, ops)
        on_ready()
        async with trio.open_nursery() as nursery:
            for task in background:
                nursery.start_soon(task)
            terminated: list[int] = []
            nursery.start_soon(_terminate_on_signal, terminated)
            nursery.start_soon(_dump_on_signal)
            await pyfuse3.main()
            # main returns when the mount went away (unmounted from outside) or after
            # a signal's terminate (still mounted: unmounted by close below)
            unmounted = not terminated
            nursery.cancel_scope.cancel()
    finally:
        fuseloop.uninstall()
        pyfuse3.close(unmount=not unmounted)
