"""Retained checkpoints: reverse increments over the shadow (rdiff-backup's choice).

The shadow's tree/ is the newest full copy (the mirror).  Before the updater
applies batch N+1, this module writes into ``SHADOW/history/N.rev`` what the
batch is about to destroy, so that checkpoint N can be rebuilt from the
mirror: checkpoint K < latest is the mirror with ``(L-1).rev`` … ``K.rev``
applied virtually (fusejournal/history_view.py).

**What a reverse batch holds** (the *rev records*, all naming objects by
their inode number in the shadow, the *sino*, which no other object can take
while history holds the object):

* ``Entry``: directory ``dir_sino`` had, at checkpoint N, the name ``name``
  for the object ``child_sino`` (0: no such name), with how to find that
  object later: a non-directory's inode key, a directory's path at that
  moment (translated forward through the renames that follow);
* ``Attr``: an object's mode, owner, rdev, size, times and xattrs at N;
* ``Data`` / ``Hole``: the old bytes (or hole) of a range a write or a
  truncate overwrites;
* ``Move``: a rename, in batch order (``pos``: the index of the record), to
  find directories that moved after a rev named them.

Only the first Entry per (dir, name) and the first Attr per object in a
rev count; ``Data``/``Hole`` are undone in reverse order, so the first
pre-image of a byte wins too.  That makes capturing a record twice (a
record applied again after a kill) harmless.

**Objects removed from tree/** are not copied: the last hidden link
(``inodes/<key>``) of a non-directory that loses its last name is *moved*
to ``history/N.held/<sino>``; a removed (empty) directory is renamed there
instead of being removed.  Pruning checkpoint N deletes ``N.rev`` and
``N.held/``: objects removed by batch N+1 exist in no later checkpoint.

**File format** (docs/format.md): a sequence of frames, each a 24-byte
header (magic ``FJRV``, type, payload length, crc32 of the payload, crc32 of
the header) and a payload: type 0 META (json: checkpoint, time, label of
checkpoint N, the tree's identity), type 1 RECORDS (one lz4 frame, see
compression.py, of encoded rev records), type 2 END (json: record count).
A rev without END is incomplete and never used.

**Durability, in order with staging's cursor** (:class:`HistoryWriter`):

1. The updater creates the staging cursor (durably), then :meth:`begin`
   creates ``N.rev.tmp`` (a new batch) or reopens it, dropping a torn last
   frame (a resumed batch).
2. Before a record is applied, its pre-images are in the file: :meth:`capture`
   reads them and appends them as one frame, or :meth:`capture_run` does it
   for a run of consecutive writes and creations before the first of them is
   applied (write(2), no fsync: a killed updater loses nothing the page cache
   holds; a power loss makes the updater refuse the batch anyway, see
   staging.py).  A resumed batch captures again from the cursor: what it
   keeps again comes later in the rev and loses to the first.
3. After the batch, :meth:`finish` appends END, fsyncs, renames
   ``N.rev.tmp`` to ``N.rev`` and fsyncs history/; then ``marker.json``
   (the new checkpoint's marker); then the updater's ``set_applied``.
4. A resumed batch whose ``N.rev.tmp`` is gone although records were
   applied (a shadow from a version without history) cannot be undone:
   ``N.rev`` is not written and every older rev is deleted (the chain is
   cut there, and says so in the log).

Failure: every error is an OSError raised to the updater, which handles it
as it handles a failed record (ENOSPC: wait and resume at the cursor).
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import re
import shutil
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from . import layout
from .checksum import crc32
from .compression import CompressionError, compress, decompress
from .faults import armed, fault
from .records import (
    ATTR_SIZE,
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
from .treewalk import O_DIR, O_PATH, ParentCache, fd_cache_size, read_xattrs

log = logging.getLogger(__name__)

REV_FORMAT = 1

# ------------------------------------------------------------------ rev records


class Entry(NamedTuple):
    """At checkpoint N, directory ``dir_sino`` had ``name`` -> ``child_sino`` (0: absent)."""
    dir_sino: int
    child_sino: int
    kind: int          # S_IFMT of the child (0: absent)
    key: int           # a non-directory child's inode key (0: unknown, then it is held)
    pos: int           # index of the record in batch N+1 this was captured before
    name: bytes
    dir_path: bytes    # the directory's path in tree/ at that moment
    path: bytes        # the child's path at that moment (b"" when absent)


class Attr(NamedTuple):
    """An object's attributes at checkpoint N (``xattrs``: :func:`encode_xattrs`)."""
    sino: int
    mode: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    xattrs: bytes


class Data(NamedTuple):
    sino: int
    offset: int
    data: bytes


class Hole(NamedTuple):
    sino: int
    offset: int
    length: int


class Move(NamedTuple):
    """A rename in batch N+1 (record ``pos``), to follow directories forward."""
    flags: int
    pos: int
    old: bytes
    new: bytes


RevRecord = Entry | Attr | Data | Hole | Move

# opcode -> (class, struct of the integer fields, number of trailing bytes fields)
_FORMATS: dict[int, tuple[type, str, int]] = {
    1: (Entry, "QQIQQ", 3),
    2: (Attr, "QIIIQQqIqI", 1),      # times as i64 seconds + u32 nanoseconds (as records.py)
    3: (Data, "QQ", 1),
    4: (Hole, "QQQ", 0),
    5: (Move, "IQ", 2),
}
_SPEC = {op: (cls, struct.Struct("<" + fmt), n) for op, (cls, fmt, n) in _FORMATS.items()}
_OPCODE = {cls: op for op, (cls, _, _) in _SPEC.items()}
_TIME_FIELDS: dict[type, tuple[int, ...]] = {Attr: (6, 7)}
_NS = 1_000_000_000
_HEAD = struct.Struct("<BI")
_LEN = struct.Struct("<I")
_DATA = _SPEC[3][1]
_DATA_FIXED = _DATA.size + _LEN.size
_U64 = (1 << 64) - 1


class HistoryError(ValueError):
    """A reverse batch that cannot be read (damaged, truncated, from a newer format)."""


