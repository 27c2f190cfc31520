"""Records: one per successful mutating operation, in the order received.

A record names what it changed in two ways, chosen so the updater can replay it
on the shadow without ever needing the original tree:

* **inode keys** (``ino``): the original tree's ``st_ino`` of a non-directory.
  The shadow keeps one hidden hard link per non-directory, named by its inode
  key (``SHADOW/inodes/<ino>``), so writes and attribute changes reach every
  hard link, and reach a file that was renamed while open.
* **paths** (``path``): bytes relative to the tree root, components joined by
  ``b"/"``, ``b""`` for the root itself.  Used for names (create, unlink,
  rename ...) and for directories, which cannot be hard-linked.

Attribute records use a *ref*: ``ino != 0`` selects the inode key, ``ino == 0``
selects ``path`` (a directory).

Every record carries the values the original tree reported *after* the
operation (mode, ownership, mtimes of the object and of its parent
directories), so replaying it reproduces the original exactly, including
setgid inheritance, umask effects and timestamps.

Records are plain ``NamedTuple`` objects (cheap to build in the write path).
:func:`encode` / :func:`decode` turn a sequence of them into bytes and back.
Layout of one encoded record (little endian)::

    u8  opcode
    u32 body length (bytes after this header)
    fixed integer fields (per opcode struct)
    for each bytes field: u32 length, then the bytes

The format is versioned by :data:`RECORD_FORMAT`; see docs/format.md.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple, cast

RECORD_FORMAT = 1

#: SETATTR mask bits (which attributes the operation set)
ATTR_MODE = 1
ATTR_UID = 2
ATTR_GID = 4
ATTR_SIZE = 8
ATTR_ATIME = 16
ATTR_MTIME = 32


class Mknod(NamedTuple):
    """A new non-directory (regular file, fifo, socket, device) at ``path``."""
    ino: int
    mode: int          # full st_mode including S_IFMT
    uid: int
    gid: int
    rdev: int
    mtime_ns: int
    pmtime_ns: int     # parent directory mtime after the operation
    path: bytes


class Mkdir(NamedTuple):
    """A new directory at ``path``."""
    mode: int          # permission bits only (S_IMODE): see mkdir_record
    uid: int
    gid: int
    mtime_ns: int
    pmtime_ns: int
    path: bytes


class Symlink(NamedTuple):
    ino: int
    uid: int
    gid: int
    mtime_ns: int
    pmtime_ns: int
    path: bytes
    target: bytes


class Link(NamedTuple):
    """A new name ``path`` for the existing non-directory ``ino``."""
    ino: int
    pmtime_ns: int
    path: bytes


class Unlink(NamedTuple):
    ino: int           # inode key of the object that was removed
    pmtime_ns: int
    path: bytes


class Rmdir(NamedTuple):
    pmtime_ns: int
    path: bytes


class Rename(NamedTuple):
    flags: int         # 0, RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2)
    ino: int           # inode key of the source if a non-directory, else 0
    old_pmtime_ns: int
    new_pmtime_ns: int
    old: bytes
    new: bytes


class Write(NamedTuple):
    ino: int
    offset: int
    mtime_ns: int
    data: bytes


class Setattr(NamedTuple):
    """Attributes after a chmod/chown/truncate/utimens (``mask``: ATTR_* bits set)."""
    ino: int
    mask: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    path: bytes


class Setxattr(NamedTuple):
    ino: int
    path: bytes
    name: bytes
    value: bytes


class Removexattr(NamedTuple):
    ino: int
    path: bytes
    name: bytes


Record = (Mknod | Mkdir | Symlink | Link | Unlink | Rmdir | Rename | Write
          | Setattr | Setxattr | Removexattr)

# opcode -> (class, struct of the leading integer fields, number of bytes fields)
# In these format strings "t" marks a time in nanoseconds: it is stored as
# i64 seconds + u32 nanoseconds, so every time a filesystem can hold (ext4
# goes to the year 2446) fits, not only the int64-nanosecond range (2262).
_TIMES = "t"
_FORMATS: dict[int, tuple[type[Record], str, int]] = {
    1: (Mknod, "QIIIQtt", 1),
    2: (Mkdir, "IIItt", 1),
    3: (Symlink, "QIItt", 2),
    4: (Link, "Qt", 1),
    5: (Unlink, "Qt", 1),
    6: (Rmdir, "t", 1),
    7: (Rename, "IQtt", 2),
    8: (Write, "QQt", 1),
    9: (Setattr, "QIIIIQtt", 1),
    10: (Setxattr, "Q", 3),
    11: (Removexattr, "Q", 2),
}
_NS = 1_000_000_000


# ---------------------------------------------------------------- building records
# The one place that decides which attributes of the original go into a record
# (fs.py, resync.py and the tests build records only through these).

def mknod_record(st: os.stat_result, pmtime_ns: int, path: bytes) -> Mknod:
    """A new non-directory: the full st_mode (type and permissions); rdev only for devices."""
    rdev = 0 if stat.S_ISREG(st.st_mode) else st.st_rdev
    return Mknod(st.st_ino, st.st_mode, st.st_uid, st.st_gid, rdev, st.st_mtime_ns, pmtime_ns, path)


def mkdir_record(st: os.stat_result, pmtime_ns: int, path: bytes) -> Mkdir:
    """A new directory: its permission bits only (the type is implied)."""
    return Mkdir(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, pmtime_ns, path)


def symlink_record(st: os.stat_result, pmtime_ns: int, path: bytes, target: bytes) -> Symlink:
    """A new symbolic link (its mode means nothing and is not kept)."""
    return Symlink(st.st_ino, st.st_uid, st.st_gid, st.st_mtime_ns, pmtime_ns, path, target)


def setattr_record(ino: int, mask: int, st: os.stat_result, path: bytes = b"", *,
                   size: int | None = None) -> Setattr:
    """Attributes after a change (``ref``: ``ino``, or 0 and a directory's ``path``).

    The updater applies mode, uid and gid under ``mask`` (the mode also after
    a chown, for the setuid/setgid bits it cleared), size and atime only
    under ``mask``, and the mtime always.  So mode (permission bits only),
    uid, gid and mtime always come from ``st``, the original after the
    operation; size and atime only when ``mask`` has them, else 0, so that
    the same object always gives the same record (reading a directory
    changes its atime).  ``size`` overrides st_size (resync cutting a file
    before rewriting it).
    """
    if size is None:
        size = st.st_size if mask & ATTR_SIZE else 0
    atime_ns = st.st_atime_ns if mask & ATTR_ATIME else 0
    return Setattr(ino, mask, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, atime_ns,
                   st.st_mtime_ns, path)


def _compile(fmt: str) -> tuple[struct.Struct, tuple[int, ...]]:
    return (struct.Struct("<" + fmt.replace(_TIMES, "qI")),
            tuple(i for i, c in enumerate(fmt) if c == _TIMES))


_SPEC: dict[int, tuple[type[Record], struct.Struct, int, tuple[int, ...]]] = {}
for _op, (_cls, _fmt, _nbytes) in _FORMATS.items():
    _st, _times = _compile(_fmt)
    _SPEC[_op] = (_cls, _st, _nbytes, _times)
_OPCODE: dict[type[Record], int] = {cls: op for op, (cls, _, _, _) in _SPEC.items()}
_HEADER = struct.Struct("<BI")
_LEN = struct.Struct("<I")


def _split_times(ints: tuple[int, ...], times: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    for i, v in enumerate(ints):
        if i in times:
            out.extend(divmod(v, _NS))
        else:
            out.append(v)
    return out


class RecordError(ValueError):
    """Encoded records that cannot be decoded (corrupt or from a newer format)."""


# Every record's fields are its integers, then its ``nbytes`` bytes fields (_FORMATS):
# the casts below say so to the type checker (a record type's slices do not).
def record_size(rec: Record) -> int:
    """Bytes ``rec`` takes once encoded (used for accounting, cheaply)."""
    op = _OPCODE[type(rec)]
    _, fixed, nbytes, _ = _SPEC[op]
    n = _HEADER.size + fixed.size + 4 * nbytes
    for field in cast("tuple[bytes, ...]", rec[len(rec) - nbytes:]):
        n += len(field)
    return n


def encode(records: Iterable[Record]) -> bytes:
    """Encode records, in order, into one bytes object."""
    parts: list[bytes] = []
    append = parts.append
    for rec in records:
        head, tail = _head(rec)
        append(head)
        for b in tail:
            append(_LEN.pack(len(b)))
            append(b)
    return b"".join(parts)


def _head(rec: Record) -> tuple[bytes, tuple[bytes, ...]]:
    """A record's header and fixed fields, encoded, and its bytes fields."""
    op = _OPCODE[type(rec)]
    _, fixed, nbytes, times = _SPEC[op]
    nints = len(rec) - nbytes
    tail = cast("tuple[bytes, ...]", rec[nints:])
    body_len = fixed.size + 4 * nbytes + sum(len(b) for b in tail)
    try:
        return (_HEADER.pack(op, body_len)
                + fixed.pack(*_split_times(cast("tuple[int, ...]", rec[:nints]), times))), tail
    except struct.error as e:
        raise RecordError(f"{type(rec).__name__} record has a field out of range: {rec[:nints]} ({e})") from None


#: a bytes field at least this long is its own part in :func:`encode_parts` (not copied)
BIG_FIELD = 64 << 10


def encode_parts(records: Iterable[Record]) -> list[bytes | bytearray]:
    """The encoding of :func:`encode` as a list of parts whose concatenation it is,
    without copying the large bytes fields (the log's writer writes, checksums and
    compresses them where they are).

    Headers, integers and bytes fields shorter than :data:`BIG_FIELD` are copied
    into shared bytearrays between the big fields, so a chunk of small records
    is one part and a chunk of 1 MiB writes about two parts per record."""
    parts: list[bytes | bytearray] = []
    buf = bytearray()
    for rec in records:
        head, tail = _head(rec)
        buf += head
        for b in tail:
            buf += _LEN.pack(len(b))
            if len(b) >= BIG_FIELD:
                parts.append(buf)
                parts.append(b)
                buf = bytearray()
            else:
                buf += b
    if buf:
        parts.append(buf)
    return parts


_WRITE_OP = _OPCODE[Write]
#: a Write's fixed fields and its data's length: inode key, offset, mtime (s, ns), length
_WRITE_HEAD = struct.Struct("<QQqII")
assert _FORMATS[_WRITE_OP][1:] == ("QQt", 1)     # what the fast path of decode() reads


def decode(buf: bytes | memoryview) -> Iterator[Record]:
    """Decode records encoded by :func:`encode`; raise RecordError on bad input.

    Writes, most of any batch, take a fast path that decodes exactly the same
    record when every check of the general path would pass; anything else
    (another type, or a write that fails a check) goes through
    :func:`_decode_one`, which raises what it finds."""
    mv = memoryview(buf)
    pos, end = 0, len(mv)
    head, whead, ns_max = _HEADER, _WRITE_HEAD, _NS
    wsize = _HEADER.size + _WRITE_HEAD.size
    while pos < end:
        if end - pos >= wsize:
            op, body_len = head.unpack_from(mv, pos)
            if op == _WRITE_OP:
                ino, off, sec, ns, n = whead.unpack_from(mv, pos + 5)
                if ns < ns_max and body_len == whead.size + n and pos + 5 + body_len <= end:
                    d = pos + wsize
                    pos = d + n
                    yield Write(ino, off, sec * ns_max + ns, bytes(mv[d:pos]))
                    continue
        rec, pos = _decode_one(mv, pos, end)
        yield rec


def _decode_one(mv: memoryview, pos: int, end: int) -> tuple[Record, int]:
    """The record at ``pos`` and the offset after it (the general path of :func:`decode`)."""
    if end - pos < _HEADER.size:
        raise RecordError(f"truncated record header at offset {pos}")
    op, body_len = _HEADER.unpack_from(mv, pos)
    pos += _HEADER.size
    spec = _SPEC.get(op)
    if spec is None:
        raise RecordError(f"unknown record opcode {op} at offset {pos - _HEADER.size}")
    if body_len > end - pos:
        raise RecordError(f"record at offset {pos - _HEADER.size} runs past the end")
    cls, fixed, nbytes, times = spec
    body_end = pos + body_len
    if fixed.size > body_len:
        raise RecordError(f"record at offset {pos - _HEADER.size} too short")
    raw = fixed.unpack_from(mv, pos)
    if times:
        fields = []
        j = 0
        for i in range(len(raw) - len(times)):
            if i in times:
                sec, ns = raw[j], raw[j + 1]
                if ns >= _NS:
                    raise RecordError(f"record at offset {pos - _HEADER.size}: bad nanoseconds")
                fields.append(sec * _NS + ns)
                j += 2
            else:
                fields.append(raw[j])
                j += 1
    else:
        fields = list(raw)
    p = pos + fixed.size
    for _ in range(nbytes):
        if p + 4 > body_end:
            raise RecordError(f"record at offset {pos - _HEADER.size} too short")
        (n,) = _LEN.unpack_from(mv, p)
        p += 4
        if p + n > body_end:
            raise RecordError(f"record at offset {pos - _HEADER.size} field runs past its end")
        fields.append(bytes(mv[p:p + n]))
        p += n
    if p != body_end:
        raise RecordError(f"record at offset {pos - _HEADER.size} has trailing bytes")
    return cls._make(fields), body_end
