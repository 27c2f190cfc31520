"""An adversary's and a user's pass over retained checkpoints (history.py, history_view.py,
``browse --all``, ``browse --checkpoint N``, ``restore --checkpoint K``, ``prune``, ``log``)
and ``verify``: another uid, a low ``ulimit -n``, kill -9 of prune, real applications
(SQLite in WAL mode, git) read back from old checkpoints, bad input.

Every mount is a real one, started by the CLI in its own process; browse mounts are
unmounted in ``finally``.
"""

from __future__ import annotations

import os
import resource
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import FJ, Mounted, alive, fj, force_unmount, is_mounted, make_traversable, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess:
    """The CLI run by uid/gid 65534 (setpriv execs it with no capabilities left)."""
    return subprocess.run([*NOBODY, *FJ, *map(os.fspath, args)], capture_output=True, text=True,
                          timeout=120)


def one_line_error(r: subprocess.CompletedProcess) -> None:
    assert r.returncode != 0, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusejournal"), r.stderr
    assert "Traceback" not in r.stderr


@contextmanager
def browsing(m: Mounted, point: Path, *args: str, limit: int | None = None) -> Iterator[Path]:
    """``browse ARGS MOUNTPOINT POINT`` (the daemon under RLIMIT_NOFILE ``limit``), unmounted
    at the end even on failure."""
    point.mkdir(exist_ok=True)

    def lower() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    try:
        fj("browse", *args, m.mountpoint, point, preexec_fn=lower)
        yield point
    finally:
        if is_mounted(point):
            r = fj("umount", point, check=False)
            if r.returncode != 0:
                force_unmount(point)


def checkpoints(m: Mounted, count: int, change) -> dict[int, dict]:
    """``count`` checkpoints, each after ``change(i)``; the original's snapshot of each."""
    expected = {}
    for i in range(count):
        change(i)
        n = m.checkpoint(f"c{i}")
        expected[n] = snapshot(m.source)
    m.wait(max(expected))
    return expected


# ----------------------------------------------------------------- bad destinations

def test_restore_into_the_source_underneath_the_mount_is_refused(mounted: Mounted, tmp_path: Path) -> None:
    """A restore written into the original beside a separate mountpoint (or into the source
    of an unmounted journal) would change the original behind the journal: the shadow would
    differ from it with nothing recorded (promise 1).  It is refused like DEST inside the
    mount, and nothing is written.  (Before: the copy landed in the source; `verify` then
    listed it as missing in the shadow.)"""
    (mounted.mountpoint / "f").write_text("one")
    mounted.wait(mounted.checkpoint())
    for target in (mounted.mountpoint, mounted.journal):
        for dest in (mounted.source / "restored", mounted.source,
                     mounted.mountpoint / ".." / mounted.source.name / "sub"):
            r = fj("restore", target, dest, "--force", check=False)
            one_line_error(r)
            assert r.returncode == 2 and "inside the source" in r.stderr, r.stderr
    # through a symlink outside that points into the source
    (tmp_path / "sneaky").symlink_to(mounted.source)
    r = fj("restore", mounted.mountpoint, tmp_path / "sneaky" / "x", check=False)
    assert r.returncode == 2 and "inside the source" in r.stderr, r.stderr
    assert sorted(os.listdir(mounted.source)) == ["f"]
    assert fj("verify", mounted.mountpoint).returncode == 0


def test_restore_path_escapes_and_dest_in_history(mounted: Mounted, tmp_path: Path) -> None:
    """--path with '..', through a symlink that leaves the tree, absolute; DEST inside the
    shadow's history or the journal: one line, nothing written anywhere."""
    mp = mounted.mountpoint
    (mp / "d").mkdir()
    (mp / "d" / "f").write_text("x")
    os.symlink("/etc", mp / "out")
    os.symlink("..", mp / "d" / "up")
    n = mounted.checkpoint()
    (mp / "d" / "f").write_text("y")
    mounted.wait(mounted.checkpoint())
    for path in ("../etc", "d/../../etc", "out/passwd", "d/up/d/f", "out", "nothing"):
        dest = tmp_path / f"o{abs(hash(path))}"
        r = fj("restore", mounted.mountpoint, "--checkpoint", str(n), "--path", path, dest, check=False)
        if path == "out":                          # the symlink itself is restored as a symlink
            assert r.returncode == 0, r.stderr
            assert os.readlink(dest / "out") == "/etc"
            continue
        one_line_error(r)
        assert r.returncode == 2 and not dest.exists(), (path, r.stderr)
    fj("restore", mounted.mountpoint, "--checkpoint", str(n), "--path", "/d/f", tmp_path / "abs")
    assert (tmp_path / "abs" / "f").read_text() == "x"     # relative to the top of the tree
    for dest in (mounted.shadow / "history" / "x", mounted.journal / "x", mounted.shadow / "tree" / "x",
                 mounted.mountpoint / "d" / "x"):
        r = fj("restore", mounted.journal, "--checkpoint", str(n), dest, check=False)
        one_line_error(r)
        assert not os.path.lexists(dest), dest


