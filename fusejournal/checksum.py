"""CRC-32 for the ordered log's entries and the history's frames.

The checksum is zlib's CRC-32 (the polynomial of gzip and PNG); docs/format.md
specifies it.  ISA-L's implementation (python-isal, installed with
fusejournal where it has wheels) computes the same values about 9 × faster
than the zlib Debian 12 ships (20.7 against 2.3 GB/s on the test machine), which
matters because every byte journaled is checksummed twice: when its log entry
is packed and when the updater verifies it (docs/performance-analysis.md,
"1 MiB writes").  Without it, zlib's: the same values, only slower, so the
on-disk formats do not depend on which one wrote them.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
    FAST = True
except ImportError:  # pragma: no cover - where python-isal has no wheel
    from zlib import crc32
    FAST = False

__all__ = ["crc32", "FAST"]
