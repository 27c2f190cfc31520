"""One audited way to reach into a tree: every file-descriptor helper the
seeder, the verifier, the updater and resync use to stay inside the original
tree and the shadow.

Rules every helper here keeps:
1. a tree is reached only through a directory fd opened before (the original
   is hidden under the mount; the shadow root is pinned by Shadow);
2. a path is walked component by component from that fd (``open_at``): every
   directory on the way is opened with ``O_PATH|O_DIRECTORY|O_NOFOLLOW``, the
   last component with ``O_NOFOLLOW``: a symlink planted anywhere is an error
   (ELOOP/ENOTDIR), never followed out of the tree;
3. objects are compared by (st_dev, st_ino) (``same_object``), never by name;
4. symlinks, fifos, devices and sockets are held by O_PATH fds and their
   xattrs reached through ``/proc/self/fd/N`` (``proc_path``): never opened
   for reading;
5. file contents are copied and compared extent by extent (SEEK_DATA /
   SEEK_HOLE), so holes stay holes;
6. a small file the daemon keeps (journal metadata, log/end.json, the
   needs-resync list, the shadow's applied.json and shadow.json, the staging
   cursor) is replaced durably and atomically (``durable_replace``).

The updater walks with :class:`ParentCache`: rule 2, with the last parent
directories kept open across records until a rename or rmdir.
"""

from __future__ import annotations

import errno
import os
import resource
from collections import OrderedDict
from collections.abc import Iterator

from . import layout
from .sysc import fsync_dir

__all__ = ["O_DIR", "O_WALK", "O_PATH", "O_READ", "O_WRITE", "COPY_CHUNK", "NOTSUP",
           "join", "listdir", "lstat_at", "same_object", "open_at", "ParentCache", "open_read", "proc_path",
           "read_xattrs", "write_xattrs", "data_extents", "data_map", "copy_range", "copy_data",
           "files_equal", "durable_replace"]

