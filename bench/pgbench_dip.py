#!/usr/bin/env python3
"""What pgbench does around each checkpoint, 100 ms at a time (issue 11; not part of run.py).

    python bench/pgbench_dip.py NAME [--seconds 40] [--interval 10] [--native]
                                     [--hold-updater] [--keep-journal] [--env K=V ...]

Run as root, from the repository (PostgreSQL from Debian's packages, as
bench/run.py's pgbench extra uses it).  One run:

1. a fresh mount of SCRATCH/NAME/source (``--native``: the directory itself),
   PostgreSQL started in it, ``pgbench -i -s 10``, a checkpoint, and the
   updater waited for;
2. ``pgbench -c 4 -j 2 -T SECONDS -l``: every transaction's completion time;
   on the mount a checkpoint (setxattr on the root) every INTERVAL s;
3. meanwhile, every 50 ms: the disk's counters (/proc/diskstats), the CPU of
   the daemon's and the updater's threads, and the machine's (/proc/stat);
   every 10 ms: the state and ``wchan`` of every PostgreSQL backend;
4. the report: per checkpoint, 100 ms bins from 0.3 s before to 1.4 s after
   (TPS, latency, disk writes, CPU, backend states), and a summary: the
   throughput lost in the 2 s after a checkpoint (bins under the median of
   the bins away from checkpoints, summed, in seconds of throughput) and the
   first second after it as a share of that median.

``--hold-updater`` pauses the updater before its second batch (a fault
point), so no checkpoint of the run is applied; with ``--keep-journal`` the
journal is copied to SCRATCH/NAME/journal-copy before the pause ends, for
bench/updater_batches.py.  ``--env K=V`` goes to the daemon's environment.
Raw samples: SCRATCH/NAME/raw.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.pgbench import SCALE, _Server, find_postgres  # noqa: E402

PERMISSION = "user.fusejournal.update_permission"
BIN = 0.1


def _disk_of(path: str) -> str | None:
    dev = os.stat(path).st_dev
    for line in open("/proc/diskstats"):
        f = line.split()
        if os.major(dev) == int(f[0]) and os.minor(dev) == int(f[1]):
            name = f[2]
            return name.rstrip("0123456789") if name[-1].isdigit() and not name.startswith("nvme") else name
    return None


def _diskstat(disk: str | None) -> list[int]:
    for line in open("/proc/diskstats"):
        f = line.split()
        if f[2] == disk:
            return [int(x) for x in f[3:]]
    return [0] * 17


def _ticks(pid: int | str) -> dict[str, int]:
    out = {}
    for st in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            fl = open(st).read().rsplit(")", 1)[1].split()
            out[st.split("/")[4]] = int(fl[11]) + int(fl[12])
        except (OSError, IndexError, ValueError):
            pass
    return out


def _children(pid: int) -> list[str]:
    kids: list[str] = []
    for f in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            kids += open(f).read().split()
        except OSError:
            pass
    return kids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("--seconds", type=int, default=40)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--hold-updater", action="store_true")
    ap.add_argument("--keep-journal", action="store_true")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--scratch", default="/var/tmp/fj-pgbench-dip")
    ap.add_argument("--fusejournal", default=str(Path(sys.executable).parent / "fusejournal"))
    a = ap.parse_args()
    found = find_postgres()
    if isinstance(found, str):
        print(f"pgbench_dip: {found}", file=sys.stderr)
        return 2
    bindir, pgbench = found
    os.makedirs(a.scratch, mode=0o755, exist_ok=True)
    base = f"{a.scratch}/{a.name}"
    if os.path.exists(base):
        subprocess.run(["fusermount3", "-u", "-z", f"{base}/mnt"], capture_output=True)
        shutil.rmtree(base)
    os.makedirs(f"{base}/source")
    os.makedirs(f"{base}/mnt")
    os.makedirs(f"{base}/logs")
    os.chmod(base, 0o755)
    os.chmod(f"{base}/logs", 0o777)            # pgbench writes its logs as postgres
    env = dict(os.environ)
    for kv in a.env:
        k, v = kv.split("=", 1)
        env[k] = v
    flag = f"{base}/hold"
    if a.hold_updater:
        open(flag, "w").close()
        env["FUSEJOURNAL_FAULT"] = "updater.before_batch:2:pause"
        env["FUSEJOURNAL_FAULT_PAUSE"] = flag
    pid = None
    root = f"{base}/source"
    if not a.native:
        root = f"{base}/mnt"
        subprocess.run([a.fusejournal, "mount", f"{base}/source", root, "--journal", f"{base}/journal",
                        "--shadow", f"{base}/shadow"], check=True, env=env)
        pid = json.load(open(f"{base}/journal/daemon.json"))["pid"]
    srv = _Server(bindir, pgbench, Path(root) / "pgdata", Path(base) / "sock", Path(base) / "sock/pg.log")
    disk = _disk_of(base)
    samples: list = []
    bsamples: list = []
    cps: list = []
    kids: list[str] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(0.05):
            tk = _ticks(pid) if pid else {}
            for k in kids:
                tk.update({"u" + t: v for t, v in _ticks(k).items()})
            st = [int(x) for x in open("/proc/stat").readline().split()[1:]]
            samples.append((time.time(), _diskstat(disk), tk, st))

    def backends() -> None:
        pids: list[str] = []
        n = 0
        while not stop.wait(0.01):
            if n % 100 == 0:
                pids = []
                for p in glob.glob("/proc/[0-9]*/cmdline"):
                    try:
                        if open(p, "rb").read().startswith(b"postgres: postgres postgres"):
                            pids.append(p.split("/")[2])
                    except OSError:
                        pass
            n += 1
            row = []
            for p in pids:
                try:
                    st = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0]
                    row.append(st + ":" + (open(f"/proc/{p}/wchan").read() if st != "R" else ""))
                except OSError:
                    pass
            bsamples.append((time.time(), row))

    def checkpoints() -> None:
        n = 0
        nt = time.time() + a.interval
        while not stop.wait(max(0.0, nt - time.time())):
            n += 1
            t0 = time.time()
            err = None
            try:
                os.setxattr(root, PERMISSION, f"dip-{n}".encode())
            except OSError as e:
                err = str(e)
            cps.append((t0, time.time(), err))
            nt += a.interval

    r = None
    try:
        srv.start(300)
        srv.bench("-i", "-s", str(SCALE), "-q", timeout=300)
        if not a.native:
            os.setxattr(root, PERMISSION, b"load")
            subprocess.run([a.fusejournal, "wait", root, "--timeout", "300"], check=True, env=env)
            kids = _children(pid)
        time.sleep(2)
        threads = [threading.Thread(target=sampler, daemon=True), threading.Thread(target=backends, daemon=True)]
        if not a.native:
            threads.append(threading.Thread(target=checkpoints, daemon=True))
        for t in threads:
            t.start()
        r = srv.bench("-c", "4", "-j", "2", "-T", str(a.seconds), "-l", f"--log-prefix={base}/logs/pgb",
                      timeout=a.seconds + 300)
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop.set()
        srv.stop()
        if not a.native:
            if os.path.exists(flag):
                if a.keep_journal:
                    subprocess.run(["cp", "-a", f"{base}/journal", f"{base}/journal-copy"], check=False)
                os.unlink(flag)
            subprocess.run(["fusermount3", "-u", root], check=False)
    tx = []
    for fn in glob.glob(f"{base}/logs/pgb*"):
        for line in open(fn):
            f = line.split()
            tx.append(int(f[4]) + int(f[5]) / 1e6)
    tx.sort()
    json.dump({"tx": tx, "checkpoints": cps, "samples": samples, "backends": bsamples, "disk": disk},
              open(f"{base}/raw.json", "w"))
    m = re.search(r"tps = ([0-9.]+)", r.stdout if r else "")
    print(f"{a.name}: {m.group(1) if m else '?'} tps, {len(tx)} transactions")
    report(tx, cps, samples, bsamples, pid)
    return 0


def report(tx: list[float], cps: list, samples: list, bsamples: list, pid: int | None) -> None:
    t0 = tx[0]
    bins: dict[int, int] = {}
    for t in tx:
        k = int((t - t0) / BIN)
        bins[k] = bins.get(k, 0) + 1
    starts = [c[0] for c in cps]
    far = sorted(v for k, v in bins.items() if all(not 0 <= t0 + k * BIN - c < 2.0 for c in starts))
    med = far[len(far) // 2] if far else 1
    allc = Counter(x for _, row in bsamples for x in row)
    total = sum(allc.values()) or 1
    print(f"median {med / BIN:.0f} tps in 100 ms bins away from checkpoints; backends: "
          + " ".join(f"{k}={100 * v / total:.1f}%" for k, v in allc.most_common(6)))
    lost, first = [], []
    for c0, c1, err in cps:
        print(f"-- checkpoint at {c0 - t0:.2f} s, setxattr {1000 * (c1 - c0):.1f} ms{' ' + err if err else ''}")
        for k in range(-3, 15):
            lo = c0 + k * BIN
            n = sum(1 for t in tx if lo <= t < lo + BIN)
            ss = [x for x in samples if lo - 0.001 <= x[0] < lo + BIN + 0.001]
            line = f"  {k * BIN:+.1f} s {n / BIN:6.0f} tps"
            if len(ss) >= 2:
                d = [y - x for x, y in zip(ss[0][1], ss[-1][1])]
                st = [y - x for x, y in zip(ss[0][3], ss[-1][3])]
                cpu = {t: ss[-1][2][t] - ss[0][2].get(t, ss[-1][2][t]) for t in ss[-1][2]}
                loop = cpu.get(str(pid), 0)
                upd = sum(v for t, v in cpu.items() if t.startswith("u"))
                busy = 1 - (st[3] + st[4]) / max(1, sum(st))
                line += (f"  disk w {d[6] * 512 / 1e6:6.2f} MB  machine {100 * busy:3.0f} %  "
                         f"loop {loop} updater {upd} ticks")
            bc = Counter(x for t, row in bsamples if lo <= t < lo + BIN for x in row)
            nb = sum(bc.values()) or 1
            print(line + "  | " + " ".join(f"{k}={100 * v / nb:.0f}" for k, v in bc.most_common(3)))
        if c0 + 2 <= tx[-1]:
            ks = [int((c0 - t0) / BIN) + i for i in range(20)]
            lost.append(sum(max(0, med - bins.get(k, 0)) for k in ks) / med * BIN)
            first.append(sum(bins.get(k, 0) for k in ks[:10]) / (med * 10))
    if lost:
        print(f"per checkpoint (n={len(lost)}): {sum(lost) / len(lost):.3f} s of throughput lost in the 2 s "
              f"after it; the first second at {sum(first) / len(first):.2f} of the median")


if __name__ == "__main__":
    sys.exit(main())
