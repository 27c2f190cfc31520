#!/usr/bin/env python3
"""The updater's time on real batches, applied one after another (issue 11; not part of run.py).

    python bench/updater_batches.py LOG_DIR [--baseline] [--scratch DIR]

LOG_DIR: a journal's ``log/`` whose checkpoints start from an empty tree, e.g.
the copy ``bench/pgbench_dip.py NAME --hold-updater --keep-journal`` leaves in
SCRATCH/NAME/journal-copy/log (it may have a torn tail: it is cut on open).
Every checkpoint is applied by ``Updater.run_once`` to a fresh shadow of an
empty tree, in order; wall, user and system time are printed per checkpoint.

``--baseline`` applies them as the updater did before superseded writes and
one pass (docs/design.md, "Less work per batch"): nothing skipped, the log
read twice.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fusejournal import updater as U  # noqa: E402
from fusejournal.log import OrderedLog  # noqa: E402
from fusejournal.shadow import Shadow  # noqa: E402
from fusejournal.superseded import Superseded  # noqa: E402


class _NothingSuperseded(Superseded):
    def __contains__(self, index: int) -> bool:
        return False


class _Upto:
    """The log as far as checkpoint ``n``."""

    def __init__(self, olog: OrderedLog, n: int) -> None:
        self.olog, self.n = olog, n

    def checkpoints(self, after):
        return [i for i in self.olog.checkpoints(after) if i.marker.checkpoint <= self.n]

    def verify(self, info, each=None, chunk=None):
        self.olog.verify(info, each, chunk)

    def records(self, info, start=None):
        return self.olog.records(info, start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log_dir")
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--scratch", default="/var/tmp/fj-updater-batches")
    a = ap.parse_args()
    if a.baseline:
        U.Superseded = _NothingSuperseded           # type: ignore[misc]
        U.KEEP_BYTES = -1
    base = Path(a.scratch)
    shutil.rmtree(base, ignore_errors=True)
    (base / "orig").mkdir(parents=True)
    olog = OrderedLog(Path(a.log_dir))
    for msg in olog.open():
        print(f"log: {msg}")
    shadow = Shadow(base / "shadow")
    shadow.create()
    fd = os.open(base / "orig", os.O_RDONLY)
    try:
        shadow.seed(fd)
    finally:
        os.close(fd)
    for info in olog.checkpoints(0):
        n = info.marker.checkpoint
        u = U.Updater(_Upto(olog, n), shadow)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        assert u.run_once() == n
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        u.close()
        print(f"checkpoint {n}: {info.marker.operations} records, {info.marker.raw_bytes / 1e6:.1f} MB: "
              f"wall {t1 - t0:.3f} s, user {r1.ru_utime - r0.ru_utime:.3f} s, "
              f"sys {r1.ru_stime - r0.ru_stime:.3f} s")
    olog.close()
    shadow.close()
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
