"""The ordered log: checkpoint batches, durably appended to segment files.

The log lives in ``journal/log/`` as numbered segment files
(``0000000000000001.fjlog`` ...).  Each update permission appends one
*checkpoint*: the batch of records (as one or more lz4-compressed BATCH
entries) closed by one MARKER entry.  A checkpoint never spans two segments.
The byte layout is specified in docs/format.md.

What is durable when:

* :meth:`OrderedLog.append` returns only after the marker has been written
  and ``fdatasync``-ed (and, for a new segment file, the log directory
  ``fsync``-ed).  A checkpoint whose append returned survives a crash.
* A crash *during* an append leaves an uncommitted tail (a partial entry,
  garbage, or batch entries without their marker) at the end of the last
  segment.  :meth:`OrderedLog.open` cuts it off; nothing committed is lost.
* :meth:`OrderedLog.append_unmarked` (the streamer, fusejournal/streamer.py)
  writes batch entries of the next checkpoint ahead of its marker;
  :meth:`OrderedLog.sync` makes them durable, but only the marker written by
  the next :meth:`OrderedLog.append` commits them (it closes every entry since
  the previous marker).  A crash leaves them as an uncommitted tail (cut;
  recovery resyncs what they held); a clean :meth:`OrderedLog.close` names
  them in END_FILE, and the next open keeps them for the next marker.
* Damage anywhere else (a bad checksum followed by further committed data,
  or in an earlier segment) is never cut automatically: :attr:`OrderedLog.damage`
  records it, the damaged checkpoint and everything after it are left out of
  the index (so never applied), and appends are refused until
  ``fsck(repair=True)`` truncates the log before the damage.

Every checksum is checked before anything read from the log is used.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import errno
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import compression, layout
from .checksum import crc32
from .faults import fault
from .records import Record, RecordError, decode, encode_parts, record_size
from .sysc import fsync_dir, pread_full
from .treewalk import durable_replace

LOG_FORMAT = 2
#: format versions this fusejournal reads (2 added the STORED flag)
READ_FORMATS = (1, 2)
SEGMENT_SUFFIX = layout.LOG_SEGMENT_SUFFIX
FILE_MAGIC = b"FJLOG\0"
ENTRY_MAGIC = b"FJ"
BATCH = 1
MARKER = 2
#: entry flag of a BATCH entry (format 2): the payload is the encoded records as they
#: are, not an lz4 frame (a chunk that does not compress: _pack)
STORED = 1

# magic, format version, segment index, base checkpoint, crc32 of the preceding 24 bytes
_FILE_HEADER = struct.Struct("<6sHQQI")
_FILE_VERSION = struct.Struct("<6sH")  # the part every format version keeps
# magic, type, flags, payload length, checkpoint, payload crc32, crc32 of the preceding 20 bytes
_ENTRY_HEADER = struct.Struct("<2sBBIQII")
_MAX_PAYLOAD = 0xFFFFFFFF
_READ_CHUNK = 1 << 20
_NAME_RE = re.compile(r"([0-9]{16,})" + re.escape(SEGMENT_SUFFIX), re.ASCII)
#: written at each clean close: the last confirmed checkpoint then.  The log only
#: grows (prune always keeps a last segment, whose header records where the ids
#: continue when it holds no checkpoint: OrderedLog._roll), so a later scan that ends before it means
#: confirmed checkpoints were cut off (a truncated or removed segment).
END_FILE = layout.LOG_END

logger = logging.getLogger("fusejournal")


def _span(a: int, b: int) -> str:
    return f"checkpoint {a} was" if a == b else f"checkpoints {a}..{b} were"


def _read_end_doc(directory: str | Path) -> dict[str, object] | None:
    try:
        with open(Path(directory) / END_FILE, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def read_end(directory: str | Path) -> int | None:
    """The last checkpoint recorded by the last clean close (None if unknown)."""
    doc = _read_end_doc(directory)
    n = doc.get("last_checkpoint") if doc is not None else None
    return n if type(n) is int and n >= 0 else None


@dataclass(frozen=True)
class Unmarked:
    """Streamed batch entries not yet closed by a marker, at the end of the last
    segment: they belong to checkpoint ``checkpoint`` (the next marker)."""
    checkpoint: int
    segment: int
    start: int          # offset of the first of them
    end: int            # offset just after the last (the segment's size)
    operations: int
    raw_bytes: int

    def doc(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _read_unmarked(directory: Path) -> Unmarked | None:
    """The unmarked entries the last clean close kept for the next marker (END_FILE)."""
    doc = _read_end_doc(directory)
    u = doc.get("unmarked") if doc is not None else None
    if not isinstance(u, dict):
        return None
    try:
        vals = {f.name: u[f.name] for f in dataclasses.fields(Unmarked)}
    except KeyError:
        return None
    if not all(type(v) is int and v >= 0 for v in vals.values()):
        return None
    return Unmarked(**vals)


def _write_end(directory: Path, last: int, unmarked: Unmarked | None = None) -> None:
    doc: dict[str, object] = {"last_checkpoint": last}
    if unmarked is not None:
        doc["unmarked"] = unmarked.doc()
    durable_replace(directory / END_FILE, json.dumps(doc).encode() + b"\n")


def _remove_end(directory: Path) -> bool:
    try:
        os.unlink(directory / END_FILE)
    except FileNotFoundError:
        return False
    fsync_dir(directory)
    return True


def format_segment_name(index: int) -> str:
    """File name of segment ``index``: 16 decimal digits + ``.fjlog``."""
    if index < 0:
        raise ValueError(f"negative segment index {index}")
    return f"{index:016d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """Segment index of a file name, or None if it is not a segment's name."""
    m = _NAME_RE.fullmatch(name)
    if m is None:
        return None
    index = int(m.group(1))
    return index if format_segment_name(index) == name else None


@dataclass(frozen=True, order=True)
class Position:
    """A byte position in the log: segment index and offset in that file."""
    segment: int
    offset: int


@dataclass(frozen=True)
class Marker:
    """The update-permission marker closing a batch.

    On disk: compact JSON of all fields; ``extra`` keys are stored at the top
    level next to them, and unknown keys read from a newer writer land in
    ``extra``.  ``operations``, ``raw_bytes`` and ``stored_bytes`` are
    computed by :meth:`OrderedLog.append` (the values passed in are replaced).
    """
    checkpoint: int
    label: str
    time_ns: int
    operations: int
    raw_bytes: int
    stored_bytes: int
    halt_ns: int = 0
    extra: dict[str, object] = field(default_factory=dict, compare=False)


