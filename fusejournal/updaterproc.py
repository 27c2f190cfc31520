"""The updater's process: applies each confirmed checkpoint to the shadow, beside
the daemon, on its own interpreter (and so on the other core).

The daemon (updatetask.py) starts ``python -m fusejournal.updaterproc CONFIG``
with one end of a socket pair, and this process:

1. asks the kernel to SIGKILL it when the thread that started it (the daemon's
   trio thread, which lives as long as the daemon) ends (``PR_SET_PDEATHSIG``),
   then exits at once if its parent is already gone; it also holds, inherited,
   the daemon's flock on the shadow root, so a new daemon cannot claim the
   shadow until this process is gone (mount.py waits for it, bounded);
2. learns the confirmed checkpoints from the daemon: ``{"op": "checkpoints",
   "seq": S, "infos": [...]}`` lines (each a :class:`~fusejournal.log.CheckpointInfo`:
   the marker and where its batch lies in the ordered log), and reads the batches
   from the log's segment files itself (read-only: the daemon alone appends and
   prunes);
3. runs the updater up to the last checkpoint it knows (a pass), exactly as the
   daemon's thread did before (docs/updater.md): verify, validate, apply through
   staging, ``set_applied``; the browse gate's locks (browsegate.py) are this
   process's own POSIX locks, released by the kernel if it dies;
4. reports ``{"op": "applied", "applied": N}`` as each batch lands, and after each
   pass ``{"op": "state", "seq": S, "applied": N, "error": ..., "waiting": ...}``
   (S: the last checkpoints message the pass knew of);
5. a full shadow filesystem (NoSpace) is waited out: the pass is retried on the
   next checkpoints message, or by itself after 0.5 s doubling up to 8 s; any
   other error stops the updater until the next checkpoints message;
6. ends after the pass that is running when ``{"op": "stop"}`` arrives, or at
   once when the socket closes (the daemon is gone).

Failure: a kill at any moment leaves at most a half-applied batch with its
staging cursor; the next updater (restarted by the daemon, or at the next
mount) resumes it.  A "kill" fault point (faults.py) kills the daemon too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import faults
from .daemonize import setup_logging
from .errors import NoFds
from .history import retention_policy
from .log import CheckpointInfo, Marker, OrderedLog, Position
from .records import Record
from .shadow import Shadow
from .updater import NoSpace, Updater

log = logging.getLogger("fusejournal")

PR_SET_PDEATHSIG = 1


# ------------------------------------------------------------------ messages

def info_to_json(info: CheckpointInfo) -> dict[str, Any]:
    m = info.marker
    return {"marker": {"checkpoint": m.checkpoint, "label": m.label, "time_ns": m.time_ns,
                       "operations": m.operations, "raw_bytes": m.raw_bytes,
                       "stored_bytes": m.stored_bytes, "halt_ns": m.halt_ns, "extra": m.extra},
            "start": [info.start.segment, info.start.offset], "end": [info.end.segment, info.end.offset]}


def info_from_json(d: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(Marker(**d["marker"]), Position(*d["start"]), Position(*d["end"]))


def encode_message(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class Lines:
    """Newline-separated JSON messages arriving in chunks."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


# ------------------------------------------------------------------ the log, as the daemon tells it

class ForwardedLog:
    """The updater's view of the ordered log (an updater.LogSource): the checkpoints
    the daemon reported; batches are read from the segment files."""

    def __init__(self, directory: str | os.PathLike[str],
                 on_batch: Callable[[CheckpointInfo], None] | None = None) -> None:
        self.reader = OrderedLog(Path(directory))   # never opened: verify/records only read segments
        self.infos: list[CheckpointInfo] = []
        self.on_batch = on_batch

    def add(self, infos: list[CheckpointInfo]) -> None:
        last = self.infos[-1].marker.checkpoint if self.infos else 0
        self.infos += [i for i in infos if i.marker.checkpoint > last]

    def forget(self, applied: int) -> None:
        self.infos = [i for i in self.infos if i.marker.checkpoint > applied]

    def checkpoints(self, after: int) -> list[CheckpointInfo]:
        return [i for i in self.infos if i.marker.checkpoint > after]

    def verify(self, info: CheckpointInfo, each: Callable[[int, Record], None] | None = None,
               chunk: Callable[[int, int], None] | None = None) -> None:
        if self.on_batch is not None:
            self.on_batch(info)                  # every batch before this one has landed
        self.reader.verify(info, each, chunk)

    def records(self, info: CheckpointInfo, start: int | None = None) -> Iterator[Record]:
        return self.reader.records(info, start)


# ------------------------------------------------------------------ the loop

