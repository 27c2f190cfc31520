"""An adversary's and a user's pass over the online seed (seeding.py): real applications
writing while the copy runs (cp -a, rsync -a, SQLite in WAL mode), a low ``ulimit -n`` on
the daemon, kill -9 of the updater's process and of the daemon mid-seed, another uid.

The seeder is held at a chosen entry with the ``seed.entry:N:pause`` fault point, so the
applications really write while the copy is half done; then it goes on, and the first
complete checkpoint and every later one must equal the original.
"""

from __future__ import annotations

import os
import resource
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from test_online_seed import fill, pause_env, seeding, wait_complete, wait_paused

from conftest import Mounted, alive, checkpoint_and_compare, fj, force_unmount, make_traversable, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _tree(root: Path, n: int) -> None:
    """A tree an application would copy in: files of all sizes, a sparse one, symlinks, a
    hard link, xattrs, modes, old mtimes."""
    (root / "a" / "b").mkdir(parents=True)
    for i in range(n):
        (root / "a" / f"f{i}").write_bytes(os.urandom(i * 97 % 20000))
    with open(root / "a" / "b" / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"end")
    os.symlink("../f1", root / "a" / "b" / "link")
    os.link(root / "a" / "f2", root / "a" / "b" / "hard")
    os.setxattr(root / "a" / "f3", b"user.k", b"v")
    os.chmod(root / "a" / "f4", 0o604)
    os.utime(root / "a" / "f5", ns=(10**9, 2 * 10**9))


@pytest.mark.parametrize("tool", ["cp", "rsync"])
def test_cp_and_rsync_into_the_mount_during_the_seed(dirs: Mounted, tmp_path: Path, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool}")
    fill(dirs.source, 6, 80, size=2000)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    _tree(incoming, 60)
    env, flag = pause_env(tmp_path, 200)
    dirs.mount("--seed-wait", "0", env=env)
    wait_paused(dirs, 200)
    # into a directory the copy has passed, one it has not reached, and a new one
    for target in ("d000", "d005", "new"):
        if tool == "cp":
            args = ["cp", "-a", os.fspath(incoming), os.fspath(dirs.mountpoint / target / "in")]
        else:
            args = ["rsync", "-aHX", os.fspath(incoming) + "/", os.fspath(dirs.mountpoint / target / "in")]
        (dirs.mountpoint / target).mkdir(exist_ok=True)
        subprocess.run(args, check=True, capture_output=True)
    n_during = dirs.checkpoint("during the seed")
    flag.unlink()
    first = wait_complete(dirs, timeout=120)
    assert first > n_during
    checkpoint_and_compare(dirs)
    r = fj("restore", dirs.mountpoint, tmp_path / "out")
    assert "checkpoint" in r.stdout
    assert_same(snapshot(dirs.source), snapshot(tmp_path / "out"))
    # a checkpoint taken before the first complete one is not in the shadow's history
    r = fj("restore", dirs.mountpoint, "--checkpoint", str(n_during), tmp_path / "early", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "early").exists()


def _rows(path: Path) -> tuple[str, int, int]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return (con.execute("PRAGMA integrity_check").fetchone()[0],
                *con.execute("SELECT count(*), coalesce(sum(id), 0) FROM t").fetchone())
    finally:
        con.close()


