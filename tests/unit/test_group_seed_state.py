"""The group's first complete group checkpoint (fusejournal/groupseed.py, ``first_complete``):
the first group checkpoint at which every member's shadow is complete, from the members'
seeded.json and the commit log; the maximum of the members' own."""

from __future__ import annotations

import json
from pathlib import Path

from fusejournal.group import CommitLog, parse_group
from fusejournal.groupseed import first_complete


def group_of(tmp: Path, names: str = "abc"):
    text = f'[group]\nname = "g"\njournal = "{tmp / "gj"}"\n'
    for n in names:
        (tmp / n).mkdir()
        text += f'\n[[member]]\nname = "{n}"\nsource = "{tmp / n}"\n'
    (tmp / "gj").mkdir()
    return parse_group(text, tmp / "group.toml")


def shadow(g, name: str, *, seeding: bool = False, seeded: dict | None = None, applied: int | None = None) -> None:
    root = g.member(name).shadow
    root.mkdir(parents=True, exist_ok=True)
    if seeding:
        (root / "seeding.json").write_text(json.dumps({"started_ns": 1, "first_period": 1}))
    if seeded is not None:
        (root / "seeded.json").write_text(json.dumps(seeded))
    if applied is not None:
        (root / "applied.json").write_text(json.dumps({"applied": applied}))


def commits(g, lines: list[dict]) -> CommitLog:
    log = CommitLog(g.commits_path)
    for rec in lines:
        log.append(rec, durable=False)
    log.refresh()
    return log


def test_the_maximum_of_the_members_and_none_while_one_seeds(tmp_path: Path) -> None:
    g = group_of(tmp_path)
    log = commits(g, [{"commit": 1, "members": {"a": 1, "b": 1, "c": 1}},
                      {"abort": 2, "members": {"a": 2}},
                      {"commit": 3, "members": {"a": 3, "b": 2, "c": 2}},
                      {"commit": 4, "members": {"a": 4, "b": 3, "c": 3}}])
    shadow(g, "a", seeded={"first_complete": 3, "group_checkpoint": 3}, applied=4)     # online, at G3
    shadow(g, "b", seeded={"first_complete": 0, "online": False}, applied=3)          # before the mount
    shadow(g, "c", seeding=True, seeded={"first_complete": 0})                        # a re-seed going on
    first, parts = first_complete(g, log)
    assert first is None and parts["c"].seeding and parts["c"].why == "being seeded"
    assert parts["a"].complete_at == 3 and parts["b"].complete_at == 0
    (g.member("c").shadow / "seeding.json").unlink()
    shadow(g, "c", seeded={"first_complete": 3, "group_checkpoint": 4}, applied=3)
    assert first_complete(g, log)[0] == 4


def test_a_member_seeded_before_its_mount_counts_from_the_group_checkpoint_naming_it(tmp_path: Path) -> None:
    g = group_of(tmp_path, "ab")
    log = commits(g, [{"commit": 1, "members": {"a": 1, "b": 1}},
                      {"commit": 2, "members": {"a": 2, "b": 3}}])
    shadow(g, "a", seeded={"first_complete": 0}, applied=2)
    shadow(g, "b", seeded={"first_complete": 2, "online": False}, applied=3)   # (its own id 2: aborted)
    assert first_complete(g, log)[0] == 2
    shadow(g, "b", seeded={"first_complete": 4}, applied=4)
    first, parts = first_complete(g, log)
    assert first is None and "not yet in a group checkpoint" in parts["b"].why


def test_a_member_never_mounted_has_no_complete_shadow(tmp_path: Path) -> None:
    g = group_of(tmp_path, "ab")
    shadow(g, "a", seeded={"first_complete": 0}, applied=0)
    first, parts = first_complete(g, CommitLog(g.commits_path))
    assert first is None and parts["b"].complete_at is None and "never seeded" in parts["b"].why
