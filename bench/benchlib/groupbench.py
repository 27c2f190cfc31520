"""A 4-member consistency group against a single tree, under the same write load
(issue 9): the halt and the setfattr time of each checkpoint.

The group: four sources, two on the scratch disk and two on tmpfs mounts made
for the measurement (unmounted in ``finally``), declared in a group TOML file
and mounted in place with ``fusejournal mount --group FILE`` (a coordinator
process and one daemon per member); every member's journal and shadow are
under the group journal, on the scratch disk.  The single tree: one
``fusejournal mount`` on the scratch disk (the benchmark's fusejournal target).

The load: one paced writer process per member (``group_writer.py``: 4 KiB
pwrites at random offsets, 1 in 16 operations a small-file create, 4 KiB, close,
and an unlink), and as many writers (one per subdirectory) in the single tree,
each at the same rate: the same operations per second reach both.

Per checkpoint, for both: ``setxattr(user.fusejournal.update_permission)`` on a
mount root (the call setfattr makes; for the group, each member root in turn),
timed until it returns; then the halt:

* single tree: ``last_halt_ns`` of ``user.fusejournal.status`` (the gate's
  closed interval, the same figure ``fusejournal status`` shows);
* group: the commit line's ``halt_ns`` (``fusejournal log --group FILE --json``,
  read after the block): the longest time any member held its mutating
  operations for its cut (docs/design.md, "The group's cut"), which ``status
  --group`` shows as ``last_group_halt_ns``; each member's own (its status
  ``last_halt_ns``), reported as the longest member's; and the commit line's
  ``cut_spread_ns``: from the epoch's move to the last member's cut (the
  members' wake-ups, holding no operation).

Checkpoints start every ``group_interval`` seconds (the next at once if one
took longer), after ``WARMUP`` unrecorded ones.  The measurement runs in
``group_blocks`` alternating blocks (single, group, single, group ...) so that a
change in the machine's background load falls on both.  The machine's CPU use
in each block (/proc/stat), the part of it that was ours (daemons, coordinator,
writers, this process) and the load average are recorded: on a shared machine
the rest is someone else's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .targets import CHECKPOINT_XATTR, CONTROL_XATTR, Fusejournal
from .util import (
    BenchError,
    fuse_abort,
    fuse_unmount,
    is_mounted,
    kill_pid,
    log,
    median,
    mount_entry,
    percentile,
    pid_alive,
    proc_cpu_seconds,
    rmtree,
    run_cmd,
    short,
    tail,
    watchdog,
)

STATUS_XATTR = "user.fusejournal.status"
MEMBERS = (("disk1", "disk"), ("disk2", "disk"), ("tmpfs1", "tmpfs"), ("tmpfs2", "tmpfs"))
WARMUP = 2
TMPFS_SIZE = "256m"
WRITER = Path(__file__).with_name("group_writer.py")


# --------------------------------------------------------------------------- load


def _proc_stat_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    total = sum(fields[:8])                                      # guest time is inside user
    return total - idle, total


class LoadMeter:
    """CPU use of the machine over a block, and how much of it was ours."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = [p for p in pids if p]
        self.t0 = time.monotonic()
        self.busy0, self.total0 = _proc_stat_jiffies()
        self.cpu0 = {p: proc_cpu_seconds(p) or 0.0 for p in self.pids}
        t = os.times()
        self.self0 = t.user + t.system
        self.loadavg0 = os.getloadavg()[0]

    def done(self, writer_cpu_s: float) -> dict:
        wall = time.monotonic() - self.t0
        busy1, total1 = _proc_stat_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        ncpu = os.cpu_count() or 1
        busy_cores = (busy1 - self.busy0) / hz / wall if wall > 0 else None
        daemons = sum(max(0.0, (proc_cpu_seconds(p) or self.cpu0[p]) - self.cpu0[p]) for p in self.pids)
        t = os.times()
        ours = daemons + writer_cpu_s + (t.user + t.system - self.self0)
        return {"seconds": round(wall, 2), "cpus": ncpu,
                "machine_busy_cores": busy_cores,
                "ours_cores": ours / wall if wall > 0 else None,
                "daemons_cores": daemons / wall if wall > 0 else None,
                "writers_cores": writer_cpu_s / wall if wall > 0 else None,
                "others_cores": (busy_cores - ours / wall) if busy_cores is not None and wall > 0 else None,
                "loadavg_1m_start": self.loadavg0, "loadavg_1m_end": os.getloadavg()[0]}