class UpdaterLoop:
    """Steps 2-6 of the module docstring, over one socket to the daemon."""

    def __init__(self, updater: Updater, flog: ForwardedLog, shadow: Shadow, sock: socket.socket) -> None:
        self.updater = updater
        self.flog = flog
        self.shadow = shadow
        self.sock = sock
        self.lines = Lines()
        self.seq = 0
        self.applied = shadow.applied
        self.reported = self.applied
        self.error: str | None = None
        self.waiting: str | None = None
        flog.on_batch = self._batch

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(encode_message(msg))

    def _batch(self, info: CheckpointInfo) -> None:
        """Before each batch: tell the daemon the checkpoint the shadow stands at now
        (``wait`` and ``shadow_checkpoint`` move batch by batch, not pass by pass)."""
        with contextlib.suppress(Exception):
            applied = self.shadow.applied
            if applied > self.reported:
                self.reported = applied
                self.send({"op": "applied", "applied": applied})

    def _space(self) -> str:
        try:
            st = os.statvfs(self.shadow.root)
            dev = os.stat(self.shadow.root).st_dev
        except OSError:
            return f"the shadow's filesystem ({self.shadow.root})"
        return (f"the shadow's filesystem ({self.shadow.root}, device {os.major(dev)}:{os.minor(dev)}): "
                f"{st.f_bavail * st.f_frsize} bytes, {st.f_favail} inodes free")

    def one_pass(self, delay: float | None) -> float | None:
        """Run the updater once; the retry delay that follows (None: wait for a message)."""
        try:
            self.applied = self.updater.run_once()
            if self.waiting:
                log.info("updater: %s is back; caught up to checkpoint %d",
                         "the fd supply" if "descriptors" in self.waiting else "space", self.applied)
            self.error = self.waiting = None
            delay = None
        except NoSpace as e:
            with contextlib.suppress(Exception):
                self.applied = self.shadow.applied        # earlier batches may have landed
            what = "file descriptors" if isinstance(e, NoFds) else "space"
            if not self.waiting:
                log.warning("updater: %s; waiting for %s", e, what)
            self.waiting = (f"waiting for file descriptors ({e})" if isinstance(e, NoFds)
                            else f"waiting for space on {self._space()} ({e})")
            self.error = None
            delay = 0.5 if delay is None else min(delay * 2, 8.0)
        except Exception as e:            # CorruptLog, UpdaterError, OSError ...: shown by status
            with contextlib.suppress(Exception):
                self.applied = self.shadow.applied
            self.error = str(e)
            self.waiting = None
            delay = None
            log.error("updater: %s", e)
        self.flog.forget(self.applied)
        self.reported = max(self.reported, self.applied)
        return delay

    def receive(self, timeout: float | None) -> list[dict[str, Any]] | None:
        """Messages that arrived (waiting up to ``timeout``; [] if none), None at EOF."""
        # poll, not select: the socket's fd may be above FD_SETSIZE (1024) when a deep walk
        # (a 4096-level tree) raised the open-file limit and used the low numbers
        p = select.poll()
        p.register(self.sock, select.POLLIN)
        if not p.poll(None if timeout is None else max(0, int(timeout * 1000))):
            return []
        data = self.sock.recv(1 << 16)
        if not data:
            return None
        return self.lines.feed(data)

    def run(self) -> None:
        due, delay = True, None
        while True:
            if due:
                seen = self.seq
                delay = self.one_pass(delay)
                self.send({"op": "state", "seq": seen, "applied": self.applied, "error": self.error,
                           "waiting": self.waiting})
                due = False
            msgs = self.receive(delay)
            if msgs is None:
                return                    # the daemon is gone
            if not msgs and delay is not None:
                due = True                # retry after the delay (waiting for space)
            for m in msgs:
                if m.get("op") == "checkpoints":
                    self.flog.add([info_from_json(d) for d in m["infos"]])
                    self.seq = m["seq"]
                    due = True
                elif m.get("op") == "stop":
                    return


# ------------------------------------------------------------------ the process

def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:
        os._exit(0)                       # the daemon died before the line above


def _group_rule(group_file: str, member: str) -> Callable[[Marker], bool | None]:
    """A consistency group member's rule (as GroupMember.committed, from the commit log)."""
    from .group import CommitLog, load_group
    commits = CommitLog(load_group(group_file, check=False).commits_path)
    commits.refresh()

    def committed(marker: Marker) -> bool | None:
        if marker.extra.get("group_checkpoint") is None:
            return True
        commits.refresh()
        return commits.verdict(member, marker.checkpoint)
    return committed


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    _die_with_parent(cfg["parent"])
    faults.kill_also = cfg["parent"]
    for sig in (signal.SIGINT, signal.SIGHUP):    # a terminal's signals: the daemon stops us
        signal.signal(sig, signal.SIG_IGN)
    setup_logging(Path(cfg["journal"]) if cfg.get("journal") else None, cfg.get("debug", False), False)
    sock = socket.socket(fileno=cfg["sock"])
    updater: Updater | None = None
    try:
        shadow = Shadow(cfg["shadow"])
        shadow._pinned = (cfg["pin"][0], cfg["pin"][1])   # the daemon's claim: never another directory
        flog = ForwardedLog(cfg["log_dir"])
        rule = _group_rule(*cfg["group"]) if cfg.get("group") else None
        keep_last, keep_within = cfg.get("retention") or (None, None)
        # a group member's retention is decided on the group checkpoints (groupretention.py)
        updater = Updater(flog, shadow, committed=rule, keep_bytes=cfg.get("keep_bytes"),
                          retention=retention_policy(keep_last, keep_within, cfg.get("group")))
        UpdaterLoop(updater, flog, shadow, sock).run()
    except (BrokenPipeError, ConnectionResetError):
        pass                              # the daemon is gone
    except Exception:
        log.exception("the updater's process failed")
        return 1
    finally:
        if updater is not None:
            updater.browse_gate.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