_MARKER_FIELDS = ("checkpoint", "label", "time_ns", "operations", "raw_bytes",
                  "stored_bytes", "halt_ns")


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint in the log."""
    marker: Marker
    start: Position  # first entry of its batch (the marker itself if the batch is empty)
    end: Position    # just after its marker


class LogError(Exception):
    """Something is wrong with the ordered log or its use."""


class CorruptLog(LogError):
    """Data in the log failed a check (checksum, framing, order, decoding)."""

    def __init__(self, segment: int, offset: int, checkpoint: int | None, reason: str):
        self.segment = segment
        self.offset = offset
        self.checkpoint = checkpoint
        self.reason = reason
        cp = f"checkpoint {checkpoint}" if checkpoint is not None else "unknown checkpoint"
        super().__init__(f"corrupt log: {format_segment_name(segment)} offset {offset} "
                         f"({cp}): {reason}")

    def __reduce__(self) -> tuple[type[CorruptLog], tuple[int, int, int | None, str]]:
        return type(self), (self.segment, self.offset, self.checkpoint, self.reason)


class FormatTooNew(LogError):
    """A segment was written by a newer fusejournal (higher log format version)."""


# ---------------------------------------------------------------- encoding

def _file_header(index: int, base: int) -> bytes:
    head = _FILE_HEADER.pack(FILE_MAGIC, LOG_FORMAT, index, base, 0)[:-4]
    return head + struct.pack("<I", crc32(head))


# lz4 levels of the log's BATCH frames (OrderedLog._level): the fast mode for
# data that barely compresses, the default otherwise
FAST_LEVEL = -16
FAST_ABOVE = 0.9
DEFAULT_BELOW = 0.8
# a chunk whose PROBES samples of PROBE_BYTES store above STORE_ABOVE in lz4's fast
# mode is written STORED, without compressing it (_pack)
STORE_ABOVE = 0.95
PROBES = 4
PROBE_BYTES = 16 << 10
# chunks compressed at once by the log's worker threads while the appending thread
# encodes the next one and writes the oldest (OrderedLog._write_batches)
COMPRESS_AHEAD = 2


def _header(typ: int, flags: int, length: int, checkpoint: int, crc: int) -> bytes:
    if length > _MAX_PAYLOAD:
        raise ValueError(f"log entry payload of {length} bytes is too large")
    head = _ENTRY_HEADER.pack(ENTRY_MAGIC, typ, flags, length, checkpoint, crc, 0)[:-4]
    return head + struct.pack("<I", crc32(head))


def _entry_header(typ: int, checkpoint: int, payload: bytes) -> bytes:
    return _header(typ, 0, len(payload), checkpoint, crc32(payload))


def _marker_json(m: Marker) -> bytes:
    d = {name: getattr(m, name) for name in _MARKER_FIELDS}
    clash = set(m.extra) & set(d)
    if clash:
        raise ValueError(f"marker extra keys clash with fields: {sorted(clash)}")
    d.update(m.extra)
    return json.dumps(d, separators=(",", ":")).encode("ascii")


class _Bad(Exception):
    """Internal: the thing at hand fails a check (str() is the reason)."""


def _parse_marker(payload: bytes, checkpoint: int) -> Marker:
    try:
        d = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Bad(f"undecodable marker: {e}") from None
    if not isinstance(d, dict):
        raise _Bad("undecodable marker: not a JSON object")
    d.setdefault("halt_ns", 0)
    known = {}
    for name in _MARKER_FIELDS:
        v = d.pop(name, None)
        ok = isinstance(v, str) if name == "label" else type(v) is int
        if not ok:
            raise _Bad(f"undecodable marker: bad or missing {name!r}")
        known[name] = v
    if known["checkpoint"] != checkpoint:
        raise _Bad(f"marker says checkpoint {known['checkpoint']}")
    return Marker(**known, extra=d)


# ---------------------------------------------------------------- reading

@dataclass
class _Entry:
    offset: int
    type: int
    length: int
    checkpoint: int
    crc: int
    flags: int = 0

    @property
    def payload(self) -> int:
        return self.offset + _ENTRY_HEADER.size

    @property
    def end(self) -> int:
        return self.offset + _ENTRY_HEADER.size + self.length


def _crc_range(fd: int, off: int, length: int) -> int | None:
    crc = 0
    while length > 0:
        b = os.pread(fd, min(length, _READ_CHUNK), off)
        if not b:
            return None
        crc = crc32(b, crc)
        off += len(b)
        length -= len(b)
    return crc


def _read_entry(fd: int, off: int, limit: int, *, check_payload: bool = True) -> _Entry:
    """The entry at ``off``, which must end by ``limit``; raise _Bad otherwise."""
    if limit - off < _ENTRY_HEADER.size:
        raise _Bad(f"truncated entry header ({limit - off} bytes)")
    raw = pread_full(fd, _ENTRY_HEADER.size, off)
    if len(raw) < _ENTRY_HEADER.size:
        raise _Bad(f"truncated entry header ({len(raw)} bytes)")
    magic, typ, flags, length, cp, pcrc, hcrc = _ENTRY_HEADER.unpack(raw)
    if magic != ENTRY_MAGIC:
        raise _Bad("bad entry magic")
    if crc32(raw[:-4]) != hcrc:
        raise _Bad("entry header checksum mismatch")
    if typ not in (BATCH, MARKER) or flags & ~(STORED if typ == BATCH else 0):
        raise _Bad(f"unknown entry type {typ} (flags {flags})")
    e = _Entry(off, typ, length, cp, pcrc, flags)
    if e.end > limit:
        raise _Bad(f"entry of {length} payload bytes runs past the end ({limit})")
    if check_payload and _crc_range(fd, e.payload, length) != pcrc:
        raise _Bad("payload checksum mismatch")
    return e


def _find_magic(fd: int, pos: int, size: int) -> int | None:
    keep = len(ENTRY_MAGIC) - 1
    while pos < size:
        buf = os.pread(fd, min(_READ_CHUNK, size - pos), pos)
        if not buf:
            return None
        i = buf.find(ENTRY_MAGIC)
        if i >= 0:
            return pos + i
        pos += max(len(buf) - keep, 1)
    return None


def _next_marker(fd: int, pos: int, size: int) -> _Entry | None:
    """Resynchronise: the first intact MARKER entry at or after ``pos``."""
    while (p := _find_magic(fd, pos, size)) is not None:
        try:
            e = _read_entry(fd, p, size)
        except _Bad:
            pos = p + 1
            continue
        if e.type == MARKER:
            return e
        pos = e.end
    return None


@dataclass
class _SegScan:
    index: int
    path: Path
    size: int
    next_cp: int | None             # checkpoint the next entry belongs to
    base: int | None = None         # None: the segment header is unusable
    infos: list[CheckpointInfo] = field(default_factory=list)
    good_end: int = 0               # end of the committed prefix
    problem: tuple[int, str] | None = None  # (offset, reason) of the first bad thing
    open_start: int | None = None   # intact batch entries not closed by a marker start here


def _check_version(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(_FILE_VERSION.size)
    if len(head) == _FILE_VERSION.size:
        magic, version = _FILE_VERSION.unpack(head)
        if magic == FILE_MAGIC and version > LOG_FORMAT:
            raise FormatTooNew(f"{path}: log format {version}; this fusejournal reads "
                               f"format {LOG_FORMAT} only")


def _scan_segment(fd: int, index: int, path: Path, expected: int | None) -> _SegScan:
    """Check one segment (all checksums), collecting its complete checkpoints."""
    size = os.fstat(fd).st_size
    s = _SegScan(index, path, size, expected)
    raw = pread_full(fd, _FILE_HEADER.size, 0)
    if len(raw) < _FILE_HEADER.size:
        s.problem = (0, f"truncated segment header ({len(raw)} bytes)")
        return s
    magic, version, idx, base, crc = _FILE_HEADER.unpack(raw)
    reason = None
    if magic != FILE_MAGIC:
        reason = "bad segment magic"
    elif crc32(raw[:-4]) != crc:
        reason = "segment header checksum mismatch"
    elif version not in READ_FORMATS:
        reason = f"bad format version {version}"
    elif idx != index:
        reason = f"segment header names segment {idx}"
    elif base < 1 or (expected is not None and base != expected):
        reason = f"segment starts at checkpoint {base}, expected {expected}"
    if reason:
        s.problem = (0, reason)
        return s
    s.base = s.next_cp = base
    s.good_end = pos = _FILE_HEADER.size
    start = None
    try:
        while pos < size:
            e = _read_entry(fd, pos, size)
            if e.checkpoint != s.next_cp:
                raise _Bad(f"entry belongs to checkpoint {e.checkpoint}")
            if start is None:
                start = pos
            if e.type == MARKER:
                marker = _parse_marker(pread_full(fd, e.length, e.payload), e.checkpoint)
                if marker.stored_bytes != e.end - start:
                    raise _Bad(f"marker says {marker.stored_bytes} stored bytes, "
                               f"checkpoint has {e.end - start}")
                s.infos.append(CheckpointInfo(marker, Position(index, start), Position(index, e.end)))
                s.next_cp += 1
                s.good_end = e.end
                start = None
            pos = e.end
        if start is not None:
            pos = s.open_start = start
            raise _Bad("batch not closed by a marker")
    except _Bad as e:
        s.problem = (pos, str(e))
    return s


def _is_torn(fd: int, s: _SegScan, at: int) -> bool:
    """Is the problem (at offset ``at``) in the last segment an uncommitted tail?

    Yes unless an intact marker follows it, other than the incomplete
    checkpoint's own marker as the very last entry of the file (a crash
    between writing and syncing may leave that one intact after a hole).
    """
    m = _next_marker(fd, at, s.size)
    return m is None or (m.checkpoint == s.next_cp and m.end == s.size)


@dataclass
class _LogScan:
    paths: list[tuple[int, Path]]       # every segment file, in order
    infos: list[CheckpointInfo]
    last: int
    damage: CorruptLog | None = None
    damage_cut: tuple[int, int | None] | None = None  # (segment, offset); None: whole file
    torn: str | None = None
    torn_cut: tuple[int, int | None] | None = None
    end: int | None = None              # read_end(): the last checkpoint at the last clean close
    unmarked: Unmarked | None = None    # streamed entries kept by the last clean close


def _list_segments(directory: Path) -> list[tuple[int, Path]]:
    """Segment files in order; none if the directory does not exist (yet)."""
    out = []
    try:
        with os.scandir(directory) as it:
            for de in it:
                index = parse_segment_name(de.name)
                if index is not None:
                    out.append((index, Path(de.path)))
    except FileNotFoundError:
        return []
    return sorted(out)


def _scan_log(directory: Path) -> _LogScan:
    """Read-only check of the whole log; decides torn tail vs damage."""
    paths = _list_segments(directory)
    for _, path in paths:
        _check_version(path)
    scan = _LogScan(paths, [], 0)
    expected = prev = None
    for i, (index, path) in enumerate(paths):
        if prev is not None and index != prev + 1:
            scan.damage = CorruptLog(index, 0, expected,
                                     f"segment {format_segment_name(prev + 1)} is missing")
            scan.damage_cut = (index, None)
            break
        prev = index
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            s = _scan_segment(fd, index, path, expected)
            scan.infos.extend(s.infos)
            expected = s.next_cp
            if s.problem is None:
                continue
            offset, reason = s.problem
            cut = (index, s.good_end if s.base is not None else None)
            if i == len(paths) - 1 and s.open_start is not None:
                u = _read_unmarked(directory)
                if u is not None and (u.checkpoint, u.segment, u.start, u.end) == (
                        s.next_cp, index, s.open_start, s.size):
                    # every entry intact (checked above), kept by a clean close: they
                    # belong to the next marker, not a crash's uncommitted tail
                    scan.unmarked = u
                    continue
            if i == len(paths) - 1 and _is_torn(fd, s, offset):
                what = (f"removed {path.name}" if cut[1] is None
                        else f"cut {path.name} at offset {cut[1]} ({s.size - cut[1]} bytes)")
                scan.torn = (f"torn tail: {what}: uncommitted checkpoint {s.next_cp}: "
                             f"{reason} at offset {offset}")
                scan.torn_cut = cut
            else:
                scan.damage = CorruptLog(index, offset, s.next_cp, reason)
                scan.damage_cut = cut
                break
        finally:
            os.close(fd)
    scan.last = expected - 1 if expected is not None else 0
    scan.end = read_end(directory)
    if scan.damage is None and scan.end is not None and scan.last < scan.end:
        index = paths[-1][0] if paths else 1
        size = paths[-1][1].stat().st_size if paths else 0
        what = (f"the log ends at checkpoint {scan.last}" if paths else "every segment is gone")
        scan.damage = CorruptLog(index, size, scan.last + 1,
                                 f"{_span(scan.last + 1, scan.end)} confirmed but "
                                 f"missing ({what}): a segment was truncated or removed")
        scan.damage_cut = None
        scan.torn = scan.torn_cut = None    # not a crash's uncommitted tail: cut nothing
        scan.unmarked = None
    return scan


def _iter_batches(path: Path, info: CheckpointInfo, start: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(offset, raw record bytes) of each BATCH entry of ``info``, all checked; from the
    entry at ``start`` (an offset a pass over the checkpoint reported) if given."""
    seg, cp = info.start.segment, info.marker.checkpoint
    if start is not None and not info.start.offset <= start < info.end.offset:
        raise LogError(f"checkpoint {cp}: offset {start} is outside it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LogError(f"checkpoint {cp}: segment {path.name} no longer exists (pruned?)") from None
    try:
        pos, end = (info.start.offset if start is None else start), info.end.offset
        while True:
            try:
                e = _read_entry(fd, pos, end, check_payload=False)
                if e.checkpoint != cp:
                    raise _Bad(f"entry belongs to checkpoint {e.checkpoint}")
                payload = pread_full(fd, e.length, e.payload)
                if len(payload) != e.length:
                    raise _Bad("segment shorter than the checkpoint")
                if crc32(payload) != e.crc:
                    raise _Bad("payload checksum mismatch")
                if e.type == MARKER:
                    if e.end != end:
                        raise _Bad("marker before the end of the checkpoint")
                    if _parse_marker(payload, cp) != info.marker:
                        raise _Bad("marker differs from the index")
                    return
                raw = payload if e.flags & STORED else compression.decompress(payload)
            except (_Bad, compression.CompressionError) as x:
                raise CorruptLog(seg, pos, cp, str(x)) from None
            del payload
            yield pos, raw
            pos = e.end
    finally:
        os.close(fd)


def _verify(path: Path, info: CheckpointInfo,
            each: Callable[[int, Record], None] | None = None,
            chunk: Callable[[int, int], None] | None = None) -> None:
    seg, cp, m = info.start.segment, info.marker.checkpoint, info.marker
    ops = raw_bytes = 0
    for offset, raw in _iter_batches(path, info):
        raw_bytes += len(raw)
        if chunk is not None:
            chunk(offset, ops)
        try:
            if each is None:
                ops += sum(1 for _ in decode(raw))
            else:
                for rec in decode(raw):
                    each(ops, rec)
                    ops += 1
        except RecordError as e:
            raise CorruptLog(seg, offset, cp, f"undecodable records: {e}") from None
    if (ops, raw_bytes) != (m.operations, m.raw_bytes):
        raise CorruptLog(seg, info.start.offset, cp,
                         f"batch holds {ops} records / {raw_bytes} bytes, marker says "
                         f"{m.operations} / {m.raw_bytes}")


# ---------------------------------------------------------------- writing

def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write to log segment")
        mv = mv[n:]


def _write_entry(fd: int, typ: int, checkpoint: int, payload: bytes) -> int:
    _write_all(fd, _entry_header(typ, checkpoint, payload))
    _write_all(fd, payload)
    return _ENTRY_HEADER.size + len(payload)


_IOV_GROUP = 512       # buffers per writev (IOV_MAX is 1024 on Linux)


def _writev_all(fd: int, bufs: list[bytes | bytearray]) -> None:
    """Write ``bufs`` back to back at the fd's offset (os.writev, short writes finished)."""
    i = 0
    while i < len(bufs):
        group = bufs[i:i + _IOV_GROUP]
        n = os.writev(fd, group)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write to log segment")
        for b in group:
            i += 1
            if n >= len(b):
                n -= len(b)
                continue
            _write_all(fd, memoryview(b)[n:])   # the rest of a partly written buffer
            break


@dataclass
class _Packed:
    """One BATCH entry's payload, ready to write: its parts, flags, length, CRC-32."""
    parts: list[bytes | bytearray]
    flags: int
    length: int
    crc: int


def _slice(parts: list[bytes | bytearray], start: int, n: int) -> bytes:
    """Bytes ``start .. start + n`` of the concatenation of ``parts``."""
    out = []
    for p in parts:
        if start >= len(p):
            start -= len(p)
            continue
        piece = memoryview(p)[start:start + n]
        out.append(piece)
        n -= len(piece)
        start = 0
        if n <= 0:
            break
    return b"".join(out)


def _looks_incompressible(parts: list[bytes | bytearray], size: int) -> bool:
    """Do ``PROBES`` samples of ``PROBE_BYTES``, spread over the chunk, each compressed
    alone in lz4's fast mode, store above ``STORE_ABOVE`` of their size?  (lz4 finds
    matches within 64 KiB only, so a sample of that order predicts the chunk.)"""
    stored = 0
    for k in range(PROBES):
        sample = _slice(parts, size * (2 * k + 1) // (2 * PROBES), PROBE_BYTES)
        stored += len(compression.compress(sample, level=FAST_LEVEL, checksum=False))
    return stored > STORE_ABOVE * PROBES * PROBE_BYTES


def _stored(parts: list[bytes | bytearray], size: int) -> _Packed:
    crc = 0
    for p in parts:
        crc = crc32(p, crc)
    return _Packed(parts, STORED, size, crc)


def _pack(parts: list[bytes | bytearray], size: int, level: int, may_store: bool) -> _Packed:
    """The payload of the BATCH entry of one chunk (encoded records in ``parts``, ``size``
    bytes), made in a worker thread (lz4 and the CRC-32 release the GIL).

    1. With ``may_store`` (the segment has format 2), a chunk of at least
       ``2 * PROBES * PROBE_BYTES`` whose samples do not compress
       (:func:`_looks_incompressible`: already-compressed or encrypted data, random
       bytes) is STORED: its parts as they are, neither joined nor compressed.
    2. Otherwise it is compressed at ``level`` into one lz4 frame; a frame not smaller
       than the chunk is dropped for the STORED form too (``may_store``).
    3. The CRC-32 of the payload goes into the entry's header; the reader checks it
       before using the payload (decompressing it, or decoding a STORED one).
    """
    if may_store and size >= 2 * PROBES * PROBE_BYTES and _looks_incompressible(parts, size):
        return _stored(parts, size)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    payload = compression.compress(data, level=level, checksum=False)
    if may_store and len(payload) >= size:
        return _stored([data], size)
    return _Packed([payload], 0, len(payload), crc32(payload))


def _write_packed(fd: int, checkpoint: int, p: _Packed) -> int:
    head = _header(BATCH, p.flags, p.length, checkpoint, p.crc)
    if len(p.parts) == 1:
        _write_all(fd, head)
        _write_all(fd, p.parts[0])
    else:
        _writev_all(fd, [head, *p.parts])
    return _ENTRY_HEADER.size + p.length


def _chunked(records: Iterable[Record], limit: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    n = 0
    for rec in records:
        try:
            n += record_size(rec)
        except KeyError:
            raise TypeError(f"not a record: {rec!r}") from None
        chunk.append(rec)
        if n >= limit:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def _final_marker(marker: Marker, ops: int, raw: int, batch_bytes: int) -> tuple[Marker, bytes]:
    """The marker with its counts filled in, and its payload.

    stored_bytes includes the marker's own JSON, whose length depends on the
    number's digits: iterate to the fixed point (two or three rounds).
    """
    stored = batch_bytes
    for _ in range(20):
        m = dataclasses.replace(marker, operations=ops, raw_bytes=raw,
                                stored_bytes=stored, extra=dict(marker.extra))
        payload = _marker_json(m)
        total = batch_bytes + _ENTRY_HEADER.size + len(payload)
        if total == stored:
            return m, payload
        stored = total
    raise AssertionError("stored_bytes did not converge")


# ---------------------------------------------------------------- the log

class OrderedLog:
    """The ordered log in one directory.  Call :meth:`open` before use.

    One thread appends (:meth:`append`, :meth:`prune`); others may call
    :meth:`checkpoints`, :meth:`verify`, :meth:`records` concurrently: the
    index is guarded by a lock and readers use their own read-only fds.
    """

    def __init__(self, directory: str | Path, *, segment_limit: int = 64 << 20,
                 chunk_bytes: int = 4 << 20):
        self.directory = Path(directory)
        self.segment_limit = segment_limit
        self.chunk_bytes = max(1, chunk_bytes)
        self.damage: CorruptLog | None = None
        self._fast = False               # the last chunks barely compressed: see _level
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None   # _compressor
        self._lock = threading.Lock()    # guards _infos, _segments, _last
        self._wlock = threading.Lock()   # serialises append/prune/close
        self._infos: list[CheckpointInfo] = []
        self._segments: list[int] = []   # every segment file, in order
        self._last = 0
        self._wfd: int | None = None     # last segment, for appending
        self._size = 0                   # committed size of the last segment
        self._state = "new"              # new -> open -> closed; "broken" after a failed rollback
        # streamed batch entries since the last marker (append_unmarked): they start at
        # _open_start in the last segment and end at _size; the next marker closes them
        self._open_start: int | None = None
        self._open_ops = 0
        self._open_raw = 0
        self._dirty = False              # written since the last fdatasync
        self._dir_dirty = False          # a new segment's directory entry not yet fsync'ed
        self._store_ok = True            # the last segment has format 2: STORED entries may go in

    # -- opening

    def open(self) -> list[str]:
        """Create the directory if needed, scan and index the log.

        Cuts an uncommitted (torn) tail off the last segment, durably, and
        returns a warning for it.  Damage elsewhere is not cut: it is kept in
        :attr:`damage` (and warned about); the index stops before the damaged
        checkpoint and :meth:`append` refuses to write.  Raises
        :class:`FormatTooNew` before touching anything if a segment has a
        newer format.
        """
        if self._state != "new":
            raise LogError("log already opened")
        if not self.directory.is_dir():
            self.directory.mkdir(mode=0o700, parents=True)
            fsync_dir(self.directory.parent)
        scan = _scan_log(self.directory)
        warnings: list[str] = []
        segments = [index for index, _ in scan.paths]
        if scan.torn_cut is not None:
            index, offset = scan.torn_cut
            path = self.directory / format_segment_name(index)
            if offset is None:
                os.unlink(path)
                fsync_dir(self.directory)
                segments.remove(index)
            else:
                _truncate(path, offset)
            assert scan.torn is not None        # set with torn_cut (_scan_log)
            warnings.append(scan.torn)
        if scan.damage is not None:
            warnings.append(f"{scan.damage}; the damaged checkpoint and all later ones are "
                            f"not used and appends are refused until fsck --repair")
        with self._lock:
            self._infos, self._last, self._segments = scan.infos, scan.last, segments
            self.damage = scan.damage
        if segments and self.damage is None:
            self._wfd = os.open(self.directory / format_segment_name(segments[-1]),
                                os.O_RDWR | os.O_CLOEXEC)
            self._size = os.fstat(self._wfd).st_size
            # never a STORED entry into a segment of format 1: an older fusejournal reading
            # it would take that entry for a torn tail and cut it (format 2 it refuses whole)
            head = pread_full(self._wfd, _FILE_VERSION.size, 0)
            self._store_ok = _FILE_VERSION.unpack(head)[1] >= 2
            u = scan.unmarked
            if u is not None and u.segment == segments[-1] and u.end == self._size:
                self._open_start, self._open_ops, self._open_raw = u.start, u.operations, u.raw_bytes
        self._state = "open"
        return warnings

    # -- reading

    @property
    def last_checkpoint(self) -> int:
        """Id of the last usable complete checkpoint (0 if none)."""
        with self._lock:
            return self._last

    def checkpoints(self, after: int = 0) -> list[CheckpointInfo]:
        """Complete, indexed checkpoints with id > ``after``, in order."""
        with self._lock:
            i = bisect.bisect_right(self._infos, after, key=lambda c: c.marker.checkpoint)
            return self._infos[i:]

    def _path(self, info: CheckpointInfo) -> Path:
        return self.directory / format_segment_name(info.start.segment)

    def verify(self, info: CheckpointInfo, each: Callable[[int, Record], None] | None = None,
               chunk: Callable[[int, int], None] | None = None) -> None:
        """Check every entry of a checkpoint: checksums, lz4 frames, record
        decoding, and the marker's counts.  Raises :class:`CorruptLog`.

        ``each(index, record)``, if given, is called on every decoded record in
        the same pass (the updater validates the batch with it); what it
        raises propagates.  ``chunk(offset, index)``, if given, is called
        before the records of each entry: its offset in the segment (for
        :meth:`records`' ``start``) and the index of its first record."""
        _verify(self._path(info), info, each, chunk)

    def records(self, info: CheckpointInfo, start: int | None = None) -> Iterator[Record]:
        """The checkpoint's records, in order, one chunk in memory at a time;
        from the entry at offset ``start`` (one :meth:`verify` reported) if given.

        Each chunk is checked (checksum, frame, decoding) before any of its
        records is yielded, but a later chunk may still raise
        :class:`CorruptLog` after earlier records were yielded: call
        :meth:`verify` first when all-or-nothing matters.
        """
        seg, cp = info.start.segment, info.marker.checkpoint
        for offset, raw in _iter_batches(self._path(info), info, start):
            try:
                recs = list(decode(raw))
            except RecordError as e:
                raise CorruptLog(seg, offset, cp, f"undecodable records: {e}") from None
            del raw
            yield from recs

    def segments(self) -> list[tuple[int, Path, int]]:
        """(index, path, size) of every segment file, in order."""
        with self._lock:
            indices = list(self._segments)
        out = []
        for index in indices:
            path = self.directory / format_segment_name(index)
            try:
                out.append((index, path, path.stat().st_size))
            except FileNotFoundError:
                pass  # pruned meanwhile
        return out

    # -- writing

    @property
    def unmarked(self) -> tuple[int, int]:
        """(operations, raw bytes) streamed since the last marker, not yet closed by one."""
        return self._open_ops, self._open_raw

    def _check_writable(self) -> None:
        if self._state != "open":
            raise LogError(f"log is {self._state}; cannot append")
        if self.damage is not None:
            raise LogError(f"log is damaged, appends refused until repaired: {self.damage}")

    def _writer(self, cp: int) -> tuple[bool, int, int, Path]:
        """Where the next entry of checkpoint ``cp`` goes: (new segment?, index, fd, path).

        A new segment is begun only at a checkpoint's first entry (a checkpoint
        never spans two segments), so the segment limit is checked there."""
        new = self._open_start is None and (
            self._wfd is None or (self._size >= self.segment_limit and self._size > _FILE_HEADER.size))
        if new:
            index, fd, path = self._create_segment(cp)
        else:
            assert self._wfd is not None
            index, fd = self._segments[-1], self._wfd
            path = self.directory / format_segment_name(index)
            os.lseek(fd, self._size, os.SEEK_SET)
        return new, index, fd, path

    def _create_segment(self, base: int) -> tuple[int, int, Path]:
        """Create the segment after the last one, holding only its header (``base``: the
        id of its first checkpoint): (index, fd, path).  On failure nothing is left of it
        (:meth:`_rollback`) and the exception propagates."""
        index = self._segments[-1] + 1 if self._segments else 1
        path = self.directory / format_segment_name(index)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, _file_header(index, base))
        except BaseException:
            self._rollback(fd, True, path, 0)
            raise
        return index, fd, path

    def _adopt(self, new: bool, index: int, fd: int) -> None:
        """A new segment written to successfully becomes the one appended to."""
        if new:
            if self._wfd is not None:
                os.close(self._wfd)
            self._wfd = fd
            self._size = _FILE_HEADER.size
            self._dir_dirty = True
            self._store_ok = True
            with self._lock:
                self._segments.append(index)

    def _level(self, raw: int, stored: int) -> int:
        """The lz4 level for the next chunk, from how the last one compressed.

        Data that does not compress (already-compressed files, encrypted pages,
        random bytes) costs lz4's default level a third of a core per 100 MB/s
        and saves almost nothing; its fast mode (acceleration, ``FAST_LEVEL``)
        is 2-3x quicker there.  So after a chunk stored at more than
        ``FAST_ABOVE`` of its raw size the next chunks use the fast mode, and
        once one stores below ``DEFAULT_BELOW`` (the data became compressible:
        text, database pages) the default again.  Only the speed and the
        size change: every frame decompresses the same way."""
        if raw:
            ratio = stored / raw
            if not self._fast and ratio > FAST_ABOVE:
                self._fast = True
            elif self._fast and ratio < DEFAULT_BELOW:
                self._fast = False
        return FAST_LEVEL if self._fast else 0

    def _compressor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=COMPRESS_AHEAD, thread_name_prefix="fj-log-lz4")
        return self._pool

    def _write_batches(self, fd: int, cp: int, records: Iterable[Record],
                       may_store: bool) -> tuple[int, int, int]:
        """Write ``records`` as BATCH entries of ``cp``: (operations, raw bytes, bytes written).

        1. This thread takes the next chunk of records and encodes it into parts
           (:func:`encode_parts`: large data is not copied; Python, under the GIL)
           while up to ``COMPRESS_AHEAD`` earlier chunks are being packed by the log's
           own worker threads (:func:`_pack`: probed, compressed or STORED, CRC-32;
           lz4 and the CRC-32 release the GIL, so they use the other core).  STORED
           entries only if ``may_store`` (the segment has format 2).
        2. The oldest chunk's entry is written as soon as it is ready, in order:
           the entries land exactly as one thread would write them.
        3. Failure (a record that cannot be encoded, the records' source, lz4,
           a write): the exception propagates after every compression still in
           flight has finished and been dropped; the caller cuts the segment back.
        """
        written, ops, raw = 0, 0, 0
        level = FAST_LEVEL if self._fast else 0
        inflight: collections.deque[tuple[concurrent.futures.Future[_Packed], int]] = collections.deque()

        def write_oldest() -> None:
            nonlocal written, level
            future, size = inflight.popleft()
            packed = future.result()
            level = self._level(size, packed.length)
            written += _write_packed(fd, cp, packed)

        try:
            for chunk in _chunked(records, self.chunk_bytes):
                parts = encode_parts(chunk)
                size = sum(len(p) for p in parts)
                ops += len(chunk)
                raw += size
                del chunk
                # no frame checksum: the entry's CRC-32 covers the payload
                inflight.append((self._compressor().submit(_pack, parts, size, level, may_store),
                                 size))
                del parts
                if len(inflight) >= COMPRESS_AHEAD:
                    write_oldest()
            while inflight:
                write_oldest()
        finally:
            if inflight:
                concurrent.futures.wait([f for f, _ in inflight])
                inflight.clear()
        return ops, raw, written

    def append_unmarked(self, records: Iterable[Record]) -> tuple[int, int]:
        """Stream records into the log ahead of their marker (the streamer's append).

        They are written as BATCH entries of checkpoint ``last_checkpoint + 1``
        after those streamed before, not synced (:meth:`sync`) and not closed:
        the next :meth:`append` writes the rest of the batch and the marker that
        closes them all.  Until then no reader uses them, and a scan after a crash
        cuts them off as an uncommitted tail (a clean :meth:`close` keeps them).
        Returns (operations, raw bytes) written.  On any exception the segment
        is cut back to where it was (earlier streamed entries stay) and the
        exception is re-raised: the caller still holds the records.
        """
        with self._wlock:
            self._check_writable()
            cp = self._last + 1
            new, index, fd, path = self._writer(cp)
            start = _FILE_HEADER.size if new else self._size
            try:
                ops, raw, written = self._write_batches(fd, cp, records, new or self._store_ok)
                fault("log.stream_written")
            except BaseException:
                self._rollback(fd, new, path, start)
                raise
            self._adopt(new, index, fd)
            if ops:
                if self._open_start is None:
                    self._open_start = start
                self._size = start + written
                self._open_ops += ops
                self._open_raw += raw
                self._dirty = True
            return ops, raw

    def sync(self) -> bool:
        """Make what :meth:`append_unmarked` wrote durable (``fdatasync``; the log
        directory too for a new segment).  Durable is not committed: only a
        marker commits.  Returns whether anything was synced."""
        with self._wlock:
            if self._wfd is None or not (self._dirty or self._dir_dirty):
                return False
            if self._dirty:
                os.fdatasync(self._wfd)
                self._dirty = False
            if self._dir_dirty:
                fsync_dir(self.directory)
                self._dir_dirty = False
            fault("log.stream_synced")
            return True

    def discard_unmarked(self) -> int:
        """Cut the streamed entries not closed by a marker off the log, durably
        (recovery after an unclean stop resyncs everything they held; a re-seed
        supersedes them).  Returns the operations dropped."""
        with self._wlock:
            if self._open_start is None or self._wfd is None:
                return 0
            ops = self._open_ops
            os.ftruncate(self._wfd, self._open_start)
            os.fsync(self._wfd)
            self._size = self._open_start
            self._open_start, self._open_ops, self._open_raw = None, 0, 0
            self._dirty = False
            if _read_unmarked(self.directory) is not None:
                _write_end(self.directory, self._last)
            return ops

    def append(self, records: Iterable[Record], marker: Marker) -> CheckpointInfo:
        """Append one checkpoint (its records, then its marker), durably.

        ``marker.checkpoint`` must be ``last_checkpoint + 1`` (ValueError).
        The marker closes the entries streamed since the last marker
        (:meth:`append_unmarked`) and ``records``, which follow them.
        The returned info's marker has operations, raw_bytes and stored_bytes
        filled in (of the whole checkpoint).  Records are streamed in chunks of
        about ``chunk_bytes``.  Returns only once the checkpoint is durable.  On
        any exception the segment is cut back to where it was (a segment file
        created here is removed; entries streamed before stay, for the next
        marker), the index is unchanged and the exception is re-raised.
        """
        with self._wlock:
            self._check_writable()
            cp = marker.checkpoint
            if cp != self._last + 1:
                raise ValueError(f"checkpoint {cp} appended after {self._last}")
            _marker_json(marker)  # reject a bad marker before writing anything
            new, index, fd, path = self._writer(cp)
            wstart = _FILE_HEADER.size if new else self._size
            start = self._open_start if self._open_start is not None else wstart
            try:
                ops, raw, written = self._write_batches(fd, cp, records, new or self._store_ok)
                pos = wstart + written
                fault("log.before_marker")
                final, payload = _final_marker(marker, self._open_ops + ops, self._open_raw + raw,
                                               pos - start)
                pos += _write_entry(fd, MARKER, cp, payload)
                fault("log.before_fsync")
                os.fdatasync(fd)
                if new or self._dir_dirty:
                    fsync_dir(self.directory)
                fault("log.after_fsync")
            except BaseException:
                self._rollback(fd, new, path, wstart)
                raise
            info = CheckpointInfo(final, Position(index, start), Position(index, pos))
            self._adopt(new, index, fd)
            self._size = pos
            self._open_start, self._open_ops, self._open_raw = None, 0, 0
            self._dirty = self._dir_dirty = False
            with self._lock:
                self._infos.append(info)
                self._last = cp
            return info

    def _rollback(self, fd: int, new: bool, path: Path, start: int) -> None:
        try:
            if new:
                os.close(fd)
                os.unlink(path)
            else:
                os.ftruncate(fd, start)
        except OSError:
            # The segment's tail is unknown now; open() will cut it on restart.
            self._state = "broken"

    def prune(self, up_to: int) -> list[Path]:
        """Delete whole segments whose every checkpoint is <= ``up_to``.

        The last segment records where the checkpoint ids continue, so it is
        never deleted as it is: once it has reached the segment limit and
        every checkpoint in it is <= ``up_to``, it is rolled first
        (:meth:`_roll`: an empty segment begins) and then deleted with the
        others.  So checkpoints the shadow holds keep less than about one
        segment limit of the journal's disk, and a checkpoint larger than the
        limit is freed as soon as it is applied, not after the next one.
        Nothing from a damaged segment on.  Returns the removed paths, after
        fsyncing the directory.
        """
        with self._wlock:
            self._roll(up_to)
            with self._lock:
                segments, infos = list(self._segments), list(self._infos)
            highest: dict[int, int] = {}
            for info in infos:
                highest[info.start.segment] = info.marker.checkpoint
            removed = []
            try:
                for index in segments[:-1]:
                    if self.damage is not None and index >= self.damage.segment:
                        break
                    if highest.get(index, 0) > up_to:
                        break
                    path = self.directory / format_segment_name(index)
                    os.unlink(path)
                    removed.append(path)
                    with self._lock:
                        self._segments.remove(index)
                        self._infos = [i for i in self._infos if i.start.segment != index]
            finally:
                if removed:
                    fsync_dir(self.directory)
            return removed

    def _roll(self, up_to: int) -> bool:
        """Begin an empty segment after a full last segment the shadow holds all of.

        Only if the log is open and undamaged, the last segment has reached the
        segment limit, its every checkpoint is <= ``up_to``, and nothing was
        streamed after its last marker (those entries belong to the next
        checkpoint and stay where they are).  Under ``_wlock`` (no append runs).

        1. Create the next segment file (``O_EXCL``) holding only its header,
           whose base is the next checkpoint id: from now on it alone records
           where the ids continue.
        2. ``fdatasync`` it, then ``fsync`` the log directory.  Only then may the
           old segment go (the caller deletes it).  A crash before that leaves
           the old segment intact and after it either a torn header (the next
           open removes it: ``_scan_log``) or a valid empty segment: both read
           back as the same log.
        3. Appends go to the new segment.

        Failure (ENOSPC on a full journal, EIO): the new file is removed again
        (:meth:`_rollback`), the log is as it was, a warning is logged and
        False returned; the next prune tries again.
        """
        if self._state != "open" or self.damage is not None or self._wfd is None:
            return False
        if (self._open_start is not None or self._size < self.segment_limit
                or self._size <= _FILE_HEADER.size or self._last > up_to):
            return False
        fd = -1
        try:
            index, fd, path = self._create_segment(self._last + 1)
            fault("log.roll_written")
            os.fdatasync(fd)
            fsync_dir(self.directory)
            fault("log.roll_synced")
        except BaseException as e:
            if fd >= 0:             # created: remove it again (a failed create left nothing)
                self._rollback(fd, True, path, 0)
            if not isinstance(e, OSError):
                raise
            logger.warning("the ordered log could not begin segment %s after the applied "
                           "checkpoints (%s); segment %s stays until the next try",
                           format_segment_name(self._segments[-1] + 1), e.strerror or e,
                           format_segment_name(self._segments[-1]))
            return False
        self._adopt(True, index, fd)
        self._dir_dirty = False
        return True

    def close(self) -> None:
        """Close the writer's fd.  Every returned append is already durable.

        An open, undamaged log records its last checkpoint in END_FILE
        (durably), so that a later scan notices confirmed checkpoints cut off
        while it was closed.  Entries streamed since the last marker are
        fdatasync'ed first and named there too, so that the next :meth:`open`
        keeps them for the next marker instead of cutting them as a torn tail;
        if that cannot be done, OSError (the caller must then make the next
        mount recover as after a crash).  Closing twice is a no-op.
        """
        with self._wlock:
            if self._state == "closed":
                return
            unmarked = None
            try:
                if self._state == "broken" and self._open_start is not None:
                    # a failed append could not be cut back: the tail is unknown, and so is
                    # whether streamed entries survive; the caller recovers as after a crash
                    raise LogError("the ordered log's tail is in an unknown state (a failed append "
                                   "could not be cut back)")
                if self._state == "open" and self._open_start is not None and self._wfd is not None:
                    # streamed entries not closed by a marker: durable, and named in END_FILE,
                    # so the next open keeps them for the next marker (a crash's scan cuts them)
                    os.fdatasync(self._wfd)
                    if self._dir_dirty:
                        fsync_dir(self.directory)
                    unmarked = Unmarked(self._last + 1, self._segments[-1], self._open_start,
                                        self._size, self._open_ops, self._open_raw)
                if self._state == "open" and self.damage is None and (self._last or unmarked):
                    try:
                        _write_end(self.directory, self._last, unmarked)
                    except OSError:
                        if unmarked is not None:
                            raise   # they would be cut as a torn tail: the caller must know
                        # otherwise only a safety check is lost; the log itself is intact
            finally:
                if self._wfd is not None:
                    os.close(self._wfd)
                    self._wfd = None
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                    self._pool = None
                self._state = "closed"


# ---------------------------------------------------------------- fsck

@dataclass
class FsckReport:
    checkpoints_ok: int             # complete checkpoints that passed every check
    last_checkpoint: int            # last usable checkpoint (after repair, the log's last)
    damage: list[str] = field(default_factory=list)
    torn_tail: str | None = None
    repaired: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.damage and self.torn_tail is None


def _lost_checkpoints(scan: _LogScan, d: CorruptLog) -> list[int]:
    """Ids of intact markers from the damage ``d`` on (best effort, for the report)."""
    found = {d.checkpoint} if d.checkpoint is not None else set()
    for index, path in scan.paths:
        if index < d.segment:
            continue
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            pos = d.offset if index == d.segment else 0
            while (m := _next_marker(fd, pos, size)) is not None:
                found.add(m.checkpoint)
                pos = m.end
        finally:
            os.close(fd)
    if d.checkpoint is not None:
        found = {c for c in found if c >= d.checkpoint}
    return sorted(found)


def read_log(directory: str | Path) -> tuple[list[Marker], str | None, str | None, int]:
    """Like :func:`read_markers`, plus the torn tail's description (None if none) and
    the last usable checkpoint id (known from segment headers even with no markers left)."""
    scan = _scan_log(Path(directory))
    return ([i.marker for i in scan.infos], (str(scan.damage) if scan.damage else None), scan.torn,
            scan.last)


def read_markers(directory: str | Path) -> tuple[list[Marker], str | None]:
    """Markers of the complete checkpoints, read-only (nothing is cut), and a
    description of damage (None if none; a torn tail is not damage)."""
    scan = _scan_log(Path(directory))
    return [i.marker for i in scan.infos], (str(scan.damage) if scan.damage else None)


def fsck(directory: str | Path, repair: bool = False) -> FsckReport:
    """Check the whole log: every checksum, every lz4 frame, every record.

    Without ``repair`` nothing is modified (segments are opened read-only).
    With ``repair``: a torn tail is cut; on damage, the log is truncated just
    before the damaged checkpoint, and that checkpoint and all later ones are
    dropped -- they are lost, and the report says which.  Run it only while
    no daemon uses the journal.
    """
    directory = Path(directory)
    scan = _scan_log(directory)
    for n, info in enumerate(scan.infos):
        try:
            _verify(directory / format_segment_name(info.start.segment), info)
        except CorruptLog as e:
            scan.damage, scan.damage_cut = e, (info.start.segment, info.start.offset)
            scan.infos, scan.last = scan.infos[:n], info.marker.checkpoint - 1
            break
    report = FsckReport(len(scan.infos), scan.last, torn_tail=scan.torn)
    lost: list[int] = []
    if scan.damage is not None:
        lost = _lost_checkpoints(scan, scan.damage) if scan.damage_cut is not None else []
        report.damage.append(str(scan.damage))
        if lost:
            report.damage.append(f"checkpoints {lost[0]}..{lost[-1]} ({len(lost)} found) "
                                 f"are not usable")
    if not repair:
        return report
    if scan.damage is not None and scan.damage_cut is None:
        # confirmed checkpoints are gone from the end: nothing to cut, accept the loss
        assert scan.end is not None         # the only damage without a cut: read_end() said so
        _remove_end(directory)
        report.repaired.append(f"accepted the loss: {_span(scan.last + 1, scan.end)} dropped; the "
                               f"log now ends at checkpoint {scan.last}; re-seed the shadow if it "
                               f"went beyond (fusejournal mount --reseed)")
        return report
    if scan.damage is not None and scan.damage_cut is not None:      # (always cut here)
        _remove_end(directory)          # the repair drops checkpoints: END_FILE is stale
        index, offset = scan.damage_cut
        for later, path in reversed(scan.paths):
            if later > index or (later == index and offset is None):
                os.unlink(path)
                report.repaired.append(f"removed {path.name}")
        if offset is not None:
            path = directory / format_segment_name(index)
            _truncate(path, offset)
            report.repaired.append(f"truncated {path.name} to {offset} bytes")
        fsync_dir(directory)
        what = f"checkpoints {lost[0]}..{lost[-1]}" if lost else "everything after it"
        report.repaired.append(f"dropped {what} from the damage on: they are lost; "
                               f"the log now ends at checkpoint {scan.last}")
    elif scan.torn_cut is not None:
        index, offset = scan.torn_cut
        path = directory / format_segment_name(index)
        if offset is None:
            os.unlink(path)
            fsync_dir(directory)
        else:
            _truncate(path, offset)
        assert scan.torn is not None            # set with torn_cut (_scan_log)
        report.repaired.append(scan.torn)
    return report
