"""The browse mount: a read-only view of the shadow that is never stale and never torn.

:class:`BrowseOperations` is the journaled :class:`~fusejournal.fs.Operations`
with ``read_only=True`` (every mutating request gets EROFS), plus:

1. **No kernel caching across checkpoints.**  Entry and attribute timeouts are
   0 and ``keep_cache`` is False: every lookup, stat and open reaches the
   daemon, and each open drops the file's cached pages; with attributes never
   cached, the kernel re-reads them before a read (``auto_inval_data``) and
   drops pages whose file changed.  So after ``fusejournal wait --checkpoint N``
   returned, everything read through the mount is N or later.
2. **One checkpoint per request.**  Every request that reads the tree runs
   inside :meth:`BrowseGate.request` (fusejournal/browsegate.py): the updater
   never changes the tree while a browse request is in flight, and no request
   is admitted while the updater applies a batch.
3. **One checkpoint per open file.**  An open file remembers the shadow's
   generation and the file's (ctime, mtime, size, inode) when it was opened.
   When the shadow has moved since, each read first compares them with the
   file's current ones: unchanged, the read goes on (the file is the same in
   both checkpoints); changed, the read gets ESTALE.  A reader of an open file
   gets the checkpoint it opened or an error, never a mix.  (Pages the kernel
   still caches for an unchanged file are that same checkpoint.)
4. **One checkpoint per listing.**  A directory stream is listed with every
   entry's attributes in one request (the first READDIR), then served from
   that list: ``ls -l`` of a directory shows one checkpoint.

Costs: one GETATTR per access (timeouts 0), two lock calls and two stats per
request burst; a listing holds every entry's attributes in memory while the
directory is open (about 350 bytes per entry: its name, its
attributes and the FUSE inode number).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import stat
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import pyfuse3

from .browsegate import BrowseGate
from .fs import DirHandle, FileHandle, Operations, _handler

if TYPE_CHECKING:                   # imported where used (the browse mount starts fast)
    from .history_view import Node, RevCache, TreeAt

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size)


@dataclass
class _Opened:
    generation: int
    stamp: tuple[int, int, int, int]


#: one directory listing as the browse mounts keep it: (name, attributes) or (name,
#: attributes, FUSE inode), "." and ".." first
Listing = Sequence[tuple[bytes, pyfuse3.EntryAttributes] | tuple[bytes, pyfuse3.EntryAttributes, int]]


def _reply(token: pyfuse3.ReaddirToken, listing: Listing, start_id: int,
           sent: Callable[[int], None] | None = None) -> None:
    """The one READDIR reply loop of the browse mounts: the entries of ``listing`` from
    ``start_id`` on, entry ``i`` with ``i + 1`` as the offset the kernel resumes at, until the
    kernel's buffer is full (the entry refused is sent again by the next READDIR).  ``sent(i)``
    is called for each entry the kernel took (with READDIRPLUS, one lookup of it)."""
    for i in range(start_id, len(listing)):
        entry = listing[i]
        if not pyfuse3.readdir_reply(token, entry[0], entry[1], i + 1):
            return
        if sent is not None:
            sent(i)


class BrowseOperations(Operations):
    """Read-only Operations over ``SHADOW/tree`` that coordinate with the updater."""

    def __init__(self, tree_fd: int, gate: BrowseGate | None) -> None:
        super().__init__(tree_fd, read_only=True, timeout=0.0)
        self.timeout = 0.0
        self.gate = gate
        self._opened: dict[int, _Opened] = {}
        self._listings: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes, int]]] = {}

    def _gen(self) -> int:
        return self.gate.generation if self.gate is not None else 0

    def _enter(self) -> AbstractAsyncContextManager[None]:
        if self.gate is None:
            import contextlib
            return contextlib.nullcontext()
        return self.gate.request()

    async def _gated(self, fn: Callable[_P, Awaitable[_T]], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            async with self._enter():
                return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("browse request failed")
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._gated(super().lookup, parent_inode, name, ctx)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._gated(super().getattr, inode, ctx)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._gated(super().readlink, inode, ctx)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._gated(super().getxattr, inode, name, ctx)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self._gated(super().listxattr, inode, ctx)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self._gated(super().opendir, inode, ctx)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        async def _open() -> pyfuse3.FileInfo:
            fi = await Operations.open(self, inode, flags, ctx)
            h: FileHandle = self.files[fi.fh]
            self._opened[fi.fh] = _Opened(self._gen(), _stamp(os.fstat(h.fd)))
            fi.keep_cache = False
            fi.direct_io = True     # no shared page cache: every read is checked (3. above)
            return fi
        return await self._gated(_open)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        async def _read() -> bytes:
            o = self._opened.get(fh)
            if o is not None and o.generation != self._gen():
                if _stamp(os.fstat(self.files[fh].fd)) != o.stamp:
                    raise pyfuse3.FUSEError(errno.ESTALE)   # the file changed since it was opened
                o.generation = self._gen()
            return await Operations.read(self, fh, off, size)
        return await self._gated(_read)

    async def release(self, fh: int) -> None:
        self._opened.pop(fh, None)
        return await super().release(fh)

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h: DirHandle = self.dir_handles[fh]
        listing = self._listings.get(fh)
        if listing is None or start_id == 0:
            async with self._enter():
                listing = self._list(h)
            self._listings[fh] = listing
        entries = listing

        def sent(i: int) -> None:
            if i >= 2:
                # each entry returned is one lookup; the identity is remembered, no fd opened
                name, attr, fino = entries[i]
                self.inodes.remember(fino, self._identity(attr, fino), h.inode_id, name)
        _reply(token, listing, start_id, sent)

    def _identity(self, attr: pyfuse3.EntryAttributes, fino: int) -> os.stat_result:
        """What the inode table keeps of a listed entry (its original inode number and
        type), rebuilt from its attributes: a listing holds no os.stat_result (about
        600 bytes an entry, two thirds of a listing's memory)."""
        return os.stat_result((attr.st_mode, self._fuse_ino(fino), self.dev, attr.st_nlink,
                               attr.st_uid, attr.st_gid, attr.st_size, 0, 0, 0))

    def _list(self, h: DirHandle) -> list[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        """Every entry of an open directory with its attributes, in one request (one checkpoint)."""
        out = []
        for name in (b".", b".."):
            st, fino = self._dot_entry(h, name)
            out.append((name, self._attr(st, fino), fino))
        for sname in os.listdir(h.fd):
            bname = os.fsencode(sname)
            try:
                st = os.stat(bname, dir_fd=h.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_dev != self.dev:
                continue
            fino = self._fuse_ino(st.st_ino)
            out.append((bname, self._attr(st, fino), fino))
        return out

    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)
        return await super().releasedir(fh)

    def close_all(self) -> None:
        super().close_all()
        if self.gate is not None:
            self.gate.close()


class GroupPosition:
    """Where the members' shadows of a consistency group stand, in group checkpoints.

    A member whose shadow applied its own checkpoint ``L`` stands at the highest
    committed group checkpoint whose batch for that member is at most ``L``."""

    def __init__(self, commits_path: os.PathLike[str] | str, members: dict[str, os.PathLike[str]]) -> None:
        from pathlib import Path

        from .group import CommitLog
        self.commits = CommitLog(Path(commits_path))
        self.members = {name: Path(root) for name, root in members.items()}

    def current(self) -> dict[str, int]:
        import json

        from . import layout
        self.commits.refresh()
        out = {}
        for name, root in self.members.items():
            try:
                applied = json.loads((root / layout.SHADOW_APPLIED).read_bytes())["applied"]
            except (OSError, ValueError, KeyError, TypeError):
                applied = -1
            g = 0
            for r in self.commits.commits:
                n = r.get("members", {}).get(name)
                if isinstance(n, int) and n <= applied:
                    g = max(g, r["commit"])
            out[name] = g
        return out

    def together(self) -> bool:
        return len(set(self.current().values())) == 1


def browse_operations(tree: str | os.PathLike[str], tree_fd: int,
                      group: tuple[str, str] | None = None) -> BrowseOperations:
    """The Operations of a browse mount of ``tree``; gated against the updater when
    ``tree`` is a shadow's ``tree/`` (its parent holds applied.json).  ``group`` =
    (group file, member name): the member's view of a group browse, admitted only
    while every member's shadow stands at the same group checkpoint."""
    from pathlib import Path

    from . import layout
    root = Path(tree).parent
    gate = None
    if group is not None:
        from .errors import EXIT_USAGE, UserError
        from .group import GroupFileError, load_group
        try:
            g = load_group(group[0], check=False)
            g.member(group[1])
        except GroupFileError as e:
            raise UserError(str(e), EXIT_USAGE) from None
        pos = GroupPosition(g.commits_path, {m.name: m.shadow for m in g.members})
        gate = BrowseGate([m.shadow for m in g.members], together=pos.together)
    elif Path(tree).name == layout.SHADOW_TREE and (root / layout.SHADOW_APPLIED).exists():
        try:
            gate = BrowseGate(root)
        except OSError as e:
            import errno as _errno
            if e.errno != _errno.EROFS:
                raise
            log.info("the shadow %s is on a read-only filesystem: no updater can change it", root)
    return BrowseOperations(tree_fd, gate)


# ------------------------------------------------------------------ browse --all / --checkpoint N

def checkpoint_dir_name(cp_id: int, label: str, cap: int = 200) -> bytes:
    """``<id>-<label>`` as one safe file name: '/' and control characters (NUL included)
    become '_', text that is not UTF-8 is shown escaped (``\\udcff``), at most ``cap`` bytes
    (cut on a character boundary); ``<id>`` alone for an empty label."""
    safe = "".join("_" if ch == "/" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in label)
    raw = safe.encode("utf-8", "backslashreplace")
    if len(raw) > cap:
        raw = raw[:cap].decode("utf-8", "ignore").encode()
    return b"%d-%s" % (cp_id, raw) if raw else b"%d" % cp_id


class _ReadOnlyOperations(pyfuse3.Operations):
    """What a read-only view answers alike: nothing to flush or sync (never ENOSYS)."""

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None


@dataclass
class _HNode:
    k: int                  # the checkpoint
    kpath: bytes            # a path of the object at k (to find it again after the shadow moved)
    node: Node              # valid for generation ``gen``
    gen: int
    tag: int = 0            # 1 under ``latest``: its own inodes (a directory has one name only)


class HistoryBrowseOperations(_ReadOnlyOperations):
    """``browse --all``: one directory per retained checkpoint (``<id>-<label>``) plus
    ``latest``; ``--checkpoint N``: the tree of N at the root.  Read-only.

    1. **One checkpoint per object.**  A FUSE inode is (checkpoint, object): its content
       never changes while the checkpoint is retained, so a file opened in ``latest``
       keeps reading the checkpoint it was opened at, even after the shadow moved on
       (until that checkpoint is pruned: then ESTALE).  ``latest`` itself is looked up
       again at every access (timeouts 0), so it shows the newest checkpoint at once.
    2. **One checkpoint per request.**  Every request runs under the browse gate (the
       updater and ``prune`` wait for it; it waits for a batch being applied) and reads
       through a :class:`~fusejournal.history_view.TreeAt` built for the shadow as it
       stands (rebuilt when ``applied.json`` or history/ changed).
    3. **One checkpoint per listing**: the whole listing is read in the first READDIR.
    """

    enable_writeback_cache = False

    def __init__(self, shadow_root: str | os.PathLike[str], only: int | None = None) -> None:
        super().__init__()
        from .browsegate import BrowseGate
        self.root = os.fspath(shadow_root)
        self.only = only
        self.gate: BrowseGate | None = None
        try:
            self.gate = BrowseGate(Path(self.root))
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            log.info("the shadow %s is on a read-only filesystem: no updater can change it", self.root)
        self.views: dict[int, TreeAt] = {}
        self.fd_budget = max(16, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64) // 2)
        self.revcache: RevCache | None = None
        self.stamp: tuple[int, int, int] | None = None
        self.cps: tuple[int, list[tuple[bytes, int]]] | None = None
        self.gen = 0
        self.by_key: dict[tuple[int, int, int], int] = {}
        self.nodes: dict[int, _HNode] = {}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.latest_ino_k: int | None = None
        self.files: dict[int, tuple[int, Node]] = {}
        self.dirs: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self.dir_inodes: dict[int, int] = {}
        self.next_fh = 1
        self.hist_fd = -1
        rfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_fd = rfd

    # -------------------------------------------------------------- state

    def _look(self) -> None:
        """After admission: rebuild the views when the shadow or its history changed."""
        from . import layout
        gen = self.gate.generation if self.gate is not None else 0
        try:
            st = os.stat(layout.SHADOW_HISTORY, dir_fd=self.root_fd, follow_symlinks=False)
            hs = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            hs = (0, 0)
        stamp = (gen, *hs)
        if stamp != self.stamp:
            self.stamp = stamp
            self.gen += 1
            for v in self.views.values():
                v.close()
            self.views = {}
            live: set[str] = set()
            if hs != (0, 0):
                hfd = os.open(layout.SHADOW_HISTORY, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                              | os.O_CLOEXEC, dir_fd=self.root_fd)
                try:
                    live = set(os.listdir(hfd))
                finally:
                    os.close(hfd)
            if self.revcache is not None:                   # revs pruned: forget them
                self.revcache.forget(lambda n: f"{n}{layout.HISTORY_REV_SUFFIX}" in live)

    def _applied(self) -> int:
        from .history import read_json_at
        n = (read_json_at(self.root_fd, "applied.json") or {}).get("applied")
        if type(n) is not int:
            raise OSError(errno.EIO, "the shadow has no applied checkpoint")
        return n

    def _view(self, k: int) -> TreeAt:
        from .history_view import HistoryError, NotRetained, RevCache, TreeAt
        v = self.views.pop(k, None)
        if v is None:
            # the views are a cache bounded by the open-file limit (least recently used out)
            while self.views and sum(len(x.fds) for x in self.views.values()) >= self.fd_budget:
                self.views.pop(next(iter(self.views))).close()
            if self.revcache is None:
                self.revcache = RevCache()
            try:
                v = TreeAt(self.root, k, self.revcache)
            except NotRetained:
                raise pyfuse3.FUSEError(errno.ESTALE) from None
            except HistoryError as e:
                log.error("checkpoint %d cannot be read: %s", k, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
        self.views[k] = v
        return v

    def _checkpoints(self) -> list[tuple[bytes, int]]:
        """The root's names under --all (read once per state of the shadow: a listing looks
        each one up, and each would read every rev's META again)."""
        from .history import retained
        if self.cps is None or self.cps[0] != self.gen:
            cps = retained(self.root, self._applied())
            out = [(checkpoint_dir_name(c.id, c.label), c.id) for c in cps]
            out.append((b"latest", cps[-1].id))
            self.cps = (self.gen, out)
        return self.cps[1]

    def _node(self, ino: int) -> tuple[_HNode, Node]:
        """The entry and a current history_view.Node of a FUSE inode (ESTALE if it is gone)."""
        h = self.nodes.get(ino)
        if h is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if h.gen != self.gen:
            n = self._view(h.k).resolve(h.kpath)
            if n is None or n.sino != h.node.sino:
                raise pyfuse3.FUSEError(errno.ESTALE)
            h.node, h.gen = n, self.gen
        return h, h.node

    def _ino(self, k: int, kpath: bytes, node: Node, tag: int = 0) -> int:
        key = (k, node.sino, tag)
        ino = self.by_key.get(key)
        if ino is None:
            ino = self.next_ino
            self.next_ino += 1
            self.by_key[key] = ino
            self.nodes[ino] = _HNode(k, kpath, node, self.gen, tag)
        else:
            h = self.nodes[ino]
            h.node, h.gen = node, self.gen
        return ino

    def _attr(self, ino: int, k: int, node: Node, cur: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        s = self._view(k).stat(node, cur)
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = 0
        e.attr_timeout = 0
        e.st_mode = s.mode
        e.st_nlink = s.nlink
        e.st_uid, e.st_gid, e.st_rdev, e.st_size = s.uid, s.gid, s.rdev, s.size
        e.st_blksize = 4096
        e.st_blocks = s.blocks
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = s.atime_ns, s.mtime_ns, s.mtime_ns
        return e

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        st = os.stat("tree", dir_fd=self.root_fd, follow_symlinks=False)
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.ROOT_INODE
        e.entry_timeout = e.attr_timeout = 0
        e.st_mode = stat.S_IFDIR | (stat.S_IMODE(st.st_mode) & 0o555)
        e.st_nlink = 2
        e.st_uid, e.st_gid = st.st_uid, st.st_gid
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = st.st_mtime_ns
        e.st_blksize = 4096
        return e

    async def _do(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``fn`` under the gate; map every error to an errno (never a non-FUSEError)."""
        try:
            if self.gate is None:
                return self._run(fn, *args, **kwargs)
            async with self.gate.request():
                return self._run(fn, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(errno.ESTALE if e.errno == errno.ENOENT else (e.errno or errno.EIO)) from None
        except Exception:
            log.exception("browse request failed")
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``fn`` after :meth:`_look`; out of file descriptors (each view keeps a few open,
        and browse --all may show hundreds of checkpoints), the views are closed and ``fn``
        runs once more: they are a cache, rebuilt on demand."""
        try:
            self._look()
            return fn(*args, **kwargs)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not self.views:
                raise
            log.info("out of file descriptors with %d checkpoint views open: closing them", len(self.views))
            for v in self.views.values():
                v.close()
            self.views = {}
            self._look()
            return fn(*args, **kwargs)

    # -------------------------------------------------------------- requests

    def _top(self, ino: int) -> tuple[int, Node] | None:
        """(checkpoint, root node) when ``ino`` is the root with --checkpoint N."""
        if ino == pyfuse3.ROOT_INODE and self.only is not None:
            return self.only, self._view(self.only).root
        return None

    def _parent(self, parent: int) -> tuple[int, Node, bytes, int]:
        """(checkpoint, node, path at the checkpoint, tag) of a directory inode."""
        top = self._top(parent)
        if top is not None:
            return top[0], top[1], b"", 0
        h, pnode = self._node(parent)
        return h.k, pnode, h.kpath, h.tag

    def _lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        if parent == pyfuse3.ROOT_INODE and self.only is None:
            for dname, k in self._checkpoints():
                if dname == name:
                    root = self._view(k).root
                    ino = self._ino(k, b"", root, 1 if name == b"latest" else 0)
                    return self._attr(ino, k, root)
            raise pyfuse3.FUSEError(errno.ENOENT)
        k, pnode, h_kpath, tag = self._parent(parent)
        if name in (b".", b".."):
            raise pyfuse3.FUSEError(errno.ENOENT)
        child = self._view(k).lookup(pnode, name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        ino = self._ino(k, h_kpath + b"/" + name if h_kpath else name, child, tag)
        return self._attr(ino, k, child)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._do(self._lookup, parent_inode, name)

    def _getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        if ino == pyfuse3.ROOT_INODE:
            top = self._top(ino)
            if top is None:
                return self._root_attr()
            e = self._attr(ino, *top)
            e.st_ino = ino
            return e
        h, node = self._node(ino)
        return self._attr(ino, h.k, node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._do(self._getattr, inode)

    def _where(self, ino: int) -> tuple[int, Node]:
        top = self._top(ino)
        if top is not None:
            return top
        if ino == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        h, node = self._node(ino)
        return h.k, node

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        def _rl() -> bytes:
            k, node = self._where(inode)
            if node.kind != stat.S_IFLNK:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return self._view(k).readlink(node)
        return await self._do(_rl)

    def _list(self, ino: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        out = [(b".", self._getattr(ino))]
        if ino == pyfuse3.ROOT_INODE and self.only is None:
            out.append((b"..", self._root_attr()))
            for dname, _ in self._checkpoints():
                out.append((dname, self._lookup(ino, dname)))
            return out
        k, node, kpath, tag = self._parent(ino)
        if node.kind != stat.S_IFDIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        out.append((b"..", out[0][1]))
        for name, child, cur in self._view(k).listdir_stat(node):      # one lookup per name
            try:
                cino = self._ino(k, kpath + b"/" + name if kpath else name, child, tag)
                out.append((name, self._attr(cino, k, child, cur)))
            except pyfuse3.FUSEError:
                continue
        return out

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        def _od() -> int:
            if inode != pyfuse3.ROOT_INODE:
                self._where(inode)
            fh = self.next_fh
            self.next_fh += 1
            self.dirs[fh] = []
            self.dir_inodes[fh] = inode
            return fh
        return await self._do(_od)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.dirs.get(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if start_id == 0 or not listing:
            listing = await self._do(self._list, self.dir_inodes[fh])
            self.dirs[fh] = listing
        _reply(token, listing, start_id)

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)
        self.dir_inodes.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        def _op() -> pyfuse3.FileInfo:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
                raise pyfuse3.FUSEError(errno.EROFS)
            k, node = self._where(inode)
            if node.kind != stat.S_IFREG:
                raise pyfuse3.FUSEError(errno.EACCES)
            self._view(k).open_check(node)
            fh = self.next_fh
            self.next_fh += 1
            self.files[fh] = (inode, node)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        return await self._do(_op)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        def _rd() -> bytes:
            got = self.files.get(fh)
            if got is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            k, node = self._where(got[0])
            return self._view(k).read(node, off, size)
        return await self._do(_rd)

    async def release(self, fh: int) -> None:
        self.files.pop(fh, None)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        from .layout import XATTR_PID, XATTR_PREFIX
        if name.startswith(XATTR_PREFIX):
            if inode == pyfuse3.ROOT_INODE and name == XATTR_PID:
                return str(os.getpid()).encode()
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

        def _gx() -> bytes:
            if inode == pyfuse3.ROOT_INODE and self.only is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            k, node = self._where(inode)
            v = self._view(k).xattrs(node).get(name)
            if v is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return v
        return await self._do(_gx)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        def _lx() -> list[bytes]:
            if inode == pyfuse3.ROOT_INODE and self.only is None:
                return []
            k, node = self._where(inode)
            return list(self._view(k).xattrs(node))
        return await self._do(_lx)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.root_fd)
        d = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
            setattr(d, f, getattr(sv, f))
        d.f_bfree = d.f_bavail = d.f_ffree = d.f_favail = 0
        return d

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None                       # (checkpoint, object) -> inode stays stable

    def close_all(self) -> None:
        for v in self.views.values():
            v.close()
        self.views = {}
        if self.gate is not None:
            self.gate.close()
            self.gate = None
        os.close(self.root_fd)


class GroupHistoryBrowseOperations(_ReadOnlyOperations):
    """``browse --all --group FILE POINT``: one directory per group checkpoint that every
    member retains (``<gid>-<label>``), each holding one directory per member at that group
    checkpoint, plus ``latest``; ``--checkpoint N --group``: the members at group checkpoint N
    at the root.  Read-only.

    1. **One member, one single-tree time machine.**  Each member's trees are served by its
       own :class:`HistoryBrowseOperations` (its browse gate, its views, its open files); this
       class only names the group checkpoints and maps the FUSE inodes and handles: a member's
       inode ``L`` is ``L * stride + index + 1``, this class's own ones are multiples of
       ``stride`` (``stride`` = members + 1).
    2. **One group checkpoint per directory.**  ``<gid>-<label>/<member>`` is the member's
       tree at its own checkpoint named for it by the group commit log; its content never
       changes while retained, so every directory of the listing shows all members at one
       consistent moment.
    3. **latest is a symbolic link** to the newest ``<gid>-<label>`` that every member
       retains, read again at every access (timeouts 0): one path walk (``cd POINT/latest``,
       ``rsync -a POINT/latest/ DEST``) resolves it once, so it sees every member at the
       same group checkpoint; a directory looked up again per member could not promise that.
    """

    enable_writeback_cache = False

    def __init__(self, group_file: str | os.PathLike[str], only: int | None = None) -> None:
        super().__init__()
        from .group import CommitLog, load_group
        self.group = load_group(group_file, check=False)
        self.only = only
        self.names = [m.name.encode() for m in self.group.members]
        self.members: list[HistoryBrowseOperations] = []
        try:
            for m in self.group.members:
                self.members.append(HistoryBrowseOperations(m.shadow))
        except BaseException:
            self.close_all()
            raise
        self.stride = len(self.members) + 1
        self.commits = CommitLog(self.group.commits_path)
        self.fhs: dict[int, tuple[int, int]] = {}            # our fh -> (member index, its fh)
        self.listings: dict[int, tuple[int, list[tuple[bytes, pyfuse3.EntryAttributes]]]] = {}
        self.next_fh = 1
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.retained_cache: dict[int, tuple[tuple[int, int, int] | None, set[int]]] = {}

    # -------------------------------------------------------------- inodes

    def _outer(self, i: int, local: int) -> int:
        return local * self.stride + i + 1

    def _split(self, ino: int) -> tuple[int, int] | None:
        """(member index, its inode) of a member's inode; None for ours (root, gid dirs, latest)."""
        if ino == pyfuse3.ROOT_INODE or ino % self.stride == 0:
            return None
        return ino % self.stride - 1, ino // self.stride

    def _latest_ino(self) -> int:
        return self.stride

    def _gid_ino(self, gid: int) -> int:
        return (gid + 1) * self.stride

    def _wrap(self, i: int, e: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        e.st_ino = self._outer(i, e.st_ino)
        return e

    # -------------------------------------------------------------- group checkpoints

    async def _points(self) -> list[tuple[int, bytes, dict[str, int]]]:
        """(gid, directory name, member -> its checkpoint) of every group checkpoint that
        every member retains, oldest first (each member's list read under its browse gate)."""
        from .group import points_from
        from .history import retained
        have: dict[str, set[int]] = {}
        for i, (m, ops) in enumerate(zip(self.group.members, self.members, strict=True)):
            def ids(i: int = i, ops: HistoryBrowseOperations = ops) -> set[int]:
                # the member's list changes only when its shadow or history/ did (its stamp)
                cached = self.retained_cache.get(i)
                if cached is not None and cached[0] == ops.stamp:
                    return cached[1]
                got = {c.id for c in retained(ops.root, ops._applied())}
                self.retained_cache[i] = (ops.stamp, got)
                return got
            have[m.name] = await ops._do(ids)
        self.commits.refresh()
        return [(p.id, checkpoint_dir_name(p.id, p.label), p.members)
                for p in points_from(self.group, self.commits, have)]

    async def _point(self, gid: int) -> dict[str, int]:
        for g, _, members in await self._points():
            if g == gid:
                return members
        raise pyfuse3.FUSEError(errno.ESTALE)          # pruned since

    async def _member_root(self, i: int, k: int) -> pyfuse3.EntryAttributes:
        ops = self.members[i]

        def root() -> pyfuse3.EntryAttributes:
            node = ops._view(k).root
            return ops._attr(ops._ino(k, b"", node, 0), k, node)
        return self._wrap(i, await ops._do(root))

    def _own_attr(self, ino: int, link: bytes | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = e.attr_timeout = 0
        e.st_mode = (stat.S_IFLNK | 0o777) if link is not None else (stat.S_IFDIR | 0o555)
        e.st_nlink = 1 if link is not None else 2
        e.st_size = len(link) if link is not None else 0
        e.st_uid, e.st_gid = self.uid, self.gid
        e.st_blksize = 4096
        return e

    async def _own(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run one of our own requests; map every error to an errno (never a non-FUSEError)."""
        try:
            return await fn()
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("group browse request failed")
            raise pyfuse3.FUSEError(errno.EIO) from None

    # -------------------------------------------------------------- requests

    async def _lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        if parent == pyfuse3.ROOT_INODE and self.only is not None:
            if name not in self.names:
                raise pyfuse3.FUSEError(errno.ENOENT)
            i = self.names.index(name)
            k = (await self._point(self.only))[self.group.members[i].name]
            return await self._member_root(i, k)
        if parent == pyfuse3.ROOT_INODE:
            points = await self._points()
            if name == b"latest" and points:
                return self._own_attr(self._latest_ino(), points[-1][1])
            for gid, dname, _ in points:
                if dname == name:
                    return self._own_attr(self._gid_ino(gid))
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent == self._latest_ino():
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        i = self.names.index(name)
        members = await self._point(parent // self.stride - 1)
        return await self._member_root(i, members[self.group.members[i].name])

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inner = self._split(parent_inode)
        if inner is not None:
            i, local = inner
            return self._wrap(i, await self.members[i].lookup(local, name, ctx))
        return await self._own(lambda: self._lookup(parent_inode, name))

    async def _getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        if ino == self._latest_ino() and self.only is None:
            points = await self._points()
            if not points:
                raise pyfuse3.FUSEError(errno.ESTALE)
            return self._own_attr(ino, points[-1][1])
        if ino != pyfuse3.ROOT_INODE:
            await self._point(ino // self.stride - 1)      # ESTALE once pruned
        return self._own_attr(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inner = self._split(inode)
        if inner is not None:
            i, local = inner
            return self._wrap(i, await self.members[i].getattr(local, ctx))
        return await self._own(lambda: self._getattr(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        inner = self._split(inode)
        if inner is not None:
            return await self.members[inner[0]].readlink(inner[1], ctx)
        if inode != self._latest_ino() or self.only is not None:
            raise pyfuse3.FUSEError(errno.EINVAL)

        async def target() -> bytes:
            points = await self._points()
            if not points:
                raise pyfuse3.FUSEError(errno.ESTALE)
            return points[-1][1]
        return await self._own(target)

    async def _list(self, ino: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        inner = self._split(ino)
        if inner is not None:
            i, local = inner
            ops = self.members[i]
            return [(n, self._wrap(i, e)) for n, e in await ops._do(ops._list, local)]
        if ino == self._latest_ino() and self.only is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        here = await self._getattr(ino)
        out = [(b".", here), (b"..", self._own_attr(pyfuse3.ROOT_INODE))]
        if ino == pyfuse3.ROOT_INODE and self.only is None:
            points = await self._points()
            for gid, dname, _ in points:
                out.append((dname, self._own_attr(self._gid_ino(gid))))
            if points:
                out.append((b"latest", self._own_attr(self._latest_ino(), points[-1][1])))
            return out
        gid = self.only if ino == pyfuse3.ROOT_INODE and self.only is not None else ino // self.stride - 1
        members = await self._point(gid)
        for i, m in enumerate(self.group.members):
            try:
                out.append((self.names[i], await self._member_root(i, members[m.name])))
            except pyfuse3.FUSEError:
                continue
        return out

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        inner = self._split(inode)
        if inner is not None:
            i, local = inner
            await self.members[i].getattr(local, ctx)        # ESTALE if gone
        fh = self.next_fh
        self.next_fh += 1
        self.listings[fh] = (inode, [])
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        got = self.listings.get(fh)
        if got is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        ino, listing = got
        if start_id == 0 or not listing:
            listing = await self._own(lambda: self._list(ino))
            self.listings[fh] = (ino, listing)
        _reply(token, listing, start_id)

    async def releasedir(self, fh: int) -> None:
        self.listings.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        inner = self._split(inode)
        if inner is None:
            raise pyfuse3.FUSEError(errno.EROFS if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC)
                                    else errno.EISDIR)
        i, local = inner
        fi = await self.members[i].open(local, flags, ctx)
        fh = self.next_fh
        self.next_fh += 1
        self.fhs[fh] = (i, fi.fh)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        got = self.fhs.get(fh)
        if got is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.members[got[0]].read(got[1], off, size)

    async def release(self, fh: int) -> None:
        got = self.fhs.pop(fh, None)
        if got is not None:
            await self.members[got[0]].release(got[1])

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        from .layout import XATTR_PID
        inner = self._split(inode)
        if inner is not None:
            return await self.members[inner[0]].getxattr(inner[1], name, ctx)
        if inode == pyfuse3.ROOT_INODE and name == XATTR_PID:
            return str(os.getpid()).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        inner = self._split(inode)
        if inner is not None:
            return await self.members[inner[0]].listxattr(inner[1], ctx)
        return []

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return await self.members[0].statfs(ctx)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None

    def close_all(self) -> None:
        for ops in self.members:
            ops.close_all()
        self.members = []
