"""Consistency groups on real mounts, driven from other processes.

Every test mounts a group with the real CLI (a coordinator process and one
daemon per member, in place), and unmounts everything in a ``finally``:
``umount --group``, then ``fusermount3 -u -z`` and SIGKILL of whatever is
still alive.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import FJ, alive, can_mount, fj, force_unmount, is_mounted, wait_reached, watch_daemon_logs
from snapshot import assert_same, snapshot

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not can_mount(), reason="needs root, /dev/fuse and fusermount3")]

UP = b"user.fusejournal.update_permission"
CP = b"user.fusejournal.checkpoint"
STATUS = b"user.fusejournal.status"


class Group:
    def __init__(self, root: Path, sources: dict[str, Path], halt_timeout: float = 3.0,
                 journal: Path | None = None) -> None:
        self.root = root
        self.sources = sources
        self.journal = journal or root / "gj"
        self.file = root / "group.toml"
        text = f'[group]\nname = "bank"\njournal = "{self.journal}"\nhalt_timeout = {halt_timeout}\n'
        for name, src in sources.items():
            text += f'\n[[member]]\nname = "{name}"\nsource = "{src}"\n'
        self.file.write_text(text)
        self.pids: set[int] = set()
        watch_daemon_logs(self.journal / "coordinator.log",
                          *(self.journal / "members" / name / "journal" / "daemon.log" for name in sources))

    def mount(self, *more: str, env: dict | None = None) -> subprocess.CompletedProcess:
        r = fj("mount", "--group", self.file, *more, env={**os.environ, **env} if env else None)
        self.remember_pids()
        return r

    def epoch(self) -> int:
        """The group's epoch now (the gate file's first byte; it moves when a cut begins)."""
        with open(self.journal / "run" / "gate", "rb") as f:
            return f.read(1)[0]

    def remember_pids(self) -> None:
        for name in self.sources:
            try:
                self.pids.add(self.status(name)["pid"])
            except OSError:
                pass
        try:
            self.pids.add(int((self.journal / "run" / "coordinator.pid").read_text()))
        except (OSError, ValueError):
            pass

    def status(self, name: str) -> dict:
        return json.loads(os.getxattr(self.sources[name], STATUS))

    def checkpoint(self, name: str, label: str = "t") -> int:
        os.setxattr(self.sources[name], UP, label.encode())
        return int(os.getxattr(self.sources[name], CP))

    def wait(self, gid: int) -> None:
        fj("wait", "--group", self.file, "--checkpoint", str(gid), "--timeout", "60")

    def tree(self, name: str) -> Path:
        return self.journal / "members" / name / "shadow" / "tree"

    def commits(self) -> list[dict]:
        p = self.journal / "commits.jsonl"
        if not p.exists():
            return []
        return [json.loads(line.split(" ", 1)[1]) for line in p.read_text().splitlines()]

    def assert_exact(self) -> None:
        for name, src in self.sources.items():
            assert_same(snapshot(src), snapshot(self.tree(name)))

    def cleanup(self) -> None:
        self.remember_pids()
        subprocess.run([*FJ, "umount", "--group", os.fspath(self.file)], capture_output=True, timeout=120)
        for src in self.sources.values():
            force_unmount(src)
        for pid in self.pids:
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def group(tmp_path: Path):
    srcs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for s in srcs.values():
        s.mkdir()
    g = Group(tmp_path, srcs)
    try:
        yield g
    finally:
        g.cleanup()


@pytest.fixture
def tmpfs(tmp_path: Path):
    d = tmp_path / "tmpfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "tmpfs", os.fspath(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", os.fspath(d)], check=False)


def fs_type(path: Path) -> str:
    best, kind = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4]
            if (os.fspath(path) + "/").startswith(mp.rstrip("/") + "/") and len(mp) >= len(best):
                best, kind = mp, right.split()[0]
    return kind


# ------------------------------------------------------------ the bank-transfer workload

WIDTH = 32
START = 1000

WORKER = r"""
import os, sys
a, b, w, direction, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def amount(w, k): return (w * 7919 + k * 104729) % 97 + 1
fa = os.open(f"{a}/acct{w}", os.O_RDWR)
fb = os.open(f"{b}/acct{w}", os.O_RDWR)
src, dst = (fa, fb) if direction == 0 else (fb, fa)
sbal = int(os.pread(src, 32, 0)[:16]); dbal = int(os.pread(dst, 32, 0)[:16])
k = 0
try:
    while not os.path.exists(stop):
        k += 1
        amt = amount(w, k)
        sbal -= amt
        os.pwrite(src, b"%+016d%016d" % (sbal, k), 0)      # the debit: one completed write
        dbal += amt
        os.pwrite(dst, b"%+016d%016d" % (dbal, k), 0)      # then the credit, in the other tree
