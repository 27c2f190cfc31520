"""Unit tests of the ordered log (fusejournal.log) and compression (no FUSE)."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusejournal import compression
from fusejournal import log as logmod
from fusejournal.compression import CompressionError
from fusejournal.log import (
    CheckpointInfo,
    CorruptLog,
    FormatTooNew,
    LogError,
    Marker,
    OrderedLog,
    Position,
    format_segment_name,
    fsck,
    parse_segment_name,
    read_markers,
)
from fusejournal.records import (
    Link,
    Mkdir,
    Mknod,
    Removexattr,
    Rename,
    Rmdir,
    Setattr,
    Setxattr,
    Symlink,
    Unlink,
    Write,
    encode,
)

HDR = logmod._ENTRY_HEADER.size
FHDR = logmod._FILE_HEADER.size


def every_type(i: int = 0, big: int = 0) -> list:
    """One record of every type, non-UTF-8 names included."""
    p = b"dir\xff\xfe/f%d" % i
    return [
        Mkdir(0o40755, 1000, 1000, 123, 456, b"dir\xff\xfe"),
        Mknod(10 + i, 0o100644, 1000, 1000, 0, 1, 2, p),
        Symlink(11, 0, 0, 3, 4, b"link\x80", b"/target/\xc3\x28"),
        Link(10 + i, 5, b"hard\x00link"),
        Write(10 + i, 2**40, -7, os.urandom(big) if big else b"hello"),
        Setattr(10 + i, 63, 0o104755, 1, 2, 2**63 - 1, -(2**63), 9, b""),
        Setxattr(0, b"dir\xff\xfe", b"user.k\xff", b"\x00" * 300),
        Removexattr(10 + i, b"", b"user.k"),
        Rename(2, 10 + i, 6, 7, p, b"renamed\xfe"),
        Unlink(10 + i, 8, b"renamed\xfe"),
        Rmdir(9, b"dir\xff\xfe"),
    ]


def mk(cp: int, label: str = "", **kw) -> Marker:
    return Marker(checkpoint=cp, label=label or f"cp{cp}", time_ns=1_700_000_000_000_000_000 + cp,
                  operations=0, raw_bytes=0, stored_bytes=0, **kw)


def opened(d: Path, **kw) -> OrderedLog:
    log = OrderedLog(d, **kw)
    assert log.open() == []
    return log


def small_batch(cp: int, n: int = 3) -> list:
    return [Write(cp, k * 40, cp, bytes([cp % 256, k]) * 20) for k in range(n)]


def fill(d: Path, n: int, **kw) -> list[CheckpointInfo]:
    log = opened(d, **kw)
    infos = [log.append(small_batch(cp), mk(cp)) for cp in range(1, n + 1)]
    log.close()
    return infos


def as_if_crashed(d: Path) -> None:
    """A crash never reaches close(), which records the log's end (END_FILE): drop it."""
    (d / logmod.END_FILE).unlink(missing_ok=True)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def flip(path: Path, offset: int, bit: int = 0) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 1 << bit
    path.write_bytes(bytes(b))


def seg(d: Path, index: int = 1) -> Path:
    return d / format_segment_name(index)


@pytest.fixture
def d(tmp_path: Path) -> Path:
    return tmp_path / "log"


# ---------------------------------------------------------------- names, compression

def test_segment_names():
    assert format_segment_name(1) == "0000000000000001.fjlog"
    for i in (0, 1, 42, 10**16 - 1, 10**17 + 3):
        assert parse_segment_name(format_segment_name(i)) == i
    for foreign in ("foo", "1.fjlog", "000000000000001.fjlog", "00000000000000001.fjlog",
                    "0000000000000001.fjlog.tmp", "0000000000000001.FJLOG", "-000000000000001.fjlog",
                    "٠٠٠٠٠٠٠٠٠٠٠٠٠٠٠١.fjlog"):
        assert parse_segment_name(foreign) is None, foreign
    with pytest.raises(ValueError):
        format_segment_name(-1)
    assert Position(1, 500) < Position(2, 0) < Position(2, 1)


