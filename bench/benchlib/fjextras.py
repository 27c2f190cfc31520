"""fusejournal-only measurements (issue 4):

* cpu_rss     daemon CPU seconds and peak RSS per GiB written
* halt        halt duration p50/p99/max vs pending bytes, setfattr return time
              vs pending bytes, updater throughput and shadow lag
* log_ratio   log bytes stored vs bytes written, text-like and random data
* compress    fusejournal's lz4 compression speed on this machine
* pgbench     PostgreSQL's pgbench on native ext4 and through a mount with a
              checkpoint every 10 s: TPS ratio, the worst second (pgbench.py)
* group       a 4-member consistency group against a single tree under the same
              write load: halt and setfattr time per checkpoint (groupbench.py)
* browse      the browse mount at scale: seed time, browse daemon memory and first
              listings of a tree of 1,000,000 files and of a directory of 100,000
              (browsebench.py; not in the default phases: ``--extras browse``)
* seedpg      pgbench while the shadow of a 4-8 GiB tree is seeded online, and as long
              again after: TPS during / after the seed / native, the seed's duration
              (seedpgbench.py; not in the default phases: ``--extras seedpg``)
* history     retained checkpoints: browse --checkpoint/--all of an old checkpoint of a
              1 GiB tree, history size vs bytes changed, restore --checkpoint and verify
              of 100,000 files (histbench.py; not in the default phases: ``--extras history``)

Each phase gets a fresh mount; a failing phase is reported, not fatal.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from .browsebench import phase_browse
from .groupbench import phase_group
from .histbench import phase_history
from .pgbench import phase_pgbench
from .seedpgbench import phase_seedpg
from .targets import CONTROL_XATTR, SHADOW_XATTR, Fusejournal
from .util import (
    REPO,
    BenchError,
    GiB,
    MiB,
    drop_caches,
    log,
    median,
    percentile,
    proc_cpu_seconds,
    proc_hwm_bytes,
    proc_reset_hwm,
    rmtree,
    short,
    watchdog,
)

PHASES = ("compress", "cpu_rss", "halt", "log_ratio", "group", "pgbench")


def parse_sizes(text: str) -> tuple:
    """``1M,100M,1G,10Gx1`` -> ((bytes, repeats), ...) for the halt phase (repeats default 3)."""
    units = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB}
    out = []
    for part in text.split(","):
        size, _, reps = part.strip().upper().partition("X")
        num, unit = size.rstrip("KMGIB"), size[len(size.rstrip("KMGIB")):].rstrip("IB")
        if not num or unit not in units:
            raise SystemExit(f"--setfattr-sizes: bad size {part!r} (e.g. 1M, 512K, 10Gx1)")
        out.append((int(float(num) * units[unit]), int(reps) if reps else 3))
    return tuple(out)


# --------------------------------------------------------------------------- data


def random_block(size: int = 8 * MiB) -> bytes:
    return os.urandom(size)


@functools.lru_cache(maxsize=2)
def text_block(size: int = 8 * MiB, seed: int = 4) -> bytes:
    """Text-like data: an application log mixing plain lines and JSON lines,
    with timestamps, ids, numbers and paths that vary (not one line repeated)."""
    rng = random.Random(seed)
    levels = ["INFO"] * 12 + ["DEBUG"] * 6 + ["WARN"] * 2 + ["ERROR"]
    comps = ["http", "db.pool", "auth", "scheduler", "cache", "mailer", "storage", "api.v2"]
    paths = ["/api/v2/users", "/api/v2/orders", "/login", "/static/app.js", "/healthz",
             "/api/v2/search", "/upload", "/api/v2/items"]
    msgs = [
        "request {m} {p} -> {code} in {ms:.1f} ms (user={user}, bytes={b})",
        "query SELECT * FROM orders WHERE customer_id = {user} took {ms:.2f} ms rows={rows}",
        "cache miss key=session:{hexid} ttl={ttl}s",
        "connection {cid} returned to pool (in use {inuse}/{size})",
        "job {hexid} finished: {rows} records in {ms:.0f} ms",
        "token refreshed for user {user} expires_in={ttl}",
    ]
    out, n, t = [], 0, 1_700_000_000.0
    while n < size:
        t += rng.expovariate(200.0)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
        vals = dict(m=rng.choice(["GET", "POST", "PUT", "DELETE"]), p=rng.choice(paths),
                    code=rng.choice([200] * 20 + [201, 204, 301, 304, 400, 401, 404, 500]),
                    ms=rng.lognormvariate(2.0, 1.0), user=rng.randrange(1, 50_000),
                    b=rng.randrange(0, 200_000), rows=rng.randrange(0, 5000),
                    hexid=f"{rng.getrandbits(64):016x}", ttl=rng.choice([60, 300, 900, 3600]),
                    cid=rng.randrange(1, 64), inuse=rng.randrange(0, 32), size=32)
        if rng.random() < 0.3:
            line = json.dumps({"ts": ts, "level": rng.choice(levels), "logger": rng.choice(comps),
                               "msg": rng.choice(msgs).format(**vals), "trace_id": vals["hexid"],
                               "duration_ms": round(vals["ms"], 2)}) + "\n"
        else:
            line = f"{ts} {rng.choice(levels):5} [{rng.choice(comps)}] {rng.choice(msgs).format(**vals)}\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def write_bytes(path: Path, total: int, block: bytes, *, append: bool = False) -> None:
    """Write total bytes in 1 MiB write() calls, cycling through block (no fsync:
    pending data waits in the temporary store until the checkpoint)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(block)
        off, left = 0, total
        while left > 0:
            n = min(MiB, left, len(block) - off)
            left -= os.write(fd, view[off:off + n])
            off = (off + n) % len(block)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- helpers


