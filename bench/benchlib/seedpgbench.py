"""pgbench while the shadow is seeded online (issue 12: "its impact on the application's
throughput while seeding is measured in bench/ (pgbench during a seed of a large tree)").

The scenario of a first mount under a running database: the application's directory holds
PostgreSQL's data directory beside a large amount of other data; the application is stopped,
``fusejournal mount`` returns at once and seeds the shadow in the background, and the
application restarts on the mount.  Reuses pgbench.py's set-up (``find_postgres``,
``_Server``, ``_Checkpoints``, the progress parser).  Steps:

1. a fresh SOURCE (targets.Fusejournal.setup with a ``prepare`` step, before the mount):
   ``SOURCE/tree``: FILES files of 1 MiB (``--seedpg-files``; default 8,192 in full mode,
   4,096 in quick mode, in directories of 256), written with distinct random contents; ``SOURCE/pgdata``: initdb,
   ``pgbench -i -s 10``;
2. the native baseline on that very directory (ext4, no mount): page cache dropped,
   ``pg_ctl start``, ``pgbench -c 4 -j 2 -T NATIVE --progress=1 --progress-timestamp``,
   ``pg_ctl stop``;
3. page cache dropped, ``fusejournal mount SOURCE MOUNTPOINT`` (a separate mountpoint,
   as pgbench.py; the mount returns within ``--seed-wait`` whatever the size of the tree);
4. PostgreSQL started on ``MOUNTPOINT/pgdata`` right after the mount returned, pgbench
   (same options, ``-T`` far away) started at once; a checkpoint (setxattr on the mount
   root) every 10 s, as pgbench.py does; ``user.fusejournal.status`` read every 0.5 s
   until ``seeding`` is gone (the seed's first complete checkpoint), with the seed's
   progress recorded;
5. pgbench keeps running for as long again as it ran during the seed, then is stopped
   (SIGINT; the per-second lines it printed are the measurement), ``pg_ctl stop``, unmount
   (teardown; PostgreSQL is always stopped before, also on failure).

Reported: TPS per second; mean and median TPS during the seed and after it, the ratios
during / after, during / native, after / native; the lowest second during the seed; the
seed's duration (mount returned -> seed done as observed, and ``seeded.json``'s own
figures); a chart of TPS over time with the seed's end marked.  Not in the default phases:
``--extras seedpg``.  Skipped with a clear message where PostgreSQL is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from .pgbench import CLIENTS, INTERVAL, SCALE, THREADS, _Checkpoints, _series, _Server, find_postgres
from .targets import Fusejournal
from .util import BenchError, MiB, drop_caches, log, median, rmtree, short

#: (files, file size, native seconds) by benchmark mode
TREE = {"full": (8192, MiB, 120), "quick": (4096, MiB, 60), "smoke": (64, MiB, 10)}
PER_DIR = 256
STATUS_XATTR = "user.fusejournal.status"
#: the longest the seed may take before the measurement gives up
SEED_LIMIT = 3600.0


def make_tree(root: Path, files: int, size: int) -> int:
    """``files`` files of ``size`` bytes under ``root/tree`` (directories of PER_DIR), each
    with its own contents (a window of a random block, its number in front).  Bytes written."""
    block = os.urandom(8 * MiB + size)
    total = 0
    for i in range(files):
        d = root / "tree" / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True, exist_ok=True)
        off = (i * 4099) % (8 * MiB)
        data = f"{i:08d}".encode() + block[off:off + size - 8]
        with open(d / f"f{i:06d}.dat", "wb") as f:
            f.write(data)
        total += len(data)
    return total


class _Pgbench:
    """pgbench running until stopped: its per-second progress lines gathered as they come."""

    def __init__(self, srv: _Server, limit: float) -> None:
        cmd = srv.prefix + [srv.pgbench, "-h", str(srv.sockdir), "-p", str(srv.port), "-U", "postgres",
                            "-c", str(CLIENTS), "-j", str(THREADS), "-T", str(int(limit)), "--progress=1",
                            "--progress-timestamp", "postgres"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd="/")
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True, name="seedpg-pgbench")
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        """SIGINT (then SIGKILL); everything it printed on stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.reader.join(timeout=15)
        return "".join(self.lines)


