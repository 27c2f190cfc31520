"""The CRC-32 of the log and the history (fusejournal/checksum.py): the same values
as zlib's, whichever implementation is installed, for every buffer type they get."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from fusejournal import checksum


@given(st.binary(max_size=1 << 16), st.integers(0, 2**32 - 1), st.integers(0, 64))
def test_same_values_as_zlib(data: bytes, start: int, cut: int) -> None:
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(data, start) == zlib.crc32(data, start)
    for buf in (bytearray(data), memoryview(data)[cut:]):
        assert checksum.crc32(buf) == zlib.crc32(buf)
    # running: the log checksums a payload in parts (_crc_range, _pack)
    head, tail = data[:cut], data[cut:]
    assert checksum.crc32(tail, checksum.crc32(head)) == zlib.crc32(data)


def test_large_buffer() -> None:
    data = bytes(range(256)) * 40_000            # 10 MB: past any small-buffer path
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(memoryview(data)[3:]) == zlib.crc32(data[3:])
