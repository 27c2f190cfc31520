"""Retained checkpoints at scale (issue 10, "points in time are cheap", "scale"):
browsing an old checkpoint, the size of the history, restore of a big tree.

Part 1, ``browse`` (a tree of N files of S bytes: 1,000 x 1 MiB = 1 GiB in a
full run, half text-like, half random):

1. the tree is written natively, ``fusejournal mount`` seeds the shadow, a
   checkpoint (k1) is taken and waited for;
2. 50 text-like files are changed through the mount (10 each: overwrite of
   the second quarter, append of 64 KiB, truncate to a quarter, rename,
   unlink), a checkpoint (k2), wait; ``du`` of SHADOW/history before and
   after (``text``: the history this batch costs), then the same for 50 random
   files (k3, ``random``), then two more checkpoints of one overwrite each;
3. drop caches; ``fusejournal browse --checkpoint k1 MNT POINT``: seconds from
   the start of the command to its return (mounted), to the first listing of
   the root (``first_list_s``), to the end of reading a changed (overwritten)
   file of k1 (``first_read_s``); every kind of changed file is checked against
   its content at k1 (sha256); the browse daemon's RSS; ``view_open``: the
   view of k1 opened in a child process (history_view.TreeAt: seconds, and
   what it holds and peaks at under tracemalloc);
4. the same for ``fusejournal browse --all`` (the root, then k1's directory)
   and, for comparison, for the latest checkpoint (plain ``browse``).

Part 2, ``restore``, for each tree size (100,000 files in a full run; with
``--history-files`` several sizes, to see whether memory grows with the tree):
the tree of browsebench.make_tree (empty files, a tenth of them in ``big/``),
seeded, checkpoint k1, 100 files written, 100 unlinked, 100 created, checkpoint
k2, wait; then ``fusejournal restore --checkpoint k1 MNT DEST`` (wall time, CPU
seconds from wait4's rusage, and the restore process's VmHWM read from
/proc every 20 ms until it exits), DEST
checked (entry count, the changed/unlinked/created files as at k1); then
``fusejournal verify MNT`` measured the same way.

Numbers are noisy on a shared machine: the load average is recorded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from .browsebench import _daemon_of, _mib, _status_bytes, _stop, make_tree
from .targets import CONTROL_XATTR, SHADOW_XATTR, fusejournal_cli
from .util import BenchError, MiB, drop_caches, fuse_abort, log, rmtree, run_cmd, wait_mounted

#: (files, bytes per file) of the browse part; restore tree sizes
DEFAULT_BROWSE = {"full": (1_000, MiB), "quick": (200, 256 * 1024), "smoke": (100, 64 * 1024)}
DEFAULT_RESTORE = {"full": (100_000,), "quick": (5_000,), "smoke": (1_000,)}
PER_KIND = 10            # files per change kind and data type (5 kinds x 2 types = 100 files)
KINDS = ("overwrite", "append", "truncate", "rename", "unlink")


def du(path: Path) -> int:
    """Allocated bytes below path (st_blocks; a hard link counted once)."""
    total, seen = 0, set()
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _cli() -> tuple[list[str], dict]:
    """fusejournal_cli(), but allowed to cache bytecode: with PYTHONDONTWRITEBYTECODE set (as in
    some CI shells) every command compiles fusejournal's sources again, twice for browse (the
    command and its daemon), about a second on a busy machine that an installed package never
    pays."""
    cli, cenv = fusejournal_cli()
    cenv.pop("PYTHONDONTWRITEBYTECODE", None)
    return cli, cenv


def _checkpoint(cli, cenv, mnt: Path, label: str) -> int:
    """A checkpoint, waited for until the shadow holds it; its id."""
    os.setxattr(mnt, CONTROL_XATTR, label.encode())
    run_cmd(cli + ["wait", str(mnt), "--timeout", "3600"], timeout=3700, env=cenv)
    return int(os.getxattr(mnt, SHADOW_XATTR))


def _mount(cli, cenv, source: Path, mnt: Path, journal: Path, shadow: Path, log_path: Path) -> float:
    t0 = time.perf_counter()
    run_cmd(cli + ["mount", str(source), str(mnt), "--journal", str(journal), "--shadow", str(shadow),
                   "--keep-last", "100"],
            timeout=4 * 3600, env=cenv, stdout_path=log_path, on_timeout=lambda: fuse_abort(mnt))
    return time.perf_counter() - t0


def _sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _timed_child(cmd: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    """Run cmd; wall seconds, CPU seconds and peak RSS (VmHWM, polled)."""
    t0 = time.perf_counter()
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    hwm = 0
    while True:
        # VmHWM of the process itself (wait4's ru_maxrss would start from the bench's own RSS:
        # the kernel keeps the larger of the forking parent's peak and the exec'd program's)
        hwm = max(hwm, _status_bytes(proc.pid, "VmHWM") or 0)
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            raise BenchError(f"timeout after {timeout:.0f}s: {' '.join(cmd[-4:])}")
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd[-4:])} exited {proc.returncode}: "
                         f"{log_path.read_text(errors='replace')[-300:]}")
    return {"s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "hwm_mib": _mib(hwm)}


# --------------------------------------------------------------------------- part 1

def _make_files(source: Path, files: int, size: int) -> tuple[list[str], list[str]]:
    from .fjextras import text_block
    block = text_block(8 * MiB)
    text, rand = [], []
    for i in range(files):
        if i % 2 == 0:
            name = f"t{i:05d}"
            off = (i * 37 * 1024) % (len(block) - size)
            data = block[off:off + size]
            text.append(name)
        else:
            name = f"r{i:05d}"
            data = os.urandom(size)
            rand.append(name)
        (source / name).write_bytes(data)
    return text, rand


def _change(mnt: Path, names: list[str], size: int) -> dict:
    """PER_KIND files of names per kind; the bytes each kind destroyed (overwrote, cut, unlinked)
    and wrote; ``sample``: {the first file of each kind: its sha256 before the change}."""
    out: dict = {"destroyed": 0, "written": 0, "files": 0, "sample": {}}
    it = iter(names)
    for kind in KINDS:
        for j in range(PER_KIND):
            name = next(it)
            p = mnt / name
            if j == 0:
                out["sample"][name] = _sha(p)        # its content at the previous checkpoint
            if kind == "overwrite":
                with open(p, "r+b") as f:
                    f.seek(size // 4)
                    f.write(os.urandom(size // 4))
                out["destroyed"] += size // 4
                out["written"] += size // 4
            elif kind == "append":
                with open(p, "ab") as f:
                    f.write(os.urandom(64 * 1024))
                out["written"] += 64 * 1024
            elif kind == "truncate":
                os.truncate(p, size // 4)
                out["destroyed"] += size - size // 4
            elif kind == "rename":
                os.rename(p, mnt / (name + ".renamed"))
            else:
                os.unlink(p)
                out["destroyed"] += size
            out["files"] += 1
    return out


def _browse_daemon(point: Path) -> int | None:
    """The pid of the daemon serving the browse mount ``point``: its root answers
    ``user.fusejournal.pid`` (browse --checkpoint/--all fork their daemon from the command,
    whose command line has no --foreground for browsebench._daemon_of to find)."""
    try:
        return int(os.getxattr(point, b"user.fusejournal.pid"))
    except (OSError, ValueError):
        return _daemon_of(point)


def _browse_timed(cli, cenv, mnt: Path, point: Path, extra: list[str], sub: str | None,
                  check: dict[str, str], logp: Path) -> dict:
    """browse (with extra flags) from start to mounted, first listing of the root (and of sub),
    first read of the first file in check; every file of check compared; the daemon's RSS."""
    res: dict = {}
    drop_caches()
    pid = None
    t0 = time.perf_counter()
    try:
        run_cmd(cli + ["browse", *extra, str(mnt), str(point)], timeout=600, env=cenv, stdout_path=logp)
        wait_mounted(point, 60)
        res["mounted_s"] = round(time.perf_counter() - t0, 3)
        pid = _browse_daemon(point)
        root = os.listdir(point)
        res["first_list_s"] = round(time.perf_counter() - t0, 3)
        res["root_entries"] = len(root)
        top = point
        if sub is not None:
            cands = [n for n in root if n.split("-", 1)[0] == sub]
            if not cands:
                raise BenchError(f"browse --all: no directory for checkpoint {sub} in {sorted(root)[:10]}")
            top = point / cands[0]
            t1 = time.perf_counter()
            res["sub_entries"] = len(os.listdir(top))
            res["sub_list_s"] = round(time.perf_counter() - t1, 3)
        first = True
        bad = []
        for name, want in check.items():
            t1 = time.perf_counter()
            got = _sha(top / name)
            if first:
                res["first_read_s"] = round(time.perf_counter() - t0, 3)
                res["read_one_s"] = round(time.perf_counter() - t1, 3)
                first = False
            if got != want:
                bad.append(name)
        res["content_ok"] = not bad
        if bad:
            res["content_differs"] = bad
        if pid:
            res["daemon_rss_mib"] = _mib(_status_bytes(pid, "VmRSS"))
            res["daemon_hwm_mib"] = _mib(_status_bytes(pid, "VmHWM"))
    finally:
        _stop(point, pid, cli, cenv)
    return res


