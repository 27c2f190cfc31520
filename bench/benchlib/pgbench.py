"""pgbench on native ext4 and through a fusejournal mount (issue 11).

PostgreSQL from Debian's packages (``/usr/lib/postgresql/*/bin``, ``pgbench`` on
the PATH) is started by the benchmark in a scratch directory, as the
``postgres`` user when run as root (initdb refuses root), listening on a Unix
socket only.  Per side:

1. a data directory: ``SCRATCH/.../data`` (native) or ``MOUNT/pgdata`` on a
   fresh fusejournal mount (the Fusejournal target of targets.py);
2. ``initdb``, ``pg_ctl start``, ``pgbench -i -s SCALE``; on fusejournal one
   checkpoint then ``fusejournal wait`` (the load is not part of the run);
3. ``pgbench -c 4 -j 2 -T SECONDS --progress=1 --progress-timestamp``: TPS per
   second; on fusejournal a checkpoint (setxattr on the mount root, what
   setfattr does) every ``interval`` seconds, each one's start and end time
   recorded;
4. every second, the CPU of the fusejournal daemon's threads and of its
   children (the updater's process) from ``/proc/PID/task/*/stat``: the FUSE
   loop is the daemon's main thread;
5. ``pg_ctl stop``, unmount.

Sides alternate (native, fusejournal, native, ...) ``pairs`` times.  Reported:
TPS ratio fusejournal / native per pair, the lowest second against half the
run's median second, and a throughput-over-time chart with the checkpoints
marked.  Skipped with a clear message where PostgreSQL is missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

from .targets import CONTROL_XATTR, Fusejournal
from .util import BenchError, log, median, rmtree, short

SCALE = 10
CLIENTS = 4
THREADS = 2
#: seconds per side and pairs, by benchmark mode (bench/run.py --pgbench-seconds/--pgbench-pairs)
DEFAULTS = {"full": (60, 3), "quick": (30, 1), "smoke": (10, 1)}
INTERVAL = 10.0
_PROGRESS = re.compile(r"progress: ([0-9.]+) s, ([0-9.]+) tps")
_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


def find_postgres() -> tuple[Path, str] | str:
    """(bin directory, pgbench path), or why PostgreSQL cannot be used here."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(re.sub(r"\D", "", p.split("/")[3]) or 0))
    pgbench = shutil.which("pgbench")
    if not bins or pgbench is None:
        return ("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb or no pgbench on the "
                "PATH): apt-get install postgresql postgresql-contrib")
    return Path(bins[-1]).parent, pgbench