# --------------------------------------------------------------------------- writers


class Writers:
    """One group_writer.py process per directory, at ``rate`` operations/s each."""

    def __init__(self, dirs: list[Path], rate: float, seed: int) -> None:
        self.procs: list[subprocess.Popen] = []
        if rate <= 0:
            return
        for i, d in enumerate(dirs):
            p = subprocess.Popen([sys.executable, str(WRITER), str(d), str(rate), str(seed + i)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
            self.procs.append(p)
        for p in self.procs:                    # each says "ready" once its file is open
            line = p.stderr.readline() if p.stderr else b""
            if line.strip() != b"ready":
                self.stop()
                raise BenchError(f"writer did not start: {short(line.decode(errors='replace'))}")

    def stop(self, timeout: float = 60.0) -> list[dict]:
        out = []
        for p in self.procs:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                so, se = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                p.communicate()
                out.append({"error": "writer did not stop (blocked on the mount?)"})
                continue
            try:
                out.append(json.loads(so))
            except ValueError:
                out.append({"error": f"writer exited {p.returncode}: {short(se.decode(errors='replace'))}"})
        self.procs = []
        return out


# --------------------------------------------------------------------------- the two set-ups


class SingleTree:
    kind = "single"

    def __init__(self, env, writers: int) -> None:
        self.t = Fusejournal(env)
        reason = self.t.probe()
        if reason:
            raise BenchError(reason)
        self.writers = writers

    def setup(self, tag: str) -> None:
        mnt = self.t.setup(f"extras-{tag}")
        self.roots = [mnt]
        self.dirs = [mnt / f"w{i}" for i in range(self.writers)]

    def pids(self) -> list[int]:
        return [p for p in (self.t.daemon_pid(),) if p]

    def abort(self) -> None:
        self.t.abort()

    def group_halts(self) -> dict[str, dict]:
        return {}

    def teardown(self) -> None:
        self.t.teardown()


class GroupTree:
    kind = "group"

    def __init__(self, env, halt_timeout: float = 5.0) -> None:
        self.env = env
        self.fjt = Fusejournal(env)          # only for its CLI
        reason = self.fjt.probe()
        if reason:
            raise BenchError(reason)
        self.halt_timeout = halt_timeout
        self.base: Path | None = None
        self.tmpfs: list[Path] = []
        self.member_pids: list[int] = []
        self.coordinator_pid: int | None = None
        self.notes: list[str] = []

    def fj(self, *args, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return run_cmd(self.fjt.cli + [str(a) for a in args], timeout=timeout, env=self.fjt.cli_env,
                       on_timeout=self.abort, **kw)

    def setup(self, tag: str) -> None:
        self.base = self.env.scratch / f"extras-{tag}"
        rmtree(self.base)
        self.base.mkdir(parents=True)
        self.journal = self.base / "gj"
        self.file = self.base / "group.toml"
        self.members: list[dict] = []
        text = (f'[group]\nname = "bench"\njournal = "{self.journal}"\n'
                f"halt_timeout = {self.halt_timeout}\n")
        for name, fs in MEMBERS:
            where = fs
            if fs == "tmpfs":
                mp = self.base / f"{name}-fs"
                mp.mkdir()
                r = run_cmd(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", mp],
                            timeout=30, check=False)
                if r.returncode == 0:
                    self.tmpfs.append(mp)
                    src = mp / "data"
                else:
                    where = "disk"
                    self.notes.append(f"member {name}: no tmpfs ({short(r.stderr or r.stdout, 80)}); "
                                      "on the disk instead")
                    src = self.base / name
            else:
                src = self.base / name
            src.mkdir()
            fstype = (mount_entry(src) or {}).get("fstype") if where == "tmpfs" else None
            self.members.append({"name": name, "source": src, "fs": fstype or where})
            text += f'\n[[member]]\nname = "{name}"\nsource = "{src}"\n'
        self.file.write_text(text)
        self.logfile = self.base / "mount.log"
        try:
            self.fj("mount", "--group", self.file, timeout=2 * self.env.mount_timeout, stdout_path=self.logfile)
        except BenchError as e:
            self._find_pids()
            raise BenchError(f"mount --group: {e}; log: {short(tail(self.logfile), 200)}") from None
        self._find_pids()
        for m in self.members:
            if not is_mounted(m["source"]):
                raise BenchError(f"mount --group returned but member {m['name']} is not mounted; "
                                 f"log: {short(tail(self.logfile))}")
        self.roots = [m["source"] for m in self.members]
        self.dirs = [r / "w0" for r in self.roots]

    def _find_pids(self) -> None:
        for m in getattr(self, "members", []):
            try:
                pid = int(json.loads(os.getxattr(m["source"], STATUS_XATTR))["pid"])
                if pid not in self.member_pids:
                    self.member_pids.append(pid)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        try:
            self.coordinator_pid = int((self.journal / "run" / "coordinator.pid").read_text())
        except (OSError, ValueError, AttributeError):
            pass

    def pids(self) -> list[int]:
        return [p for p in [*self.member_pids, self.coordinator_pid] if p and pid_alive(p)]

    def abort(self) -> None:
        for m in getattr(self, "members", []):
            fuse_abort(m["source"])

    def group_halts(self) -> dict[str, dict]:
        """label -> the commit log's line for it (``fusejournal log --group FILE --json``)."""
        r = self.fj("log", "--group", self.file, "--json", timeout=120)
        try:
            rows = json.loads(r.stdout or "[]")
        except ValueError:
            raise BenchError(f"log --group --json: not JSON: {short(r.stdout)}") from None
        return {row.get("label"): row for row in rows}

    def status(self) -> dict:
        r = self.fj("status", "--group", self.file, "--json", timeout=120, check=False)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {"error": f"status --group --json exited {r.returncode}: {short(r.stderr or r.stdout)}"}

    def teardown(self) -> None:
        """``fusejournal umount --group``; then whatever is left: abort and lazy-unmount
        a member still mounted, kill a daemon or coordinator (ours) still alive,
        unmount the tmpfs mounts, remove the directories."""
        try:
            if self.base is not None and getattr(self, "file", None) is not None and self.file.exists():
                self._find_pids()
                try:
                    self.fj("umount", "--group", self.file, timeout=self.env.umount_timeout + 60)
                except BenchError as e:
                    self.notes.append(f"umount --group: {short(e, 160)}")
                    log(f"umount --group failed ({short(e, 120)}); forcing")
                for m in getattr(self, "members", []):
                    if is_mounted(m["source"]):
                        fuse_abort(m["source"])
                        fuse_unmount(m["source"])
                deadline = time.monotonic() + 10
                while any(pid_alive(p) for p in self.pids()) and time.monotonic() < deadline:
                    time.sleep(0.02)
                for p in self.pids():
                    kill_pid(p)
        finally:
            for mp in self.tmpfs:
                r = run_cmd(["umount", mp], timeout=60, check=False)
                if r.returncode != 0:
                    run_cmd(["umount", "-l", mp], timeout=60, check=False)
            self.tmpfs = []
            self.member_pids = []
            self.coordinator_pid = None
            if self.base is not None:
                rmtree(self.base)
            self.base = None


# --------------------------------------------------------------------------- one block


def _status(root: Path) -> dict:
    return json.loads(os.getxattr(root, STATUS_XATTR))


def run_block(tree, sizes, n: int, block: int, seed: int) -> dict:
    """Mount, start the writers, take WARMUP + n checkpoints, stop, unmount."""
    kind = tree.kind
    samples: list[dict] = []
    failures: list[str] = []
    tree.setup(f"group-{kind}-b{block}")
    writers = None
    try:
        writers = Writers(tree.dirs, sizes.group_rate, seed)
        meter = LoadMeter(tree.pids() + [p.pid for p in writers.procs])
        time.sleep(min(1.0, 4 * sizes.group_interval))        # let the writers get going
        next_t = time.monotonic()
        consecutive = 0
        for i in range(WARMUP + n):
            now = time.monotonic()
            if next_t > now:
                time.sleep(next_t - now)
            next_t = max(next_t + sizes.group_interval, time.monotonic())
            root = tree.roots[i % len(tree.roots)]
            label = f"{kind}-b{block}-{i}"
            try:
                before = [_status(r) for r in tree.roots]
                with watchdog(sizes.timeout, tree.abort, f"checkpoint {label}"):
                    t0 = time.perf_counter()
                    os.setxattr(root, CONTROL_XATTR, label.encode())
                    t_set = time.perf_counter() - t0
                after = [_status(r) for r in tree.roots]
                cp = int(os.getxattr(root, CHECKPOINT_XATTR))
            except OSError as e:
                failures.append(f"{label}: {e}")
                consecutive += 1
                if consecutive >= 5:
                    raise BenchError(f"5 checkpoints in a row failed; last: {short(e, 160)}") from None
                continue
            consecutive = 0
            if i < WARMUP:
                continue
            samples.append({
                "label": label, "checkpoint": cp, "trigger": i % len(tree.roots),
                "setfattr_ms": t_set * 1000.0,
                "pending_bytes": sum(s.get("pending_bytes") or 0 for s in before),
                "pending_operations": sum(s.get("pending_operations") or 0 for s in before),
                "member_halt_ms": [s.get("last_halt_ns", 0) / 1e6 for s in after],
            })
        wstats = writers.stop()
        writers = None
        load = meter.done(sum(w.get("cpu_s") or 0.0 for w in wstats))
        halts = tree.group_halts()
        st = tree.status() if kind == "group" else None
        for s in samples:
            if kind == "single":
                s["halt_ms"] = s["member_halt_ms"][0]
            else:
                row = halts.get(s["label"])
                s["halt_ms"] = row["halt_ns"] / 1e6 if row and row.get("state") == "committed" else None
                spread = row.get("cut_spread_ns") if row else None
                s["cut_spread_ms"] = spread / 1e6 if isinstance(spread, int) else None
                if row is None or row.get("state") != "committed":
                    failures.append(f"{s['label']}: not committed in the commit log ({row and row.get('state')})")
        out = {"samples": samples, "failures": failures, "writers": wstats, "load": load}
        if st is not None:
            coord = st.get("coordinator") or {}
            out["status"] = {k: coord.get(k) for k in ("group_halts", "group_halt_p99_ns", "group_failed",
                                                      "last_group_halt_ns")}
            out["status"]["last_group_checkpoint"] = st.get("last_group_checkpoint")
            if st.get("error") or st.get("coordinator_error"):
                out["status"]["error"] = st.get("error") or st.get("coordinator_error")
        return out
    finally:
        if writers is not None:
            writers.stop()
        notes = list(getattr(tree, "notes", []) or [])
        tree.teardown()
        if notes:
            log(f"  {kind}: " + "; ".join(notes))


# --------------------------------------------------------------------------- the phase


def _summary(blocks: list[dict]) -> dict:
    samples = [s for b in blocks for s in b["samples"]]
    halts = [s["halt_ms"] for s in samples if s.get("halt_ms") is not None]
    sets = [s["setfattr_ms"] for s in samples]
    member_max = [max(s["member_halt_ms"]) for s in samples if s["member_halt_ms"]]
    spreads = [s["cut_spread_ms"] for s in samples if s.get("cut_spread_ms") is not None]
    writers = [w for b in blocks for w in b["writers"] if "error" not in w]
    wall = sum(b["load"]["seconds"] for b in blocks) or None
    return {
        "n": len(samples),
        "failures": [f for b in blocks for f in b["failures"]],
        "halt_p50_ms": percentile(halts, 50), "halt_p99_ms": percentile(halts, 99),
        "halt_max_ms": max(halts) if halts else None, "halt_mean_ms": sum(halts) / len(halts) if halts else None,
        "setfattr_p50_ms": percentile(sets, 50), "setfattr_p99_ms": percentile(sets, 99),
        "setfattr_max_ms": max(sets) if sets else None,
        "member_gate_p50_ms": percentile(member_max, 50), "member_gate_p99_ms": percentile(member_max, 99),
        "cut_spread_p50_ms": percentile(spreads, 50), "cut_spread_p99_ms": percentile(spreads, 99),
        "pending_bytes_p50": median([s["pending_bytes"] for s in samples]),
        "pending_operations_p50": median([s["pending_operations"] for s in samples]),
        "writer_ops_per_s": sum(w["operations"] for w in writers) / wall if wall and writers else None,
        "writer_lat_p99_ms_max": max((w["lat_p99_ms"] for w in writers if w.get("lat_p99_ms") is not None),
                                     default=None),
        "writer_lat_max_ms": max((w["lat_max_ms"] for w in writers if w.get("lat_max_ms") is not None),
                                 default=None),
        "writer_over_50ms": sum(w.get("over_50ms", 0) for w in writers),
        "writer_errors": [e for b in blocks for w in b["writers"] for e in (w.get("errors") or
                                                                             ([w["error"]] if "error" in w else []))][:5],
        "machine_busy_cores": median([b["load"]["machine_busy_cores"] for b in blocks]),
        "ours_cores": median([b["load"]["ours_cores"] for b in blocks]),
        "others_cores": median([b["load"]["others_cores"] for b in blocks]),
        "loadavg_1m": median([b["load"]["loadavg_1m_end"] for b in blocks]),
    }


def phase_group(env, sizes) -> dict:
    n_total = sizes.group_checkpoints
    nblocks = max(1, min(sizes.group_blocks, n_total))
    per = [n_total // nblocks + (1 if i < n_total % nblocks else 0) for i in range(nblocks)]
    res: dict = {"config": {
        "members": [f"{name} ({fs})" for name, fs in MEMBERS], "checkpoints": n_total, "blocks": nblocks,
        "warmup_per_block": WARMUP, "interval_s": sizes.group_interval, "writer_rate_ops_s": sizes.group_rate,
        "writers": len(MEMBERS), "cpus": os.cpu_count()}, "single": [], "group": []}
    for b, n in enumerate(per):
        for kind in ("single", "group"):
            tree = SingleTree(env, len(MEMBERS)) if kind == "single" else GroupTree(env)
            t0 = time.monotonic()
            out = run_block(tree, sizes, n, b, seed=1000 * b)
            res[kind].append(out)
            halts = [s["halt_ms"] for s in out["samples"] if s.get("halt_ms") is not None]
            log(f"  {kind} block {b + 1}/{nblocks}: {len(out['samples'])} checkpoints in "
                f"{time.monotonic() - t0:.1f} s, halt p50 {percentile(halts, 50) or 0:.3f} ms, "
                f"machine busy {out['load']['machine_busy_cores'] or 0:.2f} cores"
                + (f", {len(out['failures'])} failure(s)" if out["failures"] else ""))
            if getattr(tree, "members", None):
                res["config"]["members"] = [f"{m['name']} ({m['fs']})" for m in tree.members]
            for note in getattr(tree, "notes", []) or []:
                res["config"].setdefault("notes", []).append(note)
    res["summary"] = {kind: _summary(res[kind]) for kind in ("single", "group")}
    bad = res["summary"]["single"]["failures"] + res["summary"]["group"]["failures"]
    if bad:     # the numbers stay in the results; the phase counts as failed
        res["error"] = f"{len(bad)} checkpoint(s) failed: {short('; '.join(bad[:3]), 200)}"
    return res
