"""Verifying: is the shadow's tree/ equal to the original (Shadow.verify_matches)?

Compared: names, types, modes, owners, sizes, contents, symlink targets,
device numbers, hard-link groups, user.* and trusted.* xattrs, and the mtimes
of every object; also that inodes/<ino> is the shadow object of the
original's inode <ino> and inodes/ holds nothing else.  Returns the
differences as lines (empty: equal).
"""

from __future__ import annotations

import os
import stat

from . import layout
from .shadow import _COMPARED_XATTRS, Shadow, ShadowError, _show
from .treewalk import O_DIR as _O_DIR
from .treewalk import O_PATH as _O_PATH
from .treewalk import O_READ as _O_READ
from .treewalk import files_equal as _files_equal
from .treewalk import join as _join
from .treewalk import listdir as _listdir
from .treewalk import read_xattrs


class Verifier:
    def __init__(self, shadow: Shadow, source_fd: int) -> None:
        self.shadow = shadow
        self.source_fd = source_fd
        self.diffs: list[str] = []
        # hard-link structure: path -> inode on each side (non-directories)
        self.src_ino: dict[bytes, int] = {}
        self.dst_ino: dict[bytes, int] = {}
        self.src_keys: set[str] = set()
        self.inodes_fd = -1

    def diff(self, path: bytes, what: str) -> None:
        self.diffs.append(f"{_show(path)}: {what}")

    def run(self) -> list[str]:
        try:
            self.inodes_fd = self.shadow.open_sub(layout.SHADOW_INODES)
        except (OSError, ShadowError) as e:
            return [f"cannot open {self.shadow.inodes}: {e}"]
        stack: list[tuple[int, int, bytes]] = []
        try:
            src = os.open(".", _O_DIR, dir_fd=self.source_fd)
            try:
                dst = self.shadow.open_sub(layout.SHADOW_TREE)
            except (OSError, ShadowError) as e:
                os.close(src)
                return [f"cannot open {self.shadow.tree}: {e}"]
            self._compare_common(b"", os.fstat(src), os.fstat(dst), src, dst, None)
            stack.append((src, dst, b""))
            while stack:
                src, dst, path = stack.pop()
                try:
                    self._compare_dir(src, dst, path, stack)
                finally:
                    os.close(src)
                    os.close(dst)
            self._compare_links()
            self._check_inodes_dir()
        finally:
            for src, dst, _ in stack:
                os.close(src)
                os.close(dst)
            os.close(self.inodes_fd)
        return self.diffs

    def _compare_dir(self, src: int, dst: int, path: bytes, stack: list[tuple[int, int, bytes]]) -> None:
        a, b = _listdir(src), _listdir(dst)
        bset = set(b)
        aset = set(a)
        for name in a:
            if name not in bset:
                self.diff(_join(path, name), "missing in the shadow")
        for name in b:
            if name not in aset:
                self.diff(_join(path, name), "not in the original (extra in the shadow)")
        for name in a:
            if name not in bset:
                continue
            p = _join(path, name)
            sst = os.stat(name, dir_fd=src, follow_symlinks=False)
            dst_st = os.stat(name, dir_fd=dst, follow_symlinks=False)
            if stat.S_IFMT(sst.st_mode) != stat.S_IFMT(dst_st.st_mode):
                self.diff(p, f"type {stat.filemode(sst.st_mode)[0]!r} in the original, "
                             f"{stat.filemode(dst_st.st_mode)[0]!r} in the shadow")
                continue
            if stat.S_ISDIR(sst.st_mode):
                s = os.open(name, _O_DIR, dir_fd=src)
                try:
                    d = os.open(name, _O_DIR, dir_fd=dst)
                except BaseException:
                    os.close(s)
                    raise
                try:
                    self._compare_common(p, sst, dst_st, s, d, None)
                except BaseException:
                    os.close(s)
                    os.close(d)
                    raise
                stack.append((s, d, p))
            else:
                self._compare_nondir(p, name, sst, dst_st, src, dst)

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
        self.src_ino[p] = a.st_ino
        self.dst_ino[p] = b.st_ino
        self.src_keys.add(str(a.st_ino))
        try:
            k = os.stat(str(a.st_ino), dir_fd=self.inodes_fd, follow_symlinks=False)
            if (k.st_dev, k.st_ino) != (b.st_dev, b.st_ino):
                self.diff(p, f"hidden link inodes/{a.st_ino} is another object")
        except FileNotFoundError:
            self.diff(p, f"hidden link inodes/{a.st_ino} is missing")
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

    def _compare_links(self) -> None:
        def groups(m: dict[bytes, int]) -> dict[bytes, frozenset[bytes]]:
            by: dict[int, set[bytes]] = {}
            for path, ino in m.items():
                by.setdefault(ino, set()).add(path)
            return {path: frozenset(by[ino]) for path, ino in m.items()}
        ga, gb = groups(self.src_ino), groups(self.dst_ino)
        for path in sorted(ga):
            if ga[path] != gb[path]:
                self.diff(path, "hard links differ: original links "
                          f"{sorted(_show(x) for x in ga[path])}, shadow links "
                          f"{sorted(_show(x) for x in gb[path])}")

    def _check_inodes_dir(self) -> None:
        for name in os.listdir(self.inodes_fd):
            if name not in self.src_keys:
                self.diffs.append(f"stale hidden link inodes/{name} (no such inode in the original tree)")
