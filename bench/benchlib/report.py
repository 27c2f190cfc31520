"""Turn a results JSON into docs/performance.md and PNG charts."""

from __future__ import annotations

import os
from math import floor, log10
from pathlib import Path

from . import pgbench, seedpgbench
from .util import MiB, median, short
from .workloads import METRIC, METRICS, WORKLOAD_METRICS

LABELS = {"native": "native", "passthrough": "reference passthrough", "fusejournal": "fusejournal",
          "fusejournal_ckpt": "fusejournal + checkpoint/1s"}
SHORT = {"native": "native", "passthrough": "passthrough", "fusejournal": "fj",
         "fusejournal_ckpt": "fj+ckpt"}
FJ_TARGETS = ("fusejournal", "fusejournal_ckpt")


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 10 ** digits:
        return f"{v:,.0f}"
    decimals = max(0, digits - 1 - floor(log10(a)))
    return f"{v:.{decimals}f}"


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    n = int(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:g} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------- aggregation


def summarize(results: dict) -> dict:
    """{metric: {target: {"median", "values", "n", "rounds", "error"}}}"""
    targets = results["meta"]["targets"]
    out: dict = {}
    for w in results["meta"]["workloads"]:
        for mkey in WORKLOAD_METRICS.get(w, []):
            row = out.setdefault(mkey, {})
            for t in targets:
                runs = [r for r in results["runs"] if r["workload"] == w and r["target"] == t]
                vals = [r["metrics"][mkey] for r in runs if r.get("metrics", {}).get(mkey) is not None]
                errs = [r["error"] for r in runs if r.get("error")]
                row[t] = {"median": median(vals), "values": vals, "n": len(vals), "rounds": len(runs),
                          "error": errs[0] if errs else None}
    return out


def rel(summary: dict, mkey: str, t: str, base: str):
    """Relative speed of t over base (> 1: t is faster); time metrics inverted."""
    a = summary.get(mkey, {}).get(t, {}).get("median")
    b = summary.get(mkey, {}).get(base, {}).get("median")
    if not a or not b:
        return None
    return a / b if METRIC[mkey].higher_is_better else b / a


def cell(entry: dict | None) -> str:
    if not entry:
        return "–"
    if entry["median"] is None:
        return "failed: " + short(entry["error"] or "no result", 90).replace("|", "/")
    s = fmt(entry["median"])
    if entry["n"] < entry["rounds"]:
        s += f" ({entry['n']}/{entry['rounds']} ok)"
    return s


def verdict(ok) -> str:
    if ok == "failed":
        return "**failed**"
    return "–" if ok is None else ("met" if ok else "**missed**")


# --------------------------------------------------------------------------- goals


