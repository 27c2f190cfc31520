#!/usr/bin/env python3
"""fusejournal benchmark (issue 4): native vs pyfuse3's reference passthrough
vs fusejournal (with and without a checkpoint every second), interleaved, median
of the rounds; writes docs/performance.md and docs/perf/*.png.

    python bench/run.py                 # full run (3 rounds, 1 GiB files; ~1 hour)
    python bench/run.py --quick         # < 2 minutes, tiny sizes, 1 round
    python bench/run.py --smoke         # tiniest sizes, native + fusejournal (for CI)
    python bench/run.py --targets native,passthrough --workloads seqwrite_1m,smallfile
    python bench/run.py --targets fusejournal --workloads fjextras --extras group \
        --out bench/results/group.md      # only the consistency-group measurement
    python bench/run.py --targets fusejournal --workloads fjextras --extras browse \
        --out bench/results/browse.md     # the browse mount of 1,000,000 files
    python bench/run.py --quick --targets fusejournal --workloads fjextras --extras seedpg \
        --out bench/results/seedpg.md     # pgbench during an online seed of 4 GiB
    python bench/run.py --targets fusejournal --workloads fjextras --extras history \
        --out bench/results/history.md    # retained checkpoints: browse an old one, restore
    python bench/run.py --render bench/results/run-XXXX.json   # re-render only

Needs root (drop_caches, FUSE mounts), fio, dbench, fusermount3, setfattr.
Run it with .venv/bin/python, or any python: it re-executes itself with
.venv/bin/python when matplotlib is missing here but present there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv"     # ./scripts/setup-venv.sh makes it


def _maybe_reexec() -> None:
    if os.environ.get("FJBENCH_REEXEC"):
        return
    try:
        import matplotlib  # noqa: F401
        return
    except ImportError:
        pass
    py = VENV / "bin" / "python"
    if not py.exists() or Path(sys.prefix).resolve() == VENV.resolve():
        return
    if subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode != 0:
        return
    os.environ["FJBENCH_REEXEC"] = "1"
    os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


_maybe_reexec()
sys.path.insert(0, str(HERE))

from benchlib import fjextras, report  # noqa: E402
from benchlib.targets import ALL_TARGETS, TARGET_ALIASES, TARGET_KEYS, Fusejournal  # noqa: E402
from benchlib.util import REPO, BenchError, log, machine_info, rmtree, short, write_json  # noqa: E402
from benchlib.workloads import SIZES, WORKLOADS, Ctx  # noqa: E402

EXTRAS = "fjextras"
ALL_WORKLOADS = list(WORKLOADS) + [EXTRAS]


class Env:
    def __init__(self, scratch: Path, sizes, args) -> None:
        self.scratch = scratch
        self.mount_timeout = args.mount_timeout
        self.umount_timeout = args.umount_timeout
        self.workload_timeout = sizes.timeout
        self.browse_files = args.browse_files
        self.browse_dir_entries = args.browse_dir_entries
        self.history_files = args.history_files
        self.pgbench_seconds = getattr(args, "pgbench_seconds", None)
        self.pgbench_pairs = getattr(args, "pgbench_pairs", None)
        self.seedpg_files = getattr(args, "seedpg_files", None)


def parse_list(text: str | None, allowed: list[str], aliases: dict, what: str) -> list[str]:
    if not text:
        return list(allowed)
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        item = aliases.get(item, item)
        if item not in allowed:
            raise SystemExit(f"unknown {what} {item!r}; choose from: {', '.join(allowed)}")
        if item not in out:
            out.append(item)
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        if r.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "fusejournal"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + (" + uncommitted changes in fusejournal/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def pyfuse3_version() -> str | None:
    from benchlib.targets import python_with_pyfuse3
    try:
        py = python_with_pyfuse3()
        r = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('pyfuse3'))"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or None
    except (BenchError, OSError, subprocess.SubprocessError):
        return None


def run_benchmark(args, sizes, targets_sel, workloads_sel, out_json: Path) -> dict:
    scratch = Path(args.scratch) / f"fjbench-{os.getpid()}"
    rmtree(scratch)
    scratch.mkdir(parents=True)
    env = Env(scratch, sizes, args)
    rounds = args.rounds or sizes.rounds
    wl = [w for w in workloads_sel if w != EXTRAS]
    results = {
        "meta": {
            "command": args.command_line, "mode": sizes.name, "rounds": rounds,
            "targets": targets_sel, "workloads": wl, "sizes": sizes.__dict__,
            "machine": machine_info(), "scratch": str(Path(args.scratch)),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "pyfuse3": pyfuse3_version(),
            "fusejournal_commit": git_commit(), "probe": {},
        },
        "runs": [],
    }
    t_start = time.monotonic()
    try:
        targets = [cls(env) for cls in ALL_TARGETS if cls.key in targets_sel]
        dead: dict[str, str] = {}
        for t in targets:
            reason = t.probe()
            results["meta"]["probe"][t.key] = reason
            if reason:
                dead[t.key] = reason
                log(f"target {t.key} unavailable: {reason}")
            if t.key == "passthrough" and not reason:
                src = t.script.parent / "SOURCE.txt"
                results["meta"]["passthroughfs"] = (src.read_text().strip() if src.exists()
                                                    else str(t.script))
        setup_failures = {t.key: 0 for t in targets}
        for rnd in range(rounds):
            for w in wl:
                for t in targets:
                    rec = {"round": rnd, "workload": w, "target": t.key, "metrics": {}, "extra": {}}
                    results["runs"].append(rec)
                    if t.key in dead:
                        rec["error"] = dead[t.key]
                        continue
                    tag = f"r{rnd}-{w}"
                    t0 = time.monotonic()
                    try:
                        path = t.setup(tag)
                    except Exception as e:  # noqa: BLE001
                        rec["error"] = short(f"{e}", 300)
                        setup_failures[t.key] += 1
                        if setup_failures[t.key] >= 2:
                            dead[t.key] = f"{rec['error']} (skipped after 2 failed mounts)"
                        log(f"round {rnd + 1} {w} {t.key}: setup failed: {rec['error']}")
                        try:
                            t.teardown()
                        except Exception:  # noqa: BLE001
                            pass
                        continue
                    setup_failures[t.key] = 0
                    ctx = Ctx(t, path, sizes, scratch)
                    try:
                        rec["metrics"] = WORKLOADS[w](ctx)
                    except Exception as e:  # noqa: BLE001
                        rec["error"] = short(f"{e}" if isinstance(e, BenchError) else f"{type(e).__name__}: {e}", 300)
                    finally:
                        if isinstance(t, Fusejournal) and t.checkpoint_every:
                            t.stop_checkpoints()
                            ctx.extra.update(t.checkpoint_summary())
                        try:
                            t.teardown()
                        except Exception as e:  # noqa: BLE001
                            ctx.extra["teardown_error"] = short(e)
                        ctx.extra.update(t.notes)
                        t.notes = {}
                        rec["extra"] = ctx.extra
                        rec["seconds"] = round(time.monotonic() - t0, 2)
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in rec["metrics"].items())
                    log(f"round {rnd + 1}/{rounds} {w:13} {t.key:17} {rec['seconds']:7.1f}s  "
                        f"{shown or 'FAILED: ' + rec.get('error', '?')}")
                    write_json(out_json, results)
        if EXTRAS in workloads_sel:
            if "fusejournal" not in targets_sel and "fusejournal_ckpt" not in targets_sel:
                log("fusejournal extras skipped: no fusejournal target selected")
            elif "fusejournal" in dead and "skipped after" in dead["fusejournal"]:
                results["fj_extras"] = {"error": dead["fusejournal"]}
            else:
                probe = Fusejournal(env).probe()
                if probe:
                    results["fj_extras"] = {"error": probe}
                else:
                    phases = args.extras.split(",") if args.extras else fjextras.PHASES
                    results["fj_extras"] = fjextras.run_extras(env, sizes, phases)
    finally:
        results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        results["meta"]["elapsed_s"] = round(time.monotonic() - t_start, 1)
        write_json(out_json, results)
        rmtree(scratch)
    return results


def render(results: dict, out_md: Path, charts_dir: Path) -> None:
    try:
        charts = report.render_charts(results, charts_dir)
    except Exception as e:  # noqa: BLE001 - a chart must not cost the table
        log(f"charts failed: {e}")
        charts = []
    if not charts:
        log("no charts (matplotlib missing or nothing to plot)")
    text = report.render_markdown(results, charts, out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    log(f"wrote {out_md}" + (f" and {len(charts)} chart(s) in {charts_dir}" if charts else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=
                                "targets: " + ", ".join(TARGET_KEYS) + " (or 1,2,3,4)\n"
                                "workloads: " + ", ".join(ALL_WORKLOADS))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, < 2 minutes")
    mode.add_argument("--smoke", action="store_true",
                      help="tiniest sizes on native + fusejournal only; exit 1 if anything failed")
    p.add_argument("--out", help="markdown output (default docs/performance.md; "
                                 "bench/results/smoke.md for --smoke)")
    p.add_argument("--charts-dir", help="PNG directory (default: perf/ next to --out)")
    p.add_argument("--targets", help="comma list of targets (default: all four)")
    p.add_argument("--workloads", help="comma list of workloads (default: all)")
    p.add_argument("--extras", help="comma list of fusejournal-only phases (default: "
                                    + ",".join(fjextras.PHASES) + ")")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--group-checkpoints", type=int, metavar="N",
                   help="recorded checkpoints of the group and of the single tree (extras phase group)")
    p.add_argument("--group-rate", type=float, metavar="OPS",
                   help="operations/s of each of the 4 writers in the group phase (0: no writers)")
    p.add_argument("--browse-files", type=int, metavar="N",
                   help="files in the tree of the browse phase (default 1,000,000; --quick 20,000)")
    p.add_argument("--browse-dir-entries", type=int, metavar="N",
                   help="entries of the one big directory of the browse phase (default 100,000)")
    p.add_argument("--history-files", type=lambda t: [int(x) for x in t.split(",")], metavar="N[,N...]",
                   help="tree sizes of the restore part of the history phase (default 100,000)")
    p.add_argument("--pgbench-seconds", type=int, metavar="S",
                   help="seconds per side of the pgbench phase (extras phase pgbench; "
                        "seedpg: of its native run)")
    p.add_argument("--pgbench-pairs", type=int, metavar="N", help="native/fusejournal pairs of pgbench")
    p.add_argument("--seedpg-files", type=int, metavar="N",
                   help="files of 1 MiB beside the database in the tree seeded (extras phase seedpg)")
    p.add_argument("--setfattr-sizes", metavar="SIZES",
                   help="pending sizes of the halt/setfattr phase, e.g. 1M,1G,10Gx1 (xN: repeats, "
                        "default 3); default: the mode's own")
    p.add_argument("--scratch", default="/var/tmp", help="where backing directories go (default /var/tmp)")
    p.add_argument("--mount-timeout", type=float, default=60.0)
    p.add_argument("--umount-timeout", type=float, default=300.0)
    p.add_argument("--fusejournal-cmd", metavar="CMD",
                   help="command line of the fusejournal CLI (default: python -m fusejournal.cli from "
                        "this checkout, else .venv/bin/fusejournal)")
    p.add_argument("--render", metavar="RESULTS.json", help="only re-render from a results file")
    args = p.parse_args(argv)
    args.command_line = "python bench/run.py" + "".join(" " + shlex.quote(a) for a in
                                                       (argv if argv is not None else sys.argv[1:]))

    out_md = Path(args.out) if args.out else (HERE / "results" / "smoke.md" if args.smoke
                                              else REPO / "docs" / "performance.md")
    charts_dir = Path(args.charts_dir) if args.charts_dir else out_md.parent / "perf"

    if args.render:
        import json
        render(json.loads(Path(args.render).read_text()), out_md, charts_dir)
        return 0

    if args.fusejournal_cmd:
        os.environ["FJBENCH_FUSEJOURNAL"] = args.fusejournal_cmd
    if os.geteuid() != 0:
        log("warning: not root: drop_caches and FUSE mounts will likely fail")
    sizes = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.group_checkpoints is not None or args.group_rate is not None:
        sizes = dataclasses.replace(
            sizes, group_checkpoints=max(1, args.group_checkpoints or sizes.group_checkpoints),
            group_rate=sizes.group_rate if args.group_rate is None else max(0.0, args.group_rate))
    if args.setfattr_sizes:
        pending = fjextras.parse_sizes(args.setfattr_sizes)
        sizes = dataclasses.replace(sizes, halt_pending=pending,
                                    timeout=max(sizes.timeout, 600 + max(b for b, _ in pending) / 20e6))
    default_targets = "native,fusejournal" if args.smoke else None
    targets_sel = parse_list(args.targets or default_targets, TARGET_KEYS, TARGET_ALIASES, "target")
    workloads_sel = parse_list(args.workloads, ALL_WORKLOADS, {"extras": EXTRAS}, "workload")
    if args.smoke and args.umount_timeout == 300.0:
        args.umount_timeout = 60.0

    out_json = HERE / "results" / f"{sizes.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    # a SIGTERM/SIGINT must still unmount everything (atexit teardown in targets)
    def on_term(*_):
        log("terminated: unmounting and cleaning up")
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    log(f"{sizes.name} run: targets {','.join(targets_sel)}; workloads {','.join(workloads_sel)}; "
        f"raw results -> {out_json}")
    results = run_benchmark(args, sizes, targets_sel, workloads_sel, out_json)
    render(results, out_md, charts_dir)

    failed = [r for r in results["runs"] if r.get("error")]
    ex = results.get("fj_extras") or {}
    ex_failed = [k for k, v in ex.items() if isinstance(v, dict) and v.get("error")] + (
        ["fj_extras"] if ex.get("error") else [])
    ok = len(results["runs"]) - len(failed) + sum(
        1 for k, v in ex.items() if isinstance(v, dict) and not v.get("error"))
    print(f"bench: {ok} passed, {len(failed) + len(ex_failed)} failed")
    if args.smoke and (failed or ex_failed):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
