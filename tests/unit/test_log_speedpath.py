"""The ordered log's fast path for data that does not compress (issue 11): STORED
BATCH entries (format 2), written from the records' own buffers (records.encode_parts,
os.writev), and every check a reader makes on them.  No FUSE."""

from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path

import pytest

from fusejournal import log as logmod
from fusejournal.log import CorruptLog, Marker, OrderedLog, fsck
from fusejournal.records import Mkdir, Setxattr, Write, decode, encode, encode_parts

HDR = logmod._ENTRY_HEADER.size
FHDR = logmod._FILE_HEADER.size
MiB = 1 << 20


def mk(cp: int) -> Marker:
    return Marker(checkpoint=cp, label=f"cp{cp}", time_ns=1_700_000_000_000_000_000 + cp,
                  operations=0, raw_bytes=0, stored_bytes=0)


def opened(d: Path, **kw) -> OrderedLog:
    log = OrderedLog(d, **kw)
    assert log.open() == []
    return log


def seg(d: Path, index: int = 1) -> Path:
    return d / logmod.format_segment_name(index)


def text(n: int, seed: int = 0) -> bytes:
    lines = (b"2026-12-02 10:%02d:%02d INFO request %d from 10.0.0.%d took %d ms\n"
             % (i // 60 % 60, i % 60, i + seed, i % 250, i * 7 % 1000) for i in range(n // 40 + 1))
    return b"".join(lines)[:n]


def writes(kind: str, n: int, size: int, ino: int = 5) -> list[Write]:
    make = (lambda i: os.urandom(size)) if kind == "random" else (lambda i: text(size, i))
    return [Write(ino, i * size, i, make(i)) for i in range(n)]


def entries(path: Path) -> list[tuple[int, int, bytes]]:
    """(type, flags, payload) of every entry of a segment, parsed independently."""
    data = path.read_bytes()
    out, pos = [], FHDR
    while pos < len(data):
        magic, typ, flags, length, _, pcrc, hcrc = logmod._ENTRY_HEADER.unpack_from(data, pos)
        assert magic == b"FJ" and zlib.crc32(data[pos:pos + HDR - 4]) == hcrc
        payload = data[pos + HDR:pos + HDR + length]
        assert zlib.crc32(payload) == pcrc
        out.append((typ, flags, payload))
        pos += HDR + length
    return out


def batches(path: Path) -> list[tuple[int, bytes]]:
    return [(f, p) for t, f, p in entries(path) if t == logmod.BATCH]


def reheader(path: Path, offset: int, **change: int) -> None:
    """Rewrite the entry header at ``offset`` with ``change`` applied and valid CRCs."""
    data = bytearray(path.read_bytes())
    names = ("magic", "typ", "flags", "length", "cp", "pcrc", "hcrc")
    f = dict(zip(names, logmod._ENTRY_HEADER.unpack_from(data, offset), strict=True))
    f.update(change)
    head = logmod._ENTRY_HEADER.pack(*(f[n] for n in names[:-1]), 0)[:-4]
    data[offset:offset + HDR] = head + struct.pack("<I", zlib.crc32(head))
    path.write_bytes(bytes(data))


def offsets(path: Path) -> list[int]:
    data = path.read_bytes()
    out, pos = [], FHDR
    while pos < len(data):
        out.append(pos)
        pos += HDR + logmod._ENTRY_HEADER.unpack_from(data, pos)[3]
    return out


@pytest.fixture
def d(tmp_path: Path) -> Path:
    return tmp_path / "log"


# ---------------------------------------------------------------- encode_parts

def test_encode_parts_is_encode_without_copying_big_fields():
    big = os.urandom(200 << 10)
    recs = [Mkdir(0o755, 1, 2, 3, 4, b"d\xff"), Write(7, 0, 1, big), Write(7, 1, 2, b"small"),
            Setxattr(3, b"p", b"user.k", b"v" * 70000), Write(8, 2, 3, big)]
    parts = encode_parts(recs)
    assert b"".join(parts) == encode(recs)
    assert sum(p is big for p in parts) == 2          # the 1 MiB writes' data: not copied
    assert list(decode(b"".join(parts))) == recs
    assert encode_parts([]) == [] and len(encode_parts([Write(1, 0, 0, b"x")] * 100)) == 1


# ---------------------------------------------------------------- STORED entries

def test_data_that_does_not_compress_is_stored_as_it_is(d):
    log = opened(d)
    recs = writes("random", 10, MiB)
    info = log.append(recs, mk(1))
    got = batches(seg(d))
    assert got and all(f == logmod.STORED for f, _ in got)
    assert b"".join(p for _, p in got) == encode(recs)          # the payload is the records
    assert info.marker.raw_bytes == len(encode(recs))
    assert list(log.records(info)) == recs
    log.verify(info)
    log.close()
    assert fsck(d).clean
    again = opened(d)
    assert list(again.records(again.checkpoints()[0])) == recs
    again.close()


def test_text_is_still_compressed(d):
    log = opened(d)
    recs = writes("text", 12, MiB)
    info = log.append(recs, mk(1))
    assert all(f == 0 for f, _ in batches(seg(d)))
    assert info.marker.stored_bytes <= 0.5 * info.marker.raw_bytes
    assert list(log.records(info)) == recs
    log.close()


def test_each_chunk_is_decided_on_its_own(d):
    log = opened(d, chunk_bytes=256 << 10)
    recs = []
    for k in range(6):
        recs += writes("random" if k % 2 else "text", 2, 256 << 10, ino=k)
    info = log.append(recs, mk(1))
    flags = [f for f, _ in batches(seg(d))]
    assert logmod.STORED in flags and 0 in flags
    assert list(log.records(info)) == recs
    log.verify(info)
    log.close()
    assert fsck(d).clean


def test_a_small_chunk_whose_frame_does_not_shrink_is_stored(d):
    log = opened(d)
    recs = [Write(1, 0, 0, os.urandom(5000))]        # too small to probe: compressed, then dropped
    info = log.append(recs, mk(1))
    assert batches(seg(d)) == [(logmod.STORED, encode(recs))]
    assert list(log.records(info)) == recs
    log.close()


def test_stored_entries_streamed_ahead_of_their_marker(d):
    log = opened(d)
    log.append(writes("text", 1, 1000), mk(1))
    streamed = writes("random", 5, MiB)
    log.append_unmarked(streamed)
    log.close()                                       # clean: kept for the next marker
    again = opened(d)
    info = again.append(writes("text", 1, 1000, ino=9), mk(2))
    assert list(again.records(info)) == streamed + writes("text", 1, 1000, ino=9)
    again.append_unmarked(writes("random", 3, MiB))   # then a crash: a torn tail, cut
    size = os.path.getsize(seg(d))
    os.close(again._wfd)                              # (no close(): no END_FILE update)
    (d / logmod.END_FILE).unlink(missing_ok=True)
    third = OrderedLog(d)
    warnings = third.open()
    assert len(warnings) == 1 and "torn tail" in warnings[0]
    assert os.path.getsize(seg(d)) == info.end.offset < size
    assert third.last_checkpoint == 2 and third.unmarked == (0, 0)
    third.close()


# ---------------------------------------------------------------- damage

def test_damage_in_a_stored_payload_is_found_before_use(d):
    log = opened(d)
    recs = writes("random", 6, MiB)
    log.append(recs, mk(1))
    log.append(writes("text", 1, 1000), mk(2))
    log.close()
    first = offsets(seg(d))[0]
    assert batches(seg(d))[0][0] == logmod.STORED
    data = bytearray(seg(d).read_bytes())
    data[first + HDR + 3 * MiB] ^= 0x10               # inside a record's data: decodes fine
    seg(d).write_bytes(bytes(data))
    report = fsck(d)
    assert not report.clean and "payload checksum mismatch" in report.damage[0]
    damaged = OrderedLog(d)
    assert damaged.open() and damaged.damage is not None
    assert damaged.checkpoints() == []                # never read, never applied
    damaged.close()


def test_a_stored_flag_forged_onto_a_frame_fails_decoding(d):
    log = opened(d)
    info = log.append(writes("text", 2, 64 << 10), mk(1))
    log.append(writes("text", 1, 1000), mk(2))
    first = offsets(seg(d))[0]
    assert batches(seg(d))[0][0] == 0
    reheader(seg(d), first, flags=logmod.STORED)      # both CRCs still match
    with pytest.raises(CorruptLog, match="undecodable records"):
        log.verify(info)                              # the running daemon's updater
    log.close()
    report = fsck(d)
    assert "undecodable records" in report.damage[0]


@pytest.mark.parametrize("flags", [2, logmod.STORED | 4])
def test_unknown_flags_are_damage(d, flags):
    log = opened(d)
    log.append(writes("random", 2, MiB), mk(1))
    log.append(writes("text", 1, 1000), mk(2))
    log.close()
    reheader(seg(d), offsets(seg(d))[0], flags=flags)
    assert "unknown entry type" in fsck(d).damage[0]


def test_the_stored_flag_on_a_marker_is_damage(d):
    log = opened(d)
    log.append([], mk(1))
    log.append([], mk(2))
    log.close()
    reheader(seg(d), offsets(seg(d))[0], flags=logmod.STORED)
    assert "unknown entry type" in fsck(d).damage[0]


# ---------------------------------------------------------------- format 1 segments

def test_format_1_segments_read_and_get_no_stored_entries(d, monkeypatch):
    monkeypatch.setattr(logmod, "LOG_FORMAT", 1)      # as an older fusejournal wrote it
    old = opened(d, segment_limit=8 * MiB)
    first = old.append(writes("text", 2, MiB), mk(1))
    old.close()
    monkeypatch.undo()
    assert struct.unpack_from("<H", seg(d).read_bytes(), 6) == (1,)
    log = opened(d, segment_limit=8 * MiB)
    assert list(log.records(first)) == writes("text", 2, MiB)
    same = log.append(writes("random", 8, MiB), mk(2))     # still segment 1 (format 1)
    assert same.start.segment == 1
    # an older fusejournal reads format 1 only; a STORED entry would look torn to it
    assert all(f == 0 for f, _ in batches(seg(d)))
    fresh = log.append(writes("random", 8, MiB), mk(3))    # segment 2: format 2
    assert fresh.start.segment == 2
    assert struct.unpack_from("<H", seg(d, 2).read_bytes(), 6) == (2,)
    assert all(f == logmod.STORED for f, _ in batches(seg(d, 2)))
    for info in (first, same, fresh):
        log.verify(info)
    log.close()
    assert fsck(d).clean


# ---------------------------------------------------------------- writing

def test_short_writev_is_finished(d, monkeypatch):
    real = os.writev
    seen = []

    def short(fd, bufs):
        seen.append(len(bufs))
        total = sum(len(b) for b in bufs)
        return real(fd, [b"".join(bytes(b) for b in bufs)[:max(1, total // 3)]])
    monkeypatch.setattr(os, "writev", short)
    log = opened(d)
    recs = writes("random", 5, MiB)
    info = log.append(recs, mk(1))
    monkeypatch.undo()
    assert seen and max(seen) > 2
    assert list(log.records(info)) == recs
    log.close()
    assert fsck(d).clean


def test_a_failed_stored_write_cuts_back(d, monkeypatch):
    log = opened(d)
    log.append(writes("text", 1, 1000), mk(1))
    size = os.path.getsize(seg(d))

    def full(fd, bufs):
        os.write(fd, bytes(bufs[0]))
        raise OSError(errno.ENOSPC, "No space left on device")
    recs = writes("random", 5, MiB)
    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(OSError):
        log.append(recs, mk(2))
    monkeypatch.undo()
    assert os.path.getsize(seg(d)) == size and log.last_checkpoint == 1
    info = log.append(recs, mk(2))
    assert list(log.records(info)) == recs
    log.verify(info)
    log.close()
    assert fsck(d).clean


# ---------------------------------------------------------------- the daemon's heap

_FIFO = """
import resource, sys
sys.path.insert(0, {repo!r})
from fusejournal import sysc
if {keep}:
    assert sysc.keep_heap()
held = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(512):                 # 512 MiB of WRITE data, taken by the streamer 8 MiB at a time
    held.append(bytes([i % 251]) * (1 << 20))
    if len(held) == 8:
        held.clear()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("keep", [False, True])
def test_keep_heap_spares_a_page_fault_per_page_of_data(keep):
    import subprocess
    import sys
    repo = str(Path(__file__).resolve().parents[2])
    faults = int(subprocess.run([sys.executable, "-c", _FIFO.format(repo=repo, keep=keep)],
                                check=True, capture_output=True, text=True).stdout)
    pages = 512 * MiB // os.sysconf("SC_PAGE_SIZE")
    if keep:
        assert faults < pages // 10          # the heap is reused
    else:
        assert faults > pages // 2           # glibc's defaults (why keep_heap exists)