def goal_rows(results: dict, summary: dict) -> list[list[str]]:
    """The issue's targets, one row each: [row, goal, fj value, fj verdict,
    fj+ckpt value, fj+ckpt verdict]."""
    targets = [t for t in FJ_TARGETS if t in results["meta"]["targets"]]
    have_pt = "passthrough" in results["meta"]["targets"]
    rows = []

    def add(name, goal, values_ok):
        r = [name, goal]
        for t in FJ_TARGETS:
            if t in targets and t in values_ok:
                v, ok = values_ok[t]
                r += [v, verdict(ok)]
            else:
                r += ["–", "–"]
        rows.append(r)

    def ratio_cells(mkey, base, goal):
        vals = {}
        for t in targets:
            x = rel(summary, mkey, t, base)
            if x is not None:
                vals[t] = (fmt(x), x >= goal)
            elif summary[mkey].get(t, {}).get("median") is None:
                vals[t] = ("failed", "failed")
            else:
                vals[t] = (f"n/a ({SHORT.get(base, base)} failed)", None)
        return vals

    for m in METRICS:
        if m.key not in summary:
            continue
        if m.goal is not None and "native" in results["meta"]["targets"]:
            add(f"{m.label}: vs native", m.goal_text, ratio_cells(m.key, "native", m.goal))
        if have_pt:
            add(f"{m.label}: vs reference passthrough", ">= 1.0 x passthrough",
                ratio_cells(m.key, "passthrough", 1.0))

    ex = results.get("fj_extras") or {}
    halt = ex.get("halt") or {}
    for ps in halt.get("per_size", []):
        p99 = ps.get("halt_p99_ms")
        add(f"halt p99, {fmt_bytes(ps['pending'])} pending (n={ps['n']})", "<= 1 ms",
            {"fusejournal": (fmt(p99) + " ms" if p99 is not None else "n/a",
                             None if p99 is None else p99 <= 1.0)})
    for ps in halt.get("per_size", []):
        v, lim = ps.get("setfattr_p50_ms"), ps.get("setfattr_allowance_ms")
        add(f"setfattr return, {fmt_bytes(ps['pending'])} pending (median)",
            f"<= 20 ms + compress@300MB/s + fsync = {fmt(lim)} ms",
            {"fusejournal": (fmt(v) + " ms" if v is not None else "n/a",
                             None if v is None or lim is None else v <= lim)})
    rss = [ps for ps in halt.get("per_size", []) if ps.get("daemon_peak_rss_mib") is not None]
    if rss:
        v = rss[-1]["daemon_peak_rss_mib"]
        add(f"daemon peak RSS through {fmt_bytes(rss[-1]['pending'])} pending", "<= memory limit + 64 MiB = 128 MiB",
            {"fusejournal": (fmt(v) + " MiB", v <= 128)})
    comp = ex.get("compress") or {}
    if "text_mb_s" in comp:
        for kind in ("text", "random"):
            v = comp.get(f"{kind}_mb_s")
            add(f"lz4 compress speed, {kind} data", ">= 300 MB/s",
                {"fusejournal": (fmt(v) + " MB/s", v >= 300)})
    if halt.get("per_size"):
        big = halt["per_size"][-1]
        v = big.get("apply_mb_s")
        add(f"apply to shadow, {fmt_bytes(big['pending'])} batch (median)", ">= 200 MB/s",
            {"fusejournal": (fmt(v) + " MB/s" if v is not None else "n/a", None if v is None else v >= 200)})
    lr = ex.get("log_ratio") or {}
    if "text" in lr:
        v = lr["text"]["ratio"]
        add("log stored / written, text-like data", "<= 0.5", {"fusejournal": (fmt(v), v <= 0.5)})
    grp = (ex.get("group") or {}).get("summary") or {}
    g, one = grp.get("group") or {}, grp.get("single") or {}
    if g.get("halt_p99_ms") is not None:
        v = g["halt_p99_ms"]
        add(f"4-member group halt p99, under write load (n={g['n']})", "<= 50 ms (array consistency groups)",
            {"fusejournal": (fmt(v) + " ms", v <= 50.0)})
    if one.get("halt_p99_ms") is not None:
        v = one["halt_p99_ms"]
        add(f"single-tree halt p99, same load (n={one['n']})", "<= 1 ms",
            {"fusejournal": (fmt(v) + " ms", v <= 1.0)})
    for name in ("halt", "log_ratio", "cpu_rss", "compress", "group"):
        if (ex.get(name) or {}).get("error"):
            add(f"extras: {name}", "–", {"fusejournal": ("failed: " + short(ex[name]["error"], 90), "failed")})
    if ex.get("error"):
        add("fusejournal-only measurements", "–",
            {"fusejournal": ("failed: " + short(ex["error"], 90), "failed")})
    return rows


