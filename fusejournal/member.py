"""A consistency group member: the daemon's side of a group checkpoint.

The daemon of a member (``fusejournal mount ... --group FILE --member NAME``)
does three things differently from a single tree (the protocol and the order
of a group checkpoint are in fusejournal/coordinator.py):

* update permission on its root (setxattr) is not a local checkpoint: it asks
  the coordinator for a group checkpoint (:meth:`GroupMember.request_checkpoint`)
  and returns once that is committed on every member, or fails with its errno;
* its halt is a :class:`~fusejournal.groupgate.GroupHalt`: its mutating
  handlers compare the group's epoch (one byte of the shared gate page, moved
  by the coordinator) with the one of its last cut, and make the cut the
  moved epoch asks for before they go on (fusejournal/groupgate.py);
* it serves ``run/m-NAME.sock`` for the coordinator: one connection per group
  checkpoint (:meth:`GroupMember.session`) drives the phases of its
  :class:`~fusejournal.acquisition.Checkpointer` — the barrier, then
  ``ready``; once the epoch moved (its FIFO woke it), the cut (made already by
  an operation, or now, draining in-flight operations at most the halt bound),
  append durably with the group checkpoint id in the marker, report
  ``durable`` with the cut's times, then confirm on ``commit`` or put the
  batch back on ``abort``;
* its updater applies a batch of a group checkpoint only once the group commit
  log names it (:meth:`GroupMember.committed`); an aborted one is skipped, and
  its records, put back in the temporary store, come again in the next one.

Failure and cancellation: if the coordinator goes away before the epoch
moved, nothing was taken; a cut that is not appended (the session failed or
was cancelled) goes back in front of the temporary store.
If it goes away after this member's batch is durable, the outcome is "in
doubt": the batch is kept aside and resolved from the commit log — confirmed
if a commit line names it, else put back — at the next take (the coordinator
has then finished with it) or at unmount.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from . import faults
from .acquisition import Checkpointer, Taken
from .coordinator import Channel, ProtocolError, listen_unix, serve_unix
from .faults import fault
from .group import CommitLog, load_group
from .groupgate import Cut, GroupHalt, Notifier, SharedGate, make_fifo
from .halt import HaltTimeout
from .log import CheckpointInfo, Marker
from .tempstore import TempStore

if TYPE_CHECKING:
    from .activity import ActivityLog
    from .groupseed import MemberSeed

log = logging.getLogger("fusejournal.member")

OUTCOME_TIMEOUT = 30.0
HALT_ORDER_TIMEOUT = 60.0       # waiting (not halted) for the other members' barriers
REQUEST_TIMEOUT_SLACK = 30.0


class _Abort(Exception):
    pass


class _Control(Protocol):
    checkpoint: Callable[[str], Awaitable[object]]
    checkpoint_id: Callable[[], int]


class _Inbox:
    """Reads the coordinator's next message (during a checkpoint: an abort before the
    gates close, or the outcome after ``durable``) and pokes the notifier, so that a
    wait on the gate also ends when the coordinator speaks or goes away."""

    def __init__(self, ch: Channel, notifier: Notifier) -> None:
        self.ch = ch
        self.notifier = notifier
        self.message: dict[str, Any] | None = None
        self.error: str | None = None
        self.finished = trio.Event()

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    def describe(self) -> str:
        if self.message is not None:
            return str(self.message.get("error") or self.message.get("op"))
        return self.error or "?"

    async def run(self) -> None:
        try:
            self.message = await self.ch.recv()
        except ProtocolError as e:
            self.error = str(e)
        self.finished.set()
        self.notifier.poke()


class GroupMember:
    def __init__(self, group_file: str | os.PathLike[str], name: str) -> None:
        self.group = load_group(group_file, check=False)
        self.member = self.group.member(name)
        self.name = name
        self.cp: Checkpointer | None = None
        self.commits = CommitLog(self.group.commits_path)          # trio thread
        self._updater_commits = CommitLog(self.group.commits_path)  # the updater's thread
        self.commits.refresh()
        self.last_group = self.commits.last_committed
        self.in_doubt: tuple[int, Taken, CheckpointInfo] | None = None
        self.last_error: str | None = None
        self.sock = listen_unix(self.group.member_socket(name))
        # the shared gate and this member's wake FIFO (fusejournal/groupgate.py)
        self.gate = SharedGate(self.group.gate_path)
        self._fifo = make_fifo(self.group.wake_path(name))
        self.notifier = Notifier(self._fifo)
        self._halt: GroupHalt | None = None
        # an online seed (groupseed.py): set by the daemon while its shadow is seeded
        self.seed: MemberSeed | None = None

    def make_halt(self, store: TempStore, activity: ActivityLog | None) -> GroupHalt:
        """This member's halt (mount.py): the group's epoch is its gate."""
        self._halt = GroupHalt(self.gate, self.notifier, store, activity)
        return self._halt

    @property
    def halt(self) -> GroupHalt:
        if self._halt is None:
            raise RuntimeError("the member's halt is not made yet")
        return self._halt

    def attach(self, checkpointer: Checkpointer, control: _Control) -> None:
        """Take over the control attributes' update permission and checkpoint id."""
        self.cp = checkpointer
        control.checkpoint = self.request_checkpoint
        control.checkpoint_id = lambda: self.last_group

    # ------------------------------------------------------------ the updater's rule

    def committed(self, marker: Marker) -> bool | None:
        """Updater hook (worker thread): True apply, False skip (aborted), None not yet."""
        if marker.extra.get("group_checkpoint") is None:
            return True             # a checkpoint from before this tree joined a group
        self._updater_commits.refresh()
        return self._updater_commits.verdict(self.name, marker.checkpoint)

    # ------------------------------------------------------------ update permission

    async def request_checkpoint(self, label: str, auto: bool = False) -> None:
        """setxattr on this member's root: one group checkpoint, via the coordinator.
        ``auto``: asked by this member's seed (groupseed.py): a coordinator or a member
        not running yet is not an error (the seed asks again), and the coordinator starts
        nothing unless every member is there."""
        path = os.fspath(self.group.coordinator_socket)
        try:
            stream = await trio.open_unix_socket(path)
        except OSError:
            if auto:
                raise OSError(errno.EAGAIN, "the group coordinator is not running") from None
            self.last_error = "the group coordinator is not running"
            log.error("update permission %r refused: %s", label, self.last_error)
            raise OSError(errno.EIO, self.last_error) from None
        ch = Channel(stream)
        try:
            await ch.send({"op": "checkpoint", "label": label, **({"auto": True} if auto else {})})
            with trio.fail_after(3 * self.group.halt_timeout + self.group.append_timeout
                                 + REQUEST_TIMEOUT_SLACK):
                reply = await ch.recv()
        except (ProtocolError, trio.TooSlowError) as e:
            self.last_error = f"no answer from the group coordinator: {e}"
            raise OSError(errno.EIO, self.last_error) from None
        finally:
            await ch.aclose()
        if not reply.get("ok"):
            if auto and reply.get("errno") == errno.EAGAIN:     # a member is not running yet
                raise OSError(errno.EAGAIN, reply.get("error", "not every member is running"))
            self.last_error = reply.get("error", "group checkpoint failed")
            log.error("update permission %r: %s", label, self.last_error)
            err = reply.get("errno")
            raise OSError(err if isinstance(err, int) and err > 0 else errno.EIO, self.last_error)
        self.last_error = None

    # ------------------------------------------------------------ the coordinator's session

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.notifier.run)
            await serve_unix(self.sock, self.session)

    def _checkpointer(self) -> Checkpointer:
        if self.cp is None:
            raise RuntimeError("the member is not attached to its checkpointer")
        return self.cp

    def _resolve_in_doubt(self) -> None:
        if self.in_doubt is None:
            return
        gid, taken, info = self.in_doubt
        self.in_doubt = None
        self.commits.refresh()
        rec = self.commits.commit_record(gid)
        if rec is not None and rec["members"].get(self.name) == info.marker.checkpoint:
            log.info("group checkpoint %d was committed (resolved from the commit log)", gid)
            self._checkpointer().confirm(taken, info)
            self.last_group = max(self.last_group, gid)
        else:
            self._checkpointer().restore(taken, f"group checkpoint {gid} was not committed")

    async def session(self, ch: Channel) -> None:
        req = await ch.recv()
        if req.get("op") != "take":
            await ch.send({"ok": False, "error": f"unexpected {req.get('op')!r}", "errno": errno.EINVAL})
            return
        gid, label = req.get("id"), req.get("label")
        if not isinstance(gid, int) or not isinstance(label, str):
            await ch.send({"ok": False, "error": "bad take request", "errno": errno.EINVAL})
            return
        cp = self._checkpointer()
        async with cp.lock, trio.open_nursery() as nursery:
            self._resolve_in_doubt()
            # the coordinator's next message (an abort before the cut, or the outcome
            # after ``durable``), read beside the session: it pokes the notifier, so a
            # wait for the epoch also ends when the coordinator speaks or goes away
            inbox = _Inbox(ch, self.notifier)
            nursery.start_soon(inbox.run)
            handed: list[bool] = [False]
            try:
                await self._session(ch, cp, gid, label, inbox, handed)
            finally:
                left = self.halt.finish()
                if left is not None and not handed[0]:
                    self.store_restore(left, f"group checkpoint {gid}: the cut was not appended")
                nursery.cancel_scope.cancel()

    def store_restore(self, cut: Cut, why: str) -> None:
        ops = cut.batch.operations
        self.halt.store.restore(cut.batch)
        log.warning("%s; its %d operation(s) stay pending", why, ops)

    def _give_back(self, cp: Checkpointer, gid: int, paused: bool) -> None:
        """Nothing will be appended: a cut made already (by an operation) goes back in
        front of the temporary store, then the streamer goes on — in this order, with
        no await between: resumed first, it could stream operations admitted after
        the cut ahead of it (the session's end would find no cut left)."""
        left = self.halt.finish()
        if left is not None:
            self.store_restore(left, f"group checkpoint {gid}: the cut was not appended")
        if paused:
            cp._resume()
        if self.seed is not None:
            self.seed.failed()

    async def _session(self, ch: Channel, cp: Checkpointer, gid: int, label: str, inbox: _Inbox,
                       handed: list[bool]) -> None:
        bound = self.group.halt_timeout
        halt = self.halt
        wall = time.time_ns()
        paused = False
        try:
            # 1. the barrier (not halted), as a single tree's acquisition does
            cp.last_barrier_ns = 0
            if cp.barrier is not None:
                await cp._barrier(label)
            # the streamer is paused before the epoch can move (its append in flight
            # lands first): records it took after the cut would land before this
            # checkpoint's marker.  It resumes with the outcome (confirm/restore),
            # or below if nothing is taken.
            if cp.streamer is not None:
                await cp.streamer.pause()
                paused = True
            # 2. expect the cut, report ready; wait for the coordinator to move the epoch
            halt.expecting = gid
            # an online seed ready for its final round: hold the cut (groupseed.py)
            halt.hold_next = self.seed is not None and self.seed.wants_hold()
            await ch.send({"ok": True, "state": "ready"})
            with trio.move_on_after(HALT_ORDER_TIMEOUT):
                while True:
                    ev = self.notifier.changed
                    if halt.moved(gid):
                        break
                    if inbox.done:
                        raise _Abort(f"aborted by the coordinator before the cut: {inbox.describe()}")
                    await ev.wait()
            if not halt.moved(gid):
                raise _Abort(f"the epoch did not move within {HALT_ORDER_TIMEOUT:g} s")
            if faults.armed("group.member_before_halt"):     # tests: a checkpoint task slow to cut
                await faults.hold("group.member_before_halt")
            # 3. the cut (made already by an operation, or now), bounded by T
            cut = await halt.cut_for(gid, bound)
            if halt.held and self.seed is not None:
                await self.seed.at_cut()        # the seed's final round, the gate still closed
            halt.release()
        except BaseException as e:
            self._give_back(cp, gid, paused)   # nothing appended: the streamer goes on
            if isinstance(e, HaltTimeout):          # the drain, or the barrier (BarrierTimeout)
                self.last_error = f"group checkpoint {gid}: {e}"
                await ch.send({"ok": False, "error": str(e), "errno": errno.EBUSY})
                return
            if isinstance(e, _Abort):
                self.last_error = f"group checkpoint {gid} abandoned before the cut: {e}"
                log.warning("%s; nothing taken", self.last_error)
                return
            if isinstance(e, OSError):    # the barrier failed (nothing taken)
                self.last_error = f"group checkpoint {gid}: {e}"
                await ch.send({"ok": False, "error": str(e), "errno": e.errno or errno.EIO})
                return
            raise
        try:
            fault("group.member_taken")
        except BaseException:
            self._give_back(cp, gid, paused)
            raise
        cp.last_halt_ns = cut.cut_ns - cut.seen_ns
        cp.halt_history.append(cp.last_halt_ns)
        del cp.halt_history[:-1000]
        taken = Taken(label, wall, cut.batch, cut.period, cut.seen_ns, cut.cut_ns, paused=paused)
        handed[0] = True                  # append restores it on failure; then commit/abort/in doubt
        seed = self.seed
        try:
            info = await cp.append(taken, {"group": self.group.name, "group_checkpoint": gid,
                                           **(seed.marker_extra() if seed is not None else {})})
        except Exception as e:
            if seed is not None:
                seed.failed()
            err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
            await ch.send({"ok": False, "error": str(e), "errno": err})
            return
        fault("group.member_durable")
        msg: dict[str, Any] | None = None
        try:
            await ch.send({"ok": True, "state": "durable", "local": info.marker.checkpoint,
                           "seen_ns": cut.seen_ns, "cut_ns": cut.cut_ns, "by_handler": cut.by_handler})
            with trio.move_on_after(OUTCOME_TIMEOUT):
                await inbox.finished.wait()
            msg = inbox.message
        except ProtocolError:
            pass
        except BaseException:
            # cancelled (the daemon unmounting): durable but undecided, so in doubt;
            # shutdown() settles it from the commit log before saving what is pending
            if seed is not None:
                seed.in_doubt(taken)
            self.in_doubt = (gid, taken, info)
            raise
        op = msg.get("op") if msg else None
        if op == "commit":
            if seed is not None:
                await seed.committed(gid, taken, info)      # before confirm: the periods
            cp.confirm(taken, info)
            self.last_group = max(self.last_group, gid)
            self.last_error = None
        elif op == "abort" and msg is not None:
            if seed is not None:
                seed.failed()
            cp.restore(taken, f"group checkpoint {gid} aborted: {msg.get('error')}")
            self.last_error = f"group checkpoint {gid} aborted: {msg.get('error')}"
        else:
            log.warning("group checkpoint %d: no outcome from the coordinator; in doubt until "
                        "the commit log says", gid)
            if seed is not None:
                seed.in_doubt(taken)
            self.in_doubt = (gid, taken, info)
            return
        with contextlib.suppress(ProtocolError):
            await ch.send({"ok": True})

    def shutdown(self) -> None:
        """At unmount: settle a batch in doubt (before the pending operations are saved)."""
        self._resolve_in_doubt()

    def close(self) -> None:
        try:
            self.sock.close()
            os.unlink(self.group.member_socket(self.name))
        except OSError:
            pass
        os.close(self._fifo)
        self.gate.close_file()

    def status(self) -> dict[str, Any]:
        return {"group": self.group.name, "member": self.name,
                "last_group_checkpoint": self.last_group,
                "group_in_doubt": self.in_doubt[0] if self.in_doubt else None,
                "group_error": self.last_error}
