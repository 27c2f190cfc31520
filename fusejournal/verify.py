"""Verifying: is the shadow's tree/ equal to the original (Shadow.verify_matches)?

Compared: names, types, modes, owners, sizes, contents, symlink targets,
device numbers, hard-link groups, user.* and trusted.* xattrs, and the mtimes
of every object; also that inodes/<ino> is the shadow object of the
original's inode <ino> and inodes/ holds nothing else.  Returns the
differences as lines (empty: equal), or hands each to ``on_diff`` as it is
found.

Streamed: memory and fds do not follow the size of the tree (issue 10).

1. Walk the original and tree/ together, depth first: each directory's two
   sorted listings are merged name by name (a name only in the original:
   missing in the shadow; only in the shadow: extra; in both: compared, and
   a directory descended into at once).  One level per directory on the way
   down holds its two listings and its two fds; beyond ``OPEN_LEVELS`` the
   fds of the upper levels are closed and, on the way back, reopened through
   the child's ``..`` (or walked from the root), checked to be the same
   directory (device, inode); one that is not (moved in the live original
   meanwhile) is reported, the rest of it not compared.
2. For every non-directory: its inode number in the original goes to the
   *key table*; if it has more than one link on either side (in the shadow
   not counting its hidden link), (path, original inode, shadow inode) goes
   to the *link table*.  A name with one link on both sides forms the same
   one-name group on both sides: nothing to record.
3. Hard links: a path differs when its group (the paths of its inode) in the
   original is not its group in the shadow; so when its original inode's
   paths have more than one shadow inode, or its shadow inode's paths more
   than one original inode.  Those paths are reported in path order.
4. inodes/ is read as a stream (``scandir``); a name that is not the decimal
   inode number of a non-directory of the original (the key table) is a
   stale hidden link.

Both tables live in a private temporary SQLite database (``sqlite3.connect("")``:
a file in SQLite's temporary directory — ``SQLITE_TMPDIR``, ``TMPDIR``,
/var/tmp, /tmp — unlinked when opened, so nothing is left behind by a kill;
its page cache is capped at ``CACHE_KIB``).  Memory: the listings of the
directories on the current path (the widest directory dominates) plus that
cache.  Failure: an OSError of the walk propagates (the caller's one-line
error); a failure of the temporary database (a full disk) raises
:class:`VerifyError`.  Interrupted: nothing was written but the temporary
database, which goes with the process; a rerun starts over.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator

from . import layout
from .errors import UserError
from .shadow import _COMPARED_XATTRS, Shadow, ShadowError, _show
from .treewalk import O_DIR as _O_DIR
from .treewalk import O_PATH as _O_PATH
from .treewalk import O_READ as _O_READ
from .treewalk import files_equal as _files_equal
from .treewalk import join as _join
from .treewalk import listdir as _listdir
from .treewalk import open_at, read_xattrs

_BATCH = 4096                  # rows buffered before one executemany
_IN_CHUNK = 500                # names looked up per query (below SQLite's variable limit)


class VerifyError(UserError):
    """The verifier's temporary database failed (a full disk): nothing was compared to the end."""


def _sql_int(ino: int) -> int:
    """An inode number (unsigned 64-bit) as SQLite's signed INTEGER, one to one."""
    return ino - (1 << 64) if ino >= 1 << 63 else ino


