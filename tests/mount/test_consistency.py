"""Consistency of checkpoints under concurrency, and against a model.

1. Writer *processes* mutate their own subtrees through the mount while the
   test takes checkpoints at random moments; every checkpoint must contain
   each op that completed before the trigger started, none that started after
   it returned, and (per writer) exactly a prefix of the writer's sequence.
2. A hypothesis state machine runs random operations through a real mount,
   checks the original against a pure-Python model, and at every checkpoint
   compares the shadow with a snapshot of the original taken at that point.
3. Checkpoints fired back to back (from two threads) while threads hammer the
   mount neither deadlock nor lose anything.

Plus minimal reproductions, marked xfail(strict), of the bugs these tests found.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from fusejournal.layout import LOG_DIR

from conftest import Mounted, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

UPDATE = b"user.fusejournal.update_permission"
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    if _libc.renameat2(-100, old, -100, new, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# ----------------------------------------------------------------- helpers

def trigger(m: Mounted, label: str) -> tuple[int, float, float]:
    """Take a checkpoint; return (id, monotonic before the trigger, after it returned)."""
    t0 = time.monotonic()
    os.setxattr(m.mountpoint, UPDATE, label.encode())
    t1 = time.monotonic()
    return int(os.getxattr(m.mountpoint, b"user.fusejournal.checkpoint")), t0, t1


def wait_applied(m: Mounted, n: int, timeout: float = 30.0) -> int:
    """Like ``fusejournal wait --checkpoint N`` but without a process start per call."""
    deadline = time.monotonic() + timeout
    while True:
        st = m.status()
        applied = st["shadow_checkpoint"]
        if applied >= n:
            return applied
        assert not st.get("updater_error"), f"the updater stopped: {st['updater_error']}"
        assert time.monotonic() < deadline, f"the shadow stands at {applied}, waited {timeout} s for {n}"
        time.sleep(0.005)


def shadow_at(m: Mounted) -> int:
    return int(os.getxattr(m.mountpoint, b"user.fusejournal.shadow_checkpoint"))


# ======================================================= 1. concurrent writers

# Every op is exactly one mutating system call (one FUSE request), so an op is
# either wholly in a checkpoint or wholly out of it.  The writer logs, per op,
# what it did and CLOCK_MONOTONIC before the call and after it returned.
WRITER = r'''
import json, os, random, sys, time
base, seed, logpath, stopfile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = random.Random(seed)
os.umask(0)
out = open(logpath, "w", buffering=1)
files = {}           # name -> size (model of this writer's own directory, for choosing ops)
inode_of = {}        # name -> inode id (hard links share one)
seq = 0
logfd = None

def P(name):
    return os.path.join(base, name)

def run(kind, args, fn):
    global seq
    t0 = time.monotonic()
    fn()
    t1 = time.monotonic()
    out.write(json.dumps([seq, kind, args, t0, t1]) + "\n")
    seq += 1

run("mkdir", [], lambda: os.mkdir(base, 0o755))
def mklog():
    global logfd
    logfd = os.open(P("log"), os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND, 0o644)
run("mklog", [], mklog)

while not os.path.exists(stopfile):
    names = sorted(files)
    r = rng.random()
    if r < 0.30:
        line = b"%d\n" % seq
        run("append", [line.decode()], lambda: os.write(logfd, line))
    elif r < 0.45 or len(names) < 2:
        name = "f%d" % seq
        mode = rng.choice([0o600, 0o640, 0o644, 0o755])
        def create():
            os.close(os.open(P(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
        run("create", [name, mode], create)
        files[name] = 0
    elif r < 0.62:
        name = rng.choice(names)
        data = b"<%d>" % seq
        off = rng.randint(0, files[name] + 16)
        fd = os.open(P(name), os.O_WRONLY)
        try:
            run("pwrite", [name, off, data.decode()], lambda: os.pwrite(fd, data, off))
        finally:
            os.close(fd)
        for n2 in names:
            if inode_of.get(n2, n2) == inode_of.get(name, name):
                files[n2] = max(files[n2], off + len(data))
    elif r < 0.70:
        name = rng.choice(names)
        size = rng.randint(0, 40)
        run("truncate", [name, size], lambda: os.truncate(P(name), size))
        for n2 in names:
            if inode_of.get(n2, n2) == inode_of.get(name, name):
                files[n2] = size
    elif r < 0.78:
        a = rng.choice(names)
        b = rng.choice(names) if rng.random() < 0.4 else "r%d" % seq
        run("rename", [a, b], lambda: os.rename(P(a), P(b)))
        if inode_of.get(a, a) != inode_of.get(b, b) or b not in files:
            files[b] = files.pop(a)
            key = inode_of.pop(a, a)
            inode_of[b] = key
    elif r < 0.84:
        a = rng.choice(names)
        b = "h%d" % seq
        run("link", [a, b], lambda: os.link(P(a), P(b)))
        key = inode_of.setdefault(a, a)
        inode_of[b] = key
        files[b] = files[a]
    elif r < 0.92 and len(names) > 3:
        a = rng.choice(names)
        run("unlink", [a], lambda: os.unlink(P(a)))
        del files[a]
        inode_of.pop(a, None)
    else:
        a = rng.choice(names)
        mode = rng.choice([0o600, 0o604, 0o640, 0o644, 0o700, 0o755])
        run("chmod", [a, mode], lambda: os.chmod(P(a), mode))
    if rng.random() < 0.3:
        time.sleep(rng.random() * 0.004)
out.close()
'''


class WriterModel:
    """The state of one writer's directory after each prefix of its ops."""

    def __init__(self) -> None:
        self.exists = False
        self.names: dict[str, int] = {}            # name -> inode id
        self.inodes: dict[int, list] = {}          # inode id -> [bytearray, mode]
        self.next = 0

    def _new(self, mode: int) -> int:
        self.next += 1
        self.inodes[self.next] = [bytearray(), mode]
        return self.next

    def apply(self, kind: str, args: list) -> None:
        if kind == "mkdir":
            self.exists = True
        elif kind == "mklog":
            self.names["log"] = self._new(0o644)
        elif kind == "append":
            self.inodes[self.names["log"]][0] += args[0].encode()
        elif kind == "create":
            self.names[args[0]] = self._new(args[1])
        elif kind == "pwrite":
            name, off, data = args
            buf = self.inodes[self.names[name]][0]
            if len(buf) < off:
                buf += bytes(off - len(buf))
            buf[off:off + len(data)] = data.encode()
        elif kind == "truncate":
            buf = self.inodes[self.names[args[0]]][0]
            size = args[1]
            if size < len(buf):
                del buf[size:]
            else:
                buf += bytes(size - len(buf))
        elif kind == "rename":
            a, b = args
            if self.names.get(b) != self.names[a]:
                self.names[b] = self.names.pop(a)
        elif kind == "link":
            self.names[args[1]] = self.names[args[0]]
        elif kind == "unlink":
            del self.names[args[0]]
        elif kind == "chmod":
            self.inodes[self.names[args[0]]][1] = args[1]
        else:
            raise AssertionError(kind)

    def state(self):
        if not self.exists:
            return None
        groups: dict[int, list[str]] = {}
        for n, i in self.names.items():
            groups.setdefault(i, []).append(n)
        files = frozenset((n, bytes(self.inodes[i][0]), self.inodes[i][1]) for n, i in self.names.items())
        links = frozenset(frozenset(g) for g in groups.values() if len(g) > 1)
        return files, links


