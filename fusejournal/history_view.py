"""The tree as it was at a retained checkpoint K, without copying it (no pyfuse3 here).

:class:`TreeAt` reads the shadow's mirror (tree/, inodes/) and the reverse
batches ``K.rev`` … ``(L-1).rev`` (fusejournal/history.py), and answers what
a read-only filesystem needs: lookup, listing, attributes, reads, data maps,
symlink targets and xattrs of every object as it was at K.

1. **Index.**  On opening, every rev of the chain from K to the applied
   checkpoint L is checked (checksums, END frame) and indexed by object:
   for each (directory, name) the Entry of the *oldest* rev that has one
   (that rev's first: the name as it was at K), for each object the oldest
   Attr, and per object the Data/Hole pre-images of every rev.  Only changed
   objects have entries: an unchanged object costs nothing.  A rev is read
   one frame at a time (:func:`index_rev`) and a Data pre-image is kept as
   where its bytes are (:class:`PreImage`: the frame's place in the file, the
   bytes' place in the decompressed frame), never the bytes: the memory of
   an open view follows the number of changed objects and records, not the
   size of the pre-images.  Indexes are cached by rev (:class:`RevCache`,
   shared by the views of one reader).
2. **Objects** (:class:`Node`) are named by their inode number in the shadow
   (``sino``) and found where they are now: in tree/ by path (reached
   through unchanged names), by inode key in inodes/ (a non-directory a rev
   names), by the path a rev recorded, carried forward through the renames
   after it (a directory a rev names), or in ``history/N.held/`` (an object
   removed since K).  An object found under another identity is *lost*
   (EIO), never shown as something else.
3. **Contents.**  A read takes the object's current bytes, then, from the
   newest rev to the oldest, each rev's pre-images of it in reverse order
   (so the first pre-image of a byte wins) and that rev's size (bytes past
   it are cut).  A pre-image the read covers is read then: its frame is read
   again, its checksum checked again and decompressed (EIO if the frame is
   no longer intact: never other bytes), and kept in the cache's small LRU
   of frames.  Data maps (holes) are computed the same way, without reading
   pre-images.
4. **Link counts** of non-directories are the current count corrected by the
   names the revs change (computed at opening, one lstat per changed name).

TreeAt(L) (no revs) is the mirror itself.  A TreeAt is valid while the
shadow stands at L: the caller holds the browse gate or the hold
(browsegate.py), and opens a new one when the shadow moved.

Errors: :class:`NotRetained` (a checkpoint that is not, or no longer,
retained), HistoryError (a damaged rev), OSError from the filesystem
(ESTALE/EIO for an object that is not where its rev says).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from . import history, layout
from .compression import CompressionError, decompress
from .history import Attr, Data, Entry, HistoryError, Hole, Move
from .treewalk import O_DIR, O_PATH, open_parent, read_xattrs
from .treewalk import data_map as _data_map

__all__ = ["TreeAt", "Node", "Stat", "NotRetained", "HistoryError", "RevCache", "RevIndex", "PreImage", "index_rev"]


class NotRetained(LookupError):
    """A checkpoint that is not retained (never was, pruned, or not applied yet)."""


class Node(NamedTuple):
    sino: int
    kind: int          # S_IFMT
    where: str         # "tree" | "key" | "held" | "lost"
    path: bytes        # "tree": the path in tree/ now
    arg: int           # "key": the inode key; "held": the rev id holding it


class Stat(NamedTuple):
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    blocks: int        # 512-byte blocks the object has at K (estimated from its data map)


class PreImage(NamedTuple):
    """A Data record's old bytes, left in its rev file: ``length`` bytes at ``offset`` of
    object ``sino``, at ``at`` in the decompressed RECORDS frame whose payload is at
    ``frame`` (``frame_len`` bytes) in the file."""
    sino: int
    offset: int
    length: int
    frame: int
    frame_len: int
    at: int


IndexRecord = Entry | Attr | PreImage | Hole | Move


@dataclass
class RevIndex:
    """What a view needs of one complete rev, without its pre-images' bytes."""
    key: tuple[int, int, int]              # (checkpoint, inode, size) of the rev file
    checkpoint: int
    records: list[IndexRecord]