class _Tables:
    """The key table and the link table (steps 2–4), in a temporary SQLite database."""

    CACHE_KIB = 8192

    def __init__(self) -> None:
        self.db = sqlite3.connect("")        # private, on disk, deleted when closed
        self.db.execute(f"PRAGMA cache_size = -{self.CACHE_KIB}")
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute("CREATE TABLE keys (ino INTEGER PRIMARY KEY)")
        self.db.execute("CREATE TABLE links (path BLOB PRIMARY KEY, src INTEGER, dst INTEGER) WITHOUT ROWID")
        self.keys: list[tuple[int]] = []
        self.links: list[tuple[bytes, int, int]] = []

    def key(self, ino: int) -> None:
        self.keys.append((_sql_int(ino),))
        if len(self.keys) >= _BATCH:
            self.flush()

    def link(self, path: bytes, src: int, dst: int) -> None:
        self.links.append((path, _sql_int(src), _sql_int(dst)))
        if len(self.links) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO keys VALUES (?)", self.keys)
            self.db.executemany("INSERT OR REPLACE INTO links VALUES (?, ?, ?)", self.links)
        self.keys.clear()
        self.links.clear()

    def link_differences(self) -> Iterator[tuple[bytes, list[bytes], list[bytes]]]:
        """(path, its original group, its shadow group) for every path whose groups differ,
        in path order (step 3)."""
        self.flush()
        self.db.execute("CREATE INDEX links_src ON links (src)")
        self.db.execute("CREATE INDEX links_dst ON links (dst)")
        bad = self.db.execute(
            "SELECT path, src, dst FROM links"
            " WHERE src IN (SELECT src FROM links GROUP BY src HAVING COUNT(DISTINCT dst) > 1)"
            " OR dst IN (SELECT dst FROM links GROUP BY dst HAVING COUNT(DISTINCT src) > 1)"
            " ORDER BY path")
        for path, src, dst in bad:
            ga = [r[0] for r in self.db.execute("SELECT path FROM links WHERE src = ?", (src,))]
            gb = [r[0] for r in self.db.execute("SELECT path FROM links WHERE dst = ?", (dst,))]
            yield path, ga, gb

    def unknown(self, names: list[str]) -> list[str]:
        """Those of ``names`` that are not the decimal inode number of a key (step 4)."""
        self.flush()
        nums = {}
        for n in names:
            if n.isascii() and n.isdigit() and str(int(n)) == n and int(n) < 1 << 64:
                nums[n] = _sql_int(int(n))
        found: set[int] = set()
        vals = list(nums.values())
        for i in range(0, len(vals), _IN_CHUNK):
            part = vals[i:i + _IN_CHUNK]
            q = f"SELECT ino FROM keys WHERE ino IN ({','.join('?' * len(part))})"
            found.update(r[0] for r in self.db.execute(q, part))
        return [n for n in names if nums.get(n) not in found]

    def close(self) -> None:
        self.db.close()


class _Level:
    """A directory on the current path: its fds on both sides (-1: closed, step 1), its
    identity, its two sorted listings and how far the merge has got."""

    __slots__ = ("path", "src", "dst", "src_id", "dst_id", "a", "b", "i", "j")

    def __init__(self, path: bytes, src: int, dst: int) -> None:
        self.path = path
        self.src, self.dst = src, dst
        sa, sb = os.fstat(src), os.fstat(dst)
        self.src_id = (sa.st_dev, sa.st_ino)
        self.dst_id = (sb.st_dev, sb.st_ino)
        self.a = _listdir(src)
        self.b = _listdir(dst)
        self.i = self.j = 0

    def close(self) -> None:
        for fd in (self.src, self.dst):
            if fd >= 0:
                os.close(fd)
        self.src = self.dst = -1

    def skip_rest(self) -> None:
        self.i, self.j = len(self.a), len(self.b)


def _reopen_side(child_fd: int, root_fd: int, path: bytes, ident: tuple[int, int]) -> int:
    """The directory ``ident`` again: ``..`` of ``child_fd`` (if open), else ``path`` from
    ``root_fd``; -1 if neither is that directory now."""
    tries: list[Callable[[], int]] = [lambda: open_at(root_fd, path, _O_DIR)]
    if child_fd >= 0:
        tries.insert(0, lambda: os.open("..", _O_DIR, dir_fd=child_fd))
    for t in tries:
        try:
            fd = t()
        except OSError:
            continue
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == ident:
            return fd
        os.close(fd)
    return -1