_VIEW_OPEN = """
import json, os, sys, time, tracemalloc
t0 = time.perf_counter()
from fusejournal.history_view import TreeAt
t1 = time.perf_counter()
v = TreeAt(sys.argv[1], int(sys.argv[2]))
t2 = time.perf_counter()
v.root; v.close()
tracemalloc.start()
v = TreeAt(sys.argv[1], int(sys.argv[2]))
held, peak = tracemalloc.get_traced_memory()
v.close()
print(json.dumps({"import_s": round(t1 - t0, 3), "open_s": round(t2 - t1, 3), "revs": len(v.rev_keys),
                  "rev_bytes": sum(k[2] for k in v.rev_keys), "held_mib": round(held / 2**20, 2),
                  "peak_mib": round(peak / 2**20, 2)}))
"""


def _view_open(cli, cenv, shadow: Path, k: int) -> dict:
    """history_view.TreeAt(shadow, k) in a child process, caches dropped: seconds to import it
    and to open the view (index every rev of the chain), then, opened again under tracemalloc,
    what the open view holds and the peak while opening."""
    drop_caches()
    r = run_cmd([cli[0], "-c", _VIEW_OPEN, str(shadow), str(k)], timeout=600, env=cenv)
    import json
    return json.loads(r.stdout.strip().splitlines()[-1])