def test_sqlite_wal_through_the_seed_and_checkpoints(dirs: Mounted, tmp_path: Path) -> None:
    """A database made before the mount, written in WAL mode through the mount while the seed
    copies around it (checkpoints taken meanwhile), then on after the seed: the database read
    from browse --checkpoint N and from restore --checkpoint N passes integrity_check and
    has exactly the rows committed before N."""
    fill(dirs.source, 4, 100, size=3000)
    db0 = sqlite3.connect(dirs.source / "app.db")
    db0.execute("PRAGMA journal_mode=WAL")
    db0.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    db0.executemany("INSERT INTO t VALUES (?, ?)", [(i, os.urandom(500)) for i in range(2000)])
    db0.commit()
    db0.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db0.close()
    env, flag = pause_env(tmp_path, 150)
    dirs.mount("--seed-wait", "0", env=env)
    wait_paused(dirs, 150)
    con = sqlite3.connect(dirs.mountpoint / "app.db")
    expected: dict[int, tuple[str, int, int]] = {}
    try:
        con.execute("PRAGMA journal_mode=WAL")
        nxt = 2000

        def tx(k: int) -> None:
            nonlocal nxt
            con.executemany("INSERT INTO t VALUES (?, ?)", [(nxt + i, os.urandom(700)) for i in range(300)])
            con.execute("DELETE FROM t WHERE id % 13 = ?", (k % 13,))
            con.execute("UPDATE t SET v = ? WHERE id % 17 = ?", (os.urandom(900), k % 17))
            con.commit()
            nxt += 300
            if k % 3 == 2:
                con.execute("PRAGMA wal_checkpoint(PASSIVE)")
            n = dirs.checkpoint(f"tx{k}")
            c = con.execute("SELECT count(*), coalesce(sum(id), 0) FROM t").fetchone()
            expected[n] = ("ok", c[0], c[1])

        for k in range(4):
            tx(k)
        assert seeding(dirs) is not None                    # all during the seed
        flag.unlink()
        k = 4
        while seeding(dirs) is not None:                    # and while it finishes
            tx(k)
            k += 1
            assert k < 400
        first = wait_complete(dirs)
        for j in range(k, k + 4):
            tx(j)
    finally:
        con.close()
    last = max(expected)
    dirs.wait(last)
    later = [n for n in sorted(expected) if n > first]
    assert len(later) >= 3
    for n in (later[0], last):
        point = tmp_path / f"b{n}"
        point.mkdir()
        try:
            fj("browse", "--checkpoint", str(n), dirs.mountpoint, point)
            copy = tmp_path / f"c{n}"
            shutil.copytree(point, copy, symlinks=True)   # app.db with its -wal, as at n
        finally:
            fj("umount", point, check=False)
            force_unmount(point)
        assert _rows(copy / "app.db") == expected[n], n
        out = tmp_path / f"full{n}"
        fj("restore", dirs.journal, "--checkpoint", str(n), out)
        assert _rows(out / "app.db") == expected[n], n
    checkpoint_and_compare(dirs)


