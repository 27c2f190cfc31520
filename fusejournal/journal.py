"""The journal directory: identity (meta.json), the owner's lock, daemon.json,
and the pending records saved at unmount.

The journal belongs to exactly one source tree: meta.json records the
source's absolute path and the (st_dev, st_ino) of its root, and a mount of
another source with this journal is refused.  The daemon holds an exclusive
``flock`` on ``lock`` for its whole life, so two daemons never share a journal.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from . import compression, layout
from . import records as rec_mod
from .errors import EXIT_IN_USE, EXIT_UNUSABLE, UserError
from .sysc import fsync_dir

PENDING = "pending.fjrec"


def write_atomic(path: Path, data: bytes) -> None:
    """Write-temp + fsync + rename + fsync(dir): after return, ``path`` holds ``data`` durably."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def read_meta(journal: Path) -> dict | None:
    try:
        with open(journal / layout.META, "rb") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"journal {journal}: unreadable {layout.META}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise UserError(f"journal {journal}: {layout.META} is not a fusejournal journal")
    if meta["format"] > layout.JOURNAL_FORMAT:
        raise UserError(f"journal {journal} has format {meta['format']}, newer than this "
                        f"fusejournal understands ({layout.JOURNAL_FORMAT}): upgrade fusejournal")
    return meta


class Journal:
    """An opened, locked journal directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd = -1
        self.meta: dict = {}

    @classmethod
    def open(cls, path: Path, source: Path, source_st: os.stat_result, shadow: Path | None) -> "Journal":
        """Create or open the journal for ``source``; take the lock; check identity.

        Raises UserError for a journal that is not writable, in use, or
        belongs to another source.
        """
        j = cls(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / layout.LOG_DIR).mkdir(exist_ok=True)
            (path / layout.SPILL_DIR).mkdir(exist_ok=True)
            fd = os.open(path / layout.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise UserError(f"journal {path} is not writable: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"journal {path} is in use by another fusejournal daemon",
                                EXIT_IN_USE) from None
            raise UserError(f"journal {path}: cannot lock: {e.strerror}") from None
        j._lock_fd = fd
        try:
            if not os.access(path, os.W_OK):
                raise UserError(f"journal {path} is not writable")
            meta = read_meta(path)
            ident = {"path": os.fsdecode(os.path.abspath(source)),
                     "dev": source_st.st_dev, "ino": source_st.st_ino}
            if meta is None:
                if shadow is None:
                    raise UserError(f"journal {path} is new: a shadow directory is needed")
                meta = {"format": layout.JOURNAL_FORMAT, "source": ident,
                        "shadow": os.fsdecode(os.path.abspath(shadow))}
                try:
                    write_atomic(path / layout.META, json.dumps(meta, indent=1).encode())
                except OSError as e:
                    raise UserError(f"journal {path} is not writable: {e.strerror}") from None
            else:
                src = meta.get("source", {})
                if src.get("ino") != ident["ino"] or src.get("path") != ident["path"]:
                    raise UserError(
                        f"journal {path} belongs to another source ({src.get('path')}), "
                        f"not {ident['path']}")
                if shadow is not None and os.path.abspath(shadow) != meta.get("shadow"):
                    raise UserError(f"journal {path} keeps its shadow at {meta.get('shadow')}, "
                                    f"not {os.path.abspath(shadow)}")
            j.meta = meta
        except BaseException:
            j.close()
            raise
        return j

    @property
    def shadow_path(self) -> Path:
        return Path(self.meta["shadow"])

    @property
    def log_dir(self) -> Path:
        return self.path / layout.LOG_DIR

    @property
    def spill_dir(self) -> Path:
        return self.path / layout.SPILL_DIR

    def write_daemon_info(self, info: dict) -> None:
        write_atomic(self.path / layout.DAEMON, json.dumps(info).encode())

    def remove_daemon_info(self) -> None:
        try:
            os.unlink(self.path / layout.DAEMON)
        except FileNotFoundError:
            pass

    # Pending records: what was captured after the last checkpoint, kept across an unmount.
    def save_pending(self, records: Iterable[rec_mod.Record]) -> int:
        data = rec_mod.encode(records)
        if not data:
            self.clear_pending()
            return 0
        write_atomic(self.path / PENDING, compression.compress(data))
        return len(data)

    def load_pending(self) -> Iterator[rec_mod.Record]:
        try:
            with open(self.path / PENDING, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return iter(())
        try:
            return iter(list(rec_mod.decode(compression.decompress(data))))
        except ValueError as e:
            raise UserError(f"journal {self.path}: {PENDING} is damaged ({e}); "
                            f"move it away to mount without those operations", EXIT_UNUSABLE) from None

    def clear_pending(self) -> None:
        try:
            os.unlink(self.path / PENDING)
        except FileNotFoundError:
            return
        fsync_dir(self.path)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def read_daemon_info(journal: Path) -> dict | None:
    try:
        with open(Path(journal) / layout.DAEMON, "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