def observe(d: Path):
    """The same facts as :meth:`WriterModel.state`, read from a real directory."""
    if not d.exists():
        return None
    files = set()
    groups: dict[int, list[str]] = {}
    for n in os.listdir(d):
        st = os.lstat(d / n)
        assert stat.S_ISREG(st.st_mode), (d / n, st)
        files.add((n, (d / n).read_bytes(), stat.S_IMODE(st.st_mode)))
        groups.setdefault(st.st_ino, []).append(n)
    return frozenset(files), frozenset(frozenset(g) for g in groups.values() if len(g) > 1)


def check_writer(name: str, ops: list, cps: list) -> list[str]:
    """Check one writer's log against what each checkpoint showed of its directory.

    ``ops``: [seq, kind, args, t_start, t_end]; ``cps``: (n, t0, t1, observed state).
    For checkpoint n the visible prefix length k (ops 0..k-1 applied) must satisfy
    k >= 1 + last op with t_end < t0 and k <= first op with t_start > t1, and the
    observed state must equal the model state after some such prefix.
    """
    errors = []
    model = WriterModel()
    states = [model.state()]                 # states[k] = after ops 0..k-1
    for _seq, kind, args, _, _ in ops:
        model.apply(kind, args)
        states.append(model.state())
    for n, t0, t1, seen in cps:
        lo = max((i + 1 for i, op in enumerate(ops) if op[4] < t0), default=0)
        hi = min((i for i, op in enumerate(ops) if op[3] > t1), default=len(ops))
        match = [k for k in range(len(states)) if states[k] == seen]
        ok = [k for k in match if lo <= k <= hi]
        if not ok:
            errors.append(f"{name} checkpoint {n}: visible prefix must be in [{lo}, {hi}] of "
                          f"{len(ops)} ops; the shadow matches prefixes {match[:10]}"
                          + ("" if match else " (none: not a prefix of the writer's sequence)"))
    return errors


