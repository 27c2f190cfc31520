"""The activity log: write intents, made durable before the first change to a
pre-existing object in a checkpoint period.

The temporary store lives in memory; if the daemon is killed (or the power
fails) the operations it held are lost while the original tree has them.
Block replication solves this with an activity log, and so does fusejournal:

* Before the first mutating operation in a *period* (the time between two
  acquisitions) that touches an object which existed before that period — a
  file being written, truncated, chmod'ed …, or a directory whose entries
  change — the object's kernel file handle (``name_to_handle_at``) is appended
  to ``JOURNAL/activity/<period>.act`` and ``fdatasync``'ed.  Objects created
  in the period need no intent: their parent directory's intent covers them.
* The acquisition starts a new period under the halt.  When a checkpoint is
  durably in the ordered log, every period it closed is deleted.
* At restart after a crash (``daemon.json`` left behind), every remaining
  intent is resynced (:mod:`fusejournal.resync`): only those objects are
  compared between the original and the shadow, never the whole tree.

Cost: one ``fdatasync`` of a small file per pre-existing object per period
(the first write to each file after each checkpoint, the first change in each
directory), on the calling request.

Opening by handle needs CAP_DAC_READ_SEARCH.  A daemon without it (not run as
root) keeps the activity log **by inode number** (``sysc.INO_ONLY``: the same
entry, no handle, the same ``fdatasync``).  After a crash, the next mount finds
those inode numbers by one metadata walk of the original before it mounts
(:func:`hold_by_walk`, exact because nothing changes the original while it is
not mounted) and resyncs them as root's recovery does.  (Before 2026-12-02 such
a daemon kept no log outside the seed, and a crash left the shadow different
for files changed since the last checkpoint.)

While the shadow is seeded online (seeding.py), such a daemon keeps it **by fd**: the first touch of
an object in the seed dups the daemon's ``O_PATH`` fd of it and holds it until the
seed completes; its intent names that fd (``sysc.FD_HANDLE``: fd, st_dev, st_ino),
so the seed's rounds reopen the very object through it (``sysc.open_by_handle``),
wherever it was renamed meanwhile — the kernel keeps the fd on the object, as a
handle would.  The intent is still made durable first (a kill -9 leaves the
seed's dirty set on disk: the next mount finds those inode numbers by a walk of
the original before it mounts, :func:`hold_by_walk`).  Beyond the open-file
budget (:attr:`ActivityLog.budget`) an intent names the inode number only
(``sysc.INO_ONLY``): a round cannot reopen it and fails, so the seed never
completes on a guess (``status`` says to mount again).

Entry format (little endian): ``u64 ino, i32 handle_type, u8 is_dir, u8
handle_len, handle bytes, u32 crc32 of all before``; a torn or corrupt entry
ends the file's reading (it was never acknowledged).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import layout
from .sysc import FD_HANDLE, FD_HANDLE_FORMAT, INO_ONLY, fsync_dir, name_to_handle
from .treewalk import listdir as _listdir
from .treewalk import open_at

log = logging.getLogger(__name__)

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

SUFFIX = layout.ACTIVITY_SUFFIX
_HEAD = struct.Struct("<QiBB")
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class Intent:
    ino: int
    is_dir: bool
    handle_type: int
    handle: bytes


def format_period_name(period: int) -> str:
    return f"{period:016d}{SUFFIX}"


def parse_period_name(name: str) -> int | None:
    if not name.endswith(SUFFIX) or len(name) != 16 + len(SUFFIX) or not name[:16].isdigit():
        return None
    return int(name[:16])


def encode_intent(i: Intent) -> bytes:
    body = _HEAD.pack(i.ino, i.handle_type, int(i.is_dir), len(i.handle)) + i.handle
    return body + _CRC.pack(zlib.crc32(body))


def decode_intents(data: bytes) -> list[Intent]:
    out, pos = [], 0
    while pos + _HEAD.size <= len(data):
        ino, htype, is_dir, hlen = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + hlen
        if end + _CRC.size > len(data):
            break
        (crc,) = _CRC.unpack_from(data, end)
        if crc != zlib.crc32(data[pos:end]):
            break
        out.append(Intent(ino, bool(is_dir), htype, bytes(data[pos + _HEAD.size:end])))
        pos = end + _CRC.size
    return out


def handles_usable() -> bool:
    """Can this process open objects by handle (CAP_DAC_READ_SEARCH in its effective set)?
    A daemon without it keeps the activity log by fd, and only while seeding."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 2))
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def fd_budget() -> int:
    """How many objects a daemon without handles may hold open for the seed's dirty set:
    a quarter of the open-file limit (the inode cache takes half of the rest)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(64, soft // 4)


class ActivityLog:
    def __init__(self, directory: Path, *, enabled: bool = True, by_fd: bool = False,
                 by_ino: bool = False) -> None:
        self.dir = Path(directory)
        self.enabled = enabled
        self.by_fd = by_fd                 # no handles, seeding: hold each object's fd (docstring)
        self.by_ino = by_ino and not by_fd  # no handles: the inode number only (docstring)
        self.held: dict[int, int] = {}     # by fd: object inode number -> held O_PATH fd
        self.budget = fd_budget()          # held fds at most (by fd, or found by a walk)
        self.over_budget = 0
        self.period = 1
        self._fd = -1
        self.touched: set[int] = set()    # inode keys (files) and dir inode numbers, this period
        self._created: set[int] = set()    # objects created this period (covered by the parent)
        self.intents_written = 0

    def open(self) -> list[Intent]:
        """Read every period left by earlier runs; new periods number after them."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        intents: list[Intent] = []
        last = 0
        for name in sorted(os.listdir(self.dir)):
            p = parse_period_name(name)
            if p is None:
                continue
            last = max(last, p)
            with open(self.dir / name, "rb") as f:
                intents.extend(decode_intents(f.read()))
        self.period = last + 1
        return intents

    def periods_on_disk(self) -> list[int]:
        return sorted(p for p in (parse_period_name(n) for n in os.listdir(self.dir)) if p is not None)

    def touch(self, ino: int, fd: int, is_dir: bool) -> None:
        """Make an intent for a pre-existing object durable before it is changed.

        Called inline (no await) right before the system call; raises OSError
        if the intent cannot be made durable, so the operation fails before it
        touches the original tree.
        """
        if not self.enabled or ino in self.touched:
            return
        self.touched.add(ino)
        if ino in self._created:
            return
        try:
            if self.by_fd:
                htype, handle = self._hold(ino, fd)
            elif self.by_ino:
                htype, handle = INO_ONLY, b""        # found again by a walk (hold_by_walk)
            else:
                htype, handle = name_to_handle(fd)
            data = encode_intent(Intent(ino, is_dir, htype, handle))
            new = self._fd < 0
            if new:
                self._fd = os.open(self.dir / format_period_name(self.period),
                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            os.write(self._fd, data)
            os.fdatasync(self._fd)
            if new:
                fsync_dir(self.dir)
            self.intents_written += 1
        except OSError:
            self.touched.discard(ino)
            raise

    def _hold(self, ino: int, fd: int) -> tuple[int, bytes]:
        """By fd: the (pseudo) handle of the object behind ``fd``, held open from now on."""
        held = self.held.get(ino)
        if held is None:
            try:
                if len(self.held) >= self.budget:
                    raise OSError(errno.EMFILE, "the open-file budget is spent")
                held = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                self.over_budget += 1         # the operation goes on; the seed cannot complete
                return INO_ONLY, b""
            self.held[ino] = held
        st = os.fstat(held)
        return FD_HANDLE, FD_HANDLE_FORMAT.pack(held, st.st_dev, st.st_ino)

    def hold(self, ino: int, fd: int, is_dir: bool) -> Intent:
        """By fd: hold the object open ``fd`` (taking it over) and return its intent; nothing
        is written (the walk of :func:`hold_by_walk` finds objects an earlier run named)."""
        if ino in self.held or len(self.held) >= self.budget:
            os.close(fd)
            if ino not in self.held:
                self.over_budget += 1
                return Intent(ino, is_dir, INO_ONLY, b"")
            fd = self.held[ino]
        self.held[ino] = fd
        st = os.fstat(fd)
        return Intent(ino, is_dir, FD_HANDLE, FD_HANDLE_FORMAT.pack(fd, st.st_dev, st.st_ino))

    def release(self) -> None:
        """Close every held fd (the seed is done, or the daemon stops)."""
        held, self.held = self.held, {}
        for fd in held.values():
            os.close(fd)

    def seed_done(self, *, remove_periods: bool = False) -> None:
        """By fd, once the seed is complete: go on by inode number (the seed's held fds are
        closed).  The current period's intents stay: they name, by inode number as well,
        objects changed since the seed's final halt, which a crash would need.
        ``remove_periods``: the seed completed before the mount (nothing changed since it
        began), so every period on disk is dropped."""
        if not self.by_fd:
            return
        self.by_fd = False
        self.by_ino = True
        self.release()
        if remove_periods:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            for p in self.periods_on_disk():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / format_period_name(p))
            fsync_dir(self.dir)
            self.touched = set()

    def created(self, ino: int) -> None:
        if self.enabled:
            self._created.add(ino)
            self.touched.add(ino)

    def new_period(self) -> int:
        """Close the current period (under the halt, with the acquisition); return its number."""
        closed = self.period
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.period += 1
        self.touched = set()
        self._created = set()
        return closed

    def confirmed(self, up_to: int) -> None:
        """Every period <= up_to is covered by a durable checkpoint: forget them."""
        if not self.enabled:
            return
        removed = False
        for p in self.periods_on_disk():
            if p <= up_to and p != self.period:
                try:
                    os.unlink(self.dir / format_period_name(p))
                    removed = True
                except FileNotFoundError:
                    pass
        if removed:
            fsync_dir(self.dir)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.release()


