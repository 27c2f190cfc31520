"""The online seed's final round (seeding.py, step 4; docs/design.md "Seeding online"):
under the halt, names, attributes, links and xattrs of the last dirty set, with no
file data read; afterwards the contents replayed from the logged records.

No FUSE.  The original is changed with real os calls, each recorded the way the
Operations record it (``Write`` with the mtime after the write, ``Setattr`` after a
truncate, ``Mknod`` for a create ...) and preceded by the intent the activity log
would write.  Changes are also made *while the last round reads a file* (between
two of its block reads: the boundary the replay must get right).  Then the final
round with deferred contents plus the replay of the records since that round began
must leave the shadow equal to the original (``verify_matches`` and the sparse maps),
and the bytes of file data read under the halt are counted (the instrumentation:
``sysc.pread_full``, through which resync reads every block), not timed.
"""

from __future__ import annotations

import os
import random
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from fusejournal import seeding, sysc
from fusejournal.activity import Intent
from fusejournal.log import Marker, OrderedLog
from fusejournal.records import (
    ATTR_MODE,
    ATTR_MTIME,
    ATTR_SIZE,
    Link,
    Record,
    Rename,
    Unlink,
    Write,
    mknod_record,
    setattr_record,
)
from fusejournal.resync import Deferred, ResyncError
from fusejournal.seed import Seeder, sweep_hidden_links
from fusejournal.seeding import ReplayError, SeedingTask, reconcile, replay, unique
from fusejournal.shadow import SEEDED, Shadow
from fusejournal.treewalk import data_map

MiB = 1 << 20


