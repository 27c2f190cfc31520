"""The online seed's cost (issue 12): an application's throughput while the shadow is seeded
behind it, and the daemon's memory while it seeds a big tree.

    .venv/bin/python bench/benchlib/seedbench.py throughput [--files N] [--file-size SIZE]
                                                           [--seconds S] [--scratch DIR]
    .venv/bin/python bench/benchlib/seedbench.py memory [--files N] [--scratch DIR]
    .venv/bin/python bench/benchlib/seedbench.py bigtree [--bytes 100GB] [--small N] [--scratch DIR]

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

bigtree: a database-cluster-like tree of --bytes allocated bytes (default 100GB = 100 * 10**9;
GiB = 2**30): --small files of 8-128 KiB, 5% in 16 MiB WAL segments, the rest in 1 GiB
relation segments; every byte written (no holes, no fallocate), so the sum of st_blocks *
512 is the target.  A disk with less than twice that free holds it by a trick: two sparse
image files under --scratch (--image-size, default 150G each), mkfs.btrfs'ed and loop-mounted
with compress-force (--compress, default zstd:1): one holds the original, the other the
journal and the shadow.  The data is text-like (a non-zero pattern with a header per MiB
naming the file and offset), so btrfs stores it about 27x smaller; but the seeder reads and
writes every byte through the page cache (two filesystems: copy_file_range answers EXDEV
across them, and the seeder falls back to read/write; /proc/PID/io of the daemon is kept
as the proof).  Only the physical storage is compressed.  Then a fresh mount with
--seed-wait 0, a light writer through the mount (8 KiB appends to a WAL file and rewrites of
8 KiB pages in two segments, a 10 ms pause between operations, fdatasync'ed), a checkpoint every
--checkpoint-every seconds while seeding; the daemon's RSS sampled every second until the
first complete checkpoint; then the writer's files in the shadow must be exactly a prefix
of its operations that holds every operation finished before the seed's checkpoint; and
``fusejournal verify`` compares the whole shadow with the original.  Stops (and cleans up)
when less than --min-free (default 15GB) is left under --scratch.  Needs root, btrfs in
the kernel and btrfs-progs (says so in one line if missing); cleans up after itself
(the FUSE mount, both loop filesystems, their loop devices and images) unless --keep.
Writes the raw result to bench/results/seed-LABEL-TIMESTAMP.json.

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


def decimal_size(text: str) -> int:
    """100GB = 100 * 10**9 bytes, 2GiB = 2 * 2**30, a plain number = bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
    for u, m in sorted(units.items(), key=lambda x: -len(x[0])):
        if text.upper().endswith(u):
            return int(float(text[:-len(u)]) * m)
    return int(text)


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



# --- bigtree: a 100 GB tree on compressed btrfs loop filesystems -----------------------------

PAGE = 8192
SEGMENT = 1 << 30
WAL_SEGMENT = 16 << 20
TEXT = b"".join(b"%08d the quick brown fox jumps over the lazy dog; INSERT INTO accounts VALUES (%d, %d, 'filler');\n"
                % (i, i * 7, i * 13) for i in range(12000))[:1 << 20]


def need_btrfs() -> None:
    """Refuse with one line when the btrfs trick cannot work here."""
    if os.geteuid() != 0:
        raise SystemExit("bigtree: run as root (loop devices, mkfs.btrfs, mount, FUSE)")
    if not shutil.which("mkfs.btrfs"):
        raise SystemExit("bigtree: mkfs.btrfs not found: install btrfs-progs (apt-get install -y btrfs-progs)")
    if "btrfs" not in Path("/proc/filesystems").read_text():
        raise SystemExit("bigtree: the kernel has no btrfs (modprobe btrfs?)")


def run(*cmd: str) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bigtree: {' '.join(cmd)}: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip()


class LoopFs:
    """A sparse image file, mkfs.btrfs'ed, loop-mounted with forced compression; ``close``
    unmounts it, detaches the loop device and deletes the image."""

    def __init__(self, image: Path, mnt: Path, size: str, compress: str) -> None:
        self.image, self.mnt, self.dev, self.mounted = image, mnt, "", False
        try:
            run("truncate", "-s", size, os.fspath(image))
            run("mkfs.btrfs", "-q", "-f", os.fspath(image))
            self.dev = run("losetup", "-f", "--show", os.fspath(image))
            mnt.mkdir(parents=True, exist_ok=True)
            run("mount", "-o", f"compress-force={compress}", self.dev, os.fspath(mnt))
            self.mounted = True
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", os.fspath(self.mnt)], check=False)
            self.mounted = False
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], check=False)
            self.dev = ""
        self.image.unlink(missing_ok=True)


