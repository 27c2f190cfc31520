#!/usr/bin/env python3
"""The daemon's CPU per listed entry: ``Operations.readdir`` over a directory of N
files, called directly (no kernel, no FUSE loop), the way pyfuse3 calls it for
READDIRPLUS: one call per request of about 190 entries (a 32 KiB buffer on
Linux 6.18), each entry an ``fstatat``, its ``EntryAttributes`` and its lookup.
``pyfuse3.readdir_reply`` is replaced by a counter that ends each request at
190 entries, so what is measured is fusejournal's own work per entry.

    .venv/bin/python bench/readdir_cpu.py [--entries 10000] [--rounds 15] [--scratch DIR]

Prints the best and median CPU time (user + system of this process: less
disturbed by a busy machine than wall time) of one listing of the directory,
and per entry.  The first round's listing also registers every inode (a
first listing); the rest are repeated listings, as when `ls` runs again.
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
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyfuse3  # noqa: E402
import trio  # noqa: E402

from fusejournal import fs  # noqa: E402
from fusejournal.halt import Halt  # noqa: E402
from fusejournal.tempstore import TempStore  # noqa: E402

PER_REQUEST = 190


class _Token:
    def __init__(self) -> None:
        self.replies = 0
        self.in_request = 0


def _reply(token: _Token, name: bytes, attr: object, next_id: int) -> bool:
    if token.in_request == PER_REQUEST:
        return False                 # the request's buffer is full: not added
    token.in_request += 1
    token.replies += 1
    return True


async def _listing(ops: fs.Operations, ino: int, ctx: object) -> int:
    fh = fs.dir_fh(await ops.opendir(ino, ctx))   # type: ignore[arg-type]
    token = _Token()
    start = 0
    while True:
        token.in_request = 0
        await ops.readdir(fh, start, token)   # type: ignore[arg-type]
        if token.in_request == 0:
            break
        start = token.replies           # next_id of the last entry added
    await ops.releasedir(fh)
    return token.replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--scratch", default=None)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fjreaddir-", dir=a.scratch))
    try:
        d = base / "src" / "d"
        d.mkdir(parents=True)
        for i in range(a.entries):
            (d / f"file{i:06d}").write_bytes(b"x" * 4096)
        root = os.open(base / "src", os.O_RDONLY | os.O_DIRECTORY)
        ops = fs.Operations(root, store=TempStore(None), halt=Halt())
        pyfuse3.readdir_reply = _reply          # type: ignore[assignment]
        ctx = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)
        times: list[float] = []

        async def run() -> None:
            e = await ops.lookup(pyfuse3.ROOT_INODE, b"d", ctx)   # type: ignore[arg-type]
            for _ in range(a.rounds):
                t = time.process_time()
                n = await _listing(ops, e.st_ino, ctx)
                times.append(time.process_time() - t)
                assert n == a.entries + 2, n

        trio.run(run)
        ops.close_all()
        os.close(root)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rest = times[1:] or times
    print(f"{a.entries} entries, {a.rounds} listings: first {times[0] * 1e3:.1f} ms CPU; "
          f"repeated best {min(rest) * 1e3:.1f} ms, median {statistics.median(rest) * 1e3:.1f} ms "
          f"({min(rest) / a.entries * 1e6:.2f} / {statistics.median(rest) / a.entries * 1e6:.2f} "
          f"us per entry)")


if __name__ == "__main__":
    main()
