"""Seeding: the shadow's tree/ and inodes/ made from the original.

:class:`Seeder` walks the original from the daemon's source fd, every
directory opened with ``O_NOFOLLOW`` and every object compared by
(st_dev, st_ino) (treewalk.py); each non-directory gets its hidden link
inodes/<st_ino>; contents are copied extent by extent (holes stay holes),
then modes, owners, xattrs and mtimes (directories' last, when their
contents are done).  A mount point inside the original is refused
(ShadowError).

The walk order is deterministic: depth first, pre-order, names sorted as
bytes in every directory.  So the entries copied so far are exactly those
whose path (a tuple of name components) sorts at or before :attr:`cursor`,
the last entry copied, and a walk started with ``resume=cursor`` copies
exactly the rest (fusejournal/seeding.py makes that cursor durable).

Two modes:

- strict (the original does not change: the first mount of a stopped
  application, ``Shadow.seed``): tree/ starts empty; an object that changes
  type under the walk is an error;
- ``tolerant`` (the online seed, seeding.py): the original changes while it
  is copied, and every change is journaled and marked dirty (the activity
  log), to be reconciled after the copy.  So an entry that vanishes or
  changes type between the listing and the copy is skipped (its directory is
  dirty), and anything already in the shadow at a name being copied (left by
  a walk that was interrupted after the cursor) is replaced.

Memory: one sorted listing per directory level being walked, plus the
inode numbers of multiply-linked files already copied.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator

from . import layout
from .shadow import Shadow, ShadowError, _show
from .treewalk import O_DIR as _O_DIR
from .treewalk import O_READ as _O_READ
from .treewalk import copy_data, copy_path_xattrs, read_xattrs, write_xattrs
from .treewalk import listdir as _listdir

log = logging.getLogger("fusejournal")

#: errors meaning "the entry changed or vanished under the walk" (tolerant mode skips it)
RACE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ESTALE, errno.EISDIR,
                         errno.ENXIO})

Path = tuple[bytes, ...]


class _Vanished(Exception):
    """The entry being copied changed type or disappeared (tolerant mode: skipped)."""


class _Moved(Exception):
    """A directory whose fds the walk had closed (deep below it) was moved meanwhile."""


_OPEN_LEVELS = 16               # directory levels whose fds the walk keeps open (see run)


# (src dir fd, dst dir fd, pending names, path components, cursor below this directory)
_Frame = tuple[int, int, Iterator[bytes], Path, "Path | None"]


class Seeder:
    """One walk of the original into the shadow (see the module docstring)."""

    def __init__(self, shadow: Shadow, source_fd: int, progress: Callable[[int], None] | None = None,
                 *, resume: Path | None = None, tolerant: bool = False,
                 on_entry: Callable[[Seeder], None] | None = None) -> None:
        self.shadow = shadow
        self.source_fd = source_fd
        self.progress = progress
        self.tolerant = tolerant
        self.on_entry = on_entry
        #: the last entry copied, in walk order (() = nothing yet)
        self.cursor: Path = tuple(resume) if resume else ()
        self.count = 0                          # entries copied by this walk
        self.bytes = 0                          # allocated bytes of the files it copied
        self.skipped = 0                        # entries that changed under the walk (tolerant)
        self.linked: set[int] = set()           # st_ino of multiply-linked files copied
        self.dev = 0
        self.inodes_fd = -1
        self.shadow_id: tuple[int, int] = (0, 0)

    def run(self) -> int:
        """Copy every entry after :attr:`cursor`; return the number copied (the root not counted).
        Only the top ``_OPEN_LEVELS`` directories of the walk keep their fds open; a deeper
        parent is opened again by '..' when its child is done, and must be the same directory
        (source and shadow): if the application moved it meanwhile (tolerant mode), the walk
        goes on from the cursor by its path, as a resumed walk does."""
        while True:
            try:
                return self._walk()
            except _Moved as e:
                if not self.tolerant:
                    raise ShadowError(f"{e} while it was copied") from None
                log.debug("seed: %s: the walk goes on from the cursor", e)

    def _park(self, stack: list[_Frame], parked: dict[int, tuple[int, int, int, int]]) -> None:
        """Before a child frame is pushed: close the parent's fds when the walk is deep."""
        if len(stack) < _OPEN_LEVELS:
            return
        src, dst, names, comps, below = stack[-1]
        s, d = os.fstat(src), os.fstat(dst)
        parked[len(stack) - 1] = (s.st_dev, s.st_ino, d.st_dev, d.st_ino)
        os.close(src)
        os.close(dst)
        stack[-1] = (-1, -1, names, comps, below)

    @staticmethod
    def _unpark(stack: list[_Frame], parked: dict[int, tuple[int, int, int, int]], src: int, dst: int) -> None:
        """After a child frame was popped: open its parent again by '..' (the same directories)."""
        _, _, names, comps, below = stack[-1]
        s = os.open("..", _O_DIR, dir_fd=src)
        try:
            d = os.open("..", _O_DIR, dir_fd=dst)
        except BaseException:
            os.close(s)
            raise
        ss, ds = os.fstat(s), os.fstat(d)
        if (ss.st_dev, ss.st_ino, ds.st_dev, ds.st_ino) != parked.pop(len(stack) - 1):
            os.close(s)
            os.close(d)
            raise _Moved(f"{_show(b'/'.join(comps))} moved")
        stack[-1] = (s, d, names, comps, below)

    def _walk(self) -> int:
        sh = self.shadow
        rfd = sh.open_root()
        try:
            st_sh = os.fstat(rfd)
        finally:
            os.close(rfd)
        self.shadow_id = (st_sh.st_dev, st_sh.st_ino)
        self.inodes_fd = sh.open_sub(layout.SHADOW_INODES)
        stack: list[_Frame] = []
        parked: dict[int, tuple[int, int, int, int]] = {}
        try:
            src = os.open(".", _O_DIR, dir_fd=self.source_fd)
            try:
                dst = sh.open_sub(layout.SHADOW_TREE)
            except BaseException:
                os.close(src)
                raise
            st = os.fstat(src)
            self.dev = st.st_dev
            below: Path | None = self.cursor or None
            stack.append((src, dst, self._names(src, below), (), below))
            os.fchown(dst, st.st_uid, st.st_gid)
            while stack:
                src, dst, names, comps, below = stack[-1]
                name = next(names, None)
                if name is None:
                    stack.pop()
                    try:
                        if stack and stack[-1][0] < 0:
                            self._unpark(stack, parked, src, dst)
                        self._finish_dir(src, dst)
                    finally:
                        os.close(src)
                        os.close(dst)
                    continue
                path = comps + (name,)
                try:
                    if below and name == below[0]:
                        # the entry on the cursor's way: copied already (at least created)
                        sub = self._reenter(src, dst, name, path, below[1:])
                        if sub is not None:
                            self._park(stack, parked)
                            stack.append(sub)
                        continue
                    sub = self._copy_entry(src, dst, name, path)
                except _Vanished as e:
                    self.skipped += 1
                    log.debug("seed: %s changed under the walk (%s): its directory is dirty", _show(
                        b"/".join(path)), e)
                    continue
                except OSError as e:
                    if not (self.tolerant and e.errno in RACE_ERRNOS):
                        raise
                    self.skipped += 1
                    log.debug("seed: %s changed under the walk (%s)", _show(b"/".join(path)), e.strerror)
                    continue
                if sub is not None:
                    self._park(stack, parked)
                    stack.append(sub)
                self.cursor = path
                self.count += 1
                if self.progress is not None:
                    self.progress(self.count)
                if self.on_entry is not None:
                    self.on_entry(self)
        finally:
            for src, dst, _, _, _ in stack:
                if src >= 0:
                    os.close(src)
                    os.close(dst)
            os.close(self.inodes_fd)
            self.inodes_fd = -1
        return self.count

    @staticmethod
    def _names(src: int, below: Path | None) -> Iterator[bytes]:
        names = _listdir(src)
        if below:
            names = [n for n in names if n >= below[0]]
        return iter(names)

    def _reenter(self, src: int, dst: int, name: bytes, path: Path, rest: Path) -> _Frame | None:
        """The entry ``name`` lies on the resume cursor's way: it was copied (or at least created,
        for a directory).  Descend into it if both sides still have a directory there."""
        try:
            s = os.open(name, _O_DIR, dir_fd=src)
        except OSError as e:
            if e.errno in RACE_ERRNOS:
                return None                     # no longer a directory: its parent is dirty
            raise
        try:
            d = os.open(name, _O_DIR, dir_fd=dst)
        except OSError as e:
            os.close(s)
            if e.errno in RACE_ERRNOS:          # not (or no longer) a directory in the shadow:
                return self._copy_entry(src, dst, name, path)       # copy it afresh
            raise
        return s, d, self._names(s, rest or None), path, rest or None

    def _finish_dir(self, src: int, dst: int) -> None:
        st = os.fstat(src)
        os.fchmod(dst, stat.S_IMODE(st.st_mode))
        write_xattrs(dst, False, read_xattrs(src, False))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _clear(self, dst: int, name: bytes, keep_dir: bool) -> bool:
        """Tolerant mode: make room at ``name`` in the shadow (left by an interrupted walk).
        Returns True if a directory was kept there (``keep_dir``)."""
        try:
            st = os.stat(name, dir_fd=dst, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(name, dir_fd=dst)
        else:
            os.unlink(name, dir_fd=dst)
        return False

    def _link_key(self, dst: int, name: bytes, key: str) -> None:
        """inodes/<key> -> the object just made at ``name`` (a stale key is replaced)."""
        try:
            os.link(name, key, src_dir_fd=dst, dst_dir_fd=self.inodes_fd, follow_symlinks=False)
        except FileExistsError:
            if not self.tolerant:
                raise
            os.unlink(key, dir_fd=self.inodes_fd)
            os.link(name, key, src_dir_fd=dst, dst_dir_fd=self.inodes_fd, follow_symlinks=False)

    def _copy_entry(self, src: int, dst: int, name: bytes, path: Path) -> _Frame | None:
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        show = b"/".join(path)
        if st.st_dev != self.dev:
            raise ShadowError(f"{_show(show)} is on another filesystem (a mount point inside "
                              f"the original is not supported)")
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            if (st.st_dev, st.st_ino) == self.shadow_id:
                raise ShadowError(f"the shadow lies inside the original tree at {_show(show)}")
            s = os.open(name, _O_DIR, dir_fd=src)
            try:
                if not (self.tolerant and self._clear(dst, name, keep_dir=True)):
                    os.mkdir(name, 0o700, dir_fd=dst)
                d = os.open(name, _O_DIR, dir_fd=dst)
                try:
                    sst = os.fstat(s)
                    os.fchown(d, sst.st_uid, sst.st_gid)
                except BaseException:
                    os.close(d)
                    raise
            except BaseException:
                os.close(s)
                raise
            return s, d, self._names(s, None), path, None
        if self.tolerant:
            self._clear(dst, name, keep_dir=False)
        key = str(st.st_ino)
        if st.st_nlink > 1 and (st.st_ino in self.linked or (self.tolerant and self._known(key, st))):
            os.link(key, name, src_dir_fd=self.inodes_fd, dst_dir_fd=dst, follow_symlinks=False)
            self.linked.add(st.st_ino)
            return None
        if stat.S_ISREG(mode):
            st = self._copy_file(src, dst, name, show, st)
            key = str(st.st_ino)
        elif stat.S_ISLNK(mode):
            target = os.readlink(name, dir_fd=src)
            os.symlink(target, name, dir_fd=dst)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
            copy_path_xattrs(src, dst, name)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)
        else:                                   # fifo, socket, char/block device
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dst)
            copy_path_xattrs(src, dst, name)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)
        self._link_key(dst, name, key)
        if st.st_nlink > 1:
            self.linked.add(st.st_ino)
        return None

    def _known(self, key: str, st: os.stat_result) -> bool:
        """Tolerant mode, a multiply-linked file: was it copied by an earlier (interrupted) walk?"""
        try:
            kst = os.stat(key, dir_fd=self.inodes_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        # a stale key (inode number reused) is found by the reconciliation: its parent is dirty
        return stat.S_IFMT(kst.st_mode) == stat.S_IFMT(st.st_mode)

    def _copy_file(self, src: int, dst: int, name: bytes, show: bytes,
                   seen: os.stat_result) -> os.stat_result:
        try:
            s = os.open(name, _O_READ | os.O_NOATIME, dir_fd=src)
        except PermissionError:                 # O_NOATIME needs ownership or CAP_FOWNER
            s = os.open(name, _O_READ, dir_fd=src)
        try:
            st = os.fstat(s)
            if not stat.S_ISREG(st.st_mode):
                if self.tolerant:
                    raise _Vanished("no longer a regular file")
                raise ShadowError(f"{_show(show)} changed type while seeding")
            if self.tolerant and st.st_ino != seen.st_ino:
                raise _Vanished("replaced by another file")
            d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600, dir_fd=dst)
            try:
                copy_data(s, d, st.st_size)
                os.fchown(d, st.st_uid, st.st_gid)
                os.fchmod(d, stat.S_IMODE(st.st_mode))
                write_xattrs(d, False, read_xattrs(s, False))
                os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(d)
            self.bytes += st.st_blocks * 512
            return st
        finally:
            os.close(s)


