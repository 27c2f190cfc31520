"""Consistency group members seed online: the member's side, and the group's first complete
group checkpoint.

A member (``mount --group FILE [--member NAME]``) mounts at once and seeds its shadow
behind the mount exactly as a single tree does (fusejournal/seeding.py: the copy, the
dirty set in the activity log, the rounds).  What differs is the checkpoint: a member's
checkpoints are group checkpoints, driven by the coordinator, and its cut is made by
the shared epoch (fusejournal/groupgate.py), not by a halt of its own.  The member's
session (fusejournal/member.py) calls :class:`MemberSeed` at these points
(docs/design.md, "Consistency group members seed online"):

1. **Before ``ready``** (:meth:`MemberSeed.wants_hold`): if the seed's dirty set is
   ready for its final round, the member's next cut is *held*
   (``GroupHalt.hold_next``): once made — by an operation or by the task — the gate
   stays closed behind it.
2. **At the held cut** (:meth:`MemberSeed.at_cut`): the seed's final round
   (``SeedingTask.at_halt``, contents deferred) runs against an original that does
   not move, bounded by the group's halt bound: past it the round is simply not
   attempted (the seed goes on converging; the group checkpoint goes on as an
   ordinary one).  Then the gate is released.
3. **The append** carries ``seeding: incomplete`` or ``seeding: first complete`` in
   the marker (:meth:`MemberSeed.marker_extra`), beside the group checkpoint id.
4. **The outcome.**  On ``commit`` (:meth:`MemberSeed.committed`, before the batch is
   confirmed): a final round is completed (records applied, contents replayed from the
   log, ``seeded.json`` with ``group_checkpoint`` G, ``applied.json`` = the member's own
   checkpoint, seeding.json removed), and the daemon starts its updater there; a
   checkpoint that does not complete the seed keeps its activity periods (the dirty
   set) — ``taken.period`` becomes 0, as ``Daemon.checkpoint`` does for a single tree.
   On ``abort``, a failed append or a cut not appended (:meth:`MemberSeed.failed`)
   the final round is dropped and its objects are dirty again.  A batch left *in
   doubt* (:meth:`MemberSeed.in_doubt`) drops its final round too and keeps its
   periods, whichever way the commit log later decides it: the seed never claims a
   group checkpoint whose commit it has not seen.

Never claimed before the commit: ``applied.json`` is written only after the commit
message, so a member's shadow never stands at a checkpoint of an aborted group
checkpoint.  Failure and cancellation: every path out of a session after a final round
ran ends in exactly one of :meth:`committed`, :meth:`failed`, :meth:`in_doubt`.

**The group's first complete group checkpoint** (:func:`first_complete`) is the first
group checkpoint at which every member's shadow is complete: each member's is the group
checkpoint its seed completed at (``group_checkpoint`` in its seeded.json, durable
before its applied.json), or for a member seeded before it mounted, the first group
checkpoint naming its first complete checkpoint or a later one (0 if that is its
checkpoint 0); the group's is the maximum — a member complete earlier applies every
committed group checkpoint after its own, so at the maximum every shadow holds it.
It is derived, never stored apart: the members' seeded.json and the commit log are the
group's state (a re-seeded member moves it, with nothing else to keep in step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .acquisition import Taken
    from .group import CommitLog, Group, Member
    from .log import CheckpointInfo
    from .seeding import SeedingTask

log = logging.getLogger("fusejournal")


class MemberSeed:
    """A group member's online seed, as its checkpoint sessions see it (module docstring)."""

    def __init__(self, task: SeedingTask, on_done: Callable[[int], None], halt_timeout: float) -> None:
        self.task = task
        self.on_done = on_done          # the daemon: the updater starts at this checkpoint
        self.halt_timeout = halt_timeout

    @property
    def active(self) -> bool:
        return not self.task.done

    def wants_hold(self) -> bool:
        """Step 1: hold the next cut (the dirty set is ready for the final round)?"""
        return self.active and self.task.state == "ready"

    async def at_cut(self) -> None:
        """Step 2, at a held cut: the final round, bounded; never raises (but Cancelled)."""
        await self.task.at_halt(timeout=self.halt_timeout)

    def marker_extra(self) -> dict[str, Any]:
        if not self.active:
            return {}
        return {"seeding": "first complete" if self.task.final_pending else "incomplete"}

    async def committed(self, gid: int, taken: Taken, info: CheckpointInfo) -> None:
        """Step 4, on ``commit`` (before the batch is confirmed)."""
        from .seeding import ReplayError
        task = self.task
        if task.done:
            return
        local = info.marker.checkpoint
        if task.final_pending:
            task.group_checkpoint = gid
            try:
                await task.complete(local, info.marker.time_ns)
            except ReplayError as e:
                log.warning("seed: group checkpoint %d (checkpoint %d here) is not the first complete "
                            "one (%s); converging again", gid, local, e)
            except Exception as e:
                log.error("seed: could not record the first complete checkpoint %d (group checkpoint "
                          "%d): %s; converging again", local, gid, e)
            finally:
                task.group_checkpoint = None if not task.done else gid
        if task.done:
            log.info("seed: complete at group checkpoint %d (checkpoint %d here)", gid, local)
            self.on_done(local)
        else:
            taken.period = 0            # keep the intents: the seed's dirty set

    def failed(self) -> None:
        """Nothing of this session will be applied (abort, failed append, cut given back)."""
        if self.task.final_pending or self.task.state == "final":
            self.task.final_failed()

    def in_doubt(self, taken: Taken) -> None:
        """The outcome is unknown: the final round is dropped, the periods kept whatever the
        commit log says later."""
        if not self.active:
            return
        self.failed()
        taken.period = 0


