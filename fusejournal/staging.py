"""Staging: where a batch is prepared before the shadow moves to it (the
design's copy-data temporary storage).  Here it is a cursor, SHADOW/staging/cursor,
that says how far the batch being applied has come.

1. **begin** (``StagingCursor.begin``): a batch starts with a new cursor
   ``(checkpoint, 0)``, written to cursor.tmp, fsynced, renamed over cursor,
   and the staging directory fsynced (``treewalk.durable_replace``): atomic (a
   kill never leaves a half-written cursor) and durable before the first
   change to tree/; then reopened for the advances.  A
   batch resumed after a kill reopens the cursor it left.
2. **advance**: after each record, the cursor is overwritten in place with
   ``(checkpoint, next index, token)``, without fsync: 48 bytes in one pwrite
   within one page.
3. **end**: once ``applied.json`` says the checkpoint is applied (durably),
   the cursor is removed (``clear_cursor``).

The cursor carries this boot's id (``boot_id``): a cursor from another boot
means the batch was interrupted by a power loss or kernel crash, when the
unsynced advances and tree/ changes may be partly lost; the updater refuses
to resume it (the shadow must be seeded again).  A cursor of the wrong size
or magic is damaged (UpdaterError).
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from . import layout
from .errors import UpdaterError
from .layout import SHADOW_STAGING
from .shadow import Shadow
from .treewalk import durable_replace

__all__ = ["CURSOR", "Cursor", "StagingCursor", "boot_id", "read_cursor", "clear_cursor"]

#: file name of the cursor under SHADOW/staging
CURSOR = layout.STAGING_CURSOR
_CURSOR_MAGIC = b"FJCURSR1"
_CURSOR_FMT = struct.Struct("<8sqqQQ16s")
_boot_id_cache: bytes | None = None


def boot_id() -> bytes:
    """This boot's random id (16 bytes; zeros if unknown): tells a restart from a reboot."""
    global _boot_id_cache
    if _boot_id_cache is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _boot_id_cache = bytes.fromhex(f.read().strip().replace("-", ""))[:16].ljust(16, b"\0")
        except (OSError, ValueError):
            _boot_id_cache = bytes(16)
    return _boot_id_cache


class Cursor(NamedTuple):
    """Progress through the batch being applied.

    ``index`` records of ``checkpoint`` have been applied completely.  For an
    exchanging rename at ``index``, ``token`` is the (st_dev, st_ino) the old
    path had just before the exchange was attempted ((0, 0) otherwise): the
    exchange has happened iff the old path no longer holds that object.
    ``boot`` is the :func:`boot_id` of the system that wrote the cursor.
    """
    checkpoint: int
    index: int                      # type: ignore[assignment]  # (tuple.index)
    token: tuple[int, int] = (0, 0)
    boot: bytes = bytes(16)

    def pack(self) -> bytes:
        return _CURSOR_FMT.pack(_CURSOR_MAGIC, self.checkpoint, self.index, *self.token, self.boot)


def read_cursor(shadow: Shadow) -> Cursor | None:
    """The staging cursor, or None when no batch is in progress."""
    try:
        sfd = shadow.open_sub(SHADOW_STAGING)         # never through a symlink
    except FileNotFoundError:
        return None
    try:
        fd = os.open(CURSOR, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
    except FileNotFoundError:
        return None
    finally:
        os.close(sfd)
    try:
        data = os.read(fd, _CURSOR_FMT.size + 1)
    finally:
        os.close(fd)
    if len(data) != _CURSOR_FMT.size:
        raise UpdaterError(f"staging cursor {shadow.staging / CURSOR} is damaged ({len(data)} bytes)")
    magic, n, k, dev, ino, boot = _CURSOR_FMT.unpack(data)
    if magic != _CURSOR_MAGIC or n < 1 or k < 0:
        raise UpdaterError(f"staging cursor {shadow.staging / CURSOR} is damaged")
    return Cursor(n, k, (dev, ino), boot)


def clear_cursor(shadow: Shadow) -> None:
    """Remove the staging cursor (no batch in progress)."""
    sfd = shadow.open_sub(SHADOW_STAGING)
    try:
        os.unlink(CURSOR, dir_fd=sfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(sfd)


class StagingCursor:
    """The cursor of one batch, open for advancing (steps 1 and 2 above)."""

    def __init__(self, shadow: Shadow, checkpoint: int) -> None:
        self.shadow = shadow
        self.checkpoint = checkpoint
        #: the batch was begun before (a cursor for this checkpoint was there)
        self.resumed = False
        #: (index, st_dev, st_ino) of an exchanging rename at the resume point, see Cursor
        self.token: tuple[int, int, int] | None = None
        self.cursor_fd = -1
        # from the shadow root opened with O_NOFOLLOW (and pinned): never a swapped symlink
        self.staging_fd = shadow.open_sub(SHADOW_STAGING)

    def close(self) -> None:
        for name in ("cursor_fd", "staging_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def begin(self, start: int) -> None:
        """Open (or create) the cursor at (checkpoint, start)."""
        cur = read_cursor(self.shadow)
        if cur is not None and cur.checkpoint == self.checkpoint:
            self.resumed = True
            if cur.index == start:
                if cur.token != (0, 0):
                    self.token = (start, *cur.token)
                self.cursor_fd = os.open(CURSOR, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                         dir_fd=self.staging_fd)
                return
        # A new cursor: atomic (a kill never leaves a half-written one) and
        # durable before the first change to tree/, so that after a power
        # loss an interrupted batch is always noticed (see Updater.run_once).
        durable_replace(CURSOR, Cursor(self.checkpoint, start, (0, 0), boot_id()).pack(),
                        dir_fd=self.staging_fd)
        self.cursor_fd = os.open(CURSOR, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.staging_fd)

    def advance(self, index: int, token: tuple[int, int] = (0, 0)) -> None:
        """Record that records before ``index`` are applied (in place, no fsync)."""
        os.pwrite(self.cursor_fd, Cursor(self.checkpoint, index, token, boot_id()).pack(), 0)
