"""Record validation: is a record, as decoded from the ordered log, well-formed
and safe to apply to the shadow?  Beside the record types (records.py).

Every field's type and range is checked, and every path: relative, free of
``.``/``..``/empty components and NUL bytes, components of at most 255
bytes; inode keys are positive ints; modes carry only permission bits and an
expected file type; ids are never (uid_t)-1.  Nothing here looks at the shadow.
A crafted batch is rejected as a whole (``validate_records``) before any of
it is applied.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable

from .errors import UpdaterError
from .records import (
    ATTR_ATIME,
    ATTR_GID,
    ATTR_MODE,
    ATTR_MTIME,
    ATTR_SIZE,
    ATTR_UID,
    Link,
    Mkdir,
    Mknod,
    Record,
    Removexattr,
    Rename,
    Rmdir,
    Setattr,
    Setxattr,
    Symlink,
    Unlink,
    Write,
)

__all__ = ["validate_record", "check_record", "validate_records"]

_ATTR_ALL = ATTR_MODE | ATTR_UID | ATTR_GID | ATTR_SIZE | ATTR_ATIME | ATTR_MTIME
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_NODE_TYPES = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)
_U64 = (1 << 64) - 1
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
# records keep times as i64 seconds + nanoseconds (records.py)
_TIME_MIN, _TIME_MAX = _I64_MIN * 1_000_000_000, _I64_MAX * 1_000_000_000 + 999_999_999
_ID_MAX = (1 << 32) - 2         # (uid_t)-1 means "no change" to chown: never a real id


def _check_int(value: object, what: str, lo: int, hi: int) -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{what} {value!r} out of range")


def _check_path(path: object, what: str = "path", allow_root: bool = False) -> None:
    """Reject any path that could leave tree/ (see the module docstring)."""
    if type(path) is not bytes:
        raise ValueError(f"{what} is not bytes: {path!r}")
    if path == b"":
        if allow_root:
            return
        raise ValueError(f"{what} is empty")
    if b"\0" in path:
        raise ValueError(f"{what} {path!r} contains a NUL byte")
    if path.startswith(b"/"):
        raise ValueError(f"{what} {path!r} is absolute")
    for comp in path.split(b"/"):
        if comp in (b"", b".", b".."):
            raise ValueError(f"{what} {path!r} has a {comp.decode() or 'empty'!r} component")
        if len(comp) > 255:
            raise ValueError(f"{what} {path!r} has a component longer than 255 bytes")


def _check_key(ino: object) -> None:
    _check_int(ino, "inode key", 1, _U64)


def _check_ref(ino: object, path: object) -> None:
    _check_int(ino, "inode key", 0, _U64)
    _check_path(path, allow_root=True)


def _check_perm(mode: object, allowed_types: tuple[int, ...]) -> None:
    _check_int(mode, "mode", 0, 0xFFFFFFFF)
    assert isinstance(mode, int)
    if mode & ~(stat.S_IFMT(mode) | 0o7777):
        raise ValueError(f"mode {mode:#o} has unknown bits")
    if stat.S_IFMT(mode) not in allowed_types:
        raise ValueError(f"mode {mode:#o} has an unexpected file type")


def _check_ids(uid: object, gid: object) -> None:
    _check_int(uid, "uid", 0, _ID_MAX)
    _check_int(gid, "gid", 0, _ID_MAX)


def _check_times(*times: object) -> None:
    for t in times:
        _check_int(t, "time", _TIME_MIN, _TIME_MAX)


def _check_xattr_name(name: object) -> None:
    if type(name) is not bytes or not name or b"\0" in name or len(name) > 255:
        raise ValueError(f"bad xattr name {name!r}")


def validate_record(rec: Record) -> None:
    """Raise ValueError unless ``rec`` is a well-formed, safe record.

    Checks types and ranges of every field and the safety of every path;
    does not look at the shadow.
    """
    t = type(rec)
    if type(rec) is Write:
        ino, off, mtime, data = rec
        if (type(ino) is int and type(off) is int and type(mtime) is int and type(data) is bytes
                and 0 < ino <= _U64 and 0 <= off <= _I64_MAX - len(data)
                and _TIME_MIN <= mtime <= _TIME_MAX):
            return                                  # the common case, checked quickly
        _check_key(rec.ino)
        if type(rec.data) is not bytes:
            raise ValueError("write data is not bytes")
        _check_int(rec.offset, "offset", 0, _I64_MAX - len(rec.data))
        _check_times(rec.mtime_ns)
    elif type(rec) is Mknod:
        _check_key(rec.ino)
        _check_perm(rec.mode, _NODE_TYPES)
        _check_ids(rec.uid, rec.gid)
        _check_int(rec.rdev, "rdev", 0, _U64)
        _check_times(rec.mtime_ns, rec.pmtime_ns)
        _check_path(rec.path)
    elif type(rec) is Mkdir:
        _check_perm(rec.mode, (0, stat.S_IFDIR))
        _check_ids(rec.uid, rec.gid)
        _check_times(rec.mtime_ns, rec.pmtime_ns)
        _check_path(rec.path)
    elif type(rec) is Symlink:
        _check_key(rec.ino)
        _check_ids(rec.uid, rec.gid)
        _check_times(rec.mtime_ns, rec.pmtime_ns)
        _check_path(rec.path)
        if type(rec.target) is not bytes or not rec.target or b"\0" in rec.target:
            raise ValueError(f"bad symlink target {rec.target!r}")
    elif type(rec) is Link or type(rec) is Unlink:
        _check_key(rec.ino)
        _check_times(rec.pmtime_ns)
        _check_path(rec.path)
    elif type(rec) is Rmdir:
        _check_times(rec.pmtime_ns)
        _check_path(rec.path)
    elif type(rec) is Rename:
        if rec.flags not in (0, _RENAME_NOREPLACE, _RENAME_EXCHANGE):
            raise ValueError(f"bad rename flags {rec.flags!r}")
        _check_int(rec.ino, "inode key", 0, _U64)
        _check_times(rec.old_pmtime_ns, rec.new_pmtime_ns)
        _check_path(rec.old, "old path")
        _check_path(rec.new, "new path")
    elif type(rec) is Setattr:
        _check_ref(rec.ino, rec.path)
        _check_int(rec.mask, "setattr mask", 0, _ATTR_ALL)
        _check_int(rec.mode, "mode", 0, 0xFFFFFFFF)
        if rec.mask & ATTR_MODE and rec.mode & ~(stat.S_IFMT(rec.mode) | 0o7777):
            raise ValueError(f"mode {rec.mode:#o} has unknown bits")
        _check_int(rec.uid, "uid", 0, 0xFFFFFFFF)
        _check_int(rec.gid, "gid", 0, 0xFFFFFFFF)
        if rec.mask & ATTR_UID:
            _check_int(rec.uid, "uid", 0, _ID_MAX)
        if rec.mask & ATTR_GID:
            _check_int(rec.gid, "gid", 0, _ID_MAX)
        _check_int(rec.size, "size", 0, _I64_MAX)
        _check_times(rec.atime_ns, rec.mtime_ns)
    elif type(rec) is Setxattr:
        _check_ref(rec.ino, rec.path)
        _check_xattr_name(rec.name)
        if type(rec.value) is not bytes:
            raise ValueError("xattr value is not bytes")
    elif type(rec) is Removexattr:
        _check_ref(rec.ino, rec.path)
        _check_xattr_name(rec.name)
    else:
        raise ValueError(f"unknown record type {t.__name__}")


def check_record(checkpoint: int, index: int, rec: Record) -> None:
    """validate_record, with the UpdaterError naming the checkpoint and record index."""
    try:
        validate_record(rec)
    except ValueError as e:
        raise UpdaterError(f"checkpoint {checkpoint}: record {index} "
                           f"({type(rec).__name__}) rejected: {e}") from None


def validate_records(checkpoint: int, records: Iterable[Record]) -> int:
    """Validate a whole batch; UpdaterError names the first bad record. Returns the count."""
    n = 0
    for n, rec in enumerate(records, 1):
        check_record(checkpoint, n - 1, rec)
    return n
