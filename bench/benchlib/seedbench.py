"""The online seed's cost (issue 12): an application's throughput while the shadow is seeded
behind it, and the daemon's memory while it seeds a big tree.

    .venv/bin/python bench/benchlib/seedbench.py throughput [--files N] [--file-size SIZE]
                                                           [--seconds S] [--scratch DIR]
    .venv/bin/python bench/benchlib/seedbench.py memory [--files N] [--scratch DIR]

throughput: a tree of N files (default 4,000 x 1 MiB) and a "database" file of 64 MiB; a
writer process does random 4 KiB pwrites with an fdatasync every 8 (like a database's
pages) through the mount for S seconds (default 20), four ways, page cache dropped before
each: (1) the shadow already seeded (no seed running), (2) while the shadow is seeded
online at its default low priority (nice 19, I/O best-effort 7), (3) with the I/O class idle
(FUSEJOURNAL_SEED_PRIORITY=idle), (4) at normal priority (FUSEJOURNAL_SEED_PRIORITY=normal).  Reports
writes/s, the p99 write+sync latency, and how far the seed got.

memory: N small files (default 200,000) in directories of 1,000; a fresh mount with
--seed-wait 0; the daemon's RSS (VmRSS, VmHWM) is sampled every 0.2 s until the first
complete checkpoint.  Reports the peak, the RSS after mounting, and the seed's time.

Run as root (FUSE, drop_caches).  Prints a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = REPO / ".venv" / "bin" / "python"
FJ = [os.fspath(PY if PY.exists() else Path(sys.executable)), "-m", "fusejournal.cli"]


def fj(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*FJ, *map(os.fspath, args)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, **(env or {})}, timeout=3600)
    if check and r.returncode:
        raise SystemExit(f"fusejournal {' '.join(map(str, args))}: {r.stdout}{r.stderr}")
    return r


def status(mnt: Path) -> dict:
    return json.loads(os.getxattr(mnt, b"user.fusejournal.status"))


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        pass


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def make_tree(src: Path, files: int, size: int, per_dir: int = 1000) -> None:
    block = os.urandom(min(size, 1 << 20)) if size else b""
    for i in range(files):
        d = src / "tree" / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        with open(d / f"f{i:07d}", "wb") as f:
            left = size
            while left > 0:
                left -= f.write(block[:left])


WRITER = r'''
import os, random, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
buf = os.urandom(4096)
rnd = random.Random(1)
lat, n = [], 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    t = time.monotonic()
    for _ in range(8):
        os.pwrite(fd, buf, rnd.randrange(size // 4096) * 4096)
    os.fdatasync(fd)
    lat.append(time.monotonic() - t)
    n += 8
lat.sort()
print(n / seconds, lat[int(len(lat) * 0.99)] if lat else 0)
'''


def run_writer(db: Path, seconds: float) -> tuple[float, float]:
    r = subprocess.run([sys.executable, "-c", WRITER, os.fspath(db), str(seconds)], capture_output=True,
                       text=True, check=True)
    rate, p99 = r.stdout.split()
    return float(rate), float(p99)


def mount(base: Path, extra: list[str], env: dict[str, str] | None = None) -> Path:
    mnt = base / "mnt"
    fj("mount", base / "src", mnt, "--journal", base / "journal", "--shadow", base / "shadow", *extra,
       env=env)
    return mnt


def umount(base: Path) -> None:
    fj("umount", base / "mnt", check=False)


def fresh_state(base: Path) -> None:
    for d in ("journal", "shadow"):
        shutil.rmtree(base / d, ignore_errors=True)


def throughput(a: argparse.Namespace) -> None:
    base = Path(a.scratch) / "fj-seedbench"
    shutil.rmtree(base, ignore_errors=True)
    (base / "mnt").mkdir(parents=True)
    src = base / "src"
    src.mkdir()
    print(f"making {a.files} files of {a.file_size} bytes ...", file=sys.stderr)
    make_tree(src, a.files, a.file_size)
    with open(src / "db", "wb") as f:
        f.write(os.urandom(64 << 20))
    rows = []
    # (1) seeded already: seed first (and wait), then measure
    mnt = mount(base, ["--seed-wait", "0"])
    fj("wait", mnt)
    drop_caches()
    rate, p99 = run_writer(mnt / "db", a.seconds)
    rows.append(("shadow seeded, no seed running", rate, p99, "-"))
    umount(base)
    for label, env in (("while seeding (default: nice 19, I/O best-effort 7)", {}),
                       ("while seeding, I/O class idle", {"FUSEJOURNAL_SEED_PRIORITY": "idle"}),
                       ("while seeding at normal priority", {"FUSEJOURNAL_SEED_PRIORITY": "normal"})):
        fresh_state(base)
        drop_caches()
        mnt = mount(base, ["--seed-wait", "0"], env=env)
        rate, p99 = run_writer(mnt / "db", a.seconds)
        st = status(mnt)
        s = st.get("seeding")
        if s:
            got = (f"{s['bytes_copied'] / (1 << 20):.0f} of {(s['bytes_total'] or 0) / (1 << 20):.0f} "
                   f"MiB copied ({s['state'].split(' (')[0]})")
        else:
            done = json.loads((base / "shadow" / "seeded.json").read_text())
            got = (f"done: first complete checkpoint {done['first_complete']} after "
                   f"{(done['time_ns'] - done['started_ns']) / 1e9:.1f} s, {done.get('rounds')} "
                   f"round(s), final halt {done.get('final_halt_s') or 0:.3f} s"
                   + (f" ({h['objects']} object(s), {h['data_bytes_read']} bytes of file data read; "
                      f"replay after it {r.get('seconds', 0):.3f} s, {r.get('bytes_written', 0)} bytes)"
                      if (h := done.get("final_halt")) and (r := done.get("final_replay")) is not None
                      else ""))
        rows.append((label, rate, p99, got))
        umount(base)
    base_rate = rows[0][1]
    print(f"\n{a.files} files x {a.file_size} bytes; writer: random 4 KiB pwrite, fdatasync every 8, "
          f"{a.seconds:g} s, through the mount\n")
    print("| case | writes/s | vs. no seed | p99 of 8 writes + fdatasync | seed progress at the end |")
    print("|---|---:|---:|---:|---|")
    for label, rate, p99, got in rows:
        print(f"| {label} | {rate:.0f} | {rate / base_rate * 100:.0f}% | {p99 * 1000:.1f} ms | {got} |")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)


def rss(pid: int) -> tuple[int, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out.get("VmRSS", 0), out.get("VmHWM", 0)


def memory(a: argparse.Namespace) -> None:
    base = Path(a.scratch) / "fj-seedmem"
    shutil.rmtree(base, ignore_errors=True)
    (base / "mnt").mkdir(parents=True)
    (base / "src").mkdir()
    t = time.monotonic()
    print(f"making {a.files} files ...", file=sys.stderr)
    make_tree(base / "src", a.files, 100)
    print(f"made in {time.monotonic() - t:.0f} s", file=sys.stderr)
    drop_caches()
    t0 = time.monotonic()
    mnt = mount(base, ["--seed-wait", "0"])
    t_mount = time.monotonic() - t0
    st = status(mnt)
    pid = st["pid"]
    after_mount = rss(pid)[0]
    peak = 0
    samples = 0
    while True:
        cur, hwm = rss(pid)
        peak = max(peak, hwm)
        samples += 1
        st = status(mnt)
        if st.get("seeding") is None:
            break
        time.sleep(0.2)
    t_seed = time.monotonic() - t0
    # some activity after the seed: the daemon's steady state
    (mnt / "after").write_bytes(b"x")
    n = int(fj("checkpoint", mnt).stdout)
    fj("wait", mnt, "--checkpoint", str(n))
    end_rss = rss(pid)[0]
    first = st.get("first_complete_checkpoint")
    umount(base)
    print(f"\n{a.files} files of 100 bytes in directories of 1,000; fresh mount, --seed-wait 0\n")
    print("| mount returned | seed done (first complete checkpoint) | entries/s | RSS after mount | "
          "peak RSS (VmHWM) while seeding | RSS after |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {t_mount:.2f} s | {t_seed:.1f} s (checkpoint {first}) | {a.files / t_seed:.0f} | "
          f"{after_mount / (1 << 20):.0f} MiB | {peak / (1 << 20):.0f} MiB | {end_rss / (1 << 20):.0f} MiB |")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--files", type=int, default=4000)
    t.add_argument("--file-size", type=size_arg, default=1 << 20)
    t.add_argument("--seconds", type=float, default=20)
    m = sub.add_parser("memory")
    m.add_argument("--files", type=int, default=200_000)
    for q in (t, m):
        q.add_argument("--scratch", default="/var/tmp")
        q.add_argument("--keep", action="store_true")
    a = p.parse_args()
    random.seed(1)
    throughput(a) if a.cmd == "throughput" else memory(a)


if __name__ == "__main__":
    main()