except OSError as e:
    print(f"worker {w}: {e}", file=sys.stderr)
    sys.exit(3)
"""


def amount(w: int, k: int) -> int:
    return (w * 7919 + k * 104729) % 97 + 1


def read_acct(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert len(raw) == WIDTH, (path, raw)
    return int(raw[:16]), int(raw[16:])


def check_bank(a: Path, b: Path, workers: int) -> int:
    """Check one state of the two trees (shadows or originals); return the transfers in it."""
    total, in_transit, transfers = 0, 0, 0
    for w in range(workers):
        src, dst = (a, b) if w % 2 == 0 else (b, a)
        sbal, ks = read_acct(src / f"acct{w}")
        dbal, kd = read_acct(dst / f"acct{w}")
        # a state the workload passed through: every debit up to ks, every credit up to kd,
        # and the credit of a transfer never without its debit
        assert kd in (ks, ks - 1), f"worker {w}: credit {kd} without debit (debits {ks}): inconsistent cut"
        assert sbal == START - sum(amount(w, k) for k in range(1, ks + 1)), (w, sbal, ks)
        assert dbal == START + sum(amount(w, k) for k in range(1, kd + 1)), (w, dbal, kd)
        if kd == ks - 1:
            in_transit += amount(w, ks)
        total += sbal + dbal
        transfers += ks
    assert total + in_transit == 2 * START * workers
    return transfers


def start_bank(g: Group, workers: int) -> tuple[list[subprocess.Popen], Path]:
    a, b = g.sources["a"], g.sources["b"]
    for w in range(workers):
        for d in (a, b):
            (d / f"acct{w}").write_bytes(b"%+016d%016d" % (START, 0))
    stop = g.root / "stop"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, os.fspath(a), os.fspath(b), str(w), str(w % 2),
                               os.fspath(stop)], stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    return procs, stop


def stop_bank(procs: list[subprocess.Popen], stop: Path, timeout: float = 30) -> list[str]:
    stop.touch()
    errors = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            errors.append(err.strip())
    return errors


def test_bank_transfers_across_a_tmpfs_and_the_disk(tmp_path: Path, tmpfs: Path) -> None:
    """Debit in one member, credit in the other; checkpoints triggered at random on random
    members: every checkpoint is a state the workload passed through, on both trees at once."""
    a, b = tmp_path / "a", tmpfs / "b"
    a.mkdir()
    b.mkdir()
    g = Group(tmp_path, {"a": a, "b": b})
    workers = 4
    procs: list[subprocess.Popen] = []
    try:
        assert fs_type(b) == "tmpfs" and fs_type(a) != "tmpfs"
        g.mount()
        seed = random.randrange(1 << 30)
        rnd = random.Random(seed)
        print("seed", seed)
        procs, stop = start_bank(g, workers)
        seen = []
        for i in range(12):
            time.sleep(rnd.uniform(0, 0.05))
            gid = g.checkpoint(rnd.choice("ab"), f"cp{i}")
            assert int(os.getxattr(a, CP)) == int(os.getxattr(b, CP)) == gid
            g.wait(gid)
            seen.append(check_bank(g.tree("a"), g.tree("b"), workers))
        errors = stop_bank(procs, stop)
        assert not errors, errors
        assert seen[-1] > seen[0] > 0 or seen[-1] > 0, seen     # the workload did move money
        gid = g.checkpoint("a", "final")
        g.wait(gid)
        check_bank(g.tree("a"), g.tree("b"), workers)
        g.assert_exact()
        commits = g.commits()
        assert [c["commit"] for c in commits] == list(range(1, 14))
        assert all(set(c["members"]) == {"a", "b"} and c["halt_ns"] > 0 for c in commits)
        st = json.loads(fj("status", "--group", g.file, "--json").stdout)
        assert st["last_group_checkpoint"] == 13 and st["coordinator"]["group_halts"] == 13
        assert st["last_group_halt_ns"] == commits[-1]["halt_ns"]
        assert {n: s["last_group_checkpoint"] for n, s in st["members"].items()} == {"a": 13, "b": 13}
    finally:
        if procs:
            stop_bank(procs, g.root / "stop")
        g.cleanup()


def slow_member_checkpoint(g: Group, fault: str, hold_s: float = 0.5) -> dict:
    """Remount b with ``fault`` (a pause point), run the bank workload, take group
    checkpoint 1 from a while b is held at the point for ``hold_s``; return its commit line."""
    g.mount()
    flag = g.root / "hold-b"
    flag.touch()
    remount_with_fault(g, "b", f"{fault}:1:pause")
    workers = 4
    procs, stop = start_bank(g, workers)
    result: dict = {}
    try:
        deadline = time.monotonic() + 30                 # every worker has moved money
        while not all(read_acct(g.sources["ab"[w % 2]] / f"acct{w}")[1] > 0 for w in range(workers)):
            assert time.monotonic() < deadline, "the bank workers did not start"
            time.sleep(0.01)
        t = threading.Thread(target=lambda: result.setdefault("id", g.checkpoint("a", "slow b")))
        t.start()
        wait_reached(flag, "b paused in its halt")
        time.sleep(hold_s)
        flag.unlink()
        t.join(30)
        assert result.get("id") == 1, result
    finally:
        if flag.exists():
            flag.unlink()
        errors = stop_bank(procs, stop)
    assert not errors, errors
    g.wait(1)
    assert check_bank(g.tree("a"), g.tree("b"), workers) > 0
    return g.commits()[-1]


def test_a_member_whose_checkpoint_task_is_slow_cuts_at_its_next_operation(group: Group) -> None:
    """b's checkpoint task is held (asynchronously) after the epoch moved, while its
    daemon goes on serving the bank workload: b's first operation after the move makes
    b's cut itself, before it goes on, so money moved from a to b after a's cut can
    never show up credited in b's shadow but not debited in a's.  (With the cut made
    only by the checkpoint task, as a halt of b alone would, this test fails.)"""
    line = slow_member_checkpoint(group, "group.member_before_halt")
    assert line["commit"] == 1 and line["cut_spread_ns"] >= 0 and line["halt_ns"] >= 0


def test_a_member_whose_daemon_stalls_at_its_cut(group: Group) -> None:
    """b's whole daemon stalls for 0.5 s at its cut (its trio thread blocked, as if it got
    no CPU): a goes on meanwhile, the checkpoint is still one consistent state of both
    trees, and the commit line shows b's operations held that long (the group halt) and
    b's cut that late (the spread)."""
    line = slow_member_checkpoint(group, "group.member_cut")
    assert line["halt_ns"] >= 0.4e9 and line["cut_spread_ns"] >= 0.4e9


