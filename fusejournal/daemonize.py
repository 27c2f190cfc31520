"""Starting a daemon detached, and hearing how its start-up goes (like S3QL's
daemonize, with a ready pipe as sshfs has).

1. ``spawn`` runs ``python -m MODULE ARGV --foreground --ready-fd N`` in a new
   session (no terminal, stdio to /dev/null) with the write end of a pipe;
2. the daemon's Reporter writes lines on it: ``progress N`` (seeding),
   ``message TEXT``, then exactly one of ``ready JSON`` or ``error CODE TEXT``,
   and closes it;
3. ``spawn`` returns the ready info, or raises the daemon's own UserError; if
   the pipe closes without either, the daemon died: a UserError with its status.
If ``spawn`` is interrupted before an answer, the child is terminated.
``fork_daemon`` does the same with a forked child instead of a new interpreter
(steps 2-3 unchanged), for a command that has already imported its daemon.

Used by the journaled mount, the browse mount, a group member and the coordinator.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import layout
from .errors import EXIT_UNUSABLE, UserError

log = logging.getLogger("fusejournal")


class Reporter:
    """Tells the waiting ``fusejournal mount`` how start-up goes (or stderr in the foreground)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self._last = 0.0

    def _send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode("utf-8", "surrogateescape"))
        except OSError:
            pass

    def progress(self, n: int) -> None:
        now = time.monotonic()
        if now - self._last >= 0.2:
            self._last = now
            self._send(f"progress {n}")
            if self.fd is None and sys.stderr.isatty():
                print(f"\rseeding the shadow: {n} entries", end="", file=sys.stderr)

    def message(self, text: str) -> None:
        self._send(f"message {text}")
        if self.fd is None:
            print(text, file=sys.stderr)

    def ready(self, info: dict[str, Any]) -> None:
        self._send("ready " + json.dumps(info))
        self.close()

    def error(self, code: int, text: str) -> None:
        self._send(f"error {code} {text}")
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def setup_logging(journal: Path | None, debug: bool, foreground: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    if journal is not None:
        try:
            # 0600 and never through a symlink: the daemon runs with umask 0
            fd = os.open(journal / layout.DAEMON_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                         | os.O_NOFOLLOW | os.O_CLOEXEC, layout.PRIVATE_FILE_MODE)
            os.fchmod(fd, layout.PRIVATE_FILE_MODE)
            to_file = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8",
                                                      errors="backslashreplace"))
            to_file.setFormatter(fmt)
            root.addHandler(to_file)
        except OSError:
            pass
    if foreground:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)


def spawn(argv: list[str], on_progress: Callable[[int], None] | None = None,
          on_message: Callable[[str], None] | None = None, module: str = "fusejournal.cli") -> dict[str, Any]:
    """Start ``python -m fusejournal.cli ARGV --ready-fd N`` detached; wait until it is ready.

    Returns the ready info; raises UserError with the daemon's own message.
    """
    r, w = os.pipe()
    cmd = [sys.executable, "-m", module, *argv, "--foreground", "--ready-fd", str(w)]
    proc = subprocess.Popen(cmd, pass_fds=(w,), start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    return _await_ready(proc, r, on_progress, on_message)


class _Forked:
    """A forked child, waited for as a Popen is."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def terminate(self) -> None:
        os.kill(self.pid, signal.SIGTERM)


def fork_daemon(run: Callable[[int], int]) -> dict[str, Any]:
    """As :func:`spawn`, without starting a new interpreter: fork, and run ``run(ready_fd)``
    in the child (new session, stdio on /dev/null; it ends with ``os._exit``).  For a command
    that has already imported what its daemon needs (browse --checkpoint: one interpreter's
    start-up and imports instead of two).  The caller holds no thread, lock or open file the
    daemon must not inherit (fds 3 and up are closed in the child, but for the ready pipe)."""
    r, w = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:                                      # the daemon
        code = EXIT_UNUSABLE
        pipe: os.stat_result | None = None
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, w)
            os.closerange(w + 1, _max_fd())
            pipe = os.fstat(w)
            code = run(w)
        except BaseException as e:                    # noqa: BLE001 (never back into the command)
            try:                                      # still the ready pipe (not closed, its number reused)?
                st = os.fstat(w)
                if pipe is not None and (st.st_dev, st.st_ino) == (pipe.st_dev, pipe.st_ino):
                    Reporter(w).error(EXIT_UNUSABLE, f"the daemon failed to start: {e}")
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    global forked
    forked += 1
    return _await_ready(_Forked(pid), r, None, None)


#: daemons forked from this process (:func:`fork_daemon`); the command line then ends without
#: the interpreter's teardown (cli.main), which would write to nearly every page this process
#: still shares with them, copy-on-write: tens of ms of page copies before the command returns
forked = 0


def _max_fd() -> int:
    try:
        return max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return 1024


def _await_ready(proc: subprocess.Popen[bytes] | _Forked, r: int, on_progress: Callable[[int], None] | None,
                 on_message: Callable[[str], None] | None) -> dict[str, Any]:
    """Read the daemon's ready pipe (steps 2-3 above)."""
    try:
        with os.fdopen(r, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                kind, _, rest = line.rstrip("\n").partition(" ")
                if kind == "progress" and on_progress is not None:
                    on_progress(int(rest))
                elif kind == "message" and on_message is not None:
                    on_message(rest)
                elif kind == "ready":
                    info: dict[str, Any] = json.loads(rest)
                    return info
                elif kind == "error":
                    code, _, msg = rest.partition(" ")
                    raise UserError(msg, int(code))
    except BaseException:
        if proc.poll() is None and not isinstance(sys.exc_info()[1], UserError):
            proc.terminate()
        raise
    rc = proc.wait()
    raise UserError(f"the daemon exited (status {rc}) before the mount was ready", EXIT_UNUSABLE)
