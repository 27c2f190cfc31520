#!/usr/bin/env python3
"""FUSE requests per operation through a real fusejournal mount (issue 11).

    python bench/requests.py                      # default mode
    python bench/requests.py --writeback-cache    # with the kernel's writeback cache
    python bench/requests.py --dbench 5           # and the mix of a 5 s dbench run

Mounts a fresh tree under a scratch directory (the CLI of this checkout), runs each
operation N times from this process, and reads the daemon's per-handler counter
(``user.fusejournal.requests`` on the mount root) before and after: prints a
markdown table of requests per operation.  Requests libfuse answers by itself
(INIT, INTERRUPT, opcodes pyfuse3 does not register) are not counted.  Counts, not
times: they do not depend on the machine's load.  Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FJ = [sys.executable, "-m", "fusejournal.cli"]
XATTR = b"user.fusejournal.requests"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writeback-cache", action="store_true")
    ap.add_argument("-n", type=int, default=200, help="operations per row (default 200)")
    ap.add_argument("--dbench", type=float, default=0, metavar="SECONDS",
                    help="also count a dbench run of 4 clients (needs dbench)")
    ap.add_argument("--scratch", default="/var/tmp")
    a = ap.parse_args()
    n = a.n
    base = Path(tempfile.mkdtemp(prefix="fjrequests-", dir=a.scratch))
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    mount = [*FJ, "mount", src, mnt, "--journal", base / "journal", "--shadow", base / "shadow"]
    if a.writeback_cache:
        mount.append("--writeback-cache")
    subprocess.run(mount, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        rows = measure(mnt, n)
        if a.dbench:
            rows.append(dbench(mnt, a.dbench))
    finally:
        subprocess.run([*FJ, "umount", mnt], cwd=REPO, stdout=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)
    mode = "--writeback-cache" if a.writeback_cache else "default"
    print(f"| operation ({mode}) | requests per operation | of which |")
    print("| --- | ---: | --- |")
    for label, total, parts in rows:
        print(f"| {label} | {total} | {parts} |")


def counts(mnt: Path) -> dict[str, int]:
    return json.loads(os.getxattr(mnt, XATTR))


def row(mnt: Path, label: str, fn: Callable[[], None], n: int) -> tuple[str, str, str]:
    c0 = counts(mnt)
    fn()
    c1 = counts(mnt)
    d = {k: c1[k] - c0.get(k, 0) for k in c1}
    d["getxattr"] -= 1                    # the second counts() itself
    d = {k: v for k, v in d.items() if v}
    per = {k: round(v / n, 2) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    total = round(sum(d.values()) / n, 2)
    return label, f"{total:g}", ", ".join(f"{k.upper()} {v:g}" for k, v in per.items() if v >= 0.05)


def measure(mnt: Path, n: int) -> list[tuple[str, str, str]]:
    d = mnt / "d"
    d.mkdir()
    names = [d / f"f{i:05d}" for i in range(n)]
    block = b"x" * 4096

    def write(size: int, count: int) -> Callable[[], None]:
        def go() -> None:
            fd = os.open(mnt / f"w{size}", os.O_WRONLY | os.O_CREAT, 0o644)
            buf = b"w" * size
            for _ in range(count):
                os.write(fd, buf)
            os.fsync(fd)
            os.close(fd)
        return go

    def create() -> None:
        for p in names:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, block)
            os.close(fd)

    def stat() -> None:
        for p in names:
            os.stat(p)

    def read() -> None:
        for p in names:
            with open(p, "rb") as f:
                f.read()

    def missing() -> None:
        for p in names:
            try:
                os.stat(p.with_suffix(".missing"))
            except FileNotFoundError:
                pass

    def chmod() -> None:
        for p in names:
            os.chmod(p, 0o600)

    def rename() -> None:
        for p in names:
            os.rename(p, p.with_suffix(".r"))
            os.rename(p.with_suffix(".r"), p)

    def unlink() -> None:
        for p in names:
            os.unlink(p)

    return [
        row(mnt, "write(2) of 4 KiB", write(4096, n), n),
        row(mnt, "write(2) of 1 MiB", write(1 << 20, 20), 20),
        row(mnt, "create + write 4 KiB + close", create, n),
        row(mnt, "stat, right after the above", stat, n),
        row(mnt, "stat again", stat, n),
        row(mnt, "open + read + close", read, n),
        row(mnt, "stat after the reads", stat, n),
        row(mnt, "chmod", chmod, n),
        row(mnt, "stat of a missing name", missing, n),
        row(mnt, "stat of that missing name again", missing, n),
        row(mnt, "rename there and back (per rename)", rename, 2 * n),
        row(mnt, "unlink", unlink, n),
    ]


def dbench(mnt: Path, seconds: float) -> tuple[str, str, str]:
    c0 = counts(mnt)
    r = subprocess.run(["dbench", "-D", mnt, "-t", str(int(seconds)), "-c",
                        "/usr/share/dbench/client.txt", "4"], capture_output=True, text=True)
    c1 = counts(mnt)
    d = {k: c1[k] - c0.get(k, 0) for k in c1}
    total = sum(d.values())
    top = sorted(d.items(), key=lambda kv: -kv[1])
    thr = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("Throughput")]
    return (f"dbench, 4 clients, {seconds:g} s ({thr[0] if thr else '?'} MB/s; per second)",
            f"{total / seconds:.0f}",
            ", ".join(f"{k.upper()} {v / total:.0%}" for k, v in top if v / total >= 0.02))


if __name__ == "__main__":
    main()
