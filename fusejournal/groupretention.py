"""A consistency group member's retention: every member keeps the same group checkpoints.

A member's own checkpoints carry its own ids and its own times (its clock at its cut,
milliseconds apart from the other members'), and each member prunes after its updater
applied a batch, at its own moment.  Decided on those (``history.Policy`` as a single tree
does), ``keep_within`` could keep a group checkpoint at the edge on one member and drop it
on another — and a group checkpoint is shown, restored or kept only while *every* member
retains it, so the one member's copy would be of no use, and which group checkpoints
survive would depend on timing.

So a member decides on the group's checkpoints, in the group commit log, which every
member reads alike (:func:`group_drop`):

1. ``G``: the newest committed group checkpoint whose batch for this member is applied
   (its own id at most the member's latest).  No such G (the member applied no group
   checkpoint yet): the member's own rule on its own checkpoints, as before.
2. The rule (``keep_last``, ``keep_within``) picks among the committed group checkpoints
   up to G, each with its time in the commit log (the coordinator's clock when the group
   checkpoint began), with "now" = G's time — never a member's clock, never a member's
   marker time.  So the decision is a function of the commit log and G alone: every member
   that has applied G makes the same one, once, whenever it prunes.
3. ``before``: this member's own id of the oldest group checkpoint kept.  If the rule
   dropped a group checkpoint, every own checkpoint older than ``before`` goes (a prefix,
   as ``prune --group`` does it); if it dropped none, only own checkpoints that are older
   than ``before`` (from before the tree joined the group) *and* that the member's own rule
   drops go.  The latest is always kept (G is kept, and its batch is at most the latest).

A member that lags (it has not applied G yet) decides at an older G' and keeps a superset
of the older group checkpoints; once it applies G it drops exactly what the others did.
``keep_within`` thus counts back from the newest group checkpoint applied rather than from
the wall clock at the moment of pruning: the two differ by the updater's lag, and only the
first is the same on every member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .group import CommitLog, load_group
from .history import Checkpoint, Policy


def group_drop(rule: Policy, member: str, cps: list[Checkpoint], commits: list[dict[str, Any]],
               now_ns: int) -> list[int]:
    """The member's own checkpoint ids to prune (a prefix of ``cps``, never the last): steps
    1-3 above.  ``cps``: its retained checkpoints, oldest first (the last is the latest);
    ``commits``: the commit lines of the group commit log; ``now_ns``: the member's clock,
    used only by its own rule for checkpoints from before the group (step 3)."""
    if not cps:
        return []
    applied = cps[-1].id
    points: list[tuple[int, int | None, dict[str, Any]]] = []      # (gid, own id or None, line)
    for r in commits:
        gid, mem = r.get("commit"), r.get("members")
        if type(gid) is not int or not isinstance(mem, dict):
            continue
        own = mem.get(member)
        points.append((gid, own if type(own) is int else None, r))
    points.sort(key=lambda p: p[0])
    done = [gid for gid, own, _ in points if own is not None and own <= applied]
    if not done:                                                    # 1. no group checkpoint yet
        return rule.drop(cps, now_ns)
    newest = max(done)
    upto = [p for p in points if p[0] <= newest]

    def time_of(r: dict[str, Any]) -> int:
        t = r.get("time_ns")
        return t if type(t) is int else 0
    group_cps = [Checkpoint(gid, time_of(r), str(r.get("label", ""))) for gid, _, r in upto]
    dropped = set(rule.drop(group_cps, group_cps[-1].time_ns))      # 2. the group's decision
    before = min(own for gid, own, _ in upto if own is not None and gid not in dropped)
    if dropped:                                                     # 3.
        return [c.id for c in cps[:-1] if c.id < before]
    own_rule = set(rule.drop(cps, now_ns))
    return [c.id for c in cps[:-1] if c.id < before and c.id in own_rule]


@dataclass(frozen=True)
class GroupRetention(Policy):
    """A group member's retention policy (steps 1-3 of the module docstring), on the group
    commit log at ``commits_path`` as it stands at each prune (read on from where the
    previous prune left it)."""
    member: str = ""
    commits_path: str = ""
    commits: CommitLog | None = field(default=None, compare=False, repr=False)

    def drop(self, cps: list[Checkpoint], now_ns: int) -> list[int]:
        commits = self.commits if self.commits is not None else CommitLog(Path(self.commits_path))
        commits.refresh()
        return group_drop(Policy(keep_last=self.keep_last, keep_within=self.keep_within), self.member,
                          cps, commits.commits, now_ns)


def group_retention(group_file: str, member: str, keep_last: int | None,
                    keep_within: float | None) -> GroupRetention:
    """Member ``member``'s policy in the group of ``group_file`` (read once, now)."""
    group = load_group(group_file, check=False)
    return GroupRetention(keep_last=keep_last, keep_within=keep_within, member=member,
                          commits_path=str(group.commits_path), commits=CommitLog(group.commits_path))
