"""Retention by ``keep_within`` in a consistency group keeps the same group checkpoints on
every member (fusejournal/groupretention.py).

Each member prunes after its updater applied a batch, at its own moment, and its own
checkpoints carry its own times (its clock at its cut).  Decided on those, a group checkpoint
at the edge of ``keep_within`` was kept by one member and dropped by the other: then it is
retained by no one usefully (only what every member retains is shown or restored) and
which group checkpoints survive depends on timing.  The group's decision is now made on the
group checkpoints' own times (the commit log) with "now" = the newest group checkpoint
applied, so every member makes the same one.

The clocks are injected (HistoryWriter.clock, Policy.drop's now): nothing sleeps.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_updater import Env, FakeLog

from fusejournal import history
from fusejournal.group import CommitLog, load_group
from fusejournal.groupretention import group_drop
from fusejournal.history import Checkpoint, Policy, retention_policy

H = 3600 * 10**9                     # an hour, in ns
MS = 10**6
W = 2 * 3600.0                       # keep_within = 2h
#: the group checkpoints' times in the commit log: G1..G5 an hour apart, far after the seeds
T = time.time_ns() + 24 * H
GT = {g: T + (g - 1) * H for g in range(1, 6)}     # G3 is exactly 2 h before G5: the edge


def _group(tmp: Path, own: dict[str, dict[int, int]]) -> Path:
    """A group of members a and b whose commit log holds G1..G5 (``own``: member -> gid ->
    its own checkpoint id)."""
    for d in ("a", "b"):
        (tmp / d).mkdir(exist_ok=True)
    p = tmp / "g.toml"
    p.write_text('[group]\nname = "g"\njournal = "gj"\n'
                 '[[member]]\nname = "a"\nsource = "a"\n\n[[member]]\nname = "b"\nsource = "b"\n')
    g = load_group(p, check=False)
    g.journal.mkdir(exist_ok=True)
    log = CommitLog(g.commits_path)
    for gid in sorted(GT):
        log.append({"commit": gid, "label": f"G{gid}", "time_ns": GT[gid], "halt_ns": 0,
                    "members": {m: own[m][gid] for m in own}}, durable=False)
    return p


# member a's own ids are the group's; member b took one checkpoint alone before it joined
OWN = {"a": {g: g for g in GT}, "b": {g: g + 1 for g in GT}}
#: each member's cut comes a little after the coordinator's clock read (its marker time)
DELAY = {"a": 1 * MS, "b": 3 * MS}
#: when each member prunes after applying G5: a at once, b a little later
PRUNE_AT = {"a": GT[5] + 1 * MS, "b": GT[5] + 10 * MS}


def _own_cps(m: str) -> list[Checkpoint]:
    cps = [Checkpoint(0, T - 24 * H, "seed")]
    if m == "b":
        cps.append(Checkpoint(1, T - H // 2, "alone"))
    return cps + [Checkpoint(OWN[m][g], GT[g] + DELAY[m], f"G{g}") for g in sorted(GT)]


def _groups_kept(m: str, kept_ids: set[int]) -> list[int]:
    return [g for g in sorted(GT) if OWN[m][g] in kept_ids]


def test_the_members_own_rule_disagreed_at_the_edge() -> None:
    """The scenario is at the edge: decided on each member's own times and clock (the rule a
    member applied before), a keeps G3 and b drops it."""
    rule = Policy(keep_last=None, keep_within=W)
    kept = {}
    for m in ("a", "b"):
        cps = _own_cps(m)
        kept[m] = _groups_kept(m, {c.id for c in cps} - set(rule.drop(cps, PRUNE_AT[m])))
    assert kept == {"a": [3, 4, 5], "b": [4, 5]}


@pytest.mark.parametrize("edge_ns", [0, -1, 1])
def test_every_member_keeps_the_same_group_checkpoints(tmp_path: Path, edge_ns: int) -> None:
    """G3 exactly at the edge (kept), 1 ns inside (kept) and 1 ns outside (dropped): the
    same on both members, whatever their marker times and their clocks when they prune."""
    GT[3] = T + 2 * H + edge_ns
    try:
        p = _group(tmp_path, OWN)
        want = [3, 4, 5] if edge_ns >= 0 else [4, 5]
        for m in ("a", "b"):
            policy = retention_policy(None, W, (str(p), m))
            cps = _own_cps(m)
            for now in (PRUNE_AT[m], PRUNE_AT[m] + 7 * H, GT[5] - H):    # any clock: the same decision
                dropped = policy.drop(cps, now)
                assert dropped == [c.id for c in cps[:len(dropped)]]       # a prefix
                assert _groups_kept(m, {c.id for c in cps} - set(dropped)) == want, (m, now)
                # and nothing older than the oldest group checkpoint kept is left on the member
                assert min(c.id for c in cps if c.id not in dropped) == OWN[m][want[0]]
    finally:
        GT[3] = T + 2 * H


def test_a_member_that_lags_keeps_a_superset_until_it_catches_up(tmp_path: Path) -> None:
    p = _group(tmp_path, OWN)
    cps = _own_cps("b")[:-1]                       # b has applied G4, not G5 yet
    dropped = retention_policy(None, W, (str(p), "b")).drop(cps, PRUNE_AT["b"])
    assert _groups_kept("b", {c.id for c in cps} - set(dropped)) == [2, 3, 4]


def test_keep_last_counts_group_checkpoints_and_no_group_checkpoint_yet_is_the_own_rule() -> None:
    commits = [{"commit": g, "time_ns": GT[g], "members": {"a": OWN["a"][g], "b": OWN["b"][g]}} for g in GT]
    for m in ("a", "b"):
        cps = _own_cps(m)
        dropped = group_drop(Policy(keep_last=2), m, cps, commits, 0)
        assert _groups_kept(m, {c.id for c in cps} - set(dropped)) == [4, 5]
    # b before its first group checkpoint: its own rule on its own checkpoints
    cps = _own_cps("b")[:2]
    assert group_drop(Policy(keep_last=1), "b", cps, commits, 0) == [0]
    # every group checkpoint kept: an own checkpoint from before the group goes only by the
    # own rule (keep_last=7 keeps all seven; keep_within 4h15m, counted from G5, keeps G1 but
    # neither the seed nor b's checkpoint alone, half an hour before G1)
    cps = _own_cps("b")
    assert group_drop(Policy(keep_last=7), "b", cps, commits, 0) == []
    assert group_drop(Policy(keep_last=None, keep_within=4.25 * 3600), "b", cps, commits, GT[5]) == [0, 1]


class TimedLog(FakeLog):
    """FakeLog whose markers carry a time, as the real ordered log's do."""

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[int, int] = {}

    def add_at(self, records: list, time_ns: int) -> int:
        n = self.add(records)
        self.times[n] = time_ns
        return n

    def checkpoints(self, after: int) -> list:
        return [SimpleNamespace(marker=SimpleNamespace(checkpoint=n, time_ns=self.times.get(n, 0), label=f"c{n}"))
                for n in sorted(self.batches) if n > after]


