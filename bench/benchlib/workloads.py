"""The workloads run on every target, and the metrics they produce.

Every workload drops caches right before its timed part; every write test ends
with an fsync (fio end_fsync=1) or a sync() so nobody wins by not writing.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .util import BenchError, MiB, drop_caches, proc_cpu_seconds, run_cmd, short, watchdog


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    goal: float | None = None   # fusejournal's relative speed vs native must be >= goal
    goal_text: str = ""


METRICS = [
    Metric("seqwrite_1m", "seq write bs=1M (+fsync)", "MB/s", goal=0.9, goal_text=">= 0.9 x native"),
    Metric("seqwrite_4k", "seq write bs=4k (+fsync)", "MB/s", goal=0.16, goal_text=">= 0.16 x native"),
    Metric("seqread_1m", "seq read bs=1M, cold", "MB/s", goal=0.6, goal_text=">= 0.6 x native"),
    Metric("seqread_4k", "seq read bs=4k, cold", "MB/s"),
    Metric("randwrite_4k", "random write 4k (+fsync)", "MB/s", goal=0.16, goal_text=">= 0.16 x native"),
    Metric("sf_create", "small files: create+write 4K+close (+sync)", "files/s", goal=0.3,
           goal_text=">= 0.3 x native"),
    Metric("sf_stat_warm", "small files: stat, warm", "stats/s", goal=0.5, goal_text=">= 0.5 x native"),
    Metric("sf_list", "small files: list directory (scandir)", "ms", higher_is_better=False, goal=0.1,
           goal_text="time <= 10 x native"),
    Metric("sf_stat_cold", "small files: stat, cold", "stats/s"),
    Metric("sf_unlink", "small files: unlink all", "files/s"),
    Metric("dbench", "dbench, 4 clients", "MB/s", goal=0.15, goal_text=">= 0.15 x native"),
]
METRIC = {m.key: m for m in METRICS}


@dataclass
class Sizes:
    name: str
    fio_bytes: int          # sequential tests and the random-write file
    rand_io_bytes: int      # how much the random-write test writes
    files: int              # small-file count
    dbench_seconds: int
    rounds: int
    timeout: float          # per workload
    # fusejournal-only extras
    halt_pending: tuple     # ((bytes, repeats), ...)
    log_bytes: int          # text-like and random data written for the log ratio
    cpu_bytes: int          # written for CPU seconds / peak RSS per GiB
    # the consistency group against a single tree (groupbench.py)
    group_checkpoints: int = 100    # recorded checkpoints of each (plus a warm-up)
    group_blocks: int = 2           # alternating blocks single, group, single, group ...
    group_interval: float = 0.25    # seconds between checkpoint starts
    group_rate: float = 250.0       # operations/s of each of the 4 writers (0: no writers)


SIZES = {
    "full": Sizes("full", 1 << 30, 256 * MiB, 10_000, 30, 3, 1800,
                  ((1 * MiB, 20), (100 * MiB, 10), (1 << 30, 5)), 256 * MiB, 1 << 30,
                  group_checkpoints=100, group_blocks=2, group_interval=0.25, group_rate=250.0),
    "quick": Sizes("quick", 24 * MiB, 4 * MiB, 1_000, 2, 1, 120,
                   ((1 * MiB, 5), (8 * MiB, 3), (32 * MiB, 2)), 8 * MiB, 32 * MiB,
                   group_checkpoints=20, group_blocks=1, group_interval=0.2, group_rate=250.0),
    "smoke": Sizes("smoke", 4 * MiB, 1 * MiB, 200, 2, 1, 90,
                   ((256 << 10, 2), (1 * MiB, 2)), 1 * MiB, 4 * MiB,
                   group_checkpoints=5, group_blocks=1, group_interval=0.1, group_rate=100.0),
}


class Ctx:
    """What a workload gets: the target, the directory to work in, sizes."""

    def __init__(self, target, path: Path, sizes: Sizes, scratch: Path) -> None:
        self.target = target
        self.path = path
        self.sizes = sizes
        self.scratch = scratch
        self.extra: dict = {}

    def drop_caches(self) -> None:
        if not drop_caches():
            self.extra["drop_caches"] = "failed (not root?)"

    def sync_backing(self) -> float:
        """syncfs() the filesystem holding every target's backing directory;
        the seconds it took (recorded in extra)."""
        t = time.perf_counter()
        syncfs(self.scratch)
        dt = time.perf_counter() - t
        self.extra["backing_sync_s"] = round(dt, 4)
        return dt

    def cpu(self) -> float | None:
        pid = self.target.daemon_pid()
        return proc_cpu_seconds(pid) if pid else None


_libc = None


def syncfs(path: Path) -> None:
    global _libc
    import ctypes
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class CpuMeter:
    """Daemon CPU seconds over a block (FUSE targets only)."""

    def __init__(self, ctx: Ctx, written: int = 0) -> None:
        self.ctx, self.written = ctx, written

    def __enter__(self):
        self.t0 = self.ctx.cpu()
        return self

    def __exit__(self, *exc):
        t1 = self.ctx.cpu()
        if self.t0 is not None and t1 is not None:
            self.ctx.extra["daemon_cpu_s"] = round(t1 - self.t0, 3)
            if self.written:
                self.ctx.extra["daemon_cpu_s_per_gib"] = round((t1 - self.t0) / (self.written / (1 << 30)), 3)
        return False


# --------------------------------------------------------------------------- fio


def fio(ctx: Ctx, name: str, rw: str, bs: str, size: int, io_size: int | None = None) -> float:
    """Run one fio job on ctx.path/fio.dat; return the bandwidth in MB/s
    (10^6 bytes/s; fio's runtime includes the end_fsync)."""
    out = ctx.scratch / f"fio-{name}.json"
    out.unlink(missing_ok=True)
    cmd = ["fio", f"--name={name}", f"--filename={ctx.path / 'fio.dat'}", f"--rw={rw}", f"--bs={bs}",
           f"--size={size}", "--ioengine=psync", "--fallocate=none", "--numjobs=1",
           "--output-format=json", f"--output={out}"]
    writing = "write" in rw
    if writing:
        cmd.append("--end_fsync=1")
    if io_size:
        cmd.append(f"--io_size={io_size}")
    with CpuMeter(ctx, io_size or size if writing else 0):
        run_cmd(cmd, timeout=ctx.sizes.timeout, on_timeout=ctx.target.abort)
    try:
        text = out.read_text()
        data = json.loads(text[text.index("{"):])
        job = data["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise BenchError(f"cannot parse fio output: {e}") from None
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    part = job["write" if writing else "read"]
    ctx.extra["fio_runtime_ms"] = part.get("runtime")
    ctx.extra["fio_mb_s"] = round(part.get("bw_bytes", 0) / 1e6, 2)
    ctx.extra["iops"] = round(part.get("iops", 0), 1)
    if not part.get("io_bytes") or not part.get("runtime"):
        raise BenchError("fio moved no bytes")
    seconds = part["runtime"] / 1000.0
    if writing:
        # fio's runtime includes its end_fsync; a daemon that answers fsync with
        # ENOSYS (the reference passthrough does: pyfuse3's default) makes that a
        # no-op, so the data may still sit dirty in the backing disk's cache.
        # syncfs() the backing filesystem and count that time too.
        seconds += ctx.sync_backing()
    return part["io_bytes"] / seconds / 1e6


def prepare_file(ctx: Ctx, size: int) -> None:
    """Lay out ctx.path/fio.dat (untimed): 1 MiB writes of random data, fsync."""
    chunk = os.urandom(MiB)
    with watchdog(ctx.sizes.timeout, ctx.target.abort, "preparing the test file"):
        fd = os.open(ctx.path / "fio.dat", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = size
            while left > 0:
                left -= os.write(fd, chunk[: min(left, MiB)])
            os.fsync(fd)
        finally:
            os.close(fd)


def w_seqwrite_1m(ctx: Ctx) -> dict:
    ctx.drop_caches()
    return {"seqwrite_1m": fio(ctx, "seqwrite_1m", "write", "1M", ctx.sizes.fio_bytes)}


def w_seqwrite_4k(ctx: Ctx) -> dict:
    ctx.drop_caches()
    return {"seqwrite_4k": fio(ctx, "seqwrite_4k", "write", "4k", ctx.sizes.fio_bytes)}


def w_seqread_1m(ctx: Ctx) -> dict:
    prepare_file(ctx, ctx.sizes.fio_bytes)
    ctx.drop_caches()
    return {"seqread_1m": fio(ctx, "seqread_1m", "read", "1M", ctx.sizes.fio_bytes)}


def w_seqread_4k(ctx: Ctx) -> dict:
    prepare_file(ctx, ctx.sizes.fio_bytes)
    ctx.drop_caches()
    return {"seqread_4k": fio(ctx, "seqread_4k", "read", "4k", ctx.sizes.fio_bytes)}


def w_randwrite_4k(ctx: Ctx) -> dict:
    prepare_file(ctx, ctx.sizes.fio_bytes)
    ctx.drop_caches()
    return {"randwrite_4k": fio(ctx, "randwrite_4k", "randwrite", "4k", ctx.sizes.fio_bytes,
                                io_size=ctx.sizes.rand_io_bytes)}


# --------------------------------------------------------------------------- small files


def w_smallfile(ctx: Ctx) -> dict:
    n = ctx.sizes.files
    ctx.drop_caches()
    worker = Path(__file__).with_name("smallfile_worker.py")
    with CpuMeter(ctx):
        r = run_cmd([sys.executable, worker, ctx.path, n], timeout=ctx.sizes.timeout,
                    on_timeout=ctx.target.abort)
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"small-file worker printed no result: {short(r.stdout + r.stderr)}") from None
    if res.get("listed") != n:
        raise BenchError(f"listing saw {res.get('listed')} entries, expected {n}")
    if not res.get("dropped_caches"):
        ctx.extra["drop_caches"] = "failed before cold stat"
    return {
        "sf_create": n / res["create"],
        "sf_stat_warm": n / res["stat_warm"],
        "sf_list": res["list"] * 1000.0,
        "sf_stat_cold": n / res["stat_cold"],
        "sf_unlink": n / res["unlink"],
    }


# --------------------------------------------------------------------------- dbench


def dbench_loadfile() -> Path:
    for p in ("/usr/share/dbench/client.txt", "/usr/local/share/dbench/client.txt",
              "/usr/share/dbench/client_plain.txt", "/usr/local/share/client.txt"):
        if Path(p).exists():
            return Path(p)
    raise BenchError("dbench loadfile client.txt not found (apt-get install dbench)")


def w_dbench(ctx: Ctx) -> dict:
    load = dbench_loadfile()
    secs = ctx.sizes.dbench_seconds
    ctx.drop_caches()
    with CpuMeter(ctx):
        r = run_cmd(["dbench", "-D", ctx.path, "-t", secs, "-c", load, 4],
                    timeout=secs + ctx.sizes.timeout, on_timeout=ctx.target.abort, check=False)
    m = re.search(r"Throughput\s+([\d.]+)\s+MB/sec", r.stdout)
    if not m:
        err = [ln for ln in (r.stdout + r.stderr).splitlines() if "ERROR" in ln or "failed" in ln.lower()
               and "barrier semaphore" not in ln]
        raise BenchError(f"dbench exited {r.returncode} without a throughput line: "
                         f"{short(' | '.join(err[-3:]) or r.stdout[-300:], 220)}")
    if r.returncode != 0:
        ctx.extra["dbench_exit"] = r.returncode
    return {"dbench": float(m.group(1))}


WORKLOADS = {
    "seqwrite_1m": w_seqwrite_1m,
    "seqwrite_4k": w_seqwrite_4k,
    "seqread_1m": w_seqread_1m,
    "seqread_4k": w_seqread_4k,
    "randwrite_4k": w_randwrite_4k,
    "smallfile": w_smallfile,
    "dbench": w_dbench,
}
WORKLOAD_METRICS = {
    "seqwrite_1m": ["seqwrite_1m"], "seqwrite_4k": ["seqwrite_4k"], "seqread_1m": ["seqread_1m"],
    "seqread_4k": ["seqread_4k"], "randwrite_4k": ["randwrite_4k"],
    "smallfile": ["sf_create", "sf_stat_warm", "sf_list", "sf_stat_cold", "sf_unlink"],
    "dbench": ["dbench"],
}