class Session:
    """A fresh fusejournal mount for one phase."""

    def __init__(self, env, sizes, tag: str) -> None:
        self.t = Fusejournal(env)
        reason = self.t.probe()
        if reason:
            raise BenchError(reason)
        self.env, self.sizes, self.tag = env, sizes, tag

    def __enter__(self):
        self.path = self.t.setup(f"extras-{self.tag}")
        return self

    def __exit__(self, *exc):
        self.t.teardown()
        return False

    def guard(self, what: str, seconds: float | None = None):
        return watchdog(seconds or self.sizes.timeout, self.t.abort, what)

    def checkpoint(self, label: str) -> float:
        """setxattr on the mount root (what setfattr does, without exec-ing it);
        seconds until it returned."""
        with self.guard(f"checkpoint {label}"):
            t0 = time.perf_counter()
            os.setxattr(self.path, CONTROL_XATTR, label.encode())
            return time.perf_counter() - t0

    def status(self) -> dict:
        return self.t.status()

    def wait(self, checkpoint: int) -> float:
        t0 = time.perf_counter()
        self.t.fj("wait", self.path, "--checkpoint", checkpoint, "--timeout", int(self.sizes.timeout),
                  timeout=self.sizes.timeout + 60)
        return time.perf_counter() - t0

    def shadow_checkpoint(self) -> int:
        return int(os.getxattr(self.path, SHADOW_XATTR))

    def apply_and_wait(self, checkpoint: int, t_ref: float) -> tuple[float | None, float]:
        """After a checkpoint returned at t_ref: start `fusejournal wait
        --checkpoint N` and, meanwhile, poll user.fusejournal.shadow_checkpoint
        every 2 ms.  Returns (seconds until the shadow reached N by polling,
        None if the attribute is unreadable; seconds until `wait` returned)."""
        cmd = self.t.cli + ["wait", str(self.path), "--checkpoint", str(checkpoint),
                            "--timeout", str(int(self.sizes.timeout))]
        proc = subprocess.Popen(cmd, env=self.t.cli_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        t_applied = None
        try:
            with self.guard(f"waiting for checkpoint {checkpoint}"):
                try:
                    while time.perf_counter() - t_ref < self.sizes.timeout:
                        if self.shadow_checkpoint() >= checkpoint:
                            t_applied = time.perf_counter() - t_ref
                            break
                        if proc.poll() is not None and proc.returncode != 0:
                            break
                        time.sleep(0.002)
                except (OSError, ValueError):
                    t_applied = None
                try:
                    out, err = proc.communicate(timeout=self.sizes.timeout)
                except subprocess.TimeoutExpired:
                    raise BenchError(f"`fusejournal wait --checkpoint {checkpoint}` timed out") from None
            t_wait = time.perf_counter() - t_ref
            if proc.returncode != 0:
                raise BenchError(f"`fusejournal wait --checkpoint {checkpoint}` exited {proc.returncode}: "
                                 f"{short(err.decode(errors='replace'))}")
            return t_applied, t_wait
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def native_fsync_seconds(scratch: Path, size: int, reps: int = 3) -> float:
    """How long fsync of `size` freshly written bytes takes on the backing disk
    (the "fsync time" part of the setfattr allowance)."""
    d = scratch / "fsync-probe"
    d.mkdir(parents=True, exist_ok=True)
    block = random_block(min(size, 8 * MiB))
    times = []
    try:
        for i in range(reps):
            p = d / f"f{i}"
            write_bytes(p, size, block)
            os.sync()
            write_bytes(p, size, block)   # overwrite: dirty again, same blocks
            fd = os.open(p, os.O_WRONLY)
            try:
                t0 = time.perf_counter()
                os.fdatasync(fd)
                times.append(time.perf_counter() - t0)
            finally:
                os.close(fd)
            p.unlink()
    finally:
        rmtree(d)
    return median(times)


# --------------------------------------------------------------------------- phases


def phase_compress(env, sizes) -> dict:
    """The speed of the ordered log's compression call, one thread, 8 MiB at a time:
    ``fusejournal.compression.compress(raw, checksum=False)`` at the default level, as
    log.py's ``_pack`` calls it (a BATCH entry's frame carries no xxhash32: the entry's
    CRC-32 covers it).  Falls back to lz4.frame with the same parameters when the
    package cannot be imported.  The log runs ``COMPRESS_AHEAD`` of these at once."""
    try:
        sys.path.insert(0, str(REPO))
        from fusejournal.compression import compress as fj_compress  # type: ignore

        def compress(raw):
            return fj_compress(raw, checksum=False)
        how = "fusejournal.compression.compress(checksum=False), as the log calls it"
    except Exception:  # noqa: BLE001
        try:
            import lz4.frame
        except ImportError as e:
            raise BenchError(f"neither fusejournal.compression nor lz4 importable: {e}") from None

        def compress(raw):
            return lz4.frame.compress(raw, compression_level=0, content_checksum=False, store_size=True)
        how = "lz4.frame.compress (level 0, no content checksum)"
    finally:
        if sys.path and sys.path[0] == str(REPO):
            sys.path.pop(0)
    out = {"function": how}
    for kind, block in (("text", text_block(8 * MiB)), ("random", random_block(8 * MiB))):
        speeds = []
        for _ in range(5):
            t0 = time.perf_counter()
            c = compress(block)
            speeds.append(len(block) / (time.perf_counter() - t0) / 1e6)
        out[f"{kind}_mb_s"] = median(speeds)
        out[f"{kind}_ratio"] = len(c) / len(block)
    return out


def phase_cpu_rss(env, sizes) -> dict:
    total = sizes.cpu_bytes
    with Session(env, sizes, "cpu") as s:
        pid = s.t.daemon_pid()
        if not pid:
            raise BenchError("no daemon pid (journal/daemon.json)")
        proc_reset_hwm(pid)
        rss0 = proc_hwm_bytes(pid)
        c0 = proc_cpu_seconds(pid)
        t0 = time.perf_counter()
        with s.guard("writing"):
            write_bytes(s.path / "big.dat", total, random_block())
        t_write = time.perf_counter() - t0
        c1 = proc_cpu_seconds(pid)
        st = s.status()
        t_ck = s.checkpoint("cpu")
        c2 = proc_cpu_seconds(pid)
        n = st["last_checkpoint"] + 1
        s.apply_and_wait(n, time.perf_counter())
        c3 = proc_cpu_seconds(pid)
        hwm = proc_hwm_bytes(pid)
    gib = total / GiB
    return {
        "written_bytes": total,
        "write_seconds": t_write,
        "write_mb_s": total / t_write / 1e6,
        "checkpoint_seconds": t_ck,
        "cpu_s_write_per_gib": (c1 - c0) / gib,
        "cpu_s_checkpoint_per_gib": (c2 - c1) / gib,
        "cpu_s_apply_per_gib": (c3 - c2) / gib,
        "cpu_s_per_gib": (c3 - c0) / gib,
        "rss_after_mount_mib": (rss0 or 0) / MiB,
        "peak_rss_mib": (hwm or 0) / MiB,
        "rss_growth_mib_per_gib": ((hwm or 0) - (rss0 or 0)) / MiB / gib,
    }


def phase_halt(env, sizes) -> dict:
    samples = []
    with Session(env, sizes, "halt") as s:
        # the daemon's peak RSS through each pending size (issue 11: bounded through 10 GiB)
        pid = s.t.daemon_pid()
        if pid:
            proc_reset_hwm(pid)
        # the CLI's own start-up time (for reading `wait` times)
        overhead = median([s.wait(0) for _ in range(3)])
        block = random_block()
        label = 0
        for size, reps in sizes.halt_pending:
            for _ in range(reps):
                label += 1
                with s.guard(f"writing {size} pending bytes"):
                    write_bytes(s.path / "pending.dat", size, block)
                st0 = s.status()
                n = st0["last_checkpoint"] + 1
                t_set = s.checkpoint(f"halt-{label}")
                t_ref = time.perf_counter()
                t_applied, t_wait = s.apply_and_wait(n, t_ref)
                st1 = s.status()
                if st1.get("last_checkpoint") != n:
                    log(f"halt sample: expected checkpoint {n}, status says {st1.get('last_checkpoint')}")
                pending = st0.get("pending_bytes") or size
                apply_s = t_applied if t_applied is not None else max(t_wait - overhead, 1e-3)
                samples.append({
                    "written": size, "pending_bytes": pending,
                    "pending_operations": st0.get("pending_operations"),
                    "halt_ms": st1["last_halt_ns"] / 1e6,
                    "setfattr_ms": t_set * 1000.0,
                    "apply_s": apply_s,
                    "apply_by": "poll" if t_applied is not None else "wait - CLI start-up",
                    "wait_s": t_wait,
                    "daemon_hwm_bytes": proc_hwm_bytes(pid) if pid else None,
                })
        final_status = s.status()
    per_size = []
    for size, _ in sizes.halt_pending:
        ss = [x for x in samples if x["written"] == size]
        halts = [x["halt_ms"] for x in ss]
        sets = [x["setfattr_ms"] for x in ss]
        fsync_s = native_fsync_seconds(env.scratch, size)
        allowance_ms = 20.0 + size / 300e6 * 1000.0 + fsync_s * 1000.0
        per_size.append({
            "pending": size, "n": len(ss),
            "pending_bytes_reported": median([x["pending_bytes"] for x in ss]),
            "halt_p50_ms": percentile(halts, 50), "halt_p99_ms": percentile(halts, 99),
            "halt_max_ms": max(halts) if halts else None,
            "setfattr_p50_ms": percentile(sets, 50), "setfattr_max_ms": max(sets) if sets else None,
            "native_fsync_ms": fsync_s * 1000.0,
            "setfattr_allowance_ms": allowance_ms,
            "apply_mb_s": median([x["pending_bytes"] / x["apply_s"] / 1e6 for x in ss]),
            "lag_p50_s": percentile([x["apply_s"] for x in ss], 50),
            "lag_max_s": max(x["apply_s"] for x in ss) if ss else None,
            "wait_p50_s": percentile([x["wait_s"] for x in ss], 50),
            # VmHWM since the mount, so the peak through this size and every smaller one
            "daemon_peak_rss_mib": max((x["daemon_hwm_bytes"] or 0 for x in ss), default=0) / MiB
            if any(x.get("daemon_hwm_bytes") for x in ss) else None,
        })
    return {"cli_overhead_s": overhead, "samples": samples, "per_size": per_size,
            "status": final_status}


def checkpoint_sizes(s: Session, label: str) -> tuple[int, int, str] | None:
    """(raw_bytes, stored_bytes, how) of the checkpoint with this label.

    The log is pruned once the shadow has applied a batch, so the status
    totals (log_raw_bytes / log_stored_bytes) cannot be differenced across
    checkpoints.  First choice: the checkpoint's own marker from `fusejournal
    log JOURNAL --json`, read right after the setfattr returned; then the
    daemon's log line for that checkpoint."""
    try:
        r = s.t.fj("log", s.t.journal, "--json", timeout=120, check=False)
        for m in json.loads(r.stdout or "[]"):
            if m.get("label") == label and "stored_bytes" in m:
                return int(m["raw_bytes"]), int(m["stored_bytes"]), "marker (fusejournal log --json)"
    except (BenchError, ValueError, TypeError):
        pass
    import re
    try:
        text = (s.t.journal / "daemon.log").read_text(errors="replace")
        pat = re.compile(r"checkpoint \d+ '" + re.escape(label) + r"': \d+ operation\(s\), (\d+) bytes raw, (\d+) stored")
        found = pat.findall(text)
        if found:
            return int(found[-1][0]), int(found[-1][1]), "daemon.log checkpoint line"
    except OSError:
        pass
    return None


def phase_log_ratio(env, sizes) -> dict:
    out = {}
    for kind, block in (("text", text_block()), ("random", random_block())):
        with Session(env, sizes, f"log-{kind}") as s:   # a fresh journal per kind
            st0 = s.status()
            du0 = du(s.t.journal / "log")
            with s.guard(f"writing {kind} data"):
                write_bytes(s.path / f"{kind}.log", sizes.log_bytes, block)
            label = f"log-{kind}"
            s.checkpoint(label)
            found = checkpoint_sizes(s, label)
            st1 = s.status()
            du1 = du(s.t.journal / "log")
            written = sizes.log_bytes
            if found:
                raw, stored, how = found
            elif "log_stored_bytes" in st1:
                stored = st1["log_stored_bytes"] - st0.get("log_stored_bytes", 0)
                raw = st1.get("log_raw_bytes", 0) - st0.get("log_raw_bytes", 0)
                how = "status log_stored_bytes (may be low if already pruned)"
            else:
                stored, raw, how = du1 - du0, None, "du journal/log"
            out[kind] = {"written": written, "raw": raw, "stored": stored, "du_delta": du1 - du0,
                         "ratio": stored / written, "source": how}
    return out


def du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def run_extras(env, sizes, phases=PHASES) -> dict:
    res: dict = {}
    fns = {"compress": phase_compress, "cpu_rss": phase_cpu_rss, "halt": phase_halt,
           "log_ratio": phase_log_ratio, "group": phase_group, "browse": phase_browse,
           "history": phase_history,
           "pgbench": lambda env, sizes: phase_pgbench(env, sizes, getattr(env, "pgbench_seconds", None),
                                                       getattr(env, "pgbench_pairs", None)),
           "seedpg": lambda env, sizes: phase_seedpg(env, sizes, getattr(env, "pgbench_seconds", None),
                                                     getattr(env, "seedpg_files", None))}
    for name in phases:
        log(f"fusejournal extras: {name}")
        drop_caches()
        t0 = time.perf_counter()
        try:
            res[name] = fns[name](env, sizes)
        except Exception as e:  # noqa: BLE001 - reported, never fatal
            res[name] = {"error": short(f"{type(e).__name__}: {e}", 300)}
            log(f"  failed: {res[name]['error']}")
        res[name + "_seconds"] = round(time.perf_counter() - t0, 1)
    return res