def hold_by_walk(activity: ActivityLog, source_fd: int, intents: list[Intent]) -> list[Intent]:
    """By fd, before mounting: find the objects ``intents`` (left by an earlier run) name, by
    inode number, in a walk of the original from ``source_fd``, and hold them; return their
    intents (of this run).  Exact because nothing changes the original while it is not
    mounted: an object the walk does not find is gone (its directory's intent removes it).
    Metadata only (one ``getdents`` per directory, one ``lstat`` per entry); the walk stays
    on the original's filesystem."""
    want = {(i.ino, i.is_dir) for i in intents}
    out: list[Intent] = []
    root = os.fstat(source_fd)
    if (root.st_ino, True) in want:
        want.discard((root.st_ino, True))
        out.append(activity.hold(root.st_ino, os.open(".", _O_PATH, dir_fd=source_fd), True))
    stack: list[bytes] = [b""]            # paths (not fds: a wide tree would spend the fds)
    while stack and want:
        path = stack.pop()
        try:
            dfd = open_at(source_fd, path, _O_DIR)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            for name in _listdir(dfd):
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_dev != root.st_dev:
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                if (st.st_ino, is_dir) in want:
                    fd = os.open(name, _O_PATH, dir_fd=dfd)
                    if os.fstat(fd).st_ino != st.st_ino:
                        os.close(fd)
                        continue
                    want.discard((st.st_ino, is_dir))
                    out.append(activity.hold(st.st_ino, fd, is_dir))
                if is_dir:
                    stack.append(path + b"/" + name if path else name)
        finally:
            os.close(dfd)
    return out