def part_browse(env, files: int, size: int) -> dict:
    cli, cenv = _cli()
    base = env.scratch / "fjbench-history"
    rmtree(base)
    base.mkdir(parents=True)
    source, mnt, point = base / "source", base / "mnt", base / "browse"
    journal, shadow = base / "journal", base / "shadow"
    for d in (source, mnt, point):
        d.mkdir()
    res: dict = {"files": files, "file_bytes": size, "tree_bytes": files * size,
                 "loadavg_1m_start": os.getloadavg()[0]}
    mounted = False
    try:
        t0 = time.perf_counter()
        text, rand = _make_files(source, files, size)
        res["create_s"] = round(time.perf_counter() - t0, 1)
        log(f"  history: {files} x {size} bytes created in {res['create_s']} s; seeding")
        res["mount_s"] = round(_mount(cli, cenv, source, mnt, journal, shadow, base / "mount.log"), 1)
        mounted = True
        t0 = time.perf_counter()
        k1 = _checkpoint(cli, cenv, mnt, "base")
        res["seed_and_k1_s"] = round(time.perf_counter() - t0, 1)
        hist = shadow / "history"
        # the content at k1 of every changed file checked later (names at k1)
        samples: dict[str, str] = {}
        per: dict = {}
        for kind_name, names in (("text", text), ("random", rand)):
            du0 = du(hist)
            ch = _change(mnt, names, size)
            samples.update(ch.pop("sample"))
            t0 = time.perf_counter()
            k = _checkpoint(cli, cenv, mnt, f"changes-{kind_name}")
            ch["checkpoint"] = k
            ch["wait_s"] = round(time.perf_counter() - t0, 2)
            ch["history_bytes"] = du(hist) - du0
            ch["history_per_destroyed"] = round(ch["history_bytes"] / max(1, ch["destroyed"]), 3)
            per[kind_name] = ch
        res["changes"] = per
        log(f"  history: changes {per}")
        for i in range(2):                  # two more checkpoints: a small new file, overwritten
            os.setxattr(mnt, CONTROL_XATTR, b"noise")
            with open(mnt / "noise", "r+b" if i else "wb") as f:
                f.write(os.urandom(4096))
        k_last = _checkpoint(cli, cenv, mnt, "last")
        res["checkpoints"] = {"k1": k1, "last": k_last}
        res["history_total_bytes"] = du(hist)
        res["history_entries"] = sorted(os.listdir(hist))
        res["shadow_tree_bytes"] = du(shadow / "tree")
        res["samples"] = samples
        res["_k1"] = k1
    except BaseException:
        if mounted:
            _stop(mnt, _daemon_of(mnt), cli, cenv)
        rmtree(base)
        raise
    return res


# --------------------------------------------------------------------------- part 2

