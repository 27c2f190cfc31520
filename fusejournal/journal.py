"""The journal directory: identity (meta.json), the owner's lock, daemon.json,
and the pending records saved at unmount.

The journal belongs to exactly one source tree: meta.json records the
source's absolute path and the (st_dev, st_ino) of its root, and a mount of
another source with this journal is refused.  The daemon holds an exclusive
``flock`` on ``lock`` for its whole life, so two daemons never share a journal.

The journal and its shadow are bound together: meta.json's ``shadow_id`` is
the ``id`` in the shadow's shadow.json (see :meth:`Shadow.check_claim`), so
a journal never adopts a directory that is not its own shadow.

The journal is private to the mounting user: the directory and everything
in it are 0700/0600 (modes given explicitly, the daemon runs with umask 0),
a journal path that is a symlink or another user's directory is refused,
and a journal left loose by an older version is tightened on open.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NotRequired, TypedDict, TypeGuard

from . import compression, layout
from . import records as rec_mod
from .errors import EXIT_IN_USE, EXIT_UNUSABLE, UserError
from .shadow import Shadow, ShadowError
from .sysc import fsync_dir
from .treewalk import durable_replace

PENDING = layout.PENDING


class SourceIdent(TypedDict):
    """The source's identity, as meta.json and the shadow's shadow.json keep it."""
    path: str
    dev: int
    ino: int


class JournalMeta(TypedDict):
    """meta.json (checked by :func:`read_meta`)."""
    format: int
    source: SourceIdent
    shadow: str
    shadow_id: NotRequired[str]      # missing in a journal from before identities


def _is_source_ident(v: object) -> TypeGuard[SourceIdent]:
    """A source's identity as meta.json keeps it: {"path": str, "dev": int, "ino": int}."""
    return (isinstance(v, dict) and isinstance(v.get("path"), str)
            and isinstance(v.get("dev"), int) and isinstance(v.get("ino"), int))


def _is_journal_meta(v: object) -> TypeGuard[JournalMeta]:
    return (isinstance(v, dict) and isinstance(v.get("format"), int)
            and _is_source_ident(v.get("source")) and isinstance(v.get("shadow"), str)
            and isinstance(v.get("shadow_id", ""), str))


def read_meta(journal: Path) -> JournalMeta | None:
    try:
        with open(journal / layout.META, "rb") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"journal {journal}: unreadable {layout.META}: {e}") from None
    if not _is_journal_meta(meta):
        raise UserError(f"journal {journal}: {layout.META} is not a fusejournal journal")
    if meta["format"] > layout.JOURNAL_FORMAT:
        raise UserError(f"journal {journal} has format {meta['format']}, newer than this "
                        f"fusejournal understands ({layout.JOURNAL_FORMAT}): upgrade fusejournal")
    return meta


def _check_journal_dir(path: Path) -> bool:
    """Refuse a journal path that must not be used; read only.  True if it exists.

    A symlink, a non-directory, another user's directory, or a non-empty
    directory holding anything a journal does not (a directory of the user's
    named by mistake) is refused with a UserError, before anything is created
    or changed.
    """
    try:
        if not layout.check_state_dir(path, "journal"):
            return False
    except layout.LayoutError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"journal {path} is not writable: {e.strerror}") from None
    try:
        names = os.listdir(path)
    except OSError as e:
        raise UserError(f"journal {path} is not readable: {e.strerror}") from None
    foreign = sorted(n for n in names if not layout.known_name(n, layout.JOURNAL_NAMES))
    if layout.META not in names and foreign:
        raise UserError(f"journal {path} is not empty and is not a fusejournal journal (it holds "
                        f"{foreign[0]!r}): refusing to use it (nothing was changed); name a new or "
                        f"empty directory")
    return True


def _claim_shadow(path: Path, shadow: Path, ident: SourceIdent, meta: JournalMeta | None,
                  reseed: bool) -> str:
    """:meth:`Shadow.check_claim` for the journal at ``path`` (``meta`` None: a new journal)."""
    named = meta is not None and meta.get("shadow") == os.fsdecode(os.path.abspath(shadow))
    try:
        return Shadow(shadow).check_claim(ident, meta.get("shadow_id") if meta else None,
                                          named_by_journal=named, reseed=reseed)
    except ShadowError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"shadow {shadow}: {e.strerror}") from None