def free_bytes(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def chunk(tag: bytes) -> bytes:
    """1 MiB of text, non-zero, compressible, with a header naming the file and offset."""
    return tag + TEXT[len(tag):]


def write_file(path: Path, size: int, name: bytes) -> None:
    with open(path, "wb") as f:
        off = 0
        while off < size:
            n = min(1 << 20, size - off)
            f.write(chunk(b"%s @%d\n" % (name, off))[:n])
            off += n


def plan_tree(total: int, small: int, rnd: random.Random) -> list[tuple[str, int]]:
    """A database-cluster-like tree of about ``total`` allocated bytes: ``small`` files of
    8-128 KiB (catalogs, visibility maps, ...; the first 5,000 in 9 directories, the others
    in directories of 5,000), 5% in 16 MiB WAL segments, the rest in 1 GiB relation
    segments (the last one shorter).  Returns (relative path, size)."""
    files: list[tuple[str, int]] = []
    for i in range(small):
        d = ("base/1", "base/4", "base/5", "base/16384", "global", "pg_xact", "pg_multixact/offsets",
             "pg_subtrans", "pg_stat")[i % 9] if i % 5 else "base/16384"
        if i >= 5000:                           # more databases, 5,000 files each
            d = f"base/{100000 + i // 5000}"
        files.append((f"{d}/{20000 + i}", rnd.randint(1, 16) * PAGE))
    used = sum(s for _, s in files)
    wal = max(1, int(total * 0.05) // WAL_SEGMENT)
    for i in range(wal):
        files.append((f"pg_wal/{1:08X}{0:08X}{i:08X}", WAL_SEGMENT))
    used += wal * WAL_SEGMENT
    rel, seg = 16384, 0
    while used < total:
        size = min(SEGMENT, -(-(total - used) // PAGE) * PAGE)
        files.append((f"base/16384/{rel}" + (f".{seg}" if seg else ""), size))
        used += size
        seg += 1
        if seg == 8 or rnd.random() < 0.3:      # relations of 1 to 8 segments
            rel, seg = rel + 1, 0
    return files


def allocated(root: Path) -> tuple[int, int, int]:
    """(files, bytes of st_size, bytes of st_blocks * 512) under root."""
    n = size = blocks = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                else:
                    n += 1
                    size += st.st_size
                    blocks += st.st_blocks * 512
    return n, size, blocks


BIGWRITER = r'''
import os, random, sys, time
mnt, stop, log, pages = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
targets = [(p.rsplit(":", 1)[0], int(p.rsplit(":", 1)[1])) for p in pages]
rnd = random.Random(7)
fds = {}
def fd(rel, flags=os.O_WRONLY):
    if rel not in fds:
        fds[rel] = os.open(os.path.join(mnt, rel), flags)
    return fds[rel]
wal = os.open(os.path.join(mnt, "pg_wal/writer.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
out = open(log, "w")
k = 0
while not os.path.exists(stop):
    t0 = time.time_ns()
    body = (b"writer op %d\n" % k) * 700
    body = body[:8192].ljust(8192, b".")
    if k % 4 == 0:
        os.write(wal, body)
        os.fdatasync(wal)
    else:
        rel, page = targets[rnd.randrange(len(targets))]
        os.pwrite(fd(rel), body, page * 8192)
        if k % 8 == 7:
            os.fdatasync(fd(rel))
    out.write("%d %d %d\n" % (k, t0, time.time_ns()))
    k += 1
    time.sleep(0.01)
out.close()
'''


def writer_ops(pages: list[tuple[str, int]], n: int) -> list[tuple[str, int] | None]:
    """The writer's first n operations, as it draws them: None for a WAL append, else
    (file, page)."""
    rnd = random.Random(7)
    return [None if k % 4 == 0 else pages[rnd.randrange(len(pages))] for k in range(n)]


def writer_body(k: int) -> bytes:
    return ((b"writer op %d\n" % k) * 700)[:PAGE].ljust(PAGE, b".")


def check_prefix(tree: Path, pages: list[tuple[str, int]], before: dict[tuple[str, int], bytes],
                 ops_done: int) -> tuple[int | None, str]:
    """Is the shadow's state of the writer's files exactly the first s operations, for some s?
    Returns (s, "") or (None, why)."""
    wal = (tree / "pg_wal" / "writer.log").read_bytes() if (tree / "pg_wal" / "writer.log").exists() else b""
    if len(wal) % PAGE:
        return None, f"writer.log is {len(wal)} bytes, not whole records"
    appends = len(wal) // PAGE
    ops = writer_ops(pages, ops_done)
    # s: the op right before the next append that is not in the shadow
    idx = [k for k, o in enumerate(ops) if o is None]
    if appends > len(idx):
        return None, f"writer.log has {appends} records, the writer made {len(idx)}"
    for j in range(appends):
        if wal[j * PAGE:(j + 1) * PAGE] != writer_body(idx[j]):
            return None, f"writer.log record {j} is not op {idx[j]}"
    lo = idx[appends - 1] + 1 if appends else 0             # s is in [lo, hi]
    hi = idx[appends] if appends < len(idx) else ops_done
    shadow_pages: dict[tuple[str, int], bytes] = {}
    for p in pages:
        with open(tree / p[0], "rb") as f:
            shadow_pages[p] = os.pread(f.fileno(), PAGE, p[1] * PAGE)
    for s in range(lo, hi + 1):
        last: dict[tuple[str, int], int] = {}
        for k, o in enumerate(ops[:s]):
            if o is not None:
                last[o] = k
        if all(shadow_pages[p] == (writer_body(last[p]) if p in last else before[p]) for p in pages):
            return s, ""
    return None, f"no prefix of the writer's operations in [{lo}, {hi}] matches the shadow's pages"


def bigtree(a: argparse.Namespace) -> None:
    need_btrfs()
    base = Path(a.scratch) / "fj-bigtree"
    if base.exists():
        raise SystemExit(f"bigtree: {base} exists (a run in progress, or left over: remove it first)")
    base.mkdir(parents=True)
    stopfile = base / "stop-writer"
    result: dict = {"bytes_target": a.bytes, "small_files": a.small, "compress": a.compress,
                    "image_size": a.image_size, "uname": os.uname().release,
                    "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fss: list[LoopFs] = []
    mnt = base / "mnt"
    mounted = False
    writer = None

    def guard() -> None:
        if free_bytes(Path(a.scratch)) < a.min_free:
            raise SystemExit(f"bigtree: less than {a.min_free / 1e9:.0f} GB free under {a.scratch}: stopping")

    def on_term(*_: object) -> None:
        raise SystemExit("bigtree: terminated")
    import signal
    signal.signal(signal.SIGTERM, on_term)
    try:
        orig = LoopFs(base / "original.img", base / "original", a.image_size, a.compress)
        fss.append(orig)
        state = LoopFs(base / "state.img", base / "state", a.image_size, a.compress)
        fss.append(state)
        src = orig.mnt / "src"
        src.mkdir()
        rnd = random.Random(1)
        files = plan_tree(a.bytes, a.small, rnd)
        print(f"making {len(files)} files, {sum(s for _, s in files) / 1e9:.1f} GB ...", file=sys.stderr)
        t = time.monotonic()
        for i, (rel, size) in enumerate(files):
            p = src / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            write_file(p, size, rel.encode())
            if i % 200 == 0:
                guard()
        os.sync()
        result["make_s"] = round(time.monotonic() - t, 1)
        n, size, blocks = allocated(src)
        result.update(files=n, size_bytes=size, allocated_bytes=blocks)
        print(f"made {n} files in {result['make_s']} s: {size} bytes, {blocks} allocated", file=sys.stderr)
        if blocks < a.bytes:
            raise SystemExit(f"bigtree: only {blocks} bytes allocated, wanted {a.bytes}")
        # the writer's pages: 64 spread over each of the first two 1 GiB segments
        segs = [rel for rel, s in files if s == SEGMENT][:2] or [files[-1][0]]
        pages = [(rel, (j * 1009) % ((src / rel).stat().st_size // PAGE)) for rel in segs for j in range(64)]
        before = {}
        for rel, pg in pages:
            with open(src / rel, "rb") as f:
                before[(rel, pg)] = os.pread(f.fileno(), PAGE, pg * PAGE)
        result["physical_after_make"] = {"original_fs_used": run("df", "-B1", "--output=used", os.fspath(orig.mnt)).split()[-1],
                                         "root_free": free_bytes(Path(a.scratch))}
        drop_caches()
        mnt.mkdir()
        t0 = time.monotonic()
        fj("mount", src, mnt, "--journal", state.mnt / "journal", "--shadow", state.mnt / "shadow",
           "--seed-wait", "0")
        mounted = True
        t_mount = time.monotonic() - t0
        st = status(mnt)
        pid = st["pid"]
        io0 = Path(f"/proc/{pid}/io").read_text()
        after_mount = rss(pid)[0]
        wlog = base / "writer.ops"
        if a.writer:
            writer = subprocess.Popen([sys.executable, "-c", BIGWRITER, os.fspath(mnt), os.fspath(stopfile),
                                       os.fspath(wlog), *(f"{r}:{p}" for r, p in pages)])
        samples = []
        peak = 0
        last_cp = time.monotonic()
        checkpoints = []
        while True:
            cur, hwm = rss(pid)
            peak = max(peak, hwm)
            st = status(mnt)
            s = st.get("seeding")
            samples.append({"t": round(time.monotonic() - t0, 1), "rss": cur, "hwm": hwm,
                            "bytes_copied": s and s.get("bytes_copied"), "phase": s and s.get("phase"),
                            "rounds": s and s.get("rounds"), "dirty": s and s.get("dirty_objects")})
            if s is None:
                break
            if len(samples) % 30 == 0:
                guard()
                print(f"{samples[-1]['t']:.0f} s: {s['phase']} {(s['bytes_copied'] or 0) / 1e9:.1f} of "
                      f"{(s['bytes_total'] or 0) / 1e9:.1f} GB, rounds {s['rounds']}, rss {cur >> 20} MiB, "
                      f"hwm {hwm >> 20} MiB", file=sys.stderr)
            if s.get("error"):
                raise SystemExit(f"bigtree: the seed stopped: {s['error']}")
            if a.checkpoint_every and time.monotonic() - last_cp >= a.checkpoint_every:
                checkpoints.append(int(fj("checkpoint", mnt).stdout))
                last_cp = time.monotonic()
            time.sleep(1)
        t_seed = time.monotonic() - t0
        io1 = Path(f"/proc/{pid}/io").read_text()
        first = st.get("first_complete_checkpoint")
        shadow_cp = st.get("shadow_checkpoint")
        stopfile.touch()
        if writer is not None:
            writer.wait(timeout=60)
        seeded = json.loads((state.mnt / "shadow" / "seeded.json").read_text())
        result.update(mount_return_s=round(t_mount, 2), seed_s=round(t_seed, 1),
                      seed_mb_per_s=round(blocks / t_seed / 1e6, 1),
                      rss_after_mount=after_mount, peak_hwm=peak, first_complete=first,
                      shadow_checkpoint_at_end=shadow_cp, checkpoints_during_seed=checkpoints,
                      seeded=seeded, samples=samples,
                      daemon_io_during_seed={k: int(v1) - int(v0) for (k, v0), (_, v1) in zip(
                          (ln.split(": ") for ln in io0.splitlines()),
                          (ln.split(": ") for ln in io1.splitlines()))})
        print(f"seed done in {t_seed:.0f} s, checkpoint {first}; shadow at {shadow_cp}", file=sys.stderr)
        if a.writer:
            lines = wlog.read_text().split()
            done = len(lines) // 3
            ops_t = [(int(lines[i * 3 + 1]), int(lines[i * 3 + 2])) for i in range(done)]
            st2 = status(mnt)
            if st2.get("shadow_checkpoint") != shadow_cp:
                print("note: the shadow moved on after the seed", file=sys.stderr)
            s_ok, why = check_prefix(state.mnt / "shadow" / "tree", pages, before, done)
            marker = seeded["time_ns"]
            halt_ns = int((seeded.get("final_halt_s") or 0) * 1e9)
            must = sum(1 for t_start, t_end in ops_t if t_end < marker - halt_ns - 1_000_000_000)
            may = sum(1 for t_start, t_end in ops_t if t_start <= marker + 1_000_000_000)
            result["writer"] = {"ops": done, "shadow_prefix": s_ok, "why": why,
                                "ops_done_before_marker_minus_halt_minus_1s": must,
                                "ops_started_before_marker_plus_1s": may,
                                "exact_at_first_complete": s_ok is not None and must <= s_ok <= may,
                                "shadow_checkpoint_when_checked": st2.get("shadow_checkpoint")}
            print(f"writer: {result['writer']}", file=sys.stderr)
        end_rss = rss(pid)[0]
        time.sleep(2)
        t = time.monotonic()
        v = fj("verify", mnt, "--timeout", "3600", check=False)
        result["verify"] = {"rc": v.returncode, "seconds": round(time.monotonic() - t, 1),
                            "output": (v.stdout + v.stderr)[-4000:]}
        print(f"verify rc {v.returncode} in {result['verify']['seconds']} s", file=sys.stderr)
        result["rss_after"] = end_rss
        result["peak_hwm_after_verify"] = rss(pid)[1]
        sn, ssize, sblocks = allocated(state.mnt / "shadow" / "tree")
        result["shadow_tree"] = {"files": sn, "size_bytes": ssize, "allocated_bytes": sblocks}
        result["physical_end"] = {
            "original_fs_used": run("df", "-B1", "--output=used", os.fspath(orig.mnt)).split()[-1],
            "state_fs_used": run("df", "-B1", "--output=used", os.fspath(state.mnt)).split()[-1],
            "root_free": free_bytes(Path(a.scratch))}
    finally:
        if writer is not None and writer.poll() is None:
            stopfile.touch()
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                writer.kill()
        if mounted:
            umount(base)
        for f in reversed(fss):
            if not a.keep:
                f.close()
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    out = REPO / "bench" / "results" / f"seed-{a.label}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    w = result.get("writer") or {}
    print(f"\n{result['files']} files, {result['allocated_bytes'] / 1e9:.1f} GB allocated (10^9 bytes), "
          f"on btrfs compress-force={a.compress}; fresh mount, --seed-wait 0; raw: {out.relative_to(REPO)}\n")
    print("| mount returned | seed (first complete checkpoint) | MB/s | RSS after mount | peak RSS (VmHWM) "
          "| rounds | final halt | writer exact at it | verify |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|")
    print(f"| {result['mount_return_s']:.2f} s | {result['seed_s']:.0f} s (checkpoint {result['first_complete']}) | "
          f"{result['seed_mb_per_s']:.0f} | {result['rss_after_mount'] / (1 << 20):.0f} MiB | "
          f"{result['peak_hwm'] / (1 << 20):.0f} MiB | {result['seeded'].get('rounds')} | "
          f"{(result['seeded'].get('final_halt_s') or 0):.3f} s | "
          f"{w.get('exact_at_first_complete', '-')} ({w.get('ops', 0)} ops, prefix {w.get('shadow_prefix')}) | "
          f"rc {result['verify']['rc']} in {result['verify']['seconds']:.0f} s |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--files", type=int, default=4000)
    t.add_argument("--file-size", type=size_arg, default=1 << 20)
    t.add_argument("--seconds", type=float, default=20)
    m = sub.add_parser("memory")
    m.add_argument("--files", type=int, default=200_000)
    b = sub.add_parser("bigtree")
    b.add_argument("--bytes", type=decimal_size, default=100 * 10**9)
    b.add_argument("--small", type=int, default=5000)
    b.add_argument("--image-size", default="150G")
    b.add_argument("--compress", default="zstd:1")
    b.add_argument("--checkpoint-every", type=float, default=60)
    b.add_argument("--no-writer", dest="writer", action="store_false")
    b.add_argument("--min-free", type=decimal_size, default=15 * 10**9)
    b.add_argument("--label", default="bigtree")
    for q in (t, m, b):
        q.add_argument("--scratch", default="/var/tmp")
        q.add_argument("--keep", action="store_true")
    a = p.parse_args()
    random.seed(1)
    {"throughput": throughput, "memory": memory, "bigtree": bigtree}[a.cmd](a)


if __name__ == "__main__":
    main()
