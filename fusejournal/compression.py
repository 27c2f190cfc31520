"""Compression of record batches: one standard LZ4 frame per chunk.

The frame carries its own content size and content checksum (xxhash32), so a
damaged chunk is caught here even if the log's own crc32 were to miss it.
Nothing is hand-rolled: framing and checksums are lz4's.
"""

from __future__ import annotations

import lz4.frame


class CompressionError(ValueError):
    """Data that is not exactly one complete, intact LZ4 frame."""


def compress(raw: bytes, *, level: int = 0) -> bytes:
    """Compress ``raw`` into one LZ4 frame (``level`` 0 = default, fast)."""
    out: bytes = lz4.frame.compress(raw, compression_level=level,
                                    content_checksum=True, store_size=True)
    return out


def decompress(data: bytes | memoryview) -> bytes:
    """Decompress one LZ4 frame made by :func:`compress`.

    Raises :class:`CompressionError` if the frame is corrupt (bad checksum,
    bad block), incomplete, or followed by trailing bytes.
    """
    d = lz4.frame.LZ4FrameDecompressor()
    try:
        out: bytes = d.decompress(bytes(data))
    except (RuntimeError, ValueError, EOFError, OverflowError) as e:
        raise CompressionError(f"corrupt lz4 frame: {e}") from e
    if not d.eof:
        raise CompressionError(f"incomplete lz4 frame ({len(data)} bytes)")
    if d.unused_data:
        raise CompressionError(f"{len(d.unused_data)} trailing bytes after the lz4 frame")
    return out
