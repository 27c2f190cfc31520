"""Consistency group members seed online (issue 12; fusejournal/groupseed.py).

``mount --group`` returns while a member's shadow is still being copied; group
checkpoints are taken meanwhile (never applied); a member's final round runs behind a
held cut of the group's epoch; the first complete group checkpoint F is the first at
which every member's shadow is complete.  The seeder of the large member is held at a
chosen entry with the ``seed.entry:N:pause`` fault point (every member daemon gets the
same environment: the other member is kept smaller than N entries, so only the large one
stops), so operations really land during the copy, on entries copied and not yet copied.

The bank workload of tests/mount/test_groups.py moves money from an account file in one
member to one in the other (the debit a completed write, then the credit): at F both
shadows must hold a state the workload passed through, the same on both (a credit never
without its debit, every balance the sum of its transfers), and once the workers stop,
the shadows equal the originals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_groups import START, WORKER, Group, check_bank, read_acct, stop_bank
from test_online_seed import fill, pause_env

from conftest import alive, can_mount, fj, force_unmount, is_mounted

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not can_mount(), reason="needs root, /dev/fuse and fusermount3")]

WORKERS = 4


# ------------------------------------------------------------------ helpers

def make_group(tmp_path: Path, halt_timeout: float = 5.0) -> Group:
    srcs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for s in srcs.values():
        s.mkdir()
    return Group(tmp_path, srcs, halt_timeout=halt_timeout)


def mount_group(g: Group, *more: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = fj("mount", "--group", g.file, "--seed-wait", "0", *more,
           env={**os.environ, **env} if env else None)
    g.remember_pids()
    return r


def group_status(g: Group) -> dict:
    st: dict = json.loads(fj("status", "--group", g.file, "--json", check=False).stdout)
    return st


def seeding(g: Group, name: str) -> dict | None:
    s: dict | None = g.status(name).get("seeding")
    return s


def wait_paused(g: Group, name: str, entry: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = seeding(g, name)
        assert s is not None, f"member {name}: the seed finished before its pause point"
        if s["entries_copied"] >= entry:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.02)


def wait_member_complete(g: Group, name: str, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while True:
        st = g.status(name)
        if st.get("seeding") is None and st["shadow_checkpoint"] is not None:
            return int(st["first_complete_checkpoint"])
        assert not str((st.get("seeding") or {}).get("state", "")).startswith("stopped"), st
        assert time.monotonic() < deadline, st.get("seeding")
        time.sleep(0.05)


def wait_first_complete(g: Group, timeout: float = 120) -> int:
    """The group's first complete group checkpoint, once every member's seed is done."""
    deadline = time.monotonic() + timeout
    while True:
        st = group_status(g)
        if st.get("first_complete_group_checkpoint") is not None:
            return int(st["first_complete_group_checkpoint"])
        for name, ms in st["members"].items():
            assert not str((ms.get("seeding") or {}).get("state", "")).startswith("stopped"), (name, ms)
        assert time.monotonic() < deadline, {n: m.get("seeding") for n, m in st["members"].items()}
        time.sleep(0.1)


def start_banks(g: Group, stop: Path) -> list[subprocess.Popen]:
    """Two banks of WORKERS accounts each: one in the members' roots (copied by a's seeder
    before its pause point), one in ``zz/`` (after it: not yet copied while a is held)."""
    procs = []
    for sub in ("", "zz"):
        a, b = g.sources["a"] / sub, g.sources["b"] / sub
        for w in range(WORKERS):
            for d in (a, b):
                (d / f"acct{w}").write_bytes(b"%+016d%016d" % (START, 0))
        procs += [subprocess.Popen([sys.executable, "-c", WORKER, os.fspath(a), os.fspath(b), str(w),
                                    str(w % 2), os.fspath(stop)], stderr=subprocess.PIPE, text=True)
                  for w in range(WORKERS)]
    return procs


def stop_banks(procs: list[subprocess.Popen], stop: Path) -> list[str]:
    return stop_bank(procs, stop, timeout=60)     # (a seeding member answers slower)


def banks_moved(g: Group) -> bool:
    return all(read_acct(g.sources["ab"[w % 2]] / sub / f"acct{w}")[1] > 0
               for sub in ("", "zz") for w in range(WORKERS))


def check_banks(g: Group) -> int:
    """Both banks in the two shadows: one state the workload passed through."""
    return sum(check_bank(g.tree("a") / sub, g.tree("b") / sub, WORKERS) for sub in ("", "zz"))


def setup_trees(g: Group, dirs: int = 10, files: int = 30) -> None:
    """a: the banks' accounts (root and zz/) around ``dirs`` x ``files`` bulk files (a
    walk of about 300 entries); b: the accounts and 60 files (about 70 entries: fewer than
    the pause point, more than a copy done before the mount returns, usually)."""
    fill(g.sources["a"], dirs, files, size=512)
    fill(g.sources["b"], 2, 30, size=512)
    for d in g.sources.values():
        (d / "zz").mkdir()
        for sub in ("", "zz"):
            for w in range(WORKERS):
                (d / sub / f"acct{w}").write_bytes(b"%+016d%016d" % (START, 0))


# ------------------------------------------------------------------ the tests

def test_mount_group_returns_while_a_large_member_is_still_seeding(tmp_path: Path) -> None:
    """a's seeder is held mid-tree: mount --group has returned, status --group shows the
    seed per member and no complete group checkpoint, browse --group refuses in one line,
    wait --group times out saying why; group checkpoints are taken meanwhile.  Released,
    the first complete group checkpoint F comes, wait --group on an earlier one returns F
    and says so, log --group marks F, and both shadows equal the originals."""
    g = make_group(tmp_path)
    env, flag = pause_env(tmp_path, 100)
    try:
        setup_trees(g)
        r = mount_group(g, env=env)
        assert "being seeded in the background" in r.stdout, r.stdout
        s = wait_paused(g, "a", 100)
        assert s["phase"] == "copy" and s["entries_copied"] == 100      # held: mount returned before
        st = group_status(g)
        assert st["first_complete_group_checkpoint"] is None and "a" in st["seeding_members"], st
        assert st["members"]["a"]["shadow_checkpoint"] is None
        out = fj("status", "--group", g.file, check=False).stdout
        assert "a.seeding: [" in out or "a.seeding: 100" in out, out
        (g.sources["a"] / "d000" / "f000").write_bytes(b"changed after its copy")
        (g.sources["a"] / "d009" / "f029").write_bytes(b"changed before its copy")
        (g.sources["b"] / "new").write_bytes(b"new in b")
        early = g.checkpoint("b", "during the seed")
        # (b's own seed may commit a group checkpoint meanwhile: ids only grow)
        assert early >= 1 and int(os.getxattr(g.sources["a"], b"user.fusejournal.checkpoint")) >= early
        markers = json.loads(fj("log", g.journal / "members" / "a" / "journal", "--json").stdout)
        mine = [mk for mk in markers if mk["extra"].get("group_checkpoint") == early]
        assert len(mine) == 1 and mine[0]["extra"]["seeding"] == "incomplete", markers
        point = tmp_path / "browse"
        point.mkdir()
        r = fj("browse", "--group", g.file, point, check=False)
        assert r.returncode != 0 and "no complete group checkpoint" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and os.listdir(point) == []
        r = fj("wait", "--group", g.file, "--checkpoint", str(early), "--timeout", "0.5", check=False)
        assert r.returncode != 0 and "still being seeded" in r.stderr, r.stderr
        out = fj("log", "--group", g.file).stdout
        assert "no group checkpoint is complete yet" in out and "taken while seeding" in out, out
        flag.unlink()
        r = fj("wait", "--group", g.file, "--checkpoint", str(early), "--timeout", "120")
        first = int(r.stdout)
        assert first > early and "the first complete group checkpoint" in r.stderr, r.stderr
        assert wait_first_complete(g) == first
        g.assert_exact()                                # nothing changed since F
        rows = json.loads(fj("log", "--group", g.file, "--json").stdout)
        assert [x["id"] for x in rows if x.get("first_complete")] == [first]
        seeded = json.loads((g.journal / "members" / "a" / "shadow" / "seeded.json").read_text())
        assert seeded["group_checkpoint"] == first and seeded["online"], seeded
        commit = next(c for c in g.commits() if c.get("commit") == first)
        assert seeded["first_complete"] == commit["members"]["a"]
        fj("browse", "--group", g.file, point)          # now there is one to show
        try:
            assert (point / "a" / "d000" / "f000").read_bytes() == b"changed after its copy"
            assert (point / "a" / "d009" / "f029").read_bytes() == b"changed before its copy"
            assert (point / "b" / "new").read_bytes() == b"new in b"
        finally:
            for name in ("a", "b"):
                if is_mounted(point / name):
                    fj("umount", point / name, check=False)
                force_unmount(point / name)
        gid = g.checkpoint("a", "after")
        g.wait(gid)
        g.assert_exact()
    finally:
        if flag.exists():
            flag.unlink()
        for name in ("a", "b"):
            force_unmount(tmp_path / "browse" / name)
        g.cleanup()


def test_bank_transfers_across_members_during_the_seed(tmp_path: Path) -> None:
    """Money moves from a file in one member to a file in the other during the whole seed
    (while a's seeder is held, and on while a converges and completes): the first complete
    group checkpoint F holds one state of both banks on both shadows, exact for every
    account file (each balance is the sum of its transfers, a credit never without its
    debit); once the workers stop, the next group checkpoint equals the originals."""
    g = make_group(tmp_path)
    env, flag = pause_env(tmp_path, 100)
    stop = tmp_path / "stop"
    procs: list[subprocess.Popen] = []
    try:
        setup_trees(g)
        mount_group(g, env=env)
        wait_paused(g, "a", 100)
        procs = start_banks(g, stop)
        deadline = time.monotonic() + 30
        while not banks_moved(g):
            assert time.monotonic() < deadline, "the bank workers did not start"
            time.sleep(0.02)
        during = [g.checkpoint("ab"[i % 2], f"during {i}") for i in range(3)]     # never applied
        assert during == sorted(during) and during[0] >= 1
        # b (small) completes on its own while a is still held mid-copy: its seed's final
        # round ran behind a held cut of one of these group checkpoints
        b_first = wait_member_complete(g, "b")
        assert seeding(g, "a") is not None and group_status(g)["first_complete_group_checkpoint"] is None
        b_seeded = json.loads((g.journal / "members" / "b" / "shadow" / "seeded.json").read_text())
        # (b's copy may also have been done before its mount returned: complete at 0)
        b_at = b_seeded.get("group_checkpoint", 0)
        assert b_seeded["first_complete"] == b_first and (b_at >= 1) == b_seeded["online"], b_seeded
        flag.unlink()
        first = wait_first_complete(g)                  # a completes with the workers running
        assert first > b_at                             # a was held until after b's
        r = fj("wait", "--group", g.file, "--checkpoint", str(during[0]), "--timeout", "120")
        assert int(r.stdout) == first, (r.stdout, r.stderr)
        # nothing else commits meanwhile (no one asks): both shadows stand at F
        assert max(c["commit"] for c in g.commits() if "commit" in c) == first
        moved = check_banks(g)
        assert moved > 0
        errors = stop_banks(procs, stop)
        procs = []
        assert not errors, errors
        gid = g.checkpoint("a", "after the workers")
        g.wait(gid)
        assert check_banks(g) >= moved
        g.assert_exact()
        a_seeded = json.loads((g.journal / "members" / "a" / "shadow" / "seeded.json").read_text())
        assert a_seeded["group_checkpoint"] == first
    finally:
        if procs:
            stop_banks(procs, stop)
        if flag.exists():
            flag.unlink()
        g.cleanup()


def test_changes_during_the_seed_then_the_first_complete_group_checkpoint_is_exact(tmp_path: Path) -> None:
    """Transfers, rewrites, renames (also across the held seeder's cursor), truncates, hard
    links and deletes in both members while a's seeder is held, then quiet: the first
    complete group checkpoint F equals both originals (nothing changed after it)."""
    g = make_group(tmp_path)
    env, flag = pause_env(tmp_path, 100)
    stop = tmp_path / "stop"
    procs: list[subprocess.Popen] = []
    try:
        setup_trees(g)
        mount_group(g, env=env)
        wait_paused(g, "a", 100)
        a, b = g.sources["a"], g.sources["b"]
        procs = start_banks(g, stop)
        (a / "d000" / "f001").write_bytes(b"A" * 700)                  # copied already
        os.truncate(a / "d001" / "f002", 10)
        os.rename(a / "d008" / "f000", a / "d000" / "moved-back")      # from after the cursor
        os.rename(a / "d000" / "f003", a / "d009" / "moved-ahead")     # to after it
        os.link(a / "d002" / "f004", a / "d007" / "hardlink")
        os.unlink(a / "d006" / "f005")
        os.rename(a / "d005", a / "d005-renamed")
        (b / "upload").write_bytes(os.urandom(5000))
        os.rename(b / "zz", b / "zz2")
        os.rename(b / "zz2", b / "zz")
        g.checkpoint("a", "during")
        time.sleep(0.3)
        errors = stop_banks(procs, stop)
        procs = []
        assert not errors, errors
        flag.unlink()
        first = wait_first_complete(g)
        r = fj("wait", "--group", g.file, "--checkpoint", str(first), "--timeout", "120")
        assert int(r.stdout) == first
        assert check_banks(g) > 0
        g.assert_exact()
    finally:
        if procs:
            stop_banks(procs, stop)
        if flag.exists():
            flag.unlink()
        g.cleanup()


@pytest.mark.daemon_errors      # (the coordinator and a member killed: checkpoints fail meanwhile)
def test_kill_mid_seed_then_mount_group_resumes_and_ends_exact(tmp_path: Path) -> None:
    """a's daemon is killed (-9) mid-copy, after its cursor was made durable, and the
    coordinator with it; mount --group again resumes a's seed where it was (not from the
    start), and the first complete group checkpoint, and the next, are exact on both."""
    g = make_group(tmp_path)
    a, b = g.sources["a"], g.sources["b"]
    fill(a, 30, 500, size=16)                       # 15,030 entries: the cursor is persisted at 10,000
    (b / "acct").write_bytes(b"b before")
    try:
        r = mount_group(g, env={"FUSEJOURNAL_FAULT": "seed.entry:13500"})
        # (a's daemon may be gone already: its pid from mount's output)
        line = next(x for x in r.stdout.splitlines() if x.startswith("member a: mounted"))
        pid = int(line.rsplit("pid ", 1)[1].rstrip(")"))
        for i in range(20):
            try:
                (a / "d000" / f"f{i:03d}").write_bytes(b"early %d" % i)
                (a / "d029" / f"new{i}").write_bytes(b"late %d" % i)
                (b / f"b{i}").write_bytes(b"b %d" % i)
            except OSError:
                break                               # a's daemon is gone already
        deadline = time.monotonic() + 60
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the fault point did not kill a's daemon"
        coordinator = int((g.journal / "run" / "coordinator.pid").read_text())
        os.kill(coordinator, signal.SIGKILL)
        while alive(coordinator):
            time.sleep(0.02)
        force_unmount(a)
        state = json.loads((g.journal / "members" / "a" / "shadow" / "seeding.json").read_text())
        assert state["phase"] == "copy" and state["entries"] >= 10_000, state
        assert not (g.journal / "members" / "a" / "shadow" / "applied.json").exists()
        (b / "while a is down").write_bytes(b"b goes on")
        r = mount_group(g)                          # the coordinator and a; b is still mounted
        assert "member b: already mounted" in r.stdout, r.stdout
        s = seeding(g, "a")
        if s is not None:
            assert s["resumed_entries"] == state["entries"], s      # did not start over
        log = (g.journal / "members" / "a" / "journal" / "daemon.log").read_text()
        assert "resuming the copy after d" in log
        first = wait_first_complete(g)
        fj("wait", "--group", g.file, "--checkpoint", str(first), "--timeout", "120")
        seeded = json.loads((g.journal / "members" / "a" / "shadow" / "seeded.json").read_text())
        assert seeded["entries"] <= 15_030 + 40, seeded         # one tree copied, not two
        g.assert_exact()
        (a / "after").write_bytes(b"after the seed")
        gid = g.checkpoint("b", "after")
        g.wait(gid)
        g.assert_exact()
    finally:
        g.cleanup()


@pytest.mark.daemon_errors      # (the group checkpoints failing while a member is dead)
def test_a_member_killed_while_completing_its_seed_claims_nothing(tmp_path: Path) -> None:
    """The worst moment: a member's final round ran behind its held cut, the group
    checkpoint is committed, and the member is killed (-9) while it applies the final
    round and replays the contents (``seed.replay``), before its shadow claims anything.
    The commit line names that batch (marked ``seeding: first complete``), yet the shadow
    holds no checkpoint (seeding.json, no applied.json); mounted again, the seed converges
    again (distrusting) and the first complete group checkpoint, later, is exact on both."""
    g = make_group(tmp_path)
    setup_trees(g)
    try:
        r = mount_group(g, env={"FUSEJOURNAL_FAULT": "seed.replay"})
        pids = {}
        for line in r.stdout.splitlines():
            if line.startswith("member ") and " mounted " in line:
                pids[line.split()[1].rstrip(":")] = int(line.rsplit("pid ", 1)[1].rstrip(")"))
        assert set(pids) == {"a", "b"}, r.stdout
        for src in g.sources.values():               # changes during the seed: contents to replay
            try:
                (src / "acct0").write_bytes(b"%+016d%016d" % (START - 5, 1))
                (src / "zz" / "acct0").write_bytes(b"%+016d%016d" % (START + 5, 1))
            except OSError:
                pass                                # (that member is gone already)
        deadline = time.monotonic() + 90
        while all(alive(p) for p in pids.values()):
            assert time.monotonic() < deadline, "no member reached seed.replay"
            time.sleep(0.05)
        dead = sorted(n for n, p in pids.items() if not alive(p))
        commits = [c for c in g.commits() if "commit" in c]
        for name in dead:
            shadow = g.journal / "members" / name / "shadow"
            assert (shadow / "seeding.json").exists() and not (shadow / "applied.json").exists(), name
            assert json.loads((shadow / "seeding.json").read_text()).get("final_attempted"), name
            markers = json.loads(fj("log", g.journal / "members" / name / "journal", "--json").stdout)
            final = [m["checkpoint"] for m in markers if m["extra"].get("seeding") == "first complete"]
            # its final round's batch was committed: the group counts it, the shadow does not
            assert final and any(c["members"][name] == final[-1] for c in commits), (markers, commits)
        killed_at = max(c["commit"] for c in commits)
        fj("umount", "--group", g.file)             # the dead mounts cleared, the rest unmounted
        mount_group(g)                              # again, without the fault
        first = wait_first_complete(g)
        assert first > killed_at
        fj("wait", "--group", g.file, "--checkpoint", str(first), "--timeout", "120")
        g.assert_exact()
        for name in dead:
            seeded = json.loads((g.journal / "members" / name / "shadow" / "seeded.json").read_text())
            assert seeded["group_checkpoint"] > killed_at, seeded
        gid = g.checkpoint("a", "after")
        g.wait(gid)
        g.assert_exact()
    finally:
        g.cleanup()


@pytest.mark.parametrize("seed", range(1, 7))
def test_random_operations_on_both_members_during_the_seed(tmp_path: Path, seed: int) -> None:
    """tests/mount/test_online_seed.py's operations (writes, truncates, creates, renames of
    files and directories, hard links, unlinks, rmdirs, symlinks, chmods, xattrs, group
    checkpoints), at random on both members: half while a's seeder is held mid-tree, half
    while it copies and converges; then quiet: the first complete group checkpoint equals
    both originals, and so does the next."""
    import random

    from test_online_seed import Program
    g = make_group(tmp_path)
    env, flag = pause_env(tmp_path, 60)
    try:
        fill(g.sources["a"], 5, 30, size=2000)
        fill(g.sources["b"], 1, 20, size=2000)
        os.symlink("d000/f000", g.sources["a"] / "sym")
        os.link(g.sources["a"] / "d000" / "f001", g.sources["a"] / "hard")
        mount_group(g, env=env)
        wait_paused(g, "a", 60)
        rnd = random.Random(seed)
        kinds = ["write", "append", "truncate", "create", "mkdir", "rename", "link", "unlink",
                 "rmdir", "symlink", "chmod", "xattr", "rename_dir", "checkpoint"]
        progs = {n: Program(src) for n, src in g.sources.items()}

        def some(k: int) -> None:
            for _ in range(k):
                progs[rnd.choice("ab")].run((rnd.choice(kinds), rnd.randrange(10_000),
                                             rnd.randrange(10_000), rnd.randrange(5000)))
        some(40)
        flag.unlink()
        some(40)                                    # while the copy goes on and converges
        last_op_ns = time.time_ns()
        first = wait_first_complete(g)
        fj("wait", "--group", g.file, "--checkpoint", str(first), "--timeout", "120")
        commits = [c for c in g.commits() if "commit" in c]
        cut_ns = next(c["time_ns"] for c in commits if c["commit"] == first)
        # F itself, when every operation had returned before its trigger and nothing was
        # committed after it (else only the next one is compared)
        if last_op_ns < cut_ns and max(c["commit"] for c in commits) == first:
            print(f"seed {seed}: the first complete group checkpoint {first} compared")
            g.assert_exact()
        gid = g.checkpoint("b", "after")
        g.wait(gid)
        g.assert_exact()
    finally:
        if flag.exists():
            flag.unlink()
        g.cleanup()