def sweep_hidden_links(shadow: Shadow) -> int:
    """Remove inodes/ entries whose object has no name left in tree/ (st_nlink == 1): left
    by a tolerant walk that replaced objects.  Returns how many were removed."""
    fd = shadow.open_sub(layout.SHADOW_INODES)
    n = 0
    try:
        with os.scandir(fd) as it:
            for entry in it:
                try:
                    st = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_nlink == 1 and not stat.S_ISDIR(st.st_mode):
                    os.unlink(entry.name, dir_fd=fd)
                    n += 1
    finally:
        os.close(fd)
    return n


def count_tree(source_fd: int, stop: Callable[[], bool] | None = None,
               each: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Count the entries (the root not counted) and the allocated bytes of the regular files
    of the original, for the seed's progress; ``each(entries, bytes)`` is called now and then,
    ``stop()`` ends the count early.  Depth first, one listing per level (never one per
    pending directory) and the fds of the top ``_OPEN_LEVELS`` levels only (a deeper parent
    is opened again by '..': an estimate, it runs beside the walk and must not take its
    fds).  Entries that vanish under the count are ignored."""
    entries = nbytes = 0
    fd = os.open(".", _O_DIR, dir_fd=source_fd)
    stack: list[tuple[int, Iterator[tuple[str, int, int]]]] = [(fd, _count_listing(fd))]
    try:
        while stack:
            fd, it = stack[-1]
            e = next(it, None)
            if e is None:
                stack.pop()
                try:
                    if stack and stack[-1][0] < 0:
                        stack[-1] = (os.open("..", _O_DIR, dir_fd=fd), stack[-1][1])
                finally:
                    os.close(fd)
                continue
            name, mode, blocks = e
            entries += 1
            if stat.S_ISREG(mode):
                nbytes += blocks * 512
            elif stat.S_ISDIR(mode):
                try:
                    sub = os.open(name, _O_DIR, dir_fd=fd)
                except OSError:
                    continue
                if len(stack) >= _OPEN_LEVELS:
                    os.close(fd)
                    stack[-1] = (-1, it)
                stack.append((sub, _count_listing(sub)))
            if entries % 4096 == 0:
                if each is not None:
                    each(entries, nbytes)
                if stop is not None and stop():
                    break
    finally:
        for fd, _ in stack:
            if fd >= 0:
                os.close(fd)
    return entries, nbytes


def _count_listing(fd: int) -> Iterator[tuple[str, int, int]]:
    """(name, mode, blocks) of each entry of the directory ``fd`` (vanished ones left out)."""
    out = []
    try:
        with os.scandir(fd) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                out.append((e.name, st.st_mode, st.st_blocks))
    except OSError:
        pass
    return iter(out)


def path_show(path: Path) -> str:
    """A printable form of a cursor."""
    return _show(b"/".join(path))
