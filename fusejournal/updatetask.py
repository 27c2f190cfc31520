"""The updater's task in the daemon: runs the updater in its own process
(updaterproc.py) and keeps what status reports of it.

The updater used to run in a worker thread of the daemon, sharing its
interpreter with the FUSE loop: while a batch was applied (and compressed)
the loop got a fraction of a core.  Now it runs on its own interpreter, so on
the other core; the daemon keeps the same ``run``/``stop``/``wake``/``state``
interface.

``run()`` (started by the session's nursery, in the trio thread):

1. starts ``python -m fusejournal.updaterproc`` with one end of a socket pair
   and the daemon's flock on the shadow root (inherited: a new daemon cannot
   claim the shadow while this child lives), from the trio thread itself, which
   lives as long as the daemon: the child's ``PR_SET_PDEATHSIG`` is tied to the
   thread that started it;
2. tells it every confirmed checkpoint it has not been told (at start, all
   after the applied one; then on each ``wake()``);
3. reads its reports: the applied checkpoint (``applied``, shown by status and
   ``user.fusejournal.shadow_checkpoint``), ``error`` (stopped until the next
   checkpoint), ``waiting`` (a full shadow filesystem, retried by the child);
   after each pass it prunes the segments the shadow has fully applied (the
   daemon alone writes the log);
4. if the child dies (killed, crashed), it is started again after 0.1 s,
   doubling up to 10 s (reset after a child that lived 30 s); meanwhile
   ``state()`` says "restarting"; the staging cursor makes the new child resume
   a half-applied batch exactly;
5. ``stop()``, or cancellation (unmount), sends ``stop`` and waits — shielded,
   unbounded, as the thread was — for the pass that is running to end and the
   child to exit.

Killing the daemon kills the child (``PR_SET_PDEATHSIG``); killing the child
leaves the daemon serving, and 4 follows.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from .log import OrderedLog
from .shadow import Shadow
from .updater import Updater
from .updaterproc import Lines, encode_message, info_to_json

log = logging.getLogger("fusejournal")

RESTART_FIRST = 0.1
RESTART_MAX = 10.0
HEALTHY_AFTER = 30.0


def _how_it_ended(rc: int | None) -> str:
    if rc is None:
        return "it closed its connection"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"killed by {name}"
    return f"exit status {rc}"


def _flock_holders(st: os.stat_result) -> list[int]:
    """The pids /proc/locks names for flocks on this file: the process that took the
    lock, even when it is gone and a child that inherited the open file holds it."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == dev:
                    pids.append(int(fields[4]))
    except (OSError, ValueError):
        pass
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
    except OSError:
        return False
    return line[line.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def wait_for_previous_updater(shadow_root: Path, timeout: float = 10.0) -> None:
    """Before a daemon claims the shadow: the updater process of a daemon that was just
    killed may still be dying (it holds that daemon's flock on the shadow root until
    it is gone).  Wait for it, at most ``timeout`` s.  A flock taken by a live process
    (another daemon using this shadow) is not waited for: the claim itself refuses it
    at once, as it refuses a shadow still in use after the timeout."""
    try:
        fd = os.open(shadow_root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return                            # missing, a symlink ...: Shadow.attach says so
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                    return
            if any(_alive(pid) for pid in _flock_holders(os.fstat(fd))):
                return                    # a live daemon's claim, not a dying updater's
            time.sleep(0.01)
    finally:
        os.close(fd)


class UpdateTask:
    """The updater's process, seen from the daemon, and what status reports of it."""

    def __init__(self, updater: Updater, olog: OrderedLog, shadow: Shadow, applied: int, *,
                 journal: Path | None = None, group: tuple[str, str] | None = None,
                 debug: bool = False) -> None:
        self.updater = updater               # the daemon's own (recovery runs it in-process)
        self.olog = olog
        self.shadow = shadow
        self.applied = applied               # the checkpoint the shadow stands at
        self.error: str | None = None        # the updater stopped on this
        self.waiting: str | None = None      # a full shadow filesystem: waited out
        self.restarting: str | None = None   # the process died; it is started again
        self.busy = False                    # a pass is running or about to run
        self.pid: int | None = None          # the updater's process
        self.journal = journal
        self.group = group
        self.debug = debug
        self._wake = trio.Event()
        self._stopped = False
        self._told = 0                       # last checkpoint the process was told of
        self._seq = 0                        # last checkpoints message sent

    def wake(self) -> None:
        """A new checkpoint is durable: tell the process (status: catching up, not stopped)."""
        self.busy = True
        self._wake.set()

    def stop(self) -> None:
        """End ``run()`` once the running pass, if any, is over."""
        self._stopped = True
        self._wake.set()

    def state(self) -> str:
        """One line for status: idle, applying, waiting for space, restarting, or stopped."""
        if self.restarting:
            return f"restarting: {self.restarting}"
        if self.busy:
            return (f"applying checkpoints {self.applied + 1}..{self.olog.last_checkpoint}"
                    if self.olog.last_checkpoint > self.applied else "applying")
        if self.waiting:
            return self.waiting
        if self.error:
            return f"stopped: {self.error}"
        return "idle"

    # -------------------------------------------------------------- the process

    def _spawn(self) -> tuple[subprocess.Popen[bytes], socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            root = os.stat(self.shadow.root, follow_symlinks=False)
            # the daemon's flock on the shadow root (Shadow.attach), held by the child too
            claim = self.shadow._lock_fd
            cfg = {"parent": os.getpid(), "sock": theirs.fileno(), "shadow": os.path.abspath(self.shadow.root),
                   "pin": [root.st_dev, root.st_ino], "log_dir": os.path.abspath(self.olog.directory),
                   "journal": os.path.abspath(self.journal) if self.journal is not None else None,
                   "group": list(self.group) if self.group else None, "debug": self.debug,
                   # the mount's retention policy (history.py), which the child's updater prunes by
                   "retention": [self.updater.history.policy.keep_last, self.updater.history.policy.keep_within],
                   # what its verify pass may keep of a batch (the mount's --memory-limit)
                   "keep_bytes": self.updater.keep_bytes}
            # from the trio thread: PR_SET_PDEATHSIG follows the thread that forks
            proc = subprocess.Popen([sys.executable, "-m", "fusejournal.updaterproc", json.dumps(cfg)],
                                    pass_fds=(theirs.fileno(),) + ((claim,) if claim >= 0 else ()),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return proc, ours

    async def _send(self, stream: trio.SocketStream, msg: dict[str, Any]) -> None:
        await stream.send_all(encode_message(msg))

    async def _tell(self, stream: trio.SocketStream) -> None:
        """Step 2: every confirmed checkpoint not told yet, on each wake-up; then stop.
        Returns quietly if the process is gone (``_listen`` sees it end)."""
        try:
            while True:
                self._wake = trio.Event()        # before looking: no wake-up is lost
                infos = self.olog.checkpoints(max(self._told, self.applied))
                if infos:
                    self._seq += 1
                    await self._send(stream, {"op": "checkpoints", "seq": self._seq,
                                              "infos": [info_to_json(i) for i in infos]})
                    self._told = infos[-1].marker.checkpoint
                if self._stopped:
                    await self._send(stream, {"op": "stop"})
                    return
                await self._wake.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return

    async def _listen(self, stream: trio.SocketStream) -> None:
        """Step 3, until the process closes its end."""
        lines = Lines()
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                return
            for m in lines.feed(data):
                if m.get("op") == "applied":
                    self.applied = max(self.applied, int(m["applied"]))
                elif m.get("op") == "state":
                    self.applied = int(m["applied"])
                    self.error, self.waiting = m.get("error"), m.get("waiting")
                    self.busy = m["seq"] < self._seq or self.olog.last_checkpoint > self._told
                    try:
                        # the shadow holds them now: segments it has fully applied go
                        # (this also frees space when the journal shares the shadow's filesystem)
                        await trio.to_thread.run_sync(self.olog.prune, self.applied)
                    except Exception as e:
                        log.error("pruning the ordered log: %s", e)

    async def _wait_exit(self, proc: subprocess.Popen[bytes]) -> int:
        fd = os.pidfd_open(proc.pid)
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
        return proc.wait()

    async def _one(self) -> int | None:
        """Run one updater process until it exits; its exit status (None if it never started)."""
        proc, sock = self._spawn()
        self.pid = proc.pid
        self._told = 0
        self.busy = self.olog.last_checkpoint > self.applied
        log.info("the updater's process %d started", proc.pid)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        try:
            # neither task lets an error out (a nursery would wrap it in an ExceptionGroup)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tell, stream)
                try:
                    await self._listen(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass                      # the process is gone
                except (ValueError, KeyError, TypeError) as e:
                    log.error("the updater's process sent something unreadable (%s): killing it", e)
                    proc.kill()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if proc.poll() is None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await self._send(stream, {"op": "stop"})
                    with trio.move_on_after(1.0) as slow:
                        rc = await self._wait_exit(proc)
                    if slow.cancelled_caught:
                        log.info("waiting for the updater's pass to end")
                        rc = await self._wait_exit(proc)
                else:
                    rc = proc.wait()
                await stream.aclose()
                self.pid = None
        return rc

    async def run(self) -> None:
        """Steps 1-5 of the module docstring."""
        delay = RESTART_FIRST
        while not self._stopped:
            started = time.monotonic()
            try:
                rc = await self._one()
            except OSError as e:            # could not start it (fork, exec, fds)
                rc = None
                how = f"could not start it: {e}"
            else:
                how = _how_it_ended(rc)
            if self._stopped:
                break
            if time.monotonic() - started > HEALTHY_AFTER:
                delay = RESTART_FIRST
            self.restarting = f"the updater's process ended ({how}); starting it again in {delay:g} s"
            log.error("%s", self.restarting)
            with trio.move_on_after(delay):
                while not self._stopped:
                    await self._wake.wait()
                    self._wake = trio.Event()
            delay = min(delay * 2, RESTART_MAX)
            self.restarting = None
