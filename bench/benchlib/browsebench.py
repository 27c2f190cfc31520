"""The browse mount at scale (issue 10, "scale"): memory of the browse daemon and
time of the first listings, for a tree of N files and one directory of M entries.

The tree: ``big/`` holds M empty files, and ``dNNNN/`` directories of 1,000
empty files each hold the rest (N files in all: 1,000,000 / 100,000 in a full
run).  Empty files are made with os.open/os.close in a loop (``create_s``).

Steps, each timed (wall clock, and ``*_cpu_s``: the browse daemon's CPU seconds,
less disturbed by a busy machine):

1. ``fusejournal mount SOURCE MNT``: seeds the shadow from the tree (``seed_s``,
   the whole mount command; the daemon's peak RSS ``seed_daemon_hwm_mib``),
   then ``fusejournal umount``;
2. ``fusejournal browse JOURNAL POINT`` (``browse_start_s``; the browse
   daemon's RSS ``rss_start_mib``);
3. caches dropped, then the first listing of the root (``list_root_s``,
   names: one opendir and its READDIRs);
4. the first listing of ``big/``: names (``list_big_s``), then names and
   attributes as ``ls -l`` gets them (``list_big_lstat_s``: lstat of each
   entry, a LOOKUP each since browse caches nothing); the daemon's peak RSS
   while it holds the listing (``hwm_after_big_mib``);
5. a walk of the whole tree, every directory listed (``walk_s``,
   ``walk_entries``); the daemon's RSS after it (``rss_after_walk_mib``) and
   its peak (``hwm_after_walk_mib``);
6. the kernel's caches dropped (it sends FORGET for the inodes it let go):
   the daemon's RSS then (``rss_after_forget_mib``).

The numbers are noisy on a shared machine: the load average is recorded.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .targets import fusejournal_cli
from .util import (
    BenchError,
    drop_caches,
    fuse_abort,
    fuse_unmount,
    is_mounted,
    kill_pid,
    log,
    pid_alive,
    proc_cpu_seconds,
    rmtree,
    run_cmd,
    wait_mounted,
)

PER_DIR = 1_000
#: (files in the tree, entries of big/) per benchmark size
DEFAULT_SIZES = {"full": (1_000_000, 100_000), "quick": (20_000, 5_000), "smoke": (2_000, 500)}


def browse_sizes(env, sizes) -> tuple[int, int]:
    files, big = DEFAULT_SIZES.get(sizes.name, DEFAULT_SIZES["quick"])
    files = getattr(env, "browse_files", None) or files
    big = getattr(env, "browse_dir_entries", None) or big
    return max(files, big), big


def make_tree(source: Path, files: int, big: int) -> None:
    """``big`` empty files in source/big, the rest in directories of PER_DIR."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    (source / "big").mkdir()
    dfd = os.open(source / "big", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(big):
            os.close(os.open(f"f{i:06d}", flags, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)
    rest, d = files - big, 0
    while rest > 0:
        sub = source / f"d{d:04d}"
        sub.mkdir()
        dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(min(PER_DIR, rest)):
                os.close(os.open(f"f{i:04d}", flags, 0o644, dir_fd=dfd))
        finally:
            os.close(dfd)
        rest -= PER_DIR
        d += 1


def _status_bytes(pid: int, field: str) -> int | None:
    """A memory figure of /proc/PID/status (VmRSS: resident now, VmHWM: the peak), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mib(n: int | None) -> float | None:
    return round(n / (1 << 20), 1) if n is not None else None


def _daemon_of(point: Path) -> int | None:
    """The pid of the daemon serving ``point``: its root answers ``user.fusejournal.pid``
    (every browse forks its daemon from the command, whose command line has no
    --foreground); else the process whose command line names it with --foreground."""
    try:
        return int(os.getxattr(point, b"user.fusejournal.pid"))
    except (OSError, ValueError):
        pass
    want = os.fsencode(point)
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in argv and b"--foreground" in argv:
            return int(p)
    return None


def _walk(top: str) -> int:
    """List every directory below ``top`` (names and d_type only); the number of entries."""
    n = 0
    stack = [top]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                n += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return n


def _stop(point: Path, pid: int | None, cli: list[str], env: dict) -> None:
    if is_mounted(point):
        try:
            run_cmd(cli + ["umount", str(point)], timeout=600, env=env, check=False,
                    on_timeout=lambda: fuse_abort(point))
        except BenchError:
            pass
    if is_mounted(point):
        fuse_abort(point)
        fuse_unmount(point)
    if pid:
        deadline = time.monotonic() + 600
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            kill_pid(pid)


def phase_browse(env, sizes) -> dict:
    files, big = browse_sizes(env, sizes)
    cli, cenv = fusejournal_cli()
    base = env.scratch / "fjbench-browse"
    rmtree(base)
    base.mkdir(parents=True)
    source, mnt, point = base / "source", base / "mnt", base / "browse"
    journal, shadow = base / "journal", base / "shadow"
    for d in (source, mnt, point):
        d.mkdir()
    res: dict = {"files": files, "big_dir_entries": big, "loadavg_1m_start": os.getloadavg()[0]}
    mpid = bpid = None
    try:
        t0 = time.perf_counter()
        make_tree(source, files, big)
        res["create_s"] = round(time.perf_counter() - t0, 1)
        log(f"  browse: {files} files created in {res['create_s']} s; seeding")
        drop_caches()
        t0 = time.perf_counter()
        run_cmd(cli + ["mount", str(source), str(mnt), "--journal", str(journal), "--shadow", str(shadow)],
                timeout=4 * 3600, env=cenv, stdout_path=base / "mount.log", on_timeout=lambda: fuse_abort(mnt))
        res["seed_s"] = round(time.perf_counter() - t0, 1)
        mpid = _daemon_of(mnt)
        res["seed_daemon_hwm_mib"] = _mib(_status_bytes(mpid, "VmHWM")) if mpid else None
        _stop(mnt, mpid, cli, cenv)
        mpid = None
        log(f"  browse: seeded in {res['seed_s']} s; browsing")

        t0 = time.perf_counter()
        run_cmd(cli + ["browse", str(journal), str(point)], timeout=600, env=cenv,
                stdout_path=base / "browse.log")
        wait_mounted(point, 60)
        res["browse_start_s"] = round(time.perf_counter() - t0, 2)
        bpid = _daemon_of(point)
        if bpid is None:
            raise BenchError("browse daemon not found")
        res["rss_start_mib"] = _mib(_status_bytes(bpid, "VmRSS"))
        drop_caches()

        def cpu() -> float:
            return proc_cpu_seconds(bpid) or 0.0

        t0, c0 = time.perf_counter(), cpu()
        root = os.listdir(point)
        res["list_root_s"] = round(time.perf_counter() - t0, 3)
        res["list_root_cpu_s"] = round(cpu() - c0, 3)
        res["root_entries"] = len(root)

        t0, c0 = time.perf_counter(), cpu()
        names = os.listdir(point / "big")
        res["list_big_s"] = round(time.perf_counter() - t0, 3)
        res["list_big_cpu_s"] = round(cpu() - c0, 3)
        if len(names) != big:
            raise BenchError(f"big/ lists {len(names)} entries, not {big}")
        t0, c0 = time.perf_counter(), cpu()
        bfd = os.open(point / "big", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for n in os.listdir(bfd):
                os.stat(n, dir_fd=bfd, follow_symlinks=False)
        finally:
            os.close(bfd)
        res["list_big_lstat_s"] = round(time.perf_counter() - t0, 3)
        res["list_big_lstat_cpu_s"] = round(cpu() - c0, 3)
        res["hwm_after_big_mib"] = _mib(_status_bytes(bpid, "VmHWM"))
        res["rss_after_big_mib"] = _mib(_status_bytes(bpid, "VmRSS"))

        log("  browse: walking the whole tree")
        t0, c0 = time.perf_counter(), cpu()
        res["walk_entries"] = _walk(str(point))
        res["walk_s"] = round(time.perf_counter() - t0, 1)
        res["walk_cpu_s"] = round(cpu() - c0, 1)
        res["rss_after_walk_mib"] = _mib(_status_bytes(bpid, "VmRSS"))
        res["hwm_after_walk_mib"] = _mib(_status_bytes(bpid, "VmHWM"))
        drop_caches()
        time.sleep(2)                   # the FORGETs arrive asynchronously
        res["rss_after_forget_mib"] = _mib(_status_bytes(bpid, "VmRSS"))
        res["loadavg_1m_end"] = os.getloadavg()[0]
        log(f"  browse: {res}")
    finally:
        _stop(point, bpid, cli, cenv)
        _stop(mnt, mpid, cli, cenv)
        subprocess.run(["sync"], check=False)
        rmtree(base)
    return res
