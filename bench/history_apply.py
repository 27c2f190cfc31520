#!/usr/bin/env python3
"""The cost of writing history: one batch applied by ``updater.apply_records`` to a fresh
shadow, with and without the reverse batch (fusejournal/history.py), in a scratch
directory.  No FUSE mount, no log: an original tree is made, a shadow seeded from it
(as tests/unit's Env does), and a batch of records built by hand is applied.

    .venv/bin/python bench/history_apply.py [--repeat 3] [--cases overwrite,append,...]
        [--scratch /var/tmp] [--profile overwrite]

Cases (each a single batch):

* ``overwrite``: a 16 MiB file of random data overwritten front to back in 4 KiB writes
  (4096 Write records; every byte needs its pre-image);
* ``overwrite-random``: the same 4096 writes of 4 KiB at shuffled offsets;
* ``append``: 4096 appends of 4 KiB to an existing 1 KiB file (nothing to keep but its Attr);
* ``create``: 2000 new files of 100 bytes (Mknod + Write; an Entry per name);
* ``sequential``: a 64 MiB file overwritten in 1 MiB writes (64 Write records).

For each case: the best and median wall time of ``--repeat`` runs (each on a new
shadow) of the apply alone (the records, with their pre-images captured when history
is on) and its median CPU time (user + system of this process: less disturbed by a
busy machine), the median of the history's finish (END, fsync of the rev, rename),
the ratios history / no history of the medians, and the size of the rev.  ``--profile CASE`` runs that case once with
history under cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusejournal import layout  # noqa: E402
from fusejournal.history import HistoryWriter, Policy, rev_name  # noqa: E402
from fusejournal.records import Mknod, Record, Write  # noqa: E402
from fusejournal.shadow import Shadow  # noqa: E402
from fusejournal.updater import apply_records  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20

#: a case: (make the original under the given dir) -> the batch of records
Case = Callable[[Path], list[Record]]


def _file(src: Path, name: str, data: bytes) -> int:
    p = src / name
    p.write_bytes(data)
    return p.stat().st_ino


def _writes(ino: int, offsets: list[int], size: int) -> list[Record]:
    now = time.time_ns()
    rnd = random.Random(7)
    return [Write(ino, off, now, rnd.randbytes(size)) for off in offsets]


def overwrite(src: Path) -> list[Record]:
    ino = _file(src, "f", random.Random(1).randbytes(16 * MiB))
    return _writes(ino, list(range(0, 16 * MiB, 4 * KiB)), 4 * KiB)


def overwrite_random(src: Path) -> list[Record]:
    ino = _file(src, "f", random.Random(1).randbytes(16 * MiB))
    offsets = list(range(0, 16 * MiB, 4 * KiB))
    random.Random(3).shuffle(offsets)
    return _writes(ino, offsets, 4 * KiB)


def append(src: Path) -> list[Record]:
    ino = _file(src, "f", b"x" * KiB)
    return _writes(ino, [KiB + i * 4 * KiB for i in range(4096)], 4 * KiB)


def create(src: Path) -> list[Record]:
    (src / "d").mkdir()
    now = time.time_ns()
    uid, gid = os.getuid(), os.getgid()
    recs: list[Record] = []
    for i in range(2000):
        ino = 10_000_000 + i                 # inode keys no existing object has
        recs.append(Mknod(ino, 0o100644, uid, gid, 0, now, now, b"d/f%d" % i))
        recs.append(Write(ino, 0, now, b"%099d\n" % i))
    return recs


def sequential(src: Path) -> list[Record]:
    ino = _file(src, "f", random.Random(1).randbytes(64 * MiB))
    return _writes(ino, list(range(0, 64 * MiB, MiB)), MiB)


CASES: dict[str, Case] = {"overwrite": overwrite, "overwrite-random": overwrite_random,
                          "append": append, "create": create, "sequential": sequential}


class Run:
    def __init__(self, records: int, apply_s: float, cpu_s: float, finish_s: float, rev_bytes: int) -> None:
        self.records, self.apply_s, self.cpu_s = records, apply_s, cpu_s
        self.finish_s, self.rev_bytes = finish_s, rev_bytes


def run_once(scratch: Path, case: Case, with_history: bool,
             profile: cProfile.Profile | None = None) -> Run:
    root = Path(tempfile.mkdtemp(dir=scratch, prefix="fj-histapply-"))
    sh: Shadow | None = None
    fd = -1
    try:
        src = root / "src"
        src.mkdir()
        recs = case(src)
        sh = Shadow(root / "shadow", identity=Shadow.new_identity({"path": str(src), "dev": 0, "ino": 0}, "x"))
        fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
        sh.seed(fd)
        os.sync()                           # the seed's writeback is not part of the batch
        hw = HistoryWriter(sh.root, Policy()) if with_history else None
        if profile is not None:
            profile.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        apply_records(sh, 1, recs, 0, hw)
        t1, c1 = time.perf_counter(), time.process_time()
        if profile is not None:
            profile.disable()
        rev_bytes = 0
        if hw is not None:
            hw.finish(1, time.time_ns(), "bench")
            rev_bytes = os.stat(sh.root / layout.SHADOW_HISTORY / rev_name(0)).st_size
            hw.close()
        return Run(len(recs), t1 - t0, c1 - c0, time.perf_counter() - t1, rev_bytes)
    finally:
        if fd >= 0:
            os.close(fd)
        if sh is not None:
            sh.close()
        shutil.rmtree(root)


def _fmt(xs: list[float]) -> str:
    return f"{min(xs):7.3f} {statistics.median(xs):7.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--scratch", default="/var/tmp")
    p.add_argument("--profile", choices=sorted(CASES), help="profile this case (with history) instead")
    a = p.parse_args()
    scratch = Path(a.scratch)
    if a.profile:
        prof = cProfile.Profile()
        run_once(scratch, CASES[a.profile], True, prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    names = [c for c in a.cases.split(",") if c]
    for c in names:
        if c not in CASES:
            p.error(f"unknown case {c!r} (known: {', '.join(CASES)})")
    print(f"{'case':17} {'records':>7} | {'no history':>22} | {'history':>22} {'finish':>7} | "
          f"{'ratio':>11} | {'rev':>6}")
    print(f"{'':17} {'':>7} | {'wall best/med   CPU':>22} | {'wall best/med   CPU':>22} {'med':>7} | "
          f"{'wall   CPU':>11} | {'MiB':>6}")
    for c in names:
        plain = [run_once(scratch, CASES[c], False) for _ in range(a.repeat)]
        hist = [run_once(scratch, CASES[c], True) for _ in range(a.repeat)]
        med = statistics.median
        print(f"{c:17} {plain[0].records:7} | {_fmt([r.apply_s for r in plain])} {med(r.cpu_s for r in plain):6.3f} | "
              f"{_fmt([r.apply_s for r in hist])} {med(r.cpu_s for r in hist):6.3f} "
              f"{med(r.finish_s for r in hist):7.3f} | "
              f"{med(r.apply_s for r in hist) / med(r.apply_s for r in plain):5.1f} "
              f"{med(r.cpu_s for r in hist) / med(r.cpu_s for r in plain):5.1f} | "
              f"{hist[0].rev_bytes / MiB:6.2f}")
    print(f"(seconds; loadavg {os.getloadavg()[0]:.2f}; {a.repeat} runs each on a new shadow; wall and CPU "
          f"(user+sys of this process) of apply_records, finish = HistoryWriter.finish (END, fsync, rename))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