# --------------------------------------------------------------------------- markdown


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c).replace("\n", " ").replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(results: dict, charts: list[tuple[str, str]], out: Path) -> str:
    meta = results["meta"]
    summary = summarize(results)
    targets = meta["targets"]
    mi = meta.get("machine", {})
    sz = meta.get("sizes", {})
    L: list[str] = []
    L.append("# Performance")
    L.append("")
    L.append("Generated by `bench/run.py` (issue 4); do not edit by hand — rerun the command below. "
             "`python bench/run.py --quick` checks the harness in under 2 minutes.")
    if meta.get("mode") != "full":
        L.append("")
        L.append(f"> **{meta.get('mode')} mode**: tiny sizes and one round — a check of the harness, "
                 "not numbers to quote. The full run is `python bench/run.py`.")
    L.append("")
    L.append("```")
    L.append(meta.get("command", ""))
    L.append("```")
    L.append("")
    L.append(f"Run {meta.get('started', '?')} to {meta.get('finished', '?')} "
             f"({(meta.get('elapsed_s') or 0) / 60:.1f} min); {meta.get('rounds')} round(s), targets "
             f"interleaved within each workload ({' → '.join(SHORT.get(t, t) for t in targets)}, repeated "
             "each round), median of the rounds.")
    for note in meta.get("notes") or []:
        L.append("")
        L.append(f"> **Note:** {note}")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append(f"- nproc: {mi.get('nproc')}; memory: {mi.get('memory_gib')} GiB")
    L.append(f"- kernel: {mi.get('kernel')}")
    L.append(f"- CPU: {mi.get('cpu')}")
    L.append(f"- disk: {mi.get('disk')} ({mi.get('disk_free_gib')} GiB free); every target's backing "
             "directories are fresh directories under the same scratch directory "
             f"(`{meta.get('scratch')}`)")
    L.append(f"- {mi.get('fio')}, {mi.get('dbench')}, Python {mi.get('python')}, pyfuse3 {meta.get('pyfuse3', '?')}")
    if meta.get("passthroughfs"):
        L.append(f"- reference passthrough: {meta['passthroughfs']}")
    if meta.get("fusejournal_commit"):
        L.append(f"- fusejournal: commit {meta['fusejournal_commit']}")
    L.append("")
    bad = {k: v for k, v in (meta.get("probe") or {}).items() if v}
    if bad:
        L.append("Targets that could not run: " + "; ".join(f"**{k}**: {short(v, 200)}" for k, v in bad.items()))
        L.append("")

    # medians
    L.append("## Medians")
    L.append("")
    L.append(f"Sizes: fio files {fmt_bytes(sz.get('fio_bytes'))}; random writes: "
             f"{fmt_bytes(sz.get('rand_io_bytes'))} of 4 KiB writes over such a file; {sz.get('files')} "
             f"small files; dbench {sz.get('dbench_seconds')} s.")
    L.append("")
    hdr = ["workload", "unit"] + [LABELS.get(t, t) for t in targets]
    rows = [[m.label, m.unit] + [cell(summary[m.key].get(t)) for t in targets]
            for m in METRICS if m.key in summary]
    L.append(table(hdr, rows, "ll" + "r" * len(targets)))
    L.append("")

    # ratios
    pairs = [(t, "native") for t in targets if t != "native" and "native" in targets]
    if "passthrough" in targets:
        pairs += [(t, "passthrough") for t in FJ_TARGETS if t in targets]
    if pairs:
        L.append("## Ratios")
        L.append("")
        L.append("Relative speed, higher is better: throughput ÷ throughput, or for the listing "
                 "(a time) baseline time ÷ target time. 1.0 = as fast as the baseline.")
        L.append("")
        hdr = ["workload"] + [f"{SHORT[a]} / {SHORT[b]}" for a, b in pairs]
        rows = [[m.label] + [fmt(rel(summary, m.key, a, b)) for a, b in pairs]
                for m in METRICS if m.key in summary]
        L.append(table(hdr, rows))
        L.append("")

    # goals
    if any(t in targets for t in FJ_TARGETS):
        grows = goal_rows(results, summary)
        if grows:
            L.append("## Targets of issue 4")
            L.append("")
            L.append("Ratios are relative speeds as above. The fusejournal-only rows are measured on "
                     "target 3 (no background checkpoints); see the sections below.")
            L.append("")
            L.append(table(["row", "target", "fusejournal", "", "fj + checkpoint/1s", ""], grows, "llrlrl"))
            L.append("")
            cnt = {k: sum(1 for r in grows for c in (r[3], r[5]) if c == v)
                   for k, v in (("met", "met"), ("missed", "**missed**"), ("failed", "**failed**"))}
            L.append(f"{cnt['met']} met, {cnt['missed']} missed" +
                     (f", {cnt['failed']} could not be measured (failed)." if cnt["failed"] else "."))
            L.append("")

    render_extras(L, results)

    # CPU of the daemons during the interleaved write tests
    cpu_rows = []
    for w in ("seqwrite_1m", "seqwrite_4k", "randwrite_4k"):
        if w not in meta["workloads"]:
            continue
        r = [METRIC[w].label]
        for t in targets:
            vals = [x["extra"].get("daemon_cpu_s_per_gib") for x in results["runs"]
                    if x["workload"] == w and x["target"] == t and x.get("extra")]
            r.append(fmt(median(vals)))
        cpu_rows.append(r)
    if cpu_rows and any(t != "native" for t in targets):
        L.append("### Daemon CPU seconds per GiB written, interleaved write tests")
        L.append("")
        L.append(table(["workload"] + [LABELS.get(t, t) for t in targets], cpu_rows))
        L.append("")

    ck_rows = []
    if "fusejournal_ckpt" in targets:
        for w in meta["workloads"]:
            xs = [x["extra"] for x in results["runs"] if x["workload"] == w
                  and x["target"] == "fusejournal_ckpt" and x.get("extra") and "checkpoints" in x["extra"]]
            if xs:
                ck_rows.append([w, fmt(median([x["checkpoints"] for x in xs])),
                                fmt(median([x.get("setfattr_p50_ms") for x in xs])),
                                fmt(max((x.get("setfattr_max_ms") or 0) for x in xs)),
                                fmt(max(x.get("shadow_lag_max_checkpoints", 0) for x in xs)),
                                short("; ".join(f for x in xs for f in x.get("checkpoint_failures", [])), 120)
                                or "–"])
    if ck_rows:
        L.append("### Background checkpoints of target 4")
        L.append("")
        L.append("Per measurement (whole mount lifetime, set-up included): checkpoints taken by the "
                 "1 s setfattr thread, setfattr wall time (including exec-ing setfattr), and the most "
                 "checkpoints the shadow was seen behind (read right after each setfattr).")
        L.append("")
        L.append(table(["workload", "checkpoints (median)", "setfattr p50 ms", "setfattr max ms",
                        "max shadow lag (checkpoints)", "failures"], ck_rows, "lrrrrl"))
        L.append("")

    # The hand-written analysis of the misses (profiles, design changes) lives beside the
    # generated page and is included, so a re-run keeps it.
    # docs/performance-groups.md likewise: the consistency-group numbers (issue 9), by hand;
    # docs/performance-browse.md: the browse mount at scale (issue 10);
    # docs/performance-updater.md: the updater in its own process (issue 11);
    # docs/performance-seedpg.md: pgbench during an online seed (issue 12).
    for name in ("performance-analysis.md", "performance-groups.md", "performance-browse.md",
                 "performance-seedpg.md", "performance-updater.md", "performance-seeding.md",
                 "performance-history.md"):
        analysis = out.resolve().parent / name
        if analysis.exists() and results.get("meta", {}).get("mode") == "full":
            L.append(analysis.read_text().rstrip())
            L.append("")

    if charts:
        L.append("## Charts")
        L.append("")
        for title, path in charts:
            relp = os.path.relpath(path, out.resolve().parent)
            L.append(f"![{title}]({relp})")
            L.append("")

    L.append("## Method")
    L.append("")
    L.extend(METHOD)
    L.append("")
    fails = [r for r in results["runs"] if r.get("error")]
    if fails:
        L.append("## Failures")
        L.append("")
        for r in fails[:40]:
            L.append(f"- round {r['round'] + 1}, {r['workload']}, {r['target']}: {short(r['error'], 300)}")
        if len(fails) > 40:
            L.append(f"- … and {len(fails) - 40} more (see the results JSON)")
        L.append("")
    return "\n".join(L) + "\n"


