"""A consistency group member: the daemon's side of a group checkpoint.

The daemon of a member (``fusejournal mount ... --group FILE --member NAME``)
does three things differently from a single tree (the protocol and the order
of a group checkpoint are in fusejournal/coordinator.py):

* update permission on its root (setxattr) is not a local checkpoint: it asks
  the coordinator for a group checkpoint (:meth:`GroupMember.request_checkpoint`)
  and returns once that is committed on every member, or fails with its errno;
* it serves ``run/m-NAME.sock`` for the coordinator: one connection per group
  checkpoint (:meth:`GroupMember.session`) drives the phases of its
  :class:`~fusejournal.acquisition.Checkpointer` — halt and take, hold the gate
  closed until ``release`` (at most the halt bound), append durably with the
  group checkpoint id in the marker, then confirm on ``commit`` or put the
  batch back on ``abort``;
* its updater applies a batch of a group checkpoint only once the group commit
  log names it (:meth:`GroupMember.committed`); an aborted one is skipped, and
  its records, put back in the temporary store, come again in the next one.

Failure and cancellation: if the coordinator goes away or is too slow before
``release``, the batch goes back and the gate opens (inside the halt bound).
If it goes away after this member's batch is durable, the outcome is "in
doubt": the batch is kept aside and resolved from the commit log — confirmed
if a commit line names it, else put back — at the next take (the coordinator
has then finished with it) or at unmount.
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from . import faults
from .acquisition import Checkpointer, Taken
from .coordinator import Channel, ProtocolError, listen_unix, serve_unix
from .faults import fault
from .group import CommitLog, load_group
from .halt import HaltTimeout
from .log import CheckpointInfo, Marker

log = logging.getLogger("fusejournal.member")

OUTCOME_TIMEOUT = 30.0
HALT_ORDER_TIMEOUT = 60.0       # waiting (not halted) for the other members' barriers
REQUEST_TIMEOUT_SLACK = 30.0


class _Abort(Exception):
    pass


class GroupMember:
    def __init__(self, group_file, name: str) -> None:
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

    def attach(self, checkpointer: Checkpointer, control) -> None:
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

    async def request_checkpoint(self, label: str) -> None:
        """setxattr on this member's root: one group checkpoint, via the coordinator."""
        path = os.fspath(self.group.coordinator_socket)
        try:
            stream = await trio.open_unix_socket(path)
        except OSError:
            self.last_error = "the group coordinator is not running"
            log.error("update permission %r refused: %s", label, self.last_error)
            raise OSError(errno.EIO, self.last_error) from None
        ch = Channel(stream)
        try:
            await ch.send({"op": "checkpoint", "label": label})
            with trio.fail_after(3 * self.group.halt_timeout + self.group.append_timeout
                                 + REQUEST_TIMEOUT_SLACK):
                reply = await ch.recv()
        except (ProtocolError, trio.TooSlowError) as e:
            self.last_error = f"no answer from the group coordinator: {e}"
            raise OSError(errno.EIO, self.last_error) from None
        finally:
            await ch.aclose()
        if not reply.get("ok"):
            self.last_error = reply.get("error", "group checkpoint failed")
            log.error("update permission %r: %s", label, self.last_error)
            err = reply.get("errno")
            raise OSError(err if isinstance(err, int) and err > 0 else errno.EIO, self.last_error)
        self.last_error = None

    # ------------------------------------------------------------ the coordinator's session

    async def serve(self) -> None:
        await serve_unix(self.sock, self.session)

    def _resolve_in_doubt(self) -> None:
        if self.in_doubt is None:
            return
        gid, taken, info = self.in_doubt
        self.in_doubt = None
        self.commits.refresh()
        rec = self.commits.commit_record(gid)
        if rec is not None and rec["members"].get(self.name) == info.marker.checkpoint:
            log.info("group checkpoint %d was committed (resolved from the commit log)", gid)
            self.cp.confirm(taken, info)
            self.last_group = max(self.last_group, gid)
        else:
            self.cp.restore(taken, f"group checkpoint {gid} was not committed")

    async def session(self, ch: Channel) -> None:
        req = await ch.recv()
        if req.get("op") != "take":
            await ch.send({"ok": False, "error": f"unexpected {req.get('op')!r}", "errno": errno.EINVAL})
            return
        gid, label = req.get("id"), req.get("label")
        if not isinstance(gid, int) or not isinstance(label, str):
            await ch.send({"ok": False, "error": "bad take request", "errno": errno.EINVAL})
            return
        bound = self.group.halt_timeout
        async with self.cp.lock:
            self._resolve_in_doubt()

            async def before_halt() -> None:
                # after this member's barrier, not halted yet: wait until every
                # member is past its barrier, so no member's halt includes another's
                await ch.send({"ok": True, "state": "ready"})
                with trio.move_on_after(HALT_ORDER_TIMEOUT) as scope:
                    msg = await ch.recv()
                if scope.cancelled_caught:
                    raise _Abort(f"no order to halt within {HALT_ORDER_TIMEOUT:g} s")
                if msg.get("op") != "halt":
                    raise _Abort(f"aborted by the coordinator before the halt: {msg.get('error')}")
                if faults.armed("group.member_before_halt"):     # tests: a member slow to halt
                    await faults.hold("group.member_before_halt")

            async def hold() -> None:
                # inside the halt, the temporary store taken: tell the coordinator,
                # and keep the gate closed until every member has taken (bounded)
                fault("group.member_taken")
                await ch.send({"ok": True, "state": "taken"})
                with trio.move_on_after(bound) as scope:
                    msg = await ch.recv()
                if scope.cancelled_caught:
                    raise _Abort(f"no release within {bound:g} s")
                if msg.get("op") != "release":
                    raise _Abort(f"aborted by the coordinator: {msg.get('error')}")
            try:
                taken = await self.cp.take(label, hold, before_halt)
            except HaltTimeout as e:          # the halt, or the barrier (BarrierTimeout)
                self.last_error = f"group checkpoint {gid}: {e}"
                await ch.send({"ok": False, "error": str(e), "errno": errno.EBUSY})
                return
            except (_Abort, ProtocolError) as e:
                self.last_error = f"group checkpoint {gid} abandoned before the release: {e}"
                log.warning("%s; nothing taken, or the batch went back", self.last_error)
                return
            except OSError as e:              # the barrier failed (nothing taken)
                self.last_error = f"group checkpoint {gid}: {e}"
                await ch.send({"ok": False, "error": str(e), "errno": e.errno or errno.EIO})
                return
            try:
                info = await self.cp.append(taken, {"group": self.group.name, "group_checkpoint": gid})
            except Exception as e:
                err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
                await ch.send({"ok": False, "error": str(e), "errno": err})
                return
            fault("group.member_durable")
            msg = None
            try:
                await ch.send({"ok": True, "state": "durable", "local": info.marker.checkpoint,
                               "closed_ns": taken.closed_ns, "opened_ns": taken.opened_ns})
                with trio.move_on_after(OUTCOME_TIMEOUT):
                    msg = await ch.recv()
            except ProtocolError:
                pass
            op = msg.get("op") if msg else None
            if op == "commit":
                self.cp.confirm(taken, info)
                self.last_group = max(self.last_group, gid)
                self.last_error = None
            elif op == "abort":
                self.cp.restore(taken, f"group checkpoint {gid} aborted: {msg.get('error')}")
                self.last_error = f"group checkpoint {gid} aborted: {msg.get('error')}"
            else:
                log.warning("group checkpoint %d: no outcome from the coordinator; in doubt until "
                            "the commit log says", gid)
                self.in_doubt = (gid, taken, info)
                return
            try:
                await ch.send({"ok": True})
            except ProtocolError:
                pass

    def shutdown(self) -> None:
        """At unmount: settle a batch in doubt (before the pending operations are saved)."""
        self._resolve_in_doubt()

    def close(self) -> None:
        try:
            self.sock.close()
            os.unlink(self.group.member_socket(self.name))
        except OSError:
            pass

    def status(self) -> dict:
        return {"group": self.group.name, "member": self.name,
                "last_group_checkpoint": self.last_group,
                "group_in_doubt": self.in_doubt[0] if self.in_doubt else None,
                "group_error": self.last_error}