class Orig:
    """The original tree, changed with records and intents as the mount would make them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.records: list[Record] = []
        self.intents: list[Intent] = []
        self.created: set[int] = set()         # made since the period began: no intent of their own

    def new_period(self) -> list[Intent]:
        out, self.intents, self.created = self.intents, [], set()
        return out

    def intent(self, p: Path) -> None:
        fd = os.open(p, os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if st.st_ino in self.created:
                return
            htype, handle = sysc.name_to_handle(fd)
            self.intents.append(Intent(st.st_ino, stat.S_ISDIR(st.st_mode), htype, handle))
        finally:
            os.close(fd)

    def pm(self, rel: str) -> int:
        return os.stat(self.root / rel).st_mtime_ns

    def write(self, rel: str, off: int, data: bytes) -> None:
        p = self.root / rel
        self.intent(p)
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, data, off)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.records.append(Write(st.st_ino, off, st.st_mtime_ns, data))

    def truncate(self, rel: str, size: int) -> None:
        p = self.root / rel
        self.intent(p)
        os.truncate(p, size)
        st = os.lstat(p)
        self.records.append(setattr_record(st.st_ino, ATTR_SIZE | ATTR_MTIME, st))

    def chmod(self, rel: str, mode: int) -> None:
        p = self.root / rel
        self.intent(p)
        os.chmod(p, mode)
        st = os.lstat(p)
        self.records.append(setattr_record(st.st_ino, ATTR_MODE, st))

    def create(self, rel: str, data: bytes = b"") -> None:
        p = self.root / rel
        self.intent(p.parent)
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        st = os.fstat(fd)
        os.close(fd)
        self.created.add(st.st_ino)
        self.records.append(mknod_record(st, self.pm(os.path.dirname(rel) or "."), rel.encode()))
        if data:
            self.write(rel, 0, data)

    def rename(self, a: str, b: str) -> None:
        self.intent((self.root / a).parent)
        self.intent((self.root / b).parent)
        ino = os.lstat(self.root / a).st_ino
        os.rename(self.root / a, self.root / b)
        self.records.append(Rename(0, ino, self.pm(os.path.dirname(a) or "."),
                                   self.pm(os.path.dirname(b) or "."), a.encode(), b.encode()))

    def link(self, a: str, b: str) -> None:
        self.intent((self.root / b).parent)
        ino = os.lstat(self.root / a).st_ino
        os.link(self.root / a, self.root / b)
        self.records.append(Link(ino, self.pm(os.path.dirname(b) or "."), b.encode()))

    def unlink(self, rel: str) -> None:
        self.intent((self.root / rel).parent)
        ino = os.lstat(self.root / rel).st_ino
        os.unlink(self.root / rel)
        self.records.append(Unlink(ino, self.pm(os.path.dirname(rel) or "."), rel.encode()))

    def files(self) -> list[str]:
        out = []
        for d, _, names in os.walk(self.root):
            for n in names:
                p = Path(d) / n
                if p.is_file() and not p.is_symlink():
                    out.append(str(p.relative_to(self.root)))
        return sorted(out)


def build(root: Path, big: int) -> None:
    """Two directories, a large file (data at its start, middle and end, holes between) with
    a hard link, small files."""
    (root / "d0").mkdir()
    (root / "d1").mkdir()
    with open(root / "d0" / "big", "wb") as f:
        for off in (0, big // 2, big - MiB):
            f.seek(off)
            f.write(random.Random(off).randbytes(MiB))
    os.link(root / "d0" / "big", root / "d1" / "big-link")
    for i in range(4):
        (root / f"d{i % 2}" / f"s{i}").write_bytes(b"small %d;" % i * 300)
    os.setxattr(root / "d0" / "s0", b"user.k", b"v")


def seeded(tmp: Path, big: int) -> tuple[Orig, Shadow, int, int]:
    started = time.time_ns()
    orig = Orig(tmp / "orig")
    orig.root.mkdir()
    build(orig.root, big)
    sh = Shadow(tmp / "shadow")
    sh.create()
    fd = os.open(orig.root, os.O_RDONLY | os.O_DIRECTORY)
    Seeder(sh, fd).run()
    sweep_hidden_links(sh)
    return orig, sh, fd, started


def assert_exact(sh: Shadow, fd: int, orig: Orig) -> None:
    assert sh.verify_matches(fd) == []
    for rel in orig.files():                 # holes too: the same data extents
        st = os.lstat(orig.root / rel)
        a = os.open(orig.root / rel, os.O_RDONLY)
        b = os.open(sh.root / "inodes" / str(st.st_ino), os.O_RDONLY)
        try:
            assert data_map(a, st.st_size) == data_map(b, st.st_size), rel
        finally:
            os.close(a)
            os.close(b)


def random_op(orig: Orig, rnd: random.Random, n: int, big: int) -> None:
    files = orig.files()
    f = rnd.choice(files)
    size = os.lstat(orig.root / f).st_size
    kind = rnd.choice(["write", "write", "write", "zeros", "truncate", "create", "rename", "link",
                       "unlink", "chmod", "overwrite"])
    d = f"d{rnd.randrange(2)}"
    if kind == "write":
        off = rnd.randrange(max(1, min(size + 4096, big)))
        orig.write(f, off, rnd.randbytes(rnd.randrange(1, 3 * 4096)))
    elif kind == "zeros":                    # zeros written are data, not holes
        orig.write(f, rnd.randrange(max(1, size + 1)), bytes(rnd.randrange(1, 8192)))
    elif kind == "truncate":
        orig.truncate(f, rnd.choice([0, rnd.randrange(max(1, size + 1)), size + rnd.randrange(1, 3 * MiB)]))
    elif kind == "create":
        orig.create(f"{d}/new{n}", rnd.randbytes(rnd.randrange(0, 5000)))
    elif kind == "rename":
        orig.rename(f, f"{d}/mv{n}")
    elif kind == "overwrite" and len(files) > 1:
        g = rnd.choice([x for x in files if x != f])
        orig.rename(f, g)                     # over another file
    elif kind == "link":
        orig.link(f, f"{d}/ln{n}")
    elif kind == "unlink" and len(files) > 2:
        orig.unlink(f)
    elif kind == "chmod":
        orig.chmod(f, rnd.choice([0o600, 0o644, 0o755]))


def counting_reads(monkeypatch: pytest.MonkeyPatch, during: Callable[[], None] | None = None) -> list[int]:
    """Count the bytes of file data resync reads (every block goes through
    ``sysc.pread_full``); ``during`` runs before each read (changes under the round)."""
    count = [0]
    real = sysc.pread_full

    def pread_full(fd: int, n: int, off: int) -> bytes:
        if during is not None:
            during()
        data = real(fd, n, off)
        count[0] += len(data)
        return data
    monkeypatch.setattr(sysc, "pread_full", pread_full)
    return count


# ----------------------------------------------------------------- the scheme, step by step

@pytest.mark.parametrize("seed", range(24))
def test_final_round_with_replay_is_exact_under_changes_at_the_boundary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Changes before the last round, while it reads (between its block reads), and after
    it; then the final round (contents deferred: no file data read) and the replay of every
    record since the round began (or since earlier: a longer prefix is harmless) give the
    original exactly: contents, holes, sizes, modes, mtimes, hard links, names.  If the
    replay cannot prove a file (new to the shadow, not created within the records), it
    refuses, and a round that compares every file (``distrust``) makes the shadow exact."""
    rnd = random.Random(seed)
    big = 8 * MiB
    orig, sh, fd, started = seeded(tmp_path, big)
    try:
        for n in range(6):                                   # before the last round
            random_op(orig, rnd, n, big)
        early = len(orig.records)
        dirty = orig.new_period()
        start = len(orig.records)                            # the last round begins
        pending = [100 + n for n in range(12)]

        def during() -> None:
            if pending and rnd.random() < 0.3:
                random_op(orig, rnd, pending.pop(), big)
        reads = counting_reads(monkeypatch, during)
        while True:
            try:
                reconcile(fd, sh, unique(dirty), started, None)
                break
            except (ResyncError, OSError):       # changed under the round: it is redone
                dirty = dirty + orig.new_period()
                start = len(orig.records)
        for n in range(200, 206):                            # after it, up to the halt
            random_op(orig, rnd, n, big)
        monkeypatch.undo()
        reads = counting_reads(monkeypatch)
        defer, stats = Deferred(), {}
        final = unique(orig.new_period())
        reconcile(fd, sh, final, started, None, defer=defer, stats=stats)
        assert reads[0] == 0 and stats["data_bytes_read"] == 0     # nothing read under the halt
        monkeypatch.undo()
        records = orig.records[early - 3 if seed % 2 and early >= 3 else start:]
        try:
            replay(sh, defer, records)
        except ReplayError as e:
            # not claimed; the next round compares every file it reaches (distrust)
            assert "not created within" in str(e)
            reconcile(fd, sh, final, started, None, distrust=True)
        assert_exact(sh, fd, orig)
    finally:
        os.close(fd)