def render_extras(L: list[str], results: dict) -> None:
    ex = results.get("fj_extras")
    if not ex:
        return
    L.append("## fusejournal only")
    L.append("")
    if ex.get("error"):
        L.append(f"failed: {ex['error']}")
        L.append("")
        return
    halt = ex.get("halt") or {}
    if halt.get("error"):
        L.append(f"Halt / setfattr / updater: failed: {halt['error']}")
        L.append("")
    elif halt.get("per_size"):
        L.append("### Halt, setfattr, updater")
        L.append("")
        L.append("Write N bytes of random data (1 MiB writes, no fsync) so they are pending in the "
                 "temporary store, then `setxattr(user.fusejournal.update_permission)` on the mount root "
                 "(the call setfattr makes), timed until it returns; the halt is `last_halt_ns` from "
                 "`fusejournal status --json`. Then `fusejournal wait --checkpoint N` is started while "
                 "`user.fusejournal.shadow_checkpoint` is polled every 2 ms: shadow lag = setxattr return "
                 "→ shadow at N; apply MB/s = pending bytes / lag; \"wait returns\" = when the `wait` "
                 f"command returned (includes its own start-up, {fmt(halt.get('cli_overhead_s'))} s, and "
                 "its 50 ms polling). The setfattr allowance is 20 ms + N / 300 MB/s + the time "
                 "fdatasync of N fresh bytes takes on the native disk. Apply speed means something for "
                 "the large batches only.")
        L.append("")
        rows = []
        for ps in halt["per_size"]:
            rows.append([fmt_bytes(ps["pending"]), ps["n"], fmt(ps["halt_p50_ms"]), fmt(ps["halt_p99_ms"]),
                         fmt(ps["halt_max_ms"]), fmt(ps["setfattr_p50_ms"]), fmt(ps["setfattr_max_ms"]),
                         fmt(ps["setfattr_allowance_ms"]), fmt(ps["apply_mb_s"]), fmt(ps["lag_p50_s"]),
                         fmt(ps["lag_max_s"]), fmt(ps.get("wait_p50_s")),
                         fmt(ps.get("daemon_peak_rss_mib"))])
        L.append(table(["pending", "n", "halt p50 ms", "halt p99 ms", "halt max ms", "setfattr p50 ms",
                        "setfattr max ms", "allowance ms", "apply MB/s", "lag p50 s", "lag max s",
                        "wait returns p50 s", "daemon peak RSS MiB"], rows))
        L.append("")
        L.append("Daemon peak RSS: VmHWM of the daemon since the mount (reset at the start), read after "
                 "each checkpoint, so the peak through that pending size and the smaller ones before it; "
                 "the daemon's `--memory-limit` is 64 MiB.")
        L.append("")
    comp = ex.get("compress") or {}
    if comp.get("error"):
        L.append(f"Compression speed: failed: {comp['error']}")
        L.append("")
    elif comp:
        L.append(f"Compression ({comp.get('function')}, 8 MiB blocks, in-process): text-like "
                 f"{fmt(comp.get('text_mb_s'))} MB/s (ratio {fmt(comp.get('text_ratio'))}), random "
                 f"{fmt(comp.get('random_mb_s'))} MB/s (ratio {fmt(comp.get('random_ratio'))}).")
        L.append("")
    lr = ex.get("log_ratio") or {}
    if lr.get("error"):
        L.append(f"Log size: failed: {lr['error']}")
        L.append("")
    elif lr:
        L.append("### Log bytes stored vs bytes written")
        L.append("")
        rows = [[k, fmt_bytes(v["written"]), fmt_bytes(v["stored"]), fmt(v["ratio"]), v["source"]]
                for k, v in lr.items() if isinstance(v, dict)]
        L.append(table(["data", "written", "stored in log", "stored / written", "measured by"], rows,
                       "lrrrl"))
        L.append("")
        L.append("Text-like data: an application log, 70% plain lines and 30% JSON lines with varying "
                 "timestamps, ids and numbers (`bench/benchlib/fjextras.py:text_block`); random data: "
                 "os.urandom. Each on a fresh mount, one checkpoint, sizes from that checkpoint's marker.")
        L.append("")
    render_group(L, ex.get("group") or {})
    pgbench.render_markdown(L, ex.get("pgbench") or {}, fmt)
    seedpgbench.render_markdown(L, ex.get("seedpg") or {}, fmt)
    cr = ex.get("cpu_rss") or {}
    if cr.get("error"):
        L.append(f"CPU / RSS: failed: {cr['error']}")
        L.append("")
    elif cr:
        L.append("### Daemon CPU and memory per GiB written")
        L.append("")
        L.append(f"{fmt_bytes(cr['written_bytes'])} of random data in 1 MiB writes "
                 f"({fmt(cr['write_mb_s'])} MB/s), one checkpoint, until the shadow has applied it. "
                 "CPU = utime + stime of the daemon (/proc/PID/stat, 10 ms ticks), peak RSS = VmHWM "
                 "(reset after mount).")
        L.append("")
        rows = [["CPU s / GiB, writing", fmt(cr["cpu_s_write_per_gib"])],
                ["CPU s / GiB, checkpoint (compress + log append)", fmt(cr["cpu_s_checkpoint_per_gib"])],
                ["CPU s / GiB, applying to the shadow", fmt(cr["cpu_s_apply_per_gib"])],
                ["CPU s / GiB, total", fmt(cr["cpu_s_per_gib"])],
                ["RSS after mount, MiB", fmt(cr["rss_after_mount_mib"])],
                ["peak RSS, MiB", fmt(cr["peak_rss_mib"])],
                ["peak RSS growth over post-mount RSS, MiB per GiB written",
                 fmt(cr.get("rss_growth_mib_per_gib"))]]
        L.append(table(["", "value"], rows))
        L.append("")


