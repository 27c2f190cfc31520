"""The temporary store: ordered records of every successful mutating operation.

Records are appended in the order the operations completed on the original
tree.  The store is a list of *parts*: in-memory lists of records of about
``chunk_bytes`` each, :class:`SpillRef` ranges of a spill file, or
:class:`LogRef` records already in the ordered log (a batch whose group
checkpoint was aborted).  When the records held in memory exceed
``memory_limit``, each newly filled chunk is encoded and written to the spill
file (a few milliseconds per 4 MiB chunk), so the daemon's memory stays near
the limit however much is pending.  With the streamer running
(:mod:`fusejournal.streamer`) the store is drained into the ordered log in the
background and spilling is the overflow valve for when the streamer cannot
keep up or is paused (docs/design.md, "Streaming the log").

:meth:`TempStore.take` is the acquisition's primitive: it swaps the whole
content out as a :class:`Batch` in O(1) (no record is copied or encoded), and
the store starts empty.  :meth:`TempStore.take_front` is the streamer's: it
takes the oldest parts, up to a byte budget (O(parts taken)).
:meth:`TempStore.restore` puts a batch whose checkpoint (or streamed append)
failed back in front, so nothing captured is lost and the order is kept.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import records as rec_mod
from .records import Record

#: a spill file no longer takes new chunks beyond this size (it is closed once every
#: chunk in it was streamed or checkpointed, so the journal's space comes back)
SPILL_FILE_LIMIT = 16 << 20


@dataclass
class SpillFile:
    """An anonymous (O_TMPFILE) file holding encoded records.

    ``refs`` counts the :class:`SpillRef` s into it plus one while the store
    still writes into it (``writing``); the fd is closed when the count drops
    to zero, and a file the store still writes into is emptied (its space
    given back) as soon as no range of it is referenced."""
    fd: int
    size: int = 0
    refs: int = 1
    writing: bool = True

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        elif self.refs == 1 and self.writing and self.size:
            try:
                os.ftruncate(self.fd, 0)
                self.size = 0
            except OSError:
                pass        # the space comes back when the file is closed


@dataclass
class SpillRef:
    file: SpillFile
    offset: int
    length: int
    count: int

    def records(self) -> Iterator[Record]:
        data = os.pread(self.file.fd, self.length, self.offset)
        if len(data) != self.length:
            raise OSError(f"spill file short read ({len(data)} of {self.length} bytes)")
        return rec_mod.decode(data)

    def release(self) -> None:
        self.file.release()


@dataclass
class LogRef:
    """Records that are in the ordered log already (an appended checkpoint whose
    group checkpoint was aborted), read back from it chunk by chunk."""
    source: Callable[[], Iterator[Record]]
    length: int
    count: int

    def records(self) -> Iterator[Record]:
        return self.source()

    def release(self) -> None:
        pass


Part = list[Record] | SpillRef | LogRef
_WRITE_OVERHEAD = rec_mod.record_size(rec_mod.Write(0, 0, 0, b""))


@dataclass
class Batch:
    """What the acquisition (or the streamer) took out of the store: records in
    order, not yet encoded.  ``sizes[i]`` is the encoded size of ``parts[i]``."""
    parts: list[Part] = field(default_factory=list)
    operations: int = 0
    raw_bytes: int = 0
    sizes: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[Record]:
        for part in self.parts:
            if isinstance(part, list):
                yield from part
            else:
                yield from part.records()

    def close(self) -> None:
        """Drop the batch (after it is durably in the log): frees its spill files."""
        for part in self.parts:
            if not isinstance(part, list):
                part.release()
        self.parts = []
        self.sizes = []


class TempStore:
    #: journal space kept free beyond what the pending records need
    RESERVE = 8 << 20

    def __init__(self, spill_dir: str | os.PathLike[str] | None = None, *,
                 memory_limit: int = 64 << 20, chunk_bytes: int = 4 << 20) -> None:
        self.spill_dir = spill_dir
        self.memory_limit = memory_limit
        self.chunk_bytes = chunk_bytes
        self._free = 0
        self._free_at = -1.0
        self._since_statvfs = 0
        #: called (in the thread that appends) each time a chunk is filled: the
        #: streamer's wake-up
        self.on_chunk: Callable[[], None] | None = None
        self._spill: SpillFile | None = None
        self.spilled_total = 0          # bytes ever spilled (status, tests)
        self._reset()

    def _reset(self) -> None:
        self._parts: list[Part] = []
        self._sizes: list[int] = []   # encoded size of each part; the last one's is _cur_bytes
        self._cur: list[Record] = []
        self._cur_bytes = 0
        self._mem_bytes = 0          # bytes of records held in memory (all list parts)
        self.operations = 0
        self.raw_bytes = 0

    @property
    def memory_bytes(self) -> int:
        return self._mem_bytes

    @property
    def spilled_bytes(self) -> int:
        return sum(s for p, s in zip(self._parts, self._sizes, strict=True) if isinstance(p, SpillRef))

    def _journal_free(self) -> int:
        assert self.spill_dir is not None      # only asked when records may spill
        sv = os.statvfs(self.spill_dir)
        self._free = sv.f_bavail * sv.f_frsize
        self._free_at = time.monotonic()
        self._since_statvfs = 0
        return self._free

    def check_space(self, incoming: int) -> None:
        """Refuse (ENOSPC) data the journal could not hold once it is checkpointed.

        Called before a write touches the original tree: the journal's
        filesystem must keep room for every pending record (in the worst case
        it is stored uncompressed) plus this one plus :data:`RESERVE`.
        statvfs is asked at most every 50 ms or 8 MiB, and again before refusing.
        Between two asks, the free space is estimated down by every byte that
        arrived and every byte the streamer took (:meth:`take_front`: it is
        written to the log while its spill copy stays allocated), never up.
        """
        if self.spill_dir is None:
            return
        need = self.raw_bytes + incoming + self.RESERVE
        self._since_statvfs += incoming
        if time.monotonic() - self._free_at > 0.05 or self._since_statvfs > (8 << 20):
            self._journal_free()
        if self._free - self._since_statvfs >= need:
            return
        if self._journal_free() < need:
            raise OSError(errno.ENOSPC, "the journal's filesystem is full")

    def append_write(self, ino: int, offset: int, mtime_ns: int, data: bytes) -> None:
        """:meth:`append` of a Write record, sized without the generic lookup (the hot path)."""
        self._add(rec_mod.Write(ino, offset, mtime_ns, data), _WRITE_OVERHEAD + len(data))

    def append(self, rec: Record) -> None:
        """Record one successful mutating operation (called before the reply)."""
        self._add(rec, rec_mod.record_size(rec))

    def _add(self, rec: Record, size: int) -> None:
        cur = self._cur
        if not cur:
            self._parts.append(cur)
            self._sizes.append(0)
        cur.append(rec)
        self._cur_bytes += size
        self._mem_bytes += size
        self.operations += 1
        self.raw_bytes += size
        if self._cur_bytes >= self.chunk_bytes:
            self._sizes[-1] = self._cur_bytes
            if self._mem_bytes > self.memory_limit and self.spill_dir is not None:
                self._spill_current()
            self._cur = []
            self._cur_bytes = 0
            if self.on_chunk is not None:
                self.on_chunk()

    def _spill_file(self) -> SpillFile:
        if self._spill is not None and self._spill.size >= SPILL_FILE_LIMIT:
            self._drop_spill()
        if self._spill is None:
            assert self.spill_dir is not None
            d = os.fspath(self.spill_dir)
            try:
                fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)
            except OSError:
                import tempfile
                fd, name = tempfile.mkstemp(dir=d, prefix="spill-")
                os.unlink(name)
            self._spill = SpillFile(fd)
        return self._spill

    def _drop_spill(self) -> None:
        """The store writes no more into its spill file."""
        if self._spill is not None:
            self._spill.writing = False
            self._spill.release()
            self._spill = None

    def _spill_current(self) -> None:
        """Encode the current chunk into the spill file and replace it by a SpillRef.

        On any error (e.g. ENOSPC) the chunk simply stays in memory.
        """
        cur = self._cur
        try:
            f = self._spill_file()
            data = rec_mod.encode(cur)
            off = f.size
            view = memoryview(data)
            while view:
                n = os.pwrite(f.fd, view, f.size)
                f.size += n
                view = view[n:]
        except OSError:
            return
        assert self._parts[-1] is cur
        f.refs += 1
        self._parts[-1] = SpillRef(f, off, len(data), len(cur))
        self._mem_bytes -= self._cur_bytes
        self.spilled_total += len(data)

    def _size(self, i: int) -> int:
        return self._cur_bytes if self._parts[i] is self._cur else self._sizes[i]

    def take(self) -> Batch:
        """Acquisition: take everything out at once (O(1), nothing copied)."""
        if self._parts and self._parts[-1] is self._cur:
            self._sizes[-1] = self._cur_bytes
        batch = Batch(self._parts, self.operations, self.raw_bytes, self._sizes)
        self._reset()
        self._drop_spill()          # (not I/O: a close at most) the next chunk spills to a new file
        return batch

    def take_front(self, max_bytes: int) -> Batch:
        """The streamer's take: the oldest parts, at least one, until ``max_bytes``
        are reached (a part is never split).  O(parts taken)."""
        n = size = ops = mem = 0
        parts = self._parts
        while n < len(parts) and (n == 0 or size < max_bytes):
            p, s = parts[n], self._size(n)
            size += s
            if isinstance(p, list):
                ops += len(p)
                mem += s
            else:
                ops += p.count
            n += 1
        if n and parts[n - 1] is self._cur:
            self._sizes[n - 1] = self._cur_bytes
            self._cur = []
            self._cur_bytes = 0
        batch = Batch(parts[:n], ops, size, self._sizes[:n])
        del parts[:n]
        del self._sizes[:n]
        self._mem_bytes -= mem
        self.operations -= ops
        self.raw_bytes -= size
        # it leaves the pending bytes that check_space counts but goes to the log: the
        # estimate of the free space must see it spent (with a fast streamer, several MiB
        # within one statvfs interval ate the reserve: the next checkpoint then hit ENOSPC)
        self._since_statvfs += size
        return batch

    def restore(self, batch: Batch) -> None:
        """Put back a batch whose checkpoint failed, in front of what came since."""
        keep = [(p, s) for p, s in zip(batch.parts, batch.sizes, strict=True)
                if not (isinstance(p, list) and not p)]
        self._parts[:0] = [p for p, _ in keep]
        self._sizes[:0] = [s for _, s in keep]
        self._mem_bytes += sum(s for p, s in keep if isinstance(p, list))
        self.operations += batch.operations
        self.raw_bytes += batch.raw_bytes
        batch.parts = []
        batch.sizes = []
