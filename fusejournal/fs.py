"""The Operations: a pass-through filesystem that records every change.

Only the FUSE request handlers live here; the lifecycle is in
:mod:`fusejournal.mount`.  Design points (after libfuse's passthrough_hp):

* An inode is the original's ``st_ino`` (the source root is swapped with FUSE
  inode 1), kept in the :class:`~fusejournal.inodes.InodeTable` while the
  kernel knows it, with how to reopen it; its ``O_PATH`` fd comes from a
  cache bounded by the open-file limit (``inode.fd``: fetched after the halt
  gate, right before the system call).  Every operation is
  ``*at()``-relative to such an fd, or goes through ``/proc/self/fd/N``: no
  absolute paths, so mounting over the source itself works, renames of open
  files and unlinked-but-open files keep working, and no joined path can
  exceed PATH_MAX.
* Every mutating handler passes the :class:`~fusejournal.halt.Halt` gate, makes
  its system call inline, and, only if it succeeded, appends a record to the
  :class:`~fusejournal.tempstore.TempStore` before replying.  There is no await
  between the system call and the record, so each (operation, record) pair is
  atomic with respect to the acquisition.
* Records carry attributes read back from the original after the operation
  (``fstat``), so the shadow reproduces exactly what the original did.
* Directory paths are tracked from lookups (a directory has exactly one name);
  non-directories are named by inode key.  A handler computes the names its
  record needs before it touches the original, and refuses (EIO, logged) if
  it could not record them: nothing reaches the original uncaptured.
* No handler lets anything but :class:`pyfuse3.FUSEError` escape: OSErrors map
  to their errno, anything else is logged and answered with EIO.

With ``read_only=True`` the same class serves the browse mount of the shadow:
every mutating request gets EROFS, attribute timeouts are short (the updater
changes the shadow behind the kernel's back), and each non-directory's link
count hides the shadow's hidden inode-key link.
"""

from __future__ import annotations

import collections
import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio

from . import faults
from . import records as R
from .checks import env_switch
from .faults import fault
from .halt import Halt
from .inodes import Inode, InodeTable, raise_fd_limit
from .layout import XATTR_PID, XATTR_PREFIX
from .syncpolicy import SyncPolicy, inline_limit_ns
from .sysc import RENAME_EXCHANGE, fchown_path_fd, renameat2, utimens_path_fd
from .tempstore import TempStore

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
_PYFUSE3_TIMEOUT = pyfuse3.EntryAttributes().entry_timeout   # what a new EntryAttributes holds
# Caller flags never given to the backing fd (see Operations._backing_flags):
# O_APPEND (the kernel gives the offsets), O_DIRECT (unaligned requests would
# fail), O_CREAT/O_EXCL/O_TRUNC (the handler does those itself), O_NOCTTY, and
# O_NOFOLLOW: the kernel already refused a symlink by name; the daemon opens
# /proc/self/fd/N, a magic link that O_NOFOLLOW would refuse (ELOOP).
_OPEN_STRIP = (os.O_APPEND | os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW
               | os.O_TRUNC)
_THREAD_IO = 256 * 1024   # reads at least this big go to a worker thread
_CAPS = b"security.capability"
# FUSE requests served, per handler, on the mount root (root or the owner only):
# docs/performance-analysis.md, "Requests per operation"
XATTR_REQUESTS = XATTR_PREFIX + b"requests"
#: pyfuse3 built with vendor/pyfuse3's patch (scripts/setup-venv.sh): FileInfo can ask the
#: kernel for FOPEN_NOFLUSH (no FLUSH at every close: flush does nothing here) and, from
#: opendir, FOPEN_CACHE_DIR (repeated listings from the kernel's cache, which every entry
#: change through the mount invalidates).  Without it, those requests are sent as before.
PATCHED_PYFUSE3 = hasattr(pyfuse3.FileInfo(), "noflush")


def _switch(var: str, default: bool) -> bool:
    """A measurement switch, ``on`` or ``off``; anything else (which ``fusejournal mount``
    refuses in one line before it mounts, cli._check_env_limits) is the default."""
    try:
        return env_switch(var, os.environ.get(var), default)
    except ValueError:
        return default


#: the patch's second version (pyfuse3 3.5.0+fusejournal.2): the kernel may send plain
#: READDIR requests where attributes do not help (FUSE_CAP_READDIRPLUS_AUTO), which the
#: journaling mount answers with names, inode numbers and types, no stat and no lookup
PLAIN_READDIR = hasattr(pyfuse3.ReaddirToken, "plus")
#: the patch's third version (3.5.0+fusejournal.3), built against libfuse >= 3.17
#: (scripts/setup-venv.sh): the journaling mount asks for FUSE_HANDLE_KILLPRIV_V2, so the
#: kernel sends no GETXATTR of security.capability before every write(2) and the daemon
#: clears set-id bits and file capabilities itself (Operations._kill_privs).  Granted only
#: where libfuse and the kernel both offer it; ``FUSEJOURNAL_KILLPRIV_V2=off`` declines it
#: (for measurements).
KILLPRIV_V2 = (hasattr(pyfuse3.Operations, "handle_killpriv_v2")
               and _switch("FUSEJOURNAL_KILLPRIV_V2", True))

#: the patch's fourth version (3.5.0+fusejournal.4): the journaling mount declines libfuse's
#: default FUSE_CAP_AUTO_INVAL_DATA, with which the kernel drops a file's whole page cache
#: whenever a GETATTR brings a new mtime (the GETATTR that follows the daemon's own
#: write); every change to the original goes through the mount, whose writes update the
#: cache themselves (docs/design.md, "Requests per operation: what the kernel caches").
#: ``FUSEJOURNAL_AUTO_INVAL_DATA=on`` keeps libfuse's default (for measurements).
KEEP_PAGES = (hasattr(pyfuse3.Operations, "auto_inval_data")
              and not _switch("FUSEJOURNAL_AUTO_INVAL_DATA", False))

#: the patch's fifth version (3.5.0+fusejournal.5): an FSYNC or FSYNCDIR handler may return
#: the descriptor to sync; pyfuse3's own sync threads (C, no GIL) sync it and reply to the
#: kernel, while the loop serves other requests (docs/design.md, "Version 5").  The
#: journaling mount sends there each sync it does not run inline (fusejournal/syncpolicy.py)
#: instead of trio's worker threads; ``FUSEJOURNAL_FSYNC_THREADS=off`` keeps trio's (for
#: measurements; and where pyfuse3 is not patched).
SYNC_THREADS = (hasattr(pyfuse3, "sync_threads_stats")
                and _switch("FUSEJOURNAL_FSYNC_THREADS", True))

#: the type bits of st_mode for what os.DirEntry reports without a stat (d_type)
_S_IFLNK, _S_IFREG = stat.S_IFLNK, stat.S_IFREG


def dir_fh(opened: Any) -> int:
    """The handle in what :meth:`Operations.opendir` returned (a FileInfo where pyfuse3
    is patched and the listing may be cached, else the handle itself)."""
    return int(opened.fh) if isinstance(opened, pyfuse3.FileInfo) else int(opened)


def _file_info(fh: int, keep_cache: bool) -> pyfuse3.FileInfo:
    fi = pyfuse3.FileInfo(fh=fh)
    fi.keep_cache = keep_cache
    if PATCHED_PYFUSE3:
        patched: Any = fi                 # (noflush is not in the released stubs)
        patched.noflush = True
    return fi


