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
directory), on the calling request.  Opening by handle needs
CAP_DAC_READ_SEARCH, so the activity log is only kept when the daemon runs as
root; otherwise a crash means re-seeding (documented).

Entry format (little endian): ``u64 ino, i32 handle_type, u8 is_dir, u8
handle_len, handle bytes, u32 crc32 of all before``; a torn or corrupt entry
ends the file's reading (it was never acknowledged).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import layout
from .sysc import fsync_dir, name_to_handle

log = logging.getLogger(__name__)

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


class ActivityLog:
    def __init__(self, directory: Path, *, enabled: bool = True) -> None:
        self.dir = Path(directory)
        self.enabled = enabled
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