def render_group(L: list[str], grp: dict) -> None:
    """The consistency-group phase (bench/benchlib/groupbench.py)."""
    if not grp:
        return
    summ = grp.get("summary")
    if grp.get("error"):
        L.append(f"Consistency group: failed: {grp['error']}")
        L.append("")
    if not summ:
        return
    cfg = grp.get("config") or {}
    L.append("### Consistency group (4 members) vs single tree, same write load")
    L.append("")
    rate = cfg.get("writer_rate_ops_s")
    load = (f"{cfg.get('writers')} writer processes at {fmt(rate)} operations/s each (4 KiB pwrites at "
            "random offsets of a 4 MiB file; 1 in 16 a 4 KiB small-file create and an unlink): one per "
            "member in the group, one per subdirectory in the single tree" if rate else "no writers (idle)")
    L.append(f"Group: {', '.join(cfg.get('members') or [])}, mounted in place by `fusejournal mount --group "
             "FILE` (a coordinator and one daemon per member; journals and shadows on the disk). Single tree: "
             f"one `fusejournal mount` on the disk. Load: {load}. "
             f"{cfg.get('checkpoints')} recorded checkpoints of each (plus {cfg.get('warmup_per_block')} "
             f"warm-up per block), one every {fmt(cfg.get('interval_s'))} s, in {cfg.get('blocks')} "
             "alternating block(s) single → group. setfattr = `setxattr(user.fusejournal.update_permission)` "
             "on a mount root (for the group, each member's in turn) until it returns: durable on every "
             "member and committed. Halt: single tree, `last_halt_ns` of its status; group, the commit "
             "line's `halt_ns` (`fusejournal log --group FILE --json`; `status --group` shows it): the "
             "longest any member held its operations for its cut. \"Cut spread\" is the commit line's "
             "`cut_spread_ns`: from the group's epoch moving to the last member's cut (holds nobody).")
    L.append("")
    for note in cfg.get("notes") or []:
        L.append(f"> **Note:** {note}")
        L.append("")
    cols = [k for k in ("single", "group") if summ.get(k)]
    names = {"single": "single tree", "group": "4-member group"}

    def ms(k, key):
        return fmt(summ[k].get(key))
    rows = [
        ["checkpoints recorded"] + [str(summ[k]["n"]) for k in cols],
        ["halt p50 ms"] + [ms(k, "halt_p50_ms") for k in cols],
        ["halt p99 ms"] + [ms(k, "halt_p99_ms") for k in cols],
        ["halt max ms"] + [ms(k, "halt_max_ms") for k in cols],
        ["longest member gate p50 / p99 ms"] + [
            "–" if k == "single" else f"{ms(k, 'member_gate_p50_ms')} / {ms(k, 'member_gate_p99_ms')}"
            for k in cols],
        ["cut spread p50 / p99 ms"] + [
            "–" if k == "single" else f"{ms(k, 'cut_spread_p50_ms')} / {ms(k, 'cut_spread_p99_ms')}"
            for k in cols],
        ["setfattr p50 ms"] + [ms(k, "setfattr_p50_ms") for k in cols],
        ["setfattr p99 ms"] + [ms(k, "setfattr_p99_ms") for k in cols],
        ["setfattr max ms"] + [ms(k, "setfattr_max_ms") for k in cols],
        ["pending per checkpoint (p50)"] + [
            f"{fmt_bytes(summ[k].get('pending_bytes_p50'))}, {summ[k].get('pending_operations_p50') or 0:.0f} ops"
            for k in cols],
        ["writers: operations/s, all together"] + [ms(k, "writer_ops_per_s") for k in cols],
        ["writers: worst p99 / max op latency ms"] + [
            f"{ms(k, 'writer_lat_p99_ms_max')} / {ms(k, 'writer_lat_max_ms')}" for k in cols],
        ["machine CPU busy, cores (ours / others)"] + [
            f"{ms(k, 'machine_busy_cores')} ({ms(k, 'ours_cores')} / {ms(k, 'others_cores')})" for k in cols],
        ["load average (1 min)"] + [ms(k, "loadavg_1m") for k in cols],
        ["failed checkpoints"] + [str(len(summ[k].get("failures") or [])) for k in cols],
    ]
    L.append(table([""] + [names[k] for k in cols], rows))
    L.append("")
    st = [b.get("status") for b in grp.get("group") or [] if b.get("status")]
    if st:
        s0 = st[-1]
        p99 = s0.get("group_halt_p99_ns")
        L.append(f"`fusejournal status --group --json` at the end of the last block: "
                 f"{s0.get('group_halts')} group halts in the coordinator's history (warm-up included), p99 "
                 f"{fmt(p99 / 1e6 if isinstance(p99, int) else None)} ms, {s0.get('group_failed')} failed.")
        L.append("")