def test_the_members_updaters_prune_to_the_same_group_checkpoints(tmp_path: Path) -> None:
    """The updater's own path (apply, finish, retain after every batch), each member with
    the policy its daemon builds and its own clock."""
    p = _group(tmp_path, OWN)
    envs = {}
    try:
        for m in ("a", "b"):
            (tmp_path / f"m-{m}").mkdir()
            e = envs[m] = Env(tmp_path / f"m-{m}")
            e.log = TimedLog()
            e.updater.olog = e.log
            e.updater.history.policy = retention_policy(None, W, (str(p), m))
            if m == "b":                                  # alone, before it joined the group
                e.rec.create(b"alone", 0o644, b"x")
                e.log.add_at(e.rec.take(), T - H // 2)
                e.updater.history.clock = lambda: T - H // 2 + 5 * MS
                assert e.updater.run_once() == 1
        for g in sorted(GT):
            for m, e in envs.items():
                e.rec.create(b"g%d" % g, 0o644, b"%d" % g)
                assert e.log.add_at(e.rec.take(), GT[g] + DELAY[m]) == OWN[m][g]
                e.updater.history.clock = (lambda g=g, m=m: GT[g] + (1 if m == "a" else 10) * MS)
                assert e.updater.run_once() == OWN[m][g]
        kept = {m: _groups_kept(m, {c.id for c in history.retained(e.shadow.root, e.shadow.applied)})
                for m, e in envs.items()}
        assert kept == {"a": [3, 4, 5], "b": [3, 4, 5]}
    finally:
        for e in envs.values():
            e.close()