#: a directory to list
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: a directory on the way (rule 2)
O_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: any object, not opened (rule 4)
O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: a file to read (never a fifo's open that blocks, never a controlling terminal)
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
#: a file to write
O_WRITE = os.O_WRONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
COPY_CHUNK = 1 << 20
NOTSUP = {errno.ENOTSUP, errno.EOPNOTSUPP}


def join(parent: bytes, name: bytes) -> bytes:
    """A tree-relative path (b"" is the root)."""
    return parent + b"/" + name if parent else name


def listdir(fd: int) -> list[bytes]:
    """Sorted names (bytes) of the directory open at ``fd``."""
    return sorted(os.fsencode(n) for n in os.listdir(fd))


def lstat_at(dir_fd: int, name: bytes | str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def same_object(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    return a is not None and b is not None and a.st_ino == b.st_ino and a.st_dev == b.st_dev


def open_at(base_fd: int, path: bytes, flags: int) -> int:
    """Open ``path`` (relative, b"" = base itself) below ``base_fd`` without following symlinks.

    Every directory on the way is opened with O_NOFOLLOW|O_DIRECTORY; OSError
    (ENOENT, ENOTDIR, ELOOP ...) if the path does not lead there, its
    ``filename`` the part of ``path`` up to the component that failed.
    """
    if not path:
        return os.open(".", flags, dir_fd=base_fd)
    comps = path.split(b"/")
    fd = base_fd
    i = 0                                   # the component being opened
    try:
        for comp in comps[:-1]:
            nfd = os.open(comp, O_WALK, dir_fd=fd)
            if fd != base_fd:
                os.close(fd)
            fd = nfd
            i += 1
        return os.open(comps[-1], flags | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as e:
        e.filename = b"/".join(comps[:i + 1])
        raise
    finally:
        if fd != base_fd:
            os.close(fd)


def open_parent(base_fd: int, path: bytes) -> tuple[int, bytes]:
    """(fd of the parent directory, last name) of a non-empty ``path`` below ``base_fd``,
    walked as :func:`open_at` does (``O_WALK``); the caller closes the fd."""
    head, _, name = path.rpartition(b"/")
    return open_at(base_fd, head, O_WALK), name


def fd_cache_size(most: int, share: int = 8, reserve: int = 40) -> int:
    """How many fds a cache of the updater's side may keep under this process's soft
    open-file limit: ``most``, or 1/``share`` of what is left after ``reserve``
    (the log's, the socket's, the shadow's own fds) when the limit is low; at least 2.
    The updater keeps a write-fd cache (share 4), two ParentCaches and the
    history's read cache (share 8 each): under a limit of 64 they keep 6 + 3 × 3."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return most
    return max(2, min(most, (soft - reserve) // share))


class ParentCache:
    """Rule 2 for a stream of changes (the updater's): the parent directory of a
    path, walked with :func:`open_at` (``O_DIR`` for the parent itself, readable so
    that its mtime can be set), and the last ``size`` parents kept open.

    Directories only move or disappear through the caller (a rename, an
    rmdir): it calls :meth:`forget` after each, so a cached fd is always the
    directory the path names now.  An fd returned is borrowed: valid until
    ``size`` further misses, :meth:`forget` or :meth:`close`; never closed by
    the caller.
    """

    def __init__(self, base_fd: int, size: int | None = None) -> None:
        self.base_fd = base_fd
        self.size = fd_cache_size(16) if size is None else size
        self._fds: OrderedDict[bytes, int] = OrderedDict()

    def parent(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the directory holding the last component of a non-root ``path``, that
        component); the fd is ``base_fd`` itself for a name directly below it.  OSError
        as :func:`open_at`."""
        head, _, name = path.rpartition(b"/")
        if not head:
            return self.base_fd, name
        fd = self._fds.get(head)
        if fd is not None:
            self._fds.move_to_end(head)
            return fd, name
        fd = open_at(self.base_fd, head, O_DIR)
        self._fds[head] = fd
        if len(self._fds) > self.size:
            os.close(self._fds.popitem(last=False)[1])
        return fd, name

    def forget(self) -> None:
        """Close every cached fd (a directory may have moved)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    close = forget


def open_read(dir_fd: int, name: bytes | str) -> int:
    try:
        return os.open(name, O_READ | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:                 # O_NOATIME needs ownership or CAP_FOWNER
        return os.open(name, O_READ, dir_fd=dir_fd)


def proc_path(fd: int) -> str:
    """A path reaching the object an (O_PATH) fd refers to, symlinks included.

    The f*xattr calls refuse O_PATH fds; going through the /proc magic link
    reaches the very object the fd holds (the link itself for a symlink).
    """
    return f"/proc/self/fd/{fd}"


def read_xattrs(fd: int, is_path_fd: bool) -> dict[str, bytes]:
    """All extended attributes we can read of the object behind ``fd``.

    ``is_path_fd``: ``fd`` is an O_PATH fd (symlinks, fifos, devices,
    sockets: objects we must not open for reading).  Namespaces we are not
    allowed to read are silently absent (listxattr leaves them out).
    """
    target: int | str = proc_path(fd) if is_path_fd else fd
    try:
        names = os.listxattr(target)
    except OSError as e:
        if e.errno in NOTSUP:
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        try:
            out[name] = os.getxattr(target, name)
        except OSError as e:
            if e.errno in NOTSUP or e.errno in (errno.ENODATA, errno.EPERM, errno.EACCES):
                continue
            raise
    return out


def write_xattrs(fd: int, is_path_fd: bool, attrs: dict[str, bytes]) -> None:
    """Set ``attrs`` on the object behind ``fd`` (see :func:`read_xattrs`).

    Failures are ignored for filesystems without xattrs and for the
    ``security.*`` / ``system.*`` namespaces (SELinux labels, ACLs on a
    filesystem without them); ``user.*`` and ``trusted.*`` must succeed.
    """
    target: int | str = proc_path(fd) if is_path_fd else fd
    for name, value in attrs.items():
        try:
            os.setxattr(target, name, value)
        except OSError as e:
            if e.errno in NOTSUP:
                continue
            if name.startswith(("security.", "system.")):
                continue
            raise


def copy_path_xattrs(src_dir: int, dst_dir: int, name: bytes) -> None:
    """Copy the xattrs of ``name`` in ``src_dir`` to ``name`` in ``dst_dir``, through
    O_PATH fds (for objects that cannot be opened: symlinks, fifos, devices, sockets)."""
    s = os.open(name, O_PATH, dir_fd=src_dir)
    try:
        attrs = read_xattrs(s, True)
    finally:
        os.close(s)
    if attrs:
        d = os.open(name, O_PATH, dir_fd=dst_dir)
        try:
            write_xattrs(d, True, attrs)
        finally:
            os.close(d)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` ranges of ``fd`` that may hold data (holes skipped).

    Falls back to one range covering the file where SEEK_DATA is unsupported.
    """
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:          # only a hole up to EOF
                return
            if e.errno in (errno.EINVAL, *NOTSUP):
                yield off, size
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:                        # file changed under us
            end = size
        yield start, end
        off = end


def data_map(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The data extents of ``fd`` in [0, size), exactly as SEEK_DATA/SEEK_HOLE report them.

    Everything else in [0, size) is a hole.  None where the filesystem
    refuses SEEK_DATA (it cannot tell holes: there is no map to keep).
    """
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as e:
        if e.errno in (errno.EINVAL, *NOTSUP):
            return None
        if e.errno != errno.ENXIO:              # ENXIO: nothing but a hole
            raise
    return list(data_extents(fd, size))


def copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Copy bytes [start, end) from src to dst at the same offsets."""
    off = start
    try:
        while off < end:
            n = os.copy_file_range(src, dst, min(end - off, 1 << 30), off, off)
            if n == 0:                          # source shrank
                return
            off += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EBADF, *NOTSUP):
            raise
    while off < end:                            # plain read/write fallback
        buf = os.pread(src, min(end - off, COPY_CHUNK), off)
        if not buf:
            return
        mv = memoryview(buf)
        while mv:
            n = os.pwrite(dst, mv, off)
            off += n
            mv = mv[n:]


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes of file contents, keeping holes as holes."""
    for start, end in data_extents(src, size):
        copy_range(src, dst, start, end)
    os.ftruncate(dst, size)


def files_equal(a: int, b: int, size: int) -> int | None:
    """Compare two files' first ``size`` bytes; return the first differing offset or None.

    Only ranges holding data in either file are read (both are zero elsewhere),
    so sparse files with huge holes compare quickly.
    """
    ranges = sorted(list(data_extents(a, size)) + list(data_extents(b, size)))
    merged: list[list[int]] = []
    for s, e in ranges:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    for s, e in merged:
        off = s
        while off < e:
            n = min(e - off, COPY_CHUNK)
            x = os.pread(a, n, off)
            y = os.pread(b, n, off)
            if x != y:
                for i in range(min(len(x), len(y))):
                    if x[i] != y[i]:
                        return off + i
                return off + min(len(x), len(y))
            if not x:
                break
            off += n
    return None


def durable_replace(path: str | os.PathLike[str], data: bytes, mode: int = layout.PRIVATE_FILE_MODE, *,
                    dir_fd: int | None = None) -> None:
    """Write-temp + fsync + rename + fsync(dir): after return, ``path`` holds ``data`` durably.

    The temporary file is ``NAME.tmp`` beside it, never reached through a
    symlink, and gets ``mode`` even if a loose leftover was there.  A kill at
    any point leaves the old file or the new one, never a mix.  With
    ``dir_fd``, ``path`` is relative to that directory fd (the shadow's pinned
    root, the staging directory): the temporary file and the rename stay in
    it, and it is that fd that is fsync'ed, never a directory reopened by name.
    """
    head, tail = os.path.split(os.fspath(path))
    tmp = os.path.join(head, tail + layout.TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)                 # a leftover temp file may be loose
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if dir_fd is None:
        fsync_dir(head or ".")
    else:
        os.fsync(dir_fd)
