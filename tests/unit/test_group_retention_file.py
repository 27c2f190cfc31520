"""Units of the group's time machine: retention in the group file ([group].keep_last,
keep_within), how mount --group passes it to every member, and which group checkpoints
count as retained (every member holds its own checkpoint of it)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from fusejournal import cli
from fusejournal.group import CommitLog, GroupFileError, load_group, points_from
from fusejournal.groupcli import _Before, _retention_argv
from fusejournal.history import Checkpoint


def write_group(tmp: Path, extra: str) -> Path:
    for d in ("a", "b"):
        (tmp / d).mkdir(exist_ok=True)
    p = tmp / "g.toml"
    p.write_text(f'[group]\nname = "g"\njournal = "gj"\n{extra}\n'
                 '[[member]]\nname = "a"\nsource = "a"\n\n[[member]]\nname = "b"\nsource = "b"\n')
    return p


def test_retention_keys_are_read(tmp_path: Path) -> None:
    g = load_group(write_group(tmp_path, 'keep_last = 5\nkeep_within = "2d"'))
    assert (g.keep_last, g.keep_within) == (5, 2 * 86400.0)
    g = load_group(write_group(tmp_path, ""))
    assert (g.keep_last, g.keep_within) == (None, None)


@pytest.mark.parametrize("extra, expect", [
    ("keep_last = 0", "[group].keep_last must be at least 1"),
    ("keep_last = -3", "[group].keep_last must be at least 1"),
    ("keep_last = 10000000", "at most 1000000"),
    ('keep_last = "5"', "[group].keep_last must be a whole number, not str"),
    ("keep_last = 2.5", "[group].keep_last must be a whole number, not float"),
    ("keep_last = true", "[group].keep_last must be a whole number, not bool"),
    ('keep_within = "soon"', "[group].keep_within: not a duration: 'soon'"),
    ('keep_within = "0s"', "[group].keep_within: not a positive duration: '0s'"),
    ('keep_within = ""', "[group].keep_within must not be empty"),
    ("keep_within = 3600", "[group].keep_within must be a string, not int"),
    ('keep_within = "99999999999999999999w"', "longer than 100 years"),
    ('keep_lats = 3', "unknown key 'keep_lats' in [group]"),
])
def test_bad_retention_is_one_line_and_nothing_is_created(tmp_path: Path, extra: str, expect: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    p = write_group(tmp_path, extra)
    with pytest.raises(GroupFileError) as ei:
        load_group(p)
    msg = str(ei.value)
    assert "\n" not in msg and expect in msg, msg
    # mount --group refuses it before starting, creating or seeding anything
    assert cli.main(["mount", "--group", os.fspath(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "gj").exists()
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "g.toml"]
    assert os.listdir(tmp_path / "a") == os.listdir(tmp_path / "b") == []


def ns(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"keep_last": None, "keep_within": None, **kw})


def test_every_member_gets_the_retention(tmp_path: Path) -> None:
    none = load_group(write_group(tmp_path, ""))
    assert _retention_argv(ns(), none) == []                            # members keep their default
    g = load_group(write_group(tmp_path, 'keep_last = 3\nkeep_within = "1h"'))
    assert _retention_argv(ns(), g) == ["--keep-last", "3", "--keep-within", "3600.000000000s"]
    # each option on the command line replaces the file's
    assert _retention_argv(ns(keep_last=7), g) == ["--keep-last", "7", "--keep-within", "3600.000000000s"]
    assert _retention_argv(ns(keep_within=90.0), g) == ["--keep-last", "3", "--keep-within", "90.000000000s"]
    # what a member's mount parses back is what was meant
    assert cli._duration("3600.000000000s") == 3600.0


def test_mount_group_takes_keep_options() -> None:
    a = cli.build_parser().parse_args(["mount", "--group", "g.toml", "--keep-last", "4", "--keep-within", "2h"])
    assert (a.group, a.keep_last, a.keep_within) == ("g.toml", 4, 7200.0)


def commits_with(tmp_path: Path, recs: list[dict[str, object]]) -> CommitLog:
    log = CommitLog(tmp_path / "commits.jsonl")
    for r in recs:
        log.append(r, durable=False)
    return log


def test_a_group_checkpoint_counts_only_if_every_member_retains_it(tmp_path: Path) -> None:
    g = load_group(write_group(tmp_path, ""))
    log = commits_with(tmp_path, [
        {"commit": 1, "label": "one", "time_ns": 10, "members": {"a": 1, "b": 1}},
        {"abort": 2, "members": {"a": 2, "b": 2}},
        {"commit": 3, "label": "three", "time_ns": 30, "members": {"a": 3, "b": 3}},
        {"commit": 4, "label": "four", "time_ns": 40, "members": {"a": 4, "b": 4}},
        {"commit": 5, "label": "five", "time_ns": 50, "members": {"a": 5}},          # damaged: no b
    ])
    have = {"a": {1, 3, 4, 5}, "b": {3, 4, 5}}                       # b pruned its 1
    pts = points_from(g, log, have)
    assert [(p.id, p.label, p.time_ns, p.members) for p in pts] == [
        (3, "three", 30, {"a": 3, "b": 3}), (4, "four", 40, {"a": 4, "b": 4})]
    assert [p.id for p in points_from(g, log, {"a": {1, 3}, "b": {1, 4}})] == [1]
    assert points_from(g, log, {"a": set(), "b": {1, 3, 4}}) == []


def test_the_prune_rule_of_a_member_is_a_prefix_and_keeps_its_latest() -> None:
    cps = [Checkpoint(n, n, "") for n in (3, 4, 6, 7)]
    assert _Before(keep_last=None, before=6).drop(cps, 0) == [3, 4]
    assert _Before(keep_last=None, before=99).drop(cps, 0) == [3, 4, 6]   # never the latest
    assert _Before(keep_last=None, before=1).drop(cps, 0) == []