def test_concurrent_writers_checkpoints_are_cuts(mounted: Mounted, tmp_path: Path) -> None:
    m = mounted
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    stop = tmp_path / "stop"
    nwriters = 4
    logs = [tmp_path / f"writer{i}.jsonl" for i in range(nwriters)]
    procs: list[subprocess.Popen] = []
    cps: list[tuple[int, float, float, list]] = []
    try:
        for i in range(nwriters):
            procs.append(subprocess.Popen(
                [sys.executable, os.fspath(script), os.fspath(m.mountpoint / f"w{i}"),
                 str(rng.randrange(1 << 30)), os.fspath(logs[i]), os.fspath(stop)],
                stderr=subprocess.PIPE))
        time.sleep(rng.uniform(0.0, 0.3))     # the first checkpoint may catch writers starting
        for c in range(5):
            n, t0, t1 = trigger(m, f"cut{c}")
            assert wait_applied(m, n) == n
            # The shadow only moves on a checkpoint, and only this test takes them.
            seen = [observe(m.tree / f"w{i}") for i in range(nwriters)]
            assert shadow_at(m) == n
            cps.append((n, t0, t1, seen))
            time.sleep(rng.uniform(0.2, 1.5))
        deadline = time.monotonic() + 60          # (writers started late on a loaded machine)
        while any(not lg.exists() or lg.read_bytes().count(b"\n") <= 50 for lg in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        stop.touch()
        for p in procs:
            _, err = p.communicate(timeout=20)
            assert p.returncode == 0, f"writer failed: {err.decode(errors='replace')}"
    finally:
        stop.touch()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    errors = []
    for i in range(nwriters):
        ops = [json.loads(line) for line in logs[i].read_text().splitlines()]
        assert [op[0] for op in ops] == list(range(len(ops)))
        assert len(ops) > 50, f"writer {i} did only {len(ops)} ops"
        errors += check_writer(f"w{i}", ops, [(n, t0, t1, seen[i]) for n, t0, t1, seen in cps])
        # the original itself is the writer's model after all its ops
        model = WriterModel()
        for op in ops:
            model.apply(op[1], op[2])
        assert observe(m.mountpoint / f"w{i}") == model.state(), f"w{i}: original differs from model"
    assert not errors, "\n".join(errors)

    n, _, _ = trigger(m, "final")
    expected = snapshot(m.mountpoint)
    wait_applied(m, n)
    assert_same(expected, snapshot(m.tree))


# ================================================== 2. a model, and hypothesis

NAMES = ["a", "b", "c", "d", "e"]
MODES = [0o000, 0o400, 0o600, 0o644, 0o640, 0o700, 0o755, 0o777, 0o1777, 0o2755, 0o4755, 0o6711]
IDS = [0, 1000, 1234, 65534]
XNAMES = [b"user.a", b"user.b", b"user.long.name"]


class Obj:
    """One object of the model: kind 'file' | 'dir' | 'symlink' | 'fifo'."""

    def __init__(self, kind: str, mode: int, target: bytes = b"") -> None:
        self.kind = kind
        self.mode = mode
        self.data = bytearray()
        self.target = target
        self.xattrs: dict[bytes, bytes] = {}


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class JournaledTree(RuleBasedStateMachine):
    """Random operations through a real mount, in a fresh subdirectory per example.

    ``self.names`` (path -> Obj, hard links share one Obj) and ``self.fds``
    (open fds -> Obj, also of unlinked files) are the model of the original.
    At every checkpoint the shadow's copy of the subdirectory must equal a
    snapshot of the original's taken when the checkpoint returned.
    """

    m: Mounted
    examples = 0
    checkpoints = 0
    steps = 0

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        cls.examples += 1
        self.rel = f"ex{cls.examples}"
        self.root = os.fsencode(self.m.mountpoint / self.rel)
        os.mkdir(self.root, 0o755)
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        self.names: dict[str, Obj] = {"": Obj("dir", 0o755)}
        self.fds: list[tuple[int, Obj]] = []

    def p(self, path: str) -> bytes:
        return self.root + b"/" + path.encode() if path else self.root

    # ------------------------------------------------------------ choosing
    def _pick(self, data, kinds: tuple[str, ...], root: bool = False) -> str | None:
        cands = sorted(p for p, o in self.names.items() if o.kind in kinds and (root or p))
        return data.draw(st.sampled_from(cands)) if cands else None

    def _new_path(self, data) -> str:
        return _join(self._pick(data, ("dir",), root=True), data.draw(st.sampled_from(NAMES)))

    def _new_mode(self, mode: int, parent: str, is_dir: bool) -> int:
        if not is_dir:
            return mode & ~self.umask & 0o7777
        mode &= ~self.umask & 0o1777       # mkdir(2) ignores S_ISUID and S_ISGID ...
        if self.names[parent].mode & 0o2000:
            mode |= 0o2000                 # ... but a setgid parent passes S_ISGID on
        return mode

    # ------------------------------------------------------------ creating
    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o644, 0o755, 0o4755, 0o000]),
          content=st.binary(max_size=3000))
    def create(self, data, mode, content) -> None:
        path = self._new_path(data)
        if path in self.names:
            with pytest.raises(FileExistsError):
                os.open(self.p(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
            return
        fd = os.open(self.p(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        o = self.names[path] = Obj("file", self._new_mode(mode, _parent(path), False))
        o.data += content

    @rule(data=st.data(), mode=st.sampled_from([0o755, 0o700, 0o2775, 0o1777]))
    def mkdir(self, data, mode) -> None:
        path = self._new_path(data)
        if path in self.names:
            with pytest.raises(FileExistsError):
                os.mkdir(self.p(path), mode)
            return
        os.mkdir(self.p(path), mode)
        self.names[path] = Obj("dir", self._new_mode(mode, _parent(path), True))

    @rule(data=st.data(), dest=st.sampled_from([b"a", b"../x", b"/etc/passwd", b"d/e/f", b"\xff\xfe"]))
    def symlink(self, data, dest) -> None:
        path = self._new_path(data)
        if path in self.names:
            return
        os.symlink(dest, self.p(path))
        self.names[path] = Obj("symlink", 0o777, dest)

    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o644, 0o2640]))
    def mkfifo(self, data, mode) -> None:
        path = self._new_path(data)
        if path in self.names:
            return
        os.mkfifo(self.p(path), mode)
        self.names[path] = Obj("fifo", mode & ~self.umask & 0o7777)

    @rule(data=st.data())
    def link(self, data) -> None:
        src = self._pick(data, ("file",))
        if src is None:
            return
        dst = self._new_path(data)
        if dst in self.names:
            return
        os.link(self.p(src), self.p(dst))
        self.names[dst] = self.names[src]

    # ------------------------------------------------------------ contents
    @rule(data=st.data(), off=st.integers(0, 70_000), buf=st.binary(min_size=1, max_size=5000))
    def write(self, data, off, buf) -> None:
        path = self._pick(data, ("file",))
        if path is None:
            return
        fd = os.open(self.p(path), os.O_WRONLY)
        try:
            assert os.pwrite(fd, buf, off) == len(buf)
        finally:
            os.close(fd)
        self._model_write(self.names[path], off, buf)
        assert self._read(path) == bytes(self.names[path].data)

    @staticmethod
    def _model_write(o: Obj, off: int, buf: bytes) -> None:
        if len(o.data) < off:
            o.data += bytes(off - len(o.data))
        o.data[off:off + len(buf)] = buf

    @staticmethod
    def _model_truncate(o: Obj, size: int) -> None:
        if size < len(o.data):
            del o.data[size:]
        else:
            o.data += bytes(size - len(o.data))

    @rule(data=st.data(), buf=st.binary(max_size=2000), append=st.booleans(),
          big=st.sampled_from([0, 0, 0, 200_000, 1_100_000]))
    def rewrite(self, data, buf, append, big) -> None:
        """open(O_TRUNC) or open(O_APPEND), then write (big: more than one FUSE write)."""
        path = self._pick(data, ("file",))
        if path is None:
            return
        buf += bytes([len(buf) % 251]) * big
        fd = os.open(self.p(path), os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
        try:
            assert os.write(fd, buf) == len(buf)
        finally:
            os.close(fd)
        o = self.names[path]
        if not append:
            del o.data[:]
        o.data += buf

    @rule(data=st.data(), size=st.integers(0, 90_000))
    def truncate(self, data, size) -> None:
        path = self._pick(data, ("file",))
        if path is None:
            return
        os.truncate(self.p(path), size)
        self._model_truncate(self.names[path], size)

    @precondition(lambda self: len(self.fds) < 4)
    @rule(data=st.data())
    def open_fd(self, data) -> None:
        path = self._pick(data, ("file",))
        if path is None:
            return
        self.fds.append((os.open(self.p(path), os.O_RDWR), self.names[path]))

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), off=st.integers(0, 20_000), buf=st.binary(min_size=1, max_size=2000),
          trunc=st.none() | st.integers(0, 30_000))
    def write_fd(self, data, off, buf, trunc) -> None:
        fd, o = data.draw(st.sampled_from(self.fds))
        if trunc is not None:
            os.ftruncate(fd, trunc)
            self._model_truncate(o, trunc)
        assert os.pwrite(fd, buf, off) == len(buf)
        self._model_write(o, off, buf)

    @precondition(lambda self: self.fds)
    @rule(data=st.data())
    def close_fd(self, data) -> None:
        i = data.draw(st.integers(0, len(self.fds) - 1))
        fd, o = self.fds.pop(i)
        assert os.pread(fd, len(o.data) + 10, 0) == bytes(o.data)
        os.close(fd)

    # ------------------------------------------------------------ names
    @rule(data=st.data())
    def unlink(self, data) -> None:
        path = self._pick(data, ("file", "symlink", "fifo"))
        if path is None:
            return
        os.unlink(self.p(path))
        del self.names[path]

    @rule(data=st.data())
    def rmdir(self, data) -> None:
        path = self._pick(data, ("dir",))
        if path is None:
            return
        if any(q.startswith(path + "/") for q in self.names):
            with pytest.raises(OSError) as e:
                os.rmdir(self.p(path))
            assert e.value.errno == errno.ENOTEMPTY
            return
        os.rmdir(self.p(path))
        del self.names[path]

    @rule(data=st.data(), noreplace=st.booleans())
    def rename2(self, data, noreplace) -> None:
        """renameat2 RENAME_EXCHANGE of two entries, or RENAME_NOREPLACE onto a free name."""
        a = self._pick(data, ("file", "dir", "symlink", "fifo"))
        if a is None:
            return
        if noreplace:
            b = self._new_path(data)
            if b in self.names or b.startswith(a + "/"):
                with pytest.raises(OSError) as e:
                    renameat2(self.p(a), self.p(b), 1)
                assert e.value.errno in (errno.EEXIST, errno.EINVAL)
                return
            renameat2(self.p(a), self.p(b), 1)
            self._move({a: b})
            return
        b = self._pick(data, ("file", "dir", "symlink", "fifo"))
        if a == b or b.startswith(a + "/") or a.startswith(b + "/"):
            return                                      # EINVAL: one contains the other
        renameat2(self.p(a), self.p(b), 2)
        self._move({a: b, b: a})

    def _move(self, moves: dict[str, str]) -> None:
        """Move whole subtrees at once: {old path: new path}."""
        out = {}
        for q in list(self.names):
            for src, dst in moves.items():
                if q == src or q.startswith(src + "/"):
                    out[dst + q[len(src):]] = self.names.pop(q)
                    break
        self.names.update(out)

    @rule(data=st.data())
    def rename(self, data) -> None:
        src = self._pick(data, ("file", "dir", "symlink", "fifo"))
        if src is None:
            return
        if data.draw(st.booleans()):
            dst = self._pick(data, ("file", "dir", "symlink", "fifo"))     # over an existing entry
        else:
            dst = self._new_path(data)
        so, do = self.names[src], self.names.get(dst)
        if so.kind == "dir" and (dst == src or dst.startswith(src + "/")):
            if dst != src:
                with pytest.raises(OSError) as e:
                    os.rename(self.p(src), self.p(dst))
                assert e.value.errno == errno.EINVAL
            return
        if do is not None:
            if src.startswith(dst + "/"):
                return                                  # over an ancestor: ENOTEMPTY
            if (so.kind == "dir") != (do.kind == "dir"):
                with pytest.raises(OSError) as e:
                    os.rename(self.p(src), self.p(dst))
                assert e.value.errno in (errno.EISDIR, errno.ENOTDIR)
                return
            if do.kind == "dir" and any(q.startswith(dst + "/") for q in self.names):
                with pytest.raises(OSError) as e:
                    os.rename(self.p(src), self.p(dst))
                assert e.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
                return
        os.rename(self.p(src), self.p(dst))
        if do is so:
            return                                      # hard links of one file: nothing happens
        for q in [q for q in self.names if q == dst or q.startswith(dst + "/")]:
            del self.names[q]
        self._move({src: dst})

    # ------------------------------------------------------------ attributes
    @rule(data=st.data(), mode=st.sampled_from(MODES))
    def chmod(self, data, mode) -> None:
        path = self._pick(data, ("file", "dir", "fifo"), root=True)
        os.chmod(self.p(path), mode)
        self.names[path].mode = mode

    @rule(data=st.data(), uid=st.sampled_from(IDS), gid=st.sampled_from(IDS))
    def chown(self, data, uid, gid) -> None:
        path = self._pick(data, ("file", "dir", "symlink", "fifo"))
        if path is None:
            return
        os.chown(self.p(path), uid, gid, follow_symlinks=False)
        o = self.names[path]
        if o.kind in ("file", "fifo"):
            # chown drops setuid (and setgid when group-executable); adopt what the kernel did
            mode = stat.S_IMODE(os.lstat(self.p(path)).st_mode)
            assert mode & ~0o6000 == o.mode & ~0o6000 and mode & ~o.mode == 0, (oct(mode), oct(o.mode))
            o.mode = mode

    @rule(data=st.data(), atime=st.integers(0, 2**33), mtime=st.integers(-2**31 + 1, 2**33),
          ans=st.integers(0, 999_999_999), mns=st.integers(0, 999_999_999))
    def utime(self, data, atime, mtime, ans, mns) -> None:
        path = self._pick(data, ("file", "dir", "symlink", "fifo"), root=True)
        ns = (atime * 10**9 + ans, mtime * 10**9 + mns)
        os.utime(self.p(path), ns=ns, follow_symlinks=False)
        assert os.lstat(self.p(path)).st_mtime_ns == ns[1]

    @rule(data=st.data(), name=st.sampled_from(XNAMES), value=st.binary(max_size=300))
    def setxattr(self, data, name, value) -> None:
        path = self._pick(data, ("file", "dir"), root=True)
        os.setxattr(self.p(path), name, value)
        self.names[path].xattrs[name] = value

    @rule(data=st.data())
    def removexattr(self, data) -> None:
        cands = sorted((p, n) for p, o in self.names.items() if o.kind != "symlink" for n in o.xattrs)
        if not cands:
            return
        path, name = data.draw(st.sampled_from(cands))
        os.removexattr(self.p(path), name)
        del self.names[path].xattrs[name]

    # ------------------------------------------------------------ checking
    def _read(self, path: str) -> bytes:
        with open(self.p(path), "rb") as f:
            return f.read()

    def check_model(self) -> None:
        """The original, read through the mount, is what the model says."""
        seen: dict[str, os.stat_result] = {}

        def walk(path: str) -> None:
            for n in os.listdir(self.p(path)):
                q = _join(path, os.fsdecode(n))
                st_ = seen[q] = os.lstat(self.p(q))
                if stat.S_ISDIR(st_.st_mode):
                    walk(q)
        walk("")
        assert sorted(seen) == sorted(p for p in self.names if p), "names differ from the model"
        inos: dict[int, int] = {}
        for path, st_ in seen.items():
            o = self.names[path]
            kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
                    stat.S_IFIFO: "fifo"}[stat.S_IFMT(st_.st_mode)]
            assert kind == o.kind, path
            assert inos.setdefault(st_.st_ino, id(o)) == id(o), f"{path}: hard links differ from the model"
            if kind == "symlink":
                assert os.readlink(self.p(path)) == o.target
                continue
            assert stat.S_IMODE(st_.st_mode) == o.mode, (path, oct(st_.st_mode), oct(o.mode))
            got = {os.fsencode(n): os.getxattr(self.p(path), n)
                   for n in os.listxattr(self.p(path)) if n.startswith("user.")}
            assert got == o.xattrs, path
            if kind == "file":
                assert st_.st_size == len(o.data), path
                assert self._read(path) == bytes(o.data), path
        assert len(set(id(o) for p, o in self.names.items() if p and o.kind == "file")) == \
            len({s.st_ino for s in seen.values() if stat.S_ISREG(s.st_mode)})

    def compare_shadow(self) -> None:
        m = self.m
        n, _, _ = trigger(m, f"{self.rel}")
        expected = snapshot(self.p(""))
        wait_applied(m, n)
        assert_same(expected, snapshot(m.tree / self.rel))
        type(self).checkpoints += 1

    @invariant()
    def count_steps(self) -> None:
        type(self).steps += 1

    @rule()
    def checkpoint(self) -> None:
        self.check_model()
        self.compare_shadow()

    def teardown(self) -> None:
        try:
            self.check_model()
            self.compare_shadow()
        finally:
            for fd, _ in self.fds:
                os.close(fd)
            self.fds.clear()


