"""The group's time machine on real mounts: a group of two members on different filesystems
(the disk and a tmpfs), a bank-transfer workload across them, and browse --all/--checkpoint,
restore and prune indexed by GROUP checkpoint ids, with the retention of the group file."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from test_groups import Group, check_bank, fs_type, start_bank, stop_bank

from fusejournal.group import load_group, member_retained, retained_points

from conftest import FJ, can_mount, fj, force_unmount, is_mounted, make_traversable
from snapshot import assert_same, snapshot

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not can_mount(), reason="needs root, /dev/fuse and fusermount3")]

WORKERS = 4


@pytest.fixture
def bank(tmp_path: Path):
    """A group (a on the disk, b on a tmpfs) whose file keeps the last 5 group checkpoints,
    mounted, and the browse points used; everything unmounted at the end."""
    fs = tmp_path / "tmpfs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", os.fspath(fs)], check=True)
    a, b = tmp_path / "a", fs / "b"
    a.mkdir()
    b.mkdir()
    g = Group(tmp_path, {"a": a, "b": b})
    g.file.write_text(g.file.read_text().replace("halt_timeout", "keep_last = 5\nhalt_timeout"))
    points = [tmp_path / "view", tmp_path / "one"]
    for p in points:
        p.mkdir()
    try:
        assert fs_type(b) == "tmpfs" and fs_type(a) != "tmpfs"
        yield g, points
    finally:
        for p in points:
            if is_mounted(p):
                fj("umount", p, check=False)
            force_unmount(p)
        g.cleanup()
        subprocess.run(["umount", "-l", os.fspath(fs)], check=False)


def _populate(src: Path) -> None:
    """What restore must bring back exactly: a sparse file, a symlink, a hard link, xattrs."""
    (src / "d").mkdir()
    with open(src / "d" / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    os.symlink("d/sparse", src / "link")
    os.link(src / "d" / "sparse", src / "hard")
    os.setxattr(src / "d", b"user.note", b"kept")
    os.chmod(src / "d" / "sparse", 0o640)


def _run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*FJ, *map(os.fspath, args)], capture_output=True, text=True, timeout=120)


def _one_line_error(r: subprocess.CompletedProcess, expect: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr


def test_group_time_machine(bank, tmp_path: Path) -> None:
    g, (view, one) = bank
    g.mount()
    for src in g.sources.values():
        _populate(src)
    procs, stop = start_bank(g, WORKERS)
    transfers: dict[int, int] = {}
    states: dict[int, dict[str, dict]] = {}
    try:
        for i in range(1, 8):
            time.sleep(0.05)
            for name, src in g.sources.items():
                (src / "d" / f"step{i}").write_bytes(f"{name} {i}\n".encode() * i)
            gid = g.checkpoint("ab"[i % 2], f"c{i}")
            g.wait(gid)
            # the shadows stand at gid until the next checkpoint: the state to get back
            transfers[gid] = check_bank(g.tree("a"), g.tree("b"), WORKERS)
            states[gid] = {name: snapshot(g.tree(name)) for name in g.sources}
    finally:
        errors = stop_bank(procs, stop)
    assert not errors, errors
    assert sorted(transfers) == list(range(1, 8)) and transfers[7] > transfers[1]

    # retention from the group file reached every member: the last 5 group checkpoints
    group = load_group(g.file)
    assert [p.id for p in retained_points(group)] == [3, 4, 5, 6, 7]
    for m in group.members:
        assert member_retained(m) == {p.members[m.name] for p in retained_points(group)}

    # browse --all --group: one directory per group checkpoint, every member at it
    fj("browse", "--all", "--group", g.file, view)
    names = sorted(os.listdir(view))
    assert names == ["3-c3", "4-c4", "5-c5", "6-c6", "7-c7", "latest"], names
    for gid in range(3, 8):
        d = view / f"{gid}-c{gid}"
        assert sorted(os.listdir(d)) == ["a", "b"]
        assert check_bank(d / "a", d / "b", WORKERS) == transfers[gid]      # the invariant, across members
        for name in g.sources:
            assert (d / name / "d" / f"step{gid}").read_bytes() == f"{name} {gid}\n".encode() * gid
            assert not (d / name / "d" / f"step{gid + 1}").exists()
            assert_same(states[gid][name], snapshot(d / name))
    assert os.readlink(view / "latest") == "7-c7"
    assert check_bank(view / "latest" / "a", view / "latest" / "b", WORKERS) == transfers[7]

    # a file opened in a group checkpoint keeps reading it while new ones are taken
    held = open(view / "4-c4" / "a" / "d" / "step4", "rb")      # noqa: SIM115 - closed below
    try:
        for src in g.sources.values():
            (src / "d" / "step4").write_bytes(b"changed")
        gid = g.checkpoint("a", "c8")
        g.wait(gid)
        assert held.read() == b"a 4\n" * 4
    finally:
        held.close()
    assert os.readlink(view / "latest") == "8-c8"
    assert sorted(os.listdir(view)) == ["4-c4", "5-c5", "6-c6", "7-c7", "8-c8", "latest"]

    # --checkpoint N --group: the members at one group checkpoint, at the root
    fj("browse", "--checkpoint", "5", "--group", g.file, one)
    assert sorted(os.listdir(one)) == ["a", "b"]
    assert check_bank(one / "a", one / "b", WORKERS) == transfers[5]
    fj("umount", one)

    # restore one member at a group checkpoint, then every member: byte-exact
    fj("restore", "--group", g.file, "--member", "b", "--checkpoint", "5", tmp_path / "rb")
    assert_same(states[5]["b"], snapshot(tmp_path / "rb"))
    fj("restore", "--group", g.file, "--checkpoint", "6", tmp_path / "all")
    assert sorted(os.listdir(tmp_path / "all")) == ["a", "b"]
    for name in g.sources:
        assert_same(states[6][name], snapshot(tmp_path / "all" / name))
    check_bank(tmp_path / "all" / "a", tmp_path / "all" / "b", WORKERS)
    fj("restore", "--group", g.file, "--member", "a", "--checkpoint", "4", "--path", "d/step4",
       tmp_path / "one-file")
    assert (tmp_path / "one-file" / "step4").read_bytes() == b"a 4\n" * 4

    # prune --group keeps the same group checkpoints on every member
    fj("prune", "--group", g.file, "--keep-last", "2")
    assert [p.id for p in retained_points(group)] == [7, 8]
    for m in group.members:
        assert member_retained(m) == {p.members[m.name] for p in retained_points(group)}
    assert sorted(os.listdir(view)) == ["7-c7", "8-c8", "latest"]
    assert "retained_group_checkpoints: [7, 8]" in fj("status", "--group", g.file).stdout
    assert check_bank(view / "7-c7" / "a", view / "7-c7" / "b", WORKERS) == transfers[7]


def test_group_history_bad_input_is_one_line_and_touches_nothing(bank, tmp_path: Path) -> None:
    g, (view, _) = bank
    g.mount()
    (g.sources["a"] / "x").write_text("1")
    (g.sources["a"] / "secret").write_text("s")
    os.chmod(g.sources["a"] / "secret", 0o600)
    for i in range(1, 4):
        g.wait(g.checkpoint("a", f"c{i}"))
    g.commits()
    _one_line_error(_run("browse", "--checkpoint", "99", "--group", g.file, view),
                    "group checkpoint 99 does not exist (last is 3)")
    _one_line_error(_run("browse", "--checkpoint", "0", "--group", g.file, view), "group checkpoint 0")
    assert not is_mounted(view) and os.listdir(view) == []
    dest = tmp_path / "dest"
    _one_line_error(_run("restore", "--group", g.file, "--member", "a", "--checkpoint", "42", dest),
                    "group checkpoint 42 does not exist")
    _one_line_error(_run("restore", "--group", g.file, "--member", "zz", "--checkpoint", "2", dest),
                    "no member named 'zz'")
    _one_line_error(_run("restore", "--group", g.file, "--member", "a", "--checkpoint", "2",
                         g.sources["a"] / "inside"), "inside the mount of member 'a'")
    assert not dest.exists() and not (g.sources["a"] / "inside").exists()
    fj("prune", "--group", g.file, "--keep-last", "1")
    _one_line_error(_run("restore", "--group", g.file, "--checkpoint", "2", dest),
                    "group checkpoint 2 is not retained (pruned) on member 'a'")
    _one_line_error(_run("browse", "--checkpoint", "1", "--group", g.file, view), "not retained")
    assert not dest.exists() and os.listdir(view) == []
    _one_line_error(_run("prune", "--group", g.file, "--keep-last", "0"), "must be at least 1")
    _one_line_error(_run("browse", "--all", "--checkpoint", "3", "--group", g.file, view), "not both")
    assert [p.id for p in retained_points(load_group(g.file))] == [3]

    # another user: the members' modes hold in the group view; the commands refuse cleanly
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    make_traversable(view.parent)
    fj("browse", "--all", "--group", g.file, view)          # private to root by default
    r = subprocess.run([*nobody, "cat", os.fspath(view / "3-c3" / "a" / "x")], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    fj("umount", view)
    fj("browse", "--all", "--group", g.file, view, "-o", "allow_other")
    r = subprocess.run([*nobody, "cat", os.fspath(view / "3-c3" / "a" / "x")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "1", r.stderr
    r = subprocess.run([*nobody, "cat", os.fspath(view / "latest" / "a" / "secret")], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    for args in (["prune", "--group", g.file, "--keep-last", "1"],
                 ["restore", "--group", g.file, "--checkpoint", "3", tmp_path / "nob"]):
        r = subprocess.run([*nobody, *FJ, *map(os.fspath, args)], capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "nob").exists()
    assert [p.id for p in retained_points(load_group(g.file))] == [3]


def test_mount_group_keep_last_reaches_every_member(bank) -> None:
    """mount --group --keep-last on the command line (replacing the file's 5): every member's
    daemon prunes its own checkpoints to the same last 2 group checkpoints."""
    g, _ = bank
    fj("mount", "--group", g.file, "--keep-last", "2")
    g.remember_pids()
    for i in range(1, 5):
        (g.sources["a"] / "f").write_text(str(i))
        (g.sources["b"] / "f").write_text(str(i))
        g.wait(g.checkpoint("ab"[i % 2], f"c{i}"))
    group = load_group(g.file)
    assert [p.id for p in retained_points(group)] == [3, 4]
    for m in group.members:
        assert member_retained(m) == {p.members[m.name] for p in retained_points(group)}


def test_latest_under_load_and_an_interrupted_prune(bank) -> None:
    """Readers follow ``latest`` (one readlink, then both members under that one group
    checkpoint) while the bank workload runs and group checkpoints keep coming: every read
    is one group checkpoint's state.  Then prune --group killed half-way through the first
    member: only group checkpoints every member still has are shown, and a rerun finishes."""
    import errno
    import threading
    g, (view, _) = bank
    g.mount()
    procs, stop = start_bank(g, WORKERS)
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                try:
                    target = os.readlink(view / "latest")
                    n = check_bank(view / target / "a", view / target / "b", WORKERS)
                except OSError as e:
                    # not mounted yet / nothing retained yet, or pruned between readlink and read
                    if e.errno not in (errno.ENOENT, errno.ESTALE, errno.EINVAL):
                        raise
                    time.sleep(0.01)
                    continue
                seen.append((int(target.split("-")[0]), n))
        except BaseException as e:   # noqa: BLE001 - reported by the test
            errors.append(e)

    transfers: dict[int, int] = {}
    threads = [threading.Thread(target=reader) for _ in range(2)]
    try:
        gid = g.checkpoint("a", "c0")
        g.wait(gid)
        transfers[gid] = check_bank(g.tree("a"), g.tree("b"), WORKERS)
        fj("browse", "--all", "--group", g.file, view)
        for t in threads:
            t.start()
        for i in range(1, 10):
            time.sleep(0.05)
            gid = g.checkpoint("ab"[i % 2], f"c{i}")
            g.wait(gid)
            transfers[gid] = check_bank(g.tree("a"), g.tree("b"), WORKERS)
    finally:
        done.set()
        for t in threads:
            t.join(60)
        assert not stop_bank(procs, stop)
    assert not errors, errors
    assert seen and all(transfers[k] == n for k, n in seen), (seen, transfers)
    assert len({k for k, _ in seen}) > 1, seen               # the readers saw latest move

    group = load_group(g.file)
    assert [p.id for p in retained_points(group)] == [6, 7, 8, 9, 10]
    r = subprocess.run([*FJ, "prune", "--group", os.fspath(g.file), "--keep-last", "2"],
                       env={**os.environ, "FUSEJOURNAL_FAULT": "history.prune:2"}, capture_output=True)
    assert r.returncode == -9, r
    # member a lost 6 only; b nothing: shown is what both have, each one consistent
    assert [p.id for p in retained_points(group)] == [7, 8, 9, 10]
    assert sorted(os.listdir(view)) == ["10-c9", "7-c6", "8-c7", "9-c8", "latest"]
    for k in (7, 8, 9, 10):
        d = view / f"{k}-c{k - 1}"
        assert check_bank(d / "a", d / "b", WORKERS) == transfers[k]
    fj("prune", "--group", g.file, "--keep-last", "2")
    assert [p.id for p in retained_points(group)] == [9, 10]
    for m in group.members:
        assert member_retained(m) == {p.members[m.name] for p in retained_points(group)}
