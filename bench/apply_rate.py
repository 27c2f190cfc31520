#!/usr/bin/env python3
"""The updater's apply rate: records/s of ``updater.apply_records`` for a batch of
N creates (Mknod of empty files) spread over nested directories, on a fresh shadow
in a scratch directory.  No FUSE mount, no log: the apply loop alone (path walk,
create, owner, mode, times, hidden link, parent mtime, staging cursor).

    .venv/bin/python bench/apply_rate.py [--files 10000] [--depth 4] [--per-dir 100] [--repeat 5]

Prints the best and median of ``--repeat`` runs (each on a new shadow), by wall
time and by the process's CPU time (user + system: less disturbed by a busy machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusejournal.records import Mkdir, Mknod, Record  # noqa: E402
from fusejournal.shadow import Shadow  # noqa: E402
from fusejournal.updater import apply_records  # noqa: E402


def batch(files: int, depth: int, per_dir: int) -> list[Record]:
    recs: list[Record] = []
    now = time.time_ns()
    uid, gid = os.getuid(), os.getgid()
    made: set[bytes] = set()
    for i in range(files):
        d = i // per_dir
        comps = [b"d%d" % (d % 10 ** (k + 1)) for k in range(depth)]    # a/b/c/... per leaf
        path = b""
        for c in comps:
            path = path + b"/" + c if path else c
            if path not in made:
                made.add(path)
                recs.append(Mkdir(0o755, uid, gid, now, now, path))
        recs.append(Mknod(1_000_000 + i, 0o100644, uid, gid, 0, now, now, path + b"/f%d" % i))
    return recs


def run_once(scratch: Path, recs: list[Record]) -> tuple[float, float]:
    root = Path(tempfile.mkdtemp(dir=scratch))
    src = root / "src"
    src.mkdir()
    sh = Shadow(root / "shadow", identity=Shadow.new_identity({"path": str(src), "dev": 0, "ino": 0}, "x"))
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sh.seed(fd)
        t0, c0 = time.perf_counter(), time.process_time()
        apply_records(sh, 1, recs)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        os.close(fd)
        sh.close()
        shutil.rmtree(root)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--per-dir", type=int, default=100)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--scratch", default="/var/tmp")
    a = p.parse_args()
    recs = batch(a.files, a.depth, a.per_dir)
    runs = [run_once(Path(a.scratch), recs) for _ in range(a.repeat)]
    wall, cpu = [w for w, _ in runs], [c for _, c in runs]
    print(f"{len(recs)} records ({a.files} creates, depth {a.depth}, {a.per_dir} per directory): "
          f"wall best {len(recs) / min(wall):,.0f} records/s, median {len(recs) / statistics.median(wall):,.0f}; "
          f"CPU (user+sys) best {len(recs) / min(cpu):,.0f} records/s, median "
          f"{len(recs) / statistics.median(cpu):,.0f} (loadavg {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