def part_restore(env, n: int) -> dict:
    cli, cenv = _cli()
    base = env.scratch / f"fjbench-history-restore-{n}"
    rmtree(base)
    base.mkdir(parents=True)
    source, mnt, dest = base / "source", base / "mnt", base / "dest"
    journal, shadow = base / "journal", base / "shadow"
    for d in (source, mnt):
        d.mkdir()
    big = max(1, n // 10)
    res: dict = {"files": n, "loadavg_1m_start": os.getloadavg()[0]}
    mpid = None
    try:
        t0 = time.perf_counter()
        make_tree(source, n, big)
        res["create_s"] = round(time.perf_counter() - t0, 1)
        res["mount_s"] = round(_mount(cli, cenv, source, mnt, journal, shadow, base / "mount.log"), 1)
        mpid = _daemon_of(mnt)
        t0 = time.perf_counter()
        k1 = _checkpoint(cli, cenv, mnt, "base")
        res["seed_and_k1_s"] = round(time.perf_counter() - t0, 1)
        d0 = mnt / "d0000"
        names = sorted(os.listdir(d0))[:300]
        written, unlinked = names[:100], names[100:200]
        for nm in written:
            (d0 / nm).write_bytes(b"x" * 4096)
        for nm in unlinked:
            os.unlink(d0 / nm)
        (mnt / "new").mkdir()
        for i in range(100):
            (mnt / "new" / f"n{i}").write_bytes(b"y" * 100)
        k2 = _checkpoint(cli, cenv, mnt, "changed")
        res["checkpoints"] = [k1, k2]
        log(f"  history: restore of checkpoint {k1} of {n} files")
        drop_caches()
        res["restore"] = _timed_child(cli + ["restore", "--checkpoint", str(k1), str(mnt), str(dest)], cenv,
                                      base / "restore.log", 4 * 3600)
        # DEST as at k1: every entry, the written files empty, the unlinked ones back, no new/
        count = sum(len(ds) + len(fs) for _r, ds, fs in os.walk(dest))
        dirs_expected = 1 + -(-(n - big) // 1000)
        res["dest_entries"] = count
        res["dest_ok"] = (count == n + dirs_expected
                          and all(os.path.getsize(dest / "d0000" / nm) == 0 for nm in written)
                          and all((dest / "d0000" / nm).exists() for nm in unlinked)
                          and not (dest / "new").exists())
        log(f"  history: restore {res['restore']}, ok={res['dest_ok']}; verify")
        drop_caches()
        res["verify"] = _timed_child(cli + ["verify", str(mnt), "--timeout", "3600"], cenv,
                                     base / "verify.log", 4 * 3600)
        res["loadavg_1m_end"] = os.getloadavg()[0]
    finally:
        _stop(mnt, mpid, cli, cenv)
        subprocess.run(["sync"], check=False)
        rmtree(base)
    return res


def phase_history(env, sizes) -> dict:
    files, size = DEFAULT_BROWSE.get(sizes.name, DEFAULT_BROWSE["quick"])
    restore_sizes = getattr(env, "history_files", None) or DEFAULT_RESTORE.get(sizes.name,
                                                                               DEFAULT_RESTORE["quick"])
    out: dict = {}
    cli, cenv = _cli()
    b = part_browse(env, files, size)
    base = env.scratch / "fjbench-history"
    mnt, point = base / "mnt", base / "browse"
    try:
        k1 = b.pop("_k1")
        samples = b.pop("samples")
        if cli[1:2] == ["-m"]:              # (a python running fusejournal.cli of this checkout)
            b["view_open"] = _view_open(cli, cenv, base / "shadow", k1)
        first = samples                     # the first: a text file overwritten after k1
        b["browse_checkpoint"] = _browse_timed(cli, cenv, mnt, point, ["--checkpoint", str(k1)], None,
                                               first, base / "browse.log")
        b["browse_all"] = _browse_timed(cli, cenv, mnt, point, ["--all"], str(k1), first, base / "browse.log")
        b["browse_latest"] = _browse_timed(cli, cenv, mnt, point, [], None, {}, base / "browse.log")
        b["loadavg_1m_end"] = os.getloadavg()[0]
        log(f"  history: browse {b}")
    finally:
        _stop(point, None, cli, cenv)
        _stop(mnt, _daemon_of(mnt), cli, cenv)
        rmtree(base)
    out["browse"] = b
    out["restore"] = {}
    for n in restore_sizes:
        try:
            out["restore"][str(n)] = part_restore(env, n)
        except Exception as e:  # noqa: BLE001 - reported, never fatal
            out["restore"][str(n)] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log(f"  history: restore {n}: {out['restore'][str(n)]}")
    return out
