"""Superseded writes: writes of a batch the updater need not apply.

A batch often writes the same bytes many times.  PostgreSQL writes the WAL's
current 8 KiB page again at every commit until the page is full, SQLite and
other databases rewrite their hot pages, an editor saves a file twice.  In
10 s of pgbench (scale 10, 4 clients) 69–81 % of the batch's WRITE records,
61–76 % of its bytes, were rewritten later in the same batch at the same
offset (docs/design.md, "Less work per batch").  Only the last write of a range
decides what the shadow holds at the checkpoint, so the updater skips a
write when a *later* write of the same batch, to the same object at the same
offset, is at least as long.

The set is found in the pass that verifies the batch before anything of it
is applied (:meth:`Superseded.note` on every record, in order); the apply
pass then asks ``index in superseded``.

Why skipping keeps the shadow exact (promise 1):

1. A write to inode key K at offset o of n bytes, followed later in the batch
   by a write to K at o of m >= n bytes: after the later one, bytes
   [o, o + n) are its bytes whatever came between, because no record reads
   a file's bytes (a truncate, a rename, a link, an xattr or a mode change
   sets no byte in that range that the later write does not set again).
2. The size: the later write reaches at least as far, so any extension the
   skipped one made is made again.
3. The mtime: the later write sets the object's deferred mtime after the
   skipped one would have, in order; nothing reads the deferred mtime in
   between (``_Applier.note``), so the skipped write needs no accounting.
4. An inode key created again in the batch (Mknod or Symlink with that key:
   the original freed the old object, so nothing can see its bytes) starts
   a new generation of the key: a write is only ever skipped because of a
   later write to the *same* object.
5. History (fusejournal/history.py): a reverse batch keeps each range's
   first pre-image, read from the shadow just before the first write
   applied to it.  A skipped write changed nothing, so that is still the
   shadow at the previous checkpoint.
6. A batch resumed after a kill computes the same set from the same
   records.  The cursor is not advanced past a skipped write by itself (it
   moves after the next applied record), so a resumed batch may meet a
   skipped write again, and skips it again.

Memory: one bit per record of the batch (the marker's count), and at most
:data:`WINDOW` tracked (key, generation, offset) entries (about 12 MB when
full, measured with tracemalloc).  When the window is full it starts empty
again: writes tracked before are no longer skipped (fewer writes skipped,
never a wrong one).  A repeated page is almost always rewritten soon after,
so the window keeps what matters.
"""

from __future__ import annotations

from .records import Mknod, Record, Symlink, Write

#: how many (key, generation, offset) entries are tracked at once
WINDOW = 1 << 16


class Superseded:
    """The indices of the records of one batch that are writes a later write replaces."""

    def __init__(self, records: int = 0, window: int = WINDOW) -> None:
        """``records``: how many records the batch has (the marker's count), a size hint."""
        self._bits = bytearray((max(records, 0) + 7) // 8)
        self._window = window
        #: (inode key, generation, offset) -> (index, length) of the last write there
        self._last: dict[tuple[int, int, int], tuple[int, int]] = {}
        #: inode key -> generation, bumped when the key names a new object
        self._gen: dict[int, int] = {}
        self.count = 0
        self.bytes = 0

    def note(self, index: int, rec: Record) -> int | None:
        """Account for record ``index`` of the batch; call on every record, in order.
        Returns the index of the earlier write this one supersedes, if any."""
        t = type(rec)
        if t is Write:
            w: Write = rec      # type: ignore[assignment]
            key = (w.ino, self._gen.get(w.ino, 0), w.offset)
            n = len(w.data)
            prev = self._last.get(key)
            self._last[key] = (index, n)
            if prev is not None and n >= prev[1]:
                self._set(prev[0])
                self.count += 1
                self.bytes += prev[1]
                return prev[0]
            if prev is None and len(self._last) > self._window:
                self._forget()
                self._last[key] = (index, n)
        elif t is Mknod or t is Symlink:
            ino = rec.ino       # type: ignore[union-attr]
            if len(self._gen) >= self._window:
                self._forget()
            self._gen[ino] = self._gen.get(ino, 0) + 1
        return None

    def _forget(self) -> None:
        """Start the window empty (generations go with the writes they tell apart)."""
        self._last.clear()
        self._gen.clear()

    def _set(self, index: int) -> None:
        i = index >> 3
        if i >= len(self._bits):        # more records than the hint said
            self._bits.extend(bytes(i + 1 - len(self._bits)))
        self._bits[i] |= 1 << (index & 7)

    def __contains__(self, index: int) -> bool:
        i = index >> 3
        return 0 <= i < len(self._bits) and bool(self._bits[i] & (1 << (index & 7)))