def test_unreplayed_final_round_is_caught_by_a_distrusting_round(tmp_path: Path) -> None:
    """A kill between the halt and the replay leaves files with the original's size and
    mtime but other contents; a normal round, which trusts size and mtime for a file it
    reaches through its directory, would keep them; a distrusting one compares them."""
    orig, sh, fd, started = seeded(tmp_path, 2 * MiB)
    try:
        orig.new_period()
        orig.create("d1/late", b"L" * 10000)                 # new: created empty, at its size
        orig.write("d0/s0", 10, b"changed")                  # existing: contents deferred
        final = orig.new_period()
        defer = Deferred()
        reconcile(fd, sh, unique(final), started, None, defer=defer)
        assert set(defer.fresh) == {os.lstat(orig.root / "d1" / "late").st_ino}
        assert sh.verify_matches(fd) != []                   # not replayed: not exact
        reconcile(fd, sh, unique(final), started, None)      # what a trusting round does ...
        assert any("late" in d for d in sh.verify_matches(fd))
        reconcile(fd, sh, unique(final), started, None, distrust=True)
        assert_exact(sh, fd, orig)
    finally:
        os.close(fd)


def test_replay_refuses_what_the_records_cannot_prove(tmp_path: Path) -> None:
    """A file the shadow lacks whose creation is before the replayed records, and a size
    that does not come out: ReplayError, nothing claimed."""
    orig, sh, fd, started = seeded(tmp_path, 2 * MiB)
    try:
        orig.new_period()
        orig.create("d1/old", b"O" * 5000)
        orig.new_period()
        start = len(orig.records)
        orig.rename("d1/old", "d0/old")                      # the shadow never had it
        defer = Deferred()
        reconcile(fd, sh, unique(orig.new_period()), started, None, defer=defer)
        with pytest.raises(ReplayError, match="not created within"):
            replay(sh, defer, orig.records[start:])
        st = os.lstat(orig.root / "d0" / "s2")
        orig.write("d0/s2", 0, b"x")
        defer = Deferred()
        reconcile(fd, sh, unique(orig.new_period()), started, None, defer=defer)
        with pytest.raises(ReplayError, match="bytes after the replay"):
            replay(sh, defer, [Write(st.st_ino, st.st_size, 0, b"beyond")])   # not the original's
    finally:
        os.close(fd)


# ----------------------------------------------------------------- SeedingTask.at_halt

def _task(sh: Shadow, fd: int, tmp: Path, olog: OrderedLog) -> SeedingTask:
    state = SeedingTask.new_state(1, 0)
    state.update(phase="converge")
    act = tmp / "activity"
    act.mkdir(exist_ok=True)
    task = SeedingTask(sh, fd, activity_dir=act, spill_dir=None, state=state,
                       new_period=lambda: 1, current_period=lambda: 1)
    task.olog = olog                        # (an attribute: the same test runs on older code)
    return task


