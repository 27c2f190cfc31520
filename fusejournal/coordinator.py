"""The group coordinator: one group checkpoint across every member, in two phases.

It runs as its own process (``python -m fusejournal.coordinator GROUPFILE``,
started by ``fusejournal mount --group``), not inside a member's daemon: a
member's daemon can die (kill -9, a crash) and the group must then fail its
checkpoints cleanly and recover when the member is back, which needs a
coordinator that did not die with it; and a member's trio loop must never wait
on itself.  It listens on ``GROUPJOURNAL/run/coordinator.sock`` (a 0700
directory of the mounting user) and answers only peers whose SO_PEERCRED uid
is the mounting user's or root's.  Each member's daemon listens likewise on
``run/m-NAME.sock`` (fusejournal/member.py).

The wire: one JSON object per line, each way.  A client (a member's setxattr,
``fusejournal checkpoint --group``) sends ``{"op": "checkpoint", "label": L}``
and gets ``{"ok": true, "id": G, "halt_ns": H}`` or ``{"ok": false, "error":
MSG, "errno": E}``; also ``status`` and ``stop``.

One group checkpoint G (:meth:`Coordinator.checkpoint`; docs/design.md has the
sequence diagram):

1. connect to every member (bounded by the halt bound T);
2. send ``take`` to all at once; each member runs its barrier (the kernel's
   pending writes reach its temporary store; not halted), from then on
   expects G, and replies ``ready`` (within 35 s);
3. open every member's wake FIFO, then move the group's epoch in the shared
   gate page (one byte: fusejournal/groupgate.py) and wake every member.  Each
   member makes its cut — by its next mutating operation, or by its
   checkpoint task if none comes first — without waiting for any other
   process; the barriers came first, so no cut includes a barrier;
4. each member appends its batch to its own ordered log with G in the marker
   (``group_checkpoint``), durably, and replies ``durable`` with its own
   checkpoint id for it and its cut's times (within T + ``append_timeout``);
5. append the commit line (G, each member's own checkpoint id, the group halt
   duration) to the group commit log and ``fdatasync`` it: from here G counts;
6. send ``commit`` to all (a member then confirms: drops the batch, closes its
   activity period, wakes its updater, answers G for user.fusejournal.checkpoint),
   and wait for their acknowledgements (bounded; a missing one does not undo G,
   the member resolves it from the commit log);
7. reply to the caller.

Failure at 1-5 (a member unreachable, dead, unable to cut within T, out of
space ...): send ``abort`` to every member still connected — one whose batch
is already durable puts the batch back in front of its temporary store (the
records are captured again by the next checkpoint) and its own checkpoint for
G is never applied, because no commit line names it; write an abort line;
reply with the error.  A member that lost the connection decides alone:
before its cut it takes nothing (and adopts the epoch if it moves); after its
batch is durable it keeps the batch "in doubt" and resolves it from the
commit log at the next take or at unmount.

Cancellation: the coordinator's checkpoint runs under a lock, one at a time;
if the coordinator dies, no member is left holding anything (a moved epoch
holds nobody: fusejournal/groupgate.py).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from . import layout
from .faults import fault
from .group import COORDINATOR_PID, CommitLog, Group, GroupFileError, ensure_run_dir, load_group
from .groupgate import SharedGate, Waker

log = logging.getLogger("fusejournal.coordinator")

MAX_LINE = 1 << 16
JSON = dict[str, Any]
COORDINATOR_LOCK = layout.GROUP_COORDINATOR_LOCK
ACK_TIMEOUT = 5.0
BARRIER_TIMEOUT = 35.0          # every member's barrier (each bounded at 30 s by its Checkpointer)


# ------------------------------------------------------------------ wire

class ProtocolError(Exception):
    """The peer broke the protocol, went away, or was too slow."""


def peer_uid(sock: socket.socket | trio.socket.SocketType) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", raw)[1]
    return uid


def peer_allowed(sock: socket.socket | trio.socket.SocketType) -> bool:
    """Only the mounting user (this process's euid) and root."""
    uid = peer_uid(sock)
    return uid == 0 or uid == os.geteuid()


class Channel:
    """JSON lines over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def send(self, obj: JSON) -> None:
        try:
            await self.stream.send_all(json.dumps(obj).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise ProtocolError(f"connection lost ({e})") from None

    async def recv(self) -> JSON:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise ProtocolError("message too long")
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ProtocolError(f"connection lost ({e})") from None
            if not data:
                raise ProtocolError("connection closed")
            self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        try:
            obj = json.loads(line)
        except ValueError:
            raise ProtocolError("not a JSON line") from None
        if not isinstance(obj, dict):
            raise ProtocolError("not a JSON object")
        return obj

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except Exception:
                pass


def listen_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` (mode 0600), replacing a stale one."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        s.bind(os.fspath(path))
    finally:
        os.umask(old)
    s.listen(64)
    return s


async def serve_unix(sock: socket.socket, handler: Callable[[Channel], Awaitable[None]]) -> None:
    """Accept connections on ``sock`` forever; refuse peers that are not the owner or root."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def guarded(stream: trio.SocketStream) -> None:
        try:
            if not peer_allowed(stream.socket):
                log.warning("refused a connection from uid %d", peer_uid(stream.socket))
                await stream.aclose()
                return
            await handler(Channel(stream))
        except ProtocolError as e:
            log.info("connection: %s", e)
        except Exception:
            # never let one connection end the server (in a member: its FUSE daemon)
            log.exception("connection handler failed")
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except Exception:
                    pass
    await trio.serve_listeners(guarded, [listener])


def request(path: Path, obj: JSON, timeout: float) -> JSON:
    """Blocking client (the CLI): send one request, return the reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ProtocolError("the group coordinator is not running") from None
        s.sendall(json.dumps(obj).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            data = s.recv(65536)
            if not data:
                raise ProtocolError("the group coordinator closed the connection")
            buf += data
            if len(buf) > MAX_LINE:
                raise ProtocolError("reply too long")
    except TimeoutError:
        raise ProtocolError(f"no answer from the group coordinator within {timeout:g} s") from None
    except PermissionError:
        raise ProtocolError(f"not allowed to use {path} (only the mounting user and root)") from None
    except (BrokenPipeError, ConnectionResetError):
        raise ProtocolError("the group coordinator closed the connection") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf.partition(b"\n")[0])
    except ValueError:
        raise ProtocolError("the group coordinator answered garbage") from None
    if not isinstance(reply, dict):
        raise ProtocolError("the group coordinator answered garbage")
    return reply


# ------------------------------------------------------------------ coordinator

class GroupCheckpointError(Exception):
    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class _NotEveryMember(Exception):
    """An automatic request (a member's seed) found a member not running: nothing started."""


class Coordinator:
    def __init__(self, group: Group) -> None:
        self.group = group
        self.commits = CommitLog(group.commits_path)
        self.commits.refresh()
        self.next_id = self.commits.last_id + 1
        self._lock = trio.Lock()
        self.halt_history: list[int] = []
        self.last_halt_ns = 0
        self.last_error: str | None = None
        self.failed = 0
        self.stop = trio.Event()
        self.gate = SharedGate(group.gate_path)

    async def _each(self, names: list[str], fn: Callable[[str], Awaitable[object]], timeout: float,
                    what: str) -> dict[str, object]:
        """Run ``fn(name)`` for every name at once, within ``timeout``; name -> result or exception."""
        out: dict[str, object] = {}

        async def one(name: str) -> None:
            try:
                with trio.fail_after(timeout):
                    out[name] = await fn(name)
            except trio.TooSlowError:
                out[name] = ProtocolError(f"no answer to {what} within {timeout:g} s")
            except (ProtocolError, OSError, GroupCheckpointError) as e:
                out[name] = e
            except (KeyError, TypeError, ValueError) as e:     # a malformed answer
                out[name] = ProtocolError(f"bad answer to {what}: {e!r}")
        async with trio.open_nursery() as n:
            for name in names:
                n.start_soon(one, name)
        return out

    async def checkpoint(self, label: str, auto: bool = False) -> tuple[int, int]:
        """One group checkpoint; returns (id, group halt ns) once committed durably.
        ``auto`` (asked by a member's online seed, fusejournal/groupseed.py): if a member
        is not running, nothing is started, no id is used and nothing is logged as an
        error (EAGAIN: the seed asks again later)."""
        async with self._lock:
            gid = self.next_id
            self.next_id += 1
            try:
                return await self._checkpoint(gid, label, auto)
            except _NotEveryMember as e:
                self.next_id = gid
                log.info("group checkpoint %r asked by a member's seed not started: %s", label, e)
                raise GroupCheckpointError(str(e), errno.EAGAIN) from None
            except GroupCheckpointError as e:
                self.failed += 1
                self.last_error = f"group checkpoint {gid} failed: {e}"
                log.error("%s", self.last_error)
                raise

    async def _checkpoint(self, gid: int, label: str, auto: bool = False) -> tuple[int, int]:
        g = self.group
        names = [m.name for m in g.members]
        T = g.halt_timeout
        chans: dict[str, Channel] = {}
        wall = time.time_ns()
        waker: Waker | None = None

        async def abort(error: str, durable: dict[str, int]) -> None:
            async def tell(name: str) -> None:
                await chans[name].send({"op": "abort", "error": error})
                await chans[name].recv()
            await self._each(list(chans), tell, ACK_TIMEOUT, "abort")
            try:
                self.commits.append({"abort": gid, "label": label, "error": error, "members": durable},
                                    durable=False)
            except OSError as e:
                log.error("could not record the abort of %d: %s", gid, e)

        def first_error(results: dict[str, object], what: str) -> str | None:
            bad = [(n, r) for n, r in results.items() if isinstance(r, BaseException)]
            if not bad:
                return None
            return "; ".join(f"member {n!r} {what}: {r}" for n, r in sorted(bad))

        try:
            # 1. connect
            async def connect(name: str) -> None:
                try:
                    stream = await trio.open_unix_socket(os.fspath(g.member_socket(name)))
                except (FileNotFoundError, ConnectionRefusedError):
                    raise ProtocolError("is not running (its daemon is gone: remount it with "
                                        f"`fusejournal mount --group {g.path}`)") from None
                chans[name] = Channel(stream)
            res = await self._each(names, connect, T, "connect")
            err = first_error(res, "unreachable")
            if err and auto:
                raise _NotEveryMember(err)          # (nothing sent: the channels are closed)
            if err:
                await abort(err, {})
                raise GroupCheckpointError(err, errno.EIO)

            # 2a. every member runs its barrier (not halted) and reports ready; the
            # wake FIFOs are opened now, so that nothing but stores and writes is left
            # for the closed window
            waker = Waker(g.wake_path(n) for n in names)

            async def ready(name: str) -> dict[str, Any]:
                await chans[name].send({"op": "take", "id": gid, "label": label, "timeout": T})
                r = await chans[name].recv()
                if not r.get("ok"):
                    raise GroupCheckpointError(r.get("error", "failed"), r.get("errno", errno.EIO))
                return r
            res = await self._each(names, ready, BARRIER_TIMEOUT, "take (the barrier)")
            err = first_error(res, "failed before the halt")
            if err:
                busy = any(isinstance(r, GroupCheckpointError) and r.errno == errno.EBUSY
                           for r in res.values())
                await abort(err, {})
                raise GroupCheckpointError(err, errno.EBUSY if busy else errno.EIO)

            # 2b. the cut: move the group's epoch (one store every member sees at once)
            # and wake every member; each member's next mutating operation, or its
            # checkpoint task if none comes first, takes its temporary store out (no
            # member waits for another process: fusejournal/groupgate.py)
            epoch = self.gate.advance(gid)
            waker.wake()
            fault("coordinator.epoch_moved")

            # 3./4. each member reports its batch durable (with its cut's times)
            async def outcome(name: str) -> dict[str, Any]:
                r = await chans[name].recv()
                if not r.get("ok"):
                    raise GroupCheckpointError(r.get("error", "failed"), r.get("errno", errno.EIO))
                if not all(type(r.get(k)) is int for k in ("local", "seen_ns", "cut_ns")):
                    raise ProtocolError(f"bad durable answer {r!r}")
                return r
            res = await self._each(names, outcome, T + g.append_timeout, "cut and append")
            durable = {n: r["local"] for n, r in res.items() if isinstance(r, dict)}
            err = first_error(res, "failed at its cut or append")
            if err:
                codes = {r.errno for r in res.values() if isinstance(r, GroupCheckpointError)}
                lost = any(isinstance(r, ProtocolError) for r in res.values())
                await abort(err, durable)
                raise GroupCheckpointError(err, errno.EIO if lost or len(codes) != 1 else codes.pop())
            # the group halt: the longest any member held its operations for its cut;
            # the spread: from the epoch's move to the last member's cut (holds nobody)
            oks = [r for r in res.values() if isinstance(r, dict)]
            halt_ns = max(r["cut_ns"] - r["seen_ns"] for r in oks)
            spread_ns = max(r["cut_ns"] for r in oks) - epoch.moved_ns

            # 5. the commit line, durably: from here the group checkpoint counts
            fault("coordinator.before_commit")
            try:
                await trio.to_thread.run_sync(lambda: self.commits.append(
                    {"commit": gid, "label": label, "time_ns": wall, "halt_ns": halt_ns,
                     "cut_spread_ns": spread_ns, "members": durable}, durable=True))
            except OSError as e:
                err = f"cannot write the group commit log {self.commits.path}: {e.strerror or e}"
                await abort(err, durable)
                raise GroupCheckpointError(err, e.errno or errno.EIO) from None

            fault("coordinator.after_commit")
            # 6. tell every member; a missing ack does not undo the commit
            async def commit(name: str) -> None:
                await chans[name].send({"op": "commit"})
                await chans[name].recv()
            res = await self._each(names, commit, ACK_TIMEOUT, "commit")
            for n, r in res.items():
                if isinstance(r, BaseException):
                    log.warning("member %r did not acknowledge commit %d: %s", n, gid, r)
        finally:
            if waker is not None:
                waker.close()
            for c in chans.values():
                await c.aclose()
        self.last_halt_ns = halt_ns
        self.halt_history.append(halt_ns)
        del self.halt_history[:-1000]
        self.last_error = None
        log.info("group checkpoint %d %r committed: %s, group halt %.3f ms", gid, label, durable, halt_ns / 1e6)
        return gid, halt_ns

    def status(self) -> JSON:
        hist = sorted(self.halt_history)
        self.commits.refresh()
        return {"group": self.group.name, "pid": os.getpid(),
                "last_group_checkpoint": self.commits.last_committed,
                "last_group_halt_ns": self.last_halt_ns,
                "group_halt_p99_ns": hist[min(len(hist) - 1, int(len(hist) * 0.99))] if hist else 0,
                "group_halts": len(hist), "group_failed": self.failed,
                "group_checkpoint_error": self.last_error,
                "members": [m.name for m in self.group.members]}

    async def handle(self, ch: Channel) -> None:
        req = await ch.recv()
        op = req.get("op")
        if op == "checkpoint":
            from .control import check_label
            raw = req.get("label")
            label = raw if isinstance(raw, str) else ""       # (not a string: refused as empty)
            try:        # the rule of setfattr on a mount: 1-200 bytes of printable UTF-8
                check_label(label.encode("utf-8", "surrogateescape"))
            except ValueError as e:         # (UnicodeEncodeError too: a lone surrogate)
                await ch.send({"ok": False, "error": f"bad label: {e}", "errno": errno.EINVAL})
                return
            try:
                gid, halt_ns = await self.checkpoint(label, auto=req.get("auto") is True)
            except GroupCheckpointError as e:
                await ch.send({"ok": False, "error": f"group checkpoint failed: {e}", "errno": e.errno})
                return
            await ch.send({"ok": True, "id": gid, "halt_ns": halt_ns})
        elif op == "status":
            await ch.send({"ok": True, "status": self.status()})
        elif op == "stop":
            await ch.send({"ok": True})
            self.stop.set()
        else:
            await ch.send({"ok": False, "error": f"unknown op {op!r}", "errno": errno.EINVAL})


def run_coordinator(group_file: str, ready_fd: int | None) -> int:
    from .daemonize import Reporter
    reporter = Reporter(ready_fd)
    try:
        group = load_group(group_file, check=False)
        ensure_run_dir(group)
    except GroupFileError as e:
        reporter.error(3, str(e))
        return 3
    logging.basicConfig(filename=os.fspath(group.journal / layout.GROUP_LOG), level=logging.INFO,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    lock_fd = os.open(group.run_dir / COORDINATOR_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        reporter.error(4, f"a coordinator for group {group.name!r} is already running")
        return 4
    sock = listen_unix(group.coordinator_socket)
    coord = Coordinator(group)
    (group.run_dir / COORDINATOR_PID).write_text(f"{os.getpid()}\n")

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(serve_unix, sock, coord.handle)

            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async for _ in sigs:
                        coord.stop.set()
                        return
            n.start_soon(signals)
            log.info("coordinator of group %r ready (next checkpoint %d)", group.name, coord.next_id)
            reporter.ready({"pid": os.getpid(), "socket": os.fspath(group.coordinator_socket)})
            await coord.stop.wait()
            n.cancel_scope.cancel()
    try:
        trio.run(main)
    finally:
        try:
            os.unlink(group.coordinator_socket)
        except OSError:
            pass
        try:
            os.unlink(group.run_dir / COORDINATOR_PID)
        except OSError:
            pass
        log.info("coordinator stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fusejournal-coordinator")
    p.add_argument("group_file")
    p.add_argument("--foreground", action="store_true")
    p.add_argument("--ready-fd", type=int)
    a = p.parse_args(argv)
    os.umask(0o077)
    return run_coordinator(a.group_file, a.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