def test_compression_round_trip_and_errors():
    raw = os.urandom(5000) + b"a" * 100_000
    c = compression.compress(raw)
    assert compression.decompress(c) == raw
    assert compression.decompress(compression.compress(b"")) == b""
    assert compression.decompress(compression.compress(raw, level=9)) == raw
    bad = bytearray(c)
    bad[len(bad) // 2] ^= 4
    for broken in (bytes(bad), c[:-5], c[: len(c) // 2], c + b"xyz", b"", b"hello world"):
        with pytest.raises(CompressionError):
            compression.decompress(broken)
    assert issubclass(CompressionError, ValueError)


def test_batch_frames_leave_the_content_checksum_to_the_entry_crc(d):
    """The log's BATCH frames carry no xxhash32 (FLG bit 2): the entry's CRC-32
    over the compressed payload, checked before decompressing, covers them.
    Frames with it (older logs, pending.fjrec) still decompress."""
    infos = fill(d, 2)
    data = seg(d).read_bytes()
    batches = [(pos, cp) for typ, cp, pos in parse_entries(seg(d), infos[0].start.offset,
                                                           infos[-1].end.offset)
               if typ == logmod.BATCH]
    assert batches
    for pos, _cp in batches:
        length = logmod._ENTRY_HEADER.unpack_from(data, pos)[3]
        frame = data[pos + HDR:pos + HDR + length]
        assert frame[:4] == b"\x04\x22\x4d\x18" and not frame[4] & 0x04
        compression.decompress(frame)
    raw = b"record bytes " * 1000
    with_sum, without = compression.compress(raw), compression.compress(raw, checksum=False)
    assert with_sum[4] & 0x04 and not without[4] & 0x04
    assert compression.decompress(with_sum) == compression.decompress(without) == raw


def test_incompressible_chunks_switch_to_lz4_fast_mode_and_back(d):
    """After a chunk that stores above FAST_ABOVE of its size the log compresses
    in lz4's fast mode, and back at the default once a chunk stores below
    DEFAULT_BELOW; what is read back is the same either way."""
    log = opened(d, chunk_bytes=64 << 10)
    assert log._level(1000, 950) == logmod.FAST_LEVEL       # barely compressed
    assert log._level(1000, 850) == logmod.FAST_LEVEL       # between: stays fast
    assert log._level(1000, 300) == 0                       # compressible again
    assert log._level(1000, 850) == 0                       # between: stays default
    assert log._level(0, 0) == 0
    text = b"".join(b"%08d GET /api/items/%d 200 %d bytes\n" % (i, i * 7, i % 977)
                    for i in range(20_000))
    records = [Write(2, i << 16, 0, os.urandom(60_000)) for i in range(6)]
    records += [Write(3, i << 16, 0, text[i * 60_000:(i + 1) * 60_000]) for i in range(6)]
    log.append_unmarked(iter(records))
    assert not log._fast                                    # the text chunks turned it back
    info = log.append([], mk(1))
    assert list(log.records(info)) == records
    log.close()


# ---------------------------------------------------------------- round trips

def test_round_trip_every_type_big_write_and_empty(d):
    log = opened(d, chunk_bytes=256 << 10)
    batch = every_type(0) + every_type(1, big=3 << 20)
    i1 = log.append(batch, mk(1, "first \u00e9 \udcff", halt_ns=55, extra={"group": ["a", "b"]}))
    i2 = log.append([], mk(2))
    i3 = log.append(iter(every_type(3)), mk(3))
    m = i1.marker
    assert (m.operations, m.raw_bytes) == (len(batch), len(encode(batch)))
    assert m.stored_bytes == i1.end.offset - i1.start.offset
    assert m.halt_ns == 55 and m.extra == {"group": ["a", "b"]}
    assert i1.start == Position(1, FHDR)
    assert i2.marker.operations == 0 and i2.start == i1.end
    assert i2.end.offset - i2.start.offset == i2.marker.stored_bytes
    assert list(log.records(i1)) == batch
    assert list(log.records(i2)) == []
    assert list(log.records(i3)) == every_type(3)
    for i in (i1, i2, i3):
        log.verify(i)
    assert log.checkpoints() == [i1, i2, i3]
    assert log.last_checkpoint == 3
    assert seg(d).stat().st_size == i3.end.offset
    log.close()

    log = opened(d)
    assert log.checkpoints() == [i1, i2, i3]
    got = log.checkpoints()[0].marker
    assert got.label == "first \u00e9 \udcff" and got.extra == {"group": ["a", "b"]}
    assert list(log.records(log.checkpoints()[0])) == batch
    assert read_markers(d) == ([i1.marker, i2.marker, i3.marker], None)
    log.close()


def test_marker_unknown_keys_land_in_extra(d):
    log = opened(d)
    log.append([], mk(1, extra={"future_key": {"x": 1}}))
    log.close()
    log = opened(d)
    assert log.checkpoints()[0].marker.extra == {"future_key": {"x": 1}}
    with pytest.raises(ValueError):
        log.append([], mk(2, extra={"label": "clash"}))
    assert log.last_checkpoint == 1
    log.append([], mk(2))
    log.close()


def test_order_over_many_checkpoints_and_reopen(d):
    infos = fill(d, 60)
    log = opened(d)
    assert log.last_checkpoint == 60
    assert [c.marker.checkpoint for c in log.checkpoints()] == list(range(1, 61))
    assert [c.marker.checkpoint for c in log.checkpoints(after=57)] == [58, 59, 60]
    assert log.checkpoints(after=60) == []
    assert log.checkpoints() == infos
    positions = [(c.start, c.end) for c in log.checkpoints()]
    assert positions == sorted(positions)
    assert all(a.end == b.start for a, b in zip(infos, infos[1:]))
    for c in log.checkpoints(after=50):
        assert list(log.records(c)) == small_batch(c.marker.checkpoint)
    info = log.append(small_batch(61), mk(61))
    assert info.start == infos[-1].end
    log.close()


def test_wrong_checkpoint_number(d):
    log = opened(d)
    for bad in (0, 2, -1):
        with pytest.raises(ValueError):
            log.append([], mk(bad))
    log.append([], mk(1))
    for bad in (1, 3):
        with pytest.raises(ValueError):
            log.append([], mk(bad))
    assert log.last_checkpoint == 1
    log.close()
    with pytest.raises(LogError):
        log.append([], mk(2))


def test_rotation_at_small_segment_limit(d):
    infos = fill(d, 25, segment_limit=600)
    log = opened(d, segment_limit=600)
    segs = log.segments()
    assert len(segs) > 3
    assert [s[0] for s in segs] == list(range(1, len(segs) + 1))
    for index, path, size in segs:
        assert path.name == format_segment_name(index) and path.stat().st_size == size
        cps = [c for c in infos if c.start.segment == index]
        assert cps, "no empty segments"
        assert size == cps[-1].end.offset
        # rotation only once the limit is reached: every segment but the last is full
        if index != segs[-1][0]:
            assert size >= 600
            assert cps[-1].end.offset - cps[-1].start.offset < size
    for c in infos:
        assert c.start.segment == c.end.segment  # never spans two segments
    assert log.checkpoints() == infos
    assert all(list(log.records(c)) == small_batch(c.marker.checkpoint) for c in infos)
    log.close()


def test_streaming_from_a_generator(d, monkeypatch):
    n, size, chunk = 3000, 1000, 16 << 10
    state = {"yielded": 0, "at_first_write": None}

    def gen():
        for k in range(n):
            state["yielded"] += 1
            yield Write(7, k * size, k, bytes([k % 251]) * size)

    real_write = os.write

    def spy(fd, data):
        if state["at_first_write"] is None:
            state["at_first_write"] = state["yielded"]
        return real_write(fd, data)

    log = opened(d, chunk_bytes=chunk)
    log.append([], mk(1))  # the segment exists: the next append's first write is a batch
    monkeypatch.setattr(os, "write", spy)
    info = log.append(gen(), mk(2))
    monkeypatch.undo()
    # the first chunk was written long before the generator was exhausted: after at
    # most COMPRESS_AHEAD chunks were taken (the others being compressed meanwhile)
    assert state["at_first_write"] <= logmod.COMPRESS_AHEAD * (chunk // size + 1) + 1
    entries = parse_entries(seg(d), info.start.offset, info.end.offset)
    batches = [e for e in entries if e[0] == logmod.BATCH]
    assert len(batches) >= n * size // chunk - 1
    assert entries[-1][0] == logmod.MARKER
    assert info.marker.operations == n
    got = log.records(info)
    for k, rec in enumerate(got):
        assert rec == Write(7, k * size, k, bytes([k % 251]) * size)
    assert k == n - 1
    log.verify(info)
    log.close()


def parse_entries(path: Path, start: int, end: int) -> list[tuple[int, int, int]]:
    """(type, checkpoint, offset) of each entry in [start, end), parsed independently."""
    data = path.read_bytes()
    out, pos = [], start
    while pos < end:
        magic, typ, flags, length, cp, pcrc, hcrc = logmod._ENTRY_HEADER.unpack_from(data, pos)
        assert magic == b"FJ" and flags == 0
        assert zlib.crc32(data[pos:pos + HDR - 4]) == hcrc
        assert zlib.crc32(data[pos + HDR:pos + HDR + length]) == pcrc
        out.append((typ, cp, pos))
        pos += HDR + length
    assert pos == end
    return out


# ---------------------------------------------------------------- torn tails

def test_torn_tail_cut_at_every_offset(d, tmp_path):
    log = opened(d, chunk_bytes=50)
    i1 = log.append(small_batch(1), mk(1))
    i2 = log.append(small_batch(2, n=4), mk(2))
    log.close()
    assert len(parse_entries(seg(d), i2.start.offset, i2.end.offset)) >= 3
    full = seg(d).read_bytes()
    for cut in range(i2.start.offset, i2.end.offset + 1):
        as_if_crashed(d)
        seg(d).write_bytes(full[:cut])
        log = OrderedLog(d)
        warnings = log.open()
        assert log.damage is None
        if cut == i2.end.offset:
            assert warnings == [] and log.last_checkpoint == 2
            assert list(log.records(log.checkpoints()[1])) == small_batch(2, n=4)
        else:
            assert log.last_checkpoint == 1, cut
            assert (warnings == []) == (cut == i2.start.offset)
            assert seg(d).stat().st_size == i2.start.offset
            assert log.checkpoints() == [i1]
        log.close()
    # and the log goes on after a cut
    as_if_crashed(d)
    seg(d).write_bytes(full[: i2.end.offset - 1])
    log = OrderedLog(d, chunk_bytes=50)
    [w] = log.open()
    assert "torn tail" in w and "checkpoint 2" in w
    assert log.append(small_batch(2, n=4), mk(2)) == i2
    log.close()
    assert seg(d).read_bytes() == full


def test_torn_new_segment_is_cut_or_removed(d):
    fill(d, 2, segment_limit=100)
    log = opened(d, segment_limit=100)
    i3 = log.append(small_batch(3), mk(3))
    log.close()
    assert i3.start == Position(3, FHDR)
    full = seg(d, 3).read_bytes()
    for cut in list(range(0, FHDR + 30)) + [len(full) - 1]:
        as_if_crashed(d)
        seg(d, 3).write_bytes(full[:cut])
        log = OrderedLog(d, segment_limit=100)
        warnings = log.open()
        assert log.damage is None and log.last_checkpoint == 2
        assert (warnings == []) == (cut == FHDR)
        if cut < FHDR:
            assert not seg(d, 3).exists()
        else:
            assert seg(d, 3).stat().st_size == FHDR
        assert log.append(small_batch(3), mk(3)) == i3
        log.close()
        assert seg(d, 3).read_bytes() == full


def test_garbage_after_last_checkpoint_is_torn(d):
    fill(d, 3)
    with open(seg(d), "ab") as f:
        f.write(b"\0" * 1000 + b"FJ" + os.urandom(100))
    log = OrderedLog(d)
    [w] = log.open()
    assert "torn tail" in w and log.damage is None and log.last_checkpoint == 3
    log.close()


def test_bit_flip_in_last_checkpoint_counts_as_torn(d):
    """Indistinguishable from a crash before the fdatasync: cut, with a warning."""
    infos = fill(d, 3)
    as_if_crashed(d)
    flip(seg(d), infos[2].start.offset + HDR + 5)
    log = OrderedLog(d)
    [w] = log.open()
    assert "checkpoint 3" in w and log.damage is None and log.last_checkpoint == 2
    log.close()


# ---------------------------------------------------------------- damage

def test_flipped_bit_in_middle_checkpoint_at_every_byte(d):
    infos = fill(d, 5)
    path = seg(d)
    full = path.read_bytes()
    c3 = infos[2]
    for off in range(c3.start.offset, c3.end.offset):
        path.write_bytes(full)
        flip(path, off, bit=off % 8)
        log = OrderedLog(d)
        warnings = log.open()
        assert isinstance(log.damage, CorruptLog), off
        assert (log.damage.segment, log.damage.checkpoint) == (1, 3)
        assert c3.start.offset <= log.damage.offset < c3.end.offset
        assert "0000000000000001.fjlog" in str(log.damage) and "checkpoint 3" in str(log.damage)
        assert any("checkpoint 3" in w for w in warnings)
        assert log.checkpoints() == infos[:2] and log.last_checkpoint == 2
        assert path.stat().st_size == len(full)  # damage is never cut at open
        log.close()
    log = OrderedLog(d)
    log.open()
    for c in log.checkpoints():
        log.verify(c)
        assert list(log.records(c)) == small_batch(c.marker.checkpoint)
    with pytest.raises(LogError, match="damaged"):
        log.append([], mk(3))
    assert log.prune(10) == []
    log.close()


def test_damage_in_earlier_segment(d):
    infos = fill(d, 12, segment_limit=400)
    log = opened(d, segment_limit=400)
    assert len(log.segments()) >= 4
    log.close()
    victim = next(c for c in infos if c.start.segment == 2)
    flip(seg(d, 2), victim.end.offset - 3)  # in its marker's JSON
    log = OrderedLog(d, segment_limit=400)
    log.open()
    assert (log.damage.segment, log.damage.checkpoint) == (2, victim.marker.checkpoint)
    assert log.last_checkpoint == victim.marker.checkpoint - 1
    assert log.checkpoints() == [c for c in infos if c.marker.checkpoint < victim.marker.checkpoint]
    log.close()


def test_missing_middle_segment_is_damage(d):
    infos = fill(d, 12, segment_limit=400)
    os.unlink(seg(d, 2))
    log = OrderedLog(d)
    log.open()
    assert log.damage.segment == 3 and "missing" in str(log.damage)
    assert log.checkpoints() == [c for c in infos if c.start.segment == 1]
    log.close()


def test_corruption_after_open_is_caught_by_readers(d):
    log = opened(d, chunk_bytes=60)
    infos = [log.append(small_batch(cp), mk(cp)) for cp in (1, 2, 3)]
    flip(seg(d), infos[1].start.offset + HDR + 3)
    with pytest.raises(CorruptLog) as e:
        log.verify(infos[1])
    assert (e.value.segment, e.value.checkpoint) == (1, 2)
    assert "checkpoint 2" in str(e.value) and format_segment_name(1) in str(e.value)
    with pytest.raises(CorruptLog):
        list(log.records(infos[1]))
    log.verify(infos[0])
    log.verify(infos[2])
    log.close()


def test_verify_catches_valid_crc_but_undecodable_batch(d):
    log = opened(d)
    i1 = log.append(small_batch(1), mk(1))
    log.close()
    # hand-craft checkpoint 2: a batch entry whose checksums are right but whose
    # payload is not lz4, then a proper marker
    junk = b"not an lz4 frame"
    body = logmod._entry_header(logmod.BATCH, 2, junk) + junk
    m, payload = logmod._final_marker(mk(2), 1, 10, len(body))
    body += logmod._entry_header(logmod.MARKER, 2, payload) + payload
    with open(seg(d), "ab") as f:
        f.write(body)
    log = opened(d)  # open checks checksums only
    i2 = log.checkpoints()[1]
    with pytest.raises(CorruptLog, match="lz4"):
        log.verify(i2)
    with pytest.raises(CorruptLog):
        list(log.records(i2))
    log.close()
    rep = fsck(d)
    assert rep.checkpoints_ok == 1 and rep.last_checkpoint == 1 and "checkpoint 2" in rep.damage[0]
    rep = fsck(d, repair=True)
    assert seg(d).stat().st_size == i1.end.offset
    assert fsck(d).clean


def _rewrite_entry_checkpoint(path: Path, offset: int, checkpoint: int) -> None:
    """Give the entry at offset another checkpoint id, with valid checksums."""
    data = bytearray(path.read_bytes())
    magic, typ, flags, length, _, pcrc, _ = logmod._ENTRY_HEADER.unpack_from(data, offset)
    head = logmod._ENTRY_HEADER.pack(magic, typ, flags, length, checkpoint, pcrc, 0)[:-4]
    data[offset:offset + HDR] = head + struct.pack("<I", zlib.crc32(head))
    path.write_bytes(bytes(data))


def test_entry_from_the_wrong_checkpoint(d):
    infos = fill(d, 4)
    _rewrite_entry_checkpoint(seg(d), infos[1].start.offset, 3)
    log = OrderedLog(d)
    log.open()
    assert log.damage.checkpoint == 2 and "belongs to checkpoint 3" in str(log.damage)
    assert log.checkpoints() == infos[:1]
    log.close()
    # a reader holding an index from before the change notices it too
    shutil.rmtree(d)
    infos = fill(d, 4)
    log = opened(d)
    _rewrite_entry_checkpoint(seg(d), infos[1].start.offset, 3)
    with pytest.raises(CorruptLog, match="belongs to checkpoint 3"):
        list(log.records(infos[1]))
    log.close()


def test_verify_checks_marker_counts(d):
    fill(d, 1)
    batch = small_batch(2)
    payload = compression.compress(encode(batch))
    body = logmod._entry_header(logmod.BATCH, 2, payload) + payload
    m, mp = logmod._final_marker(mk(2), len(batch) + 1, len(encode(batch)), len(body))
    body += logmod._entry_header(logmod.MARKER, 2, mp) + mp
    with open(seg(d), "ab") as f:
        f.write(body)
    log = opened(d)
    info = log.checkpoints()[1]
    assert list(log.records(info)) == batch
    with pytest.raises(CorruptLog, match="marker says"):
        log.verify(info)
    log.close()
    assert fsck(d).checkpoints_ok == 1


def test_format_too_new(d):
    fill(d, 2)
    data = bytearray(seg(d).read_bytes())
    struct.pack_into("<H", data, 6, logmod.LOG_FORMAT + 1)
    seg(d).write_bytes(bytes(data))
    with pytest.raises(FormatTooNew):
        OrderedLog(d).open()
    with pytest.raises(FormatTooNew):
        fsck(d, repair=True)
    assert seg(d).read_bytes() == bytes(data)


# ---------------------------------------------------------------- append failures

def _assert_unchanged_then_append_works(d, before, infos, **kw):
    assert snapshot(d) == before
    log = opened(d, **kw)
    assert log.checkpoints() == infos
    cp = len(infos) + 1
    log.append(small_batch(cp), mk(cp))
    assert [c.marker.checkpoint for c in log.checkpoints()] == list(range(1, cp + 1))
    log.close()


@pytest.mark.parametrize("rotate", [False, True])
def test_append_failure_from_the_iterable(d, rotate):
    kw = {"segment_limit": 200 if rotate else 1 << 20, "chunk_bytes": 100}
    infos = fill(d, 3, **kw)
    before = snapshot(d)
    log = opened(d, **kw)

    def gen():
        yield from small_batch(4, n=10)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        log.append(gen(), mk(4))
    assert snapshot(d) == before and log.checkpoints() == infos and log.last_checkpoint == 3
    with pytest.raises(TypeError):
        log.append([small_batch(4)[0], "not a record"], mk(4))
    assert snapshot(d) == before
    i4 = log.append(small_batch(4), mk(4))  # the same log object goes on
    assert log.checkpoints() == infos + [i4]
    log.close()
    log = opened(d, **kw)
    assert log.checkpoints() == infos + [i4]
    log.close()


@pytest.mark.parametrize("failing_call", [1, 2, 3, 5])
def test_append_failure_in_a_compression_in_flight(d, monkeypatch, failing_call):
    """lz4 failing on one chunk while others are being compressed beside it: the
    append raises, nothing of it stays in the log, and the log goes on."""
    kw = {"chunk_bytes": 100}
    infos = fill(d, 2, **kw)
    before = snapshot(d)
    log = opened(d, **kw)
    real, calls = compression.compress, {"n": 0}

    def flaky(data, **kw2):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise MemoryError("lz4 could not allocate")
        return real(data, **kw2)

    monkeypatch.setattr(compression, "compress", flaky)
    with pytest.raises(MemoryError):
        log.append(small_batch(3, n=10), mk(3))
    with pytest.raises(MemoryError):
        calls["n"] = failing_call - 1
        log.append_unmarked(small_batch(3, n=10))
    monkeypatch.undo()
    assert snapshot(d) == before and log.checkpoints() == infos
    i3 = log.append(small_batch(3, n=10), mk(3))
    assert list(log.records(i3)) == small_batch(3, n=10)
    log.close()


@pytest.mark.parametrize("rotate,where", [
    (rotate, where) for rotate in (False, True) for where in ("fdatasync", "write-first", "write-late")
] + [(True, "fsync-dir")])  # the directory is only fsynced for a new segment
def test_append_failure_enospc(d, monkeypatch, rotate, where):
    kw = {"segment_limit": 200 if rotate else 1 << 20, "chunk_bytes": 100}
    infos = fill(d, 3, **kw)
    before = snapshot(d)
    log = opened(d, **kw)
    calls = {"n": 0}

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_write = os.write

    def write_fails_after(limit):
        def w(fd, data):
            calls["n"] += 1
            if calls["n"] > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)
        return w

    if where == "fdatasync":
        monkeypatch.setattr(os, "fdatasync", enospc)
    elif where == "write-first":
        monkeypatch.setattr(os, "write", write_fails_after(0))
    elif where == "write-late":
        monkeypatch.setattr(os, "write", write_fails_after(5))
    else:
        monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError) as e:
        log.append(small_batch(4, n=10), mk(4))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(d) == before
    assert log.checkpoints() == infos and log.last_checkpoint == 3
    log.close()
    _assert_unchanged_then_append_works(d, before, infos, **kw)


# ---------------------------------------------------------------- fsck

def test_fsck_clean_and_torn(d):
    infos = fill(d, 4)
    rep = fsck(d)
    assert rep.clean and rep.checkpoints_ok == 4 and rep.last_checkpoint == 4 and rep.repaired == []
    with open(seg(d), "ab") as f:
        f.write(b"FJ partial entry")
    before = snapshot(d)
    rep = fsck(d)
    assert rep.torn_tail and "checkpoint 5" in rep.torn_tail and rep.damage == []
    assert rep.checkpoints_ok == 4 and rep.repaired == []
    assert snapshot(d) == before
    rep = fsck(d, repair=True)
    assert rep.repaired and seg(d).stat().st_size == infos[-1].end.offset
    assert fsck(d).clean


def test_fsck_report_vs_repair_on_damage(d):
    infos = fill(d, 20, segment_limit=500)
    victim = infos[7]
    flip(seg(d, victim.start.segment), victim.start.offset + 2)
    before = snapshot(d)
    stats = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    rep = fsck(d)
    assert snapshot(d) == before
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stats
    assert rep.checkpoints_ok == 7 and rep.last_checkpoint == 7 and rep.repaired == []
    assert "checkpoint 8" in rep.damage[0]
    assert format_segment_name(victim.start.segment) in rep.damage[0]
    assert "8..20" in rep.damage[1]
    assert read_markers(d)[1] is not None

    rep = fsck(d, repair=True)
    assert any("lost" in r and "8..20" in r for r in rep.repaired)
    assert rep.last_checkpoint == 7
    assert max(int(p.name[:16]) for p in d.iterdir()) == victim.start.segment
    assert seg(d, victim.start.segment).stat().st_size == victim.start.offset
    assert fsck(d).clean
    log = opened(d, segment_limit=500)
    assert log.checkpoints() == infos[:7] and log.damage is None
    log.append(small_batch(8), mk(8))
    log.close()


# ---------------------------------------------------------------- prune

def test_prune(d):
    infos = fill(d, 20, segment_limit=500)
    log = opened(d, segment_limit=500)
    segs = log.segments()
    assert len(segs) >= 4
    last_of = {}
    for c in infos:
        last_of[c.start.segment] = c.marker.checkpoint
    cut = last_of[2]
    removed = log.prune(cut)
    assert removed == [seg(d, 1), seg(d, 2)]
    assert not seg(d, 1).exists() and seg(d, 3).exists()
    assert log.checkpoints() == [c for c in infos if c.start.segment > 2]
    assert log.prune(cut) == []
    assert log.prune(last_of[3] - 1) == []  # segment 3 still holds a later checkpoint
    removed = log.prune(19)
    assert [p.name for p in removed] == [format_segment_name(s[0]) for s in segs[2:-1]]
    assert [s[0] for s in log.segments()] == [segs[-1][0]]  # it holds checkpoint 20: kept
    assert log.last_checkpoint == 20
    log.append([], mk(21))
    log.close()
    log = opened(d, segment_limit=500)
    assert log.last_checkpoint == 21 and log.checkpoints()[0].marker.checkpoint == last_of[segs[-1][0] - 1] + 1
    log.close()


def test_prune_keeps_checkpoint_numbering_with_an_empty_last_segment(d):
    fill(d, 3, segment_limit=100)
    log = opened(d, segment_limit=100)
    i4 = log.append(small_batch(4), mk(4))
    log.close()
    path = seg(d, 4)
    as_if_crashed(d)
    path.write_bytes(path.read_bytes()[: FHDR + 10])  # crash during checkpoint 4
    log = OrderedLog(d, segment_limit=100)
    assert len(log.open()) == 1
    assert log.prune(3) == [seg(d, 1), seg(d, 2), seg(d, 3)]
    log.close()
    log = opened(d, segment_limit=100)
    assert log.last_checkpoint == 3 and log.checkpoints() == []  # from the segment header
    assert log.append(small_batch(4), mk(4)) == i4
    log.close()


# ---------------------------------------------------------------- rolling the last segment

def test_an_applied_full_last_segment_is_rolled_and_pruned(d):
    """Once the shadow holds every checkpoint of a last segment over the limit, prune
    begins an empty segment (its header alone keeps the ids going) and deletes the old
    one: the checkpoint does not wait for the next one to be freed."""
    infos = fill(d, 6, segment_limit=500)
    log = opened(d, segment_limit=500)
    last = log.segments()[-1][0]
    assert log.segments()[-1][2] >= 500
    assert log.prune(5) == [seg(d, i) for i in range(1, last)]     # cp 6 not applied: no roll
    assert [s[0] for s in log.segments()] == [last]
    assert log.prune(6) == [seg(d, last)]
    assert [(s[0], s[2]) for s in log.segments()] == [(last + 1, FHDR)]
    assert log.last_checkpoint == 6 and log.checkpoints() == []
    assert log.prune(10**9) == []                                  # an empty segment: nothing to roll
    i7 = log.append(small_batch(7), mk(7))
    assert i7.start == Position(last + 1, FHDR)
    log.close()
    log = opened(d, segment_limit=500)                             # END_FILE agrees (6 < 7)
    assert log.last_checkpoint == 7 and log.checkpoints() == [i7]
    assert list(log.records(i7)) == small_batch(7)
    log.close()
    rep = fsck(d)
    assert rep.clean and rep.last_checkpoint == 7
    assert infos[-1].marker.checkpoint == 6


def test_no_roll_below_the_limit_or_with_streamed_entries(d):
    fill(d, 3, segment_limit=1 << 20)
    log = opened(d, segment_limit=1 << 20)
    assert log.prune(10**9) == []                                  # under the limit: kept
    log.close()
    log = opened(d, segment_limit=100)                             # now over it
    log.append_unmarked(small_batch(4))                            # begins segment 2
    assert log.prune(10**9) == [seg(d, 1)]
    assert log.segments()[-1][0] == 2 and log.segments()[-1][2] > 100
    assert log.prune(10**9) == []        # entries of checkpoint 4 follow the last marker: kept
    i4 = log.append([], mk(4))
    assert list(log.records(i4)) == small_batch(4)
    assert log.prune(3) == []                                      # checkpoint 4 not applied
    assert log.prune(4) == [seg(d, 2)]
    assert [(s[0], s[2]) for s in log.segments()] == [(3, FHDR)]
    log.close()


@pytest.mark.parametrize("where", ["open", "write", "fdatasync", "fsync-dir"])
def test_a_roll_that_fails_leaves_the_log_as_it_was(d, monkeypatch, caplog, where):
    """A full journal (ENOSPC) or EIO while beginning the new segment: no stray file,
    the old segment kept, a warning; the next prune rolls."""
    infos = fill(d, 3, segment_limit=100)
    log = opened(d, segment_limit=100)
    assert log.prune(2) == [seg(d, 1), seg(d, 2)]
    before = snapshot(d)

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_open = os.open
    if where == "open":
        monkeypatch.setattr(os, "open", lambda p, *a, **k: enospc() if str(p).endswith("4.fjlog")
                            else real_open(p, *a, **k))
    elif where == "write":
        monkeypatch.setattr(os, "write", enospc)
    elif where == "fdatasync":
        monkeypatch.setattr(os, "fdatasync", enospc)
    else:
        monkeypatch.setattr(os, "fsync", enospc)
    with caplog.at_level("WARNING", logger="fusejournal"):
        assert log.prune(3) == []
    assert "could not begin segment 0000000000000004.fjlog" in caplog.text
    assert "No space left on device" in caplog.text
    monkeypatch.undo()
    assert snapshot(d) == before and log.checkpoints() == infos[2:]
    assert log.prune(3) == [seg(d, 3)]
    i4 = log.append(small_batch(4), mk(4))
    assert i4.start == Position(4, FHDR)
    log.close()


@pytest.mark.parametrize("cut", list(range(0, FHDR + 1)))
def test_a_crash_during_the_roll_reads_back_the_same_log(d, cut):
    """Killed after the new segment's file was made, at any length of its header, and
    before the old one was deleted: the next open keeps the old segment and either
    removes the torn new one or keeps it empty; the ids go on either way."""
    infos = fill(d, 3, segment_limit=100)
    old = seg(d, 3).read_bytes()
    log = opened(d, segment_limit=100)
    log.prune(3)
    log.close()
    header = seg(d, 4).read_bytes()
    assert len(header) == FHDR and not seg(d, 3).exists()
    as_if_crashed(d)
    seg(d, 3).write_bytes(old)                     # the old segment not yet deleted
    seg(d, 4).write_bytes(header[:cut])
    log = OrderedLog(d, segment_limit=100)
    warnings = log.open()
    assert log.damage is None and log.last_checkpoint == 3
    assert log.checkpoints() == infos[2:]
    assert len(warnings) == (cut < FHDR)
    assert seg(d, 4).exists() == (cut == FHDR)
    assert log.prune(3) == [seg(d, 3)]             # rolled again, or the empty one kept
    assert [(s[0], s[2]) for s in log.segments()] == [(4, FHDR)]
    i4 = log.append(small_batch(4), mk(4))
    assert i4.start == Position(4, FHDR)
    log.close()
    assert fsck(d).clean


# ---------------------------------------------------------------- threads, hypothesis

def test_concurrent_reader_while_appending(d):
    log = opened(d, segment_limit=2000, chunk_bytes=64)
    stop = threading.Event()
    errors, seen = [], []

    def reader():
        try:
            while not stop.is_set():
                cps = log.checkpoints()
                for c in cps[-3:]:
                    log.verify(c)
                    assert list(log.records(c)) == small_batch(c.marker.checkpoint)
                seen.append(len(cps))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for cp in range(1, 101):
            log.append(small_batch(cp), mk(cp))
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert seen == sorted(seen)
    assert log.last_checkpoint == 100
    log.close()


_bytes = st.binary(max_size=40)
_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)
_i64 = st.integers(-(2**63), 2**63 - 1)
_record = st.one_of(
    st.builds(Mknod, _u64, _u32, _u32, _u32, _u64, _i64, _i64, _bytes),
    st.builds(Mkdir, _u32, _u32, _u32, _i64, _i64, _bytes),
    st.builds(Symlink, _u64, _u32, _u32, _i64, _i64, _bytes, _bytes),
    st.builds(Link, _u64, _i64, _bytes),
    st.builds(Unlink, _u64, _i64, _bytes),
    st.builds(Rmdir, _i64, _bytes),
    st.builds(Rename, _u32, _u64, _i64, _i64, _bytes, _bytes),
    st.builds(Write, _u64, _u64, _i64, st.binary(max_size=3000)),
    st.builds(Setattr, _u64, _u32, _u32, _u32, _u32, _u64, _i64, _i64, _bytes),
    st.builds(Setxattr, _u64, _bytes, _bytes, _bytes),
    st.builds(Removexattr, _u64, _bytes, _bytes),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(_record, max_size=30), min_size=1, max_size=5),
       chunk=st.integers(1, 5000), limit=st.integers(1, 20000))
def test_random_batches_round_trip(tmp_path, batches, chunk, limit):
    d = tmp_path / f"h{os.urandom(6).hex()}"
    log = opened(d, chunk_bytes=chunk, segment_limit=limit)
    for cp, batch in enumerate(batches, 1):
        info = log.append(iter(batch), mk(cp))
        assert info.marker.operations == len(batch)
        assert info.marker.raw_bytes == len(encode(batch))
    log.close()
    log = opened(d, chunk_bytes=chunk, segment_limit=limit)
    assert [list(log.records(c)) for c in log.checkpoints()] == batches
    for c in log.checkpoints():
        log.verify(c)
    log.close()
    assert fsck(d).clean
    shutil.rmtree(d)


def test_fsck_of_a_missing_directory_is_empty_and_read_only(tmp_path):
    rep = fsck(tmp_path / "nope")
    assert rep.clean and rep.last_checkpoint == 0 and not (tmp_path / "nope").exists()
