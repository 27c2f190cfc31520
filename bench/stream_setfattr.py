"""setfattr latency against pending data, and the daemon's RSS through a burst
(issue 11, "Stream the log").  Not part of bench/run.py: a targeted measurement.

    .venv/bin/python bench/stream_setfattr.py --sizes 1,100,1024 --burst 3072 \\
        [--tree DIR]   # a fusejournal source tree to measure instead (e.g. `git archive` of a base)

For each size S (MiB): a fresh mount, S MiB of text-like data written through it in
1 MiB write(2) calls (no fsync), then the setxattr that grants update permission is
timed twice: right after the last write ("hot": the streamer may still be behind),
and, in a second round, after 2 s idle ("settled").  The write time of the last
second's data is the allowance the target adds to 50 ms.  Then a burst of B MiB
with the daemon's VmRSS sampled every 0.2 s, and one checkpoint at its end.
Needs root (FUSE).  Numbers are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.fjextras import MiB, text_block, write_bytes  # noqa: E402

UPDATE = b"user.fusejournal.update_permission"


class Mount:
    def __init__(self, tree: Path, base: Path, memory_limit: str) -> None:
        self.tree, self.base = tree, base
        self.src, self.mnt = base / "src", base / "mnt"
        self.src.mkdir()
        self.mnt.mkdir()
        self.run("mount", self.src, self.mnt, "--journal", base / "journal", "--shadow", base / "shadow",
                 "--memory-limit", memory_limit)
        self.pid = self.status()["pid"]
        self.streaming = "stream_error" in self.status()

    def run(self, *args: object) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        subprocess.run([sys.executable, "-c", "from fusejournal.cli import main; main()",
                        *map(str, args)], check=True, env=env, capture_output=True, timeout=600,
                       cwd="/")       # not the repository: -c puts the cwd first on sys.path

    def status(self) -> dict:
        return json.loads(os.getxattr(self.mnt, b"user.fusejournal.status"))

    def checkpoint(self, label: str) -> float:
        t = time.perf_counter()
        os.setxattr(self.mnt, UPDATE, label.encode())
        return time.perf_counter() - t

    def close(self) -> None:
        try:
            self.run("umount", self.mnt)
        finally:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure_size(tree: Path, size_mib: int, scratch: Path, memory_limit: str) -> dict:
    block = text_block()
    out: dict = {"pending_mib": size_mib}
    for mode in ("hot", "settled"):
        with tempfile.TemporaryDirectory(dir=scratch) as d:
            m = Mount(tree, Path(d), memory_limit)
            try:
                m.checkpoint("warm")
                t0 = time.perf_counter()
                write_bytes(m.mnt / "data", size_mib * MiB, block)
                wt = time.perf_counter() - t0
                if mode == "settled":
                    time.sleep(2.0)
                st = m.status()
                took = m.checkpoint(f"{size_mib}M")
                st2 = m.status()
                out[mode] = {"streaming": m.streaming, "setfattr_ms": round(took * 1000, 1),
                             "write_mib_s": round(size_mib / wt, 1),
                             "last_second_ms": round(min(1.0, wt) * 1000 / 1, 1),
                             "pending_at_trigger_mib": round(st["pending_bytes"] / MiB, 1),
                             "in_store_mib": round(st["pending_memory_bytes"] / MiB, 1),
                             "halt_ms": round(st2["last_halt_ns"] / 1e6, 3)}
            finally:
                m.close()
    return out


def measure_burst(tree: Path, burst_mib: int, scratch: Path, memory_limit: str) -> dict:
    block = text_block()
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        m = Mount(tree, Path(d), memory_limit)
        try:
            base = rss_kib(m.pid)
            peak = [base]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_kib(m.pid))
                    time.sleep(0.2)
            th = threading.Thread(target=sample, daemon=True)
            th.start()
            t0 = time.perf_counter()
            write_bytes(m.mnt / "burst", burst_mib * MiB, block)
            wt = time.perf_counter() - t0
            st = m.status()
            took = m.checkpoint("burst")
            stop.set()
            th.join()
            hwm = rss_kib(m.pid, "VmHWM")
            return {"streaming": m.streaming, "burst_mib": burst_mib, "write_mib_s": round(burst_mib / wt, 1),
                    "rss_before_mib": round(base / 1024, 1), "rss_peak_sampled_mib": round(peak[0] / 1024, 1),
                    "vmhwm_mib": round(hwm / 1024, 1),
                    "spilled_total_mib": round(st.get("spilled_total_bytes", -MiB) / MiB, 1),
                    "pending_at_trigger_mib": round(st["pending_bytes"] / MiB, 1),
                    "setfattr_ms": round(took * 1000, 1)}
        finally:
            m.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--sizes", default="1,100,1024")
    ap.add_argument("--burst", type=int, default=0, help="MiB (0: none)")
    ap.add_argument("--memory-limit", default="64M")
    ap.add_argument("--scratch", type=Path, default=Path("/var/tmp"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (FUSE)")
    res: dict = {"tree": str(a.tree), "sizes": []}
    for s in (int(x) for x in a.sizes.split(",") if x):
        r = measure_size(a.tree, s, a.scratch, a.memory_limit)
        print(json.dumps(r), flush=True)
        res["sizes"].append(r)
    if a.burst:
        r = measure_burst(a.tree, a.burst, a.scratch, a.memory_limit)
        print(json.dumps(r), flush=True)
        res["burst"] = r
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