def _marker(cp: int) -> Marker:
    return Marker(checkpoint=cp, label=f"cp{cp}", time_ns=time.time_ns(), operations=0,
                  raw_bytes=0, stored_bytes=0)


@pytest.mark.parametrize("size_mib", [8, 64])
def test_at_halt_reads_no_file_data_whatever_the_file_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size_mib: int) -> None:
    """The halt of the first complete checkpoint: a large file written at random offsets
    since the last round (and a new one, a truncate, a hard link, a rename) costs no file
    data read under it (counted, not timed: the same 0 bytes at 8 and 64 MiB); the replay
    after the append makes the shadow exact before seeded.json and applied.json claim it."""
    big = size_mib * MiB
    orig, sh, fd, started = seeded(tmp_path, big)
    olog = OrderedLog(tmp_path / "log")
    olog.open()
    try:
        rnd = random.Random(size_mib)
        orig.new_period()
        for _ in range(40):                                  # since the last round began
            orig.write("d0/big", rnd.randrange(big), rnd.randbytes(rnd.randrange(1, 64 << 10)))
        orig.truncate("d1/s1", 3)
        orig.create("d1/new", b"N" * 70000)
        orig.link("d0/s2", "d1/s2-link")
        orig.rename("d0/s0", "d1/s0-moved")
        olog.append(orig.records, _marker(1))                # a checkpoint during the seed
        orig.records = []
        orig.write("d1/big-link", big - 10, b"E" * 100)      # the batch of the final checkpoint
        orig.write("d1/new", 100, b"W" * 10)
        olog.append(orig.records, _marker(2))
        task = _task(sh, fd, tmp_path, olog)
        task.final_intents = unique(orig.new_period())
        task.replay_after = 0
        task.state = "ready"
        reads = counting_reads(monkeypatch)
        trio.run(task.at_halt)
        assert task.final_pending, "the final round did not run"
        assert reads[0] == 0, f"{reads[0]} bytes of file data read under the halt"
        assert not (sh.root / SEEDED).exists() and not sh.applied_path.exists()
        trio.run(task.complete, 2, time.time_ns())
        assert sh.applied == 2 and task.done
        assert_exact(sh, fd, orig)
        assert reads[0] == 0
    finally:
        olog.close()
        os.close(fd)


def test_failed_replay_claims_nothing_and_keeps_the_set(tmp_path: Path) -> None:
    orig, sh, fd, started = seeded(tmp_path, 2 * MiB)
    olog = OrderedLog(tmp_path / "log")
    olog.open()
    try:
        orig.new_period()
        orig.create("d1/old", b"O" * 5000)                   # before the last round began ...
        orig.new_period()
        orig.rename("d1/old", "d0/old")                      # ... and the shadow never had it
        olog.append(orig.records[-1:], _marker(1))
        task = _task(sh, fd, tmp_path, olog)
        final = unique(orig.new_period())
        task.final_intents = final
        task.replay_after = 0
        task.state = "ready"
        trio.run(task.at_halt)
        assert task.final_pending
        with pytest.raises(ReplayError, match="not created within"):
            trio.run(task.complete, 1, time.time_ns())
        assert not task.done and task.state == "converging" and not task.final_pending
        assert task.final_intents == final                   # dirty again for the next round
        assert not (sh.root / SEEDED).exists() and not sh.applied_path.exists()
    finally:
        olog.close()
        os.close(fd)