METHOD = [
    "- Targets: 1 native = a plain directory; 2 reference passthrough = pyfuse3's own unmodified "
    "`examples/passthroughfs.py` from the sdist of the installed pyfuse3 (`python passthroughfs.py "
    "SOURCE MOUNTPOINT`, default options); 3 fusejournal = `fusejournal mount SOURCE MOUNTPOINT --journal "
    "DIR --shadow DIR`, no checkpoint during the run; 4 = the same with a thread running `setfattr -n "
    "user.fusejournal.update_permission` on the mount root every second while mounted.",
    "- Every measurement gets fresh backing directories and a fresh mount, torn down afterwards: "
    "passthroughfs by `fusermount3 -u -z` and waiting for its process; fusejournal by `fusermount3 -u` and "
    "waiting for the daemon to exit (what `fusejournal umount` does), then a lazy unmount and a kill "
    "if that failed.",
    "- `sync; echo 3 > /proc/sys/vm/drop_caches` right before every timed part.",
    "- fio: 1 job, psync, `--fallocate=none`; write jobs use `--end_fsync=1`, and because a daemon may "
    "answer fsync with ENOSYS (the reference passthrough does: pyfuse3's default, after which the kernel "
    "makes fsync a no-op) the time of a `syncfs()` of the backing filesystem right after fio is added to "
    "fio's runtime: MB/s = bytes / (fio runtime + syncfs). Read tests read a file laid out (untimed, "
    "1 MiB writes + fsync) through the same target; the random-write test overwrites such a file.",
    "- Small files (in a child process, `bench/benchlib/smallfile_worker.py`): create + write 4 KiB + "
    "close for every file, then sync(); stat all (warm); `os.scandir` of the directory reading names and "
    "d_type only (like `ls -f`); drop caches, stat all (cold); unlink all.",
    "- dbench: `dbench -D DIR -t SECONDS -c /usr/share/dbench/client.txt 4`, its final "
    "\"Throughput X MB/sec\".",
    "- A target that fails to mount, or a workload that fails or times out, shows as \"failed: reason\"; "
    "a target that fails to mount twice in a row is skipped for the rest of the run.",
    "- Raw per-round numbers: `bench/results/*.json` (not committed); `python bench/run.py --render "
    "FILE.json` re-renders this page and the charts from one.",
]