_P = ParamSpec("_P")
_T = TypeVar("_T")
_Made = TypeVar("_Made")   # what _new_entry's make() returns (an fd, or nothing)
_Ops = TypeVar("_Ops", bound="Operations")   # Operations, or the browse mount's subclass


def _handler(fn: Callable[Concatenate[_Ops, _P], Coroutine[Any, Any, _T]]
             ) -> Callable[Concatenate[_Ops, _P], Coroutine[Any, Any, _T]]:
    """Map every exception of a handler to a FUSE error reply; count the request."""
    name = fn.__name__.lstrip("_")   # _getxattr (behind its fast path) counts as getxattr

    @functools.wraps(fn)
    async def wrapper(self: _Ops, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        self.requests[name] += 1
        self.inodes.new_request()     # fds handed out before may be evicted now
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                self.inodes.relieve()   # make room for the requests that follow
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


_CAP_FSETID = 1 << 4


_DOTS = (b".", b"..")      # every listing's first two entries (readdir)
_UNLINKED = b"\0unlinked"  # _linked_path's "no link": no path holds a NUL


def _linked_path(fd: int, with_path: bool) -> bytes | None:
    """The original's path of an open file now (``/proc/self/fd``: it follows renames),
    or None if not asked for or not readable; _UNLINKED if the file has no link left."""
    try:
        if os.fstat(fd).st_nlink == 0:
            return _UNLINKED
        return os.readlink(f"/proc/self/fd/{fd}").encode() if with_path else None
    except OSError:
        return None


def _timed(sync: Callable[[int], None], fd: int) -> int:
    """Run ``sync(fd)`` (on a worker thread); how long it took, in nanoseconds."""
    t0 = time.monotonic_ns()
    sync(fd)
    return time.monotonic_ns() - t0


def _caller_creds(pid: int) -> tuple[int, frozenset[int], bool] | None:
    """(fsgid, supplementary groups, has CAP_FSETID) of a caller thread, from
    ``/proc/PID/status``; None if it cannot be read (the caller is gone, pid 0)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
        fields = dict(line.split(b":", 1) for line in text.splitlines() if b":" in line)
        fsgid = int(fields[b"Gid"].split()[3])
        groups = frozenset(int(g) for g in fields[b"Groups"].split())
        cap = bool(int(fields[b"CapEff"].strip(), 16) & _CAP_FSETID)
    except (OSError, KeyError, IndexError, ValueError):
        return None
    return fsgid, groups, cap


# The daemon's other units, as the Operations use them (typed here so that fs.py
# imports none of them): the control attributes (control.py Control), the activity
# log (activity.py ActivityLog), the needs-resync state (resyncflag.py ResyncFlag)
# and the streamer's backpressure (streamer.py Streamer).
class ControlAttributes(Protocol):
    def getxattr(self, name: bytes) -> bytes: ...

    async def setxattr(self, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None: ...


class WriteIntents(Protocol):
    enabled: bool
    touched: set[int]

    def touch(self, ino: int, fd: int, is_dir: bool) -> None: ...

    def created(self, ino: int) -> None: ...


class ResyncMarks(Protocol):
    def mark(self, fds: list[tuple[int, int, bool]], reason: str) -> None: ...


class Backpressure(Protocol):
    def congested(self) -> bool: ...

    async def room(self) -> None: ...


@dataclass
class FileHandle:
    fd: int
    inode: Inode

    def __post_init__(self) -> None:
        self.inode.opened(self.fd)    # lets the table reopen the object, even unlinked


@dataclass
class DirHandle:
    fd: int
    inode_id: int
    names: list[bytes] | None = None
    # name -> (inode number, S_IFREG or S_IFLNK) from the listing's d_ino and d_type, for
    # plain READDIR requests; made at the first of them for each listing
    kinds: dict[bytes, tuple[int, int]] | None = None


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False   # per instance, see __init__ and docs/design.md
    readdirplus_auto = False         # per instance: the journaling mount, if PLAIN_READDIR
    handle_killpriv_v2 = False       # per instance: the journaling mount, if KILLPRIV_V2
    handle_killpriv_v2_granted = False   # set by pyfuse3 at INIT (the patch's version 3)
    auto_inval_data = True           # per instance: declined by the journaling mount, if KEEP_PAGES
    auto_inval_data_granted = True   # set by pyfuse3 at INIT (the patch's version 4)
    backpressure: Backpressure | None = None   # the streamer: writes wait while it catches up

    def __init__(self, source_fd: int, *, store: TempStore | None = None,
                 halt: Halt | None = None, control: ControlAttributes | None = None,
                 activity: WriteIntents | None = None,
                 read_only: bool = False, timeout: float = 300.0, writeback: bool = False,
                 resync_flag: ResyncMarks | None = None, fd_cache: int | None = None,
                 fsync_limit_ns: int | None = None, sync_threads: bool = False) -> None:
        super().__init__()
        self.read_only = read_only
        # With the kernel's writeback cache, small writes are merged into large
        # WRITE requests and attributes stay cached; a checkpoint then has to
        # flush the dirty pages before the halt (mount.Daemon.flush_mount).
        self.enable_writeback_cache = writeback and not read_only
        # READDIRPLUS only for a listing's first chunk and after lookups in the directory
        # (the kernel decides, fuse_use_readdirplus); plain READDIR otherwise
        self.readdirplus_auto = PLAIN_READDIR and not read_only
        # the set-id bits and file capabilities a write, truncate or chown drops: the
        # daemon's job if granted at INIT (write then gets the writer's context)
        self.handle_killpriv_v2 = KILLPRIV_V2 and not read_only
        # the page cache is not dropped at each new mtime: the browse mount's shadow
        # changes under it, the journaling mount's files only through it
        self.auto_inval_data = read_only or not KEEP_PAGES
        self.store = store
        self.halt = halt or Halt()
        self.control = control
        self.activity = activity if activity is not None and activity.enabled else None
        self.resync_flag = resync_flag   # fusejournal.resyncflag.ResyncFlag: the needs-resync state
        self.timeout = 1.0 if read_only else timeout
        self.is_root = os.geteuid() == 0
        limit = raise_fd_limit()
        root_fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=source_fd)
        st = os.fstat(root_fd)
        self.dev = st.st_dev
        self.root_ino = st.st_ino
        # every inode the kernel knows, and a bounded cache of their O_PATH fds
        self.inodes = InodeTable(root_fd, capacity=fd_cache)
        log.debug("open-file limit %d: up to %d O_PATH fds cached", limit, self.inodes.capacity)
        self.files: dict[int, FileHandle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        self.requests: collections.Counter[str] = collections.Counter()   # per handler
        self._no_caps: set[int] = set()      # inodes known to have no security.capability
        # The barrier before the halt (mount.Daemon.flush_mount): handles open for
        # writing (fh -> FUSE inode), the daemon's own threads opening inodes through
        # the mount for it (by thread id, as the OPEN request's pid), and their handles.
        self._writable: dict[int, int] = {}
        self.barrier_tids: set[int] = set()
        self._barrier_fhs: set[int] = set()
        # the mount passes FUSEJOURNAL_FSYNC_INLINE_US's; files and directories each their own
        limit = inline_limit_ns(None) if fsync_limit_ns is None else fsync_limit_ns
        self.syncs = SyncPolicy(limit)
        self.dir_syncs = SyncPolicy(limit, "fsyncdir")
        # FSYNC and FSYNCDIR answered by pyfuse3's sync threads (SYNC_THREADS; a mount's
        # choice: called directly, without a session, the handlers sync themselves)
        self.sync_threads = sync_threads and not read_only
        self._thread_seen = (0, 0)           # the threads' syncs and their ns, folded so far
        if self.sync_threads:
            armed = faults.for_sync_threads("fsync_thread")     # a test's slow or failing disk
            if armed is not None:
                pyfuse3.sync_threads_fault(*armed)

    def sync_status(self) -> dict[str, object]:
        """The status fields of FSYNC and FSYNCDIR: the inline-or-worker policies' and,
        with them on, pyfuse3's sync threads' (``fsync_thread_*``, both kinds together)."""
        st: dict[str, object] = {"fsync_threads": self.sync_threads,
                                 **self.syncs.status(), **self.dir_syncs.status()}
        if self.sync_threads:
            t = pyfuse3.sync_threads_stats()
            st.update({f"fsync_thread_{k}": t[k] for k in ("syncs", "failed", "inline_syncs",
                                                            "threads", "queued", "max_queued")})
            st["fsync_thread_average_us"] = t["total_ns"] // max(t["syncs"], 1) // 1000
            st["fsync_thread_max_us"] = t["max_ns"] // 1000
        return st

    # ---------------------------------------------------------------- helpers

    def _fuse_ino(self, st_ino: int) -> int:
        if st_ino == self.root_ino:
            return ROOT
        if st_ino == ROOT:
            return self.root_ino
        return st_ino

    def _inode(self, fino: int) -> Inode:
        try:
            return self.inodes[fino]
        except KeyError:
            log.error("request for unknown inode %d", fino)
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _attr(self, st: os.stat_result, fino: int) -> pyfuse3.EntryAttributes:
        # (EntryAttributes starts zeroed, generation 0, both timeouts 300 s: only what
        # differs is set; this runs once per entry of every listing)
        e = pyfuse3.EntryAttributes()
        e.st_ino = fino
        if self.timeout != _PYFUSE3_TIMEOUT:
            e.entry_timeout = self.timeout
            e.attr_timeout = self.timeout
        mode = e.st_mode = st.st_mode
        nlink = st.st_nlink
        if self.read_only and nlink > 1 and not stat.S_ISDIR(mode):
            nlink -= 1               # the shadow's hidden inode-key link
        e.st_nlink = nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        if st.st_rdev:
            e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _remember(self, fd: int | None, st: os.stat_result, parent: int, name: bytes) -> tuple[int, Inode]:
        """Register a looked-up object (takes ownership of ``fd``, if any); adds one lookup."""
        if st.st_dev != self.dev:
            if fd is not None:
                os.close(fd)
            log.warning("%r is on another filesystem: not supported inside a journaled tree", name)
            raise pyfuse3.FUSEError(errno.EXDEV)
        fino = self._fuse_ino(st.st_ino)
        return fino, self.inodes.remember(fino, st, parent, name, fd=fd)

    def _lookup(self, parent: int, name: bytes) -> tuple[int, Inode, os.stat_result]:
        """Stat ``name`` in ``parent`` and register it; no fd is opened (it is on first use)."""
        st = os.stat(name, dir_fd=self._inode(parent).fd, follow_symlinks=False)
        fino, inode = self._remember(None, st, parent, name)
        return fino, inode, st

    def _dir_path(self, fino: int) -> bytes | None:
        """Path of a directory relative to the root, None if no longer reachable (no depth limit)."""
        return self.inodes.dir_path(fino)

    def _record_path(self, parent: int, name: bytes) -> bytes | None:
        """The path a record will name ``name`` in ``parent`` by, computed before the
        original is touched; FUSEError(EIO) if it cannot be (the operation is refused)."""
        path = self._path(parent, name)
        if path is None and self.store is not None:
            log.error("%r in directory inode %d: the directory has no known path, the operation "
                      "could not be journaled and is refused", name, parent)
            raise pyfuse3.FUSEError(errno.EIO)
        return path

    def _path(self, parent: int, name: bytes) -> bytes | None:
        d = self._dir_path(parent)
        if d is None:
            return None
        return name if not d else d + b"/" + name

    def _touch(self, node: Inode) -> None:
        """Durable write intent before the first change to ``node`` in this period."""
        if self.activity is not None and node.ino not in self.activity.touched:
            self.activity.touch(node.ino, node.fd, node.is_dir)

    def _created_obj(self, st_ino: int) -> None:
        if self.activity is not None:
            self.activity.created(st_ino)

    def _record(self, rec: R.Record) -> None:
        if self.store is not None:
            fault("fs.record")
            self.store.append(rec)

    # A failed step after the change reached the original (docs/design.md, "A failed
    # step after the change"): creations are taken back out of the original; every
    # other change is recorded from what the original holds, and if even that fails,
    # its objects are named in the needs-resync state and the caller gets the result
    # of the change it made.

    def _needs_resync(self, objs: list[Inode], what: str, exc: BaseException) -> None:
        """The original holds a change the store lacks: name ``objs`` for a targeted
        resync at the next mount (never raises)."""
        if self.store is None:
            return
        if self.resync_flag is None:
            log.error("%s: %r after the change reached the original; not journaled", what, exc)
            return
        self.resync_flag.mark([(o.ino, o.fd, o.is_dir) for o in objs],
                              f"{what}: {exc!r} after the change reached the original")

    def _undo_entry(self, p: Inode, name: bytes, is_dir: bool, pmtime_ns: int, what: str,
                    exc: BaseException) -> None:
        """Take a just-made entry ``name`` of ``p`` back out of the original after a later
        step failed, and give ``p`` back its mtime, so the original is as it was (but for
        ctimes) and nothing needs a record; if that fails, needs-resync ``p``."""
        try:
            if is_dir:
                os.rmdir(name, dir_fd=p.fd)
            else:
                os.unlink(name, dir_fd=p.fd)
            utimens_path_fd(p.fd, None, pmtime_ns)
        except Exception as e:
            self._needs_resync([p], f"{what} {name!r} failed ({exc!r}) and could not be undone", e)
        else:
            log.warning("%s %r failed after it reached the original (%r): taken back out", what, name, exc)

    def _record_reached(self, node: Inode, fino: int, mask: int, what: str) -> None:
        """Record the attribute changes in ``mask`` that reached the original before a later
        step of the same request failed; needs-resync ``node`` if that fails too."""
        if not mask:
            return
        try:
            self._record_attrs(node, mask, os.fstat(node.fd), fino)
        except Exception as e:
            self._needs_resync([node], what, e)

    def _check_writable(self) -> None:
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    def _backing_flags(self, flags: int) -> int:
        """Flags for the original file's fd, from the caller's open flags.

        Stripped (:data:`_OPEN_STRIP`): O_APPEND (the kernel gives the offsets),
        O_DIRECT (FUSE already bypasses the mount's page cache for such opens;
        on the backing fd it would make unaligned requests fail, and it never
        meant durability: fsync does, and is passed through), O_NOFOLLOW (the
        kernel resolved the name; the backing open is through a magic link),
        O_CREAT/O_EXCL/O_TRUNC/O_NOCTTY.  Kept: the access mode, O_SYNC and
        O_DSYNC (the durability the application asked for), O_NOATIME (see
        :meth:`_open_backing`), O_NONBLOCK, O_LARGEFILE.  Always added:
        O_CLOEXEC.  Write-only is opened read-write under the writeback cache
        (the kernel reads pages to fill partial ones)."""
        flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC
        if self.enable_writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    def _open_backing(self, node: Inode, flags: int, extra: int = 0) -> int:
        """Open the original file for a caller.  O_NOATIME is the owner's (or
        CAP_FOWNER's) privilege, which the kernel checked against the caller
        already; a daemon not running as root may lack it for another user's
        file, so it is dropped on EPERM rather than failing the caller's open."""
        bflags = self._backing_flags(flags) | extra
        try:
            return os.open(node.proc, bflags)
        except PermissionError:
            if not bflags & os.O_NOATIME:
                raise
            return os.open(node.proc, bflags & ~os.O_NOATIME)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _owner(self, parent: Inode, ctx: pyfuse3.RequestContext) -> tuple[int, int] | None:
        """Owner a new object must get: the caller's, gid from a setgid parent."""
        if not self.is_root:
            return None
        gid = ctx.gid
        pst = os.fstat(parent.fd)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
        return ctx.uid, gid

    def _created(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext,
                 mode: int | None) -> tuple[int, Inode, os.stat_result]:
        """After creating ``name``: give it the caller's ownership, register it."""
        p = self._inode(parent)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=p.fd)
        try:
            owner = self._owner(p, ctx)
            if owner is not None:
                fchown_path_fd(fd, *owner)
                if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID):
                    st = os.fstat(fd)
                    if not stat.S_ISDIR(st.st_mode) and (st.st_mode & 0o7777) != (mode & 0o7777):
                        os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)   # chown cleared set-id bits
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        fino, inode = self._remember(fd, st, parent, name)
        return fino, inode, st

    # ---------------------------------------------------------- non-mutating

    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b"." and parent_inode not in self.inodes:
            # the kernel resolving a file handle (open_by_handle_at: the barrier before the
            # halt) of an object it has forgotten since: gone, not a daemon error
            log.debug("file handle of forgotten inode %d: ESTALE", parent_inode)
            raise pyfuse3.FUSEError(errno.ESTALE)
        try:
            fino, _, st = self._lookup(parent_inode, name)
        except FileNotFoundError:
            if self.read_only:
                raise
            # a negative entry: the kernel caches "no such name" as it caches names,
            # so a second stat (or the open(O_CREAT) after it) sends no LOOKUP; every
            # creation goes through the mount and replaces it
            # (docs/design.md, "Requests per operation: what the kernel caches")
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = self.timeout
            return e
        return self._attr(st, fino)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(os.fstat(self._inode(inode).fd), inode)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(b"", dir_fd=self._inode(inode).fd)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # must not raise: there is no reply
        self.requests["forget"] += 1
        try:
            self._forget(inode_list)
        except Exception:
            log.exception("forget failed")

    def _forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for fino, nlookup in inode_list:
            self.inodes.forget(fino, nlookup)
            if fino not in self.inodes:
                self._no_caps.discard(fino)

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> Any:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self._inode(inode).fd)
        fh = self._new_fh()
        self.dir_handles[fh] = DirHandle(fd, inode)
        if PATCHED_PYFUSE3 and not self.read_only:
            # every change to the original's entries comes through this mount, and each one
            # invalidates the kernel's cached listing (fuse_dir_changed); the browse mount's
            # shadow changes underneath it, so it never caches
            fi: Any = pyfuse3.FileInfo(fh=fh)    # (Any: not in the released stubs)
            fi.keep_cache = True
            fi.cache_readdir = True
            return fi
        return fh

    def _dot_entry(self, h: DirHandle, name: bytes) -> tuple[os.stat_result, int]:
        """Attributes and inode number of ``.`` or ``..`` in an open directory; ``..`` of
        the mount root is the root itself."""
        if name == b"." or h.inode_id == ROOT:
            return os.fstat(h.fd), h.inode_id
        node = self.inodes.get(h.inode_id)
        if node is not None and node.parent == ROOT:
            # the root itself: never ".." by path (mounted in place, it leads into this very
            # mount, and the daemon would wait on itself)
            return os.fstat(self._inode(ROOT).fd), ROOT
        try:
            st = os.stat(b"..", dir_fd=h.fd)
        except OSError:              # a removed directory: it is its own ".." then
            return os.fstat(h.fd), h.inode_id
        return st, self._fuse_ino(st.st_ino)

    def _reply_dots(self, h: DirHandle, start_id: int, token: pyfuse3.ReaddirToken) -> bool:
        """The entries ``.`` and ``..`` (indexes 0 and 1) from ``start_id`` on; False when
        the reply is full.  (With READDIRPLUS the kernel takes no lookup for them:
        fuse_direntplus_link skips them.)"""
        for i in range(start_id, 2):
            st, fino = self._dot_entry(h, _DOTS[i])
            if not pyfuse3.readdir_reply(token, _DOTS[i], self._attr(st, fino), i + 1):
                return False
        return True

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self.dir_handles[fh]
        if h.names is None or start_id == 0:
            # one listing per open directory stream, served in chunks by index
            h.names = [b".", b".."] + [os.fsencode(n) for n in os.listdir(h.fd)]
            h.kinds = None
        if not getattr(token, "plus", True):
            return self._readdir_plain(h, start_id, token)
        names = h.names
        reply = pyfuse3.readdir_reply
        if not self._reply_dots(h, start_id, token):
            return
        # the loop below runs once per entry of every listing: names looked up once
        dfd, parent, dev, root_ino = h.fd, h.inode_id, self.dev, self.root_ino
        stat_at, attr, listed = os.stat, self._attr, self.inodes.listed
        for i in range(max(start_id, 2), len(names)):
            name = names[i]
            try:
                st = stat_at(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue             # removed since the listing
            if st.st_dev != dev:
                continue
            fino = st.st_ino
            if fino == root_ino or fino == ROOT:
                fino = self._fuse_ino(fino)
            if not reply(token, name, attr(st, fino), i + 1):
                return
            # each entry returned is one lookup; the identity is remembered, no fd opened
            listed(fino, st, parent, name)

    def _readdir_plain(self, h: DirHandle, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """A plain READDIR (readdirplus_auto): each entry's name, inode number and type,
        as the kernel needs them for getdents, and no lookup taken.  Regular files and
        symlinks come from the listing's own d_ino and d_type (one ``scandir`` per
        listing); directories, other types and names made since are stat'ed, as
        READDIRPLUS does: a directory on another filesystem (a mount point) is left
        out, and the inode of the root is mapped as everywhere."""
        self.requests["readdir_plain"] += 1      # (also counted as "readdir")
        names = h.names
        assert names is not None
        if h.kinds is None:
            kinds: dict[bytes, tuple[int, int]] = {}
            with os.scandir(h.fd) as it:
                for e in it:
                    if e.is_symlink():
                        kinds[os.fsencode(e.name)] = (e.inode(), _S_IFLNK)
                    elif e.is_file(follow_symlinks=False):
                        kinds[os.fsencode(e.name)] = (e.inode(), _S_IFREG)
            h.kinds = kinds
        reply, kinds, attrs = pyfuse3.readdir_reply, h.kinds, pyfuse3.EntryAttributes
        if not self._reply_dots(h, start_id, token):
            return
        dfd, dev, root_ino = h.fd, self.dev, self.root_ino
        for i in range(max(start_id, 2), len(names)):
            name = names[i]
            kind = kinds.get(name)
            if kind is None:
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue             # removed since the listing
                if st.st_dev != dev:
                    continue
                kind = (st.st_ino, stat.S_IFMT(st.st_mode))
            fino, mode = kind
            if fino == root_ino or fino == ROOT:
                fino = self._fuse_ino(fino)
            a = attrs()
            a.st_ino = fino
            a.st_mode = mode
            if not reply(token, name, a, i + 1):
                return

    @_handler
    async def releasedir(self, fh: int) -> None:
        h = self.dir_handles.pop(fh)
        os.close(h.fd)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> int | None:
        h = self.dir_handles[fh]
        # a directory's sync commits the filesystem's pending metadata: nothing is counted
        # per directory, its own running average decides
        if self._on_sync_thread(self.dir_syncs, 0):
            return h.fd                # synced by pyfuse3's sync threads, which reply
        await self._sync(self.dir_syncs, os.fsync, h.fd, 0)
        return None

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.inodes[ROOT].proc)
        d = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                  "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(d, f, getattr(sv, f))
        return d

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if ctx.pid in self.barrier_tids:
            return self._barrier_open(inode)
        node = self._inode(inode)
        if flags & os.O_TRUNC:      # O_RDONLY|O_TRUNC truncates too on Linux
            self._check_writable()
            async with self.halt.operation():
                self._touch(node)
                self._kill_caps(node)             # (FUSE_HANDLE_KILLPRIV_V2 only)
                fd = self._open_backing(node, flags, os.O_TRUNC)
                try:
                    # the kernel leaves an O_TRUNC truncation (atomic_o_trunc), and so
                    # the set-id bits it would clear, to the daemon
                    mask = R.ATTR_SIZE | self._drop_set_id(os.fstat(fd), fd, ctx)
                    self._record_attrs(node, mask, os.fstat(fd))
                except Exception as e:
                    self._needs_resync([node], "open with O_TRUNC", e)
        else:
            if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EROFS)
            fd = self._open_backing(node, flags)
        fh = self._new_fh()
        self.files[fh] = FileHandle(fd, node)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._writable[fh] = inode
        return _file_info(fh, keep_cache=not self.read_only)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        fd = self.files[fh].fd
        if size < _THREAD_IO:
            return os.pread(fd, size, off)
        # Large reads: inline when the page cache has the data (RWF_NOWAIT never
        # waits for the disk), else in a worker thread so the disk's latency does
        # not stall every other request.
        buf = bytearray(size)
        try:
            n = os.preadv(fd, [buf], off, os.RWF_NOWAIT)
        except BlockingIOError:
            n = 0
        if n == size:
            return bytes(buf)
        rest = await trio.to_thread.run_sync(os.pread, fd, size - n, off + n)
        return bytes(buf[:n]) + rest if n else rest

    async def flush(self, fh: int) -> None:
        # sent at every close(2); nothing to do (no _handler layer: nothing here can raise)
        self.requests["flush"] += 1

    @_handler
    async def release(self, fh: int) -> None:
        self._writable.pop(fh, None)
        if fh in self._barrier_fhs:
            self._barrier_fhs.discard(fh)
            return
        h = self.files.pop(fh, None)
        if h is not None:
            h.inode.closed(h.fd)
            os.close(h.fd)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> int | None:
        if fh in self._barrier_fhs:
            return None      # the kernel has waited for the inode's writeback: that was the point
        h = self.files[fh]
        node = h.inode
        if self._on_sync_thread(self.syncs, node.unsynced):
            # synced (fdatasync or fsync, as asked) by pyfuse3's sync threads, which reply;
            # h.fd stays open until then: the kernel sends no RELEASE before the reply.
            # (What it owed is not put back if that sync fails: the caller has its error.)
            node.unsynced = 0
            return h.fd
        # what is written during a worker's sync counts toward the next one
        unsynced, node.unsynced = node.unsynced, 0
        try:
            await self._sync(self.syncs, os.fdatasync if datasync else os.fsync, h.fd, unsynced)
        except BaseException:
            node.unsynced += unsynced          # not synced: still owed to the next sync
            raise
        return None

    def _on_sync_thread(self, policy: SyncPolicy, unsynced: int) -> bool:
        """With pyfuse3's sync threads: whether this sync goes there (counted), that is,
        when the policy would not run it inline (fusejournal/syncpolicy.py).  The
        threads' finished syncs feed both policies' averages first."""
        if not self.sync_threads:
            return False
        st = pyfuse3.sync_threads_stats()
        done, total = st["syncs"] - self._thread_seen[0], st["total_ns"] - self._thread_seen[1]
        if done:
            self._thread_seen = (st["syncs"], st["total_ns"])
            self.syncs.threads_done(done, total)
            self.dir_syncs.threads_done(done, total)
        if policy.inline(unsynced):
            return False
        policy.threaded += 1
        return True

    async def _sync(self, policy: SyncPolicy, sync: Callable[[int], None], fd: int, unsynced: int) -> None:
        """``sync(fd)`` inline when ``policy`` knows it to be short, else on a worker thread
        (fusejournal/syncpolicy.py)."""
        inline = policy.inline(unsynced)
        if inline:
            t0 = time.monotonic_ns()
            fault("fsync_inline")              # a test's slow disk
            sync(fd)
            took = time.monotonic_ns() - t0
        else:
            took = await trio.to_thread.run_sync(_timed, sync, fd)
        policy.done(unsynced, took, inline)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # The kernel asks for security.capability before every write(2) (docs/design.md,
        # "Requests per operation"): a cached "none" is answered here, without the
        # _handler layer (nothing below can raise anything but this FUSEError).
        if name == _CAPS and inode in self._no_caps:
            self.requests["getxattr"] += 1
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await self._getxattr(inode, name, ctx)

    @_handler
    async def _getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name.startswith(XATTR_PREFIX):
            if inode != ROOT:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)    # reserved: never read from the original
            # the control attributes tell the journal's path, the labels and the state:
            # root's and the owner's, like the journal itself (promise 5), also on an
            # allow_other mount, where the application's other users reach the root
            self._check_owner(ctx)
            if name == XATTR_PID:
                return str(os.getpid()).encode()
            if name == XATTR_REQUESTS:
                return json.dumps(dict(sorted(self.requests.items()))).encode()
            if self.control is not None:
                return self.control.getxattr(name)
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = self._inode(inode)
        if node.is_symlink:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if name == _CAPS:
            # asked by the kernel before every write: remember "none" per inode
            # (every setxattr/removexattr goes through this mount and clears it)
            if inode in self._no_caps:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            try:
                return os.getxattr(node.proc, name)
            except OSError as e:
                if e.errno == pyfuse3.ENOATTR and not self.read_only:
                    self._no_caps.add(inode)     # (the browse mount's tree changes behind it)
                raise
        return os.getxattr(node.proc, name)

    def _check_owner(self, ctx: pyfuse3.RequestContext) -> None:
        """EPERM unless the caller is root or the owner of the mount root."""
        if ctx.uid != 0 and ctx.uid != os.fstat(self.inodes[ROOT].fd).st_uid:
            raise pyfuse3.FUSEError(errno.EPERM)

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._inode(inode)
        if node.is_symlink:
            return []
        # the control names are never listed (one stored by an old version stays hidden)
        return [n for n in map(os.fsencode, os.listxattr(node.proc)) if not n.startswith(XATTR_PREFIX)]

    # ------------------------------------------------- the barrier before the halt

    def barrier_targets(self, with_paths: bool = False) -> list[tuple[int, bytes | None]]:
        """(FUSE inode, original's path or None) of every inode that may have dirty
        pages in the kernel: those with a handle open for writing (write(2) with the
        writeback cache, stores through MAP_SHARED), except files unlinked everywhere,
        whose writes are not recorded.  Paths (``/proc/self/fd`` of the handle: it
        follows renames) only if asked: for a daemon that cannot open by handle."""
        handle: dict[int, int] = {}          # FUSE inode -> one of its writable handles
        for fh, fino in self._writable.items():
            if fh in self.files:
                handle.setdefault(fino, fh)
        out = []
        for fino, fh in handle.items():
            path = _linked_path(self.files[fh].fd, with_paths)
            if path is not _UNLINKED:
                out.append((fino, path))
        return out

    def barrier_path(self, fino: int) -> bytes | None:
        """The original's path of FUSE inode ``fino`` *now*, for a barrier by path
        that found the name it was given renamed or replaced (called in the trio
        thread, from the barrier's thread); None if no handle open for writing is
        left (the last one's release wrote its pages back) or it has no link."""
        for fh, f in self._writable.items():
            if f == fino and fh in self.files:
                path = _linked_path(self.files[fh].fd, True)
                return None if path is _UNLINKED else path
        return None

    def _barrier_open(self, inode: int) -> pyfuse3.FileInfo:
        """An OPEN from the daemon's own barrier thread: no fd on the original, nothing
        read or written through it; its FSYNC is answered at once (see fsync)."""
        self._inode(inode)
        fh = self._new_fh()
        self._barrier_fhs.add(fh)
        fi = pyfuse3.FileInfo(fh=fh)
        fi.keep_cache = True
        return fi

    # -------------------------------------------------------------- mutating

    def _ref(self, fino: int, node: Inode) -> tuple[int, bytes] | None:
        """(inode key, path) naming an object in a record; None for a removed directory
        (nothing to record).  FUSEError(EIO) for a live directory with no known path:
        called before the original is touched, it refuses what could not be recorded."""
        if not node.is_dir:
            return node.ino, b""
        if fino == ROOT:
            return 0, b""
        path = self._dir_path(fino)
        if path is not None:
            return 0, path
        if os.fstat(node.fd).st_nlink == 0:
            return None
        log.error("directory inode %d has no known path: the operation could not be journaled "
                  "and is refused", node.ino)
        raise pyfuse3.FUSEError(errno.EIO)

    def _record_attrs(self, node: Inode, mask: int, st: os.stat_result, fino: int | None = None) -> None:
        if self.store is None:
            return
        if node.is_dir:
            ref = self._ref(fino if fino is not None else self._fuse_ino(node.ino), node)
        else:
            ref = (node.ino, b"") if st.st_nlink else None
        if ref is None:
            return
        self._record(R.setattr_record(ref[0], mask, st, ref[1]))

    async def write(self, fh: int, off: int, buf: bytes,
                    ctx: pyfuse3.RequestContext | None = None) -> int:
        # The hot path: error mapping inlined (no _handler layer), and no
        # in-flight accounting, because nothing below awaits once the gate
        # is passed: the halt cannot begin between the pwrite and the record.
        # ``ctx`` (the writer) comes only with FUSE_HANDLE_KILLPRIV_V2 granted.
        self.requests["write"] += 1
        bp = self.backpressure
        if bp is not None and bp.congested():
            await bp.room()              # before the gate: as if the request came later
        if self.halt.is_halted:
            await self.halt.wait_open()
        try:
            if self.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            h = self.files[fh]
            store = self.store
            if store is None:
                if ctx is not None:
                    self._kill_privs(h.inode, h.fd, ctx)
                n = (self._pwrite_keeping_mtime(h.fd, buf, off) if self.enable_writeback_cache
                     else os.pwrite(h.fd, buf, off))
                h.inode.unsynced += n
                return n
            store.check_space(len(buf))
            act = self.activity
            if act is not None and h.inode.ino not in act.touched:
                act.touch(h.inode.ino, h.fd, False)
            if ctx is not None:
                self._kill_privs(h.inode, h.fd, ctx)
            n = (self._pwrite_keeping_mtime(h.fd, buf, off) if self.enable_writeback_cache
                 else os.pwrite(h.fd, buf, off))
            h.inode.unsynced += n          # for the next FSYNC (fusejournal/syncpolicy.py)
            try:
                st = os.fstat(h.fd)
                if st.st_nlink:      # writes to unlinked files can never be seen again
                    store.append_write(h.inode.ino, off, st.st_mtime_ns, buf if n == len(buf) else buf[:n])
            except Exception as e:
                self._needs_resync([h.inode], "write", e)
            return n
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("write failed")
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        node = self._inode(inode)
        async with self.halt.operation():
            if self.store is not None:
                self._ref(inode, node)        # refuse now what could not be recorded
            self._touch(node)
            mask = 0
            try:
                if fields.update_size:
                    self._kill_caps(node)         # (FUSE_HANDLE_KILLPRIV_V2 only)
                    if fh is not None and fh in self.files:
                        os.ftruncate(self.files[fh].fd, attr.st_size)
                    else:
                        os.truncate(node.proc, attr.st_size)
                    mask |= R.ATTR_SIZE
                if fields.update_mode:
                    if node.is_symlink:
                        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
                    os.chmod(node.proc, stat.S_IMODE(attr.st_mode))
                    mask |= R.ATTR_MODE
                if fields.update_uid or fields.update_gid:
                    uid = attr.st_uid if fields.update_uid else -1
                    gid = attr.st_gid if fields.update_gid else -1
                    self._kill_caps(node)         # (FUSE_HANDLE_KILLPRIV_V2 only)
                    before = os.fstat(node.fd).st_mode
                    fchown_path_fd(node.fd, uid, gid)
                    mask |= (R.ATTR_UID if fields.update_uid else 0) | (R.ATTR_GID if fields.update_gid else 0)
                    if os.fstat(node.fd).st_mode != before:
                        # the set-id bits chown dropped: sent by the kernel as a mode
                        # without FUSE_HANDLE_KILLPRIV_V2, left to the daemon with it
                        mask |= R.ATTR_MODE
                if fields.update_atime or fields.update_mtime:
                    utimens_path_fd(node.fd, attr.st_atime_ns if fields.update_atime else None,
                                    attr.st_mtime_ns if fields.update_mtime else None)
                    mask |= (R.ATTR_ATIME if fields.update_atime else 0) | (R.ATTR_MTIME if fields.update_mtime else 0)
                if not fields.update_mode and (fields.update_size or not mask) and not node.is_dir:
                    # a truncate, or the kernel's empty SETATTR after a write by a caller
                    # whose set-id bits it meant to drop (see _drop_set_id)
                    mask |= self._drop_set_id(os.fstat(node.fd), None, ctx, node)
            except Exception:
                # a later step failed: the earlier ones reached the original
                self._record_reached(node, inode, mask, "setattr")
                raise
            st = None
            try:
                st = os.fstat(node.fd)
                if mask:
                    self._record_attrs(node, mask, st, inode)
            except Exception as e:
                self._needs_resync([node], "setattr", e)
                if st is None:
                    raise
            return self._attr(st, inode)

    def _drop_set_id(self, st: os.stat_result, fd: int | None, ctx: pyfuse3.RequestContext,
                     node: Inode | None = None) -> int:
        """Clear the set-id bits of a regular file that the kernel drops when the caller
        of ``ctx`` writes or truncates it (``setattr_should_drop_suidgid``, Linux 6.18):
        S_ISUID always, S_ISGID with group-exec or when the caller is not in the file's
        group, unless the caller has CAP_FSETID; read from ``/proc/PID/status`` of the
        caller, which is blocked in its system call.  The daemon (root, CAP_FSETID) keeps
        them when it writes the original, and FUSE's own recalculation
        (``fuse_setattr``) drops S_ISGID only with group-exec, and nothing for an
        ``O_TRUNC`` open: both reach here.  Returns R.ATTR_MODE if bits were cleared,
        else 0.  Through ``fd`` or ``node``."""
        mode = st.st_mode
        if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
            return 0
        creds = _caller_creds(ctx.pid)
        if creds is None or creds[2]:
            return 0
        fsgid, groups, _ = creds
        drop = mode & stat.S_ISUID
        if mode & stat.S_ISGID and (mode & stat.S_IXGRP or (st.st_gid != fsgid and st.st_gid not in groups)):
            drop |= stat.S_ISGID
        if not drop:
            return 0
        if fd is not None:
            os.fchmod(fd, stat.S_IMODE(mode) & ~drop)
        elif node is not None:
            os.chmod(node.proc, stat.S_IMODE(mode) & ~drop)
        return R.ATTR_MODE

    def _pwrite_keeping_mtime(self, fd: int, buf: bytes, off: int) -> int:
        """``pwrite`` to the original, with the writeback cache.  The kernel owns a
        regular file's mtime then: it takes it at ``write(2)`` and sends it in a SETATTR
        when it writes the inode back, which may reach the daemon *before* the WRITE
        of the pages (fuse_flush: write_inode_now queues the WRITEs, then sends the
        SETATTR).  So the WRITE keeps the original's mtime as it was, and the
        original's mtime is only ever the kernel's (docs/design.md, "Writeback cache";
        before, 199 of 200 small files showed another mtime once the kernel forgot
        them).  Once the pwrite is done nothing here raises: a daemon that may not
        set the file's times (not its owner), or whose utimensat fails otherwise,
        lets the pwrite's own mtime stand, as without the writeback cache, and the
        write is recorded with the mtime the original has."""
        mtime_ns = os.fstat(fd).st_mtime_ns
        n = os.pwrite(fd, buf, off)
        try:
            utimens_path_fd(fd, None, mtime_ns)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EACCES):
                log.warning("write: the original's mtime could not be kept (%s): the kernel's "
                            "next SETATTR of its times sets it", e)
        return n

    def _kill_privs(self, node: Inode, fd: int, ctx: pyfuse3.RequestContext) -> None:
        """Before a write by ``ctx``'s caller, with FUSE_HANDLE_KILLPRIV_V2 granted: what
        the kernel's ``file_remove_privs`` did before, and ext4 does for a direct write
        (the set-id bits as in ``_drop_set_id``, the file capability always), each
        change recorded before the write's own record.  Before the pwrite, so that a
        daemon without CAP_FSETID, whose pwrite the backing filesystem strips itself,
        still records what changed."""
        mask = self._drop_set_id(os.fstat(fd), fd, ctx)
        if mask:
            self._record_attrs(node, mask, os.fstat(fd))
        self._kill_caps(node, fd)

    def _kill_caps(self, node: Inode, fd: int | None = None) -> None:
        """With FUSE_HANDLE_KILLPRIV_V2 granted, before a write, truncate or chown of
        anything but a directory or symlink: remove its ``security.capability`` (the
        backing filesystem would remove it itself, unrecorded) and record the removal.
        The answer "none" is remembered per inode, as for the kernel's GETXATTR: every
        later setxattr comes through this mount and clears it.  Through ``fd`` or the
        inode's O_PATH fd."""
        if not self.handle_killpriv_v2_granted or node.is_dir or node.is_symlink:
            return
        fino = node.fino
        if fino in self._no_caps:
            return
        target: int | str = fd if fd is not None else node.proc
        try:
            os.getxattr(target, _CAPS)
        except OSError as e:
            if e.errno != pyfuse3.ENOATTR:
                raise
            self._no_caps.add(fino)
            return
        try:
            os.removexattr(target, _CAPS)
        except PermissionError:
            # a daemon without CAP_SETFCAP: the write, truncate or chown that follows
            # drops it on the backing filesystem (for every caller, as on ext4)
            pass
        self._no_caps.add(fino)
        try:
            if os.fstat(node.fd).st_nlink:
                self._record(R.Removexattr(node.ino, b"", _CAPS))
        except Exception as e:
            self._needs_resync([node], "removexattr security.capability", e)

    def _unnamed(self, st: os.stat_result, parent: int, name: bytes) -> None:
        """``name`` in ``parent`` (stat ``st`` from before) is gone: the inode forgets that name."""
        known = self.inodes.get(self._fuse_ino(st.st_ino))
        if known is not None:
            known.drop_name(parent, name)

    def _renamed(self, sto: os.stat_result, stn: os.stat_result | None, old_parent: int,
                 old_name: bytes, new_parent: int, new_name: bytes, exchange: bool) -> None:
        """Keep the inodes' names right after a rename (stats from before it)."""
        if stn is not None and stn.st_ino == sto.st_ino and not exchange:
            return                   # two names of one file: rename(2) does nothing
        moved = self.inodes.get(self._fuse_ino(sto.st_ino))
        other = self.inodes.get(self._fuse_ino(stn.st_ino)) if stn is not None else None
        if moved is not None:
            moved.drop_name(old_parent, old_name)
        if other is not None:
            other.drop_name(new_parent, new_name)
            if exchange:
                other.add_name(old_parent, old_name)
        if moved is not None:
            moved.add_name(new_parent, new_name)

    def _pmtime(self, parent: int) -> int:
        return os.fstat(self.inodes[parent].fd).st_mtime_ns

    async def _new_entry(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext,
                         mode: int | None, make: Callable[[Inode], _Made],
                         record: Callable[[os.stat_result, int, bytes], R.Record],
                         undo: Callable[[_Made], bool] | None = None, *, what: str,
                         is_dir: bool = False) -> tuple[int, Inode, os.stat_result, _Made]:
        """Create ``name`` in a directory: the write intent for the directory, the system
        call ``make(parent)``, the caller's ownership, then the record built by
        ``record(stat, parent mtime, path)``.  If a step after ``make`` fails:
        ``undo(made)`` (closes what make opened; returns False if
        make did not create the entry), the new entry is taken back out
        of the original and the directory's mtime restored (:meth:`_undo_entry`),
        and the error is the reply.  Returns (fuse inode, inode, stat, what make
        returned)."""
        self._check_writable()
        p = self._inode(parent_inode)
        async with self.halt.operation():
            path = self._record_path(parent_inode, name)
            self._touch(p)
            pmtime = os.fstat(p.fd).st_mtime_ns      # to give back if the creation is undone
            made = make(p)
            fino = None
            try:
                fino, node, st = self._created(parent_inode, name, ctx, mode)
                self._created_obj(st.st_ino)
                if path is not None:
                    self._record(record(st, self._pmtime(parent_inode), path))
            except Exception as e:
                remove = True
                if undo is not None:
                    try:
                        remove = undo(made) is not False
                    except OSError:
                        pass
                if fino is not None:
                    self._forget([(fino, 1)])      # the kernel never learns of it
                if remove:
                    self._undo_entry(p, name, is_dir, pmtime, what, e)
                else:
                    self._needs_resync([p], f"{what} {name!r} (an existing file)", e)
                raise
            return fino, node, st, made

    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        made_new = True

        def make(p: Inode) -> int:
            nonlocal made_new
            # O_NOFOLLOW: never create through a symlink planted in the original
            base = self._backing_flags(flags) | os.O_CREAT | os.O_NOFOLLOW | (flags & os.O_TRUNC)
            try:
                return os.open(name, base | os.O_EXCL, stat.S_IMODE(mode), dir_fd=p.fd)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
            made_new = False     # made behind the mount's back since the kernel's lookup
            return os.open(name, base, stat.S_IMODE(mode), dir_fd=p.fd)

        def undo(fd: int) -> bool:
            os.close(fd)
            return made_new      # never remove a file this request did not make

        fino, node, st, fd = await self._new_entry(parent_inode, name, ctx, mode, make,
                                                  R.mknod_record, undo=undo, what="create")
        if made_new:
            node.unsynced = 0        # a new file: only what is written through the mount is dirty
        fh = self._new_fh()
        self.files[fh] = FileHandle(fd, node)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._writable[fh] = fino
        return _file_info(fh, keep_cache=True), self._attr(st, fino)

    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        fino, _, st, _ = await self._new_entry(
            parent_inode, name, ctx, mode,
            lambda p: os.mknod(name, mode, rdev, dir_fd=p.fd), R.mknod_record, what="mknod")
        return self._attr(st, fino)

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        fino, _, st, _ = await self._new_entry(
            parent_inode, name, ctx, None,
            lambda p: os.mkdir(name, stat.S_IMODE(mode), dir_fd=p.fd),
            R.mkdir_record, what="mkdir", is_dir=True)
        return self._attr(st, fino)

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        fino, _, st, _ = await self._new_entry(
            parent_inode, name, ctx, None,
            lambda p: os.symlink(target, name, dir_fd=p.fd),
            lambda st, pmtime, path: R.symlink_record(st, pmtime, path, target), what="symlink")
        return self._attr(st, fino)

    @_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        node = self._inode(inode)
        np = self._inode(new_parent_inode)
        async with self.halt.operation():
            path = self._record_path(new_parent_inode, new_name)
            self._touch(np)
            pmtime = os.fstat(np.fd).st_mtime_ns     # to give back if the link is undone
            os.link(node.proc, new_name, dst_dir_fd=np.fd, follow_symlinks=True)
            counted = False
            try:
                st = os.fstat(node.fd)
                node.lookups += 1
                counted = True
                node.add_name(new_parent_inode, new_name)
                if path is not None:
                    self._record(R.Link(node.ino, self._pmtime(new_parent_inode), path))
            except Exception as e:
                if counted:
                    node.lookups -= 1
                    node.drop_name(new_parent_inode, new_name)
                self._undo_entry(np, new_name, False, pmtime, "link", e)
                raise
            return self._attr(st, inode)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        p = self._inode(parent_inode)
        async with self.halt.operation():
            st = os.stat(name, dir_fd=p.fd, follow_symlinks=False)
            path = self._record_path(parent_inode, name)
            self._touch(p)
            os.unlink(name, dir_fd=p.fd)
            self._unnamed(st, parent_inode, name)
            try:
                if path is not None:
                    self._record(R.Unlink(st.st_ino, self._pmtime(parent_inode), path))
            except Exception as e:
                self._needs_resync([p], f"unlink {name!r}", e)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        p = self._inode(parent_inode)
        async with self.halt.operation():
            st = os.stat(name, dir_fd=p.fd, follow_symlinks=False)
            path = self._record_path(parent_inode, name)
            self._touch(p)
            os.rmdir(name, dir_fd=p.fd)
            self._unnamed(st, parent_inode, name)
            try:
                if path is not None:
                    self._record(R.Rmdir(self._pmtime(parent_inode), path))
            except Exception as e:
                self._needs_resync([p], f"rmdir {name!r}", e)

    @_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        po = self._inode(parent_inode_old)
        pn = self._inode(parent_inode_new)
        async with self.halt.operation():
            old_path = self._record_path(parent_inode_old, name_old)
            new_path = self._record_path(parent_inode_new, name_new)
            sto = os.stat(name_old, dir_fd=po.fd, follow_symlinks=False)
            try:
                stn = os.stat(name_new, dir_fd=pn.fd, follow_symlinks=False)
            except FileNotFoundError:
                stn = None
            self._touch(po)
            self._touch(pn)
            renameat2(po.fd, name_old, pn.fd, name_new, flags)
            self._renamed(sto, stn, parent_inode_old, name_old, parent_inode_new, name_new,
                          bool(flags & RENAME_EXCHANGE))
            if old_path is not None and new_path is not None:
                ino = 0 if stat.S_ISDIR(sto.st_mode) else sto.st_ino
                try:
                    self._record(R.Rename(flags, ino, self._pmtime(parent_inode_old),
                                          self._pmtime(parent_inode_new), old_path, new_path))
                except Exception as e:
                    self._needs_resync([po, pn] if po is not pn else [po],
                                       f"rename {name_old!r} -> {name_new!r}", e)

    def _reserved(self, inode: int, name: bytes) -> None:
        """``user.fusejournal.*`` is the control namespace (see :mod:`fusejournal.control`):
        set or removed anywhere but the root of a journaled mount it is refused with
        EPERM, so it never reaches the original tree, the records or the shadow."""
        log.warning("refused %r on inode %d: control attributes exist only on the mount root",
                    name, inode)
        raise pyfuse3.FUSEError(errno.EROFS if self.read_only else errno.EPERM)

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name.startswith(XATTR_PREFIX):
            if inode == ROOT and self.control is not None:
                await self.control.setxattr(name, value, ctx)
                return
            self._reserved(inode, name)
        self._check_writable()
        node = self._inode(inode)
        if node.is_symlink:
            raise pyfuse3.FUSEError(errno.EPERM)
        self._no_caps.discard(inode)
        async with self.halt.operation():
            ref = self._ref(inode, node)      # before the original is touched
            self._touch(node)
            os.setxattr(node.proc, name, value)
            try:
                if ref is not None and (node.is_dir or os.fstat(node.fd).st_nlink):
                    self._record(R.Setxattr(ref[0], ref[1], name, value))
            except Exception as e:
                self._needs_resync([node], f"setxattr {name!r}", e)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name.startswith(XATTR_PREFIX):
            if inode == ROOT and self.control is not None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            self._reserved(inode, name)
        self._check_writable()
        node = self._inode(inode)
        if node.is_symlink:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        self._no_caps.discard(inode)
        async with self.halt.operation():
            ref = self._ref(inode, node)      # before the original is touched
            self._touch(node)
            os.removexattr(node.proc, name)
            try:
                if ref is not None and (node.is_dir or os.fstat(node.fd).st_nlink):
                    self._record(R.Removexattr(ref[0], ref[1], name))
            except Exception as e:
                self._needs_resync([node], f"removexattr {name!r}", e)

    def close_all(self) -> None:
        """Close every fd (after the session ended)."""
        for h in list(self.files.values()):
            os.close(h.fd)
        for d in list(self.dir_handles.values()):
            os.close(d.fd)
        self.files.clear()
        self.dir_handles.clear()
        self.inodes.close_all()
