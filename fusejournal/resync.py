"""Targeted resync after a crash: records that bring the shadow up to the original.

When the daemon is killed, the records of its temporary store are lost while
the operations themselves reached the original tree.  The activity log
(:mod:`fusejournal.activity`) names, by kernel file handle, every pre-existing
object changed since the last durable checkpoint: files written, truncated,
chmod'ed ..., and directories whose entries changed.  At restart, once the
updater has applied every confirmed checkpoint (so SHADOW/tree equals the
original as of the last one), :func:`resync` compares just those objects
between the original and the shadow and returns records that, applied in
order by the updater, make the shadow equal to the original's current state.
The daemon makes them the head of the next checkpoint.

Nothing is modified here: the original is only read (through ``source_fd`` and
file handles), the shadow only read and stat'ed.

How (details and the reasoning in docs/updater.md, "Targeted resync after a
crash"):

* **Files** (non-directory intents): the shadow's ``inodes/<ino>`` is compared
  block by block (1 MiB, holes skipped) with the original; a ``Write`` for
  each differing block, a truncating ``Setattr`` first if the file shrank, a
  final ``Setattr`` (size, mode, owner, mtime) and xattr diffs.  Holes stay
  holes: only the original's data extents are ever written (zeros included,
  where the shadow has a hole), and where the shadow has data in a hole of
  the original it is cut there first (see :meth:`_Resync.diff_data`).
* **Directories** are opened by handle and found by path
  (``/proc/self/fd``); their entries are compared with the shadow directory at
  the same path.  New objects are copied whole (a ``Link`` when the inode is
  already known to the shadow: a moved or hard-linked file costs one record,
  no data), vanished ones removed (subtrees depth first), replaced ones both.
  A sub-directory present on both sides with no intent of its own is taken
  to be the shadow's, unchanged, only if mode, owner and mtime agree and its
  ctime predates the checkpoint (``since_ns``), or, in doubt, its contents
  agree (names, types, xattrs, the inode keys of its files); otherwise it is
  compared as well, and everything below it that both sides have (a
  directory renamed over another, or exchanged).
* **Order**: file syncs; objects parked out of the way of a type change;
  removals that must precede a creation (type changes involving a
  directory); all creations and links; all other removals; parked names
  dropped; directory attributes.  So a moved file always gets its new name
  before its old name goes (the last name of an object takes its hidden link
  with it).

**Deferred data** (the online seed's final round, ``defer``): the contents of
regular files are neither read nor compared.  Every regular file the resync
reaches (an intent, or an entry of a compared directory) is noted in
``defer.files`` with the original's stat (size, mtime, mode), and a new one
(not in the shadow) is created empty at its size and noted in ``defer.fresh``;
attributes, names, links, symlinks and xattrs are done as usual.  The caller
brings the contents to that state from the logged records (seeding.py,
"replay").  No file data is then read: the work is the listings and stats of
the intended objects, whatever the files' sizes.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import TypeAlias

from . import layout, sysc
from .activity import Intent
from .records import (
    ATTR_GID,
    ATTR_MODE,
    ATTR_MTIME,
    ATTR_SIZE,
    ATTR_UID,
    Link,
    Record,
    Removexattr,
    Rename,
    Rmdir,
    Setxattr,
    Unlink,
    Write,
    mkdir_record,
    mknod_record,
    setattr_record,
    symlink_record,
)
from .shadow import Shadow
from .treewalk import O_DIR as _O_DIR
from .treewalk import O_PATH as _O_PATH
from .treewalk import O_WALK as _O_WALK
from .treewalk import data_map, read_xattrs
from .treewalk import join as _join
from .treewalk import listdir as _listdir
from .treewalk import lstat_at as _lstat
from .treewalk import open_at as _open_at
from .treewalk import open_read as _open_read
from .treewalk import same_object as _same

__all__ = ["resync", "resync_iter", "ResyncError", "Deferred", "CHUNK", "UNKNOWN_KEY", "CTIME_MARGIN_NS"]

#: largest Write record produced (and the block size files are compared in)
CHUNK = 1 << 20
#: inode key put in an Unlink whose shadow object has no known key (see docs)
UNKNOWN_KEY = (1 << 64) - 1
#: a directory whose ctime is this much before the checkpoint time is taken as unchanged
#: since then (covers the coarse clock of file timestamps; larger only costs comparisons)
CTIME_MARGIN_NS = 10 * 1_000_000_000

_DIR_MASK = ATTR_MODE | ATTR_UID | ATTR_GID | ATTR_MTIME
_FILE_MASK = _DIR_MASK | ATTR_SIZE
_LINK_MASK = ATTR_UID | ATTR_GID | ATTR_MTIME
_COMPARED_XATTRS = ("user.", "trusted.")
_GONE = (errno.ESTALE, errno.ENOENT)
#: a file whose data is read by path or handle has moved or gone (``skip_vanished``)
_VANISHED = (errno.ESTALE, errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
_PARK = b".fusejournal-resync."
#: directories a single "is it the same directory?" check may read before giving up
_SAME_DIR_BUDGET = 64


class ResyncError(Exception):
    """The original or the shadow is not in a state the resync can work from."""


class Deferred:
    """What a resync with deferred data left to the caller (see the module docstring):
    ``files``: inode key -> the original's stat of every regular file reached;
    ``fresh``: the keys of those the shadow did not have (created empty)."""

    __slots__ = ("files", "fresh")

    def __init__(self) -> None:
        self.files: dict[int, os.stat_result] = {}
        self.fresh: set[int] = set()


# ------------------------------------------------------------------ helpers

def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def _in_or_below(path: bytes, dirs: set[bytes]) -> bool:
    """Is ``path``, or a directory above it (the root aside), in ``dirs``?"""
    while path:
        if path in dirs:
            return True
        path = _parent(path)
    return False


def _depth(path: bytes) -> int:
    return path.count(b"/") + 1 if path else 0


def _xattrs(fd: int, is_path_fd: bool) -> dict[bytes, bytes]:
    """The user.* and trusted.* xattrs of the object behind ``fd`` (names as bytes)."""
    return {os.fsencode(k): v for k, v in read_xattrs(fd, is_path_fd).items()
            if k.startswith(_COMPARED_XATTRS)}


def _xattr_diff(ino: int, path: bytes, want: dict[bytes, bytes], have: dict[bytes, bytes]) -> list[Record]:
    out: list[Record] = []
    for name in sorted(have):
        if name not in want:
            out.append(Removexattr(ino, path, name))
    for name in sorted(want):
        if have.get(name) != want[name]:
            out.append(Setxattr(ino, path, name, want[name]))
    return out


def _all_zero(buf: bytes) -> bool:
    return buf.count(0) == len(buf)


def _blocks(start: int, end: int) -> Iterator[tuple[int, int]]:
    """[start, end) cut at multiples of CHUNK."""
    off = start
    while off < end:
        nxt = min(end, (off // CHUNK + 1) * CHUNK)
        yield off, nxt
        off = nxt


def _first_stale(omap: list[tuple[int, int]], smap: list[tuple[int, int]], end: int,
                 blk: int) -> int | None:
    """The lowest offset below ``end`` where the shadow holds data (``smap``) inside a
    hole of the original (not in ``omap``), in whole shadow blocks of ``blk`` bytes; or None.

    Through the mount a hole can only appear where the file was truncated below
    it (there is no punch): everything of the original above that offset was
    written since.  So the shadow is cut there and rewritten from the original.
    """
    holes: list[tuple[int, int]] = []
    pos = 0
    for s, e in [*omap, (end, end)]:
        s = min(s, end)
        if s > pos:
            holes.append((pos, s))
        pos = max(pos, e)
        if pos >= end:
            break
    j = 0
    for hs, he in holes:
        a = -(-hs // blk) * blk                 # whole blocks of the shadow only (another
        b = he if he >= end else he // blk * blk    # block size cannot match exactly anyway)
        if a >= b:
            continue
        while j < len(smap) and smap[j][1] <= a:
            j += 1
        if j < len(smap) and smap[j][0] < b:
            return max(smap[j][0], a)
    return None


def _segments(omap: list[tuple[int, int]], smap: list[tuple[int, int]],
              end: int) -> Iterator[tuple[int, int, bool, bool]]:
    """Cut [0, end) where either map changes between data and hole; yield
    ``(start, stop, data in the original, data in the shadow)`` where either holds data."""
    points = {0, end}
    for s, e in (*omap, *smap):
        points.add(min(s, end))
        points.add(min(e, end))
    pts = sorted(points)
    i = j = 0
    for a, b in itertools.pairwise(pts):
        while i < len(omap) and omap[i][1] <= a:
            i += 1
        while j < len(smap) and smap[j][1] <= a:
            j += 1
        in_o = i < len(omap) and omap[i][0] <= a
        in_s = j < len(smap) and smap[j][0] <= a
        if in_o or in_s:
            yield a, b, in_o, in_s


class _Locator:
    """How to reopen an object of the original at emission time (by handle or by path)."""

    __slots__ = ("handle", "path")

    def __init__(self, handle: Intent | None = None, path: bytes | None = None) -> None:
        self.handle = handle
        self.path = path

    def open_read(self, source_fd: int, ino: int) -> int:
        """An O_RDONLY fd of the regular file, checked to be inode ``ino``."""
        if self.handle is not None:
            h = self.handle
            flags = os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = sysc.open_by_handle(source_fd, h.handle_type, h.handle, flags | os.O_NOATIME)
            except PermissionError:
                fd = sysc.open_by_handle(source_fd, h.handle_type, h.handle, flags)
        else:
            assert self.path is not None
            pfd = _open_at(source_fd, _parent(self.path), _O_WALK)
            try:
                fd = _open_read(pfd, self.path.rpartition(b"/")[2])
            finally:
                os.close(pfd)
        st = os.fstat(fd)
        if st.st_ino != ino or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            where = repr(self.path) if self.path is not None else "a file opened by handle"
            raise ResyncError(f"the original changed during the resync: {where} is no longer inode {ino}")
        return fd


class _Lazy:
    """Records produced only when emitted (file data: memory stays bounded)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Iterator[Record]]) -> None:
        self.fn = fn


