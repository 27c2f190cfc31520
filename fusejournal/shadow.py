"""The shadow: a copy of the original tree as it stood at the applied checkpoint.

Layout (names from :mod:`fusejournal.layout`)::

    SHADOW/tree/          the copy itself
    SHADOW/inodes/<ino>   one hidden hard link per non-directory of tree/,
                          named by the *original's* st_ino (decimal): the
                          inode keys records use to reach a file
    SHADOW/staging/       the updater's cursor (see fusejournal.staging)
    SHADOW/applied.json   {"applied": N}: tree/ equals the original at
                          checkpoint N (written durably, after syncfs)
    SHADOW/shadow.json    the identity: {"id": ..., "source": {...}}, the id
                          shared with the journal's meta.json (``shadow_id``)
    SHADOW/seeding.json   present while an online seed is in progress (the
                          durable cursor, fusejournal/seeding.py): tree/ then
                          holds no checkpoint, whatever applied.json says
    SHADOW/seeded.json    how the shadow was last seeded: the first complete
                          checkpoint, when, how much was copied

The shadow root and everything in it but tree/'s contents are private to the
mounting user (0700 directories, 0600 files).  The root is opened with
O_NOFOLLOW|O_DIRECTORY (:meth:`Shadow.open_root`) and, once the daemon has
claimed it, must stay the same directory (dev, inode): a shadow path swapped
for a symlink or another directory is refused, never followed.  Every other
access is relative to an fd opened from it, without following symlinks.

:class:`Shadow` creates that layout, seeds it (checkpoint 0) from a directory
fd of the original tree (seed.py), records the applied checkpoint durably, and
compares tree/ with the original (:meth:`Shadow.verify_matches`, verify.py, used
by tests and by ``fusejournal fsck``).  The fd helpers are in treewalk.py.

Every access to the original goes through file descriptors (``dir_fd=``,
``O_NOFOLLOW``): the original directory is normally hidden under the FUSE
mount, so the only way to it is the fd the daemon opened before mounting.
Names are bytes throughout; non-UTF-8 names are copied unchanged.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from . import layout, sysc
from .errors import UserError
from .treewalk import O_DIR as _O_DIR
from .treewalk import copy_data, data_extents, data_map, durable_replace, read_xattrs, write_xattrs

# the fd helpers moved to treewalk.py; these names stay importable from here
__all__ = ["Shadow", "ShadowError", "ShadowRefused", "copy_data", "data_extents", "data_map",
           "read_xattrs", "write_xattrs"]

#: a JSON object as read from or written to shadow.json (values checked where they are used)
JsonObject = dict[str, object]
#: the online seed's durable state (fusejournal/seeding.py), and how the shadow was seeded
SEEDING = layout.SHADOW_SEEDING
SEEDED = layout.SHADOW_SEEDED

#: xattr namespaces compared by verify_matches (others are copied best-effort)
_COMPARED_XATTRS = ("user.", "trusted.")


class ShadowError(Exception):
    """The shadow directory is missing, damaged, or not in the expected state."""


class ShadowRefused(ShadowError, UserError):
    """A directory that must not be used as this shadow (a symlink, another user's, another
    source's shadow, in use ...): a one-line user error, nothing was changed."""


# ------------------------------------------------------------------ helpers
# (the fd helpers: treewalk.py)

def _show(path: bytes) -> str:
    """A printable form of a tree-relative path."""
    return "/" + path.decode("utf-8", "backslashreplace")


# ------------------------------------------------------------------ shadow

class Shadow:
    """The shadow directory of one journal (see the module docstring)."""

    def __init__(self, root: str | Path, identity: JsonObject | None = None) -> None:
        self.root = Path(root)
        self.tree = self.root / layout.SHADOW_TREE
        self.inodes = self.root / layout.SHADOW_INODES
        self.staging = self.root / layout.SHADOW_STAGING
        self.applied_path = self.root / layout.SHADOW_APPLIED
        self.identity_path = self.root / layout.SHADOW_IDENTITY
        #: the shadow.json this shadow gets when created or adopted (see new_identity)
        self.identity = identity
        self._pinned: tuple[int, int] | None = None
        self._lock_fd = -1

    def close(self) -> None:
        """Release the claim taken by :meth:`attach` (the flock on the root)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __repr__(self) -> str:
        return f"Shadow({os.fspath(self.root)!r})"

    # -------------------------------------------------------------- root

    def open_root(self) -> int:
        """An fd of the shadow root, opened without following a symlink.

        Once pinned (:meth:`create`, :meth:`attach`), the root must be the
        very directory the daemon claimed: a path swapped for another
        directory is refused (ShadowError).  The caller closes the fd.
        """
        try:
            fd = os.open(self.root, _O_DIR)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.islink(self.root):
                raise ShadowRefused(f"the shadow {self.root} has been replaced by a symlink: refusing "
                                  f"to follow it") from None
            raise
        if self._pinned is not None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._pinned:
                os.close(fd)
                raise ShadowRefused(f"the shadow {self.root} has been replaced by another directory: "
                                  f"refusing to write there")
        return fd

    def open_sub(self, name: str, flags: int = _O_DIR) -> int:
        """An fd of ``name`` in the shadow root (tree, inodes, staging), never through a symlink."""
        root = self.open_root()
        try:
            return os.open(name, flags | os.O_NOFOLLOW, dir_fd=root)
        finally:
            os.close(root)

    def _read_json(self, name: str) -> bytes:
        """Contents of the file ``name`` in the root (FileNotFoundError if absent)."""
        fd = self.open_sub(name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks: list[bytes] = []
            while True:
                b = os.read(fd, 1 << 16)
                if not b:
                    return b"".join(chunks)
                chunks.append(b)
        finally:
            os.close(fd)

    # -------------------------------------------------------------- identity

    @staticmethod
    def new_identity(source: Mapping[str, object], shadow_id: str) -> JsonObject:
        """The shadow.json of a shadow of ``source`` (path, dev, ino) kept by the journal whose
        meta.json names ``shadow_id``."""
        return {"format": 1, "id": shadow_id, "source": dict(source)}

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def read_identity(self) -> JsonObject | None:
        """The shadow's shadow.json, or None if it has none (ShadowError if unreadable)."""
        try:
            doc = json.loads(self._read_json(layout.SHADOW_IDENTITY))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ShadowError(f"{self.identity_path} is unreadable: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) \
                or not isinstance(doc.get("source"), dict):
            raise ShadowError(f"{self.identity_path} is not a fusejournal shadow identity")
        return doc

    def check_claim(self, source: Mapping[str, object], shadow_id: str | None, *, named_by_journal: bool,
                    reseed: bool) -> str:
        """May this directory serve as the shadow of the journal of ``source``?  Reads only.

        ``shadow_id``: the journal's (None for a new journal or one from
        before identities); ``named_by_journal``: an existing journal's
        meta.json names this path.  Returns

        - ``"missing"`` / ``"empty"``: nothing there yet, create it;
        - ``"ours"``: its shadow.json carries this journal's id and source;
        - ``"legacy"``: a shadow from before identities (tree/ or
          applied.json, no shadow.json) that this journal's meta.json names:
          adopt it and write its identity;
        - ``"reseed"``: a shadow of this source kept by another journal;
          only returned with ``reseed`` (it is then seeded afresh).

        Anything else is refused with ShadowError and nothing changed: a
        symlink, a non-directory, another user's directory, the shadow of
        another source, a non-empty directory that is not a shadow, a
        shadow without identity that this journal does not name, or
        (without ``reseed``) another journal's shadow of this source.
        """
        root = self.root
        try:
            if not layout.check_state_dir(root, "shadow"):
                return "missing"
        except layout.LayoutError as e:
            raise ShadowRefused(str(e)) from None
        names = os.listdir(root)
        if not names:
            return "empty"
        ident = self.read_identity()
        nothing = "nothing was changed"
        if ident is None:
            looks = layout.SHADOW_TREE in names or layout.SHADOW_APPLIED in names
            if not looks or not all(layout.known_name(n, layout.SHADOW_NAMES) for n in names):
                raise ShadowRefused(f"shadow {root} is not empty and is not a fusejournal shadow: refusing to "
                                  f"use it as the shadow ({nothing}); name a new or empty directory")
            if named_by_journal:
                return "legacy"
            raise ShadowRefused(f"shadow {root} is a fusejournal shadow without an identity (made by an older "
                              f"version) that this journal does not name: refusing to use it "
                              f"({nothing}); remove it or name another --shadow")
        src = ident["source"]
        assert isinstance(src, dict)            # read_identity checked it
        if src.get("path") != source["path"] or src.get("ino") != source["ino"]:
            raise ShadowRefused(f"shadow {root} is the shadow of another source ({src.get('path')}), not of "
                              f"{source['path']}: refusing to use it ({nothing}); name another --shadow")
        if shadow_id is not None and ident["id"] == shadow_id:
            return "ours"
        if reseed:
            return "reseed"
        raise ShadowRefused(f"shadow {root} is a shadow of {source['path']} kept by another journal (not "
                          f"{'this new one' if shadow_id is None else 'this one'}): it need not match "
                          f"the original; refusing to use it ({nothing}); copy it afresh with "
                          f"--reseed or name another --shadow")

    # -------------------------------------------------------------- state

    def attach(self) -> None:
        """Claim an existing shadow directory for this daemon.

        1. Open the root without following a symlink; refuse another user's
           (:func:`layout.open_private_dir`), make it 0700, and pin it:
           from now on :meth:`open_root` refuses any other directory there.
           Take an exclusive flock on it, held until :meth:`close`: a
           shadow in use by another daemon (another journal of the same
           source) is refused, never re-seeded under it.
        2. Make inodes/, staging/ (and its files), applied.json and
           shadow.json private (0700/0600); tree/ keeps the original's modes.
           A symlink among them is refused.
        3. Write shadow.json if the shadow has none yet (an empty directory,
           or a shadow from before identities) and :attr:`identity` is set.

        Raises ShadowError.
        """
        try:
            fd = layout.open_private_dir(self.root, "shadow")
        except layout.LayoutError as e:
            raise ShadowRefused(str(e)) from None
        try:
            st = os.fstat(fd)
            if self._lock_fd < 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise ShadowRefused(f"the shadow {self.root} is in use by another fusejournal "
                                          f"daemon (nothing was changed)") from None
                    raise
                self._lock_fd, fd = fd, os.dup(fd)
            elif self._pinned != (st.st_dev, st.st_ino):
                raise ShadowRefused(f"the shadow {self.root} has been replaced by another directory")
            self._pinned = (st.st_dev, st.st_ino)
            try:
                layout.tighten_entries(fd, os.fspath(self.root), skip=frozenset({layout.SHADOW_TREE}),
                                       recurse=frozenset({layout.SHADOW_STAGING}))
            except layout.LayoutError as e:
                raise ShadowRefused(str(e)) from None
            if self.identity is not None and self.read_identity() is None:
                durable_replace(layout.SHADOW_IDENTITY, json.dumps(self.identity, indent=1).encode() + b"\n",
                                dir_fd=fd)
        finally:
            os.close(fd)

    def create(self) -> None:
        """Create the root and tree/, inodes/, staging/ (existing ones are kept).

        The root and any missing parent are created 0700 (it holds a copy of
        the data), then claimed (:meth:`attach`: private, pinned, shadow.json
        written).  tree/ gets the original root's mode, owner and times when
        seeded.
        """
        layout.make_private_dirs(self.root)
        self.attach()
        root = self.open_root()
        try:
            for name in (layout.SHADOW_TREE, layout.SHADOW_INODES, layout.SHADOW_STAGING):
                try:
                    os.mkdir(name, layout.PRIVATE_DIR_MODE, dir_fd=root)
                except FileExistsError:
                    st = os.stat(name, dir_fd=root, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        raise ShadowError(f"{self.root / name} exists and is not a directory") from None
        finally:
            os.close(root)

    def exists(self) -> bool:
        """True once the shadow has been seeded (applied.json present)."""
        return os.path.lexists(self.applied_path)

    def _applied_doc(self) -> tuple[int, dict[str, object]]:
        """applied.json: its checkpoint id and the whole document (ShadowError if
        missing, unreadable or corrupt)."""
        try:
            doc: object = json.loads(self._read_json(layout.SHADOW_APPLIED))
        except FileNotFoundError:
            if os.path.lexists(self.root / SEEDING):
                raise ShadowError(f"the shadow {self.root} is being seeded: it holds no complete "
                                  f"checkpoint yet") from None
            raise ShadowError(f"{self.applied_path} is missing: the shadow was never seeded") from None
        except (OSError, ValueError) as e:
            raise ShadowError(f"{self.applied_path} is unreadable: {e}") from None
        n = doc.get("applied") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or not isinstance(n, int) or type(n) is not int or n < 0:
            raise ShadowError(f"{self.applied_path} is corrupt: {doc!r}")
        return n, doc

    @property
    def applied(self) -> int:
        """The checkpoint id tree/ stands at (ShadowError if unknown)."""
        return self._applied_doc()[0]

    @property
    def applied_checkpoint_time_ns(self) -> int | None:
        """When the checkpoint tree/ stands at was taken, if applied.json says
        (:meth:`set_applied`), else None (ShadowError if unknown)."""
        t = self._applied_doc()[1].get("checkpoint_time_ns")
        return t if isinstance(t, int) and type(t) is int and t > 0 else None

    def set_applied(self, n: int, checkpoint_time_ns: int | None = None) -> None:
        """Durably record that tree/ stands at checkpoint ``n``.

        First syncfs() the shadow's filesystem (so every change made to tree/
        and inodes/ so far is on disk), then replace applied.json atomically
        (temp file, fsync, rename, fsync of the directory).
        ``checkpoint_time_ns``: when checkpoint ``n`` was taken (its marker's
        time), kept for recovery after the log segment holding it was pruned
        (:attr:`applied_checkpoint_time_ns`).
        """
        if type(n) is not int or n < 0:
            raise ValueError(f"bad checkpoint id {n!r}")
        doc: dict[str, int] = {"applied": n, "time_ns": time.time_ns()}
        if checkpoint_time_ns is not None:
            doc["checkpoint_time_ns"] = checkpoint_time_ns
        dfd = self.open_root()
        try:
            sysc.syncfs(dfd)
            data = json.dumps(doc).encode() + b"\n"
            durable_replace(layout.SHADOW_APPLIED, data, dir_fd=dfd)
        finally:
            os.close(dfd)

    # -------------------------------------------------------------- seeding state

    @property
    def seeding(self) -> bool:
        """True while an online seed is in progress (seeding.json present): tree/ holds no checkpoint."""
        return os.path.lexists(self.root / SEEDING)

    def read_state(self, name: str) -> JsonObject | None:
        """The JSON object in the root's file ``name`` (seeding.json, seeded.json), None if absent
        (ShadowError if unreadable)."""
        try:
            doc = json.loads(self._read_json(name))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ShadowError(f"{self.root / name} is unreadable: {e}") from None
        if not isinstance(doc, dict):
            raise ShadowError(f"{self.root / name} is corrupt: {doc!r}")
        return doc

    def write_state(self, name: str, doc: JsonObject, *, sync: bool = False) -> None:
        """Durably and atomically replace the root's file ``name``; ``sync``: syncfs the shadow
        first, so everything written to tree/ and inodes/ before is on disk before it."""
        dfd = self.open_root()
        try:
            if sync:
                sysc.syncfs(dfd)
            durable_replace(name, json.dumps(doc).encode() + b"\n", dir_fd=dfd)
        finally:
            os.close(dfd)

    def remove_state(self, name: str) -> None:
        """Durably remove the root's file ``name`` (absent is fine)."""
        dfd = self.open_root()
        try:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                return
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -------------------------------------------------------------- seed

    def prepare_seed(self) -> None:
        """Create the shadow for a seed: tree/ must be empty (ShadowError otherwise);
        leftovers of an aborted seed in inodes/ and staging/ are removed."""
        self.create()
        fd = self.open_sub(layout.SHADOW_TREE)
        try:
            if os.listdir(fd):
                raise ShadowError(f"{self.tree} is not empty: refusing to seed over it")
        finally:
            os.close(fd)
        for d in (layout.SHADOW_INODES, layout.SHADOW_STAGING):     # leftovers of an aborted seed
            fd = self.open_sub(d)
            try:
                for name in os.listdir(fd):
                    os.unlink(name, dir_fd=fd)
            finally:
                os.close(fd)

    def seed(self, source_fd: int, progress: Callable[[int], None] | None = None) -> int:
        """Copy the original tree behind the directory fd ``source_fd`` into tree/ (checkpoint 0).

        Copies names (bytes), types, contents (holes kept), modes, owners,
        symlink targets, device numbers, hard links, xattrs and mtimes;
        creates inodes/<st_ino> for every non-directory.  Directory modes and
        times are set after their contents.  ``progress(n)`` is called after
        every entry with the number copied so far.  Ends with
        ``set_applied(0)``; returns the number of entries copied (the root
        not counted).

        Raises ShadowError if tree/ is not empty (a previous seed or a live
        shadow: the caller decides whether to wipe it), if the original spans
        several filesystems (inode keys would be ambiguous), or if the shadow
        lies inside the original.
        """
        self.prepare_seed()
        from .seed import Seeder
        n = Seeder(self, source_fd, progress).run()
        self.set_applied(0)
        return n

    # -------------------------------------------------------------- verify

    def verify_matches(self, source_fd: int) -> list[str]:
        """Compare tree/ with the original tree behind ``source_fd``.

        Returns human-readable differences (empty list: equal).  Compared:
        names, types, modes, owners, sizes, contents, symlink targets, device
        numbers, hard-link groups, user.* and trusted.* xattrs, mtimes (ns) of
        every object including directories and the root.  Atimes, ctimes and
        raw link counts are not compared (shadow files carry one extra hidden
        link).  Also checks the hidden links: inodes/<ino> must be the shadow
        object of the original's inode <ino>, and inodes/ must hold nothing
        else.
        """
        from .verify import Verifier
        return Verifier(self, source_fd).run()