# ------------------------------------------------------------ the group's first complete checkpoint

@dataclass(frozen=True)
class SeedState:
    """One member's part (:func:`member_complete_at`)."""
    complete_at: int | None     # the group checkpoint from which its shadow is complete
    seeding: bool               # its shadow is being seeded (seeding.json)
    why: str                    # why complete_at is None ("" otherwise)


def member_complete_at(m: Member, commits: CommitLog) -> SeedState:
    from .shadow import SEEDED, Shadow, ShadowError
    sh = Shadow(m.shadow)
    if sh.seeding:
        return SeedState(None, True, "being seeded")
    try:
        doc = sh.read_state(SEEDED) or {}
        exists = sh.exists()
    except (ShadowError, OSError) as e:
        return SeedState(None, False, str(e))
    if not exists:
        return SeedState(None, False, "never seeded (not mounted yet)")
    g = doc.get("group_checkpoint")
    if type(g) is int and g >= 0:
        return SeedState(g, False, "")
    n = doc.get("first_complete")
    local = n if type(n) is int and n >= 0 else 0       # no seeded.json: from before online seeds
    if local == 0:
        return SeedState(0, False, "")
    for r in sorted(commits.commits, key=lambda r: int(r["commit"])):
        mine = r.get("members", {}).get(m.name)
        if type(mine) is int and mine >= local:
            return SeedState(int(r["commit"]), False, "")
    return SeedState(None, False, f"complete at its checkpoint {local}, not yet in a group checkpoint")


def first_complete(group: Group, commits: CommitLog) -> tuple[int | None, dict[str, SeedState]]:
    """The group's first complete group checkpoint (None: not yet), and each member's part."""
    states = {m.name: member_complete_at(m, commits) for m in group.members}
    if any(s.complete_at is None for s in states.values()):
        return None, states
    return max((s.complete_at or 0) for s in states.values()), states


def refuse_while_seeding(group: Group, what: str) -> None:
    """No group checkpoint is complete before the members' first complete one: nothing to
    ``what`` (browse) yet; a UserError in one line."""
    from .errors import UserError
    from .group import CommitLog
    commits = CommitLog(group.commits_path)
    commits.refresh()
    first, parts = first_complete(group, commits)
    if first is None:
        why = "; ".join(f"member {n!r}: {p.why}" for n, p in parts.items() if p.complete_at is None)
        raise UserError(f"group {group.name!r} holds no complete group checkpoint to {what} yet ({why}); "
                        f"`fusejournal wait --group {group.path}` waits for the first one")


__all__ = ["refuse_while_seeding", "MemberSeed", "SeedState", "first_complete", "member_complete_at"]