def encode(records: Iterable[RevRecord]) -> bytes:
    parts: list[bytes] = []
    for rec in records:
        if type(rec) is Data and 0 <= rec.sino <= _U64 and 0 <= rec.offset <= _U64:   # the bulk
            parts += [_HEAD.pack(3, _DATA_FIXED + len(rec.data)), _DATA.pack(rec.sino, rec.offset),
                      _LEN.pack(len(rec.data)), rec.data]
            continue
        op = _OPCODE[type(rec)]
        _, fixed, nb = _SPEC[op]
        ints, tail = rec[:len(rec) - nb], rec[len(rec) - nb:]
        times = _TIME_FIELDS.get(type(rec), ())
        flat: list[int] = []
        for i, v in enumerate(ints):
            assert isinstance(v, int)
            flat.extend(divmod(v, _NS) if i in times else (v,))
        try:
            body = [fixed.pack(*flat)]
        except struct.error as e:
            raise HistoryError(f"{type(rec).__name__} has a field out of range: {ints} ({e})") from None
        for b in tail:
            assert isinstance(b, bytes)
            body.append(_LEN.pack(len(b)))
            body.append(b)
        raw = b"".join(body)
        parts.append(_HEAD.pack(op, len(raw)))
        parts.append(raw)
    return b"".join(parts)


def decode(buf: bytes) -> Iterator[tuple[RevRecord, int]]:
    """Yield (record, offset of its last bytes field in ``buf``) for encoded rev records."""
    pos, end = 0, len(buf)
    while pos < end:
        if end - pos < _HEAD.size:
            raise HistoryError(f"truncated rev record header at {pos}")
        op, n = _HEAD.unpack_from(buf, pos)
        spec = _SPEC.get(op)
        if spec is None:
            raise HistoryError(f"unknown rev record type {op} at {pos}")
        pos += _HEAD.size
        body_end = pos + n
        cls, fixed, nb = spec
        if body_end > end or fixed.size > n:
            raise HistoryError(f"rev record at {pos - _HEAD.size} runs past its end")
        raw = fixed.unpack_from(buf, pos)
        times = _TIME_FIELDS.get(cls, ())
        fields: list[object] = []
        j = 0
        while j < len(raw):
            if len(fields) in times:
                if raw[j + 1] >= _NS:
                    raise HistoryError(f"rev record at {pos - _HEAD.size}: bad nanoseconds")
                fields.append(raw[j] * _NS + raw[j + 1])
                j += 2
            else:
                fields.append(raw[j])
                j += 1
        p = pos + fixed.size
        last = p
        for _ in range(nb):
            if p + 4 > body_end:
                raise HistoryError(f"rev record at {pos - _HEAD.size} too short")
            (k,) = _LEN.unpack_from(buf, p)
            p += 4
            if p + k > body_end:
                raise HistoryError(f"rev record at {pos - _HEAD.size}: a field runs past its end")
            last = p
            fields.append(buf[p:p + k])
            p += k
        if p != body_end:
            raise HistoryError(f"rev record at {pos - _HEAD.size} has trailing bytes")
        pos = body_end
        yield cast(Any, cls)._make(fields), last


def encode_xattrs(attrs: dict[str, bytes]) -> bytes:
    out = []
    for k in sorted(attrs):
        kb = os.fsencode(k)
        out += [_LEN.pack(len(kb)), kb, _LEN.pack(len(attrs[k])), attrs[k]]
    return b"".join(out)