def _stats(values: list[float]) -> dict:
    if not values:
        return {"seconds": 0, "mean": None, "median": None, "min": None}
    return {"seconds": len(values), "mean": sum(values) / len(values), "median": median(values),
            "min": min(values)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def phase_seedpg(env, sizes, native_seconds: int | None = None, tree_files: int | None = None) -> dict:
    found = find_postgres()
    if isinstance(found, str):
        log(f"seedpg skipped: {found}")
        return {"skipped": found}
    bindir, pgbench = found
    files, fsize, d_native = TREE.get(sizes.name, TREE["quick"])
    native_seconds = native_seconds or d_native
    files = tree_files or files
    timeout = 900.0
    fj = Fusejournal(env)
    reason = fj.probe()
    if reason:
        raise BenchError(reason)
    sockdir = env.scratch / "seedpg-sock"
    rmtree(sockdir)
    out: dict = {"scale": SCALE, "clients": CLIENTS, "threads": THREADS, "interval": INTERVAL,
                 "postgres": str(bindir), "files": files, "file_size": fsize,
                 "native_seconds": native_seconds}
    srv: _Server | None = None
    bench: _Pgbench | None = None
    ckpt: _Checkpoints | None = None

    def prepare(source: Path) -> None:
        """The tree, the database, and the native baseline, on SOURCE before the mount."""
        nonlocal srv
        t0 = time.monotonic()
        out["tree_bytes"] = make_tree(source, files, fsize)
        out["tree_seconds"] = round(time.monotonic() - t0, 1)
        log(f"seedpg: {files} files, {out['tree_bytes'] / MiB:.0f} MiB in {out['tree_seconds']} s")
        srv = _Server(bindir, pgbench, source / "pgdata", sockdir, sockdir / "postgres-native.log")
        srv.start(timeout)
        srv.bench("-i", "-s", str(SCALE), "-q", timeout=timeout)
        srv.stop()
        drop_caches()
        srv.start(timeout, init=False)
        log(f"seedpg: native, {native_seconds} s")
        r = srv.bench("-c", str(CLIENTS), "-j", str(THREADS), "-T", str(native_seconds), "--progress=1",
                      "--progress-timestamp", timeout=native_seconds + timeout)
        srv.stop()
        out["native_series"] = _series(r.stderr)
        out["native"] = _stats([v for _, v in out["native_series"]])
        drop_caches()
        out["t_prepared"] = time.time()

    try:
        mnt = fj.setup("seedpg", prepare=prepare)
        t_mounted = time.time()
        out["mount_seconds"] = round(t_mounted - out["t_prepared"], 3)
        # the application restarts on the mount: same data directory, through fusejournal
        srv = _Server(bindir, pgbench, mnt / "pgdata", sockdir, sockdir / "postgres-fj.log")
        srv.start(timeout, init=False)
        bench = _Pgbench(srv, SEED_LIMIT * 2 + 600)
        t_bench = time.time()
        ckpt = _Checkpoints(mnt, INTERVAL)
        ckpt.start()
        progress: list[tuple[float, int, int | None]] = []
        t_seeded = None
        while time.time() - t_mounted < SEED_LIMIT:
            if not bench.alive():
                raise BenchError(f"pgbench exited {bench.proc.returncode} during the seed: "
                                 f"{short(bench.stop(), 300)}")
            st = json.loads(os.getxattr(mnt, STATUS_XATTR))
            seed = st.get("seeding")
            now = time.time()
            if not seed:
                t_seeded = now
                out["first_complete_checkpoint"] = st.get("first_complete_checkpoint")
                break
            progress.append((now, seed.get("bytes_copied") or 0, seed.get("bytes_total")))
            time.sleep(0.5)
        if t_seeded is None:
            raise BenchError(f"the seed did not finish within {SEED_LIMIT:.0f} s")
        log(f"seedpg: seed done {t_seeded - t_mounted:.1f} s after the mount returned; "
            f"pgbench as long again")
        after = t_seeded - t_bench
        while time.time() < t_seeded + after and bench.alive():
            time.sleep(0.5)
        t_end = time.time()
        ckpt.stop.set()
        ckpt.join(timeout=120)
        stderr = bench.stop()
        srv.stop()
        series = _series(stderr)
        if not series:
            raise BenchError(f"pgbench printed no progress: {short(stderr, 300)}")
        during = [v for t, v in series if t <= t_seeded]
        post = [v for t, v in series if t_seeded < t <= t_end]
        out.update({"series": series, "t_bench": t_bench, "t_mounted": t_mounted, "t_seeded": t_seeded,
                    "seed_progress": progress, "checkpoints": ckpt.times,
                    "checkpoint_failures": sum(1 for c in ckpt.times if c[2]),
                    "seed_seconds_observed": round(t_seeded - t_mounted, 2),
                    "during": _stats(during), "after": _stats(post)})
        try:
            done = json.loads((fj.shadow / "seeded.json").read_text())
            out["seeded"] = {"seconds": round((done["time_ns"] - done["started_ns"]) / 1e9, 2),
                             "rounds": done.get("rounds"), "final_halt_s": done.get("final_halt_s"),
                             "first_complete": done.get("first_complete")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            out["seeded"] = {"error": short(e, 120)}
        nat, dur, aft = (out.get("native") or {}).get("mean"), out["during"]["mean"], out["after"]["mean"]
        out["ratio_during_after"] = _ratio(dur, aft)
        out["ratio_during_native"] = _ratio(dur, nat)
        out["ratio_after_native"] = _ratio(aft, nat)
        log(f"seedpg: native {nat and round(nat)} tps, during the seed {dur and round(dur)}, after "
            f"{aft and round(aft)}; during/after {out['ratio_during_after']}")
        return out
    finally:
        if ckpt is not None:
            ckpt.stop.set()
            ckpt.join(timeout=120)
        if bench is not None:
            bench.stop()
        if srv is not None:
            srv.stop()                   # PostgreSQL always stops before the unmount
        try:
            fj.teardown()
        except Exception as e:  # noqa: BLE001
            log(f"seedpg: teardown: {e}")
        rmtree(sockdir)


# --------------------------------------------------------------------------- report


def render_markdown(L: list[str], sp: dict, fmt) -> None:
    if not sp:
        return
    L.append("### pgbench during an online seed")
    L.append("")
    if sp.get("skipped") or sp.get("error"):
        L.append(f"seedpg: {'skipped' if sp.get('skipped') else 'failed'}: {sp.get('skipped') or sp['error']}")
        L.append("")
        return
    seeded = sp.get("seeded") or {}
    L.append(f"PostgreSQL ({sp['postgres']}), scale {sp['scale']}, {sp['clients']} clients, its data directory "
             f"in a SOURCE that also holds {sp['files']} files ({fmt((sp.get('tree_bytes') or 0) / MiB)} MiB); "
             f"native: {sp['native_seconds']} s on SOURCE; then `fusejournal mount` (returned in "
             f"{fmt(sp.get('mount_seconds'))} s), PostgreSQL restarted on the mount, pgbench during the seed "
             f"({fmt(sp.get('seed_seconds_observed'))} s after the mount returned; seeded.json: "
             f"{fmt(seeded.get('seconds'))} s, {seeded.get('rounds')} round(s), final halt "
             f"{fmt(seeded.get('final_halt_s'))} s) and as long again after it; a checkpoint every "
             f"{fmt(sp['interval'])} s.")
    L.append("")
    from .report import table
    rows = []
    for name, key in (("native", "native"), ("fj during the seed", "during"), ("fj after the seed", "after")):
        s = sp.get(key) or {}
        rows.append([name, s.get("seconds"), fmt(s.get("mean")), fmt(s.get("median")), fmt(s.get("min"))])
    L.append(table(["", "seconds", "mean tps", "median second", "lowest second"], rows))
    L.append("")
    L.append(f"During / after: {fmt(sp.get('ratio_during_after'))}; during / native: "
             f"{fmt(sp.get('ratio_during_native'))}; after / native: {fmt(sp.get('ratio_after_native'))}.")
    L.append("")


def render_chart(sp: dict, outdir: Path, plt, suffix: str) -> tuple[str, str] | None:
    if not sp or not sp.get("series"):
        return None
    def tps(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"
    fig, ax = plt.subplots(figsize=(10, 4.2))
    t0 = sp["t_bench"]
    s = sp["series"]
    ax.plot([t - t0 for t, _ in s], [v for _, v in s], color="#55a868",
            label=f"fusejournal (during {tps(sp['during']['mean'])}, after {tps(sp['after']['mean'])} tps)")
    ns = sp.get("native_series") or []
    if ns:
        n0 = ns[0][0] - 1
        ax.plot([t - n0 for t, _ in ns], [v for _, v in ns], color="#4c72b0", lw=1, alpha=0.8,
                label=f"native, before the mount ({tps(sp['native']['mean'])} tps)")
    end = sp["t_seeded"] - t0
    ax.axvspan(sp["t_mounted"] - t0, end, color="orange", alpha=0.12, label="seeding")
    ax.axvline(end, color="red", lw=1.5, label=f"seed done ({sp['seed_seconds_observed']:.0f} s)")
    for k, (c0, c1, err) in enumerate(sp.get("checkpoints") or []):
        ax.axvspan(c0 - t0, max(c1 - t0, c0 - t0 + 0.1), color="red" if err else "grey", alpha=0.3,
                   label="checkpoint (setxattr)" if k == 0 else None)
    prog = sp.get("seed_progress") or []
    if prog and prog[-1][2]:
        ax2 = ax.twinx()
        ax2.plot([t - t0 for t, _, _ in prog], [b / (tot or 1) * 100 for _, b, tot in prog], color="orange",
                 ls="--", lw=1)
        ax2.set_ylabel("seed: % of bytes copied", fontsize=8)
        ax2.set_ylim(0, 105)
    ax.set_xlabel("seconds since pgbench started (native: since its own start)")
    ax.set_ylabel("TPS")
    ax.set_ylim(bottom=0)
    ax.set_title(f"pgbench during and after an online seed of {(sp.get('tree_bytes') or 0) / MiB / 1024:.1f} GiB"
                 f"{suffix}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    path = outdir / "seedpg_tps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ("pgbench during an online seed, the seed's end marked", str(path))