def _in_background(fn: Any) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as e:          # (checked by the test)
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


def _held_in_flight(g: Group) -> tuple[Path, threading.Thread, int]:
    """Remount b so that its first mutating operation stays in flight while the flag file
    exists; start that operation (a create) in a thread and return when it is held, with
    an fd of b's file ``f`` open for writing (a write does not need the directory's lock,
    which the held create keeps; no directory below a member's root is read meanwhile:
    docs/design.md, consistency groups, "Not done yet")."""
    g.mount()
    b = g.sources["b"]
    (b / "f").write_text("f0")
    flag = g.root / "hold-b"
    flag.touch()
    remount_with_fault(g, "b", "halt.in_operation:1:pause")
    fd = os.open(b / "f", os.O_WRONLY)                       # (not gated: no O_TRUNC)
    t, _ = _in_background(lambda: os.close(os.open(b / "held", os.O_CREAT | os.O_WRONLY, 0o644)))
    def in_flight() -> None:
        assert t.is_alive(), "the create ended instead of being held"

    wait_reached(flag, "the create held", check=in_flight)
    assert t.is_alive()                                     # in flight, not done
    return flag, t, fd


def test_an_operation_in_flight_on_a_member_during_the_group_cut(tmp_path: Path) -> None:
    """b has an operation in flight when the epoch moves: b's cut waits for it (b's later
    operations wait too, a's do not), then the operation is in the group checkpoint and the
    one that waited is not; the commit line's group halt covers b's wait.  (A halt bound of
    30 s: the hold must end well inside it even on a loaded machine.)"""
    srcs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for d in srcs.values():
        d.mkdir()
    g = Group(tmp_path, srcs, halt_timeout=30.0)
    try:
        _in_flight_during_the_cut(g)
    finally:
        g.cleanup()


