"""Compression of record batches: one standard LZ4 frame per chunk.

The frame carries its own content size and, by default, its own content
checksum (xxhash32), so a damaged chunk is caught here even where nothing
outside the frame checks it (``pending.fjrec``, history revs).  The ordered
log's BATCH entries leave the content checksum out (``checksum=False``): the
entry's CRC-32 over the compressed payload is checked before every
decompression, and the xxhash32 cost a third of the compressor's time on
incompressible data (docs/performance-analysis.md).  Either kind of frame
decompresses here.  Nothing is hand-rolled: framing and checksums are lz4's.
"""

from __future__ import annotations

import lz4.frame


class CompressionError(ValueError):
    """Data that is not exactly one complete, intact LZ4 frame."""


def compress(raw: bytes | bytearray | memoryview, *, level: int = 0, checksum: bool = True) -> bytes:
    """Compress ``raw`` into one LZ4 frame (``level`` 0 = default, fast).

    ``checksum=False`` omits the frame's content checksum: only for a caller
    that checksums the compressed bytes itself and checks that first."""
    out: bytes = lz4.frame.compress(raw, compression_level=level,
                                    content_checksum=checksum, store_size=True)
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