def decode_xattrs(buf: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    p = 0
    while p < len(buf):
        (k,) = _LEN.unpack_from(buf, p)
        name = buf[p + 4:p + 4 + k]
        p += 4 + k
        (v,) = _LEN.unpack_from(buf, p)
        out[name] = buf[p + 4:p + 4 + v]
        p += 4 + v
    return out


# ------------------------------------------------------------------ frames

FRAME_MAGIC = b"FJRV"
_FRAME = struct.Struct("<4sB3xQII")          # magic, type, payload length, payload crc32, header crc32
FRAME_META = 0
FRAME_RECORDS = 1
FRAME_END = 2


def frame(kind: int, payload: bytes) -> bytes:
    head = struct.pack("<4sB3xQI", FRAME_MAGIC, kind, len(payload), crc32(payload))
    return head + struct.pack("<I", crc32(head)) + payload


@dataclass
class Frame:
    kind: int
    offset: int        # of the payload in the file
    payload: bytes


def read_frames(data: bytes) -> tuple[list[Frame], int, str | None]:
    """(whole frames, bytes they span, why the rest is not a frame or None)."""
    out: list[Frame] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _FRAME.size:
            return out, pos, f"a torn frame header at {pos}"
        magic, kind, n, pcrc, hcrc = _FRAME.unpack_from(data, pos)
        if magic != FRAME_MAGIC or crc32(data[pos:pos + _FRAME.size - 4]) != hcrc:
            return out, pos, f"a damaged frame header at {pos}"
        if pos + _FRAME.size + n > len(data):
            return out, pos, f"a torn frame at {pos}"
        payload = data[pos + _FRAME.size:pos + _FRAME.size + n]
        if crc32(payload) != pcrc:
            return out, pos, f"a frame at {pos} fails its checksum"
        out.append(Frame(kind, pos + _FRAME.size, payload))
        pos += _FRAME.size + n
    return out, pos, None


_SCAN_CHUNK = 1 << 20


def scan_frames(fd: int) -> Iterator[Frame]:
    """The frames of the file ``fd`` in order, read in chunks (never the whole file at once,
    read_frames' checks); HistoryError at the first torn or damaged one."""
    buf, bpos, pos = b"", 0, 0                # buf holds the file's bytes from bpos
    while True:
        i = pos - bpos
        if len(buf) - i < _FRAME.size:
            more = os.pread(fd, _SCAN_CHUNK, bpos + len(buf))
            if not more:
                if len(buf) == i:
                    return
                raise HistoryError(f"a torn frame header at {pos}")
            buf, bpos = buf[i:] + more, pos
            continue
        magic, kind, n, pcrc, hcrc = _FRAME.unpack_from(buf, i)
        if magic != FRAME_MAGIC or crc32(buf[i:i + _FRAME.size - 4]) != hcrc:
            raise HistoryError(f"a damaged frame header at {pos}")
        start = pos + _FRAME.size
        if len(buf) - i >= _FRAME.size + n:
            payload = buf[i + _FRAME.size:i + _FRAME.size + n]
        else:
            payload = os.pread(fd, n, start)    # past the buffer: read it whole, once
            buf, bpos = b"", start + n
        if len(payload) != n:
            raise HistoryError(f"a torn frame at {pos}")
        if crc32(payload) != pcrc:
            raise HistoryError(f"a frame at {pos} fails its checksum")
        yield Frame(kind, start, payload)
        pos = start + n


def read_frame_at(fd: int, offset: int, length: int) -> bytes:
    """The payload of the frame whose payload :func:`scan_frames` found at ``offset``
    (``length`` bytes), checked again; HistoryError if it is not (any more) that frame."""
    head = os.pread(fd, _FRAME.size + length, offset - _FRAME.size) if offset >= _FRAME.size else b""
    if len(head) != _FRAME.size + length:
        raise HistoryError(f"the frame at {offset - _FRAME.size} is cut short")
    magic, _kind, n, pcrc, hcrc = _FRAME.unpack_from(head, 0)
    if magic != FRAME_MAGIC or crc32(head[:_FRAME.size - 4]) != hcrc or n != length:
        raise HistoryError(f"a damaged frame header at {offset - _FRAME.size}")
    payload = head[_FRAME.size:]
    if crc32(payload) != pcrc:
        raise HistoryError(f"the frame at {offset - _FRAME.size} fails its checksum")
    return payload


@dataclass
class RevFile:
    """A parsed, complete reverse batch."""
    checkpoint: int
    meta: dict[str, object]
    records: list[tuple[RevRecord, int, int]]   # (record, frame number, offset of its bytes in the frame)
    frames: list[bytes]                         # decompressed RECORDS payloads


def parse_rev(data: bytes, *, keep_data: bool = True) -> RevFile:
    """Check and decode a whole .rev file; HistoryError if damaged or incomplete."""
    frames, _, why = read_frames(data)
    if why is not None:
        raise HistoryError(f"damaged: {why}")
    if not frames or frames[0].kind != FRAME_META:
        raise HistoryError("no META frame")
    if frames[-1].kind != FRAME_END:
        raise HistoryError("incomplete (no END frame)")
    try:
        meta = json.loads(frames[0].payload)
        end = json.loads(frames[-1].payload)
    except ValueError as e:
        raise HistoryError(f"bad META/END: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != REV_FORMAT or type(meta.get("checkpoint")) is not int:
        raise HistoryError(f"unknown META {meta!r}")
    recs: list[tuple[RevRecord, int, int]] = []
    payloads: list[bytes] = []
    for f in frames[1:-1]:
        if f.kind != FRAME_RECORDS:
            raise HistoryError(f"unexpected frame type {f.kind}")
        try:
            raw = decompress(f.payload)
        except CompressionError as e:
            raise HistoryError(str(e)) from None
        fno = len(payloads)
        payloads.append(raw if keep_data else b"")
        for rec, off in decode(raw):
            if type(rec) is Data and not keep_data:
                rec = Data(rec.sino, rec.offset, b"")
            recs.append((rec, fno, off))
    if not isinstance(end, dict) or end.get("records") != len(recs):
        raise HistoryError(f"END says {end!r}, the frames hold {len(recs)} records")
    return RevFile(meta["checkpoint"], meta, recs, payloads)


# ------------------------------------------------------------------ names and listing

_REV_RE = re.compile(r"^(\d{1,19})" + re.escape(layout.HISTORY_REV_SUFFIX) + "$")


def rev_name(n: int) -> str:
    return f"{n}{layout.HISTORY_REV_SUFFIX}"


def held_name(n: int) -> str:
    return f"{n}{layout.HISTORY_HELD_SUFFIX}"


def rev_ids(history_fd: int) -> list[int]:
    """Checkpoint ids of the complete .rev files in history/ (ascending)."""
    out = []
    for name in os.listdir(history_fd):
        m = _REV_RE.match(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def chain(history_fd: int, tree: list[int], applied: int,
          down_to: int | None = None) -> list[tuple[int, dict[str, object]]]:
    """The usable reverse batches, oldest first: the rev whose ``next`` is ``applied``, the
    one whose ``next`` is that rev's checkpoint, and so on (a missing, damaged or foreign
    rev ends the chain; of several revs naming the same ``next``, the highest counts).

    The revs' METAs are read newest first and only as far as needed: with ``down_to``
    the chain stops at the first rev at or below it (browsing or restoring checkpoint K
    reads the METAs of the revs from K on, not of every retained one)."""
    by_next: dict[int, tuple[int, dict[str, object]]] = {}
    unread = iter(rev_ids(history_fd)[::-1])
    out = []
    cur = applied
    while True:
        if cur not in by_next:
            for n in unread:            # newest first: the first rev naming cur is the highest
                meta = read_meta(history_fd, n)
                if meta is not None and meta.get("tree") == tree and type(meta.get("next")) is int:
                    by_next.setdefault(_int(meta.get("next")), (n, meta))
                    if meta.get("next") == cur:
                        break
        if cur not in by_next:
            break
        n, meta = by_next.pop(cur)
        if n >= cur:
            break
        out.append((n, meta))
        cur = n
        if down_to is not None and cur <= down_to:
            break
    return out[::-1]


class Checkpoint(NamedTuple):
    id: int
    time_ns: int
    label: str


def _open_history(shadow_root: str | os.PathLike[str], create: bool) -> int | None:
    root = os.open(shadow_root, O_DIR)
    try:
        if create:
            try:
                os.mkdir(layout.SHADOW_HISTORY, layout.PRIVATE_DIR_MODE, dir_fd=root)
            except FileExistsError:
                pass
        try:
            return os.open(layout.SHADOW_HISTORY, O_DIR, dir_fd=root)
        except FileNotFoundError:
            return None
    finally:
        os.close(root)


def read_json_at(dir_fd: int, name: str) -> dict[str, object] | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            doc = json.loads(f.read())
    except ValueError:
        return None
    finally:
        os.close(fd)
    return doc if isinstance(doc, dict) else None


def read_json_at_path(root: str, name: str) -> dict[str, object]:
    fd = os.open(root, O_DIR)
    try:
        return read_json_at(fd, name) or {}
    finally:
        os.close(fd)


def read_meta(history_fd: int, n: int) -> dict[str, object] | None:
    """The META of N.rev (its first frame only), or None if unreadable."""
    try:
        fd = os.open(rev_name(n), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=history_fd)
    except FileNotFoundError:
        return None
    try:
        head = os.pread(fd, _FRAME.size, 0)
        if len(head) < _FRAME.size:
            return None
        magic, kind, length, pcrc, hcrc = _FRAME.unpack(head)
        if magic != FRAME_MAGIC or kind != FRAME_META or crc32(head[:-4]) != hcrc or length > 1 << 20:
            return None
        payload = os.pread(fd, length, _FRAME.size)
        if crc32(payload) != pcrc:
            return None
        doc = json.loads(payload)
        return doc if isinstance(doc, dict) else None
    except ValueError:
        return None
    finally:
        os.close(fd)


def tree_identity(shadow_root: str | os.PathLike[str]) -> list[int]:
    st = os.stat(os.path.join(shadow_root, layout.SHADOW_TREE), follow_symlinks=False)
    return [st.st_dev, st.st_ino]


def retained(shadow_root: str | os.PathLike[str], applied: int, down_to: int | None = None) -> list[Checkpoint]:
    """Every checkpoint that can be browsed or restored, oldest first (the last is ``applied``);
    with ``down_to``, only those from the first at or below it on (:func:`chain`)."""
    hfd = _open_history(shadow_root, create=False)
    adoc = read_json_at_path(os.fspath(shadow_root), layout.SHADOW_APPLIED)
    latest = Checkpoint(applied, _int(adoc.get("time_ns")), "")
    if hfd is None:
        return [latest]
    try:
        marker = read_json_at(hfd, layout.HISTORY_MARKER) or {}
        if marker.get("checkpoint") == applied:
            latest = Checkpoint(applied, _int(marker.get("time_ns")), str(marker.get("label", "")))
        out = [Checkpoint(n, _int(meta.get("time_ns")), str(meta.get("label", "")))
               for n, meta in chain(hfd, tree_identity(shadow_root), applied, down_to)]
        return out + [latest]
    finally:
        os.close(hfd)


def _int(v: object) -> int:
    return v if type(v) is int else 0


# ------------------------------------------------------------------ pruning

@dataclass(frozen=True)
class Policy:
    """Which checkpoints to keep (the latest always is): the last ``keep_last``,
    and only those younger than ``keep_within`` seconds; None: no such limit."""
    keep_last: int | None = 24
    keep_within: float | None = None

    def drop(self, cps: list[Checkpoint], now_ns: int) -> list[int]:
        """Ids to prune, oldest first (always a prefix of ``cps``, never the last)."""
        keep = len(cps)
        if self.keep_last is not None:
            keep = min(keep, max(self.keep_last, 1))
        if self.keep_within is not None:
            limit = now_ns - int(self.keep_within * 1e9)
            young = sum(1 for c in cps if c.time_ns >= limit)
            keep = min(keep, max(young, 1))
        return [c.id for c in cps[:len(cps) - keep]]


DEFAULT_POLICY = Policy()


def retention_policy(keep_last: int | None, keep_within: float | None,
                     group: tuple[str, str] | list[str] | None = None) -> Policy:
    """The policy of a mount: the default (last 24) when neither limit is given.  ``group``
    = (group file, member name): a consistency group member's, decided on the group
    checkpoints so that every member keeps the same ones (groupretention.GroupRetention)."""
    if group is not None:
        from .groupretention import group_retention
        base = retention_policy(keep_last, keep_within)
        return group_retention(str(group[0]), str(group[1]), base.keep_last, base.keep_within)
    if keep_last is None and keep_within is None:
        return DEFAULT_POLICY
    return Policy(keep_last=keep_last, keep_within=keep_within)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``2w`` -> seconds; ValueError otherwise."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 24h, 7d, 2w)")
    v = float(m.group(1)) * _UNITS[m.group(2)]
    if v <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return v


def prune_ids(history_fd: int, ids: list[int]) -> None:
    """Delete N.rev, then N.held/, for each id, oldest first (a crash leaves a suffix)."""
    for n in sorted(ids):
        fault("history.prune")
        try:
            os.unlink(rev_name(n), dir_fd=history_fd)
        except FileNotFoundError:
            pass
        _rmtree_at(history_fd, held_name(n))
    if ids:
        os.fsync(history_fd)


def _rmtree_at(dir_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        # held directories are made private before the walk (their modes are the original's)
        _make_removable(dir_fd, name)
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _make_removable(dir_fd: int, name: str) -> None:
    fd = os.open(name, O_DIR, dir_fd=dir_fd)
    try:
        os.fchmod(fd, layout.PRIVATE_DIR_MODE)
        for sub in os.listdir(fd):
            st = os.stat(sub, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _make_removable(fd, sub)
    finally:
        os.close(fd)


def prune(shadow_root: str | os.PathLike[str], applied: int, policy: Policy,
          now_ns: int | None = None) -> list[int]:
    """Apply ``policy`` to the shadow's history; also delete revs outside the usable chain.
    The caller excludes the updater and browse requests (browsegate.UpdaterSide).
    Returns the checkpoint ids pruned."""
    hfd = _open_history(shadow_root, create=False)
    if hfd is None:
        return []
    try:
        cps = retained(shadow_root, applied)
        drop = policy.drop(cps, time.time_ns() if now_ns is None else now_ns)
        kept = {c.id for c in cps[:-1]} - set(drop)
        prune_ids(hfd, sorted(set(drop) | {n for n in rev_ids(hfd) if n not in kept}))
        for name in os.listdir(hfd):                 # held objects of revs that are gone
            if name.endswith(layout.HISTORY_HELD_SUFFIX):
                n_s = name[:-len(layout.HISTORY_HELD_SUFFIX)]
                if n_s.isdigit() and int(n_s) not in kept and int(n_s) < applied:  # not a batch's in progress
                    _rmtree_at(hfd, name)
        return drop
    finally:
        os.close(hfd)


# ------------------------------------------------------------------ writing (the updater's side)

_FLUSH_BYTES = 1 << 20          # a frame ends past this (a reader decompresses one per pre-image it needs)
#: the records :meth:`HistoryWriter.capture_run` captures together
RUN_TYPES = (Write, Mknod, Symlink, Mkdir, Link)
_FD_CACHE = 16
_READ_CHUNK = 256 << 10


class HistoryWriter:
    """Writes the reverse batch of each checkpoint the updater applies (steps 1-4 above).

    One per Updater; calls come from the updater's thread only.
    """

    def __init__(self, shadow_root: str | os.PathLike[str], policy: Policy = DEFAULT_POLICY) -> None:
        self.root = os.fspath(shadow_root)
        self.policy = policy
        #: "now" for the retention policy (a test gives its own clock)
        self.clock: Callable[[], int] = time.time_ns
        self.n = -1                          # the rev being written: checkpoint n (batch n + 1)
        self.fd = -1
        self.hfd = -1
        self.tree_fd = self.inodes_fd = -1
        self.held_fd = -1
        self.done = False                    # N.rev was already complete (resumed after finish)
        self.broken = False
        self.buf: list[RevRecord] = []
        self.buf_bytes = 0
        self.count = 0
        self.pos = 0
        self.seen_entries: set[tuple[int, bytes]] = set()
        self.seen_attrs: set[int] = set()
        self.covered: dict[int, _Spans] = {}
        self.sizes: dict[int, int] = {}          # inode key -> its size now (this batch, regular files)
        self.known: dict[int, tuple[int, int]] = {}     # inode key -> (sino, block size), this batch
        self.created: set[int] = set()           # inode keys of objects created in this batch
        self.rfds: OrderedDict[int, int] = OrderedDict()    # inode key -> fd for reading pre-images
        self._rfd_max = fd_cache_size(_FD_CACHE)            # fewer under a low open-file limit
        self.walk: ParentCache | None = None     # parents of paths in tree/ (_resolve)
        self.root_sino = 0
        self.applied_time = 0

    # -------------------------------------------------------------- batch

    def begin(self, checkpoint: int, resumed: bool, start: int) -> None:
        """Open the rev of ``checkpoint - 1`` for batch ``checkpoint`` (step 1)."""
        self.close()
        adoc = read_json_at_path(self.root, layout.SHADOW_APPLIED)
        applied = adoc.get("applied")
        self.applied_time = _int(adoc.get("time_ns"))     # when the shadow reached it (the seed's time)
        n = applied if type(applied) is int and applied < checkpoint else checkpoint - 1
        self.n = n
        self.next = checkpoint
        self.done = self.broken = False
        self.buf, self.buf_bytes, self.count = [], 0, 0
        self.seen_entries, self.seen_attrs, self.covered = set(), set(), {}
        self.sizes, self.known, self.created = {}, {}, set()
        hfd = _open_history(self.root, create=True)
        assert hfd is not None
        self.hfd = hfd
        rfd = os.open(self.root, O_DIR)
        try:
            self.tree_fd = os.open(layout.SHADOW_TREE, O_DIR, dir_fd=rfd)
            self.inodes_fd = os.open(layout.SHADOW_INODES, O_DIR, dir_fd=rfd)
        finally:
            os.close(rfd)
        self.root_sino = os.fstat(self.tree_fd).st_ino
        self.walk = ParentCache(self.tree_fd)
        tmp = rev_name(n) + layout.TMP_SUFFIX
        if not resumed:
            self._check_marker(n)
        if resumed:
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=hfd)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read()
                frames, good, why = read_frames(data)
                if why is not None:
                    log.info("history: %s in %s: cut there (the updater was killed writing it)", why, tmp)
                    os.ftruncate(fd, good)
                if frames and frames[-1].kind == FRAME_END:     # killed before the rename: reopen it
                    os.ftruncate(fd, frames[-1].offset - _FRAME.size)
                    frames.pop()
                if not frames or frames[0].kind != FRAME_META:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, self._meta_frame(n), 0)
                else:
                    for fr in frames[1:]:
                        if fr.kind == FRAME_RECORDS:
                            self.count += sum(1 for _ in decode(decompress(fr.payload)))
                os.lseek(fd, 0, os.SEEK_END)
                self.fd = fd
                return
            if os.path.lexists(os.path.join(self.root, layout.SHADOW_HISTORY, rev_name(n))):
                self.done = True            # finished before the kill: only set_applied was missing
                return
            if start > 0:
                self.broken = True
                log.warning("history: batch %d was half-applied without its reverse batch (a shadow "
                            "from a version without history?): checkpoints before %d are not retained",
                            checkpoint, checkpoint)
                return
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     layout.PRIVATE_FILE_MODE, dir_fd=hfd)
        self.fd = fd
        os.write(fd, self._meta_frame(n))

    def _check_marker(self, n: int) -> None:
        """A history not ending at ``n`` (re-seeded shadow, shadow moved by hand) is dropped."""
        marker = read_json_at(self.hfd, layout.HISTORY_MARKER)
        ident = tree_identity(self.root)
        if marker is not None and marker.get("checkpoint") == n and marker.get("tree") == ident:
            return
        old = rev_ids(self.hfd)
        if old:
            log.warning("history: it does not end at checkpoint %d (the shadow was re-seeded or "
                        "changed): dropping %d retained checkpoint(s)", n, len(old))
            prune_ids(self.hfd, old)

    def _meta_frame(self, n: int) -> bytes:
        marker = read_json_at(self.hfd, layout.HISTORY_MARKER) or {}
        if marker.get("checkpoint") != n:
            marker = {"time_ns": self.applied_time}     # no marker (the seed, checkpoint 0)
        meta = {"format": REV_FORMAT, "checkpoint": n, "next": self.next, "time_ns": _int(marker.get("time_ns")),
                "label": str(marker.get("label", "")), "tree": tree_identity(self.root),
                "root_sino": self.root_sino}
        return frame(FRAME_META, json.dumps(meta).encode())

    def finish(self, checkpoint: int, time_ns: int, label: str) -> None:
        """END, fsync, rename to N.rev, fsync history/; then marker.json says ``checkpoint``
        (its time and label: the META of the next rev).  Step 3, before set_applied."""
        hfd = self.hfd
        if hfd < 0:
            return
        if self.broken:
            prune_ids(hfd, [k for k in rev_ids(hfd) if k < self.n])
        elif not self.done:
            self._flush()
            os.write(self.fd, frame(FRAME_END, json.dumps({"records": self.count}).encode()))
            os.fsync(self.fd)
            fault("history.before_rename")
            os.rename(rev_name(self.n) + layout.TMP_SUFFIX, rev_name(self.n), src_dir_fd=hfd, dst_dir_fd=hfd)
            os.fsync(hfd)
            self.done = True
        data = json.dumps({"checkpoint": checkpoint, "time_ns": time_ns, "label": label,
                           "tree": tree_identity(self.root)}).encode()
        tmp = layout.HISTORY_MARKER + layout.TMP_SUFFIX
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     layout.PRIVATE_FILE_MODE, dir_fd=self.hfd)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, layout.HISTORY_MARKER, src_dir_fd=self.hfd, dst_dir_fd=self.hfd)
        os.fsync(self.hfd)
        self.close()

    def retain(self, applied: int) -> None:
        """Apply the retention policy (after set_applied)."""
        dropped = prune(self.root, applied, self.policy, self.clock())
        if dropped:
            log.info("history: pruned checkpoint(s) %s (%s)", _ranges(dropped), self.policy)

    def close(self) -> None:
        for rfd in self.rfds.values():
            os.close(rfd)
        self.rfds.clear()
        if self.walk is not None:
            self.walk.close()
            self.walk = None
        for name in ("fd", "hfd", "tree_fd", "inodes_fd", "held_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    @property
    def active(self) -> bool:
        return self.fd >= 0 and not self.done

    # -------------------------------------------------------------- capture (step 2)

    def capture(self, rec: Record, index: int) -> None:
        """Write the pre-images of ``rec`` (about to be applied) as one frame."""
        if not self.active:
            return
        self.pos = index
        try:
            if isinstance(rec, Write):
                self._writes([rec])     # (capture_run takes consecutive writes together)
            elif isinstance(rec, Setattr):
                self.sizes.pop(rec.ino, None)
                if rec.ino in self.created:
                    return
                if rec.ino:
                    st = self._attr_key(rec.ino)
                    if st is not None and stat.S_ISREG(st.st_mode) and rec.mask & ATTR_SIZE \
                            and rec.size < st.st_size:
                        fd = self._read_fd(rec.ino, st.st_ino)
                        if fd is not None:
                            self._data(fd, st.st_ino, max(st.st_blksize, 512), st.st_size,
                                       [(rec.size, st.st_size)])
                else:
                    self._attr_path(rec.path)
            elif isinstance(rec, (Setxattr, Removexattr)):
                if rec.ino in self.created:
                    return
                if rec.ino:
                    self._attr_key(rec.ino)
                else:
                    self._attr_path(rec.path)
            elif isinstance(rec, (Mknod, Symlink, Mkdir, Link)):
                if isinstance(rec, (Mknod, Symlink)):
                    self._forget_key(rec.ino)       # an inode key may be reused: a new object
                    self.created.add(rec.ino)
                self._entry(rec.path, 0)
            elif isinstance(rec, Unlink):
                self._entry(rec.path, rec.ino)
            elif isinstance(rec, Rmdir):
                self._entry(rec.path, 0, hold_dir=True)
            elif isinstance(rec, Rename):
                self._rename(rec)
        except _Unreachable:
            pass                    # the updater fails on it, with its own message
        finally:
            if isinstance(rec, (Rename, Rmdir)) and self.walk is not None:
                self.walk.forget()  # a directory moves or goes (held, or by the updater)
        self._flush()

    def capture_run(self, run: Sequence[tuple[int, Record]]) -> int:
        """Write the pre-images of the first records of ``run`` (consecutive records of
        the batch, none of them applied yet) as one frame (more past ``_FLUSH_BYTES``);
        return how many were captured (at least one): the caller applies those, then
        calls again for the rest.

        Only records whose capture cannot depend on an earlier record of the run being
        applied are captured together (:data:`RUN_TYPES`: writes and creations, which
        move or remove nothing; anything else is captured alone, by :meth:`capture`).
        Read before any of them is applied, every pre-image is the first of the batch
        (or one already kept, then skipped).  A creation whose parent does not exist
        yet (made by an earlier record of the run) ends the run before it.  The ranges
        a run of writes overwrites in one object are merged and read with one SEEK_DATA
        walk and one pread per span (in pieces of at most 256 KiB)."""
        first = run[0][1]
        if not isinstance(first, RUN_TYPES):
            self.capture(first, run[0][0])
            return 1
        if not self.active:
            return len(run)
        writes: list[Write] = []
        n = 0
        for n, (index, rec) in enumerate(run):
            if not isinstance(rec, RUN_TYPES):
                break
            self.pos = index
            if isinstance(rec, Write):
                writes.append(rec)
                continue
            if writes:
                self._writes(writes)
                writes = []
            if isinstance(rec, (Mknod, Symlink)):
                self._forget_key(rec.ino)       # an inode key may be reused: a new object
                self.created.add(rec.ino)
            try:
                self._entry(rec.path, 0)
            except _Unreachable:        # (nothing of it kept yet)
                n = max(n, 1)           # first: the updater fails on it, with its own message
                break                   # else it is captured again after the records before it
        else:
            n = len(run)
        if writes:
            self._writes(writes)
        self._flush()
        return n

    def _writes(self, writes: list[Write]) -> None:
        by_ino: dict[int, list[tuple[int, int]]] = {}
        for w in writes:
            if w.ino not in self.created:       # created in this batch: nothing of it existed at N
                by_ino.setdefault(w.ino, []).append((w.offset, w.offset + len(w.data)))
        for ino, ranges in by_ino.items():
            ranges = _merged(ranges)
            size = self.sizes.get(ino)
            top = ranges[-1][1]
            if size is not None and ranges[0][0] >= size:
                self.sizes[ino] = max(size, top)     # appends to a file already seen: nothing to keep
                continue
            known = self.known.get(ino)
            if known is None:
                st = self._attr_key(ino)
                if st is None or not stat.S_ISREG(st.st_mode):
                    continue
                known = self.known[ino] = (st.st_ino, max(st.st_blksize, 512))
                size = st.st_size
            fd = self._read_fd(ino, known[0])
            if fd is None:
                continue
            if size is None:
                size = os.fstat(fd).st_size
            self._data(fd, known[0], known[1], size, ranges)
            self.sizes[ino] = max(size, top)

    def _flush(self) -> None:
        if not self.buf:
            return
        payload = compress(encode(self.buf))
        data = frame(FRAME_RECORDS, payload)
        if armed("history.torn_frame"):
            os.write(self.fd, data[:len(data) // 2])     # a kill in the middle of a frame
            fault("history.torn_frame")
        self.count += len(self.buf)
        self.buf, self.buf_bytes = [], 0
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        fault("history.after_capture")

    def _add(self, rec: RevRecord, size: int = 64) -> None:
        self.buf.append(rec)
        self.buf_bytes += size
        if self.buf_bytes >= _FLUSH_BYTES:
            self._flush()

    # -------------------------------------------------------------- helpers

    def _resolve(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the parent directory, last name) of a non-root path: treewalk's walk
        (ParentCache, as the updater's), the fd borrowed from the cache, never closed.
        :meth:`capture` forgets the cache after a Rename or an Rmdir (a directory may
        move or go when it is applied)."""
        assert self.walk is not None
        try:
            return self.walk.parent(path)
        except OSError:
            raise _Unreachable() from None

    def _open_dir(self, path: bytes) -> int:
        if path == b"":
            return os.dup(self.tree_fd)
        pfd, name = self._resolve(path)
        try:
            return os.open(name, O_DIR, dir_fd=pfd)
        except OSError:
            raise _Unreachable() from None

    def _attr_of(self, st: os.stat_result, fd: int, is_path_fd: bool) -> None:
        if st.st_ino in self.seen_attrs:
            return
        self.seen_attrs.add(st.st_ino)
        xattrs = b""
        if not stat.S_ISLNK(st.st_mode):
            xattrs = encode_xattrs(read_xattrs(fd, is_path_fd))
        self._add(Attr(st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
                       st.st_atime_ns, st.st_mtime_ns, xattrs), 64 + len(xattrs))

    def _attr_at(self, dir_fd: int, name: bytes) -> os.stat_result | None:
        try:
            fd = os.open(name, O_PATH, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            self._attr_of(st, fd, True)
            return st
        finally:
            os.close(fd)

    def _attr_key(self, ino: int) -> os.stat_result | None:
        return self._attr_at(self.inodes_fd, str(ino).encode())

    def _attr_path(self, path: bytes) -> None:
        fd = self._open_dir(path)
        try:
            self._attr_of(os.fstat(fd), fd, False)
        finally:
            os.close(fd)

    def _read_fd(self, ino: int, sino: int) -> int | None:
        """A cached fd open for reading on inodes/<ino> (None if it is not the object ``sino``)."""
        fd = self.rfds.get(ino)
        if fd is not None:
            self.rfds.move_to_end(ino)
            return fd
        try:
            fd = os.open(str(ino), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.inodes_fd)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_ino != sino:
            os.close(fd)
            return None
        self.rfds[ino] = fd
        if len(self.rfds) > self._rfd_max:
            os.close(self.rfds.popitem(last=False)[1])
        return fd

    def _forget_key(self, ino: int) -> None:
        self.sizes.pop(ino, None)
        self.known.pop(ino, None)
        fd = self.rfds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def _data(self, fd: int, sino: int, bs: int, size: int, ranges: list[tuple[int, int]]) -> None:
        """Old bytes (holes as holes) of the ranges ``[offset, end)`` within ``size``, read
        from ``fd``; bytes already kept in this batch (``covered``) are skipped.

        A write allocates whole blocks: the holes of the blocks it touches (below the
        current size) are kept as holes too, even for a write past the end of the
        file, else they would come back as data."""
        cov = self.covered.get(sino)
        if cov is None:
            cov = self.covered[sino] = _Spans()
        want = _Spans()                         # the bytes to keep
        look: list[tuple[int, int]] = []        # where holes are kept: those bytes widened to blocks
        for offset, end in ranges:
            e = min(end, size)
            if offset < e:
                parts = cov.missing(offset, e)
                if not parts:
                    continue    # the first pre-image of these bytes is already kept
            else:
                parts = [(offset, offset)]      # past the end: only the holes of its block
            for a, b in parts:
                if a < b:
                    want.add(a, b)
                lo, hi = a - a % bs, min(-(-max(b, a + 1) // bs) * bs, size)
                if lo < hi:
                    look.append((lo, hi))
        if not look:
            return
        holes: _Spans | None = None
        # one SEEK_DATA/SEEK_HOLE walk over all of it (a file without holes: one data extent)
        for a, b, is_data in _extents(fd, min(lo for lo, _ in look), max(hi for _, hi in look)):
            if not is_data:
                if holes is None:
                    holes = _Spans()
                    for lo, hi in look:
                        holes.add(lo, hi)
                for p, q in holes.present(a, b):
                    self._add(Hole(sino, p, q - p))
                continue
            for p, q in want.present(a, b):
                while p < q:
                    chunk = os.pread(fd, min(_READ_CHUNK, q - p), p)
                    if not chunk:
                        break
                    self._add(Data(sino, p, chunk), 64 + len(chunk))
                    p += len(chunk)
        for a, b in want.spans():
            cov.add(a, b)       # (the widened holes around them may be kept again: harmless)

    def _key_of(self, st: os.stat_result, hint: int) -> int:
        """The inode key of the non-directory ``st`` (0 if it will be held, or unknown)."""
        if hint:
            try:
                k = os.stat(str(hint), dir_fd=self.inodes_fd, follow_symlinks=False)
                if k.st_ino == st.st_ino:
                    return hint
            except FileNotFoundError:
                pass
        if st.st_nlink <= 2:
            return 0                # its last name: the object moves to history when it goes
        with os.scandir(self.inodes_fd) as it:   # a hard-linked file losing one of its names (rare)
            for e in it:
                if e.inode() == st.st_ino:
                    return int(e.name)
        return 0

    def _entry(self, path: bytes, key: int, *, hold_dir: bool = False,
               pfd_name: tuple[int, bytes] | None = None) -> os.stat_result | None:
        """Record what ``path`` names now (before the record changes it)."""
        pfd, name = self._resolve(path) if pfd_name is None else pfd_name
        pst = os.fstat(pfd)
        self._attr_of(pst, pfd, True)      # pfd may be an O_PATH fd
        st = self._attr_at(pfd, name)
        dir_path = path.rpartition(b"/")[0]
        if (pst.st_ino, name) not in self.seen_entries:
            self.seen_entries.add((pst.st_ino, name))
            if st is None:
                self._add(Entry(pst.st_ino, 0, 0, 0, self.pos, name, dir_path, b""))
            elif stat.S_ISDIR(st.st_mode):
                self._add(Entry(pst.st_ino, st.st_ino, stat.S_IFDIR, 0, self.pos, name, dir_path, path))
            else:
                self._add(Entry(pst.st_ino, st.st_ino, stat.S_IFMT(st.st_mode), self._key_of(st, key),
                                self.pos, name, dir_path, path))
        if hold_dir and st is not None and stat.S_ISDIR(st.st_mode):
            self._flush()           # the pre-image is written before the directory moves
            self._hold_dir(pfd, name, st)
        return st

    def _rename(self, r: Rename) -> None:
        self._add(Move(r.flags, self.pos, r.old, r.new), 32 + len(r.old) + len(r.new))
        opfd, oname = self._resolve(r.old)
        npfd, nname = self._resolve(r.new)
        self._entry(r.old, r.ino, pfd_name=(opfd, oname))
        tst = self._entry(r.new, 0, pfd_name=(npfd, nname))
        if tst is not None and stat.S_ISDIR(tst.st_mode) and not r.flags & 2:
            try:
                sst = os.stat(oname, dir_fd=opfd, follow_symlinks=False)
            except FileNotFoundError:
                sst = None          # renamed already (a replay): tst is the source itself
            if sst is not None and sst.st_ino != tst.st_ino:
                self._flush()
                self._hold_dir(npfd, nname, tst)    # replaced by the rename: keep it

    # -------------------------------------------------------------- holding removed objects

    def _held(self) -> int:
        if self.held_fd < 0:
            name = held_name(self.n)
            try:
                os.mkdir(name, layout.PRIVATE_DIR_MODE, dir_fd=self.hfd)
            except FileExistsError:
                pass
            self.held_fd = os.open(name, O_DIR, dir_fd=self.hfd)
        return self.held_fd

    def _hold_dir(self, pfd: int, name: bytes, st: os.stat_result) -> None:
        os.rename(name, str(st.st_ino), src_dir_fd=pfd, dst_dir_fd=self._held())
        fault("history.after_hold")

    def hold_key(self, inodes_fd: int, key: str, st: os.stat_result) -> bool:
        """Keep the object whose last link ``inodes/<key>`` the updater is about to drop:
        move that link to ``N.held/<sino>``.  False when no rev is being written."""
        if not self.active:
            return False
        held = self._held()
        name = str(st.st_ino)
        try:
            os.rename(key, name, src_dir_fd=inodes_fd, dst_dir_fd=held)
        except FileNotFoundError:
            return True
        try:                        # both names one inode: rename left both (a replay)
            if os.stat(key, dir_fd=inodes_fd, follow_symlinks=False).st_ino == st.st_ino:
                os.unlink(key, dir_fd=inodes_fd)
        except FileNotFoundError:
            pass
        fault("history.after_hold")
        return True


class _Unreachable(Exception):
    """A record's path does not resolve in the shadow (the updater reports it)."""


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[a, b)`` ranges sorted, the overlapping or adjacent ones merged (the bytes, and
    the blocks they touch, are the same)."""
    if len(ranges) == 1:
        return ranges
    ranges.sort()
    out = []
    a, b = ranges[0]
    for p, q in ranges:
        if p > b:
            out.append((a, b))
            a, b = p, q
        elif q > b:
            b = q
    out.append((a, b))
    return out


class _Spans:
    """A set of bytes as sorted, disjoint, non-adjacent ``[a, b)`` spans (bisect: O(log n))."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends, strict=True))

    def add(self, a: int, b: int) -> None:
        if a >= b:
            return
        i = bisect.bisect_left(self.ends, a)           # first span ending at or after a
        j = bisect.bisect_right(self.starts, b)        # spans from i to j-1 touch [a, b)
        if i < j:
            a, b = min(a, self.starts[i]), max(b, self.ends[j - 1])
        self.starts[i:j] = [a]
        self.ends[i:j] = [b]

    def missing(self, a: int, b: int) -> list[tuple[int, int]]:
        """The parts of ``[a, b)`` not in the set."""
        out = []
        i = bisect.bisect_right(self.ends, a)          # first span ending after a
        while a < b:
            if i == len(self.starts) or self.starts[i] >= b:
                out.append((a, b))
                break
            if self.starts[i] > a:
                out.append((a, self.starts[i]))
            a = self.ends[i]
            i += 1
        return out

    def present(self, a: int, b: int) -> list[tuple[int, int]]:
        """The parts of ``[a, b)`` that are in the set."""
        out = []
        i = bisect.bisect_right(self.ends, a)
        while i < len(self.starts) and self.starts[i] < b:
            out.append((max(a, self.starts[i]), min(b, self.ends[i])))
            i += 1
        return out


def _extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(a, b, is_data) pieces of [start, end) as SEEK_DATA/SEEK_HOLE report them."""
    p = start
    while p < end:
        try:
            d = os.lseek(fd, p, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                yield p, end, False
                return
            yield p, end, True          # no SEEK_DATA: all data
            return
        if d > p:
            yield p, min(d, end), False
            p = min(d, end)
            continue
        h = min(os.lseek(fd, p, os.SEEK_HOLE), end)
        if h <= p:
            h = end
        yield p, h, True
        p = h


def _ranges(ids: list[int]) -> str:
    if not ids:
        return ""
    return f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"
