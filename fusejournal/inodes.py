"""The inode table: the identity of every object the kernel knows, and a cache of O_PATH fds.

The kernel may know millions of inodes (``find``, ``ls -lR``); the daemon may
hold about a thousand fds (a hard ``RLIMIT_NOFILE`` of 1024 is common).  So an
inode here is *how to reach* an object, and fds are a cache:

1. An :class:`Inode` holds the object's identity (``st_ino`` on the source's
   ``st_dev``), its FUSE lookup count, and how to reopen it: the
   ``(parent, name)`` it was last seen under (every name, for a hard-linked
   non-directory seen under several), kept right across rename, unlink and
   link by the Operations; a kernel file handle (``name_to_handle_at`` of the
   first fd opened on it) when the daemon may use ``open_by_handle_at``
   (root); and, for a non-directory,
   the fds of its open files.
2. :meth:`InodeTable.fd` returns an ``O_PATH`` fd: from the LRU cache, else
   reopened — first from an open file of the object (works unlinked), then
   by handle (works across renames made anywhere), then by name relative to
   the parent's fd (walking up, iteratively, to the nearest ancestor that
   has one; the root's fd is always open).  Every reopened fd is checked
   with ``fstat`` to be the same object (``st_ino``, ``st_dev``); if none
   is, :class:`OSError` ``ESTALE`` is raised (the handler answers ESTALE,
   the kernel drops the inode).  Directories on the way down are cached
   only while the cache has room, so one deep walk never evicts anything.
3. The cache holds at most :attr:`InodeTable.capacity` fds (see
   :func:`cache_capacity`: about half of what is left of the limit after a
   reserve for open files, directory streams, the journal, the ordered log
   and the spill file).  The root's fd is pinned outside it.
4. Eviction never closes an fd handed out since the current request began:
   handlers run inline between awaits, the Operations call
   :meth:`InodeTable.new_request` when a handler starts, and an entry
   fetched in the current request is never the one evicted (the cache
   overflows briefly instead).  Handlers fetch ``inode.fd`` after the halt
   gate, right before the system call, and never keep it across an await.
5. ``readdir`` and ``lookup`` register entries without opening them (an
   ``fstatat`` tells the identity); the fd is opened on first use.

This module does not know FUSE: the Operations map inode numbers (the root
is FUSE inode 1) and turn :class:`OSError` into error replies.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import struct
from collections import OrderedDict
from collections.abc import Iterator

from .syncpolicy import UNKNOWN
from .sysc import name_to_handle, open_by_handle

log = logging.getLogger(__name__)

ROOT = 1                        # the FUSE root inode (pyfuse3.ROOT_INODE)
_RESERVE = 256                  # fds kept free for files, dir streams, journal, log, spill
_MIN_CACHE = 16
_MAX_CACHE = 65536
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return soft


def cache_capacity(limit: int) -> int:
    """How many O_PATH fds to cache under an open-file limit of ``limit``.

    Half of what is left after a reserve of 256: under 1024 that is 384,
    leaving 640 for application files open through the mount and the
    daemon's own fds.  At least 16, at most 65536.
    """
    if limit == resource.RLIM_INFINITY:
        return _MAX_CACHE
    return max(_MIN_CACHE, min(_MAX_CACHE, (limit - _RESERVE) // 2))


class Inode:
    """One object the kernel knows: identity, lookup count, and how to reopen it."""

    __slots__ = ("table", "fino", "ino", "lookups", "is_dir", "is_symlink",
                 "parent", "name", "more_names", "handle", "files", "unsynced")

    def __init__(self, table: InodeTable, fino: int, st: os.stat_result,
                 parent: int | None, name: bytes | None) -> None:
        self.table = table
        self.fino = fino                 # FUSE inode number
        self.ino = st.st_ino             # the original's inode number (the record key)
        self.lookups = 0
        self.is_dir = stat.S_ISDIR(st.st_mode)
        self.is_symlink = stat.S_ISLNK(st.st_mode)
        self.parent = parent             # FUSE inode of the directory it was last seen in
        self.name = name                 # None: no known name (removed, or never named)
        self.more_names: list[tuple[int, bytes]] | None = None   # other names (hard links)
        self.handle: bytes | None = None     # handle type (i32) + file handle: one object
        self.files: list[int] | None = None    # fds of open files of this object (FileHandle)
        # bytes written through the mount since its last FSYNC; unknown until the
        # first (fusejournal/syncpolicy.py: the original may hold older dirty pages)
        self.unsynced = UNKNOWN

    @property
    def fd(self) -> int:
        """An O_PATH fd of the object, valid until the current request awaits."""
        return self.table.fd(self)

    @property
    def proc(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def opened(self, fd: int) -> None:
        """A file of this object is open on ``fd``: it can reopen the object, even unlinked."""
        if self.files is None:
            self.files = []
        self.files.append(fd)

    def closed(self, fd: int) -> None:
        if self.files:
            try:
                self.files.remove(fd)
            except ValueError:
                pass
            if not self.files:
                self.files = None

    # names -----------------------------------------------------------------

    def names(self) -> Iterator[tuple[int, bytes]]:
        if self.name is not None and self.parent is not None:
            yield self.parent, self.name
        if self.more_names:
            yield from self.more_names

    def add_name(self, parent: int, name: bytes) -> None:
        """``name`` in ``parent`` is (now) a name of this object; it becomes the first tried."""
        if self.parent == parent and self.name == name:
            return
        if self.is_dir:
            self.parent, self.name = parent, name      # a directory has exactly one name
            return
        if self.more_names:
            try:
                self.more_names.remove((parent, name))
            except ValueError:
                pass
        if self.name is not None and self.parent is not None:
            if self.more_names is None:
                self.more_names = []
            self.more_names.append((self.parent, self.name))
            del self.more_names[:-8]                   # a few old names are plenty
        self.parent, self.name = parent, name

    def drop_name(self, parent: int, name: bytes) -> None:
        """``name`` in ``parent`` no longer names this object."""
        if self.more_names:
            try:
                self.more_names.remove((parent, name))
            except ValueError:
                pass
        if self.parent == parent and self.name == name:
            if self.more_names:
                self.parent, self.name = self.more_names.pop()
            else:
                self.name = None


class InodeTable:
    """Every inode the kernel knows, keyed by FUSE inode number, and the fd cache."""

    def __init__(self, root_fd: int, *, capacity: int | None = None,
                 use_handles: bool | None = None) -> None:
        """Take ownership of ``root_fd`` (an O_PATH fd of the source root, pinned)."""
        st = os.fstat(root_fd)
        self.dev = st.st_dev
        self.root_fd = root_fd
        self.capacity = max(2, capacity if capacity is not None
                            else cache_capacity(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        # open_by_handle_at needs CAP_DAC_READ_SEARCH
        self.use_handles = os.geteuid() == 0 if use_handles is None else use_handles
        root = Inode(self, ROOT, st, None, None)
        root.lookups = 1 << 62           # never forgotten
        self._inodes: dict[int, Inode] = {ROOT: root}
        self._cache: OrderedDict[int, list[int]] = OrderedDict()   # fino -> [fd, request]
        self._request = 0
        self.reopened = 0                # fds opened again after eviction (for tests and status)
        self.evicted = 0
        self._out_of_fds = False
        self._mount_fd = -1              # a readable fd of the root, for open_by_handle_at

    # ------------------------------------------------------------- the table

    def get(self, fino: int) -> Inode | None:
        return self._inodes.get(fino)

    def __getitem__(self, fino: int) -> Inode:
        return self._inodes[fino]

    def __contains__(self, fino: int) -> bool:
        return fino in self._inodes

    def __len__(self) -> int:
        return len(self._inodes)

    def values(self) -> Iterator[Inode]:
        return iter(list(self._inodes.values()))

    @property
    def cached_fds(self) -> int:
        return len(self._cache)

    def remember(self, fino: int, st: os.stat_result, parent: int, name: bytes, *,
                 fd: int | None = None) -> Inode:
        """Register ``name`` in ``parent`` (stat ``st``) and add one lookup.

        ``fd``, if given, is an O_PATH fd of the object and is taken over (cached,
        or closed if the inode already has one).  ``.`` and ``..`` are not names.
        """
        inode = self._inodes.get(fino)
        if inode is None:
            inode = self._inodes[fino] = Inode(self, fino, st, None, None)
        elif fino != ROOT and name not in (b".", b".."):
            self._check_reuse(inode, st)
        inode.lookups += 1
        if fino != ROOT and name not in (b".", b".."):
            inode.add_name(parent, name)
        if fd is not None:
            self._learn_handle(inode, fd)
            old = self._cache.get(fino)
            if fino == ROOT or old is not None and old[1] == self._request:
                _close(fd)       # the root is pinned; a cached fd handed out now stays
            else:
                if old is not None:
                    del self._cache[fino]
                    _close(old[0])   # a fresh fd is the object under that name now
                self._insert(fino, fd)
        return inode

    def listed(self, fino: int, st: os.stat_result, parent: int, name: bytes) -> None:
        """:meth:`remember` for an entry of a listing (READDIRPLUS, no fd): an inode the
        table knows under that very name and type only gains the lookup."""
        inode = self._inodes.get(fino)
        if (inode is not None and inode.name == name and inode.parent == parent
                and stat.S_ISDIR(st.st_mode) == inode.is_dir
                and stat.S_ISLNK(st.st_mode) == inode.is_symlink):
            inode.lookups += 1
            return
        self.remember(fino, st, parent, name)

    def _check_reuse(self, inode: Inode, st: os.stat_result) -> None:
        """The filesystem gave ``inode``'s number to a new object of another type while
        the kernel still knew the old one (ext4 reuses freed numbers at once; a number
        cannot be reused while a cached fd or an open file holds the old object):
        take the new type, forget how the old one was reached.  (Reopening verifies
        ``st_ino`` only; ext4's file handles carry a generation and fail for the old.)
        """
        if stat.S_ISDIR(st.st_mode) == inode.is_dir and stat.S_ISLNK(st.st_mode) == inode.is_symlink:
            return
        log.info("inode number %d now names a new object", inode.ino)
        inode.is_dir = stat.S_ISDIR(st.st_mode)
        inode.is_symlink = stat.S_ISLNK(st.st_mode)
        inode.handle = None
        inode.more_names = None
        inode.name = None

    def forget(self, fino: int, nlookup: int) -> None:
        inode = self._inodes.get(fino)
        if inode is None or fino == ROOT:
            return
        inode.lookups -= nlookup
        if inode.lookups <= 0:
            del self._inodes[fino]
            entry = self._cache.pop(fino, None)
            if entry is not None:
                _close(entry[0])

    # ------------------------------------------------------------- fds

    def new_request(self) -> None:
        """A handler starts: fds handed out before may be evicted again."""
        self._request += 1
        if len(self._cache) > self.capacity:
            self._evict()            # an overflow of the last request

    def fd(self, inode: Inode) -> int:
        """An O_PATH fd of ``inode``: cached, or reopened (OSError ESTALE if it cannot be)."""
        if inode.fino == ROOT:
            return self.root_fd
        entry = self._cache.get(inode.fino)
        if entry is not None:
            self._cache.move_to_end(inode.fino)
            entry[1] = self._request
            return entry[0]
        try:
            fd = self._reopen(inode)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not self.relieve():
                raise
            fd = self._reopen(inode)     # once more, with the cache emptied
        self.reopened += 1
        self._learn_handle(inode, fd)
        if self._inodes.get(inode.fino) is inode:
            self._insert(inode.fino, fd)
        else:
            # a forgotten inode object still held by a handler: cache it under no
            # number, it is closed at the next eviction
            self._insert(-fd, fd)
        return fd

    def relieve(self) -> int:
        """Out of fds (EMFILE): close every cached fd not handed out in this request
        and halve the cache for the rest of the mount.  Returns how many were closed."""
        self.capacity = max(_MIN_CACHE, self.capacity // 2)
        closed = 0
        for key in [k for k, (_, req) in self._cache.items() if req != self._request]:
            _close(self._cache.pop(key)[0])
            closed += 1
        log.warning("out of file descriptors: %d cached fds closed, the cache now holds at most %d",
                    closed, self.capacity)
        return closed

    def _learn_handle(self, inode: Inode, fd: int) -> None:
        """The file handle of an object, from a verified fd, the first time it has one
        (not for every readdir entry: ~10 µs each, and names reach those)."""
        if self.use_handles and inode.handle is None:
            try:
                inode.handle = _pack(*name_to_handle(fd))
            except OSError:
                pass                     # reopened by name only

    def _insert(self, key: int, fd: int) -> None:
        self._cache[key] = [fd, self._request]
        self._evict()

    def _evict(self) -> None:
        cache = self._cache
        while len(cache) > self.capacity:
            key = next(iter(cache))
            entry = cache[key]
            if entry[1] == self._request:
                break                    # fetched in this request: may still be used
            del cache[key]
            _close(entry[0])
            self.evicted += 1

    def _has_room(self) -> bool:
        return len(self._cache) < self.capacity

    def _same(self, fd: int, inode: Inode) -> bool:
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        return st.st_ino == inode.ino and st.st_dev == self.dev

    def _reopen(self, inode: Inode) -> int:
        self._out_of_fds = False
        # 1. an open file of the object (still works once it is unlinked)
        for ffd in list(inode.files or ()):
            try:
                fd = os.open(f"/proc/self/fd/{ffd}", os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                self._note(e)
                continue
            if self._same(fd, inode):
                return fd
            _close(fd)
        # 2. the file handle (works whatever happened to its names)
        if inode.handle is not None:
            try:
                if self._mount_fd < 0:     # open_by_handle_at refuses an O_PATH fd here
                    self._mount_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                             dir_fd=self.root_fd)
                fd = open_by_handle(self._mount_fd, _HTYPE.unpack_from(inode.handle)[0],
                                    inode.handle[_HTYPE.size:], os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                self._note(e)
                fd = -1
            if fd >= 0:
                if self._same(fd, inode):
                    return fd
                _close(fd)
        # 3. by name, from the nearest ancestor with an fd
        for parent, name in list(inode.names()):
            fd = self._open_by_name(parent, name, inode)
            if fd >= 0:
                return fd
        if self._out_of_fds:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        raise OSError(errno.ESTALE, f"inode {inode.ino} can no longer be reached")

    def _note(self, e: OSError) -> None:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            self._out_of_fds = True

    def _open_by_name(self, parent: int, name: bytes, inode: Inode) -> int:
        """Open ``name`` in ``parent`` if it is ``inode``; -1 if not.  Walks up the tracked
        directory names to an ancestor with a cached fd (iteratively: no depth limit)."""
        chain: list[tuple[Inode, bytes]] = [(inode, name)]
        cur = self._inodes.get(parent)
        while cur is not None and cur.fino != ROOT and cur.fino not in self._cache:
            if cur.name is None or cur.parent is None or len(chain) > len(self._inodes):
                cur = None       # a removed directory, or a loop in the names
                break
            chain.append((cur, cur.name))
            cur = self._inodes.get(cur.parent)
        if cur is None:
            return -1
        pfd = self.fd(cur)
        own = -1                 # an fd of ours not in the cache, closed after use
        try:
            for target, tname in reversed(chain):
                try:
                    fd = os.open(tname, _O_PATH, dir_fd=pfd)
                except OSError as e:
                    self._note(e)
                    return -1
                if not self._same(fd, target):
                    _close(fd)
                    return -1
                if own >= 0:
                    _close(own)
                    own = -1
                if target is inode:
                    return fd
                if self._has_room() and self._inodes.get(target.fino) is target:
                    self._insert(target.fino, fd)
                else:
                    own = fd
                pfd = fd
            return -1
        finally:
            if own >= 0:
                _close(own)

    # ------------------------------------------------------------- paths

    def dir_path(self, fino: int) -> bytes | None:
        """Path of a directory relative to the root; None if it has no known name.

        No depth limit: a loop (which tracking never makes) is caught by a
        bound on the number of steps, the number of known inodes.
        """
        parts: list[bytes] = []
        bound = len(self._inodes)
        while fino != ROOT:
            inode = self._inodes.get(fino)
            if inode is None or inode.name is None or inode.parent is None:
                return None
            parts.append(inode.name)
            fino = inode.parent
            if len(parts) > bound:
                log.error("directory loop in name tracking")
                return None
        parts.reverse()
        return b"/".join(parts)

    # ------------------------------------------------------------- the end

    def close_all(self) -> None:
        """Close every cached fd and the root's; forget every inode."""
        for fd, _ in self._cache.values():
            _close(fd)
        self._cache.clear()
        self._inodes.clear()
        if self._mount_fd >= 0:
            _close(self._mount_fd)
            self._mount_fd = -1
        _close(self.root_fd)


_HTYPE = struct.Struct("<i")


def _pack(handle_type: int, handle: bytes) -> bytes:
    return _HTYPE.pack(handle_type) + handle


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