def _run_as() -> tuple[int, int, list[str]]:
    """uid, gid and the command prefix PostgreSQL runs under (initdb refuses root)."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid(), []
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid, ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                                  "--clear-groups", "--"]


class _Server:
    """One PostgreSQL instance in ``data`` with its socket in ``sockdir``."""

    def __init__(self, bindir: Path, pgbench: str, data: Path, sockdir: Path, logfile: Path) -> None:
        self.bindir, self.pgbench, self.data, self.sockdir, self.logfile = bindir, pgbench, data, sockdir, logfile
        self.uid, self.gid, self.prefix = _run_as()
        self.port = 50000 + os.getpid() % 10000
        self.started = False

    def run(self, cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(self.prefix + cmd, capture_output=True, text=True, timeout=timeout,
                           cwd="/", **kw)
        if r.returncode != 0:
            raise BenchError(f"{Path(cmd[0]).name} exited {r.returncode}: {short(r.stderr or r.stdout, 300)}")
        return r

    def start(self, timeout: float, init: bool = True) -> None:
        """initdb (unless ``init`` is false: the data directory exists) and pg_ctl start."""
        for d in (self.data, self.sockdir):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, self.uid, self.gid)
            os.chmod(d, 0o700)
        if init:
            self.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                      "--no-sync", "-E", "UTF8", "--locale=C"], timeout)
        opts = (f"-k {self.sockdir} -p {self.port} -c listen_addresses='' -c max_connections=20 "
                f"-c shared_buffers=128MB")
        self.run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w",
                  "-t", str(int(timeout)), "-o", opts, "start"], timeout + 10)
        self.started = True

    def bench(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return self.run([self.pgbench, "-h", str(self.sockdir), "-p", str(self.port), "-U", "postgres",
                         *args, "postgres"], timeout)

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        r = subprocess.run(self.prefix + [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                                          "-w", "-t", "60", "stop"], capture_output=True, timeout=90)
        if r.returncode != 0:        # immediate: never leave a postmaster behind
            subprocess.run(self.prefix + [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                                          "immediate", "stop"], capture_output=True, timeout=60)


class _Checkpoints(threading.Thread):
    """setxattr(update_permission) on the mount root every ``interval`` s: (start, end, error)."""

    def __init__(self, mountpoint: Path, interval: float) -> None:
        super().__init__(daemon=True, name="pgbench-checkpoints")
        self.mountpoint, self.interval = mountpoint, interval
        self.stop = threading.Event()
        self.times: list[tuple[float, float, str | None]] = []

    def run(self) -> None:
        n = 0
        next_t = time.time() + self.interval
        while not self.stop.wait(max(0.0, next_t - time.time())):
            n += 1
            t0 = time.time()
            err = None
            try:
                os.setxattr(self.mountpoint, CONTROL_XATTR, f"pgbench-{n}".encode())
            except OSError as e:
                err = str(e)
            self.times.append((t0, time.time(), err))
            next_t = max(next_t + self.interval, time.time())


def _task_ticks(pid: int) -> dict[int, int]:
    """utime+stime ticks of each thread of ``pid``."""
    out = {}
    for st in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            fields = Path(st).read_text().rsplit(")", 1)[1].split()
            out[int(st.split("/")[4])] = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for f in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            kids += [int(x) for x in Path(f).read_text().split()]
        except (OSError, ValueError):
            pass
    return kids


class _CpuSampler(threading.Thread):
    """Every second: CPU share (of one core) of the daemon's main thread (the FUSE loop),
    of its other threads (compression, log append, barrier, in-process updater) and of
    its children (the updater's process)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="pgbench-cpu")
        self.pid = pid
        self.stop = threading.Event()
        self.samples: list[dict] = []

    def run(self) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        prev_t, prev = time.time(), self._read()
        while not self.stop.wait(1.0):
            now, cur = time.time(), self._read()
            dt = now - prev_t
            d = {k: (cur[k] - prev.get(k, cur[k])) / hz / dt for k in cur}
            self.samples.append({"t": now, **{k: round(v, 3) for k, v in d.items()}})
            prev_t, prev = now, cur

    def _read(self) -> dict[str, int]:
        ticks = _task_ticks(self.pid)
        kids = sum(sum(_task_ticks(k).values()) for k in _children(self.pid))
        return {"fuse_loop": ticks.get(self.pid, 0),
                "daemon_other": sum(v for k, v in ticks.items() if k != self.pid),
                "children": kids}


def _series(stderr: str) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in _PROGRESS.findall(stderr)]