def test_random_operations_against_model(dirs: Mounted) -> None:
    # a small memory limit and small segments: batches spill and the log rotates often
    dirs.mount("--memory-limit", "256K", "--segment-limit", "1M")
    JournaledTree.m = dirs
    JournaledTree.examples = JournaledTree.checkpoints = JournaledTree.steps = 0
    run_state_machine_as_test(JournaledTree, settings=settings(
        max_examples=int(os.environ.get("FJ_MODEL_EXAMPLES", "40")), stateful_step_count=40,
        deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.filter_too_much]))
    assert JournaledTree.checkpoints >= JournaledTree.examples


# ============================================= 3. checkpoints under a hammering

@pytest.mark.parametrize("limits", [[], ["--memory-limit", "1M", "--segment-limit", "4M"]],
                         ids=["defaults", "spilling"])
def test_back_to_back_checkpoints_under_load_do_not_deadlock(dirs: Mounted, limits: list[str]) -> None:
    """4 threads write (small and multi-request writes, truncates, renames, creates,
    unlinks) while two threads fire checkpoints back to back; everything finishes,
    and the final shadow equals the original."""
    m = dirs
    m.mount(*limits)
    mp = m.mountpoint
    stop = threading.Event()
    errors: list[BaseException] = []
    done = {"ops": 0, "checkpoints": 0}
    lock = threading.Lock()

    def writer(k: int) -> None:
        rng = random.Random(k)
        d = mp / f"t{k}"
        try:
            d.mkdir()
            (mp / f"root{k}").write_bytes(b"")
            fd = os.open(d / "big", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                i = 0
                while not stop.is_set():
                    r = rng.random()
                    if r < 0.35:
                        os.pwrite(fd, os.urandom(rng.choice([100, 4096, 70_000])), rng.randrange(1 << 21))
                    elif r < 0.45:      # more than one FUSE WRITE request: blocked mid-operation
                        os.pwrite(fd, bytes([i % 256]) * (3 << 20), rng.randrange(1 << 20))
                    elif r < 0.5:
                        os.ftruncate(fd, rng.randrange(1 << 22))
                    elif r < 0.6:
                        (d / f"f{i}").write_bytes(b"x" * rng.randrange(10_000))
                    elif r < 0.7:
                        names = os.listdir(d)
                        if len(names) > 2:
                            a = rng.choice([n for n in names if n != "big"] or ["none"])
                            os.rename(d / a, d / f"r{i}")
                    elif r < 0.8:
                        names = [n for n in os.listdir(d) if n != "big"]
                        if len(names) > 5:
                            os.unlink(d / rng.choice(names))
                    elif r < 0.9:       # namespace ops in the mount root, whose inode the setxattr locks
                        os.rename(mp / f"root{k}", mp / f"root{k}.tmp")
                        os.rename(mp / f"root{k}.tmp", mp / f"root{k}")
                    else:
                        os.fsync(fd)
                    i += 1
            finally:
                os.close(fd)
            with lock:
                done["ops"] += i
        except BaseException as e:        # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def checkpointer(k: int, count: int) -> None:
        try:
            for c in range(count):
                os.setxattr(mp, UPDATE, f"hammer-{k}-{c}".encode())
                with lock:
                    done["checkpoints"] += 1
        except BaseException as e:        # noqa: BLE001
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(4)]
    cps = [threading.Thread(target=checkpointer, args=(k, 10), daemon=True) for k in range(2)]
    try:
        for t in writers:
            t.start()
        time.sleep(0.3)
        for t in cps:
            t.start()
        # a deadlock is no checkpoint returning for 60 s (not a total: a loaded disk is slow)
        seen, since = -1, time.monotonic()
        while any(t.is_alive() for t in cps) and time.monotonic() - since < 60:
            if done["checkpoints"] != seen:
                seen, since = done["checkpoints"], time.monotonic()
            time.sleep(0.05)
        assert not any(t.is_alive() for t in cps), \
            f"checkpoints stuck (deadlock?): {done['checkpoints']} of 20 returned; status {m.status()}"
    finally:
        stop.set()
        for t in writers:
            t.join(timeout=20)
    assert not any(t.is_alive() for t in writers), "writers stuck (deadlock?)"
    assert not errors, errors
    assert done["checkpoints"] == 20
    st = m.status()
    assert st["last_checkpoint"] == 20 and not st["checkpoint_error"], st
    n = m.checkpoint("final")
    expected = snapshot(mp)
    wait_applied(m, n, timeout=60)
    assert_same(expected, snapshot(m.tree))