class Verifier:
    #: levels of the walk whose fds stay open (two each); above them, reopened on the way back
    OPEN_LEVELS = 64

    def __init__(self, shadow: Shadow, source_fd: int, on_diff: Callable[[str], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.shadow = shadow
        self.source_fd = source_fd
        self.on_diff = on_diff
        self.progress = progress
        self.diffs: list[str] = []          # when there is no on_diff
        self.count = 0                      # differences found
        self.dirs = 0                       # directories compared
        self.inodes_fd = -1
        self.tree_fd = -1
        self.tables: _Tables | None = None

    def emit(self, line: str) -> None:
        self.count += 1
        if self.on_diff is not None:
            self.on_diff(line)
        else:
            self.diffs.append(line)

    def diff(self, path: bytes, what: str) -> None:
        self.emit(f"{_show(path)}: {what}")

    def stale_link(self, name: str) -> None:
        self.emit(f"stale hidden link inodes/{name} (no such inode in the original tree)")

    def run(self) -> list[str]:
        try:
            self.inodes_fd = self.shadow.open_sub(layout.SHADOW_INODES)
        except (OSError, ShadowError) as e:
            self.emit(f"cannot open {self.shadow.inodes}: {e}")
            return self.diffs
        try:
            try:
                self.tree_fd = self.shadow.open_sub(layout.SHADOW_TREE)
            except (OSError, ShadowError) as e:
                self.emit(f"cannot open {self.shadow.tree}: {e}")
                return self.diffs
            self.tables = _Tables()
            self._walk()
            self._compare_links()
            self._check_inodes_dir()
        except sqlite3.Error as e:
            raise VerifyError(f"verify's temporary database failed ({e}); "
                              f"set TMPDIR to a directory with free space") from None
        finally:
            if self.tables is not None:
                self.tables.close()
            for fd in (self.tree_fd, self.inodes_fd):
                if fd >= 0:
                    os.close(fd)
        return self.diffs

    # ---------------------------------------------------------------- the walk (step 1)

    def _walk(self) -> None:
        src = os.open(".", _O_DIR, dir_fd=self.source_fd)
        try:
            dst = os.open(".", _O_DIR, dir_fd=self.tree_fd)
        except BaseException:
            os.close(src)
            raise
        try:
            self._compare_common(b"", os.fstat(src), os.fstat(dst), src, dst, None)
            stack = [_Level(b"", src, dst)]
        except BaseException:
            os.close(src)
            os.close(dst)
            raise
        try:
            while stack:
                lv = stack[-1]
                child = self._advance(lv)
                if child is not None:
                    stack.append(child)
                    if len(stack) > self.OPEN_LEVELS:
                        stack[-1 - self.OPEN_LEVELS].close()
                    continue
                stack.pop()
                self.dirs += 1
                if self.progress is not None:
                    self.progress(self.dirs)
                if stack and stack[-1].src < 0:
                    self._reopen(stack[-1], lv)
                lv.close()
        finally:
            for lv in stack:
                lv.close()

    def _reopen(self, lv: _Level, child: _Level) -> None:
        s = _reopen_side(child.src, self.source_fd, lv.path, lv.src_id)
        d = _reopen_side(child.dst, self.tree_fd, lv.path, lv.dst_id)
        if s >= 0 and d >= 0:
            lv.src, lv.dst = s, d
            return
        for fd in (s, d):
            if fd >= 0:
                os.close(fd)
        lv.skip_rest()
        self.diff(lv.path, "moved while being compared (the rest of it was not compared)")

    def _advance(self, lv: _Level) -> _Level | None:
        """Merge ``lv``'s listings on to the next common subdirectory (its level, opened and
        listed) or to the end (None)."""
        a, b = lv.a, lv.b
        while True:
            i, j = lv.i, lv.j
            if i < len(a) and (j >= len(b) or a[i] < b[j]):
                lv.i += 1
                self.diff(_join(lv.path, a[i]), "missing in the shadow")
            elif j < len(b) and (i >= len(a) or b[j] < a[i]):
                lv.j += 1
                self.diff(_join(lv.path, b[j]), "not in the original (extra in the shadow)")
            elif i < len(a):
                lv.i += 1
                lv.j += 1
                child = self._compare_entry(lv, a[i])
                if child is not None:
                    return child
            else:
                return None

    def _compare_entry(self, lv: _Level, name: bytes) -> _Level | None:
        p = _join(lv.path, name)
        sst = os.stat(name, dir_fd=lv.src, follow_symlinks=False)
        dst_st = os.stat(name, dir_fd=lv.dst, follow_symlinks=False)
        if stat.S_IFMT(sst.st_mode) != stat.S_IFMT(dst_st.st_mode):
            self.diff(p, f"type {stat.filemode(sst.st_mode)[0]!r} in the original, "
                         f"{stat.filemode(dst_st.st_mode)[0]!r} in the shadow")
            return None
        if not stat.S_ISDIR(sst.st_mode):
            self._compare_nondir(p, name, sst, dst_st, lv.src, lv.dst)
            return None
        s = os.open(name, _O_DIR, dir_fd=lv.src)
        try:
            d = os.open(name, _O_DIR, dir_fd=lv.dst)
        except BaseException:
            os.close(s)
            raise
        try:
            self._compare_common(p, sst, dst_st, s, d, None)
            return _Level(p, s, d)
        except BaseException:
            os.close(s)
            os.close(d)
            raise

    # ---------------------------------------------------------------- one object

    def _compare_common(self, p: bytes, a: os.stat_result, b: os.stat_result,
                        afd: int, bfd: int, is_path_fd: bool | None) -> None:
        """Mode, owner, mtime and xattrs (fds: real fds, or O_PATH if is_path_fd)."""
        if stat.S_IMODE(a.st_mode) != stat.S_IMODE(b.st_mode):
            self.diff(p, f"mode {stat.S_IMODE(a.st_mode):#o} in the original, "
                         f"{stat.S_IMODE(b.st_mode):#o} in the shadow")
        if (a.st_uid, a.st_gid) != (b.st_uid, b.st_gid):
            self.diff(p, f"owner {a.st_uid}:{a.st_gid} in the original, {b.st_uid}:{b.st_gid} in the shadow")
        if a.st_mtime_ns != b.st_mtime_ns:
            self.diff(p, f"mtime {a.st_mtime_ns} in the original, {b.st_mtime_ns} in the shadow")
        xa = {k: v for k, v in read_xattrs(afd, bool(is_path_fd)).items() if k.startswith(_COMPARED_XATTRS)}
        xb = {k: v for k, v in read_xattrs(bfd, bool(is_path_fd)).items() if k.startswith(_COMPARED_XATTRS)}
        if xa != xb:
            for k in sorted(set(xa) | set(xb)):
                if xa.get(k) != xb.get(k):
                    self.diff(p, f"xattr {k}: {xa.get(k)!r} in the original, {xb.get(k)!r} in the shadow")

    def _compare_nondir(self, p: bytes, name: bytes, a: os.stat_result, b: os.stat_result,
                        src: int, dst: int) -> None:
        assert self.tables is not None
        self.tables.key(a.st_ino)
        hidden = False
        try:
            k = os.stat(str(a.st_ino), dir_fd=self.inodes_fd, follow_symlinks=False)
            hidden = (k.st_dev, k.st_ino) == (b.st_dev, b.st_ino)
            if not hidden:
                self.diff(p, f"hidden link inodes/{a.st_ino} is another object")
        except FileNotFoundError:
            self.diff(p, f"hidden link inodes/{a.st_ino} is missing")
        if a.st_nlink > 1 or b.st_nlink - hidden > 1:       # step 2
            self.tables.link(p, a.st_ino, b.st_ino)
        if stat.S_ISREG(a.st_mode):
            s = os.open(name, _O_READ, dir_fd=src)
            try:
                d = os.open(name, _O_READ, dir_fd=dst)
                try:
                    self._compare_common(p, os.fstat(s), os.fstat(d), s, d, False)
                    if a.st_size != b.st_size:
                        self.diff(p, f"size {a.st_size} in the original, {b.st_size} in the shadow")
                    else:
                        off = _files_equal(s, d, a.st_size)
                        if off is not None:
                            self.diff(p, f"contents differ at offset {off}")
                finally:
                    os.close(d)
            finally:
                os.close(s)
            return
        if stat.S_ISLNK(a.st_mode):
            ta = os.readlink(name, dir_fd=src)
            tb = os.readlink(name, dir_fd=dst)
            if ta != tb:
                self.diff(p, f"symlink target {ta!r} in the original, {tb!r} in the shadow")
        elif (stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode)) and a.st_rdev != b.st_rdev:
            self.diff(p, f"device {a.st_rdev:#x} in the original, {b.st_rdev:#x} in the shadow")
        s = os.open(name, _O_PATH, dir_fd=src)
        try:
            d = os.open(name, _O_PATH, dir_fd=dst)
            try:
                self._compare_common(p, a, b, s, d, True)
            finally:
                os.close(d)
        finally:
            os.close(s)

    # ---------------------------------------------------------------- after the walk

    def _compare_links(self) -> None:
        assert self.tables is not None
        for path, ga, gb in self.tables.link_differences():
            self.diff(path, "hard links differ: original links "
                      f"{sorted(_show(x) for x in ga)}, shadow links "
                      f"{sorted(_show(x) for x in gb)}")

    def _check_inodes_dir(self) -> None:
        assert self.tables is not None
        batch: list[str] = []
        with os.scandir(self.inodes_fd) as it:
            for e in it:
                batch.append(e.name)
                if len(batch) >= _IN_CHUNK:
                    for name in self.tables.unknown(batch):
                        self.stale_link(name)
                    batch.clear()
        for name in self.tables.unknown(batch):
            self.stale_link(name)