def test_huge_and_odd_numbers(mounted: Mounted, tmp_path: Path) -> None:
    (mounted.mountpoint / "f").write_text("x")
    mounted.wait(mounted.checkpoint())
    big = "9" * 40
    p = tmp_path / "p"
    p.mkdir()
    for args in (["restore", mounted.mountpoint, "--checkpoint", big, tmp_path / "r"],
                 ["restore", mounted.mountpoint, "--checkpoint", "-1", tmp_path / "r"],
                 ["restore", mounted.mountpoint, "--checkpoint", "0x1", tmp_path / "r"],
                 ["browse", "--checkpoint", big, mounted.mountpoint, p],
                 ["prune", mounted.mountpoint, "--keep-last", "0"],
                 ["prune", mounted.mountpoint, "--keep-within", "1e400"],
                 ["prune", mounted.mountpoint, "--keep-within", "nan"],
                 ["prune", mounted.mountpoint, "--keep-within", "0s"]):
        r = fj(*args, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "r").exists() and not is_mounted(p)
    r = fj("prune", mounted.mountpoint, "--keep-last", big)
    assert "nothing to prune; retained: 0..1" in r.stdout
    r = fj("prune", mounted.mountpoint, "--keep-within", "9" * 30 + "d")
    assert "nothing to prune; retained: 0..1" in r.stdout
    assert sorted(x.name for x in (mounted.shadow / "history").glob("*.rev")) == ["0.rev"]


# ----------------------------------------------------------------- labels as names

def test_odd_labels_under_browse_all(mounted: Mounted, tmp_path: Path) -> None:
    """Labels that look like paths or the 'latest' entry; labels the control attribute must
    refuse (newline, not UTF-8, 4 KiB): EINVAL, no checkpoint taken, nothing lost."""
    mp = mounted.mountpoint
    (mp / "f").write_text("pending")
    for bad in (b"a\nb", b"caf\xe9", b"x" * 4096, b"\x01", b"", b"a\x00b"):
        with pytest.raises(OSError) as e:
            os.setxattr(mp, b"user.fusejournal.update_permission", bad)
        assert e.value.errno == 22, bad
        if b"\x00" not in bad:
            r = fj("checkpoint", mp, "--label", os.fsdecode(bad), check=False)
            assert r.returncode == 2 and "labels:" in r.stderr, (bad, r)
    assert int(os.getxattr(mp, b"user.fusejournal.checkpoint")) == 0
    expected = {}
    for label in ("a/b", "..", ".", " ", "latest", "0", "é" * 100):
        (mp / "f").write_text(label)
        n = mounted.checkpoint(label)
        expected[n] = snapshot(mounted.source)
    n = mounted.checkpoint("end")
    expected[n] = snapshot(mounted.source)
    mounted.wait(n)
    with browsing(mounted, tmp_path / "all", "--all") as point:
        names = os.listdir(point)
        assert sorted(names, key=lambda s: (len(s.split("-")[0]), s)) == [
            "0", "1-a_b", "2-..", "3-.", "4- ", "5-latest", "6-0", "7-" + "é" * 100, "8-end", "latest"]
        for name in names:
            if name != "latest" and name != "0":
                assert_same(expected[int(name.split("-")[0])], snapshot(point / name))
        # the names that look like '.', '..' and 'latest' are directories of their own
        assert (point / "2-..").is_dir() and (point / "3-.").is_dir()
        assert not (point / "5-latest").is_symlink()


# ----------------------------------------------------------------- another uid