def test_round_skips_a_file_that_moves_while_read_then_distrusts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file renamed while a round reads it (a busy application) does not fail the round
    (which would fail again and again under steady renames): it is skipped and counted,
    and the next round, distrusting, makes it exact."""
    orig, sh, fd, started = seeded(tmp_path, 2 * MiB)
    try:
        orig.new_period()
        orig.create("d1/fresh", b"F" * 300000)
        orig.write("d0/big", 5, b"read first")         # files are synced before creations
        dirty = orig.new_period()
        moved = []

        def during() -> None:
            if not moved:
                moved.append(1)
                orig.rename("d1/fresh", "d0/fresh")
        counting_reads(monkeypatch, during)
        with pytest.raises(OSError):
            reconcile(fd, sh, unique(dirty), started, None)
        monkeypatch.undo()
        moved.clear()
        counting_reads(monkeypatch, during)
        orig.rename("d0/fresh", "d1/fresh")
        dirty += orig.new_period()
        stats: dict[str, int] = {}
        reconcile(fd, sh, unique(dirty), started, None, stats=stats, skip_vanished=True)
        assert stats["skipped"] == 1
        monkeypatch.undo()
        reconcile(fd, sh, unique(dirty + orig.new_period()), started, None, distrust=True)
        assert_exact(sh, fd, orig)
    finally:
        os.close(fd)


# ----------------------------------------------------------------- rounds that always skip

def _skewed_shadow_file(sh: Shadow, orig: Orig, rel: str) -> None:
    """The shadow's copy of ``rel`` gets other bytes with the original's size and mtime
    (a round cut short by a move had written part of it and set them)."""
    st = os.lstat(orig.root / rel)
    p = sh.root / "inodes" / str(st.st_ino)
    with open(p, "r+b") as f:
        f.write(b"XXXX")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_final_round_that_compares_needs_no_replay_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No round was a base for the replay (each skipped a file): the final round compares
    contents under the halt (``final_compare``), so a file the shadow holds with the
    original's size and mtime but other bytes is made exact, with nothing to replay."""
    orig, sh, fd, started = seeded(tmp_path, 2 * MiB)
    olog = OrderedLog(tmp_path / "log")
    olog.open()
    try:
        orig.new_period()
        _skewed_shadow_file(sh, orig, "d1/s1")
        orig.rename("d1/s1", "d0/s1-moved")                  # reached through its directories
        orig.write("d0/big", 7, b"after the last round")
        olog.append(orig.records, _marker(1))
        task = _task(sh, fd, tmp_path, olog)
        task.final_intents = unique(orig.new_period())
        task.replay_after = None                             # no round to replay from
        task.final_compare = True
        task.state = "ready"
        reads = counting_reads(monkeypatch)
        trio.run(task.at_halt)
        assert task.final_pending, "the final round did not run"
        assert reads[0] > 0                                  # contents compared, under the halt
        trio.run(task.complete, 1, time.time_ns())
        assert sh.applied == 1 and task.done
        assert_exact(sh, fd, orig)
    finally:
        olog.close()
        os.close(fd)


def test_rounds_that_always_skip_end_in_a_final_round_that_compares(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every round skips a file (an application that renames a file all the time, here
    while each round reads it): none is a base for the replay, and the seed used to
    converge for ever.  After SKIP_ROUNDS such rounds the final round is taken comparing
    contents; the shadow is then exact."""
    orig, sh, fd, started = seeded(tmp_path, 2 * MiB)
    olog = OrderedLog(tmp_path / "log")
    olog.open()
    try:
        names = ["d0/s2", "d1/s2-moved"]
        task = _task(sh, fd, tmp_path, olog)
        # the periods are the test's (Orig records the intents of its own changes)
        monkeypatch.setattr(seeding, "read_periods", lambda directory, after, upto: orig.new_period())
        real = seeding.reconcile
        rounds: list[bool] = []

        def skipping(*args: object) -> int:
            """The round, during which the file moves: it is skipped (its copy left with
            other bytes under the original's size and mtime) and dirty again."""
            rounds.append(bool(args[8]))                     # distrust
            n = real(*args)                                  # type: ignore[arg-type]
            _skewed_shadow_file(sh, orig, names[0])
            orig.rename(names[0], names[1])
            names.reverse()
            stats = args[7]
            assert isinstance(stats, dict)
            stats["skipped"] = stats.get("skipped", 0) + 1
            return n
        monkeypatch.setattr(seeding, "reconcile", skipping)
        skipping(fd, sh, [], started, None, lambda: False, None, {}, False, True)   # the copy's end
        rounds.clear()
        finals: list[tuple[bool, int | None]] = []

        async def checkpoint(label: str) -> None:
            finals.append((task.final_compare, task.replay_after))
            await task.at_halt()
            await task.complete(1, time.time_ns())
        task.checkpoint = checkpoint

        async def converge() -> None:
            with trio.fail_after(60):                        # (for ever, before)
                await task._converge()
        trio.run(converge)
        assert finals == [(True, None)] and task.done
        assert len(rounds) == seeding.SKIP_ROUNDS and rounds[1:] == [True] * (len(rounds) - 1)
        assert_exact(sh, fd, orig)
    finally:
        olog.close()
        os.close(fd)