def _in_flight_during_the_cut(g: Group) -> None:
    a, b = g.sources["a"], g.sources["b"]
    flag, held, fd = _held_in_flight(g)
    fa = os.open(a / "g", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        # (the setxattr that triggers it holds a's root directory's lock until it returns:
        # a's writes meanwhile go to an open file)
        e0 = g.epoch()
        cp, cp_out = _in_background(lambda: g.checkpoint("a", "in flight"))
        deadline = time.monotonic() + 30
        while g.epoch() == e0:                                  # the cut has begun
            assert time.monotonic() < deadline and cp.is_alive(), cp_out
            time.sleep(0.01)
        os.pwrite(fa, b"a goes on", 0)                          # a is not held for b
        later, _ = _in_background(lambda: os.pwrite(fd, b"f1", 0))
        time.sleep(0.3)
        assert cp.is_alive() and later.is_alive()               # b's cut waits for the held create
        flag.unlink()
        for t in (held, cp, later):
            t.join(30)
        assert cp_out.get("value") == 1, cp_out
    finally:
        if flag.exists():
            flag.unlink()
        os.close(fd)
        os.close(fa)
    g.wait(1)
    assert (g.tree("b") / "held").exists() and (g.tree("b") / "f").read_text() == "f0"
    assert (b / "f").read_text() == "f1"
    line = g.commits()[-1]
    assert line["commit"] == 1 and line["halt_ns"] >= 0.3e9
    g.wait(g.checkpoint("b", "after"))
    g.assert_exact()


@pytest.mark.daemon_errors      # (the group checkpoint fails: logged as an error by design)
def test_an_operation_stuck_in_flight_fails_the_group_checkpoint_and_loses_nothing(group: Group) -> None:
    """b's operation stays in flight beyond the halt bound T (3 s): the group checkpoint
    fails with EBUSY everywhere, b's operations that waited go on, a's batch (durable) is
    put back; once the operation ends the next group checkpoint is exact on both."""
    g = group
    a = g.sources["a"]
    flag, held, fd = _held_in_flight(g)
    try:
        (a / "row").write_text("1")
        later, later_out = _in_background(lambda: os.pwrite(fd, b"f1", 0))
        with pytest.raises(OSError) as ei:
            g.checkpoint("a", "stuck")
        assert ei.value.errno == errno.EBUSY
        later.join(30)
        assert later_out.get("value") == 2, later_out           # it waited, then went on
        assert held.is_alive()                                  # still held in flight
        st = g.status("a")
        assert st["last_group_checkpoint"] == 0 and st["pending_operations"] >= 1
        failed = json.loads(fj("log", "--group", g.file, "--json").stdout)[-1]
        assert failed["state"] == "failed" and "member 'b'" in failed["error"], failed
        flag.unlink()
        held.join(30)
    finally:
        if flag.exists():
            flag.unlink()
        os.close(fd)
    gid = g.checkpoint("b", "after")
    g.wait(gid)
    g.assert_exact()
    assert (g.tree("b") / "held").exists() and (g.tree("a") / "row").exists()


def test_a_member_lists_a_directory_right_below_its_root(group: Group) -> None:
    """Members are mounted in place, so ``..`` of a directory right below a member's root
    is the mount itself: listing that directory must not make the daemon stat ``..`` by
    path (it crossed into its own mount and waited on itself forever, fs.py's readdir)."""
    g = group
    g.mount()
    b = g.sources["b"]
    (b / "sub").mkdir()
    (b / "sub" / "x").write_text("1")
    r = subprocess.run(["ls", "-ai", os.fspath(b / "sub")], capture_output=True, text=True, timeout=30)
    rows = dict(reversed(line.split()) for line in r.stdout.splitlines())
    assert sorted(rows) == [".", "..", "x"] and int(rows[".."]) == os.stat(b).st_ino, r.stdout
    g.wait(g.checkpoint("b"))
    g.assert_exact()


def test_a_group_checkpoint_from_the_cli_and_status(group: Group) -> None:
    group.mount()
    a, b = group.sources["a"], group.sources["b"]
    (a / "row").write_text("order 1")
    (b / "upload").write_text("file of order 1")
    os.setxattr(b / "upload", b"user.k", b"v")
    r = fj("checkpoint", "--group", group.file, "--label", "first")
    gid = int(r.stdout)
    assert gid == 1 and int(os.getxattr(a, CP)) == 1 and int(os.getxattr(b, CP)) == 1
    fj("wait", "--group", group.file, "--timeout", "60")
    group.assert_exact()
    out = fj("status", "--group", group.file).stdout
    assert "last_group_checkpoint: 1" in out and "a.shadow_checkpoint: 1" in out
    # the member logs carry the group checkpoint id in their markers
    log = json.loads(fj("log", group.journal / "members" / "a" / "journal", "--json").stdout)
    assert log[-1]["extra"]["group_checkpoint"] == 1 and log[-1]["label"] == "first"
    out = fj("log", "--group", group.file).stdout.splitlines()
    assert len(out) == 2 and out[1].split()[:2] == ["1", "committed"] and "a:1,b:1" in out[1]
    assert out[1].endswith("first")
    r = fj("fsck", "--group", group.file)
    assert r.stdout.count("checkpoints intact: 1 (last 1)") == 2
    # mounting again keeps what is mounted
    r = fj("mount", "--group", group.file)
    assert "already mounted" in r.stdout
    fj("umount", "--group", group.file)
    assert not is_mounted(a) and not is_mounted(b)
    assert not (group.journal / "run" / "coordinator.sock").exists()


# ------------------------------------------------------------ a member dies

def remount_with_fault(g: Group, member: str, fault: str) -> None:
    """Restart one member's daemon with a fault point armed (the others keep running)."""
    fj("umount", g.sources[member])
    g.mount(env={"FUSEJOURNAL_FAULT": fault, "FUSEJOURNAL_FAULT_PAUSE": os.fspath(g.root / "hold-b")})


def expect_group_failure(g: Group, on: str) -> OSError:
    with pytest.raises(OSError) as ei:
        g.checkpoint(on, "doomed")
    assert ei.value.errno in (errno.EIO, errno.EBUSY)
    return ei.value


@pytest.mark.daemon_errors      # (the failed checkpoint is logged as an error, by design)
@pytest.mark.parametrize("fault", ["group.member_cut", "group.member_taken", "group.member_durable"])
def test_a_member_killed_during_a_group_checkpoint(group: Group, fault: str) -> None:
    """b's daemon dies at its cut (the epoch moved, its store not taken yet), just after
    it, or after its batch is durable but before it reports: the group checkpoint fails
    everywhere, a goes on, a's batch (durable: a does not wait for b) is never applied and
    its records stay pending; after b is remounted the next group checkpoint is exact on
    both."""
    g = group
    a, b = g.sources["a"], g.sources["b"]
    g.mount()
    (a / "row1").write_text("1")
    (b / "file1").write_text("1")
    assert g.checkpoint("a") == 1
    remount_with_fault(g, "b", fault)
    (a / "row2").write_text("2")
    os.rename(a / "row1", a / "row1-renamed")      # applied twice, a rename would fail
    (b / "file2").write_text("2")
    before = g.status("a")
    expect_group_failure(g, "a")
    # a was released: it takes writes at once, and its batch is back in its temporary store
    (a / "row3").write_text("3")
    st = g.status("a")
    assert st["pending_operations"] >= before["pending_operations"] + 1
    assert st["last_group_checkpoint"] == 1 and st["shadow_checkpoint"] == 1
    assert st["last_checkpoint"] == 2                 # a's batch was durable, then aborted
    assert [c["commit"] for c in g.commits() if "commit" in c] == [1]
    failed = json.loads(fj("log", "--group", g.file, "--json").stdout)[-1]
    assert failed["state"] == "failed" and "member 'b'" in failed["error"]
    r = fj("checkpoint", "--group", g.file, check=False)
    assert r.returncode != 0 and "member 'b'" in r.stderr and "not running" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # a is remounted too (its restored batch saved as pending), and b comes back (a dead
    # mount cleared, its activity log resynced): both updaters start with a pass over their
    # logs, and neither applies its batch of the failed group checkpoint (a's is aborted,
    # b's was never committed): both shadows stay at group checkpoint 1
    fj("umount", a)
    g.mount()
    for name in "ab":
        assert g.status(name)["last_group_checkpoint"] == 1
    time.sleep(0.3)                                     # (the updaters' first pass)
    assert g.status("a")["shadow_checkpoint"] == 1 and g.status("b")["shadow_checkpoint"] == 1
    assert not (g.tree("b") / "file2").exists()
    assert (g.tree("a") / "row1").exists() and not (g.tree("a") / "row2").exists()
    (b / "file3").write_text("3")
    gid = g.checkpoint("b", "after")
    g.wait(gid)
    g.assert_exact()
    time.sleep(0.2)                                     # an aborted batch is never applied later
    assert g.status("a")["shadow_checkpoint"] == g.commits()[-1]["members"]["a"]
    g.assert_exact()


@pytest.mark.daemon_errors      # (ENOSPC at b's append, the abort)
def test_a_member_whose_journal_is_full(tmp_path: Path, tmpfs: Path) -> None:
    """b's journal (on a small tmpfs) fills up after b's data was captured: b's append fails
    with ENOSPC, so the group checkpoint fails everywhere with ENOSPC; a's batch, already
    durable, is put back and never applied; once there is room, the next one is exact.
    (The streamers are held at their first step: the blob streamed to the log before the
    disk is full would leave the checkpoint only a marker, which fits in a page the log
    already has.  Under load, filling the disk can take longer than the streamer's 0.5 s.)"""
    srcs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for d in srcs.values():
        d.mkdir()
    g = Group(tmp_path, srcs)
    text = g.file.read_text().replace('name = "b"\n', f'name = "b"\njournal = "{tmpfs}/bj"\n')
    g.file.write_text(text)
    try:
        hold = tmp_path / "hold-streamers"
        hold.touch()
        g.mount(env={"FUSEJOURNAL_FAULT": "streamer.step:1:pause", "FUSEJOURNAL_FAULT_PAUSE": str(hold)})
        (srcs["a"] / "row").write_text("1")
        (srcs["b"] / "blob").write_bytes(os.urandom(2 << 20))     # incompressible, in memory
        filler = tmpfs / "filler"
        with open(filler, "wb") as f:                                # now fill b's journal disk
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        assert g.status("b")["streamed_unmarked_bytes"] == 0        # (held: still in memory)
        with pytest.raises(OSError) as ei:
            g.checkpoint("a", "full")
        assert ei.value.errno == errno.ENOSPC
        st = g.status("a")
        assert st["last_checkpoint"] == 1 and st["pending_operations"] >= 1   # durable, then put back
        assert st["last_group_checkpoint"] == 0 and g.status("b")["last_checkpoint"] == 0
        failed = json.loads(fj("log", "--group", g.file, "--json").stdout)[-1]
        assert failed["state"] == "failed" and "member 'b'" in failed["error"] and failed["members"] == {"a": 1}
        filler.unlink()
        hold.unlink()
        gid = g.checkpoint("b", "room again")
        g.wait(gid)
        g.assert_exact()
        assert g.commits()[-1]["members"] == {"a": 2, "b": 1}
    finally:
        g.cleanup()


@pytest.mark.daemon_errors      # (the caller's failed checkpoint, the batch put back)
@pytest.mark.parametrize("fault", ["coordinator.epoch_moved", "coordinator.before_commit",
                                   "coordinator.after_commit"])
def test_the_coordinator_killed_around_the_commit(group: Group, fault: str) -> None:
    """The coordinator dies right after it moved the epoch (the members cut and append
    without it), or once every member's batch is durable, just before (or just after) it
    writes the commit line: the caller gets an error; the members hold their batches in
    doubt; the restarted coordinator's next checkpoint has them put back (not committed) or
    confirmed (committed) first, and the shadows end exact."""
    g = group
    a, b = g.sources["a"], g.sources["b"]
    g.mount(env={"FUSEJOURNAL_FAULT": fault})       # (only the coordinator reaches these points)
    (a / "row1").write_text("1")
    (b / "file1").write_text("1")
    expect_group_failure(g, "b")
    for name in "ab":
        # (with the coordinator gone right after the epoch moved, the caller may get its
        # error while the members are still cutting and appending)
        deadline = time.monotonic() + 30
        while g.status(name)["group_in_doubt"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        st = g.status(name)
        assert st["group_in_doubt"] == 1 and st["last_group_checkpoint"] == 0
    assert [c.get("commit") for c in g.commits()] == ([1] if fault.endswith("after_commit") else [])
    r = fj("checkpoint", "--group", g.file, check=False)
    assert r.returncode != 0 and "coordinator is not running" in r.stderr
    (a / "row2").write_text("2")
    g.mount()                                       # restarts the coordinator only
    gid = g.checkpoint("a", "next")
    assert gid == (2 if fault.endswith("after_commit") else 1)
    for name in "ab":
        st = g.status(name)
        assert st["group_in_doubt"] is None and st["last_group_checkpoint"] == gid
    # b wrote nothing since: its new batch holds its batch in doubt again only if that was
    # not committed (put back), and nothing if it was (confirmed)
    markers = json.loads(fj("log", g.journal / "members" / "b" / "journal", "--json").stdout)
    assert [m["checkpoint"] for m in markers] == [1, 2]
    assert (markers[1]["operations"] == 0) == fault.endswith("after_commit"), markers
    g.wait(gid)
    g.assert_exact()


@pytest.mark.daemon_errors      # (the checkpoints failing after the kill)
def test_a_member_killed_at_random(group: Group) -> None:
    g = group
    g.mount()
    workers = 4
    procs, stop = start_bank(g, workers)
    rnd = random.Random()
    seed = rnd.randrange(1 << 30)
    rnd.seed(seed)
    print("seed", seed)
    killed = False
    try:
        kill_at = time.monotonic() + rnd.uniform(0.05, 0.6)
        ok = failed = 0
        while time.monotonic() < kill_at + 0.5:
            if not killed and time.monotonic() >= kill_at:
                os.kill(g.status("b")["pid"], signal.SIGKILL)
                killed = True
            try:
                g.checkpoint(rnd.choice("ab"))
                ok += 1
            except OSError:
                failed += 1
        assert killed
    finally:
        stop_bank(procs, stop)
    assert failed >= 1                      # after the kill every group checkpoint fails
    r = fj("umount", "--group", g.file)     # clears b's dead mount, unmounts a
    assert "cleared the dead mount" in r.stdout and not is_mounted(g.sources["b"])
    g.mount()                               # b back: recovers from its activity log
    gid = g.checkpoint("a", "after")
    g.wait(gid)
    g.assert_exact()


# ------------------------------------------------------------ who may use it; bad input

def test_the_sockets_accept_only_the_mounting_user(tmp_path: Path) -> None:
    import shutil
    import tempfile
    public = Path(tempfile.mkdtemp(prefix="fj-group-"))    # reachable by uid 65534 (tmp_path is not)
    os.chmod(public, 0o755)
    srcs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for d in srcs.values():
        d.mkdir()
    g = Group(tmp_path, srcs, journal=public / "gj")
    try:
        g.mount()
        check_peer_refused(g)
    finally:
        g.cleanup()
        shutil.rmtree(public, ignore_errors=True)


def check_peer_refused(g: Group) -> None:
    run = g.journal / "run"
    for d in (g.journal, run):
        st = os.stat(d)
        assert st.st_uid == os.geteuid() and (st.st_mode & 0o777) == 0o700, d
    os.chmod(g.journal, 0o755)                          # (reachable, for this test)
    sock = run / "coordinator.sock"
    # even with the directory opened up, the coordinator checks SO_PEERCRED
    os.chmod(run, 0o755)
    os.chmod(sock, 0o666)
    try:
        code = ("import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "s.connect(sys.argv[1])\n"
                "try:\n"
                "    s.sendall(b'{\"op\": \"checkpoint\", \"label\": \"x\"}\\n')\n"
                "    print(repr(s.recv(100)))\n"
                "except (BrokenPipeError, ConnectionResetError):\n"
                "    print(repr(b''))\n")
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                            "-c", code, os.fspath(sock)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "b''", (r.stdout, r.stderr)
    finally:
        os.chmod(run, 0o700)
        os.chmod(sock, 0o600)
    assert g.commits() == []
    # the directory as it is: not even reachable
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *FJ,
                        "checkpoint", "--group", os.fspath(g.file)], capture_output=True, text=True)
    assert r.returncode != 0 and g.commits() == []