class Journal:
    """An opened, locked journal directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd = -1
        self.meta: JournalMeta                     # set by open(), under the lock
        #: what :meth:`Shadow.check_claim` said of the shadow (missing, empty, ours, legacy, reseed)
        self.shadow_verdict = ""

    @classmethod
    def open(cls, path: Path, source: Path, source_st: os.stat_result, shadow: Path | None,
             reseed: bool = False) -> Journal:
        """Create or open the journal for ``source``; take the lock; check identity.

        1. Check the journal path (read only): a symlink, another user's
           directory, or a non-empty directory that is not a journal is refused.
        2. A new journal: check its shadow before creating anything (a
           directory that is not a new, empty or own shadow is refused).
        3. Create the directory (and missing parents) 0700, open it without
           following a symlink, tighten loose modes (layout.open_private_dir,
           layout.tighten_entries), create log/, spill/ (0700) and the lock
           (0600); take the lock.
        4. Under the lock: a new journal gets meta.json with the source's
           identity, the shadow path and a fresh ``shadow_id``; an existing
           one must belong to ``source`` and name ``shadow``, and its shadow
           must pass :meth:`Shadow.check_claim` (``reseed``: another
           journal's shadow of this source is accepted, to be re-seeded).
           A journal from before identities gets its ``shadow_id`` now.

        Raises UserError for a journal that is not usable, not writable, in
        use, or belongs to another source, and for a shadow that is not this
        journal's; nothing is created or changed in a refused directory.
        """
        j = cls(path)
        ident: SourceIdent = {"path": os.fsdecode(os.path.abspath(source)),
                              "dev": source_st.st_dev, "ino": source_st.st_ino}
        if _check_journal_dir(path) and (path / layout.META).exists():
            pass                                      # checked under the lock below
        elif shadow is not None:
            _claim_shadow(path, shadow, ident, None, reseed)
        try:
            layout.make_private_dirs(path)
            dfd = layout.open_private_dir(path, "journal")
        except layout.LayoutError as e:
            raise UserError(str(e)) from None
        except OSError as e:
            raise UserError(f"journal {path} is not writable: {e.strerror}") from None
        try:
            for d in (layout.LOG_DIR, layout.SPILL_DIR):
                try:
                    os.mkdir(d, layout.PRIVATE_DIR_MODE, dir_fd=dfd)
                except FileExistsError:
                    pass
            fd = os.open(layout.LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         layout.PRIVATE_FILE_MODE, dir_fd=dfd)
        except OSError as e:
            os.close(dfd)
            raise UserError(f"journal {path} is not writable: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            os.close(dfd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"journal {path} is in use by another fusejournal daemon",
                                EXIT_IN_USE) from None
            raise UserError(f"journal {path}: cannot lock: {e.strerror}") from None
        j._lock_fd = fd
        try:
            try:
                layout.tighten_entries(dfd, os.fspath(path), recurse=frozenset(
                    {layout.LOG_DIR, layout.SPILL_DIR, layout.ACTIVITY_DIR}))
            except layout.LayoutError as e:
                raise UserError(str(e)) from None
            except OSError as e:
                raise UserError(f"journal {path}: cannot make it private: {e.strerror}") from None
            finally:
                os.close(dfd)
            if not os.access(path, os.W_OK):
                raise UserError(f"journal {path} is not writable")
            meta = read_meta(path)
            if meta is None:
                if shadow is None:
                    raise UserError(f"journal {path} is new: a shadow directory is needed")
                j.shadow_verdict = _claim_shadow(path, shadow, ident, None, reseed)
                meta = {"format": layout.JOURNAL_FORMAT, "source": ident,
                        "shadow": os.fsdecode(os.path.abspath(shadow)),
                        "shadow_id": Shadow.new_id()}
                j._write_meta(meta)
            else:
                src = meta.get("source", {})
                if src.get("ino") != ident["ino"] or src.get("path") != ident["path"]:
                    raise UserError(
                        f"journal {path} belongs to another source ({src.get('path')}), "
                        f"not {ident['path']}")
                named = meta.get("shadow")
                if (shadow is not None and os.path.abspath(shadow) != named and isinstance(named, str)
                        and os.path.islink(named)
                        and os.path.realpath(named) == os.path.realpath(shadow)):
                    # a shadow path that was a symlink (now refused): the real directory named
                    meta = {**meta, "shadow": os.fsdecode(os.path.abspath(shadow))}
                    j._write_meta(meta)
                if shadow is not None and os.path.abspath(shadow) != meta.get("shadow"):
                    raise UserError(f"journal {path} keeps its shadow at {meta.get('shadow')}, "
                                    f"not {os.path.abspath(shadow)}")
                j.shadow_verdict = _claim_shadow(path, Path(meta["shadow"]), ident, meta, reseed)
                if not isinstance(meta.get("shadow_id"), str):    # a journal from before identities
                    meta = {**meta, "shadow_id": Shadow.new_id()}
                    j._write_meta(meta)
            j.meta = meta
        except BaseException:
            j.close()
            raise
        return j

    def _write_meta(self, meta: JournalMeta) -> None:
        try:
            durable_replace(self.path / layout.META, json.dumps(meta, indent=1).encode())
        except OSError as e:
            raise UserError(f"journal {self.path} is not writable: {e.strerror}") from None

    @property
    def shadow_identity(self) -> dict[str, object]:
        """The shadow.json the shadow of this journal carries (see :meth:`Shadow.new_identity`)."""
        return Shadow.new_identity(self.meta["source"], self.meta["shadow_id"])

    @property
    def shadow_path(self) -> Path:
        return Path(self.meta["shadow"])

    @property
    def log_dir(self) -> Path:
        return self.path / layout.LOG_DIR

    @property
    def spill_dir(self) -> Path:
        return self.path / layout.SPILL_DIR

    def write_daemon_info(self, info: dict[str, object]) -> None:
        durable_replace(self.path / layout.DAEMON, json.dumps(info).encode())

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
        durable_replace(self.path / PENDING, compression.compress(data))
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


def read_daemon_info(journal: Path) -> dict[str, object] | None:
    """The running daemon's daemon.json (a JSON object), or None if there is none or
    it cannot be read as one."""
    try:
        with open(Path(journal) / layout.DAEMON, "rb") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None
