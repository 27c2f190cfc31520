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
from dataclasses import dataclass

import pyfuse3

from .browsegate import BrowseGate
from .fs import DirHandle, FileHandle, Operations, _handler

log = logging.getLogger(__name__)


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size)


@dataclass
class _Opened:
    generation: int
    stamp: tuple[int, int, int, int]


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

    def _enter(self):   # noqa: ANN202 - an async context manager
        if self.gate is None:
            import contextlib
            return contextlib.nullcontext()
        return self.gate.request()

    async def _gated(self, fn, *args):   # noqa: ANN001, ANN202
        try:
            async with self._enter():
                return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("browse request failed")
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def lookup(self, parent_inode, name, ctx):   # noqa: ANN001, ANN201
        return await self._gated(super().lookup, parent_inode, name, ctx)

    async def getattr(self, inode, ctx):   # noqa: ANN001, ANN201
        return await self._gated(super().getattr, inode, ctx)

    async def readlink(self, inode, ctx):   # noqa: ANN001, ANN201
        return await self._gated(super().readlink, inode, ctx)

    async def getxattr(self, inode, name, ctx):   # noqa: ANN001, ANN201
        return await self._gated(super().getxattr, inode, name, ctx)

    async def listxattr(self, inode, ctx):   # noqa: ANN001, ANN201
        return await self._gated(super().listxattr, inode, ctx)

    async def opendir(self, inode, ctx):   # noqa: ANN001, ANN201
        return await self._gated(super().opendir, inode, ctx)

    async def open(self, inode, flags, ctx):   # noqa: ANN001, ANN201
        async def _open() -> pyfuse3.FileInfo:
            fi = await Operations.open(self, inode, flags, ctx)
            h: FileHandle = self.files[fi.fh]
            self._opened[fi.fh] = _Opened(self._gen(), _stamp(os.fstat(h.fd)))
            fi.keep_cache = False
            fi.direct_io = True     # no shared page cache: every read is checked (3. above)
            return fi
        return await self._gated(_open)

    async def read(self, fh, off, size):   # noqa: ANN001, ANN201
        async def _read() -> bytes:
            o = self._opened.get(fh)
            if o is not None and o.generation != self._gen():
                if _stamp(os.fstat(self.files[fh].fd)) != o.stamp:
                    raise pyfuse3.FUSEError(errno.ESTALE)   # the file changed since it was opened
                o.generation = self._gen()
            return await Operations.read(self, fh, off, size)
        return await self._gated(_read)

    async def release(self, fh):   # noqa: ANN001, ANN201
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
        for i in range(start_id, len(listing)):
            name, attr, fino = listing[i]
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            if i >= 2:
                # each entry returned is one lookup; the identity is remembered, no fd opened
                self.inodes.remember(fino, self._identity(attr, fino), h.inode_id, name)

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
        for name in os.listdir(h.fd):
            bname = os.fsencode(name)
            try:
                st = os.stat(bname, dir_fd=h.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_dev != self.dev:
                continue
            fino = self._fuse_ino(st.st_ino)
            out.append((bname, self._attr(st, fino), fino))
        return out

    async def releasedir(self, fh):   # noqa: ANN001, ANN201
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
