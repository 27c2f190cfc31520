"""browse --group: one directory per member, every member at one group checkpoint."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from pathlib import Path

import pytest
from test_groups import Group

from conftest import can_mount, fj, force_unmount, is_mounted

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not can_mount(), reason="needs root, /dev/fuse and fusermount3")]


@pytest.fixture
def group(tmp_path: Path):
    srcs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for s in srcs.values():
        s.mkdir()
    g = Group(tmp_path, srcs)
    point = tmp_path / "view"
    point.mkdir()
    try:
        yield g, point
    finally:
        for name in srcs:
            if is_mounted(point / name):
                fj("umount", point / name, check=False)
            force_unmount(point / name)
        g.cleanup()


def _put(p: Path, n: int) -> None:
    # many small writes: the member's updater applies the file piece by piece
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for k in range(32):
            os.pwrite(fd, b"%07d\n" % n * 128, k * 1024)
    finally:
        os.close(fd)


def _get(p: Path) -> int:
    while True:
        try:
            data = p.read_bytes()
            break
        except OSError as e:
            # opened at one group checkpoint, read after the view moved on: ESTALE, retry
            if e.errno != errno.ESTALE:
                raise
    n = int(data[:7])
    assert data == b"%07d\n" % n * 128 * 32, f"{p}: torn"
    return n


def test_browse_group_shows_every_member_at_one_checkpoint(group, tmp_path: Path) -> None:
    g, point = group
    g.mount()
    for src in g.sources.values():
        for i in range(10):
            _put(src / f"f{i}", 0)
    g.wait(g.checkpoint("a", "c0"))
    fj("browse", "--group", g.file, point)
    assert sorted(os.listdir(point)) == ["a", "b"]
    assert _get(point / "a" / "f0") == 0 and _get(point / "b" / "f9") == 0

    stop = threading.Event()
    errors: list = []
    reads = [0]

    def reader() -> None:
        # alternate between the members: the values must never go backwards, so no
        # member is ever seen behind another one that was read before it
        last = 0
        try:
            while not stop.is_set():
                for name in ("a", "b"):
                    for i in range(10):
                        n = _get(point / name / f"f{i}")
                        assert n >= last, f"{name}/f{i} at {n} after {last}"
                        last = n
                        reads[0] += 1
        except BaseException as e:   # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for n in range(1, 16):
            for i in range(10):
                _put(g.sources["a"] / f"f{i}", n)     # the debit first ...
            for i in range(10):
                _put(g.sources["b"] / f"f{i}", n)     # ... then the credit
            gid = g.checkpoint("ab"[n % 2], f"c{n}")
            if n % 5 == 0:
                g.wait(gid)
                out = tmp_path / f"copy{n}"
                subprocess.run(["cp", "-a", os.fspath(point), os.fspath(out)], check=True)
                for name in ("a", "b"):
                    for i in range(10):
                        assert _get(out / name / f"f{i}") == n
            assert not errors, errors
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert reads[0] > 0


def test_browse_group_refuses_a_non_empty_point(group, tmp_path: Path) -> None:
    g, point = group
    g.mount()
    g.wait(g.checkpoint("a"))
    (point / "x").write_text("x")
    r = fj("browse", "--group", g.file, point, check=False)
    assert r.returncode != 0 and "not empty" in r.stderr
    assert not is_mounted(point / "a")


def test_a_member_ahead_is_not_shown_until_the_others_catch_up(group, tmp_path: Path) -> None:
    """Member b's updater held back (a shared lock on its browse gate's want byte keeps
    the updater out, not readers): the view must not show a at G2 with b at G1; it waits,
    and shows both at G2 once b has caught up."""
    import fcntl
    import time
    g, point = group
    g.mount()
    for name in ("a", "b"):
        _put(g.sources[name] / "f0", 1)
    g.wait(g.checkpoint("a", "g1"))
    fj("browse", "--group", g.file, point)
    assert _get(point / "a" / "f0") == 1 and _get(point / "b" / "f0") == 1
    lock = os.open(g.tree("b").parent / "browse.lock", os.O_RDWR)
    fcntl.lockf(lock, fcntl.LOCK_SH, 1, 0)
    got: list = []
    try:
        for name in ("a", "b"):
            _put(g.sources[name] / "f0", 2)
        g.checkpoint("a", "g2")
        deadline = time.monotonic() + 30
        while _get(g.tree("a") / "f0") != 2:       # a's shadow moved on, b's is held
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _get(g.tree("b") / "f0") == 1

        def reader() -> None:
            got.append(("a", _get(point / "a" / "f0")))
            got.append(("b", _get(point / "b" / "f0")))
        t = threading.Thread(target=reader)
        t.start()
        time.sleep(1.0)
        assert got == [], f"a member was shown ahead of another: {got}"
    finally:
        fcntl.lockf(lock, fcntl.LOCK_UN, 1, 0)
        os.close(lock)
    t.join(30)
    assert got == [("a", 2), ("b", 2)]