# ============================================================ bugs found here

def test_far_future_mtime_does_not_poison_checkpoints(mounted: Mounted) -> None:
    m = mounted
    f = m.mountpoint / "future"
    f.write_bytes(b"x")
    os.utime(f, ns=(0, 10_000_000_000 * 10**9))           # year 2286: fine for ext4 (up to 2446)
    assert os.stat(f).st_mtime_ns == 10_000_000_000 * 10**9
    n = m.checkpoint("future")       # was EIO: times are stored as seconds + nanoseconds now
    expected = snapshot(m.mountpoint)
    wait_applied(m, n)
    assert_same(expected, snapshot(m.tree))


def test_root_directory_is_not_blocked_while_a_checkpoint_is_written(mounted: Mounted) -> None:
    """The setxattr that grants update permission holds the mount root's i_rwsem in the
    kernel until the batch is durable, so a create in the root waits for the whole
    setxattr.  It used to write the whole pending batch (192 MiB: seconds); now the
    streamer has written it into the log before, and the checkpoint writes only the
    tail and the marker (docs/design.md, "Streaming the log").  Counted, not timed: the
    bytes the checkpoint added to the log; the creates beside it complete."""
    m = mounted
    mp = m.mountpoint
    (mp / "sub").mkdir()
    block = os.urandom(1 << 20)
    fd = os.open(mp / "sub" / "big", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for _ in range(192):                               # a batch that took a while to write
            os.write(fd, block)
    finally:
        os.close(fd)
    deadline = time.monotonic() + 60
    while m.status()["streamed_unmarked_bytes"] < 190 << 20:   # streamed in the background
        assert time.monotonic() < deadline, m.status()
        time.sleep(0.05)
    log_dir = m.journal / LOG_DIR

    def log_bytes() -> int:
        return sum(p.stat().st_size for p in log_dir.iterdir() if p.is_file())
    tail = (192 << 20) - m.status()["streamed_unmarked_bytes"]      # at most this is left,
    before = log_bytes()                                           # (then measured)

    th = threading.Thread(target=os.setxattr, args=(mp, UPDATE, b"big"), daemon=True)
    th.start()
    (mp / "sub" / "in-subdir").write_bytes(b"")
    (mp / "in-root").write_bytes(b"")
    th.join(timeout=60)
    assert not th.is_alive()
    st = m.status()
    assert st["last_checkpoint"] == 1 and st["log_raw_bytes"] >= 192 << 20, st   # all of it in it
    # the checkpoint wrote the tail (random data: as large compressed), the creates and
    # the marker, not the 192 MiB again
    assert log_bytes() - before <= tail + (1 << 20), (log_bytes() - before, tail)