def _side(kind: str, env, sizes, bindir: Path, pgbench: str, seconds: int, interval: float,
          tag: str) -> dict:
    timeout = max(600.0, seconds * 4)
    fj = Fusejournal(env) if kind == "fusejournal" else None
    base = env.scratch / f"pgbench-{tag}"
    rmtree(base)
    base.mkdir(parents=True)
    sockdir = base / "sock"
    ckpt = cpu = None
    try:
        if fj is not None:
            reason = fj.probe()
            if reason:
                raise BenchError(reason)
            root = fj.setup(f"pgbench-{tag}")
            data = root / "pgdata"
        else:
            data = base / "data"
        srv = _Server(bindir, pgbench, data, sockdir, sockdir / "postgres.log")
        try:
            t0 = time.monotonic()
            srv.start(timeout)
            srv.bench("-i", "-s", str(SCALE), "-q", timeout=timeout)
            load_s = time.monotonic() - t0
            if fj is not None:
                os.setxattr(root, CONTROL_XATTR, b"pgbench-load")
                st = fj.status()
                fj.fj("wait", root, "--checkpoint", st["last_checkpoint"], "--timeout", int(timeout),
                      timeout=timeout + 60)
                ckpt = _Checkpoints(root, interval)
                pid = fj.daemon_pid()
                if pid:
                    cpu = _CpuSampler(pid)
                    cpu.start()
                ckpt.start()
            r = srv.bench("-c", str(CLIENTS), "-j", str(THREADS), "-T", str(seconds), "--progress=1",
                          "--progress-timestamp", timeout=seconds + timeout)
        finally:
            if ckpt is not None:
                ckpt.stop.set()
                ckpt.join(timeout=120)
            if cpu is not None:
                cpu.stop.set()
                cpu.join(timeout=10)
            srv.stop()
        series = _series(r.stderr)
        m = _TPS.search(r.stdout)
        tps = [v for _, v in series]
        out = {"kind": kind, "tps": float(m.group(1)) if m else (sum(tps) / len(tps) if tps else None),
               "series": series, "load_seconds": round(load_s, 2),
               "median_second": median(tps) if tps else None, "min_second": min(tps) if tps else None}
        if out["median_second"]:
            out["min_over_half_median"] = out["min_second"] / (out["median_second"] / 2)
        if ckpt is not None:
            out["checkpoints"] = ckpt.times
            out["checkpoint_failures"] = sum(1 for c in ckpt.times if c[2])
        if cpu is not None:
            out["cpu"] = cpu.samples
        return out
    finally:
        if fj is not None:
            try:
                fj.teardown()
            except Exception as e:  # noqa: BLE001
                log(f"pgbench: teardown: {e}")
        rmtree(base)


def _cpu_summary(side: dict) -> dict:
    """Mean CPU shares in the 3 s after each checkpoint started, and elsewhere."""
    cps = [c[0] for c in side.get("checkpoints") or []]
    near, far = [], []
    for s in side.get("cpu") or []:
        (near if any(0 <= s["t"] - c <= 3.0 for c in cps) else far).append(s)

    def mean(xs: list[dict], k: str) -> float | None:
        return round(sum(x[k] for x in xs) / len(xs), 3) if xs else None
    return {f"{k}_{w}": mean(xs, k) for k in ("fuse_loop", "daemon_other", "children")
            for w, xs in (("after_checkpoint", near), ("between", far))}


def phase_pgbench(env, sizes, seconds: int | None = None, pairs: int | None = None,
                  interval: float = INTERVAL) -> dict:
    found = find_postgres()
    if isinstance(found, str):
        log(f"pgbench skipped: {found}")
        return {"skipped": found}
    bindir, pgbench = found
    d_secs, d_pairs = DEFAULTS.get(sizes.name, DEFAULTS["quick"])
    seconds, pairs = seconds or d_secs, pairs or d_pairs
    out: dict = {"scale": SCALE, "clients": CLIENTS, "threads": THREADS, "seconds": seconds,
                 "interval": interval, "postgres": str(bindir), "pairs": []}
    for i in range(pairs):
        pair = {}
        for kind in ("native", "fusejournal"):
            log(f"pgbench pair {i + 1}/{pairs}: {kind}, {seconds} s")
            pair[kind] = _side(kind, env, sizes, bindir, pgbench, seconds, interval, f"{i}-{kind}")
            log(f"  {kind}: {pair[kind]['tps']:.1f} tps, lowest second {pair[kind]['min_second']}, "
                f"median second {pair[kind]['median_second']}")
        if pair["native"]["tps"] and pair["fusejournal"]["tps"]:
            pair["ratio"] = pair["fusejournal"]["tps"] / pair["native"]["tps"]
        pair["fusejournal"]["cpu_summary"] = _cpu_summary(pair["fusejournal"])
        out["pairs"].append(pair)
    ratios = [p["ratio"] for p in out["pairs"] if p.get("ratio")]
    out["ratio_median"] = median(ratios) if ratios else None
    out["ratios"] = ratios
    return out


