"""decode()'s fast path for writes gives exactly what the general path gives:
the same records for every valid batch, the same RecordError for every damaged one."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusejournal.records import Link, Mkdir, RecordError, Setattr, Write, _decode_one, decode, encode


def general(buf: bytes) -> list:
    """The reference: every record through the general path."""
    mv = memoryview(buf)
    out, pos = [], 0
    while pos < len(mv):
        rec, pos = _decode_one(mv, pos, len(mv))
        out.append(rec)
    return out


def outcome(fn, buf: bytes):
    try:
        return fn(buf)
    except RecordError as e:
        return ("error", str(e))


def fast(buf: bytes) -> list:
    return list(decode(buf))


u64 = st.integers(0, 2**64 - 1)
times = st.integers(-(2**63) * 10**9, (2**63 - 1) * 10**9)
records = st.lists(st.one_of(
    st.builds(Write, u64, u64, times, st.binary(max_size=300)),
    st.builds(Link, u64, times, st.binary(max_size=20)),
    st.builds(Mkdir, st.integers(0, 0o7777), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
              times, times, st.binary(max_size=20)),
    st.builds(Setattr, u64, st.integers(0, 63), st.integers(0, 0o7777), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1), u64, times, times, st.binary(max_size=10)),
), max_size=30)


def _bytes(recs) -> bytes:
    return encode(recs)


@settings(max_examples=300, deadline=None)
@given(recs=records)
def test_valid_batches_decode_the_same(recs):
    buf = _bytes(recs)
    assert fast(buf) == general(buf) == recs


@settings(max_examples=500, deadline=None)
@given(recs=records.filter(bool), data=st.data())
def test_damaged_batches_fail_the_same(recs, data):
    buf = bytearray(_bytes(recs))
    how = data.draw(st.sampled_from(["flip", "cut", "grow", "byte"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "cut":
        buf = buf[:data.draw(st.integers(0, len(buf) - 1))]
    elif how == "grow":
        buf += data.draw(st.binary(min_size=1, max_size=40))
    else:
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    assert outcome(fast, bytes(buf)) == outcome(general, bytes(buf))


@pytest.mark.parametrize("field,value,msg", [
    ("ns", 10**9, "bad nanoseconds"),
    ("len", 5, "field runs past its end"),
    ("len", 1, "has trailing bytes"),
])
def test_a_bad_write_gets_the_general_paths_error(field, value, msg):
    buf = bytearray(_bytes([Write(1, 2, 3, b"abc")]))
    off = {"ns": 5 + 24, "len": 5 + 28}[field]
    buf[off:off + 4] = value.to_bytes(4, "little")
    with pytest.raises(RecordError, match=msg):
        fast(bytes(buf))


def test_a_batch_of_big_writes():
    recs = [Write(7, i * 8192, 10**18 + i, os.urandom(8192)) for i in range(50)]
    assert fast(_bytes(recs)) == recs
