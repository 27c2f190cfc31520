"""Linux system calls the standard library does not expose (through ctypes).

All functions raise :class:`OSError` with the right errno on failure.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time


def _load_libc() -> ctypes.CDLL:
    """glibc by its soname first: ctypes.util.find_library runs ``ldconfig -p`` in a child
    process (tens of ms from a cold cache, at every command's start); it is the fallback."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library
        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.syncfs.argtypes = [ctypes.c_int]


def _check(ret: int, what: str, name: bytes | None = None) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", name)


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int = 0) -> None:
    _check(_libc.renameat2(olddirfd, old, newdirfd, new, flags), "renameat2", old)


def fchown_path_fd(fd: int, uid: int, gid: int) -> None:
    """chown the object an O_PATH fd refers to (symlinks included); -1 keeps a value."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


def _ts(ns: int | None) -> _Timespec:
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    sec, nsec = divmod(ns, 1_000_000_000)
    return _Timespec(sec, nsec)


def utimens_path_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set times on the object an O_PATH fd refers to; None leaves a time alone."""
    times = (_Timespec * 2)(_ts(atime_ns), _ts(mtime_ns))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory: makes the names created, renamed or removed in it durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pread_full(fd: int, n: int, off: int) -> bytes:
    """Read n bytes at off (fewer only at the end of the file)."""
    first = os.pread(fd, n, off)
    if len(first) == n or not first:
        return first
    parts = [first]
    n -= len(first)
    off += len(first)
    while n > 0:
        b = os.pread(fd, n, off)
        if not b:
            break
        parts.append(b)
        n -= len(b)
        off += len(b)
    return b"".join(parts)


def syncfs(fd: int) -> None:
    """Flush every dirty page and inode of the filesystem holding ``fd``."""
    _check(_libc.syncfs(fd), "syncfs")


# File handles: persistent names for inodes (used by the activity log).
MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]


def name_to_handle(fd: int) -> tuple[int, bytes]:
    """(handle_type, handle) of the object an (O_PATH) fd refers to."""
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), AT_EMPTY_PATH),
           "name_to_handle_at")
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])


#: pseudo handle types of a daemon without CAP_DAC_READ_SEARCH (activity.py, "by fd" mode):
#: the object is held open by this process (handle: fd, st_dev, st_ino) ...
FD_HANDLE = -2
#: ... or could not be (the open-file budget was spent): it cannot be reopened here
INO_ONLY = -3
FD_HANDLE_FORMAT = struct.Struct("<iQQ")


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """Open an object by its handle (needs CAP_DAC_READ_SEARCH); ESTALE if it is gone.

    An FD_HANDLE names an fd this process holds: it is reopened through it (O_PATH: a
    dup; otherwise through /proc/self/fd), checked to be that object, else EBADF (never
    ESTALE: the object is not known to be gone).  INO_ONLY cannot be opened: EMFILE."""
    if handle_type == FD_HANDLE and len(handle) == FD_HANDLE_FORMAT.size:
        held, dev, ino = FD_HANDLE_FORMAT.unpack(handle)
        try:
            st = os.fstat(held)
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != (dev, ino):
            raise OSError(9, f"the object (inode {ino}) is no longer held open by this daemon")
        if flags & os.O_PATH:
            return fcntl.fcntl(held, fcntl.F_DUPFD_CLOEXEC, 0)
        reopened = os.open(f"/proc/self/fd/{held}", flags & ~os.O_NOFOLLOW)
        st = os.fstat(reopened)
        if (st.st_dev, st.st_ino) != (dev, ino):
            os.close(reopened)
            raise OSError(9, f"the object (inode {ino}) changed under its fd")
        return reopened
    if handle_type == INO_ONLY:
        raise OSError(24, "an object changed during the seed could not be held open (the "
                          "open-file budget was spent); mount again to finish the seed")
    if len(handle) > MAX_HANDLE_SZ:
        raise OSError(22, "file handle too long")
    fh = _FileHandle()
    fh.handle_bytes = len(handle)
    fh.handle_type = handle_type
    ctypes.memmove(fh.f_handle, handle, len(handle))
    tried = 0
    while (fd := _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags)) < 0:
        err = ctypes.get_errno()
        if err != errno.ENOMEM or tried == len(_REUSE_PAUSES):
            raise OSError(err, f"open_by_handle_at: {os.strerror(err)}")
        time.sleep(_REUSE_PAUSES[tried])
        tried += 1
    return int(fd)


#: The pauses between tries of open_by_handle_at that failed with ENOMEM.  ENOMEM there
#: rarely means memory: when the handle's object is gone and a create elsewhere on the
#: filesystem is reusing its inode number, the kernel finds that number's new inode still
#: I_CREATING, find_inode_fast() answers -ESTALE, iget_locked() turns that into NULL and
#: ext4's __ext4_iget() reports NULL as -ENOMEM (kernel 6.18: 450 of 400,000 tries, three
#: threads creating beside them; tests/unit/test_sysc_handles.py makes that race).  The create
#: finishes within microseconds to milliseconds, and the next try gets the true answer
#: (ESTALE: the generation differs).  So ENOMEM is tried again, about 50 ms in all, and
#: only then raised.  A handler on the FUSE loop may wait this long, rarely: the same
#: loop already waits on the disk in every system call.
_REUSE_PAUSES = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.03)


# The barrier before the halt: opening a FUSE inode the kernel has cached, by its node id.
FILEID_INO64_GEN = 0x81   # the handle type fs/fuse/inode.c fuse_encode_fh() produces


def open_fuse_inode(mount_fd: int, nodeid: int, generation: int = 0,
                    flags: int = os.O_RDONLY | os.O_CLOEXEC) -> int:
    """Open, through a FUSE mount, the inode the kernel knows by ``nodeid``.

    The handle is what fuse_encode_fh() makes (node id high and low word, then
    the generation).  Without FUSE_EXPORT_SUPPORT the kernel only finds inodes
    in its inode cache (fuse_get_dentry(): ilookup5, no LOOKUP request), so an
    inode it has forgotten gives ESTALE, and no path is looked up: nothing
    waits on a directory's lock.  Needs CAP_DAC_READ_SEARCH (EPERM otherwise).
    """
    handle = struct.pack("=III", (nodeid >> 32) & 0xFFFFFFFF, nodeid & 0xFFFFFFFF,
                         generation & 0xFFFFFFFF)
    return open_by_handle(mount_fd, FILEID_INO64_GEN, handle, flags)


# glibc's mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_HEAP_BYTES = 32 << 20
HEAP_BELOW_BYTES = 4 << 20


def keep_heap(trim: int = KEEP_HEAP_BYTES, mmap_below: int = HEAP_BELOW_BYTES) -> bool:
    """Let malloc keep up to ``trim`` bytes of freed memory at the top of the heap, and
    serve blocks below ``mmap_below`` from the heap (mallopt M_TRIM_THRESHOLD,
    M_MMAP_THRESHOLD).  The daemon holds every WRITE's data (up to 1 MiB, a new bytes
    object from pyfuse3) until the streamer has logged it: with glibc's defaults the heap
    shrinks and grows again under that FIFO, and the fresh pages cost a page fault each
    (about 110,000 per GiB written, docs/performance-analysis.md).  Peak memory is the
    same; only what was freed is not given back at once.  Returns False where mallopt is
    not glibc's (nothing changes)."""
    try:
        mallopt = _libc.mallopt
    except AttributeError:
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_below))
