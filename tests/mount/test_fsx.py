"""An fsx-style exerciser on a real mount: random file operations checked against a model.

fsx (from xfstests / LTP) is the classic test of a filesystem's read/write/
truncate/mmap paths; Debian does not package it, so this is our own in the
same spirit (issue 7, "How it is checked").  One file on the mount gets a
seeded random sequence of operations, each checked against an in-memory
model of its bytes:

* pwrite at random offsets and lengths, beyond EOF too (making holes), and
  writes of zeros (what an application does instead of fallocate);
* pread, verified against the model, past EOF too;
* ftruncate and truncate (by path), up and down;
* posix_fallocate (pyfuse3 has no fallocate: glibc falls back to writing
  zero bytes and extending the size);
* copy_file_range within the file (the kernel falls back to splicing);
* mmap read, and mmap write + msync (MAP_SHARED, extended by ftruncate first);
* O_DIRECT reads and writes with page-aligned buffers, offsets and lengths;
* close and reopen; checkpoints at random points, each waited for and the
  shadow's copy compared with the model as it was at the trigger.

After every operation the size seen through the fd must be the model's.  At
the end: a checkpoint, wait, then the original, the shadow and a read through
the mount must all equal the model, the whole trees must be equal (snapshot:
modes, mtimes ...), and the shadow must have the original's sparse map.

Three variants, as fsx is usually run: ``default`` (mmap included),
``nommap`` (fsx -R -W) and ``odirect`` (fsx -Z -R -W: every read and write
with O_DIRECT).  The O_DIRECT variant is skipped where the filesystem under
the test directory refuses O_DIRECT.

``FJ_FSX_SEED`` fixes the seed (else a random one, printed and named in every
failure), ``FJ_FSX_OPS`` the number of operations (default 3000).
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
import random
from pathlib import Path

import pytest
from test_recovery_holes import sparse_map

from conftest import Mounted, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

KiB = 1 << 10
MAXLEN = 1 << 20            # the file never grows beyond this
MAXOP = 64 * KiB            # longest single read/write
ALIGN = 4096                # O_DIRECT alignment of offsets, lengths and buffers
NAME = "fsx.bin"

VARIANTS = {
    "default": {"mmap": True, "direct": False},
    "nommap": {"mmap": False, "direct": False},
    "odirect": {"mmap": False, "direct": True},
}


class FsxFailure(AssertionError):
    pass


class Fsx:
    """The exerciser: one file on the mount, its model, and a log of the last operations."""

    def __init__(self, m: Mounted, seed: int, variant: str) -> None:
        self.m = m
        self.seed = seed
        self.variant = variant
        self.use_mmap = VARIANTS[variant]["mmap"]
        self.direct = VARIANTS[variant]["direct"]
        self.rng = random.Random(seed)
        self.path = m.mountpoint / NAME
        self.model = bytearray()
        self.fd = -1
        self.log: collections.deque[str] = collections.deque(maxlen=40)
        self.counts: collections.Counter[str] = collections.Counter()
        self.disabled: set[str] = set()
        self.opno = 0
        # page-aligned buffer for O_DIRECT (an anonymous mapping is page aligned)
        self.buf = mmap.mmap(-1, MAXOP + ALIGN)

    # -------------------------------------------------------------- helpers

    def fail(self, what: str) -> None:
        raise FsxFailure(f"fsx {self.variant} seed={self.seed} (FJ_FSX_SEED={self.seed}) op {self.opno}: "
                         f"{what}\nlast operations:\n  " + "\n  ".join(self.log))

    def open(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        self.fd = os.open(self.path, flags, 0o644)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def span(self, limit: int, maxlen: int = MAXOP) -> tuple[int, int]:
        """A random (offset, length) with offset + length <= limit (aligned under O_DIRECT)."""
        off = self.rng.randrange(0, max(limit, 1))
        n = self.rng.randrange(1, maxlen + 1)
        if self.rng.random() < 0.2:             # short ones are where edge cases live
            n = self.rng.randrange(1, 64)
        if self.direct:
            off -= off % ALIGN
            n = max(ALIGN, n - n % ALIGN)
        n = min(n, limit - off)
        return off, n

    def set_model(self, off: int, data: bytes | bytearray) -> None:
        if off > len(self.model):
            self.model.extend(bytes(off - len(self.model)))
        self.model[off:off + len(data)] = data

    def resize_model(self, size: int) -> None:
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def check_size(self) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            self.fail(f"size {size} through the mount, {len(self.model)} in the model")

    def pwrite(self, data: bytes, off: int) -> None:
        if self.direct:
            self.buf[:len(data)] = data
            n = os.pwrite(self.fd, memoryview(self.buf)[:len(data)], off)
        else:
            n = os.pwrite(self.fd, data, off)
        if n != len(data):
            self.fail(f"short write: {n} of {len(data)} at {off}")

    def pread(self, n: int, off: int) -> bytes:
        if self.direct:
            got = os.preadv(self.fd, [memoryview(self.buf)[:n]], off)
            return bytes(self.buf[:got])
        return os.pread(self.fd, n, off)

    # -------------------------------------------------------------- operations

    def op_write(self) -> None:
        off, n = self.span(MAXLEN)
        data = self.rng.randbytes(n)
        self.log.append(f"write {off:#x} +{n:#x} (size {len(self.model):#x})")
        self.pwrite(data, off)
        self.set_model(off, data)

    def op_zero(self) -> None:
        off, n = self.span(MAXLEN)
        self.log.append(f"write zeros {off:#x} +{n:#x}")
        self.pwrite(bytes(n), off)
        self.set_model(off, bytes(n))

    def op_read(self) -> None:
        off, n = self.span(len(self.model) + 2 * ALIGN)
        self.log.append(f"read {off:#x} +{n:#x}")
        got = self.pread(n, off)
        want = bytes(self.model[off:off + n])
        if got != want:
            bad = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                       min(len(got), len(want)))
            self.fail(f"read {off:#x} +{n:#x}: {len(got)} bytes, {len(want)} expected; "
                      f"first difference at {off + bad:#x}")

    def op_truncate(self) -> None:
        if self.rng.random() < 0.5:
            size = self.rng.randrange(0, MAXLEN + 1)
        else:                                   # near the current size, either way
            size = max(0, min(MAXLEN, len(self.model) + self.rng.randrange(-3 * ALIGN, 3 * ALIGN)))
        how = self.rng.choice(["ftruncate", "truncate"])
        self.log.append(f"{how} {len(self.model):#x} -> {size:#x}")
        if how == "ftruncate":
            os.ftruncate(self.fd, size)
        else:
            os.truncate(self.path, size)
        self.resize_model(size)

    def op_fallocate(self) -> None:
        off, n = self.span(MAXLEN)
        self.log.append(f"posix_fallocate {off:#x} +{n:#x}")
        try:
            os.posix_fallocate(self.fd, off, n)
        except OSError as e:
            self.fail(f"posix_fallocate {off:#x} +{n:#x}: {e}")
        if off + n > len(self.model):
            self.resize_model(off + n)

    def op_copy_range(self) -> None:
        size = len(self.model)
        if size == 0:
            return self.op_write()
        src, n = self.span(size)
        dst, _ = self.span(MAXLEN - n)
        if src < dst + n and dst < src + n:     # overlapping ranges in one file: EINVAL
            return
        self.log.append(f"copy_file_range {src:#x} -> {dst:#x} +{n:#x}")
        try:
            got = os.copy_file_range(self.fd, self.fd, n, src, dst)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                self.disabled.add("copy_range")
                self.log.append(f"  copy_file_range unsupported ({e}): disabled")
                return
            self.fail(f"copy_file_range: {e}")
        self.set_model(dst, bytes(self.model[src:src + got]))

    def op_mapread(self) -> None:
        size = len(self.model)
        if size == 0:
            return self.op_read()
        off, n = self.span(size)
        self.log.append(f"mapread {off:#x} +{n:#x}")
        with mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            got = mm[off:off + n]
        if got != self.model[off:off + n]:
            self.fail(f"mapread {off:#x} +{n:#x} differs from the model")

    def op_mapwrite(self) -> None:
        off, n = self.span(MAXLEN)
        data = self.rng.randbytes(n)
        self.log.append(f"mapwrite {off:#x} +{n:#x} (size {len(self.model):#x})")
        if off + n > len(self.model):           # a mapping cannot extend the file
            os.ftruncate(self.fd, off + n)
            self.resize_model(off + n)
        with mmap.mmap(self.fd, len(self.model), mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[off:off + n] = data
            mm.flush()                          # msync(MS_SYNC)
        self.set_model(off, data)

    def op_reopen(self) -> None:
        self.log.append("close/open")
        self.close()
        self.open()

    def op_checkpoint(self) -> None:
        self.log.append("checkpoint")
        want = bytes(self.model)
        n = self.m.checkpoint(f"fsx {self.opno}")
        self.m.wait(n)
        self.counts["checkpoint"] += 1
        got = (self.m.tree / NAME).read_bytes()
        if got != want:
            self.fail(f"checkpoint {n}: the shadow ({len(got)} bytes) differs from the model "
                      f"({len(want)} bytes) as it was at the trigger")

    # -------------------------------------------------------------- the run

    def run(self, ops: int) -> None:
        table = [("write", 30, self.op_write), ("read", 25, self.op_read),
                 ("truncate", 8, self.op_truncate), ("zero", 5, self.op_zero),
                 ("reopen", 3, self.op_reopen)]
        if not self.direct:
            table += [("fallocate", 4, self.op_fallocate), ("copy_range", 4, self.op_copy_range)]
        if self.use_mmap:
            table += [("mapread", 8, self.op_mapread), ("mapwrite", 8, self.op_mapwrite)]
        self.open()
        try:
            for self.opno in range(1, ops + 1):
                live = [(name, w, fn) for name, w, fn in table if name not in self.disabled]
                name, _, fn = self.rng.choices(live, weights=[w for _, w, _ in live])[0]
                fn()
                self.counts[name] += 1
                self.check_size()
                if self.rng.random() < 1 / 300:
                    self.op_checkpoint()
            self.op_checkpoint()
            whole = self.pread_all()
            if whole != self.model:
                self.fail("reading the whole file through the mount differs from the model")
        finally:
            self.close()
            self.buf.close()

    def pread_all(self) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            out = bytearray()
            while True:
                b = os.pread(fd, 1 << 20, len(out))
                if not b:
                    return bytes(out)
                out += b
        finally:
            os.close(fd)


def refuses_o_direct(directory: Path) -> str | None:
    probe = directory / ".fsx-odirect-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:
        return f"{directory} refuses O_DIRECT ({e})"
    os.close(fd)
    os.unlink(probe)
    return None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsx(dirs: Mounted, variant: str) -> None:
    if VARIANTS[variant]["direct"] and (why := refuses_o_direct(dirs.source)):
        pytest.skip(why)
    seed = int(os.environ.get("FJ_FSX_SEED") or random.SystemRandom().randrange(1 << 32))
    ops = int(os.environ.get("FJ_FSX_OPS", "3000"))
    print(f"fsx {variant}: seed {seed} (FJ_FSX_SEED={seed}), {ops} operations")
    dirs.mount()
    fsx = Fsx(dirs, seed, variant)
    fsx.run(ops)
    print(f"fsx {variant}: {dict(sorted(fsx.counts.items()))}; disabled: {sorted(fsx.disabled) or 'none'}")
    where = f"fsx {variant} seed={seed}"
    model = bytes(fsx.model)
    assert (dirs.source / NAME).read_bytes() == model, f"{where}: the original differs from the model"
    assert (dirs.tree / NAME).read_bytes() == model, f"{where}: the shadow differs from the model"
    assert_same(snapshot(dirs.source), snapshot(dirs.tree))
    a, b = sparse_map(dirs.source / NAME), sparse_map(dirs.tree / NAME)
    assert a == b, f"{where}: sparse maps differ:\n  original {a}\n  shadow   {b}"
    dirs.umount()
