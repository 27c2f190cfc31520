"""An adversary's group files, and the group commit log on a disk that fails.

Every bad group file gets one line naming the file (GroupFileError), and
nothing is created: the checks run before the group journal exists.  These are
the cases tests/unit/test_group_file.py did not try: what is not a regular
file, what is too big, and how members lie relative to each *other's*
directories (each member's daemon checks its own, but only when it mounts,
after the members before it were mounted and seeded).

The commit log: a line torn by a crash or cut short by a full disk must not
swallow the next committed line (which the coordinator then reported as
committed to the caller of setfattr).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusejournal import group as group_mod
from fusejournal.group import CommitLog, GroupFileError, load_group

MAX_GROUP_FILE = getattr(group_mod, "MAX_GROUP_FILE", 1 << 20)


def write_group(tmp: Path, members: str, group: str = 'name = "g"\njournal = "gj"\n') -> Path:
    p = tmp / "g.toml"
    p.write_text(f"[group]\n{group}\n{members}")
    return p


def member(name: str, source: str, **more: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in more.items())
    return f'[[member]]\nname = "{name}"\nsource = "{source}"\n{extra}\n'


@pytest.fixture
def srcs(tmp_path: Path) -> Path:
    for d in ("a", "b", "c", "a/inner", "keep", "keep/inner", "keep/tree"):
        (tmp_path / d).mkdir()
    return tmp_path


def error_of(path: Path) -> str:
    with pytest.raises(GroupFileError) as ei:
        load_group(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"group file {path}"), msg
    return msg


# ------------------------------------------------------------ what is not a group file


def test_a_fifo_or_a_device_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO blocked the open forever; /dev/zero was read until memory ran out.  Run in a
    subprocess with a timeout, so that the old behaviour fails this test instead of hanging
    (or exhausting) the test run."""
    fifo = tmp_path / "g.fifo"
    os.mkfifo(fifo)
    code = ("import sys\n"
            "from fusejournal.group import GroupFileError, load_group\n"
            "try:\n"
            "    load_group(sys.argv[1])\n"
            "except GroupFileError as e:\n"
            "    print(e)\n")
    for path, what in ((fifo, "is not a regular file"), ("/dev/null", "is not a regular file")):
        r = subprocess.run([sys.executable, "-c", code, os.fspath(path)], capture_output=True, text=True,
                           timeout=20)
        assert r.returncode == 0 and r.stdout.strip() == f"group file {path} {what}", (r.stdout, r.stderr)
    # /dev/zero: only with a memory limit, so that the old behaviour fails instead of eating the machine
    r = subprocess.run([sys.executable, "-c", "import resource; resource.setrlimit(resource.RLIMIT_AS, "
                        "(1 << 30, 1 << 30))\n" + code, "/dev/zero"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "group file /dev/zero is not a regular file", \
        (r.stdout, r.stderr[-500:])


def test_a_huge_group_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    p = tmp_path / "g.toml"
    p.write_bytes(b"#" * (MAX_GROUP_FILE + 1))
    assert "larger than 1 MiB" in error_of(p)
    with open(p, "wb") as f:               # sparse: 4 GiB that would all be read and decoded
        f.truncate(4 << 30)
    msg = error_of(p)
    assert "larger than 1 MiB" in msg, msg


def test_a_group_file_just_under_the_limit_is_read(srcs: Path) -> None:
    p = write_group(srcs, member("x", "a"))
    text = p.read_text()
    p.write_text(text + "#" * (MAX_GROUP_FILE - len(text.encode()) - 1) + "\n")
    assert load_group(p).members[0].name == "x"


@pytest.mark.parametrize("raw, expect", [
    (b"[group]\nname = \"g\"\njournal = \"gj\"\n\xff\xfe", "not UTF-8"),
    (b"\xef\xbb\xbf[group]\n", "not valid TOML"),                   # a BOM: one line too
    (b"[group]\nname = \"g\"\njournal = \"gj\"\n[[member]]\nname = \"x\"\nsource = \"a\0\"\n", "not valid TOML"),
    (b"[group]\nname = \"g\"\njournal = \"gj\"\n[[member]]\nname = \"x\"\nsource = \"a\\u0000\"\n",
     "must not be empty or contain NUL"),
    (b"[group]\nname = \"g\"\n" + b"".join(b"x%d = 1\n" % i for i in range(20000)), "unknown key 'x0' in [group]"),
    (b"[group]\nname = \"g\"\njournal = \"gj\"\nname = \"h\"\n", "not valid TOML"),     # a duplicate key
    (b"[[group]]\nname = \"g\"\n", "[group] must be a table"),
    (b"[group]\nname = \"g\"\njournal = \"gj\"\n[member]\nname = \"x\"\nsource = \"a\"\n",
     "member must be an array of tables"),
    (b"[group]\nname = \"g\"\njournal = \"gj\"\n[[member]]\nname = \"x\"\nsource = [\"a\"]\n",
     "[[member]] #1.source must be a string, not list"),
    (b"[group]\nname = \"g\"\njournal = \"gj\"\nkeep_last = 2.5\n[[member]]\nname = \"x\"\nsource = \"a\"\n",
     "[group].keep_last must be a whole number, not float"),
    (b"[group]\nname = \"g\"\njournal = \"gj\"\nhalt_timeout = inf\n[[member]]\nname = \"x\"\nsource = \"a\"\n",
     "halt_timeout must be a positive number of seconds"),
    (b"[group]\nname = \"g\"\njournal = \"gj\"\nhalt_timeout = nan\n[[member]]\nname = \"x\"\nsource = \"a\"\n",
     "halt_timeout must be a positive number of seconds"),
    (b"[group]\nname = \"g\\nh\"\njournal = \"gj\"\n[[member]]\nname = \"x\"\nsource = \"a\"\n",
     "[group].name 'g\\nh' must be 1-64 letters"),
    (b"[group]\nname = \"g\"\njournal = \"gj\"\n[[member]]\nname = \"" + "\u00e9".encode() + b"\"\nsource = \"a\"\n",
     "member name '\u00e9' must be 1-64 letters"),
    (b"[group]\nname = \"g\"\njournal = \"gj\"\n[[member]]\nname = \"" + b"m" * 65 + b"\"\nsource = \"a\"\n",
     "must be 1-64 letters"),
], ids=["not UTF-8", "a BOM", "a raw NUL", "an escaped NUL", "20000 unknown keys", "a duplicate key",
        "[[group]]", "[member]", "a list", "a float keep_last", "inf", "nan", "a newline in the name",
        "a non-ASCII name", "a 65-character name"])
def test_odd_group_files_get_one_line(srcs: Path, raw: bytes, expect: str) -> None:
    p = srcs / "g.toml"
    p.write_bytes(raw)
    msg = error_of(p)
    assert expect in msg, msg
    assert not (srcs / "gj").exists()


# ------------------------------------------------------------ members and each other's directories


@pytest.mark.parametrize("members, group, expect", [
    # one member's source inside another member's shadow or journal, or inside the group journal
    (member("x", "a", shadow="keep") + member("y", "keep/inner"), None,
     "member 'y''s source {t}/keep/inner must not be inside member 'x''s shadow {t}/keep"),
    (member("x", "a", journal="keep") + member("y", "keep/inner"), None,
     "member 'y''s source {t}/keep/inner must not be inside member 'x''s journal {t}/keep"),
    (member("x", "a") + member("y", "keep/inner"), 'name = "g"\njournal = "keep"\n',
     "member 'y''s source {t}/keep/inner must not be inside the group journal {t}/keep"),
    # a member's journal or shadow inside another member's journal or shadow
    (member("x", "a", shadow="keep") + member("y", "b", journal="keep/tree/j"), None,
     "member 'y''s journal {t}/keep/tree/j must not be inside member 'x''s shadow {t}/keep"),
    (member("x", "a", journal="keep") + member("y", "b", shadow="keep/s"), None,
     "member 'y''s shadow {t}/keep/s must not be inside member 'x''s journal {t}/keep"),
    # the group journal inside (or being) a member's journal or shadow
    (member("x", "a", shadow="keep") + member("y", "b"), 'name = "g"\njournal = "keep/tree/gj"\n',
     "the group journal {t}/keep/tree/gj must not be member 'x''s shadow {t}/keep or lie inside it"),
    (member("x", "a", journal="gj") + member("y", "b"), None,
     "the group journal {t}/gj must not be member 'x''s journal {t}/gj or lie inside it"),
    # a mountpoint inside another member's source (or mountpoint), its own source, a state directory
    (member("x", "a") + member("y", "b", mountpoint="a/inner"), None,
     "member 'y''s mountpoint {t}/a/inner must not be inside member 'x''s source {t}/a"),
    (member("x", "a", mountpoint="keep") + member("y", "b", mountpoint="keep/inner"), None,
     "member 'y''s mountpoint {t}/keep/inner must not be inside member 'x''s mountpoint {t}/keep"),
    (member("x", "a", mountpoint="a/inner") + member("y", "b"), None,
     "member 'x''s mountpoint {t}/a/inner must not be inside its source {t}/a"),
    (member("x", "a", shadow="keep") + member("y", "b", mountpoint="keep/inner"), None,
     "member 'y''s mountpoint {t}/keep/inner must not be inside member 'x''s shadow {t}/keep"),
    (member("x", "a") + member("y", "b", mountpoint="keep/inner"), 'name = "g"\njournal = "keep"\n',
     "member 'y''s mountpoint {t}/keep/inner must not be inside the group journal {t}/keep"),
], ids=["source in a shadow", "source in a journal", "source in the group journal", "journal in a shadow",
        "shadow in a journal", "group journal in a shadow", "group journal is a journal",
        "mountpoint in a source", "mountpoint in a mountpoint", "mountpoint in its own source",
        "mountpoint in a shadow", "mountpoint in the group journal"])
def test_members_inside_each_others_directories(srcs: Path, members: str, group: str | None,
                                                expect: str) -> None:
    p = write_group(srcs, members, group) if group is not None else write_group(srcs, members)
    msg = error_of(p)
    assert expect.format(t=srcs) in msg, msg
    assert not (srcs / "gj").exists() and not (srcs / "keep" / "members").exists()


def test_a_member_source_or_mountpoint_through_a_symlink(srcs: Path) -> None:
    """A mount is made where the path leads; the group would look for it by the symlink's
    path (umount --group skipped it: the member stayed mounted)."""
    os.symlink(srcs / "b", srcs / "blink")
    msg = error_of(write_group(srcs, member("x", "a") + member("y", "blink")))
    assert f"member 'y': source {srcs}/blink is a symlink or lies below one: name the real directory " \
           f"{srcs}/b" in msg, msg
    os.symlink(srcs / "keep", srcs / "klink")            # a symlink above: the same
    msg = error_of(write_group(srcs, member("x", "a") + member("y", "klink/inner")))
    assert f"name the real directory {srcs}/keep/inner" in msg, msg
    msg = error_of(write_group(srcs, member("x", "a") + member("y", "b", mountpoint="klink/inner")))
    assert f"member 'y': mountpoint {srcs}/klink/inner is a symlink" in msg, msg
    assert not (srcs / "gj").exists()
    # the real directories are fine
    assert [m.name for m in load_group(write_group(srcs, member("x", "a") + member("y", "b"))).members] == \
        ["x", "y"]


def test_the_default_layout_is_still_accepted(srcs: Path) -> None:
    """The members' journals and shadows inside the group journal (the default), a member
    mounted elsewhere: none of the checks above refuses them."""
    g = load_group(write_group(srcs, member("x", "a") + member("y", "b", mountpoint="c", shadow="keep/s2")))
    assert [m.journal for m in g.members] == [srcs / "gj/members/x/journal", srcs / "gj/members/y/journal"]


# ------------------------------------------------------------ the commit log when a write fails


def test_a_short_write_leaves_nothing_in_front_of_the_next_line(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk cuts a commit line short (write returns less): the append fails (the
    coordinator aborts that group checkpoint), and the next group checkpoint's line, which
    the coordinator reports as committed, must count: it did not (it was read as the tail
    of the torn line, its checksum wrong), so no member ever applied it."""
    path = tmp_path / "commits.jsonl"
    c = CommitLog(path)
    c.append({"commit": 1, "members": {"a": 1, "b": 1}}, durable=True)
    real_write = os.write

    def half(fd: int, data: bytes) -> int:
        return real_write(fd, data[:len(data) // 2])
    monkeypatch.setattr(group_mod.os, "write", half)       # (os.write itself: only for this call)
    try:
        with pytest.raises(OSError) as ei:
            c.append({"commit": 2, "members": {"a": 2, "b": 2}}, durable=True)
    finally:
        monkeypatch.undo()
    assert ei.value.errno == errno.EIO and "short write" in str(ei.value)
    assert path.read_bytes().endswith(b"\n")                   # nothing of line 2 is left
    c.append({"commit": 3, "members": {"a": 3, "b": 3}}, durable=True)
    fresh = CommitLog(path)
    fresh.refresh()
    assert [r["commit"] for r in fresh.commits] == [1, 3]
    assert fresh.verdict("a", 3) is True and fresh.verdict("b", 3) is True
    assert fresh.verdict("a", 2) is False                       # never committed


def test_a_line_torn_by_a_crash_does_not_swallow_the_next(tmp_path: Path) -> None:
    """A power loss in the middle of a write leaves a line without its newline; the next
    coordinator appends after it: that line must still count."""
    path = tmp_path / "commits.jsonl"
    c = CommitLog(path)
    c.append({"commit": 1, "members": {"a": 1}}, durable=True)
    line = group_mod._line({"commit": 2, "members": {"a": 2}})
    with open(path, "ab") as f:
        f.write(line[:20])                                      # torn: no newline
    again = CommitLog(path)
    again.refresh()
    assert again.last_committed == 1
    again.append({"commit": 2, "members": {"a": 2}}, durable=True)     # the restarted coordinator
    fresh = CommitLog(path)
    fresh.refresh()
    assert [r["commit"] for r in fresh.commits] == [1, 2] and fresh.verdict("a", 2) is True
    assert again.commit_record(2) is not None


def test_a_failed_fdatasync_takes_the_line_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fdatasync fails (EIO): the caller is told the group checkpoint failed, so its line
    must not stay behind to be read as committed."""
    path = tmp_path / "commits.jsonl"
    c = CommitLog(path)
    c.append({"commit": 1, "members": {"a": 1}}, durable=True)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "injected")
    monkeypatch.setattr(group_mod.os, "fdatasync", eio)
    with pytest.raises(OSError):
        c.append({"commit": 2, "members": {"a": 2}}, durable=True)
    monkeypatch.undo()
    fresh = CommitLog(path)
    fresh.refresh()
    assert [r["commit"] for r in fresh.commits] == [1] and fresh.verdict("a", 2) is None


def test_the_commit_log_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "commits.jsonl").symlink_to(victim)
    with pytest.raises(OSError) as ei:
        CommitLog(tmp_path / "commits.jsonl").append({"commit": 1, "members": {}}, durable=True)
    assert ei.value.errno == errno.ELOOP
    assert victim.read_text() == "keep\n"


def test_labels_in_the_commit_log_stay_on_one_line(tmp_path: Path) -> None:
    """(The coordinator refuses a label with a newline; even so a commit line is one line.)"""
    c = CommitLog(tmp_path / "commits.jsonl")
    c.append({"commit": 1, "label": "a\nb\u2028c", "members": {"a": 1}}, durable=True)
    raw = (tmp_path / "commits.jsonl").read_bytes()
    assert raw.count(b"\n") == 1 and json.loads(raw.split(b" ", 1)[1])["label"] == "a\nb\u2028c"


# ------------------------------------------------------------ a loose group journal


def test_a_loose_group_journal_with_a_planted_symlink_is_refused(srcs: Path) -> None:
    """A group journal found writable by others (by hand, an older version) may hold what
    another user put there: a symlink where the coordinator writes its log, its commit log or
    (in run/) its pid file is refused in one line, before anything is written through it;
    without it the journal and run/ are made private (0700)."""
    from fusejournal.group import ensure_run_dir
    g = load_group(write_group(srcs, member("x", "a") + member("y", "b")))
    victim = srcs / "victim"
    victim.write_text("untouched\n")
    for d in (g.journal, g.run_dir):
        d.mkdir()
        os.chmod(d, 0o777)
    for planted in (g.journal / "coordinator.log", g.journal / "commits.jsonl", g.run_dir / "coordinator.pid"):
        planted.symlink_to(victim)
        with pytest.raises(GroupFileError) as ei:
            ensure_run_dir(g)
        assert "is a symlink" in str(ei.value) and "\n" not in str(ei.value), ei.value
        planted.unlink()
    assert victim.read_text() == "untouched\n"
    ensure_run_dir(g)
    assert (os.stat(g.journal).st_mode & 0o777, os.stat(g.run_dir).st_mode & 0o777) == (0o700, 0o700)
