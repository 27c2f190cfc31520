"""Units of consistency groups: the group file's validation, the commit log's
verdicts, and the Checkpointer's phases that a group member drives one by one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fusejournal.acquisition import Checkpointer
from fusejournal.group import CommitLog, GroupFileError, load_group
from fusejournal.halt import Halt
from fusejournal.log import OrderedLog
from fusejournal.records import Mkdir, Write
from fusejournal.tempstore import TempStore


def write_group(tmp: Path, members: str, group: str = 'name = "g"\njournal = "gj"\n') -> Path:
    p = tmp / "g.toml"
    p.write_text(f"[group]\n{group}\n{members}")
    return p


def member(name: str, source: str, **more: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in more.items())
    return f'[[member]]\nname = "{name}"\nsource = "{source}"\n{extra}\n'


@pytest.fixture
def srcs(tmp_path: Path) -> Path:
    for d in ("a", "b", "c", "a/inner"):
        (tmp_path / d).mkdir()
    return tmp_path


def error_of(path: Path) -> str:
    with pytest.raises(GroupFileError) as ei:
        load_group(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"group file {path}: ") or "does not exist" in msg, msg
    return msg


def test_a_valid_group_file_and_its_defaults(srcs: Path) -> None:
    p = write_group(srcs, member("db", "a") + member("up", "b", shadow="sh/up", mountpoint="c"),
                    group='name = "shop"\njournal = "gj"\nhalt_timeout = 2\n')
    g = load_group(p)
    assert g.name == "shop" and g.journal == srcs / "gj" and g.halt_timeout == 2.0
    db, up = g.members
    assert (db.name, db.source, db.mountpoint) == ("db", srcs / "a", srcs / "a")      # in place
    assert db.journal == srcs / "gj/members/db/journal" and db.shadow == srcs / "gj/members/db/shadow"
    assert up.shadow == srcs / "sh/up" and up.mountpoint == srcs / "c"
    assert g.member_socket("db").parent == g.run_dir == srcs / "gj/run"


@pytest.mark.parametrize("members, group, expect", [
    (member("x", "a") + member("x", "b"), None, "duplicate member name 'x'"),
    (member("x", "a") + member("y", "a/inner"), None, "member 'y' (source {t}/a/inner) is inside member 'x'"),
    (member("x", "a/inner") + member("y", "a"), None, "member 'x' (source {t}/a/inner) is inside member 'y'"),
    (member("x", "a") + member("y", "b/../a"), None, "members 'x' and 'y' have the same source"),
    (member("x", "a") + member("y", "nope"), None, "member 'y': source {t}/nope does not exist"),
    (member("x", "a") + member("y", "b", colour="red"), None, "unknown key 'colour' in [[member]] #2"),
    (member("x", "a"), 'name = "g"\njournal = "gj"\nspeed = 3\n', "unknown key 'speed' in [group]"),
    (member("x", "a") + "[extra]\nk = 1\n", None, "unknown key 'extra'"),
    ('[[member]]\nname = 7\nsource = "a"\n', None, "[[member]] #1.name must be a string, not int"),
    (member("x", "a"), 'name = "g"\njournal = "gj"\nhalt_timeout = "5"\n', "[group].halt_timeout must be a number"),
    (member("x", "a"), 'name = "g"\njournal = "gj"\nhalt_timeout = true\n', "[group].halt_timeout must be a number"),
    (member("x", "a"), 'name = "g"\njournal = "gj"\nhalt_timeout = -1\n', "halt_timeout must be a positive"),
    ("", None, "no [[member]] tables"),
    ('member = "a"\n', None, "unknown key 'member' in [group]"),
    (member("x", "a"), 'journal = "gj"\n', "[group] has no 'name'"),
    ('[[member]]\nname = "x"\n', None, "[[member]] #1 has no 'source'"),
    (member("../x", "a"), None, "member name '../x' must be"),
    (member("x", "a") + member("y", "b"), 'name = "g"\njournal = "a/j"\n', "the group journal {t}/a/j must not be inside member 'x'"),
    (member("x", "a", shadow="b/s") + member("y", "b"), None, "member 'x''s shadow {t}/b/s must not be inside member 'y'"),
    (member("x", "a", shadow="s") + member("y", "b", shadow="s"), None, "are the same directory"),
    (member("x", "a") + member("y", "b", mountpoint="a"), None, "have the same mountpoint"),
    ("[group\n", "", "not valid TOML"),
])
def test_bad_group_files_are_refused_with_one_line(srcs: Path, members: str, group: str | None,
                                                  expect: str) -> None:
    p = write_group(srcs, members, group) if group is not None else write_group(srcs, members)
    msg = error_of(p)
    assert expect.format(t=srcs) in msg, msg
    assert not (srcs / "gj").exists()            # nothing created


def test_missing_unreadable_and_non_utf8_group_files(tmp_path: Path) -> None:
    with pytest.raises(GroupFileError, match="does not exist"):
        load_group(tmp_path / "none.toml")
    with pytest.raises(GroupFileError, match="is a directory"):
        load_group(tmp_path)
    p = tmp_path / "g.toml"
    p.write_bytes(b"[group]\nname = \"\xff\"\n")
    with pytest.raises(GroupFileError, match="not UTF-8"):
        load_group(p)


def test_member_must_be_an_array_of_tables(tmp_path: Path) -> None:
    p = tmp_path / "g.toml"
    p.write_text('member = "a"\n[group]\nname = "g"\njournal = "gj"\n')
    assert "member must be an array of tables ([[member]])" in error_of(p)


def test_a_source_that_is_a_file_or_a_symlinked_duplicate(srcs: Path) -> None:
    (srcs / "f").write_text("x")
    assert f"source {srcs}/f is not a directory" in error_of(write_group(srcs, member("x", "f")))
    os.symlink(srcs / "a", srcs / "link")
    assert "have the same source" in error_of(write_group(srcs, member("x", "a") + member("y", "link")))


def test_a_group_journal_too_long_for_its_sockets(srcs: Path) -> None:
    long = "j" * 120
    msg = error_of(write_group(srcs, member("x", "a"), f'name = "g"\njournal = "{long}"\n'))
    assert "too long for its sockets" in msg


# ------------------------------------------------------------ the commit log

def test_commit_log_verdicts(tmp_path: Path) -> None:
    c = CommitLog(tmp_path / "commits.jsonl")
    c.refresh()
    assert c.last_id == 0 and c.verdict("a", 1) is None
    c.append({"commit": 1, "members": {"a": 1, "b": 1}}, durable=True)
    c.append({"abort": 2, "members": {"a": 2}}, durable=False)       # a's batch 2 was durable, b's not
    assert c.verdict("a", 1) is True and c.verdict("b", 1) is True
    assert c.verdict("a", 2) is False                                 # an abort names it
    assert c.verdict("b", 2) is None                                  # b's own 2 is not decided yet
    c.append({"commit": 3, "members": {"a": 3, "b": 3}}, durable=True)
    assert c.verdict("b", 2) is False                                 # a later one of b's is committed
    assert c.verdict("a", 3) is True and c.last_id == 3 and c.last_committed == 3
    assert c.commit_record(3)["members"] == {"a": 3, "b": 3} and c.commit_record(2) is None


def test_commit_log_ignores_torn_and_corrupt_lines(tmp_path: Path) -> None:
    path = tmp_path / "commits.jsonl"
    c = CommitLog(path)
    c.append({"commit": 1, "members": {"a": 1}}, durable=True)
    with open(path, "ab") as f:
        f.write(b'00000000 {"commit":2,"members":{"a":2}}\n')       # wrong checksum
        f.write(b'1234abcd {"commit":3,"mem')                        # torn by a crash
    fresh = CommitLog(path)
    fresh.refresh()
    assert fresh.last_committed == 1 and fresh.verdict("a", 2) is None and fresh.verdict("a", 3) is None


# ------------------------------------------------------------ the Checkpointer's phases

def make_checkpointer(tmp_path: Path) -> tuple[Checkpointer, TempStore, OrderedLog]:
    store = TempStore(tmp_path / "spill")
    log = OrderedLog(tmp_path / "log")
    log.open()
    return Checkpointer(store, Halt(), log, halt_timeout=1.0), store, log


def recs(store: TempStore) -> list:
    return list(store.take())


async def test_a_hold_that_fails_puts_the_batch_back_and_opens_the_gate(tmp_path: Path) -> None:
    cp, store, log = make_checkpointer(tmp_path)
    store.append(Mkdir(0o40755, 0, 0, 1, 1, b"d"))
    seen = []

    async def hold() -> None:
        seen.append(cp.halt.is_halted)         # still halted while the member waits for release
        raise RuntimeError("no release")
    with pytest.raises(RuntimeError):
        await cp.take("x", hold)
    assert seen == [True] and not cp.halt.is_halted
    assert store.operations == 1 and log.last_checkpoint == 0


async def test_an_aborted_durable_batch_comes_back_in_front(tmp_path: Path) -> None:
    cp, store, log = make_checkpointer(tmp_path)
    first = Write(5, 0, 1, b"before")
    later = Write(5, 6, 2, b"after")
    store.append(first)
    taken = await cp.take("g1")
    info = await cp.append(taken, {"group": "g", "group_checkpoint": 1})
    assert log.last_checkpoint == 1 and info.marker.extra["group_checkpoint"] == 1
    store.append(later)                         # arrived after the release
    cp.restore(taken, "group checkpoint 1 aborted")
    assert recs(store) == [first, later]
    assert cp.last_error == "group checkpoint 1 aborted"


async def test_checkpoint_is_take_append_confirm(tmp_path: Path) -> None:
    cp, store, log = make_checkpointer(tmp_path)
    confirmed = []
    cp.on_confirmed = confirmed.append
    store.append(Write(5, 0, 1, b"x"))
    m = await cp.checkpoint("one")
    assert m.checkpoint == 1 and m.operations == 1 and store.operations == 0
    assert [i.marker.checkpoint for i in confirmed] == [1] and cp.halt_history


def test_the_group_journal_is_private_and_no_symlink(srcs: Path) -> None:
    from fusejournal.group import ensure_run_dir
    g = load_group(write_group(srcs, member("x", "a")))
    ensure_run_dir(g)
    for d in (g.journal, g.run_dir):
        assert os.stat(d).st_mode & 0o777 == 0o700
    elsewhere = srcs / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, srcs / "gj2")
    g2 = load_group(write_group(srcs, member("x", "a"), 'name = "g"\njournal = "gj2"\n'))
    with pytest.raises(GroupFileError, match="is a symlink"):
        ensure_run_dir(g2)
    assert not (elsewhere / "run").exists()