#: what a phase holds: records, and data records still to be produced
_Item: TypeAlias = "Record | _Lazy"

# ------------------------------------------------------------------ the resync

class _Resync:
    def __init__(self, source_fd: int, shadow: Shadow, since_ns: int | None,
                 defer: Deferred | None = None, distrust: bool = False,
                 skip_vanished: bool = False) -> None:
        self.src = source_fd
        self.defer = defer
        self.distrust = distrust
        self.skip_vanished = skip_vanished
        self.since = None if since_ns is None else since_ns - CTIME_MARGIN_NS
        self.shadow = shadow
        self.tree_fd = self.inodes_fd = -1
        st = os.fstat(source_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise ResyncError("source_fd is not a directory")
        self.dev = st.st_dev
        self.base = os.readlink(b"/proc/self/fd/%d" % source_fd)
        try:
            self.tree_fd = shadow.open_sub(layout.SHADOW_TREE)      # never through a symlink
            self.inodes_fd = shadow.open_sub(layout.SHADOW_INODES)
        except OSError as e:
            self.close()
            raise ResyncError(f"cannot open the shadow {shadow.root}: {e}") from None
        self.root_mtime = os.fstat(self.tree_fd).st_mtime_ns
        # phases, emitted in this order (see the module docstring)
        self.p_files: list[_Item] = []
        self.p_parks: list[_Item] = []
        self.p_blocking: list[_Item] = []
        self.p_create: list[_Item] = []
        self.p_remove: list[_Item] = []
        self.p_unparks: list[_Item] = []
        self.p_dirattrs: list[_Item] = []
        # planning state
        self.kst: dict[int, os.stat_result | None] = {}     # key -> lstat(inodes/<key>) (pre-state)
        self.synced: set[int] = set()        # keys whose contents/attributes are taken care of
        self.keystate: dict[int, str] = {}   # original ino -> "linked" | "fresh" (already given a name)
        self.needed: set[int] = set()        # keys whose shadow object must survive until linked
        self.queued: set[bytes] = set()      # directory paths queued for a comparison
        self.heap: list[tuple[int, bytes]] = []
        self.copied: set[bytes] = set()      # paths copied whole from the original
        self.unanchored: set[bytes] = set()  # directories that may not be the shadow's at their path
        self.stale_dirs = False              # an intended directory is gone (maybe replaced)
        self.blocking: list[tuple[bytes, int]] = []   # (path, pmtime) removed before creations
        self.removals: list[tuple[bytes, int]] = []   # (path, pmtime) removed after creations
        self.park_names: set[bytes] | None = None
        self.park_seq = 0
        self.stats = {"files": 0, "dirs": 0, "copied": 0, "linked": 0, "removed": 0, "writes": 0,
                      "checked": 0, "data_bytes_read": 0, "skipped": 0}

    def close(self) -> None:
        for name in ("tree_fd", "inodes_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # -------------------------------------------------------------- shadow lookups

    def key_stat(self, key: int) -> os.stat_result | None:
        try:
            return self.kst[key]
        except KeyError:
            st = self.kst[key] = _lstat(self.inodes_fd, str(key))
            return st

    def shadow_is_dir(self, path: bytes) -> bool:
        try:
            fd = _open_at(self.tree_fd, path, _O_WALK)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False
            raise
        os.close(fd)
        return True

    # -------------------------------------------------------------- planning

    def plan(self, intents: Iterable[Intent]) -> None:
        seen: set[tuple[int, bool]] = set()
        dirs: list[bytes] = []
        for it in intents:
            if (it.ino, it.is_dir) in seen:
                continue
            seen.add((it.ino, it.is_dir))
            try:
                fd = sysc.open_by_handle(self.src, it.handle_type, it.handle, _O_PATH)
            except OSError as e:
                if e.errno in _GONE:            # gone: its directory's intent removes it
                    self.stale_dirs |= it.is_dir
                    continue
                raise
            try:
                st = os.fstat(fd)
                if st.st_dev != self.dev or st.st_nlink == 0:
                    self.stale_dirs |= it.is_dir
                    continue                    # not in the original tree (any more)
                if stat.S_ISDIR(st.st_mode):
                    path = self.dir_path(fd, st)
                    if path is not None:
                        dirs.append(path)
                    else:
                        self.stale_dirs = True
                else:
                    self.plan_file_intent(fd, st, it)
            finally:
                os.close(fd)
        for path in dirs:
            self.push(path)
        while self.heap:
            _, path = heapq.heappop(self.heap)
            if self.is_copied(path):
                continue
            self.sync_dir(path)
        self.plan_removals()

    def dir_path(self, fd: int, st: os.stat_result) -> bytes | None:
        """The path of the directory open at ``fd`` relative to the original's root, or None."""
        try:
            where = os.readlink(b"/proc/self/fd/%d" % fd)
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise
            return self._path_by_parents(fd, st)    # deeper than PATH_MAX: walk up by ".."
        if where == self.base:
            rel = b""
        else:
            prefix = self.base if self.base.endswith(b"/") else self.base + b"/"
            if not where.startswith(prefix):
                return None
            rel = where[len(prefix):]
        try:                                    # "... (deleted)", or moved meanwhile
            vfd = _open_at(self.src, rel, _O_WALK)
        except OSError:
            return None
        try:
            if not _same(os.fstat(vfd), st):
                return None
        finally:
            os.close(vfd)
        return rel

    def _path_by_parents(self, fd: int, st: os.stat_result) -> bytes | None:
        """The path of the directory open at ``fd`` when the kernel cannot name it (longer
        than PATH_MAX): up by ``..`` to the original's root, finding each directory's name
        in its parent by identity.  None if it is not below the root (any more)."""
        root = os.fstat(self.src)
        names: list[bytes] = []
        cur, cur_st = os.dup(fd), st
        try:
            while not _same(cur_st, root):
                parent = os.open(b"..", _O_DIR, dir_fd=cur)
                os.close(cur)
                cur = parent
                pst = os.fstat(cur)
                if _same(pst, cur_st):                  # "/": the root was never reached
                    return None
                for name in _listdir(cur):
                    s = _lstat(cur, name)
                    if s is not None and stat.S_ISDIR(s.st_mode) and _same(s, cur_st):
                        names.append(name)
                        break
                else:
                    return None                         # moved meanwhile
                cur_st = pst
        except OSError:
            return None
        finally:
            os.close(cur)
        return b"/".join(reversed(names))

    def push(self, path: bytes) -> None:
        """Queue the directory ``path`` for a comparison (its parent instead if the
        shadow has no directory there: the parent's comparison copies it whole)."""
        while path and not self.shadow_is_dir(path):
            path = _parent(path)
        if path in self.queued:
            return
        self.queued.add(path)
        heapq.heappush(self.heap, (_depth(path), path))

    def is_copied(self, path: bytes) -> bool:
        return _in_or_below(path, self.copied)

    # -- files

    def plan_file_intent(self, fd: int, st: os.stat_result, it: Intent) -> None:
        key = st.st_ino
        if key in self.synced:
            return
        kst = self.key_stat(key)
        if kst is None or stat.S_IFMT(kst.st_mode) != stat.S_IFMT(st.st_mode):
            return              # not in the shadow as such: its directory's comparison copies it
        if stat.S_ISLNK(st.st_mode) and self.link_target(key) != os.readlink(b"", dir_fd=fd):
            return
        self.synced.add(key)
        self.stats["files"] += 1
        self.p_files.extend(self.sync_object(key, st, kst, fd, _Locator(handle=it), always=True))

    def link_target(self, key: int) -> bytes:
        return os.readlink(str(key).encode(), dir_fd=self.inodes_fd)

    def sync_object(self, key: int, o: os.stat_result, k: os.stat_result, path_fd: int,
                    loc: _Locator, always: bool) -> list[_Item]:
        """Items making the shadow object inodes/<key> (stat ``k``) equal to the original ``o``.

        ``path_fd``: an O_PATH fd of the original object (for xattrs).  With
        ``always`` the contents are compared even if size and mtime agree.
        """
        out: list[_Item] = []
        if stat.S_ISREG(o.st_mode):
            if o.st_size < k.st_size:
                out.append(setattr_record(key, ATTR_SIZE | ATTR_MTIME, o))
            if self.defer is not None:
                self.defer.files[key] = o           # the contents: the caller's (replay)
            elif always or o.st_size != k.st_size or o.st_mtime_ns != k.st_mtime_ns:
                out.append(_Lazy(lambda: self.diff_data(key, o, loc)))
            out.append(setattr_record(key, _FILE_MASK, o))
        elif stat.S_ISLNK(o.st_mode):
            out.append(setattr_record(key, _LINK_MASK, o))
        else:
            out.append(setattr_record(key, _DIR_MASK, o))
        kfd = os.open(str(key), _O_PATH, dir_fd=self.inodes_fd)
        try:
            have = _xattrs(kfd, True)
        finally:
            os.close(kfd)
        out.extend(_xattr_diff(key, b"", _xattrs(path_fd, True), have))
        return out

    def diff_data(self, key: int, o: os.stat_result, loc: _Locator) -> Iterator[Record]:
        """Records making [0, size) of the shadow's inodes/<key> the original's, holes included.

        1. Read both sparse maps (SEEK_DATA/SEEK_HOLE).  If the shadow holds
           data where the original has a hole (the file was truncated below
           it and extended again), a truncating ``Setattr`` cuts the shadow
           at the first such place; from there on it counts as empty.
        2. Visit every range that is data on either side, in blocks of at most
           CHUNK: data in the original where the shadow has a hole (or
           nothing) is written as it is, zeros included, so the shadow
           allocates it too; data on both sides is written where it differs;
           a hole in the original where the shadow keeps data (a larger
           shadow block) gets zeros if the shadow's bytes are not.
        Holes of the original are never written.  Where a filesystem cannot
        tell holes (no SEEK_DATA) only the bytes are compared, as in step 2
        with every range taken for data.
        """
        size, mtime = o.st_size, o.st_mtime_ns
        ofd = loc.open_read(self.src, key)
        try:
            sfd = _open_read(self.inodes_fd, str(key))
            try:
                sst = os.fstat(sfd)
                send = min(sst.st_size, size)   # what the shadow holds of [0, size)
                omap, smap = data_map(ofd, size), data_map(sfd, send)
                exact = omap is not None and smap is not None
                if omap is None:
                    omap = [(0, size)] if size else []
                if smap is None:
                    smap = [(0, send)] if send else []
                cut = _first_stale(omap, smap, send, sst.st_blksize or 4096) if exact else None
                if cut is not None:
                    yield setattr_record(key, ATTR_SIZE | ATTR_MTIME, o, size=cut)
                    smap = [(s, min(e, cut)) for s, e in smap if s < cut]
                for start, stop, in_o, in_s in _segments(omap, smap, size):
                    for off, nxt in _blocks(start, stop):
                        n = nxt - off
                        a = sysc.pread_full(ofd, n, off) if in_o else bytes(n)
                        self.stats["data_bytes_read"] += len(a) if in_o else 0
                        if len(a) < n:
                            a += bytes(n - len(a))
                        if not in_s:
                            differs = exact or not _all_zero(a)
                        else:
                            b = sysc.pread_full(sfd, n, off)
                            self.stats["data_bytes_read"] += len(b)
                            differs = a != b + bytes(n - len(b))
                        if differs:
                            self.stats["writes"] += 1
                            yield Write(key, off, mtime, a)
            finally:
                os.close(sfd)
        finally:
            os.close(ofd)

    def copy_data(self, key: int, size: int, mtime: int, loc: _Locator) -> Iterator[Record]:
        """Write records for the data extents of a new file (zeros included: the shadow
        allocates what the original does); holes are left to the final size."""
        ofd = loc.open_read(self.src, key)
        try:
            omap = data_map(ofd, size)
            for start, end in (omap if omap is not None else [(0, size)] if size else []):
                for off, nxt in _blocks(start, end):
                    a = sysc.pread_full(ofd, nxt - off, off)
                    self.stats["data_bytes_read"] += len(a)
                    if a and (omap is not None or not _all_zero(a)):
                        self.stats["writes"] += 1
                        yield Write(key, off, mtime, a)
        finally:
            os.close(ofd)

    # -- directories

    def sync_dir(self, path: bytes) -> None:
        """Compare the directory ``path`` of the original with the shadow's."""
        try:
            ofd = _open_at(self.src, path, _O_DIR)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return                          # not there any more
            raise
        try:
            try:
                sfd = _open_at(self.tree_fd, path, _O_DIR)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP) or not path:
                    raise
                self.queued.discard(path)
                self.push(_parent(path))        # copied whole by the parent's comparison
                return
            try:
                self.compare_dir(path, ofd, sfd)
            finally:
                os.close(sfd)
        finally:
            os.close(ofd)

    def compare_dir(self, path: bytes, ofd: int, sfd: int) -> None:
        self.stats["dirs"] += 1
        ost = os.fstat(ofd)
        if ost.st_dev != self.dev:
            raise ResyncError(f"{path!r} is on another filesystem")
        pm = ost.st_mtime_ns
        onames, snames = _listdir(ofd), _listdir(sfd)
        oset, sset = set(onames), set(snames)
        both_dirs: list[tuple[bytes, os.stat_result, os.stat_result]] = []
        s_files = same_files = 0                # is this the shadow's directory? (evidence)
        for name in sorted(oset | sset):
            cpath = _join(path, name)
            o = _lstat(ofd, name) if name in oset else None
            s = _lstat(sfd, name) if name in sset else None
            if s is not None and not stat.S_ISDIR(s.st_mode):
                s_files += 1
            if o is None:
                if s is not None:
                    self.removals.append((cpath, pm))
                continue
            if o.st_dev != self.dev:
                raise ResyncError(f"{cpath!r} is on another filesystem (a mount point inside "
                                  f"the original is not supported)")
            odir = stat.S_ISDIR(o.st_mode)
            if s is not None:
                sdir = stat.S_ISDIR(s.st_mode)
                if odir and sdir:
                    both_dirs.append((name, o, s))
                    continue
                if odir or sdir:                # a type change involving a directory
                    self.blocking.append((cpath, pm))
                    s = None
                elif _same(s, self.key_stat(o.st_ino)):
                    same_files += 1
            if odir:
                self.copy_dir(ofd, name, cpath, o, pm)
            else:
                self.place_nondir(ofd, name, cpath, o, pm, s)
        anchored = self.anchored(path)
        # Could this directory have been renamed here (over an emptied directory, or by
        # an exchange)?  Then the sub-directories' ctimes prove nothing: read them.
        careful = self.since is None or (path != b"" and (
            self.stale_dirs                     # an intended directory vanished: replaced?
            or ost.st_ctime_ns != ost.st_mtime_ns   # renamed (or chmod'ed ...) since its last entry change
            or (s_files > 0 and same_files == 0)))  # none of the shadow's files is here
        for name, o, s in both_dirs:
            cpath = _join(path, name)
            if cpath in self.queued:
                continue                        # compared on its own
            if anchored and self.same_dir(ofd, sfd, name, o, s, careful):
                continue
            self.unanchored.add(cpath)
            self.push(cpath)
        self.p_dirattrs.append(setattr_record(0, _DIR_MASK, ost, path))
        self.p_dirattrs.extend(_xattr_diff(0, path, _xattrs(ofd, False), _xattrs(sfd, False)))

    def anchored(self, path: bytes) -> bool:
        """Is the original's directory ``path`` taken to be the shadow's ``path`` (same object)?"""
        return not _in_or_below(path, self.unanchored)

    def same_dir(self, pfd: int, spfd: int, name: bytes, o: os.stat_result, s: os.stat_result,
                 careful: bool) -> bool:
        """Is the sub-directory ``name`` of an anchored directory, which has no intent of its
        own, the very directory the shadow has there, unchanged since the checkpoint?"""
        if (o.st_mode, o.st_uid, o.st_gid, o.st_mtime_ns) != (s.st_mode, s.st_uid, s.st_gid, s.st_mtime_ns):
            return False
        if self.since is not None:
            # not renamed, created, or changed since the checkpoint: then it is still where
            # it was, so it is the shadow's if its parent is (``careful`` if in doubt)
            if o.st_ctime_ns >= self.since:
                return False
            if not careful:
                return True
        # compare the contents: names, types, file keys, xattrs (see _same_contents)
        ofd = os.open(name, _O_DIR, dir_fd=pfd)
        try:
            sfd = os.open(name, _O_DIR, dir_fd=spfd)
            try:
                return self._same_contents(ofd, sfd, [_SAME_DIR_BUDGET])
            finally:
                os.close(sfd)
        finally:
            os.close(ofd)

    def _same_contents(self, ofd: int, sfd: int, budget: list[int]) -> bool:
        """Do two directories hold the same names, xattrs and file objects?

        One level, and below only while a level holds nothing but
        sub-directories (no file whose inode key proves the identity).  An
        exhausted budget answers False: the caller then compares for real.
        """
        budget[0] -= 1
        if budget[0] < 0:
            return False
        self.stats["checked"] += 1
        onames = _listdir(ofd)
        if onames != _listdir(sfd) or _xattrs(ofd, False) != _xattrs(sfd, False):
            return False
        subdirs = []
        evidence = False
        for cname in onames:
            oc = os.stat(cname, dir_fd=ofd, follow_symlinks=False)
            sc = os.stat(cname, dir_fd=sfd, follow_symlinks=False)
            if stat.S_IFMT(oc.st_mode) != stat.S_IFMT(sc.st_mode):
                return False
            if not stat.S_ISDIR(oc.st_mode):
                if not _same(sc, self.key_stat(oc.st_ino)):
                    return False
                evidence = True
            elif (oc.st_mode, oc.st_uid, oc.st_gid, oc.st_mtime_ns) != \
                    (sc.st_mode, sc.st_uid, sc.st_gid, sc.st_mtime_ns):
                return False
            else:
                subdirs.append(cname)
        if evidence:
            return True
        for cname in subdirs:
            o2 = os.open(cname, _O_DIR, dir_fd=ofd)
            try:
                s2 = os.open(cname, _O_DIR, dir_fd=sfd)
                try:
                    if not self._same_contents(o2, s2, budget):
                        return False
                finally:
                    os.close(s2)
            finally:
                os.close(o2)
        return True

    def place_nondir(self, pfd: int, name: bytes, path: bytes, o: os.stat_result, pm: int,
                     s: os.stat_result | None) -> None:
        """Make the shadow's ``path`` (a non-directory or nothing, ``s``) the original object ``o``."""
        key = o.st_ino
        state = self.keystate.get(key)
        if state is not None:                   # already placed under another name
            if state == "fresh" or not _same(s, self.key_stat(key)):
                self.p_create.append(Link(key, pm, path))
                self.stats["linked"] += 1
            if state == "linked":
                self.needed.add(key)
            return
        kst = self.key_stat(key)
        if kst is not None and self.compatible(pfd, name, o, key, kst):
            self.keystate[key] = "linked"
            if not _same(s, kst):
                self.p_create.append(Link(key, pm, path))
                self.needed.add(key)
                self.stats["linked"] += 1
            if self.defer is not None and stat.S_ISREG(o.st_mode):
                # its contents may have changed within the same mtime tick: the replay decides
                self.defer.files.setdefault(key, o)
            if key not in self.synced and ((self.distrust and stat.S_ISREG(o.st_mode))
                                           or not self.looks_same(o, kst)):
                # an inode number reused for another object, or a change not announced
                self.synced.add(key)
                fd = os.open(name, _O_PATH, dir_fd=pfd)
                try:
                    self.needed.add(key)
                    self.p_create.extend(self.sync_object(key, o, kst, fd, _Locator(path=path),
                                                          always=True))
                finally:
                    os.close(fd)
            return
        self.keystate[key] = "fresh"
        self.synced.add(key)
        self.copy_nondir(pfd, name, path, o, pm)

    def compatible(self, pfd: int, name: bytes, o: os.stat_result, key: int, kst: os.stat_result) -> bool:
        """Can the shadow object inodes/<key> become the original ``o`` (same type, target, device)?"""
        if stat.S_IFMT(o.st_mode) != stat.S_IFMT(kst.st_mode):
            return False
        if stat.S_ISLNK(o.st_mode):
            return os.readlink(name, dir_fd=pfd) == self.link_target(key)
        if stat.S_ISCHR(o.st_mode) or stat.S_ISBLK(o.st_mode):
            return o.st_rdev == kst.st_rdev
        return True

    @staticmethod
    def looks_same(o: os.stat_result, k: os.stat_result) -> bool:
        if (o.st_mode, o.st_uid, o.st_gid, o.st_mtime_ns) != (k.st_mode, k.st_uid, k.st_gid, k.st_mtime_ns):
            return False
        if stat.S_ISLNK(o.st_mode):
            return True                         # mode bits of symlinks mean nothing
        return not stat.S_ISREG(o.st_mode) or o.st_size == k.st_size

    def copy_nondir(self, pfd: int, name: bytes, path: bytes, o: os.stat_result, pm: int) -> None:
        key = o.st_ino
        self.stats["copied"] += 1
        fd = os.open(name, _O_PATH, dir_fd=pfd)
        try:
            attrs = _xattrs(fd, True)
            if stat.S_ISLNK(o.st_mode):
                target = os.readlink(b"", dir_fd=fd)
        finally:
            os.close(fd)
        out = self.p_create
        if stat.S_ISLNK(o.st_mode):
            out.append(symlink_record(o, pm, path, target))
        else:
            out.append(mknod_record(o, pm, path))
        if stat.S_ISREG(o.st_mode):
            loc = _Locator(path=path)
            if self.defer is not None:
                self.defer.files[key] = o
                self.defer.fresh.add(key)
            elif o.st_size:
                out.append(_Lazy(lambda: self.copy_data(key, o.st_size, o.st_mtime_ns, loc)))
            out.append(setattr_record(key, _FILE_MASK, o))
        out.extend(_xattr_diff(key, b"", attrs, {}))

    def copy_dir(self, pfd: int, name: bytes, path: bytes, st: os.stat_result, pm: int) -> None:
        """Copy the original directory ``path`` and everything below it (the shadow has nothing there)."""
        self.copied.add(path)
        out = self.p_create
        out.append(mkdir_record(st, pm, path))
        fd = os.open(name, _O_DIR, dir_fd=pfd)
        no_names: Iterator[bytes] = iter(())
        stack = [(fd, path, no_names, st)]
        try:
            if not _same(os.fstat(fd), st):
                raise ResyncError(f"the original changed during the resync at {path!r}")
            stack[0] = (fd, path, iter(_listdir(fd)), st)
            while stack:
                fd, dpath, names, dst = stack[-1]
                cname = next(names, None)
                if cname is None:
                    stack.pop()
                    try:
                        out.append(setattr_record(0, _DIR_MASK, dst, dpath))
                        out.extend(_xattr_diff(0, dpath, _xattrs(fd, False), {}))
                    finally:
                        os.close(fd)
                    continue
                cpath = _join(dpath, cname)
                c = os.stat(cname, dir_fd=fd, follow_symlinks=False)
                if c.st_dev != self.dev:
                    raise ResyncError(f"{cpath!r} is on another filesystem (a mount point inside "
                                      f"the original is not supported)")
                if stat.S_ISDIR(c.st_mode):
                    self.copied.add(cpath)
                    out.append(mkdir_record(c, dst.st_mtime_ns, cpath))
                    cfd = os.open(cname, _O_DIR, dir_fd=fd)
                    stack.append((cfd, cpath, iter(_listdir(cfd)), c))
                else:
                    self.place_nondir(fd, cname, cpath, c, dst.st_mtime_ns, None)
        finally:
            for fd, *_ in stack:
                os.close(fd)

    # -- removals (planned last: every key that must survive is known by then)

    def plan_removals(self) -> None:
        keymap: dict[int, int] = {}             # shadow st_ino -> inode key
        for key, kst in self.kst.items():
            if kst is not None:
                keymap[kst.st_ino] = key
        needed = {kst.st_ino for key in self.needed if (kst := self.key_stat(key)) is not None}
        for path, pm in self.blocking:
            self.remove_tree(path, pm, self.p_blocking, keymap, needed)
        for path, pm in self.removals:
            self.remove_tree(path, pm, self.p_remove, keymap, set())

    def remove_tree(self, path: bytes, pm: int, out: list[_Item], keymap: dict[int, int], park: set[int]) -> None:
        """Removal records for the shadow's ``path`` and everything below it, depth first.

        Non-directories whose shadow inode is in ``park`` are renamed to a
        parking name in the root instead (dropped at the very end).
        """
        pfd = _open_at(self.tree_fd, _parent(path), _O_DIR)
        try:
            name = path.rpartition(b"/")[2]
            st = _lstat(pfd, name)
            if st is None:
                return
            if not stat.S_ISDIR(st.st_mode):
                self.remove_nondir(path, st, pm, out, keymap, park)
                return
            no_names: Iterator[bytes] = iter(())
            stack = [(os.open(name, _O_DIR, dir_fd=pfd), path, no_names, st, pm)]
        finally:
            os.close(pfd)
        try:
            fd, dpath, _, dst, dpm = stack[0]
            stack[0] = (fd, dpath, iter(_listdir(fd)), dst, dpm)
            while stack:
                fd, dpath, names, dst, dpm = stack[-1]
                cname = next(names, None)
                if cname is None:
                    stack.pop()
                    os.close(fd)
                    out.append(Rmdir(dpm, dpath))
                    self.stats["removed"] += 1
                    continue
                cpath = _join(dpath, cname)
                c = os.stat(cname, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(c.st_mode):
                    cfd = os.open(cname, _O_DIR, dir_fd=fd)
                    stack.append((cfd, cpath, iter(_listdir(cfd)), c, dst.st_mtime_ns))
                else:
                    self.remove_nondir(cpath, c, dst.st_mtime_ns, out, keymap, park)
        finally:
            for fd, *_ in stack:
                os.close(fd)

    def remove_nondir(self, path: bytes, st: os.stat_result, pm: int, out: list[_Item],
                      keymap: dict[int, int], park: set[int]) -> None:
        key = keymap.get(st.st_ino, UNKNOWN_KEY)
        self.stats["removed"] += 1
        if st.st_ino in park and key != UNKNOWN_KEY:
            pname = self.park_name()
            self.p_parks.append(Rename(0, key, pm, self.root_mtime, path, pname))
            self.p_unparks.append(Unlink(key, self.root_mtime, pname))
        else:
            out.append(Unlink(key, pm, path))

    def park_name(self) -> bytes:
        if self.park_names is None:
            self.park_names = set(_listdir(self.tree_fd))
            rfd = os.open(".", _O_DIR, dir_fd=self.src)
            try:
                self.park_names.update(_listdir(rfd))
            finally:
                os.close(rfd)
        while True:
            self.park_seq += 1
            name = _PARK + b"%d" % self.park_seq
            if name not in self.park_names:
                self.park_names.add(name)
                return name

    # -------------------------------------------------------------- emission

    def emit(self) -> Iterator[Record]:
        for phase in (self.p_files, self.p_parks, self.p_blocking, self.p_create, self.p_remove,
                      self.p_unparks, self.p_dirattrs):
            for item in phase:
                if not isinstance(item, _Lazy):
                    yield item
                elif not self.skip_vanished:
                    yield from item.fn()
                else:
                    try:
                        yield from item.fn()
                    except (ResyncError, OSError) as e:
                        if isinstance(e, OSError) and e.errno not in _VANISHED:
                            raise
                        self.stats["skipped"] += 1     # its data stays partly unknown


def resync_iter(source_fd: int, shadow: Shadow, intents: Iterable[Intent], *,
                since_ns: int | None = None, defer: Deferred | None = None,
                stats: dict[str, int] | None = None, distrust: bool = False,
                skip_vanished: bool = False) -> Iterator[Record]:
    """Like :func:`resync`, but yields the records one by one.

    All the comparing is done before the first record is yielded; file data
    is read as the Write records are yielded, so memory stays bounded by
    the number of records without data.  Consume it completely before
    applying anything to the shadow (the data diffs read the shadow).
    With ``defer``, file data is not read at all (see the module docstring).
    ``stats``, if given, receives the counts at the end (``data_bytes_read``:
    the bytes of file data read from either side).  With ``distrust``, every regular
    file reached is compared even if its size and mtime agree with the shadow's (after a
    final round whose contents were left to a replay that did not happen).  With
    ``skip_vanished``, a file that moves or goes while its data is read is skipped (counted
    in ``stats["skipped"]``) instead of failing the whole resync: the seed's rounds, where
    every such change is dirty again and the next round distrusts the files it reaches.
    """
    r = _Resync(source_fd, shadow, since_ns, defer, distrust, skip_vanished)
    try:
        r.plan(intents)
        yield from r.emit()
    finally:
        if stats is not None:
            stats.update(r.stats)
        r.close()


def resync(source_fd: int, shadow: Shadow, intents: Iterable[Intent], *,
           since_ns: int | None = None) -> list[Record]:
    """Records that turn the shadow's versions of the intended objects into the original's current state.

    ``source_fd``: an O_RDONLY|O_DIRECTORY fd of the original tree's root
    (not mounted over yet).  ``shadow``: tree/ is exactly at the last
    confirmed checkpoint.  ``intents``: the activity log's intents (any
    order, duplicates allowed).  ``since_ns``: the wall-clock time the last
    confirmed checkpoint was taken (its marker's ``time_ns``; for checkpoint
    0 the time seeding began); with it, a sub-directory whose ctime is older
    (less CTIME_MARGIN_NS) is known unchanged without reading it.  Never
    modifies the original or the shadow.  Apply the result, in order, with
    the updater.  Raises ResyncError if the original changes under it or
    spans several filesystems.
    """
    return list(resync_iter(source_fd, shadow, intents, since_ns=since_ns))