def index_rev(fd: int, key: tuple[int, int, int]) -> RevIndex:
    """Check a whole rev file (as history.parse_rev: frame checksums, META, END and its record
    count) one frame at a time, and keep its records with each Data as a :class:`PreImage`
    (where its bytes are, not the bytes).  HistoryError if it is damaged or incomplete."""
    meta: object = None
    end: object = None
    recs: list[IndexRecord] = []
    for f in history.scan_frames(fd):
        if end is not None:
            raise HistoryError("a frame after the END frame")
        if meta is None:
            if f.kind != history.FRAME_META:
                raise HistoryError("no META frame")
            try:
                meta = json.loads(f.payload)
            except ValueError as e:
                raise HistoryError(f"bad META: {e}") from None
            if not isinstance(meta, dict) or meta.get("format") != history.REV_FORMAT \
                    or type(meta.get("checkpoint")) is not int:
                raise HistoryError(f"unknown META {meta!r}")
            continue
        if f.kind == history.FRAME_END:
            try:
                end = json.loads(f.payload)
            except ValueError as e:
                raise HistoryError(f"bad END: {e}") from None
            continue
        if f.kind != history.FRAME_RECORDS:
            raise HistoryError(f"unexpected frame type {f.kind}")
        try:
            raw = decompress(f.payload)
        except CompressionError as e:
            raise HistoryError(str(e)) from None
        for rec, at in history.decode(raw):
            if isinstance(rec, Data):
                recs.append(PreImage(rec.sino, rec.offset, len(rec.data), f.offset, len(f.payload), at))
            else:
                recs.append(rec)
    if meta is None:
        raise HistoryError("no META frame")
    if end is None:
        raise HistoryError("incomplete (no END frame)")
    if not isinstance(end, dict) or end.get("records") != len(recs):
        raise HistoryError(f"END says {end!r}, the frames hold {len(recs)} records")
    assert isinstance(meta, dict)
    return RevIndex(key, meta["checkpoint"], recs)


class RevCache:
    """Shared by the views of one reader: the index of each rev (a complete rev never changes;
    keyed by checkpoint, inode and size) and a small LRU of decompressed RECORDS frames
    (at most ``frame_bytes`` in all; a bigger frame is decompressed for each read)."""

    def __init__(self, frame_bytes: int = 8 << 20, frames: int = 64) -> None:
        self.index: dict[tuple[int, int, int], RevIndex] = {}
        self.frames: OrderedDict[tuple[tuple[int, int, int], int], bytes] = OrderedDict()
        self.frame_bytes = frame_bytes
        self.max_frames = frames
        self.held_bytes = 0

    def frame(self, key: tuple[int, int, int], at: int) -> bytes | None:
        raw = self.frames.get((key, at))
        if raw is not None:
            self.frames.move_to_end((key, at))
        return raw

    def keep(self, key: tuple[int, int, int], at: int, raw: bytes) -> None:
        if len(raw) > self.frame_bytes:
            return
        self.frames[(key, at)] = raw
        self.held_bytes += len(raw)
        while self.held_bytes > self.frame_bytes or len(self.frames) > self.max_frames:
            self.held_bytes -= len(self.frames.popitem(last=False)[1])

    def forget(self, live: Callable[[int], bool]) -> None:
        """Drop what belongs to revs whose checkpoint is not ``live`` (pruned)."""
        for ck in [ck for ck in self.index if not live(ck[0])]:
            del self.index[ck]
        for fk in [fk for fk in self.frames if not live(fk[0][0])]:
            self.held_bytes -= len(self.frames.pop(fk))


# ("cut", size, None) | ("data", offset, (rev position in the chain, PreImage)) | ("hole", offset, length)
_Step = tuple[str, int, object]


@dataclass
class _Rev:
    n: int
    moves: list[Move]


