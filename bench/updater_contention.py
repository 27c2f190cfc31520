#!/usr/bin/env python3
"""How the FUSE loop fares while the updater applies a big batch (issue 11; not part of run.py).

    python bench/updater_contention.py REPO OUT.json [pending_MiB] [rounds]

REPO: a checkout whose fusejournal is measured (put on PYTHONPATH); run as root.
Each round:

1. write pending_MiB in 4 KiB pwrites to a file (many small records: the
   updater's application is mostly Python work);
2. checkpoint (setxattr on the root; it returns once the batch is durable);
3. keep writing 4 KiB pwrites to another file, and probe the FUSE loop with a
   getxattr on the root every 5 ms, until the shadow has applied the checkpoint
   ("during"), then for as long again ("after");
4. report, per window: the 4 KiB write MB/s, the probe's latency, and the CPU
   share of one core of the daemon's main thread (the FUSE loop), of its other
   threads, and of its children (the updater's process), from /proc/PID/task/*/stat.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHECKPOINT = b"user.fusejournal.checkpoint"
PERMISSION = b"user.fusejournal.update_permission"
SHADOW = b"user.fusejournal.shadow_checkpoint"


def ticks(pid: int) -> dict[int, int]:
    out = {}
    for st in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            f = Path(st).read_text().rsplit(")", 1)[1].split()
            out[int(st.split("/")[4])] = int(f[11]) + int(f[12])
        except (OSError, ValueError, IndexError):
            pass
    return out


def children(pid: int) -> list[int]:
    out = []
    for f in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            out += [int(x) for x in Path(f).read_text().split()]
        except (OSError, ValueError):
            pass
    return out


def cpu(pid: int) -> tuple[int, int, int]:
    """(FUSE loop, other threads, children) ticks."""
    t = ticks(pid)
    kids = sum(sum(ticks(c).values()) for c in children(pid))
    return t.get(pid, 0), sum(v for k, v in t.items() if k != pid), kids


def pct(xs: list[float], p: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))] * 1000, 3) if xs else None


def window(written: int, lat: list[float], c0, c1, seconds: float) -> dict:
    hz = os.sysconf("SC_CLK_TCK")
    return {"mb_s": round(written / seconds / 1e6, 2), "probe_p50_ms": pct(lat, 0.5),
            "probe_p99_ms": pct(lat, 0.99),
            **{k: round((c1[i] - c0[i]) / hz / seconds, 3)
               for i, k in enumerate(("fuse_loop", "daemon_other", "children"))}}


def one_round(mnt: Path, pid: int, r: int, mib: int) -> dict:
    block = os.urandom(4096)
    fd = os.open(mnt / f"a{r}", os.O_WRONLY | os.O_CREAT, 0o644)
    for off in range(0, mib << 20, 4096):
        os.pwrite(fd, block, off)
    os.close(fd)
    os.setxattr(mnt, PERMISSION, f"burst-{r}".encode())
    n = int(os.getxattr(mnt, CHECKPOINT))
    stop = threading.Event()
    written = [0]
    lat: list[float] = []

    def writer() -> None:
        wfd = os.open(mnt / "b", os.O_WRONLY | os.O_CREAT, 0o644)
        off = 0
        while not stop.is_set():
            os.pwrite(wfd, block, off)
            written[0] += 4096
            off = (off + 4096) % (16 << 20)
        os.close(wfd)

    def probe() -> None:
        while not stop.wait(0.005):
            t0 = time.perf_counter()
            os.getxattr(mnt, SHADOW)
            lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=writer), threading.Thread(target=probe)]
    c0, t0 = cpu(pid), time.time()
    for t in threads:
        t.start()
    try:
        while int(os.getxattr(mnt, SHADOW)) < n:
            time.sleep(0.01)
        t1, w1, l1, c1 = time.time(), written[0], len(lat), cpu(pid)
        time.sleep(max(t1 - t0, 1.0))
        t2, w2, c2 = time.time(), written[0], cpu(pid)
    finally:
        stop.set()
        for t in threads:
            t.join()
    d = {"apply_s": round(t1 - t0, 2), "during": window(w1, lat[:l1], c0, c1, t1 - t0),
         "after": window(w2 - w1, lat[l1:], c1, c2, t2 - t1)}
    d["during_over_after"] = round(d["during"]["mb_s"] / d["after"]["mb_s"], 3) if d["after"]["mb_s"] else None
    return d


def main() -> None:
    repo, out = sys.argv[1], sys.argv[2]
    mib = int(sys.argv[3]) if len(sys.argv) > 3 else 48
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    env = {**os.environ, "PYTHONPATH": repo}
    cli = [sys.executable, "-m", "fusejournal.cli"]
    base = Path(tempfile.mkdtemp(prefix="fj-contention-", dir="/var/tmp"))
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    results = []
    try:
        subprocess.run(cli + ["mount", src, mnt, "--journal", base / "j", "--shadow", base / "s"],
                       env=env, check=True)
        pid = json.loads(os.getxattr(mnt, b"user.fusejournal.status"))["pid"]
        for r in range(rounds):
            results.append(one_round(mnt, pid, r, mib))
            print(json.dumps(results[-1]), flush=True)
    finally:
        subprocess.run(cli + ["umount", mnt], env=env)
        subprocess.run(["rm", "-rf", str(base)])
    Path(out).write_text(json.dumps({"repo": repo, "mib": mib, "rounds": results}))


if __name__ == "__main__":
    main()
