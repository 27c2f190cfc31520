"""Where an FSYNC's ``fdatasync`` runs: on the FUSE loop's own thread, or on a worker.

With pyfuse3's patch version 5, "a worker" is one of pyfuse3's own sync
threads (C, no GIL), which syncs and replies to the kernel itself: one hand-off
instead of two (``fs.SYNC_THREADS``; docs/design.md, "Version 5").  The
threads' syncs feed the running average in bulk (:meth:`SyncPolicy.threads_done`).
``FUSEJOURNAL_FSYNC_THREADS=off`` (or pyfuse3 not patched): trio's worker
threads, as below.

A FUSE FSYNC must reach the original's disk before the reply (promise 4: an
application's ``fsync`` means what it means on ext4).  On a worker thread
(``trio.to_thread.run_sync``) the FUSE loop serves other requests meanwhile,
but the sync pays two hand-offs between threads: waking the worker, and the
worker handing its result back to the loop (each a futex wake of an idle CPU
and a GIL transfer).  On the 2-vCPU test machine those cost about 0.2 ms per
FSYNC, as much as the ``fdatasync`` itself (0.19 ms): pgbench, whose every
commit is a WAL ``pwrite`` and an ``fdatasync``, ran at 1,713–1,792 tps with
the worker against 2,413–2,605 inline (docs/performance-analysis.md).  Inline,
every other request waits for the sync — fine for a 0.2 ms sync, not for a
slow disk's 10 ms or for a file with a gigabyte of dirty pages.  So a sync
runs inline only when it is known to be short:

1. The object has at most :data:`INLINE_BYTES` written through the mount
   since its last sync.  The write handler counts them per object
   (``Inode.unsynced``); an object the daemon has not yet synced counts as
   unknown (the original may hold dirty pages from before the mount), so its
   first sync goes to a worker, unless the mount created it (a rollback
   journal, made and synced by every SQLite transaction).
2. The running average of recent syncs' durations (both ways, each the
   system call alone, weighted 1/8 per sync, only syncs that qualify by 1) is
   within the limit (``FUSEJOURNAL_FSYNC_INLINE_US``, default 500 µs; 0:
   never inline).  It starts at twice the limit, so a mount syncs on workers
   until about seven fast syncs were seen; from an average of 0.4 × the
   limit, one sync over 5.2 × the limit puts it over at once.  A disk that
   slows down (a flush to a spinning disk, a journal commit behind a large
   write-back) moves the syncs to workers after the first slow one; one that
   speeds up again brings them back, measured on the workers.

A slow sync that was chosen inline still stalls every request for its
length, once: the cost of the bet, which :attr:`SyncPolicy.slow_inline`
counts (status ``fsync_slow_inline``).  Directories' syncs (FSYNCDIR) have a
policy of their own, status ``fsyncdir_*``: nothing is counted per directory
(a directory's sync commits whatever metadata the filesystem has pending),
so only step 2 decides.  Nothing here awaits or takes a lock:
the handler calls :meth:`SyncPolicy.inline` before and :meth:`SyncPolicy.done`
after, on the loop's thread.  A sync that fails (or is cancelled while on its
worker) is not counted; the handler puts its bytes back on the object, still
owed to the next sync.
"""

from __future__ import annotations

from .checks import env_microseconds

#: at most this many bytes written since the object's last sync for an inline sync
#: (0.6 ms at 400 MB/s; a database's commit writes a few pages)
INLINE_BYTES = 256 * 1024

#: an object whose dirty bytes the daemon does not know (not synced since it was known)
UNKNOWN = 1 << 62

DEFAULT_LIMIT_US = 500
MAX_LIMIT_US = 100_000


def inline_limit_ns(value: str | None) -> int:
    """``FUSEJOURNAL_FSYNC_INLINE_US`` in nanoseconds (None: the default, 500 µs);
    ValueError with a one-line reason for anything but 0–100,000 microseconds."""
    return env_microseconds("FUSEJOURNAL_FSYNC_INLINE_US", value, DEFAULT_LIMIT_US, MAX_LIMIT_US)


class SyncPolicy:
    """Chooses inline or worker for each FSYNC, and counts both (module docstring)."""

    def __init__(self, limit_ns: int, name: str = "fsync") -> None:
        self.limit_ns = limit_ns
        self.name = name                   # the status keys' prefix
        self.average_ns = 2 * limit_ns     # no evidence yet: workers first (step 2)
        self.inline_syncs = 0
        self.worker_syncs = 0
        self.slow_inline = 0               # inline syncs that took longer than the limit
        self.threaded = 0                  # handed to pyfuse3's sync threads

    def inline(self, unsynced: int) -> bool:
        """Whether a sync of an object with ``unsynced`` bytes written since its last
        sync runs on the loop's thread (steps 1 and 2)."""
        return unsynced <= INLINE_BYTES and self.average_ns <= self.limit_ns and self.limit_ns > 0

    def done(self, unsynced: int, duration_ns: int, inline: bool) -> None:
        """A sync of an object with ``unsynced`` bytes took ``duration_ns`` (its system
        call alone), inline or on a worker."""
        if inline:
            self.inline_syncs += 1
            if duration_ns > self.limit_ns:
                self.slow_inline += 1
        else:
            self.worker_syncs += 1
        if unsynced <= INLINE_BYTES:       # a large sync's length says nothing about small ones
            self.average_ns += (duration_ns - self.average_ns) // 8

    def threads_done(self, syncs: int, total_ns: int) -> None:
        """pyfuse3's sync threads finished ``syncs`` more syncs (of any size, files and
        directories), ``total_ns`` in all: each counts as one sync of their mean
        duration.  Large ones among them raise the average (more syncs stay on the
        threads a while): the safe side."""
        if syncs > 0:
            mean = total_ns // syncs
            self.average_ns += int((mean - self.average_ns) * (1 - (7 / 8) ** min(syncs, 256)))

    def status(self) -> dict[str, int]:
        n = self.name
        return {f"{n}_inline": self.inline_syncs, f"{n}_worker": self.worker_syncs,
                f"{n}_thread": self.threaded,
                f"{n}_slow_inline": self.slow_inline,
                f"{n}_inline_limit_us": self.limit_ns // 1000,
                f"{n}_average_us": self.average_ns // 1000}
