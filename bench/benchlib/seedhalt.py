"""The online seed's final halt against the size of the files written during the seed.

No FUSE: the daemon's own ``SeedingTask.at_halt`` (what runs inside the halt of the first
complete checkpoint) and ``complete`` (the replay after it, then the claim), on a real
original and shadow in ``--scratch``.  For each size: an original with one dense file of
that size (and small files), seeded; then ``--writes`` random writes of 4-64 KiB to it (and
a create, a truncate, a hard link, a rename) recorded as the mount records them, in two
checkpoints of an ordered log; then the final round.  Printed per size: the time inside
the halt, the bytes of file data read inside it (counted through ``sysc.pread_full``),
the replay's time and bytes, and whether the shadow then equals the original.

    .venv/bin/python bench/benchlib/seedhalt.py --sizes 16,64,256

Runs the code it is started from (``PYTHONPATH`` selects another tree, e.g. an older
commit's, whose ``at_halt`` compared the contents under the halt).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import stat
import sys
import time
from pathlib import Path

import trio

from fusejournal import sysc
from fusejournal.activity import Intent
from fusejournal.log import Marker, OrderedLog
from fusejournal.records import ATTR_MTIME, ATTR_SIZE, Link, Record, Rename, Write, mknod_record, setattr_record
from fusejournal.seed import Seeder, sweep_hidden_links
from fusejournal.seeding import SeedingTask, unique
from fusejournal.shadow import Shadow

MiB = 1 << 20


def intent(p: Path) -> Intent:
    fd = os.open(p, os.O_PATH | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        htype, handle = sysc.name_to_handle(fd)
        return Intent(st.st_ino, stat.S_ISDIR(st.st_mode), htype, handle)
    finally:
        os.close(fd)


def one(base: Path, size: int, writes: int) -> dict[str, object]:
    shutil.rmtree(base, ignore_errors=True)
    orig = base / "orig"
    (orig / "d").mkdir(parents=True)
    with open(orig / "db", "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    for i in range(10):
        (orig / "d" / f"s{i}").write_bytes(b"small %d;" % i * 200)
    started = time.time_ns()
    sh = Shadow(base / "shadow")
    sh.create()
    fd = os.open(orig, os.O_RDONLY | os.O_DIRECTORY)
    olog = OrderedLog(base / "log")
    olog.open()
    try:
        Seeder(sh, fd).run()
        sweep_hidden_links(sh)
        rnd = random.Random(size)
        intents = [intent(orig / "db"), intent(orig / "d")]
        recs: list[Record] = []
        wfd = os.open(orig / "db", os.O_WRONLY)
        for k in range(writes):
            data = rnd.randbytes(rnd.randrange(4096, 64 << 10))
            off = rnd.randrange(size - len(data))
            os.pwrite(wfd, data, off)
            recs.append(Write(os.fstat(wfd).st_ino, off, os.fstat(wfd).st_mtime_ns, data))
            if k == writes // 2:
                olog.append(recs, Marker(1, "cp1", time.time_ns(), 0, 0, 0))
                recs = []
        os.close(wfd)
        new = orig / "d" / "new"
        nfd = os.open(new, os.O_CREAT | os.O_WRONLY, 0o644)
        st = os.fstat(nfd)
        recs.append(mknod_record(st, os.stat(orig / "d").st_mtime_ns, b"d/new"))
        os.pwrite(nfd, b"N" * 70000, 0)
        st = os.fstat(nfd)
        os.close(nfd)
        recs.append(Write(st.st_ino, 0, st.st_mtime_ns, b"N" * 70000))
        os.truncate(orig / "d" / "s1", 3)
        st = os.lstat(orig / "d" / "s1")
        recs.append(setattr_record(st.st_ino, ATTR_SIZE | ATTR_MTIME, st))
        intents.append(intent(orig / "d" / "s1"))
        os.link(orig / "d" / "s2", orig / "d" / "s2-link")
        recs.append(Link(os.lstat(orig / "d" / "s2").st_ino, os.stat(orig / "d").st_mtime_ns, b"d/s2-link"))
        ino = os.lstat(orig / "d" / "s3").st_ino
        os.rename(orig / "d" / "s3", orig / "s3-moved")
        intents.append(intent(orig))
        recs.append(Rename(0, ino, 0, 0, b"d/s3", b"s3-moved"))
        olog.append(recs, Marker(2, "cp2", time.time_ns(), 0, 0, 0))
        state = SeedingTask.new_state(1, 0)
        state.update(phase="converge", started_ns=started)
        (base / "activity").mkdir()
        task = SeedingTask(sh, fd, activity_dir=base / "activity", spill_dir=None, state=state,
                           new_period=lambda: 1, current_period=lambda: 1)
        task.olog = olog
        task.final_intents = unique(intents)
        task.replay_after = 0
        task.state = "ready"
        os.sync()
        count = [0]
        real = sysc.pread_full

        def pread_full(fd: int, n: int, off: int) -> bytes:
            data = real(fd, n, off)
            count[0] += len(data)
            return data
        sysc.pread_full = pread_full
        try:
            t0 = time.perf_counter()
            trio.run(task.at_halt)
            halt_s = time.perf_counter() - t0
            halt_read = count[0]
            t1 = time.perf_counter()
            trio.run(task.complete, 2, time.time_ns())
            after_s = time.perf_counter() - t1
        finally:
            sysc.pread_full = real
        exact = sh.verify_matches(fd) == []
        return {"size": size, "halt_s": halt_s, "halt_read": halt_read, "after_s": after_s,
                "exact": exact, "final": task.final_pending is False and task.done}
    finally:
        olog.close()
        os.close(fd)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="16,64,256", help="MiB, comma-separated")
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--scratch", default="/var/tmp")
    a = p.parse_args()
    base = Path(a.scratch) / "fj-seedhalt"
    import fusejournal
    print(f"code: {Path(fusejournal.__file__).parent}; {a.writes} random writes of 4-64 KiB since "
          f"the last round\n", file=sys.stderr)
    print("| file size | inside the halt | file data read inside it | replay + claim after it | exact |")
    print("|---:|---:|---:|---:|---|")
    for s in a.sizes.split(","):
        r = one(base, int(s) * MiB, a.writes)
        print(f"| {s} MiB | {float(r['halt_s']) * 1000:.1f} ms | {int(r['halt_read']) / MiB:.1f} MiB | "
              f"{float(r['after_s']) * 1000:.0f} ms | {r['exact']} |", flush=True)


if __name__ == "__main__":
    main()
