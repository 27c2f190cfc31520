"""What every trio task of the daemon is waiting for, for ``kill -USR1 PID``.

A daemon that stops answering, or does not end after its unmount, is idle in
``epoll_wait``: a stack sampler (py-spy) shows only that, since a suspended
coroutine is on no thread's stack.  :func:`task_tree` walks trio's task tree
from the root task and, for each task, the chain of coroutines it is
suspended in (each ``cr_await``, or ``gi_yieldfrom`` for a generator-based
one, or the coroutine a generator drives by hand, as fuseloop's ``_drive`` does
with a handler: its local ``coro``; a compiled coroutine's ``__await__``
wrapper is followed through ``gc.get_referents``), innermost last, as
``function (file:line)``.  session.py logs it at
WARNING on SIGUSR1 (docs/guide.md, "When something goes wrong").

Read-only and synchronous: called from a task of the same trio run, it walks
objects that no other task can change meanwhile.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import trio


def _frame(obj: Any) -> Any:
    return (getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
            or getattr(obj, "ag_frame", None))


def _next(obj: Any, frame: Any) -> Any:
    """What ``obj`` (suspended in ``frame``) waits for: the object it awaits or yields
    from, else the coroutine a generator drives by hand (fuseloop._drive's ``coro``),
    else the generator behind an ``async with`` of an ``asynccontextmanager``
    (contextlib's ``__aenter__``/``__aexit__`` await an anonymous ``asend``)."""
    nxt = (getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
           or getattr(obj, "ag_await", None))
    if frame is None:
        if nxt is None and type(obj).__name__ == "coroutine_wrapper":
            # a compiled (Cython) coroutine's __await__ (pyfuse3's request loop and its
            # handlers' callers): it names no attribute for the coroutine, the GC does
            nxt = next((o for o in gc.get_referents(obj) if _frame(o) is not None), None)
        return nxt
    if nxt is None and getattr(obj, "gi_frame", None) is frame:
        return frame.f_locals.get("coro")
    if frame.f_code.co_name in ("__aenter__", "__aexit__"):
        gen = getattr(frame.f_locals.get("self"), "gen", None)
        if _frame(gen) is not None:
            return gen
    return nxt


def _awaiting(coro: Any) -> list[str]:
    """The chain of frames ``coro`` is suspended in, outermost first."""
    frames: list[str] = []
    for _ in range(64):
        if coro is None:
            break
        frame = _frame(coro)
        if frame is not None:
            code = frame.f_code
            line = f":{frame.f_lineno}" if frame.f_lineno is not None else ""   # (compiled: none)
            frames.append(f"{code.co_name} ({os.path.basename(code.co_filename)}{line})")
        coro = _next(coro, frame)
    return frames


def task_tree() -> list[str]:
    """One line per task of the current trio run, indented by depth: its name, then
    what it awaits (outermost first).  The caller's own task shows as running."""
    lines: list[str] = []
    me = trio.lowlevel.current_task()

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        where = "running (this dump)" if task is me else " > ".join(_awaiting(task.coro)) or "?"
        lines.append(f"{'  ' * depth}{task.name}: {where}")
        for nursery in task.child_nurseries:
            for child in sorted(nursery.child_tasks, key=lambda t: t.name):
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return lines