# --------------------------------------------------------------------------- charts


COLORS = {"native": "#4c72b0", "passthrough": "#dd8452", "fusejournal": "#55a868",
          "fusejournal_ckpt": "#8172b3"}


def render_charts(results: dict, outdir: Path) -> list[tuple[str, str]]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    outdir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    targets = results["meta"]["targets"]
    charts = []
    mode = results["meta"].get("mode")
    suffix = "" if mode == "full" else f" ({mode} mode)"

    # 1. relative speed vs native, with fusejournal's goals
    rows = [m for m in METRICS if m.key in summary]
    others = [t for t in targets if t != "native"]
    if rows and others and "native" in targets:
        fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) * max(1, len(others)) / 1.5 + 2))
        h = 0.8 / len(others)
        for i, t in enumerate(others):
            ys = [j + (i - (len(others) - 1) / 2) * h for j in range(len(rows))]
            xs = [rel(summary, m.key, t, "native") or 0 for m in rows]
            ax.barh(ys, xs, height=h, label=LABELS[t], color=COLORS.get(t))
        for j, m in enumerate(rows):
            if m.goal is not None:
                ax.plot([m.goal, m.goal], [j - 0.45, j + 0.45], color="red", lw=2)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([m.label for m in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("relative speed vs native (log scale; red tick = fusejournal's target)")
        ax.set_title("Relative speed vs native" + suffix)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        p = outdir / "relative.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        charts.append(("Relative speed vs native", str(p)))

    # 2. absolute medians with min/max over rounds
    if rows:
        n = len(rows)
        cols = 4
        nrows = (n + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
        for k, m in enumerate(rows):
            ax = axes[k // cols][k % cols]
            meds, lo, hi, cols_ = [], [], [], []
            for t in targets:
                e = summary[m.key].get(t) or {}
                v = e.get("median") or 0
                vals = e.get("values") or [0]
                meds.append(v)
                lo.append(max(0, v - min(vals)))
                hi.append(max(0, max(vals) - v))
                cols_.append(COLORS.get(t))
            ax.bar(range(len(targets)), meds, yerr=[lo, hi], color=cols_, capsize=3)
            ax.set_xticks(range(len(targets)))
            ax.set_xticklabels([SHORT[t] for t in targets], fontsize=7, rotation=20)
            ax.set_title(f"{m.label}\n{m.unit}", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
        for k in range(n, nrows * cols):
            axes[k // cols][k % cols].axis("off")
        fig.suptitle("Medians (error bars: min–max over rounds)" + suffix, fontsize=10)
        fig.tight_layout()
        p = outdir / "absolute.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        charts.append(("Medians per workload", str(p)))

    ex = results.get("fj_extras") or {}
    halt = ex.get("halt") or {}
    if halt.get("per_size"):
        ps = halt["per_size"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        x = [p_["pending"] / MiB for p_ in ps]
        for key, lab in (("halt_p50_ms", "p50"), ("halt_p99_ms", "p99"), ("halt_max_ms", "max")):
            a1.plot(x, [p_[key] for p_ in ps], marker="o", label=lab)
        a1.axhline(1.0, color="red", lw=1, ls="--", label="target 1 ms")
        a1.set_xscale("log")
        a1.set_yscale("log")
        a1.set_xlabel("pending MiB")
        a1.set_ylabel("halt ms")
        a1.set_title("Halt duration vs pending bytes" + suffix, fontsize=9)
        a1.legend(fontsize=8)
        sm = halt.get("samples") or []
        a2.scatter([s_["pending_bytes"] / MiB for s_ in sm], [s_["setfattr_ms"] for s_ in sm], s=12,
                   label="setfattr return")
        a2.plot(x, [p_["setfattr_allowance_ms"] for p_ in ps], color="red", ls="--",
                label="allowance: 20 ms + compress@300MB/s + fsync")
        a2.set_xscale("log")
        a2.set_yscale("log")
        a2.set_xlabel("pending MiB")
        a2.set_ylabel("ms")
        a2.set_title("setfattr return time vs pending bytes" + suffix, fontsize=9)
        a2.legend(fontsize=8)
        fig.tight_layout()
        p = outdir / "halt_setfattr.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        charts.append(("Halt and setfattr vs pending bytes", str(p)))

    grp = ex.get("group") or {}
    if grp.get("summary"):
        series = {k: [s_ for b in grp.get(k) or [] for s_ in b.get("samples") or []] for k in ("single", "group")}
        if any(series.values()):
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
            names = {"single": "single tree", "group": "4-member group"}
            for k, col in (("single", COLORS["fusejournal"]), ("group", "#c44e52")):
                for ax, key in ((a1, "halt_ms"), (a2, "setfattr_ms")):
                    vals = sorted(v[key] for v in series[k] if v.get(key) is not None)
                    if vals:
                        ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], drawstyle="steps-post",
                                color=col, label=f"{names[k]} (n={len(vals)})")
            a1.axvline(50.0, color="red", lw=1, ls="--", label="50 ms (array consistency groups)")
            for ax, what in ((a1, "halt"), (a2, "setfattr return")):
                ax.set_xscale("log")
                ax.set_xlabel(f"{what}, ms (log scale)")
                ax.set_ylabel("fraction of checkpoints")
                ax.set_title(f"{what}: 4-member group vs single tree{suffix}", fontsize=9)
                if ax is a1:     # between the single tree's tail (top) and the group's curve
                    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.2, 0.92))
                else:
                    ax.legend(fontsize=8, loc="lower right")
            fig.tight_layout()
            p = outdir / "group_halt.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            charts.append(("Consistency group vs single tree: halt and setfattr per checkpoint", str(p)))

    sm = halt.get("samples") or []
    if sm and max(s_["written"] for s_ in sm) >= 1 << 30:     # --setfattr-sizes up to GiBs
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.scatter([s_["written"] / (1 << 30) for s_ in sm], [s_["setfattr_ms"] / 1000 for s_ in sm], s=14,
                   label="setfattr return (each checkpoint)")
        ps = halt.get("per_size") or []
        ax.plot([p_["pending"] / (1 << 30) for p_ in ps], [p_["setfattr_allowance_ms"] / 1000 for p_ in ps],
                color="red", ls="--", label="allowance: 20 ms + compress@300MB/s + fsync")
        ax.set_xlabel("pending GiB (written since the previous checkpoint)")
        ax.set_ylabel("seconds")
        ax.set_title("setfattr against pending size" + suffix, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = outdir / "setfattr_pending.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        charts.append(("setfattr against pending size", str(p)))

    pg_chart = pgbench.render_chart(ex.get("pgbench") or {}, outdir, plt, suffix)
    if pg_chart:
        charts.append(pg_chart)
    sp_chart = seedpgbench.render_chart(ex.get("seedpg") or {}, outdir, plt, suffix)
    if sp_chart:
        charts.append(sp_chart)

    lr = ex.get("log_ratio") or {}
    if lr and not lr.get("error"):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        kinds = [k for k, v in lr.items() if isinstance(v, dict)]
        ax.bar(kinds, [lr[k]["ratio"] for k in kinds], color=["#55a868", "#c44e52"][: len(kinds)])
        ax.axhline(0.5, color="red", ls="--", lw=1, label="target for text: <= 0.5")
        ax.set_ylabel("log bytes stored / bytes written")
        ax.set_title("Log size" + suffix, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = outdir / "log_ratio.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        charts.append(("Log bytes stored vs written", str(p)))
    return charts
