#!/usr/bin/env python3
"""The streamer's cost per byte: ``OrderedLog.append_unmarked`` of Write records,
measured in wall time and in this process's CPU time (every thread: the appending
one and the log's lz4 workers).  No FUSE mount: this is what the streamer's worker thread does with every
byte written through the mount (encode, lz4, CRC-32, write), the step that bounds
1 MiB sequential writes (docs/performance-analysis.md).

    .venv/bin/python bench/log_append.py [--mib 256] [--repeat 2] [--scratch /var/tmp]
        [--data FILE] [--levels 0,-16] [--ahead 1,2]

Data kinds (each 8 MiB, repeated to ``--mib``):

* ``random``: os.urandom (stores at 1.0);
* ``fio``: what ``fio --rw=write --bs=1M`` writes (its default scrambled buffers,
  stores at about 0.94; the 1 MiB write row's data), when fio is installed;
* ``text``: the bench's application log (bench/benchlib/fjextras.py:text_block,
  stores at about 0.31);
* ``--data FILE``: the first 8 MiB of FILE, as ``file``.

For each kind and each ``--ahead`` value (``log.COMPRESS_AHEAD``: 1 = one chunk at a
time, the appending thread waiting for its compression), runs of the log as it is (its
adaptive level, ``adaptive``) and held at each ``--levels`` value (``OrderedLog._level``
patched), printing MiB/s of wall time (the rate the streamer could feed the log on an
otherwise idle machine), MiB per CPU-second of the whole process, and stored / raw.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from fusejournal import log as logmod  # noqa: E402
from fusejournal.log import OrderedLog  # noqa: E402
from fusejournal.records import Write  # noqa: E402

MIB = 1 << 20


def fio_data(scratch: str) -> bytes | None:
    if not shutil.which("fio"):
        print("fio is not installed: no 'fio' data kind")
        return None
    with tempfile.TemporaryDirectory(dir=scratch, prefix="fjlogbench-") as d:
        path = os.path.join(d, "fio.dat")
        subprocess.run(["fio", "--name=data", f"--filename={path}", "--rw=write", "--bs=1M",
                        "--size=8M", "--ioengine=psync", "--output-format=terse"],
                       check=True, capture_output=True)
        with open(path, "rb") as f:
            return f.read()


def kinds(data_file: str | None, scratch: str) -> dict[str, bytes]:
    from benchlib.fjextras import text_block
    out = {"random": os.urandom(8 * MIB)}
    fio = fio_data(scratch)
    if fio:
        out["fio"] = fio
    out["text"] = text_block(8 * MIB)[:8 * MIB]
    if data_file:
        with open(data_file, "rb") as f:
            out["file"] = f.read(8 * MIB)
    return out


def run(buf: bytes, mib: int, scratch: str, level: int | None,
        ahead: int) -> tuple[float, float, float]:
    saved, saved_ahead = OrderedLog._level, logmod.COMPRESS_AHEAD
    logmod.COMPRESS_AHEAD = ahead
    if level is not None:
        OrderedLog._level = lambda self, raw, stored: level  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory(dir=scratch, prefix="fjlogbench-") as d:
            log = OrderedLog(d)
            log.open()
            n = max(1, len(buf) // MIB)
            records = (Write(1, i * MIB, 0, buf[(i % n) * MIB:((i % n) + 1) * MIB])
                       for i in range(mib))
            t, w = time.process_time(), time.perf_counter()
            log.append_unmarked(records)
            cpu, wall = time.process_time() - t, time.perf_counter() - w
            stored = sum(p.stat().st_size for p in Path(d).glob("*.fjlog"))
            log.close()
    finally:
        OrderedLog._level = saved  # type: ignore[method-assign]
        logmod.COMPRESS_AHEAD = saved_ahead
    return mib / wall, mib / cpu, stored / (mib * MIB)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--scratch", default="/var/tmp")
    ap.add_argument("--data")
    ap.add_argument("--levels", default="0,-16")
    ap.add_argument("--ahead", default="1,2")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",") if x]
    print(f"log_append: {a.mib} MiB of 1 MiB Write records per run; FAST_LEVEL "
          f"{logmod.FAST_LEVEL}, fast above {logmod.FAST_ABOVE}, default below "
          f"{logmod.DEFAULT_BELOW}")
    aheads = [int(x) for x in a.ahead.split(",") if x]
    for name, buf in kinds(a.data, a.scratch).items():
        for ahead in aheads:
            for level in [None, *levels]:
                walls, cpus, ratio = [], [], 0.0
                for _ in range(a.repeat):
                    wall, cpu, ratio = run(buf, a.mib, a.scratch, level, ahead)
                    walls.append(wall)
                    cpus.append(cpu)
                how = "adaptive" if level is None else f"level {level}"
                print(f"{name:6s} ahead {ahead} {how:9s} {max(walls):6.0f} MiB/s wall, "
                      f"{max(cpus):6.0f} MiB/CPU-s (best of {a.repeat}; wall "
                      f"{', '.join(f'{r:.0f}' for r in walls)})  stored/raw {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