def test_another_uid_cannot_prune_restore_verify_browse_or_grant(mounted: Mounted, tmp_path: Path) -> None:
    """uid 65534 against root's mount and journal (traversable, a world-readable source):
    every command refuses in one line and nothing in history changes; the control
    attributes stay root's (promise 5)."""
    mp = mounted.mountpoint
    for i in range(4):
        (mp / "f").write_text(str(i))
        mounted.wait(mounted.checkpoint(f"c{i}"))
    for p in (mounted.source, mounted.journal, mounted.shadow):
        make_traversable(p)
    os.chmod(mounted.source, 0o755)
    hist = mounted.shadow / "history"
    before = sorted(os.listdir(hist))
    own = tmp_path / "nobody"
    own.mkdir()
    os.chown(own, 65534, 65534)
    for args in (["prune", mp, "--keep-last", "1"], ["prune", mounted.journal, "--keep-last", "1"],
                 ["restore", mp, "--checkpoint", "1", own / "r"], ["restore", mounted.journal, own / "r"],
                 ["verify", mp], ["browse", "--all", mp, own], ["browse", "--checkpoint", "1", mp, own],
                 ["browse", "--all", mounted.journal, own], ["log", mounted.journal],
                 ["checkpoint", mp, "--label", "mine"]):
        r = as_nobody(*args)
        one_line_error(r)
        assert not is_mounted(own)
        assert os.listdir(own) == []
    for name, value in ((b"user.fusejournal.update_permission", b"x"),
                        (b"user.fusejournal.checkpoint", b"99"),
                        (b"user.fusejournal.shadow_checkpoint", b"99")):
        r = subprocess.run([*NOBODY, "setfattr", "-n", name, "-v", value, os.fspath(mp)],
                           capture_output=True, text=True)
        assert r.returncode != 0, (name, r)
    assert sorted(os.listdir(hist)) == before
    assert int(os.getxattr(mp, b"user.fusejournal.checkpoint")) == 4
    # given the MOUNTPOINT, the commands say why they refuse: its journal is root's
    for args in (["log", mp], ["status", mp], ["wait", mp]):
        r = as_nobody(*args)
        one_line_error(r)
        assert "ermission denied" in r.stderr, (args, r.stderr)
    assert "label" in fj("log", mp).stdout                  # root: the journal of the mount
    # nor can it reach the history, the seeding state or the lock through the shadow
    for target in (hist, hist / "1.rev", mounted.shadow / "applied.json", mounted.shadow / "browse.lock"):
        r = subprocess.run([*NOBODY, "cat", os.fspath(target)], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (target, r.stderr)


def test_browse_all_of_another_users_journal_is_refused_then_root_browses(mounted: Mounted,
                                                                           tmp_path: Path) -> None:
    """A browse point made by uid 65534 over root's journal is refused; root's own browse
    --all is private to root by default (65534 reads nothing there), and with -o allow_other
    keeps each checkpoint's owners and modes, so 65534 reads there exactly what it could read
    in the original at that checkpoint."""
    mp = mounted.mountpoint
    (mp / "secret").write_text("root only")
    os.chmod(mp / "secret", 0o600)
    (mp / "open").write_text("anyone")
    n = mounted.checkpoint()
    os.unlink(mp / "secret")
    mounted.wait(mounted.checkpoint())
    make_traversable(tmp_path)
    with browsing(mounted, tmp_path / "all", "--all") as point:
        name = next(x for x in os.listdir(point) if x.split("-")[0] == str(n))
        for f in ("secret", "open"):
            r = subprocess.run([*NOBODY, "cat", os.fspath(point / name / f)], capture_output=True, text=True)
            assert r.returncode != 0 and "Permission denied" in r.stderr, r
        assert (point / name / "secret").read_text() == "root only"
    with browsing(mounted, tmp_path / "pub", "--all", "-o", "allow_other") as point:
        name = next(x for x in os.listdir(point) if x.split("-")[0] == str(n))
        r = subprocess.run([*NOBODY, "cat", os.fspath(point / name / "secret")], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, r
        r = subprocess.run([*NOBODY, "cat", os.fspath(point / name / "open")], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == "anyone", r


# ----------------------------------------------------------------- kill -9 of prune

def test_prune_killed_between_two_checkpoints_then_everything_left_is_exact(mounted: Mounted,
                                                                              tmp_path: Path) -> None:
    """prune is SIGKILLed after it deleted the oldest reverse batch and before the next: the
    updater is not held (its locks died with it), every checkpoint still listed is restored
    exactly, browse --all shows the same set, and the next prune finishes the job."""
    mp = mounted.mountpoint

    def change(i: int) -> None:
        (mp / f"f{i}").write_bytes(os.urandom(3000))
        with open(mp / "f0", "r+b") as f:             # an overwrite: a pre-image in history
            f.write(b"%d" % i * 100)
        if i >= 2:                                     # a removal and a rename
            os.unlink(mp / f"f{i - 1}") if i % 2 else os.rename(mp / f"f{i - 1}", mp / f"g{i}")

    expected = {0: snapshot(mounted.source), **checkpoints(mounted, 6, change)}
    r = subprocess.run([*FJ, "prune", os.fspath(mp), "--keep-last", "2"], capture_output=True, text=True,
                       env={**os.environ, "FUSEJOURNAL_FAULT": "history.prune:3"}, timeout=120)
    assert r.returncode == -9, r
    change(6)
    n = mounted.checkpoint("after")
    expected[n] = snapshot(mounted.source)
    mounted.wait(n, timeout=30)                   # not held up by the dead prune's locks
    log = fj("log", mounted.journal).stdout
    left = [int(line.split()[0]) for line in log.split("retained in the shadow")[1].splitlines()[1:] if line.strip()]
    assert left == list(range(2, n + 1)), log
    with browsing(mounted, tmp_path / "all", "--all") as point:
        shown = sorted(int(x.split("-")[0]) for x in os.listdir(point) if x != "latest")
        assert shown == left
        for k in left:
            d = next(x for x in os.listdir(point) if x.split("-")[0] == str(k))
            assert_same(expected[k], snapshot(point / d))
    for k in left:
        fj("restore", mounted.journal, tmp_path / f"r{k}", "--checkpoint", str(k))
        assert_same(expected[k], snapshot(tmp_path / f"r{k}"))
    r = fj("prune", mp, "--keep-last", "2")
    assert f"retained: {n - 1}..{n}" in r.stdout, r.stdout
    fj("restore", mounted.journal, tmp_path / "last", "--checkpoint", str(n - 1))
    assert_same(expected[n - 1], snapshot(tmp_path / "last"))


# ----------------------------------------------------------------- low ulimit -n

@pytest.mark.parametrize("limit", [64, 128])
def test_browse_all_of_many_checkpoints_under_a_low_fd_limit(dirs: Mounted, tmp_path: Path,
                                                             limit: int) -> None:
    """A browse --all daemon under RLIMIT_NOFILE ``limit`` shows 40 checkpoints of a tree
    whose files each changed many times; every file of every checkpoint is read (and some
    kept open at once, more than the limit allows the daemon to keep) and equals it."""
    mounted = dirs
    mounted.mount("--keep-last", "100")
    mp = mounted.mountpoint
    expected = {0: snapshot(mounted.source)}
    (mp / "d").mkdir()

    def change(i: int) -> None:
        for j in range(10):
            (mp / "d" / f"{(i + j) % 25:02d}").write_bytes(b"%d:%d;" % (i, j) * (j + 1))

    expected.update(checkpoints(mounted, 40, change))
    with browsing(mounted, tmp_path / "all", "--all", limit=limit) as point:
        names = {int(x.split("-")[0]): x for x in os.listdir(point) if x != "latest"}
        assert sorted(names) == sorted(expected)
        held = []
        try:
            for k in sorted(expected):
                assert_same(expected[k], snapshot(point / names[k]))
                if k:
                    d = point / names[k] / "d"
                    held += [open(d / f, "rb") for f in sorted(os.listdir(d))[:3]]  # noqa: SIM115
            for f in held:
                f.seek(0)
                assert f.read()
        finally:
            for f in held:
                f.close()


def test_restore_of_a_deep_tree_under_a_low_fd_limit(mounted: Mounted, tmp_path: Path) -> None:
    """restore --checkpoint of a tree 300 directories deep, run under RLIMIT_NOFILE 64."""
    mp = mounted.mountpoint
    d = mp
    for i in range(300):
        d = d / f"l{i}"
        d.mkdir()
        (d / "f").write_text(str(i))
    n = mounted.checkpoint()
    expected = snapshot(mounted.source)
    with open(d / "f", "w") as f:
        f.write("changed")
    mounted.wait(mounted.checkpoint())

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    r = fj("restore", mounted.journal, "--checkpoint", str(n), tmp_path / "out", check=False, preexec_fn=lower)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same(expected, snapshot(tmp_path / "out"))


# ----------------------------------------------------------------- real applications

def _db_rows(path: Path) -> tuple[str, list[tuple[int, str]]]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0], con.execute(
            "SELECT id, v FROM t ORDER BY id").fetchall()
    finally:
        con.close()


def test_sqlite_wal_read_back_from_old_checkpoints(mounted: Mounted, tmp_path: Path) -> None:
    """SQLite in WAL mode writes through the mount while checkpoints are taken after each
    transaction (the database file and its -wal both journaled, the application never
    stopped); browse --checkpoint N and restore --checkpoint N both give a database that
    passes integrity_check and holds exactly the rows committed before N."""
    db = mounted.mountpoint / "app.db"
    con = sqlite3.connect(db)
    rows_at: dict[int, list[tuple[int, str]]] = {}
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        con.commit()
        rows: list[tuple[int, str]] = []
        for i in range(12):
            for j in range(50):
                rows.append((i * 50 + j, f"{i}-{j}-" + "x" * (j * 20)))
                con.execute("INSERT INTO t VALUES (?, ?)", rows[-1])
            if i % 3 == 2:
                con.execute("DELETE FROM t WHERE id % 7 = ?", (i % 7,))
                rows = [r for r in rows if r[0] % 7 != i % 7]
            con.commit()
            if i % 4 == 3:
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            rows_at[mounted.checkpoint(f"tx{i}")] = list(rows)
        mounted.wait(max(rows_at))
    finally:
        con.close()
    for k in (min(rows_at), min(rows_at) + 4, max(rows_at) - 1):
        out = tmp_path / f"r{k}"
        fj("restore", mounted.mountpoint, "--checkpoint", str(k), out)
        assert _db_rows(out / "app.db") == ("ok", rows_at[k])
        with browsing(mounted, tmp_path / f"b{k}", "--checkpoint", str(k)) as point:
            copy = tmp_path / f"c{k}"                 # SQLite wants to write -shm: read a copy
            shutil.copytree(point, copy)
            assert _db_rows(copy / "app.db") == ("ok", rows_at[k])


def test_git_history_read_back_from_an_old_checkpoint(mounted: Mounted, tmp_path: Path) -> None:
    """git commits, a gc (packs, deletes loose objects) and more commits in the mount; the
    checkpoint from before the gc restored and browsed: git fsck is clean, log is right."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    repo = mounted.mountpoint / "repo"
    env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
           "GIT_COMMITTER_EMAIL": "a@b", "GIT_CONFIG_GLOBAL": "/dev/null", "HOME": os.fspath(tmp_path)}

    def git(*args: str, cwd: Path = repo) -> str:
        return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, env=env, check=True,
                              capture_output=True, text=True).stdout

    git("init", "-q", os.fspath(repo), cwd=mounted.mountpoint)
    for i in range(15):
        (repo / f"file{i % 4}").write_text(f"version {i}\n" * (i + 1))
        git("add", "-A")
        git("commit", "-q", "-m", f"commit {i}")
    before = mounted.checkpoint("before gc")
    head_before = git("rev-parse", "HEAD").strip()
    git("gc", "-q", "--prune=now", "--aggressive")
    for i in range(3):
        (repo / "after").write_text(str(i))
        git("add", "-A")
        git("commit", "-q", "-m", f"after {i}")
    mounted.wait(mounted.checkpoint("after gc"))
    out = tmp_path / "old"
    fj("restore", mounted.mountpoint, "--checkpoint", str(before), "--path", "repo", out)
    git("fsck", "--full", "--strict", cwd=out)
    assert git("rev-parse", "HEAD", cwd=out).strip() == head_before
    assert git("rev-list", "--count", "HEAD", cwd=out).strip() == "15"
    with browsing(mounted, tmp_path / "b", "--checkpoint", str(before)) as point:
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", os.fspath(point / "repo"), os.fspath(copy)], check=True)
        git("fsck", "--full", cwd=copy)
        assert git("rev-parse", "HEAD", cwd=copy).strip() == head_before


# ----------------------------------------------------------------- verify against the grain

@pytest.mark.daemon_errors
def test_verify_after_kill_9_of_the_updater_process(mounted: Mounted) -> None:
    """The updater's own process is SIGKILLed; verify still takes its checkpoint, waits for
    the restarted updater, and finds the shadow equal."""
    mp = mounted.mountpoint
    for i in range(3):
        (mp / f"f{i}").write_bytes(os.urandom(200_000))
        mounted.wait(mounted.checkpoint())
    upid = mounted.status()["updater_pid"]
    assert upid and upid != mounted.pid
    os.kill(upid, 9)
    deadline = time.monotonic() + 10
    while alive(upid) and time.monotonic() < deadline:
        time.sleep(0.01)
    (mp / "f1").write_text("changed")
    r = fj("verify", mp, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert mounted.status()["updater_pid"] != upid
