"""``status --group``: ``retained_group_checkpoints`` is a list whatever the members' state.

While a member's shadow is seeded it holds no checkpoint, so no group checkpoint is retained
by every member: that is an empty list (and the reason beside it, in
``retained_group_checkpoints_error``), never a string in place of the list — a script reading
``status --group --json`` indexes or iterates it (it read ``"unknown (member 'b': the shadow
... is being seeded ...)"`` before)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fusejournal import cli, layout
from fusejournal.group import CommitLog, load_group


def _group(tmp: Path) -> Path:
    for d in ("a", "b"):
        (tmp / d).mkdir()
    p = tmp / "g.toml"
    p.write_text('[group]\nname = "g"\njournal = "gj"\n'
                 '[[member]]\nname = "a"\nsource = "a"\n\n[[member]]\nname = "b"\nsource = "b"\n')
    return p


def _shadow_at(root: Path, applied: int) -> None:
    (root / layout.SHADOW_TREE).mkdir(parents=True)
    (root / layout.SHADOW_APPLIED).write_text(json.dumps({"applied": applied}))


def _status(p: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    cli.main(["status", "--group", os.fspath(p), "--json"])       # (exit 3: members not mounted)
    return json.loads(capsys.readouterr().out)


def test_retained_group_checkpoints_is_a_list_while_a_member_is_seeded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _group(tmp_path)
    g = load_group(p, check=False)
    g.journal.mkdir()
    CommitLog(g.commits_path).append({"commit": 1, "label": "one", "time_ns": 1, "halt_ns": 0,
                                      "members": {"a": 1, "b": 1}}, durable=False)
    a, b = (m.shadow for m in g.members)
    _shadow_at(a, 1)
    b.mkdir(parents=True)
    (b / layout.SHADOW_SEEDING).write_text("{}")                    # b is being seeded
    st = _status(p, capsys)
    assert st["retained_group_checkpoints"] == []
    why = st["retained_group_checkpoints_error"]
    assert "member 'b'" in why and "seeded" in why and "\n" not in why
    # the text form says the same
    cli.main(["status", "--group", os.fspath(p)])
    out = capsys.readouterr().out
    assert "retained_group_checkpoints: []\n" in out and "retained_group_checkpoints_error: member 'b'" in out

    # b's seed done: the same keys, the same types
    (b / layout.SHADOW_SEEDING).unlink()
    _shadow_at(b, 1)
    st = _status(p, capsys)
    assert st["retained_group_checkpoints"] == [1]
    assert st["retained_group_checkpoints_error"] is None
