"""Seeding: the shadow's tree/ and inodes/ made from the original (checkpoint 0).

Called by :meth:`Shadow.seed` on an empty tree/.  The original is walked from
the daemon's source fd, every directory opened with ``O_NOFOLLOW`` and every
object compared by (st_dev, st_ino) (treewalk.py); each non-directory gets
its hidden link inodes/<st_ino>; contents are copied extent by extent (holes
stay holes), then modes, owners, xattrs and mtimes (directories' last).
A mount point inside the original is refused (ShadowError).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator

from . import layout
from .shadow import Shadow, ShadowError, _show
from .treewalk import O_DIR as _O_DIR
from .treewalk import O_READ as _O_READ
from .treewalk import copy_data, copy_path_xattrs, read_xattrs, write_xattrs
from .treewalk import join as _join
from .treewalk import listdir as _listdir


class Seeder:
    def __init__(self, shadow: Shadow, source_fd: int, progress: Callable[[int], None] | None) -> None:
        self.shadow = shadow
        self.source_fd = source_fd
        self.progress = progress
        self.count = 0
        self.linked: set[int] = set()           # st_ino of multiply-linked files copied
        self.dev = 0
        self.inodes_fd = -1
        self.shadow_id: tuple[int, int] = (0, 0)

    def run(self) -> int:
        sh = self.shadow
        rfd = sh.open_root()
        try:
            st_sh = os.fstat(rfd)
        finally:
            os.close(rfd)
        self.shadow_id = (st_sh.st_dev, st_sh.st_ino)
        self.inodes_fd = sh.open_sub(layout.SHADOW_INODES)
        # (src dir fd, dst dir fd, pending names, tree-relative path)
        stack: list[tuple[int, int, Iterator[bytes], bytes]] = []
        try:
            src = os.open(".", _O_DIR, dir_fd=self.source_fd)
            try:
                dst = sh.open_sub(layout.SHADOW_TREE)
            except BaseException:
                os.close(src)
                raise
            st = os.fstat(src)
            self.dev = st.st_dev
            stack.append((src, dst, iter(_listdir(src)), b""))
            os.fchown(dst, st.st_uid, st.st_gid)
            while stack:
                src, dst, names, path = stack[-1]
                name = next(names, None)
                if name is None:
                    stack.pop()
                    try:
                        self._finish_dir(src, dst)
                    finally:
                        os.close(src)
                        os.close(dst)
                    continue
                sub = self._copy_entry(src, dst, name, _join(path, name))
                if sub is not None:
                    stack.append(sub)
                self.count += 1
                if self.progress is not None:
                    self.progress(self.count)
        finally:
            for src, dst, _, _ in stack:
                os.close(src)
                os.close(dst)
            os.close(self.inodes_fd)
        sh.set_applied(0)
        return self.count

    def _finish_dir(self, src: int, dst: int) -> None:
        st = os.fstat(src)
        os.fchmod(dst, stat.S_IMODE(st.st_mode))
        write_xattrs(dst, False, read_xattrs(src, False))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _copy_entry(self, src: int, dst: int, name: bytes,
                    path: bytes) -> tuple[int, int, Iterator[bytes], bytes] | None:
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        if st.st_dev != self.dev:
            raise ShadowError(f"{_show(path)} is on another filesystem (a mount point inside "
                              f"the original is not supported)")
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            if (st.st_dev, st.st_ino) == self.shadow_id:
                raise ShadowError(f"the shadow lies inside the original tree at {_show(path)}")
            os.mkdir(name, 0o700, dir_fd=dst)
            s = os.open(name, _O_DIR, dir_fd=src)
            try:
                d = os.open(name, _O_DIR, dir_fd=dst)
                os.fchown(d, st.st_uid, st.st_gid)
            except BaseException:
                os.close(s)
                raise
            return s, d, iter(_listdir(s)), path
        key = str(st.st_ino)
        if st.st_nlink > 1 and st.st_ino in self.linked:
            os.link(key, name, src_dir_fd=self.inodes_fd, dst_dir_fd=dst, follow_symlinks=False)
            return None
        if stat.S_ISREG(mode):
            self._copy_file(src, dst, name, path)
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
        os.link(name, key, src_dir_fd=dst, dst_dir_fd=self.inodes_fd, follow_symlinks=False)
        if st.st_nlink > 1:
            self.linked.add(st.st_ino)
        return None

    def _copy_file(self, src: int, dst: int, name: bytes, path: bytes) -> None:
        try:
            s = os.open(name, _O_READ | os.O_NOATIME, dir_fd=src)
        except PermissionError:                 # O_NOATIME needs ownership or CAP_FOWNER
            s = os.open(name, _O_READ, dir_fd=src)
        try:
            st = os.fstat(s)
            if not stat.S_ISREG(st.st_mode):
                raise ShadowError(f"{_show(path)} changed type while seeding")
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
        finally:
            os.close(s)



# ------------------------------------------------------------------ verification