def test_a_bad_group_file_mounts_nothing(group: Group) -> None:
    g = group
    g.file.write_text(g.file.read_text() + '\n[[member]]\nname = "a"\nsource = "/nonexistent"\n')
    r = fj("mount", "--group", g.file, check=False)
    assert r.returncode == 2 and "duplicate member name 'a'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not g.journal.exists() and not is_mounted(g.sources["a"])


def test_reseed_is_refused_for_a_group_in_one_line(group: Group) -> None:
    (group.sources["a"] / "keep").write_text("data")
    r = fj("mount", "--group", group.file, "--reseed", check=False)
    assert r.returncode == 2 and "--reseed" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not group.journal.exists() and not is_mounted(group.sources["a"])
    assert (group.sources["a"] / "keep").read_text() == "data"


def test_the_writeback_cache_reaches_every_member(group: Group) -> None:
    group.mount("--writeback-cache")
    assert all(group.status(n)["writeback_cache"] for n in group.sources)
    a, b = group.sources["a"], group.sources["b"]
    # small write(2)s the kernel holds as dirty pages; the group cut's barrier
    # must bring them into the checkpoint of every member
    with open(a / "ledger", "wb") as fa, open(b / "ledger", "wb") as fb:
        for i in range(200):
            fa.write(b"debit %05d\n" % i)
            fb.write(b"credit %05d\n" % i)
        fa.flush()
        fb.flush()
        gid = int(fj("checkpoint", "--group", group.file, "--label", "wb").stdout)
    group.wait(gid)
    for name in ("a", "b"):
        assert (group.tree(name) / "ledger").read_bytes() == (group.sources[name] / "ledger").read_bytes()
    assert (group.tree("a") / "ledger").read_bytes().count(b"debit") == 200


def test_a_member_that_cannot_mount_unmounts_the_others(group: Group) -> None:
    g = group
    bad = g.journal / "members" / "b" / "journal"
    bad.parent.mkdir(parents=True)
    bad.write_text("not a directory")
    r = fj("mount", "--group", g.file, check=False)
    assert r.returncode != 0
    msg = r.stderr.strip().splitlines()[-1]          # (after the seeding messages of member a)
    assert msg.startswith("fusejournal: group 'bank': member 'b': ") and "/members/b/journal" in msg, msg
    assert "unmounted the 1 member(s) this command had mounted" in msg, msg
    assert not is_mounted(g.sources["a"]) and not is_mounted(g.sources["b"])
    assert not (g.journal / "run" / "coordinator.sock").exists()
