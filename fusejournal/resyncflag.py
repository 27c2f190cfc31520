"""The needs-resync state: objects the original has changed and the journal could not record.

A mutating handler whose system call reached the original tree but whose
record could not be made (and whose change could not be undone, see
docs/design.md, "A failed step after the change") names the object here: the
directory whose entries changed, or the file or directory whose data or
attributes changed.  The state is persistent, ``JOURNAL/needs_resync``
(:data:`fusejournal.layout.NEEDS_RESYNC`), in the activity log's intent format
(kernel file handle, inode number, CRC per entry), so the next mount's
recovery finds the objects by handle and resyncs exactly them, with the
objects of every unconfirmed activity period (the same path as a crash).

1. :meth:`ResyncFlag.mark` adds entries: appended, ``fdatasync``'ed, the
   directory ``fsync``'ed when the file is new.  If that fails, the state is
   still held in memory (``unsaved``): ``status`` reports it and the daemon
   leaves ``daemon.json`` at shutdown, so the next mount treats the stop as a
   crash and resyncs every unconfirmed intent (which names the object too).
2. :meth:`ResyncFlag.load` (next mount, before serving) returns what earlier
   runs left.
3. :meth:`ResyncFlag.settle` (once the first checkpoint after that recovery is
   durable) drops the loaded entries, keeping any marked since; the file is
   rewritten atomically (temporary file, fsync, rename, fsync of the journal),
   or removed when nothing is left.

Failure: a handle the filesystem cannot give (``name_to_handle_at``
unsupported) is stored with handle type -1; recovery cannot open it and says
to re-seed.  Nothing here raises into a FUSE handler except through
:meth:`mark`, which never raises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .activity import Intent, decode_intents, encode_intent
from .sysc import fsync_dir, name_to_handle
from .treewalk import durable_replace

log = logging.getLogger(__name__)

NO_HANDLE = -1


class ResyncFlag:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.loaded: list[Intent] = []     # left by earlier runs, resynced by this mount's recovery
        self.new: list[Intent] = []        # marked in this run: for the next mount
        self.reasons: list[str] = []
        self.unsaved = False
        self.recovered = False             # the loaded entries were resynced (records pending)
        self._present = False

    # ------------------------------------------------------------ state

    @property
    def count(self) -> int:
        """Objects still waiting for a resync at a later mount."""
        return len(self.new) + (0 if self.recovered else len(self.loaded))

    @property
    def reason(self) -> str | None:
        return self.reasons[-1] if self.reasons else None

    # ------------------------------------------------------------ operations

    def load(self) -> list[Intent]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        self.loaded = decode_intents(data)
        if data and not self.loaded:
            # present but unreadable: still a resync is owed; resync what the activity log names
            log.warning("%s is unreadable; resyncing every unconfirmed intent instead", self.path)
        self._present = bool(data)
        return list(self.loaded)

    @property
    def present(self) -> bool:
        """The state file existed at :meth:`load` (even if none of its entries was readable)."""
        return self._present

    def mark(self, fds: list[tuple[int, int, bool]], reason: str) -> None:
        """Name objects (``(inode number, fd, is_dir)``) that need a resync; never raises."""
        self.reasons.append(reason)
        log.error("needs resync: %s", reason)
        entries = []
        for ino, fd, is_dir in fds:
            try:
                htype, handle = name_to_handle(fd)
            except OSError:
                htype, handle = NO_HANDLE, b""
            entries.append(Intent(ino, is_dir, htype, handle))
        self.new.extend(entries)
        try:
            self._append(b"".join(encode_intent(i) for i in entries))
        except OSError as e:
            self.unsaved = True
            log.critical("could not record the needs-resync state durably (%s); the next mount "
                         "will recover as after a crash", e)

    def _append(self, data: bytes) -> None:
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.path.parent)

    def settle(self) -> None:
        """The loaded entries are resynced and durable in a checkpoint: forget them."""
        if not self.recovered or not (self.loaded or self.present):
            return
        keep = b"".join(encode_intent(i) for i in self.new)
        if keep:
            durable_replace(self.path, keep)
        else:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            fsync_dir(self.path.parent)
        self.loaded = []
        self._present = bool(keep)
        self.recovered = False             # what is left (marked since) waits for the next mount