# --------------------------------------------------------------------------- report


def render_markdown(L: list[str], pg: dict, fmt) -> None:
    if not pg:
        return
    L.append("### pgbench")
    L.append("")
    if pg.get("skipped") or pg.get("error"):
        L.append(f"pgbench: {'skipped' if pg.get('skipped') else 'failed'}: {pg.get('skipped') or pg['error']}")
        L.append("")
        return
    L.append(f"PostgreSQL ({pg['postgres']}) started by the benchmark in a scratch directory, scale "
             f"{pg['scale']}, {pg['clients']} clients, {pg['threads']} threads, {pg['seconds']} s per side, "
             f"native ext4 and fusejournal alternating; on fusejournal a checkpoint (setxattr on the root) "
             f"every {fmt(pg['interval'])} s. Per-second TPS from `pgbench --progress=1`. Target (issue 11): "
             f"ratio >= 0.8 and no second below half the run's median.  CPU: share of one core from "
             f"/proc/PID/task/*/stat, in the 3 s after each checkpoint started / between.")
    L.append("")
    rows = []
    for i, p in enumerate(pg["pairs"]):
        n, f = p["native"], p["fusejournal"]
        cs = f.get("cpu_summary") or {}
        rows.append([i + 1, fmt(n["tps"]), fmt(f["tps"]), fmt(p.get("ratio")), fmt(n.get("min_second")),
                     fmt(f.get("min_second")), fmt(f.get("median_second")),
                     fmt(f.get("min_over_half_median")), len(f.get("checkpoints") or []),
                     f"{fmt(cs.get('fuse_loop_after_checkpoint'))} / {fmt(cs.get('fuse_loop_between'))}",
                     f"{fmt(cs.get('daemon_other_after_checkpoint'))} / {fmt(cs.get('daemon_other_between'))}",
                     f"{fmt(cs.get('children_after_checkpoint'))} / {fmt(cs.get('children_between'))}"])
    from .report import table
    L.append(table(["pair", "native tps", "fj tps", "fj / native", "native min s", "fj min s",
                    "fj median s", "fj min / (median/2)", "checkpoints", "FUSE loop CPU",
                    "daemon other threads CPU", "updater process CPU"], rows))
    L.append("")
    L.append(f"Median ratio over the pairs: {fmt(pg.get('ratio_median'))}.")
    L.append("")


def render_chart(pg: dict, outdir: Path, plt, suffix: str) -> tuple[str, str] | None:
    if not pg or not pg.get("pairs"):
        return None
    fig, axes = plt.subplots(len(pg["pairs"]), 1, figsize=(10, 3.2 * len(pg["pairs"])), squeeze=False)
    for i, p in enumerate(pg["pairs"]):
        ax = axes[i][0]
        for kind, col in (("native", "#4c72b0"), ("fusejournal", "#55a868")):
            s = p[kind].get("series") or []
            if s:
                t0 = s[0][0] - 1
                ax.plot([t - t0 for t, _ in s], [v for _, v in s], color=col,
                        label=f"{kind} ({p[kind]['tps']:.0f} tps)")
                if kind == "fusejournal":
                    med = p[kind]["median_second"]
                    ax.axhline(med / 2, color=col, ls=":", lw=1, label="half the fj median")
                    for k, (c0, c1, err) in enumerate(p[kind].get("checkpoints") or []):
                        ax.axvspan(c0 - t0, max(c1 - t0, c0 - t0 + 0.05), color="red" if err else "grey",
                                   alpha=0.3, label="checkpoint (setxattr)" if k == 0 else None)
        ax.set_xlabel("seconds")
        ax.set_ylabel("TPS")
        ax.set_title(f"pgbench pair {i + 1}: TPS per second{suffix}", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = outdir / "pgbench_tps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ("pgbench: TPS per second, checkpoints marked", str(path))