class TreeAt:
    """Checkpoint ``k`` of the shadow at ``shadow_root`` (steps 1-4 above)."""

    def __init__(self, shadow_root: str | os.PathLike[str], k: int, cache: RevCache | None = None) -> None:
        """``cache``: the revs' indexes and decompressed frames, shared by the views of one
        reader (a new one of its own if None)."""
        self.root_path = os.fspath(shadow_root)
        self.k = k
        self.cache = cache if cache is not None else RevCache()
        self.fds: list[int] = []
        self.rev_fds: dict[int, int] = {}
        self.scanned_keys: dict[int, int] = {}     # sino -> inodes/ key (_key_by_scan)
        self.rev_keys: list[tuple[int, int, int]] = []
        try:
            self._open(k)
        except BaseException:
            self.close()
            raise

    def _fd(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def _open(self, k: int) -> None:
        rfd = self._fd(os.open(self.root_path, O_DIR))
        self.tree_fd = self._fd(os.open(layout.SHADOW_TREE, O_DIR, dir_fd=rfd))
        self.inodes_fd = self._fd(os.open(layout.SHADOW_INODES, O_DIR, dir_fd=rfd))
        self.root_sino = os.fstat(self.tree_fd).st_ino
        applied_doc = history.read_json_at(rfd, layout.SHADOW_APPLIED) or {}
        applied = applied_doc.get("applied")
        if type(applied) is not int:
            raise NotRetained(f"{self.root_path} has no applied checkpoint (never seeded?)")
        self.applied = applied
        self.entries: dict[tuple[int, bytes], tuple[Entry, int]] = {}
        self.attrs: dict[int, Attr] = {}
        self.steps: dict[int, list[_Step]] = {}
        self.extra_names: dict[int, set[bytes]] = {}
        self.held: dict[int, int] = {}
        self.revs: list[_Rev] = []
        self.held_fds: dict[int, int] = {}
        self.label = ""
        self.time_ns = 0
        if k > applied:
            raise NotRetained(f"checkpoint {k} is not applied to the shadow yet (it stands at {applied})")
        try:
            self.hist_fd = self._fd(os.open(layout.SHADOW_HISTORY, O_DIR, dir_fd=rfd))
        except FileNotFoundError:
            self.hist_fd = -1
        if k == applied:
            if self.hist_fd >= 0:
                m = history.read_json_at(self.hist_fd, layout.HISTORY_MARKER) or {}
                if m.get("checkpoint") == applied:
                    self.time_ns = m.get("time_ns") if type(m.get("time_ns")) is int else 0  # type: ignore[assignment]
                    self.label = str(m.get("label", ""))
            self.nlink_delta: dict[int, int] = {}
            return
        if self.hist_fd < 0:
            raise NotRetained(f"checkpoint {k} is not retained (the shadow keeps no history)")
        tree = history.tree_identity(self.root_path)
        chain = history.chain(self.hist_fd, tree, applied, down_to=k)      # the revs from k on
        ids = [n for n, _ in chain]
        if k not in ids:
            ids = [n for n, _ in history.chain(self.hist_fd, tree, applied)]
            have = f"{ids[0]}..{applied}" if ids else f"only {applied}"
            raise NotRetained(f"checkpoint {k} is not retained (retained: {have})")
        chain = chain[ids.index(k):]
        meta = chain[0][1]
        self.time_ns = meta.get("time_ns") if type(meta.get("time_ns")) is int else 0  # type: ignore[assignment]
        self.label = str(meta.get("label", ""))
        indexes: list[RevIndex] = []
        for n, _ in chain:
            fd = os.open(history.rev_name(n), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.hist_fd)
            try:
                fst = os.fstat(fd)
                ck = (n, fst.st_ino, fst.st_size)
                rev = self.cache.index.get(ck)
                if rev is None:
                    try:
                        rev = index_rev(fd, ck)
                    except HistoryError as e:
                        raise HistoryError(f"{self.root_path}/history/{history.rev_name(n)}: {e}") from None
                    self.cache.index[ck] = rev
            finally:
                os.close(fd)
            indexes.append(rev)
            try:
                for name in os.listdir(self._held_fd(n)):
                    if name.isdigit():
                        self.held[int(name)] = n
            except FileNotFoundError:
                pass
        self.rev_keys = [rev.key for rev in indexes]
        # newest first, so that the oldest rev's first record is the one left standing
        for ri in range(len(indexes) - 1, -1, -1):
            rev = indexes[ri]
            seen_e: set[tuple[int, bytes]] = set()
            seen_a: dict[int, Attr] = {}
            per: dict[int, list[_Step]] = {}
            moves: dict[int, Move] = {}
            for rec in rev.records:
                t = type(rec)
                if t is Entry:
                    assert isinstance(rec, Entry)
                    key = (rec.dir_sino, rec.name)
                    if key not in seen_e:
                        seen_e.add(key)
                        self.entries[key] = (rec, ri)
                        self.extra_names.setdefault(rec.dir_sino, set()).add(rec.name)
                elif t is Attr:
                    assert isinstance(rec, Attr)
                    if rec.sino not in seen_a:
                        seen_a[rec.sino] = rec
                        self.attrs[rec.sino] = rec
                elif t is PreImage:
                    assert isinstance(rec, PreImage)
                    per.setdefault(rec.sino, []).append(("data", rec.offset, (ri, rec)))
                elif t is Hole:
                    assert isinstance(rec, Hole)
                    per.setdefault(rec.sino, []).append(("hole", rec.offset, rec.length))
                elif t is Move:
                    assert isinstance(rec, Move)
                    moves.setdefault(rec.pos, rec)
            for sino in set(per) | set(seen_a):
                steps = self.steps.setdefault(sino, [])
                steps.extend(reversed(per.get(sino, [])))
                a = seen_a.get(sino)
                if a is not None and stat.S_ISREG(a.mode):
                    steps.append(("cut", a.size, None))
            self.revs.insert(0, _Rev(rev.checkpoint, [moves[p] for p in sorted(moves)]))
        self.nlink_delta = self._link_deltas()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.rev_fds = {}

    def __enter__(self) -> TreeAt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- locating

    def _held_fd(self, n: int) -> int:
        fd = self.held_fds.get(n)
        if fd is None:
            fd = self._fd(os.open(history.held_name(n), O_DIR, dir_fd=self.hist_fd))
            self.held_fds[n] = fd
        return fd

    def _rev_fd(self, ri: int) -> int:
        """An fd of rev ``ri`` of the chain, checked to be the file its index was made of."""
        fd = self.rev_fds.get(ri)
        if fd is None:
            n, ino, size = self.rev_keys[ri]
            fd = os.open(history.rev_name(n), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.hist_fd)
            st = os.fstat(fd)
            if (st.st_ino, st.st_size) != (ino, size):
                os.close(fd)
                raise OSError(errno.EIO, f"{self.root_path}/history/{history.rev_name(n)} was replaced "
                                         f"while checkpoint {self.k} was open")
            self.rev_fds[ri] = self._fd(fd)
        return fd

    def _frame(self, ri: int, p: PreImage) -> bytes:
        """The decompressed RECORDS frame holding ``p`` (read now, or from the cache); EIO
        if the rev no longer holds that frame intact."""
        key = self.rev_keys[ri]
        raw = self.cache.frame(key, p.frame)
        if raw is None:
            try:
                raw = decompress(history.read_frame_at(self._rev_fd(ri), p.frame, p.frame_len))
            except (HistoryError, CompressionError) as e:
                raise OSError(errno.EIO, f"{self.root_path}/history/{history.rev_name(key[0])}: {e}") from None
            self.cache.keep(key, p.frame, raw)
        if p.at + p.length > len(raw):
            raise OSError(errno.EIO, f"{self.root_path}/history/{history.rev_name(key[0])}: the frame at "
                                     f"{p.frame} does not hold the pre-image it held")
        return raw

    def _translate(self, path: bytes, ri: int, pos: int) -> bytes:
        """Where ``path`` (as of record ``pos`` of rev ``ri``'s batch) is in tree/ now."""
        for j in range(ri, len(self.revs)):
            for m in self.revs[j].moves:
                if j == ri and m.pos < pos:
                    continue
                path = _move(path, m)
        return path

    def _lstat_tree(self, path: bytes) -> os.stat_result | None:
        if path == b"":
            return os.fstat(self.tree_fd)
        try:
            pfd, name = self._parent(path)
        except OSError:
            return None
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(pfd)

    def _parent(self, path: bytes) -> tuple[int, bytes]:
        return open_parent(self.tree_fd, path)

    def _from_entry(self, e: Entry, ri: int) -> Node | None:
        if e.child_sino == 0:
            return None
        if e.child_sino in self.held:
            return Node(e.child_sino, e.kind, "held", b"", self.held[e.child_sino])
        if e.key and e.kind != stat.S_IFDIR:
            try:
                st = os.stat(str(e.key), dir_fd=self.inodes_fd, follow_symlinks=False)
                if st.st_ino == e.child_sino:
                    return Node(e.child_sino, e.kind, "key", b"", e.key)
            except FileNotFoundError:
                pass
        if e.path:
            p = self._translate(e.path, ri, e.pos)
            st2 = self._lstat_tree(p)
            if st2 is not None and st2.st_ino == e.child_sino:
                return Node(e.child_sino, e.kind, "tree", p, 0)
        if e.kind != stat.S_IFDIR:
            # recorded without a key (it had one name then: "held if it goes"), it gained a
            # name later and lost the recorded one, so it was never held: its hidden link in
            # inodes/ still names it (the object exists, so its number is not reused)
            key = self._key_by_scan(e.child_sino)
            if key:
                return Node(e.child_sino, e.kind, "key", b"", key)
        return Node(e.child_sino, e.kind, "lost", b"", 0)

    def _key_by_scan(self, sino: int) -> int:
        """The inodes/ key of the shadow object ``sino`` by one scan of inodes/ (0: none).
        Rare (see :meth:`_from_entry`); each scan remembers every key it passed."""
        if sino in self.scanned_keys:
            return self.scanned_keys[sino]
        fd = os.open(".", O_DIR, dir_fd=self.inodes_fd)
        try:
            with os.scandir(fd) as it:
                for d in it:
                    if d.name.isdigit():
                        self.scanned_keys[d.inode()] = int(d.name)
        finally:
            os.close(fd)
        return self.scanned_keys.setdefault(sino, 0)

    def _link_deltas(self) -> dict[int, int]:
        """Per non-directory: names at K minus names now, over the names the revs change."""
        delta: dict[int, int] = {}
        for (dsino, name), (e, ri) in self.entries.items():
            if e.child_sino and e.kind != stat.S_IFDIR:
                delta[e.child_sino] = delta.get(e.child_sino, 0) + 1
            if dsino in self.held:
                continue                     # a removed directory: no names now
            dpath = b"" if dsino == self.root_sino else self._translate(e.dir_path, ri, e.pos)
            dst = self._lstat_tree(dpath)
            if dst is None or dst.st_ino != dsino:
                continue
            cur = self._lstat_tree(dpath + b"/" + name if dpath else name)
            if cur is not None and not stat.S_ISDIR(cur.st_mode):
                delta[cur.st_ino] = delta.get(cur.st_ino, 0) - 1
        return delta

    # -------------------------------------------------------------- the tree

    @property
    def root(self) -> Node:
        return Node(self.root_sino, stat.S_IFDIR, "tree", b"", 0)

    def lookup(self, d: Node, name: bytes) -> Node | None:
        """The object ``name`` names in directory ``d`` at K, or None."""
        hit = self.entries.get((d.sino, name))
        if hit is not None:
            return self._from_entry(*hit)
        if d.where != "tree":
            return None                      # a removed directory has no names of its own now
        p = d.path + b"/" + name if d.path else name
        st = self._lstat_tree(p)
        if st is None:
            return None
        return Node(st.st_ino, stat.S_IFMT(st.st_mode), "tree", p, 0)

    def names(self, d: Node) -> list[bytes]:
        """The names in directory ``d`` at K, sorted."""
        if d.where != "tree":
            return self._names(d, -1)
        fd = self.open(d, O_DIR)
        try:
            return self._names(d, fd)
        finally:
            os.close(fd)

    def _names(self, d: Node, fd: int) -> list[bytes]:
        now = {os.fsencode(n) for n in os.listdir(fd)} if fd >= 0 else set()
        out = []
        for name in sorted(now | self.extra_names.get(d.sino, set())):
            hit = self.entries.get((d.sino, name))
            if hit is None or hit[0].child_sino:
                out.append(name)
        return out

    def listdir(self, d: Node) -> Iterator[tuple[bytes, Node]]:
        for name in self.names(d):
            n = self.lookup(d, name)
            if n is not None:
                yield name, n

    def listdir_stat(self, d: Node) -> list[tuple[bytes, Node, os.stat_result | None]]:
        """:meth:`listdir`, with the lstat of each object found in tree/ under ``d`` (taken
        through one fd of ``d``, to give to :meth:`stat`), None for the others."""
        if d.where != "tree":
            return [(name, n, None) for name, n in self.listdir(d)]
        out: list[tuple[bytes, Node, os.stat_result | None]] = []
        fd = self.open(d, O_DIR)
        try:
            for name in self._names(d, fd):
                hit = self.entries.get((d.sino, name))
                if hit is not None:
                    n = self._from_entry(*hit)
                    if n is not None:
                        out.append((name, n, None))
                    continue
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                p = d.path + b"/" + name if d.path else name
                out.append((name, Node(st.st_ino, stat.S_IFMT(st.st_mode), "tree", p, 0), st))
        finally:
            os.close(fd)
        return out

    def resolve(self, path: bytes) -> Node | None:
        """The object at ``path`` (components joined by b"/"; symlinks never followed)."""
        node: Node | None = self.root
        for c in [c for c in path.split(b"/") if c not in (b"", b".")]:
            if node is None or node.kind != stat.S_IFDIR:
                return None
            node = self.lookup(node, c)
        return node

    # -------------------------------------------------------------- objects

    def open(self, node: Node, flags: int) -> int:
        """An fd of the object now (flags: O_PATH, O_DIR, O_RDONLY...); checks its identity."""
        if node.where == "lost":
            raise OSError(errno.EIO, f"object {node.sino} of checkpoint {self.k} is not where its "
                                     f"reverse batch says")
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if node.where == "tree":
            if node.path == b"":
                fd = os.open(".", flags, dir_fd=self.tree_fd)
            else:
                pfd, name = self._parent(node.path)
                try:
                    fd = os.open(name, flags, dir_fd=pfd)
                finally:
                    os.close(pfd)
        elif node.where == "key":
            fd = os.open(str(node.arg), flags, dir_fd=self.inodes_fd)
        else:
            fd = os.open(str(node.sino), flags, dir_fd=self._held_fd(node.arg))
        if os.fstat(fd).st_ino != node.sino:
            os.close(fd)
            raise OSError(errno.ESTALE, f"object {node.sino} was replaced")
        return fd

    def stat(self, node: Node, cur: os.stat_result | None = None) -> Stat:
        """The attributes at K (``cur``: an lstat of the object just taken by the caller,
        :meth:`listdir_stat`; else it is opened and checked)."""
        a = self.attrs.get(node.sino)
        if a is not None and node.kind == stat.S_IFDIR:
            cur = None                       # (a changed directory: its blocks at K unknown, 0)
        elif cur is None:
            fd = self.open(node, O_PATH)
            try:
                cur = os.fstat(fd)
            finally:
                os.close(fd)
        if node.kind == stat.S_IFDIR:
            nlink = 1                        # unknown (1: tools do not count subdirectories)
        else:
            assert cur is not None
            now = 0 if node.where == "held" else cur.st_nlink - 1     # minus the hidden link
            nlink = max(1, now + self.nlink_delta.get(node.sino, 0))
        if node.sino in self.steps and stat.S_ISREG(node.kind):
            size = a.size if a is not None else (cur.st_size if cur is not None else 0)
            blocks = sum(-(-(b - a_) // 512) for a_, b in self.data_map(node, size))
        else:
            blocks = cur.st_blocks if cur is not None else 0
        if a is not None:
            return Stat(node.sino, a.mode, nlink, a.uid, a.gid, a.rdev, a.size, a.atime_ns, a.mtime_ns, blocks)
        assert cur is not None
        return Stat(node.sino, cur.st_mode, nlink, cur.st_uid, cur.st_gid, cur.st_rdev, cur.st_size,
                    cur.st_atime_ns, cur.st_mtime_ns, blocks)

    def unchanged(self, node: Node) -> bool:
        """True when the object's bytes at K are its bytes now (no rev changed them)."""
        return node.sino not in self.steps

    def readlink(self, node: Node) -> bytes:
        self.open_check(node)
        if node.where == "key":
            return os.readlink(str(node.arg).encode(), dir_fd=self.inodes_fd)
        if node.where == "held":
            return os.readlink(str(node.sino).encode(), dir_fd=self._held_fd(node.arg))
        pfd, name = self._parent(node.path)
        try:
            return os.readlink(name, dir_fd=pfd)
        finally:
            os.close(pfd)

    def open_check(self, node: Node) -> None:
        os.close(self.open(node, O_PATH))

    def xattrs(self, node: Node) -> dict[bytes, bytes]:
        a = self.attrs.get(node.sino)
        if a is not None:
            return history.decode_xattrs(a.xattrs)
        if node.kind == stat.S_IFLNK:
            return {}
        fd = self.open(node, O_PATH)
        try:
            return {os.fsencode(k): v for k, v in read_xattrs(fd, True).items()}
        finally:
            os.close(fd)

    def read(self, node: Node, offset: int, size: int, fd: int | None = None) -> bytes:
        """``size`` bytes at ``offset`` of a regular file as it was at K (fewer at its end)."""
        own = fd is None
        if fd is None:
            fd = self.open(node, os.O_RDONLY)
        try:
            steps = self.steps.get(node.sino)
            if not steps:
                return os.pread(fd, size, offset)
            cur_size = os.fstat(fd).st_size
            win = bytearray(size)
            got = os.pread(fd, size, offset) if offset < cur_size else b""
            win[:len(got)] = got
            vsize = cur_size
            end = offset + size
            for kind, a, arg in steps:
                if kind == "cut":
                    vsize = a
                    if a < end:
                        lo = max(a, offset)
                        win[lo - offset:] = bytes(end - lo)
                    continue
                if kind == "data":
                    assert isinstance(arg, tuple)
                    b = a + arg[1].length
                else:
                    assert isinstance(arg, int)
                    b = a + arg
                lo, hi = max(a, offset), min(b, end)
                if lo >= hi:
                    continue
                if kind == "data":
                    assert isinstance(arg, tuple)
                    ri, p = arg
                    raw = memoryview(self._frame(ri, p))
                    win[lo - offset:hi - offset] = raw[p.at + lo - a:p.at + hi - a]
                else:
                    win[lo - offset:hi - offset] = bytes(hi - lo)
            return bytes(win[:max(0, min(size, vsize - offset))])
        finally:
            if own:
                os.close(fd)

    def data_map(self, node: Node, size: int) -> list[tuple[int, int]]:
        """The data extents of a regular file at K (the rest of [0, size) is holes)."""
        fd = self.open(node, os.O_RDONLY)
        try:
            cur_size = os.fstat(fd).st_size
            m = _data_map(fd, cur_size)
            ranges = [(0, cur_size)] if m is None else list(m)
        finally:
            os.close(fd)
        for kind, a, arg in self.steps.get(node.sino, []):
            if kind == "cut":
                ranges = _cut(ranges, 0, 1 << 62, keep_below=a)
            elif kind == "data":
                assert isinstance(arg, tuple)
                n = arg[1].length
                ranges = _add(_cut(ranges, a, a + n), a, a + n)
            else:
                assert isinstance(arg, int)
                ranges = _cut(ranges, a, a + arg)
        return [(a, min(b, size)) for a, b in ranges if a < size]


def _move(path: bytes, m: Move) -> bytes:
    def under(p: bytes, root: bytes) -> bool:
        return p == root or p.startswith(root + b"/")
    if under(path, m.old):
        return m.new + path[len(m.old):]
    if m.flags & 2 and under(path, m.new):          # RENAME_EXCHANGE
        return m.old + path[len(m.new):]
    return path


def _cut(ranges: list[tuple[int, int]], lo: int, hi: int, keep_below: int | None = None) -> list[tuple[int, int]]:
    """``ranges`` without [lo, hi) (or without everything from ``keep_below`` on)."""
    if keep_below is not None:
        lo, hi = keep_below, 1 << 62
    out = []
    for a, b in ranges:
        if b <= lo or a >= hi:
            out.append((a, b))
            continue
        if a < lo:
            out.append((a, lo))
        if b > hi:
            out.append((hi, b))
    return out


def _add(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out = sorted(ranges + [(lo, hi)])
    merged: list[tuple[int, int]] = []
    for a, b in out:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged
