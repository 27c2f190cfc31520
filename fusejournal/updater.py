"""The updater: applies each complete checkpoint batch of the ordered log to the shadow.

After checkpoint N is applied, SHADOW/tree equals the original tree as it was
at checkpoint N.  How (details in docs/updater.md):

1. **Verify** the batch (``log.verify(info, ...)``) and, in the same pass,
2. **validate** every record of it (records_check.py) before applying any:
   paths must be relative, free of ``.``/``..``/empty components and NUL
   bytes; inode keys must be positive ints.  A corrupt or crafted batch
   stops the updater before it, with the shadow untouched.  The same pass
   finds the *superseded* writes: those a later write of the batch, to the
   same object at the same offset, replaces whole (superseded.py).
3. **Apply** the records in order, except superseded writes, writing the
   staging cursor ``(N, next index)`` after each one: the records the verify
   pass kept (at most the mount's ``--memory-limit``, :class:`_VerifyPass`),
   then a second pass over the rest of the log.  With history, the
   pre-images of a record are written before it is applied; those of a run
   of consecutive writes and creations together, before the first of them
   (``_apply_run``).  Paths are resolved component by
   component from an fd of tree/ with ``O_NOFOLLOW|O_DIRECTORY``, and the
   final operation is done relative to the parent fd without following
   symlinks: nothing outside tree/ and inodes/ is ever touched.
4. **Finish**: set the file mtimes deferred from writes, drop hidden links
   left without a name, ``set_applied(N)`` (syncfs + durable applied.json),
   then remove the cursor.

A killed updater resumes from the cursor: records before it are replayed
without effects (only to rebuild the deferred mtimes), the record at the
cursor is applied again (each record's effect is idempotent when repeated
right after itself), and the batch continues.  The cursor is created
durably but advanced without fsync: a batch interrupted by a power loss or
kernel crash is detected (the cursor carries the boot id) and refused, as
the shadow must then be seeded again.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from . import sysc
from .browsegate import UpdaterSide
from .errors import SPACE_ERRNOS, NoFds, NoSpace, UpdaterError
from .faults import fault
from .history import RUN_TYPES, HistoryWriter, Policy
from .layout import SHADOW_INODES, SHADOW_TREE
from .log import CheckpointInfo, Marker
from .records import (
    ATTR_ATIME,
    ATTR_GID,
    ATTR_MODE,
    ATTR_SIZE,
    ATTR_UID,
    Link,
    Mkdir,
    Mknod,
    Record,
    Removexattr,
    Rename,
    Rmdir,
    Setattr,
    Setxattr,
    Symlink,
    Unlink,
    Write,
)
from .records_check import check_record, validate_record, validate_records
from .shadow import Shadow
from .staging import CURSOR, Cursor, StagingCursor, boot_id, clear_cursor, read_cursor
from .superseded import Superseded
from .treewalk import O_DIR as _O_DIR
from .treewalk import O_WRITE as _O_WRITE
from .treewalk import ParentCache, fd_cache_size
from .treewalk import same_object as _samestat

# validation lives beside the record types (records_check.py), the staging cursor in
# staging.py, the errors in errors.py: re-exported here under their old names
__all__ = ["UpdaterError", "NoSpace", "SPACE_ERRNOS", "Updater", "apply_records", "validate_record",
           "validate_records", "Cursor", "read_cursor", "clear_cursor", "boot_id", "CURSOR"]

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2

#: appended to errors that mean the shadow is not what the log expects
RESEED_HINT = "the shadow does not match the log (changed by hand?): fusejournal mount --reseed"

#: what to do when checkpoints the shadow needs are gone from the log
RESEED_REPAIR_HINT = ("run `fusejournal fsck JOURNAL` to see what is lost, then re-seed the shadow "
                      "(stop the application, `fusejournal umount`, `fusejournal mount --reseed`)")

#: number of open file descriptors kept for writes (per batch), fewer under a low
#: open-file limit (treewalk.fd_cache_size)
FD_CACHE_SIZE = 64


def _is_space_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in SPACE_ERRNOS


class _ApplyError(Exception):
    """A record cannot be applied to the shadow (message completed by apply_records)."""


# ------------------------------------------------------------------ applying

class _Applier:
    """Applies the records of one checkpoint to the shadow (one instance per batch)."""

    def __init__(self, shadow: Shadow, checkpoint: int) -> None:
        self.shadow = shadow
        self.checkpoint = checkpoint
        self.fds: OrderedDict[int, int] = OrderedDict()   # ino -> fd open for writing
        self.fd_max = fd_cache_size(FD_CACHE_SIZE, share=4)
        self.deferred: dict[int, int] = {}                # ino -> mtime_ns to set at the end
        self.replaced: set[tuple[int, int]] = set()       # objects that may have lost their last name
        self.resumed = False
        self.token: tuple[int, int, int] | None = None    # (index, st_dev, st_ino), see Cursor
        self.staging: StagingCursor | None = None
        self.history: HistoryWriter | None = None         # retained checkpoints (history.py)
        self.tree_fd = self.inodes_fd = -1
        self.walk: ParentCache | None = None
        try:
            # from the shadow root opened with O_NOFOLLOW (and pinned): never a swapped symlink
            self.tree_fd = shadow.open_sub(SHADOW_TREE)
            self.walk = ParentCache(self.tree_fd)
            self.inodes_fd = shadow.open_sub(SHADOW_INODES)
            self.staging = StagingCursor(shadow, checkpoint)
        except BaseException:
            self.close()
            raise
        # the xattr calls need a path: this one reaches inodes/ through its fd, not its name
        self.inodes_path = b"/proc/self/fd/%d" % self.inodes_fd
        # each handler takes the record type it is keyed by (which a dict's type cannot say)
        self._handlers: dict[type[Record], Callable[[Any, int], None]] = {
            Mknod: self._mknod, Mkdir: self._mkdir, Symlink: self._symlink, Link: self._link,
            Unlink: self._unlink, Rmdir: self._rmdir, Rename: self._rename, Write: self._write,
            Setattr: self._setattr, Setxattr: self._setxattr, Removexattr: self._removexattr,
        }

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.staging is not None:
            self.staging.close()
        if self.walk is not None:
            self.walk.close()
        for name in ("tree_fd", "inodes_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # -------------------------------------------------------------- cursor

    def begin(self, start: int) -> None:
        """Open (or create) the staging cursor at (checkpoint, start) (staging.py)."""
        assert self.staging is not None
        self.staging.begin(start)
        self.resumed = self.staging.resumed
        self.token = self.staging.token

    def advance(self, index: int, token: tuple[int, int] = (0, 0)) -> None:
        """Record that records before ``index`` are applied (in place, no fsync)."""
        assert self.staging is not None
        self.staging.advance(index, token)

    # -------------------------------------------------------------- helpers

    def _resolve(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the parent directory, last component) of a validated non-root path.

        treewalk's walk from tree/ (``ParentCache``): each directory opened
        relative to the previous one with O_NOFOLLOW and O_DIRECTORY, a
        symlink (or a non-directory) on the way is an error, never followed;
        the last parents stay open until a Rename or Rmdir (``_rename``,
        ``_rmdir`` forget them).  The fd is borrowed (``_release`` leaves it).
        """
        assert self.walk is not None
        try:
            return self.walk.parent(path)
        except OSError as e:
            where = e.filename
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise _ApplyError(f"{where!r} is not a directory in the shadow "
                                  f"(a symlink is never followed)") from None
            if e.errno == errno.ENOENT:
                raise _ApplyError(f"directory {where!r} is missing in the shadow") from None
            raise

    def _release(self, fd: int) -> None:
        """A parent fd from _resolve belongs to the walk's cache: nothing to do."""

    def _open_dir(self, path: bytes) -> int:
        """A readable fd of the directory at ``path`` (b"": the root); caller closes it."""
        if path == b"":
            return os.dup(self.tree_fd)
        pfd, name = self._resolve(path)
        try:
            return os.open(name, _O_DIR, dir_fd=pfd)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise _ApplyError(f"{path!r} is not a directory in the shadow") from None
            raise
        finally:
            self._release(pfd)

    @staticmethod
    def _set_dir_mtime(fd: int, mtime_ns: int) -> None:
        st = os.fstat(fd)
        os.utime(fd, ns=(st.st_atime_ns, mtime_ns))

    @staticmethod
    def _lstat(dir_fd: int, name: bytes | str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _key_stat(self, ino: int) -> os.stat_result | None:
        return self._lstat(self.inodes_fd, str(ino))

    def _drop_fd(self, ino: int) -> None:
        fd = self.fds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def _write_fd(self, ino: int) -> int | None:
        """A cached fd open for writing on inodes/<ino>, or None if not a regular file."""
        fd = self.fds.get(ino)
        if fd is not None:
            self.fds.move_to_end(ino)
            return fd
        key = str(ino)
        st = self._key_stat(ino)
        if st is None or not stat.S_ISREG(st.st_mode):   # never open devices or fifos
            return None
        fd = os.open(key, _O_WRITE, dir_fd=self.inodes_fd)
        if not _samestat(os.fstat(fd), st):
            os.close(fd)
            raise _ApplyError(f"inodes/{key} changed while being opened")
        self.fds[ino] = fd
        if len(self.fds) > self.fd_max:
            _, old = self.fds.popitem(last=False)
            os.close(old)
        return fd

    def _note_removed(self, st: os.stat_result) -> None:
        """A name of the non-directory ``st`` was removed: maybe only its hidden link is left."""
        if st.st_nlink <= 2:
            self.replaced.add((st.st_dev, st.st_ino))

    def _clear_name(self, pfd: int, name: bytes, path: bytes) -> None:
        """Remove a non-directory at name (replay of a creating record)."""
        st = self._lstat(pfd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            raise _ApplyError(f"{path!r} is a directory in the shadow")
        os.unlink(name, dir_fd=pfd)
        self._note_removed(st)

    def _set_key(self, ino: int, pfd: int, name: bytes) -> None:
        """Point inodes/<ino> at the object just created at (pfd, name)."""
        key = str(ino)
        self._drop_fd(ino)
        try:
            os.link(name, key, src_dir_fd=pfd, dst_dir_fd=self.inodes_fd, follow_symlinks=False)
        except FileExistsError:                 # inode number reused (or replay)
            old = self._key_stat(ino)
            if old is not None and old.st_nlink == 1:    # the old object has no name left
                self._drop_key(key, old)
            else:
                os.unlink(key, dir_fd=self.inodes_fd)
            os.link(name, key, src_dir_fd=pfd, dst_dir_fd=self.inodes_fd, follow_symlinks=False)
        self.deferred.pop(ino, None)

    # -------------------------------------------------------------- records

    def note(self, rec: Record) -> None:
        """Account for an already-applied record without applying it (resume)."""
        if isinstance(rec, Write):
            self.deferred[rec.ino] = rec.mtime_ns
        elif isinstance(rec, (Mknod, Symlink)) or (isinstance(rec, Setattr) and rec.ino):
            self.deferred.pop(rec.ino, None)

    def apply_one(self, rec: Record, index: int) -> None:
        """Apply one validated record to the shadow."""
        self._handlers[type(rec)](rec, index)

    def _write(self, r: Write, index: int) -> None:
        fd = self._write_fd(r.ino)
        if fd is None:              # unreachable in the original (unlinked while open)
            return
        data = r.data
        n = os.pwrite(fd, data, r.offset)
        if n < len(data):
            mv = memoryview(data)
            while n < len(mv):
                n += os.pwrite(fd, mv[n:], r.offset + n)
        self.deferred[r.ino] = r.mtime_ns

    def _mknod(self, r: Mknod, index: int) -> None:
        pfd, name = self._resolve(r.path)
        try:
            self._clear_name(pfd, name, r.path)
            ftype = stat.S_IFMT(r.mode)
            if ftype == stat.S_IFREG:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=pfd)
                try:
                    os.fchown(fd, r.uid, r.gid)
                    os.fchmod(fd, stat.S_IMODE(r.mode))
                    os.utime(fd, ns=(r.mtime_ns, r.mtime_ns))
                finally:
                    os.close(fd)
            else:
                os.mknod(name, ftype | 0o600, r.rdev, dir_fd=pfd)
                os.chown(name, r.uid, r.gid, dir_fd=pfd, follow_symlinks=False)
                os.chmod(name, stat.S_IMODE(r.mode), dir_fd=pfd)      # just created: no symlink
                os.utime(name, ns=(r.mtime_ns, r.mtime_ns), dir_fd=pfd, follow_symlinks=False)
            self._set_key(r.ino, pfd, name)
            self._set_dir_mtime(pfd, r.pmtime_ns)
        finally:
            self._release(pfd)

    def _mkdir(self, r: Mkdir, index: int) -> None:
        pfd, name = self._resolve(r.path)
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                st = self._lstat(pfd, name)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    raise _ApplyError(f"{r.path!r} exists in the shadow and is not a directory") from None
            fd = os.open(name, _O_DIR, dir_fd=pfd)
            try:
                os.fchown(fd, r.uid, r.gid)
                os.fchmod(fd, stat.S_IMODE(r.mode))
                os.utime(fd, ns=(os.fstat(fd).st_atime_ns, r.mtime_ns))
            finally:
                os.close(fd)
            self._set_dir_mtime(pfd, r.pmtime_ns)
        finally:
            self._release(pfd)

    def _symlink(self, r: Symlink, index: int) -> None:
        pfd, name = self._resolve(r.path)
        try:
            self._clear_name(pfd, name, r.path)
            os.symlink(r.target, name, dir_fd=pfd)
            os.chown(name, r.uid, r.gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(name, ns=(r.mtime_ns, r.mtime_ns), dir_fd=pfd, follow_symlinks=False)
            self._set_key(r.ino, pfd, name)
            self._set_dir_mtime(pfd, r.pmtime_ns)
        finally:
            self._release(pfd)

    def _link(self, r: Link, index: int) -> None:
        kst = self._key_stat(r.ino)
        if kst is None:
            raise _ApplyError(f"link to inode {r.ino}, which the shadow does not know "
                              f"(a file re-linked after being unlinked?)")
        pfd, name = self._resolve(r.path)
        try:
            st = self._lstat(pfd, name)
            if st is None or not _samestat(st, kst):
                self._clear_name(pfd, name, r.path)
                os.link(str(r.ino), name, src_dir_fd=self.inodes_fd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            self._set_dir_mtime(pfd, r.pmtime_ns)
        finally:
            self._release(pfd)

    def _unlink(self, r: Unlink, index: int) -> None:
        pfd, name = self._resolve(r.path)
        try:
            st = self._lstat(pfd, name)
            if st is not None:
                if stat.S_ISDIR(st.st_mode):
                    raise _ApplyError(f"unlink of {r.path!r}, a directory in the shadow")
                os.unlink(name, dir_fd=pfd)
                self._note_removed(st)
            kst = self._key_stat(r.ino)
            if kst is not None and kst.st_nlink == 1:   # only the hidden link is left
                self._drop_fd(r.ino)
                self._drop_key(str(r.ino), kst)
            self._set_dir_mtime(pfd, r.pmtime_ns)
        finally:
            self._release(pfd)

    def _rmdir(self, r: Rmdir, index: int) -> None:
        pfd, name = self._resolve(r.path)
        try:
            try:
                os.rmdir(name, dir_fd=pfd)
            except FileNotFoundError:
                pass
            except NotADirectoryError:
                raise _ApplyError(f"rmdir of {r.path!r}, not a directory in the shadow") from None
            self._set_dir_mtime(pfd, r.pmtime_ns)
        finally:
            self._release(pfd)
            self._forget_dirs()

    def _rename(self, r: Rename, index: int) -> None:
        opfd, oname = self._resolve(r.old)
        try:
            npfd, nname = self._resolve(r.new)
            try:
                self._do_rename(r, index, opfd, oname, npfd, nname)
                self._set_dir_mtime(opfd, r.old_pmtime_ns)
                self._set_dir_mtime(npfd, r.new_pmtime_ns)
            finally:
                self._release(npfd)
        finally:
            self._release(opfd)
            self._forget_dirs()

    def _forget_dirs(self) -> None:
        """A directory may have moved or gone (rename, rmdir): walk afresh from now on."""
        assert self.walk is not None
        self.walk.forget()

    def _do_rename(self, r: Rename, index: int, opfd: int, oname: bytes, npfd: int, nname: bytes) -> None:
        ost = self._lstat(opfd, oname)
        nst = self._lstat(npfd, nname)
        kst = self._key_stat(r.ino) if r.ino else None
        if r.flags & _RENAME_EXCHANGE:
            if ost is None or nst is None:
                raise _ApplyError(f"exchange of {r.old!r} and {r.new!r}: one is missing in the shadow")
            if self.token is not None and self.token[0] == index:
                done = (ost.st_dev, ost.st_ino) != self.token[1:]     # resumed after a kill
            elif kst is not None:
                done = _samestat(nst, kst) and not _samestat(ost, kst)
            else:
                done = False
            if done:
                return
            self.advance(index, (ost.st_dev, ost.st_ino))              # token: see Cursor
            sysc.renameat2(opfd, oname, npfd, nname, _RENAME_EXCHANGE)
            return
        if ost is None:
            # already renamed (replay)?  new must exist, and be the object when known
            if nst is not None and (kst is None or _samestat(nst, kst)):
                return
            raise _ApplyError(f"rename source {r.old!r} is missing in the shadow")
        if nst is not None and not _samestat(ost, nst) and not stat.S_ISDIR(nst.st_mode):
            self._note_removed(nst)
        os.rename(oname, nname, src_dir_fd=opfd, dst_dir_fd=npfd)

    def _setattr(self, r: Setattr, index: int) -> None:
        mask = r.mask
        if r.ino:
            kst = self._key_stat(r.ino)
            if kst is None:                 # unreachable in the original
                return
            key = str(r.ino)
            if mask & ATTR_SIZE and stat.S_ISREG(kst.st_mode):
                fd = self._write_fd(r.ino)
                if fd is not None:
                    os.ftruncate(fd, r.size)
            if mask & (ATTR_UID | ATTR_GID):
                os.chown(key, r.uid if mask & ATTR_UID else -1, r.gid if mask & ATTR_GID else -1,
                         dir_fd=self.inodes_fd, follow_symlinks=False)
            if mask & (ATTR_MODE | ATTR_UID | ATTR_GID) and not stat.S_ISLNK(kst.st_mode):
                # after a chown the recorded mode tells which setuid/setgid bits it cleared
                if mask & ATTR_MODE or (now := self._key_stat(r.ino)) is None \
                        or stat.S_IMODE(now.st_mode) != stat.S_IMODE(r.mode):
                    os.chmod(key, stat.S_IMODE(r.mode), dir_fd=self.inodes_fd)
            atime = r.atime_ns if mask & ATTR_ATIME else kst.st_atime_ns
            os.utime(key, ns=(atime, r.mtime_ns), dir_fd=self.inodes_fd, follow_symlinks=False)
            self.deferred.pop(r.ino, None)
            return
        fd = self._open_dir(r.path)
        try:
            if mask & (ATTR_UID | ATTR_GID):
                os.fchown(fd, r.uid if mask & ATTR_UID else -1, r.gid if mask & ATTR_GID else -1)
            if mask & ATTR_MODE or (mask & (ATTR_UID | ATTR_GID)
                                    and stat.S_IMODE(os.fstat(fd).st_mode) != stat.S_IMODE(r.mode)):
                os.fchmod(fd, stat.S_IMODE(r.mode))
            atime = r.atime_ns if mask & ATTR_ATIME else os.fstat(fd).st_atime_ns
            os.utime(fd, ns=(atime, r.mtime_ns))
        finally:
            os.close(fd)

    def _setxattr(self, r: Setxattr, index: int) -> None:
        if r.ino:
            if self._key_stat(r.ino) is None:
                return
            os.setxattr(self.inodes_path + b"/%d" % r.ino, r.name, r.value, follow_symlinks=False)
            return
        fd = self._open_dir(r.path)
        try:
            os.setxattr(fd, r.name, r.value)
        finally:
            os.close(fd)

    def _removexattr(self, r: Removexattr, index: int) -> None:
        try:
            if r.ino:
                if self._key_stat(r.ino) is None:
                    return
                os.removexattr(self.inodes_path + b"/%d" % r.ino, r.name, follow_symlinks=False)
                return
            fd = self._open_dir(r.path)
            try:
                os.removexattr(fd, r.name)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise

    # -------------------------------------------------------------- end of batch

    def finish(self) -> None:
        """Apply deferred file mtimes and drop hidden links left without a name."""
        for ino in list(self.fds):
            self._drop_fd(ino)
        for ino, mtime in self.deferred.items():
            st = self._key_stat(ino)
            if st is not None:
                os.utime(str(ino), ns=(st.st_atime_ns, mtime), dir_fd=self.inodes_fd,
                         follow_symlinks=False)
        self.deferred.clear()
        if self.resumed or self.replaced:
            self._collect_garbage(everything=self.resumed)

    def _collect_garbage(self, everything: bool) -> None:
        """Remove inodes/ entries whose object has no name left in tree/ (st_nlink == 1).

        Candidates are the objects that lost a name by being replaced
        (``self.replaced``); after a resume, every entry is checked (the
        candidates of the killed run are lost).
        """
        wanted = {ino for _, ino in self.replaced}
        with os.scandir(self.inodes_fd) as it:
            for entry in it:
                if not everything and entry.inode() not in wanted:
                    continue
                st = self._lstat(self.inodes_fd, entry.name)
                if st is None or st.st_nlink != 1 or stat.S_ISDIR(st.st_mode):
                    continue
                if not everything and (st.st_dev, st.st_ino) not in self.replaced:
                    continue
                self._drop_key(entry.name, st)
        self.replaced.clear()

    def _drop_key(self, key: str, st: os.stat_result) -> None:
        """Remove the last link of an object that has no name left: kept in history if it is on."""
        if self.history is None or not self.history.hold_key(self.inodes_fd, key, st):
            os.unlink(key, dir_fd=self.inodes_fd)


#: a run of consecutive records whose pre-images are captured together (history on,
#: history.RUN_TYPES: writes and creations) ends at this many bytes of data or records
RUN_BYTES = 4 << 20
RUN_RECORDS = 4096


def _failed(checkpoint: int, index: int, rec: Record, e: Exception) -> UpdaterError:
    if isinstance(e, OSError) and _is_space_error(e):
        return NoSpace(f"checkpoint {checkpoint}: record {index} ({type(rec).__name__}): "
                       f"{e.strerror} on the shadow's filesystem", checkpoint, index)
    if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
        # the process (or the system) is out of fds: nothing is wrong with the shadow;
        # the batch's fds are closed (apply_records' close) and the pass resumes at the cursor
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return NoFds(f"checkpoint {checkpoint}: record {index} ({type(rec).__name__}): "
                     f"{e.strerror} (open-file limit {soft}); retrying", checkpoint, index)
    return UpdaterError(f"checkpoint {checkpoint}: record {index} "
                        f"({type(rec).__name__}) failed: {e}; {RESEED_HINT}")


def _apply_run(ap: _Applier, checkpoint: int, run: Sequence[tuple[int, Record]],
               history: HistoryWriter | None) -> int:
    """Apply the records of ``run`` in order, each after its pre-image is written
    (:meth:`HistoryWriter.capture_run`: a part of the run at a time) and advancing the
    cursor after each; returns how many."""
    done = 0
    while done < len(run):
        part = run[done:]
        take = len(part)
        for i, (index, rec) in enumerate(part[:take]):
            try:
                if i == 0 and history is not None:
                    take = history.capture_run(part)
                ap.apply_one(rec, index)
            except (OSError, _ApplyError) as e:
                raise _failed(checkpoint, index, rec, e) from e
            ap.advance(index + 1)
            fault("updater.mid_batch")
            if i + 1 >= take:
                break
        done += take
    return len(run)


#: the records of a batch the verify pass keeps for the apply pass, at most (bytes, estimated)
KEEP_BYTES = 64 << 20
_RECORD_OVERHEAD = 256          # a decoded record's objects, beyond a write's data


def _cost(rec: Record) -> int:
    return _RECORD_OVERHEAD + (len(rec.data) if type(rec) is Write else 0)


class _VerifyPass:
    """What the verify pass does with each record it decodes (``log.verify``'s ``each``,
    and ``chunk`` before each entry of the log).

    1. validate it (records_check.py): a bad one stops the updater before the batch;
    2. note it in ``superseded`` (superseded.py);
    3. keep it for the apply pass while everything kept fits in ``budget`` bytes,
       dropping a kept write as soon as a later one supersedes it.  The record
       that goes past the budget ends the keeping at the start of its log
       entry: the apply pass takes the records kept before that entry, then
       reads the log again from that entry on (decompressing and decoding the
       rest a second time, as it did for the whole batch before).  A log that
       reports no entries (``chunk`` never called) is then read again whole.

    A kept batch is applied from memory: on pgbench's batches, the second
    decompression and decoding were a third of the updater's time.
    """

    def __init__(self, checkpoint: int, superseded: Superseded, budget: int | None = None) -> None:
        self.checkpoint = checkpoint
        self.superseded = superseded
        self.budget = KEEP_BYTES if budget is None else budget
        self.kept: list[Record | None] | None = []
        self.kept_bytes = 0
        #: (offset, index of its first record) of the log entry being decoded
        self._entry: tuple[int, int] | None = None
        #: the log offset the apply pass reads again from, once keeping ended
        self.resume: int | None = None

    def chunk(self, offset: int, index: int) -> None:
        if self.kept is not None and self.resume is None:
            self._entry = (offset, index)

    def __call__(self, index: int, rec: Record) -> None:
        check_record(self.checkpoint, index, rec)
        gone = self.superseded.note(index, rec)
        kept = self.kept
        if kept is None or self.resume is not None:
            return
        if gone is not None:
            old = kept[gone]
            if old is not None:
                self.kept_bytes -= _cost(old)
                kept[gone] = None       # (apply_records skips it before looking)
        self.kept_bytes += _cost(rec)
        if self.kept_bytes > self.budget:
            if self._entry is None:
                self.kept = None        # the whole batch is read again
            else:
                offset, first = self._entry
                del kept[first:]        # this entry's records come from the log again
                self.resume = offset
            return
        kept.append(rec)

    def records(self, olog: LogSource, info: CheckpointInfo) -> Iterable[Record | None]:
        if self.kept is None:
            return olog.records(info)
        if self.resume is not None:
            return itertools.chain(self.kept, olog.records(info, self.resume))
        return self.kept


def apply_records(shadow: Shadow, checkpoint: int, records: Iterable[Record | None], start: int = 0,
                  history: HistoryWriter | None = None, superseded: Superseded | None = None) -> int:
    """Apply the records of ``checkpoint`` to ``shadow``'s tree, in order.

    The first ``start`` records were applied by an earlier, interrupted run:
    they are only accounted for (deferred mtimes), not applied again.  The
    staging cursor is kept up to date after every record; at the end the
    deferred mtimes are set and orphaned hidden links removed.  The caller
    then calls ``shadow.set_applied(checkpoint)`` and :func:`clear_cursor`
    (:meth:`Updater.run_once` does all of it).

    Each record is validated just before it is applied; validate the whole
    batch first (:func:`validate_records`) so that a bad batch changes
    nothing.  Records whose index is in ``superseded`` (found in that pass,
    superseded.py) are writes a later write of the batch replaces: they are
    neither applied nor counted.  Returns the number of records applied
    (``start`` excluded).  Raises UpdaterError naming the checkpoint and
    record index.
    """
    ap = _Applier(shadow, checkpoint)
    applied = 0
    try:
        ap.begin(start)
        if history is not None:         # the reverse batch, after the cursor (history.py)
            ap.history = history
            history.begin(checkpoint, ap.resumed, start)
        index = -1
        run: list[tuple[int, Record]] = []      # consecutive records: their pre-images in one frame
        run_bytes = 0
        for index, rec in enumerate(records):
            if superseded is not None and index in superseded:
                continue            # a later write of the batch sets these bytes (superseded.py)
            assert rec is not None  # (None only stands for a superseded write)
            check_record(checkpoint, index, rec)
            if index < start:
                ap.note(rec)
                continue
            if history is not None and isinstance(rec, RUN_TYPES):
                run.append((index, rec))
                run_bytes += len(rec.data) if type(rec) is Write else 64
                if run_bytes < RUN_BYTES and len(run) < RUN_RECORDS:
                    continue
                applied += _apply_run(ap, checkpoint, run, history)
                run, run_bytes = [], 0
                continue
            if run:
                applied += _apply_run(ap, checkpoint, run, history)
                run, run_bytes = [], 0
            applied += _apply_run(ap, checkpoint, [(index, rec)], history)
        if run:
            applied += _apply_run(ap, checkpoint, run, history)
        if index + 1 < start:
            raise UpdaterError(f"checkpoint {checkpoint} has {index + 1} records, "
                               f"but {start} were already applied")
        try:
            ap.finish()
        except OSError as e:
            if _is_space_error(e):
                raise NoSpace(f"checkpoint {checkpoint}: finishing the batch: {e.strerror} on the "
                              f"shadow's filesystem", checkpoint, index + 1) from e
            raise UpdaterError(f"checkpoint {checkpoint}: finishing the batch failed: {e}; "
                               f"{RESEED_HINT}") from e
    finally:
        ap.close()
    return applied


# ------------------------------------------------------------------ updater

class LogSource(Protocol):
    """What the updater reads of the ordered log (fusejournal.log.OrderedLog)."""

    def checkpoints(self, after: int) -> Sequence[CheckpointInfo]: ...

    def verify(self, info: CheckpointInfo, each: Callable[[int, Record], None] | None = None,
               chunk: Callable[[int, int], None] | None = None) -> None: ...

    def records(self, info: CheckpointInfo, start: int | None = None) -> Iterator[Record]: ...


class Updater:
    """Brings the shadow up to the last complete checkpoint of the ordered log.

    ``olog`` is a :class:`LogSource`.  :meth:`run_once` is called by the
    daemon from a worker thread; calls are serialized.
    """

    def __init__(self, olog: LogSource, shadow: Shadow,
                 committed: Callable[[Marker], bool | None] | None = None,
                 retention: Policy | None = None, keep_bytes: int | None = None) -> None:
        self.olog = olog
        self.shadow = shadow
        #: what the verify pass keeps of a batch for the apply pass (None: KEEP_BYTES);
        #: the mount's --memory-limit
        self.keep_bytes = keep_bytes
        #: a consistency group member's rule (fusejournal/member.py): marker ->
        #: True apply, False skip (its group checkpoint aborted), None stop here
        self.committed = committed
        #: the last error (None after a successful run); shown by ``fusejournal status``
        self.error: str | None = None
        self._lock = threading.Lock()
        self._current: int | None = None
        #: browse mounts never see a batch half-applied (fusejournal/browsegate.py)
        self.browse_gate = UpdaterSide(shadow.root)
        #: the reverse batch of each checkpoint applied (fusejournal/history.py)
        self.history = HistoryWriter(shadow.root, retention or Policy())

    def run_once(self) -> int:
        """Apply every complete checkpoint after ``shadow.applied``; return the new applied id.

        A batch that fails verification (CorruptLog) or validation stops the
        updater before that checkpoint (nothing of it applied); a failure
        while applying leaves the staging cursor so the next call resumes.
        Errors are stored in :attr:`error` and re-raised.  A full shadow
        filesystem (ENOSPC/EDQUOT anywhere: staging cursor, tree/, inodes/,
        applied.json) raises :class:`NoSpace` instead, which is transient:
        :attr:`error` stays None and calling again once space is freed
        resumes at the cursor.
        """
        with self._lock:
            self._current = None
            try:
                applied = self._run()
            except NoSpace:
                self.error = None
                raise
            except OSError as e:
                if not _is_space_error(e):
                    self.error = self._describe(e)
                    raise
                self.error = None
                cp = self._current
                raise NoSpace(f"{f'checkpoint {cp}: ' if cp is not None else ''}{e.strerror} on "
                              f"the shadow's filesystem", cp) from e
            except Exception as e:
                self.error = self._describe(e)
                raise
            self.error = None
            return applied

    def close(self) -> None:
        """Close what the updater keeps open between batches: the history writer's files and
        the browse gate's lock file (a process that exits closes them anyway)."""
        self.history.close()
        self.browse_gate.close()

    def _describe(self, e: Exception) -> str:
        msg = str(e) if isinstance(e, UpdaterError) else f"{type(e).__name__}: {e}"
        if self._current is not None and not msg.startswith("checkpoint"):
            msg = f"checkpoint {self._current}: {msg}"
        return msg

    def _run(self) -> int:
        shadow = self.shadow
        applied = shadow.applied
        cursor = read_cursor(shadow)
        if cursor is not None and cursor.checkpoint <= applied:
            clear_cursor(shadow)            # killed after set_applied: the batch is complete
            cursor = None
        if cursor is not None and cursor.boot != boot_id() and any(cursor.boot) and any(boot_id()):
            # The system went down (power loss, kernel crash) while this batch
            # was being applied: the cursor and the changes after the last
            # set_applied were not all written to disk, so resuming could
            # silently diverge.
            raise UpdaterError(f"checkpoint {cursor.checkpoint} was being applied when the system went "
                               f"down: the shadow {shadow.root} may have lost part of it and must be "
                               f"seeded again (fusejournal mount --reseed)")
        expect = applied + 1
        for info in self.olog.checkpoints(applied):
            n = info.marker.checkpoint
            if n <= applied:
                continue
            if n != expect:
                # never skip: the shadow would silently miss those changes
                raise UpdaterError(f"checkpoints {expect}..{n - 1} are missing from the log (a "
                                   f"segment was removed or truncated): the shadow {shadow.root} "
                                   f"cannot reach checkpoint {n}; {RESEED_REPAIR_HINT}")
            if self.committed is not None:
                verdict = self.committed(info.marker)
                if verdict is None:
                    break                   # its group checkpoint is not committed (yet)
                if verdict is False:
                    expect = n + 1          # aborted: never applied; its records came again later
                    continue
            start = 0
            if cursor is not None:
                if cursor.checkpoint != n:
                    raise UpdaterError(f"the staging cursor is for checkpoint {cursor.checkpoint}, "
                                       f"but the next checkpoint to apply is {n}: the shadow is "
                                       f"inconsistent and must be seeded again")
                start = cursor.index
                cursor = None
            self._current = n
            fault("updater.before_batch")
            # one pass: CorruptLog, or UpdaterError for a bad record: stop before this checkpoint;
            # the same pass finds the writes a later write of the batch replaces
            superseded = Superseded(getattr(info.marker, "operations", 0))
            first = _VerifyPass(n, superseded, self.keep_bytes)
            self.olog.verify(info, first, first.chunk)
            with self.browse_gate.updating():
                apply_records(shadow, n, first.records(self.olog, info), start, self.history, superseded)
                del first
                self.history.finish(n, getattr(info.marker, "time_ns", 0), getattr(info.marker, "label", ""))
                fault("updater.before_applied")
                shadow.set_applied(n, getattr(info.marker, "time_ns", None))
                clear_cursor(shadow)
                with self.browse_gate.pinning(wait=False) as free:
                    if free:                # (a restore reading history pins it: prune after it)
                        self.history.retain(n)
            applied = n
            expect = n + 1
        if cursor is not None:
            raise UpdaterError(f"the staging cursor is for checkpoint {cursor.checkpoint}, which the log "
                               f"no longer holds: the shadow is half-way through it and must be seeded "
                               f"again (fusejournal mount --reseed)")
        return applied