@pytest.mark.parametrize("limit,depth", [(64, 0), (1024, 600)])
def test_online_seed_under_a_low_fd_limit(dirs: Mounted, tmp_path: Path, limit: int, depth: int) -> None:
    """The daemon (and its updater) under a hard RLIMIT_NOFILE ``limit`` seeds a wide tree
    (with a branch ``depth`` directories deep) online while files are created, written and
    renamed through the mount.  (600 levels under 1024 failed: the seeder kept two fds per
    directory level, 'seeding.state: stopped: [Errno 24] Too many open files'.)"""
    fill(dirs.source, 40, 60)
    d = dirs.source
    for i in range(depth):
        d = d / "d"
        d.mkdir()
        (d / "x").write_text(str(i))
    env, flag = pause_env(tmp_path, 500)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    r = fj("mount", dirs.source, dirs.mountpoint, "--journal", dirs.journal, "--shadow", dirs.shadow,
           "--seed-wait", "0", env={**os.environ, **env}, preexec_fn=lower, check=False)
    if r.returncode != 0:
        assert limit < 1024 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r
        return                                        # refused in one line: acceptable under 64
    dirs.pid = dirs.status()["pid"]
    wait_paused(dirs, 500)
    # files held open through the mount (each is an fd in the daemon: a few under 64)
    held = [open(dirs.mountpoint / f"d{i:03d}" / "f000", "rb") for i in range(min(40, limit // 8))]  # noqa: SIM115
    try:
        for i in range(40):
            (dirs.mountpoint / f"d{i:03d}" / "new").write_bytes(b"n%d" % i * 100)
            os.rename(dirs.mountpoint / f"d{i:03d}" / "f001", dirs.mountpoint / f"d{i:03d}" / "moved")
        flag.unlink()
        wait_complete(dirs, timeout=180)
    finally:
        for f in held:
            f.close()
    text = (dirs.journal / "daemon.log").read_text(errors="replace")
    assert "Too many open files" not in text, text[-3000:]
    checkpoint_and_compare(dirs)


@pytest.mark.daemon_errors
def test_updater_process_killed_during_the_seed(dirs: Mounted, tmp_path: Path) -> None:
    """kill -9 of the updater's process while the seed is held: the seed still completes, the
    first complete checkpoint is exact, and the checkpoints before it stay durable."""
    fill(dirs.source, 6, 60, size=1000)
    env, flag = pause_env(tmp_path, 100)
    dirs.mount("--seed-wait", "0", env=env)
    wait_paused(dirs, 100)
    (dirs.mountpoint / "d000" / "w").write_text("during")
    n = dirs.checkpoint("during")
    upid = dirs.status().get("updater_pid")
    if upid:
        os.kill(upid, 9)
        deadline = time.monotonic() + 10
        while alive(upid) and time.monotonic() < deadline:
            time.sleep(0.01)
    flag.unlink()
    first = wait_complete(dirs, timeout=120)
    assert first > n
    checkpoint_and_compare(dirs)


def test_seeding_state_is_private_during_the_seed(dirs: Mounted, tmp_path: Path) -> None:
    """While the seed is held: uid 65534 can neither read nor replace the seeding state, the
    partial tree, the journal, nor grant update permission, nor browse (the mount is
    readable by it)."""
    fill(dirs.source, 4, 60)
    os.chmod(dirs.source, 0o755)
    env, flag = pause_env(tmp_path, 50)
    dirs.mount("--seed-wait", "0", env=env)
    wait_paused(dirs, 50)
    for p in (dirs.journal, dirs.shadow, dirs.mountpoint):
        make_traversable(p)
    for target in (dirs.shadow / "seeding.json", dirs.shadow / "tree" / "d000" / "f000",
                   dirs.journal / "meta.json"):
        r = subprocess.run([*NOBODY, "cat", os.fspath(target)], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (target, r.stderr)
        r = subprocess.run([*NOBODY, "sh", "-c", f"echo x > '{target}'"], capture_output=True, text=True)
        assert r.returncode != 0, target
    r = subprocess.run([*NOBODY, "setfattr", "-n", "user.fusejournal.update_permission", "-v", "x",
                        os.fspath(dirs.mountpoint)], capture_output=True, text=True)
    # the kernel (default_permissions) refuses a user.* attribute on a directory one may not
    # write (EACCES); the daemon refuses the rest (EPERM)
    assert r.returncode != 0 and ("not permitted" in r.stderr or "Permission denied" in r.stderr), r
    own = tmp_path / "nob"
    own.mkdir()
    os.chown(own, 65534, 65534)
    r = subprocess.run([*NOBODY, *__import__("conftest").FJ, "browse", os.fspath(dirs.mountpoint),
                        os.fspath(own)], capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r
    assert seeding(dirs) is not None
    flag.unlink()
    wait_complete(dirs)
    checkpoint_and_compare(dirs)


@pytest.mark.parametrize("how", ["rename", "swap"])
def test_deep_ancestor_moved_while_the_seed_is_below_it(dirs: Mounted, tmp_path: Path, how: str) -> None:
    """The seeder stands 40 levels deep (its fds of the levels above 16 closed); the
    application moves an ancestor at level 25 elsewhere (or swaps it with a twin) through the
    mount; the walk notices when it climbs back, goes on from its cursor, and the first
    complete checkpoint equals the original."""
    top = dirs.source / "t"
    d = top
    for i in range(40):
        d = d / f"l{i:02d}"
        d.mkdir(parents=True)
        (d / "a").write_text(f"{i}a")
        (d / "z").write_text(f"{i}z")
    (dirs.source / "u").mkdir()
    (dirs.source / "u" / "x").write_text("x")
    # entries in walk order: t, t/l00, t/l00/a, t/l00/l01, ... : pause at the deepest 'a'
    env, flag = pause_env(tmp_path, 1 + 2 * 40)
    dirs.mount("--seed-wait", "0", env=env)
    wait_paused(dirs, 1 + 2 * 40)
    anc = dirs.mountpoint / "t" / "/".join(f"l{i:02d}" for i in range(25))
    if how == "rename":
        os.rename(anc, dirs.mountpoint / "u" / "moved")
    else:
        twin = anc.parent / "twin"
        twin.mkdir()
        (twin / "q").write_text("q")
        os.rename(anc, anc.parent / "tmp")
        os.rename(twin, anc)
        os.rename(anc.parent / "tmp", twin)
    flag.unlink()
    wait_complete(dirs, timeout=120)
    checkpoint_and_compare(dirs)
