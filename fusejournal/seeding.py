"""Seeding online: the mount serves at once while the shadow is copied behind it.

The first mount (and ``--reseed``) used to copy the whole original into the
shadow before mounting, with the application stopped.  Now (docs/design.md,
"Seeding online"):

1. **Start.**  ``SHADOW/seeding.json`` is written durably: the seed's start
   time, the first activity period it covers, the copy cursor, the counts.
   From here until the first complete checkpoint the shadow holds no
   checkpoint: the updater does not run, ``status`` shows ``seeding``,
   ``shadow_checkpoint`` is null (the attribute reads -1), browse refuses.
2. **Copy.**  A worker thread at low priority (nice 19, I/O class
   best-effort 7) walks the original (seed.py, tolerant mode: sorted names,
   pre-order) and copies every entry.  Every 5 seconds (or 10,000 entries) the
   shadow is ``syncfs``'ed and the cursor (the last entry copied) is written
   to seeding.json: a kill -9 or a reboot resumes after it.  A second thread
   counts the tree for the progress (entries, allocated bytes, rate, ETA).
   Meanwhile the mount serves, checkpoints are taken and logged as usual
   (their markers say ``seeding: incomplete``), and every object changed
   through the mount gets a write intent in the activity log *before* the
   change (activity.py), as always; what is new is that the periods are
   not deleted when a checkpoint is confirmed while seeding: the intents of
   every period since the seed began are the **dirty set**.
3. **Converge** (like a live migration's pre-copy).  Round after round: a new
   activity period is started (so every later change writes a new intent),
   the intents of the periods closed since the previous round are read, and
   those objects are resynced against the shadow (resync.py: files block by
   block, directories entry by entry, new subtrees whole) and the records
   are applied *directly* to the shadow (the updater's applier, no staging
   cursor), not logged:
   the shadow holds no checkpoint, so nothing claims this state.  A round
   that fails because the original changed under it (or the shadow is full)
   keeps its objects for the next round; a file that moves or goes while the
   round reads its data is skipped (its change is dirty again) and the next
   round *distrusts* (compares every file it reaches, even one whose size
   and mtime agree).  Rounds go on until the next dirty set is small: at
   most ``FINAL_MAX`` objects (without a log, also an estimated reconcile
   time, the last round's time per object, of at most ``FINAL_BUDGET_S``);
   when the set has not shrunk for ``STALL_ROUNDS`` rounds (a file rewritten
   all the time) and the estimate is at most ``STALL_BUDGET_S``, or after
   ``MAX_ROUNDS`` whatever the estimate, the next set is taken, always right
   after a round that succeeded without skips: ``replay_after``, the log's
   last checkpoint when that round began, is where step 4's replay starts.
   When ``SKIP_ROUNDS`` rounds in a row each skipped a file (an application
   renaming files all the time), no round is such a base: the next set is
   taken anyway, once its estimate is at most ``STALL_BUDGET_S`` (or after
   ``MAX_ROUNDS``), and that final round compares contents under the halt
   (``final_compare``: no replay; longer, exact).
4. **Final round: under the halt, all but contents; then the replay.**  The
   seed asks for a checkpoint itself (label ``seed complete``), unless one is
   asked first.  Inside its halt, after the temporary store was taken and the
   new activity period began (``Checkpointer.take``'s ``hold``, the gate
   still closed), the last dirty set (the periods since the last round
   began) is resynced with file contents *deferred* (resync.py, ``defer``):
   names, types, attributes, links, symlinks, xattrs are made the
   original's at this checkpoint N; no file data is read, so the halt does
   not grow with file sizes or with what was written; every regular file
   reached is noted with its stat at N.  The shadow is only read in the
   halt: the records are kept (:func:`plan_records`) and applied after the
   append.  The gate opens; the batch is appended as usual (marker
   ``seeding: first complete``).  Once it is durable, the records are
   applied, then :func:`replay` reads the records of the checkpoints after
   ``replay_after`` through N and replays, for the noted files only, their
   ``Write``, ``Setattr`` (size) and ``Mknod`` records in order: each sets
   every byte to a value, to end-of-file, or end-of-file to zero, whatever
   it held, so replayed over any state a byte had since the last round
   began they end where the original was at N (docs/design.md, "Why the
   replay is exact").  Checked: each file's size is N's, and a file new to
   the shadow was created within the records.  Then ``seeded.json``, then
   ``applied.json`` = N are written (after a ``syncfs``), seeding.json is
   removed, the activity periods up to N are deleted, and the updater
   starts at N: N is the **first complete checkpoint**.  Checkpoints
   before N are never applied.  A change that reached the original without
   a record since the last round (resyncflag.py) makes that final round
   compare contents under the halt instead (exact, longer).
5. **Failure.**  If the final round, its append or its replay fails,
   nothing is claimed and the seed goes back to step 3 with its objects
   (and every change since the halt, in the new periods); the next round
   distrusts.  ``final_attempted`` in seeding.json makes the first round
   after a kill distrust too (a kill between the halt and the replay).
   A kill at any point resumes from seeding.json: the copy after its
   cursor, then the convergence with every period since the seed began.
   A full shadow filesystem (ENOSPC, EDQUOT) is waited out (``status``:
   ``waiting for space``), retried every 0.5 s doubling to 8 s.  Other errors
   stop the seed (``status``: the error); the mount keeps serving and
   journaling; a remount retries.

A daemon without CAP_DAC_READ_SEARCH keeps the activity log by fd while
seeding (activity.py; docs/design.md, "Seeding online without handles").
A member of a consistency group seeds online too: its checkpoints are group
checkpoints, its final round runs behind a held cut of the group's epoch
(fusejournal/groupseed.py; docs/design.md, "Consistency group members seed
online").
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import trio

from .activity import Intent, decode_intents, parse_period_name
from .errors import SPACE_ERRNOS
from .faults import fault
from .layout import SHADOW_INODES
from .log import OrderedLog
from .records import ATTR_SIZE, Mknod, Record, Setattr, Write
from .records_check import check_record
from .resync import Deferred, resync_iter
from .seed import Seeder, count_tree, sweep_hidden_links
from .shadow import SEEDED, SEEDING, Shadow
from .tempstore import Batch, TempStore
from .treewalk import O_WRITE
from .updater import _Applier

log = logging.getLogger("fusejournal")

#: the final round (under the halt) is taken when the dirty set is at most this many objects ...
FINAL_MAX = 1000
#: ... and the last round's time per object says it takes at most this long
FINAL_BUDGET_S = 0.2
#: after this many rounds the final round is taken whatever the size of the dirty set ...
MAX_ROUNDS = 20
#: ... or when it has not shrunk for this many rounds
STALL_ROUNDS = 3
#: ... if its estimate is at most this (a longer final halt waits for MAX_ROUNDS)
STALL_BUDGET_S = 1.0
#: rounds in a row that each skipped a file (moved while read) before a final round that
#: compares contents under the halt, having no round to replay from (step 3)
SKIP_ROUNDS = 10
#: the copy cursor is made durable this often (seconds, entries)
PERSIST_S = 5.0
PERSIST_ENTRIES = 10_000
#: the checkpoint id a round's records are applied and validated as (no real checkpoint
#: reaches it; rounds keep no staging cursor)
RECONCILE_CURSOR = 1 << 62
#: a round failing this many times in a row (not for space) stops the seed with its error
MAX_FAILURES = 20
#: memory held by one round's records before they spill to the journal's spill directory
ROUND_MEMORY = 16 << 20

_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "armv7l": 314}.get(platform.machine())
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_BE = 2
_IOPRIO_CLASS_IDLE = 3


class Stopped(Exception):
    """The seed was asked to stop (unmount)."""


def set_low_priority() -> None:
    """This thread at nice 19 and I/O class best-effort 7 (the lowest that still progresses
    under a busy application; the idle class could starve forever).  Best-effort: errors ignored."""
    choice = os.environ.get("FUSEJOURNAL_SEED_PRIORITY", "")       # bench/: the comparisons
    if choice == "normal":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except OSError:
        pass
    if _IOPRIO_SET is not None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            prio = (_IOPRIO_CLASS_IDLE << 13) if choice == "idle" else (_IOPRIO_CLASS_BE << 13) | 7
            libc.syscall(_IOPRIO_SET, _IOPRIO_WHO_PROCESS, tid, prio)
        except (OSError, AttributeError):
            pass


def read_periods(directory: Path, after: int, upto: int) -> list[Intent]:
    """The intents of the activity periods ``after`` < p <= ``upto`` found in ``directory``."""
    out: list[Intent] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return out
    for name in names:
        p = parse_period_name(name)
        if p is None or not after < p <= upto:
            continue
        try:
            with open(directory / name, "rb") as f:
                out.extend(decode_intents(f.read()))
        except FileNotFoundError:
            continue
    return out


def unique(intents: Iterable[Intent]) -> list[Intent]:
    seen: set[tuple[int, bool]] = set()
    out = []
    for i in intents:
        if (i.ino, i.is_dir) not in seen:
            seen.add((i.ino, i.is_dir))
            out.append(i)
    return out


def reconcile(source_fd: int, shadow: Shadow, intents: list[Intent], since_ns: int,
              spill_dir: Path | None, stop: Callable[[], bool] = lambda: False,
              defer: Deferred | None = None, stats: dict[str, int] | None = None,
              distrust: bool = False, skip_vanished: bool = False) -> int:
    """Make the shadow's versions of ``intents`` the original's (resync.py), applying the
    records directly to the shadow (it claims no checkpoint while seeding).  The records are
    all made first (spilling beyond ROUND_MEMORY), then applied.  Returns their number.
    Raises Stopped if ``stop()`` turns true (the shadow is then partly reconciled: the
    objects stay dirty).  ``defer``: file contents are left to :func:`replay` (the final
    round); ``stats``: the resync's counts (``data_bytes_read``); ``distrust``: compare the
    contents of every file reached (after a final round that was not completed);
    ``skip_vanished``: a file that moves or goes while its data is read is skipped
    (``stats["skipped"]``), not a failure of the round."""
    if not intents:
        return 0
    batch = plan_records(source_fd, shadow, intents, since_ns, spill_dir, stop, defer, stats,
                         distrust, skip_vanished)
    n = batch.operations
    apply_batch(shadow, batch, stop)
    return n


def plan_records(source_fd: int, shadow: Shadow, intents: list[Intent], since_ns: int,
                 spill_dir: Path | None, stop: Callable[[], bool] = lambda: False,
                 defer: Deferred | None = None, stats: dict[str, int] | None = None,
                 distrust: bool = False, skip_vanished: bool = False) -> Batch:
    """The records of :func:`reconcile`, made (spilling beyond ROUND_MEMORY) but not applied:
    the shadow is only read.  The final round makes them inside the halt and applies them
    after it (:func:`apply_batch`): nothing else changes the shadow meanwhile."""
    store = TempStore(spill_dir, memory_limit=ROUND_MEMORY)
    n = 0
    try:
        for rec in resync_iter(source_fd, shadow, intents, since_ns=since_ns, defer=defer,
                               stats=stats, distrust=distrust, skip_vanished=skip_vanished):
            store.append(rec)
            n += 1
            if n % 256 == 0 and stop():
                raise Stopped()
    except BaseException:
        store.take().close()
        raise
    return store.take()


def apply_batch(shadow: Shadow, batch: Batch, stop: Callable[[], bool] = lambda: False) -> None:
    """Apply (and close) a batch of :func:`plan_records` to the shadow."""
    def records() -> Iterator[Record]:
        for i, r in enumerate(batch):
            if i % 256 == 0 and stop():
                raise Stopped()
            yield r
    try:
        fault("seed.reconcile")
        _apply(shadow, records())
    finally:
        batch.close()


def _apply(shadow: Shadow, records: Iterable[Record]) -> None:
    """Apply validated records to the shadow like ``updater.apply_records``, but without
    the staging cursor: a round that is interrupted is redone from the dirty set (the shadow
    claims nothing), so its durable creation (two fsyncs, inside the final round's halt) and
    its advance per record would buy nothing."""
    ap = _Applier(shadow, RECONCILE_CURSOR)
    try:
        for index, rec in enumerate(records):
            check_record(RECONCILE_CURSOR, index, rec)
            ap.apply_one(rec, index)
        ap.finish()
    finally:
        ap.close()


class ReplayError(Exception):
    """The logged records cannot prove the deferred contents exact (the final round is
    then not claimed: the seed converges again)."""


def replay(shadow: Shadow, defer: Deferred, records: Iterable[Record],
           stop: Callable[[], bool] = lambda: False) -> dict[str, int]:
    """Bring the contents of the files of a final round (``defer``, made under the halt of
    checkpoint N) to what the original held at N, from ``records``: every record of the
    checkpoints after the one the last round started in, through N, in order.

    Only what decides contents is replayed, on ``inodes/<key>`` of the keys in
    ``defer.files``: ``Write`` (pwrite), ``Setattr`` with a size (ftruncate) and ``Mknod``
    of the key (truncate to 0: a new object).  Each of these sets every byte it covers to
    a value, to end-of-file, or end-of-file to zero, whatever the byte held: replaying them
    in order over any state a byte had since the round began (and over any earlier prefix
    of the same records) ends where the original ended (docs/design.md, "Seeding online",
    "Why the replay is exact").  Then each file is checked to have the size the original
    had at N (else ReplayError) and gets the original's mtime and mode at N back.  A key
    the shadow did not have (``defer.fresh``) needs its ``Mknod`` among the records: its
    whole contents are in them only then (else ReplayError).  Returns counts."""
    files = defer.files
    created: set[int] = set()
    counts = {"records": 0, "writes": 0, "bytes_written": 0, "truncates": 0, "files": 0}
    fds: dict[int, int] = {}
    inodes = shadow.open_sub(SHADOW_INODES)

    def fd_of(key: int) -> int:
        fd = fds.get(key)
        if fd is None:
            try:
                fd = os.open(str(key), O_WRITE, dir_fd=inodes)
            except OSError as e:
                raise ReplayError(f"inodes/{key} cannot be opened for the replay: {e}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ReplayError(f"inodes/{key} is not a regular file")
            fds[key] = fd
        return fd
    try:
        for i, rec in enumerate(records):
            if i % 256 == 0 and stop():
                raise Stopped()
            counts["records"] += 1
            if isinstance(rec, Write):
                if rec.ino in files:
                    fd, mv, n = fd_of(rec.ino), memoryview(rec.data), 0
                    while n < len(mv):
                        n += os.pwrite(fd, mv[n:], rec.offset + n)
                    counts["writes"] += 1
                    counts["bytes_written"] += len(mv)
            elif isinstance(rec, Setattr):
                if rec.ino in files and rec.mask & ATTR_SIZE:
                    os.ftruncate(fd_of(rec.ino), rec.size)
                    counts["truncates"] += 1
            elif isinstance(rec, Mknod):
                if rec.ino in files:
                    os.ftruncate(fd_of(rec.ino), 0)
                    created.add(rec.ino)
        fault("seed.replay")
        missing = defer.fresh - created
        if missing:
            raise ReplayError(f"{len(missing)} file(s) new to the shadow were not created within "
                              f"the replayed checkpoints (e.g. inode {min(missing)}): their contents "
                              f"are not all in the log")
        for key, o in files.items():
            fd = fd_of(key)
            size = os.fstat(fd).st_size
            if size != o.st_size:
                raise ReplayError(f"inodes/{key}: {size} bytes after the replay, the original had "
                                  f"{o.st_size}")
            os.fchmod(fd, stat.S_IMODE(o.st_mode))       # a write may clear set-id bits
            os.utime(fd, ns=(os.fstat(fd).st_atime_ns, o.st_mtime_ns))
            counts["files"] += 1
    finally:
        for fd in fds.values():
            os.close(fd)
        os.close(inodes)
    return counts


def _space_error(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
            return True
        e = e.__cause__ or e.__context__       # type: ignore[assignment]
    return False


class SeedingTask:
    """One online seed, from start (or resume) to the first complete checkpoint (see the module
    docstring).  Owned by the daemon: :meth:`start_copy` before mounting, :meth:`run` in the
    session's nursery, :meth:`at_halt` inside a checkpoint's halt, :meth:`complete` /
    :meth:`final_failed` after its append, :meth:`stop` at shutdown."""

    def __init__(self, shadow: Shadow, source_fd: int, *, activity_dir: Path, spill_dir: Path | None,
                 state: dict[str, Any], new_period: Callable[[], int], current_period: Callable[[], int],
                 extra_intents: list[Intent] | None = None, foreground_tty: bool = False,
                 olog: OrderedLog | None = None) -> None:
        self.shadow = shadow
        self.source_fd = source_fd
        self.activity_dir = activity_dir
        self.spill_dir = spill_dir
        self.new_period = new_period
        self.current_period = current_period
        self.doc = dict(state)
        self.phase: str = str(self.doc.get("phase", "copy"))
        self.cursor: tuple[bytes, ...] = tuple(bytes.fromhex(c) for c in self.doc.get("cursor", []))
        self.entries = int(self.doc.get("entries", 0))
        self.bytes = int(self.doc.get("bytes", 0))
        self.resumed_entries = self.entries
        self.started_ns = int(self.doc["started_ns"])
        self.first_period = int(self.doc["first_period"])
        self.extra = list(extra_intents or [])
        self.foreground_tty = foreground_tty
        self.checkpoint: Callable[[str], Awaitable[object]] | None = None   # set by the daemon
        # progress
        self.total_entries: int | None = None
        self.total_bytes: int | None = None
        self.skipped = 0
        self.run_start = time.monotonic()
        self.run_bytes0 = self.bytes
        self.run_entries0 = self.entries
        self.state = "copying" if self.phase == "copy" else "converging"
        self.error: str | None = None
        self.waiting: str | None = None
        self.rounds = 0
        self.dirty = 0
        self.final_halt_s: float | None = None
        # convergence
        self.last_period = self.first_period - 1
        self.final_intents: list[Intent] = []
        self.final_pending = False
        # the final round (module docstring, step 4): the ordered log its contents are replayed
        # from; the last checkpoint before the last successful round began (None: no such
        # round since the last final attempt, or no log: the final round compares contents)
        self.olog = olog
        self.replay_after: int | None = None
        self.final_defer: Deferred | None = None
        self.final_batch: Batch | None = None     # the final round's records, made in the halt
        self.final_compare = False                # it compares contents (no replay base)
        self.final_stats: dict[str, int] = {}
        # changes that reached the original without a record (resyncflag.py), counted: set by
        # the daemon; the replay cannot hold them, so such a final round compares contents
        self.unjournaled: Callable[[], int] = lambda: 0
        self.replay_unjournaled = 0
        self.done = False
        self.first_complete: int | None = None
        # a consistency group member: the group checkpoint whose batch completes the seed
        # (set by groupseed.MemberSeed before complete(); written to seeded.json)
        self.group_checkpoint: int | None = None
        self.done_event = trio.Event()
        # threads
        self._stop = False
        self._copy_thread: threading.Thread | None = None
        self._copy_error: BaseException | None = None
        self._count_thread: threading.Thread | None = None
        self._work: threading.Thread | None = None
        self._trigger_failures = 0
        self._last_persist = time.monotonic()
        self._persist_entries = self.entries

    # -------------------------------------------------------------- state file

    @staticmethod
    def new_state(first_period: int, base: int) -> dict[str, Any]:
        return {"format": 1, "started_ns": time.time_ns(), "first_period": first_period,
                "base_checkpoint": base, "phase": "copy", "cursor": [], "entries": 0, "bytes": 0,
                "starts": 0}

    def _doc(self) -> dict[str, Any]:
        d = dict(self.doc)
        d.update(phase=self.phase, cursor=[c.hex() for c in self.cursor], entries=self.entries,
                 bytes=self.bytes)
        return d

    def persist(self, sync: bool = True) -> None:
        """Durably record the cursor (after a syncfs: every entry before it is on disk)."""
        self.shadow.write_state(SEEDING, self._doc(), sync=sync)
        self._last_persist = time.monotonic()
        self._persist_entries = self.entries

    # -------------------------------------------------------------- copy

    def start_copy(self) -> None:
        """Start the copy (and the count) in worker threads; records this start durably."""
        self.doc["starts"] = int(self.doc.get("starts", 0)) + 1
        self.persist(sync=False)
        if self.cursor:
            log.info("seed: resuming the copy after %s (%d entries, %d bytes copied before)",
                     b"/".join(self.cursor).decode("utf-8", "backslashreplace"), self.entries, self.bytes)
        self._start_walk()
        if self._count_thread is None:
            self._count_thread = threading.Thread(target=self._count, name="fusejournal-seed-count",
                                                  daemon=True)
            self._count_thread.start()

    def _start_walk(self) -> None:
        self._copy_error = None
        self._copy_thread = threading.Thread(target=self._walk, name="fusejournal-seed", daemon=True)
        self._copy_thread.start()

    def copy_running(self) -> bool:
        return self._copy_thread is not None and self._copy_thread.is_alive()

    def wait_copy(self, timeout: float | None) -> bool:
        """Wait (blocking) at most ``timeout`` s for the copy; True if it ended (see copy_error)."""
        assert self._copy_thread is not None
        self._copy_thread.join(timeout)
        return not self._copy_thread.is_alive()

    @property
    def copy_error(self) -> BaseException | None:
        return self._copy_error

    def _count(self) -> None:
        set_low_priority()

        def each(n: int, b: int) -> None:
            pass
        try:
            self.total_entries, self.total_bytes = count_tree(self.source_fd, lambda: self._stop, each)
        except OSError as e:
            log.info("seed: counting the original failed (%s): no estimate of the time left", e)

    def _walk(self) -> None:
        set_low_priority()
        base_e, base_b = self.entries, self.bytes
        seeder = Seeder(self.shadow, self.source_fd, resume=self.cursor, tolerant=True,
                        on_entry=lambda s: self._on_entry(s, base_e, base_b))
        try:
            seeder.run()
            self.cursor = seeder.cursor
            self.skipped += seeder.skipped
        except BaseException as e:
            self.skipped += seeder.skipped
            self._copy_error = e

    def _on_entry(self, s: Seeder, base_e: int, base_b: int) -> None:
        self.cursor = s.cursor
        self.entries = base_e + s.count
        self.bytes = base_b + s.bytes
        fault("seed.entry")
        if self._stop:
            raise Stopped()
        if (time.monotonic() - self._last_persist >= PERSIST_S
                or self.entries - self._persist_entries >= PERSIST_ENTRIES):
            self.persist()

    # -------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.run_start, 1e-3)
        rate_b = (self.bytes - self.run_bytes0) / elapsed
        rate_e = (self.entries - self.run_entries0) / elapsed
        eta: float | None = None
        if self.phase == "copy" and self.total_entries is not None:
            if self.total_bytes and rate_b > 0:
                eta = max(0.0, (self.total_bytes - self.bytes) / rate_b)
            elif rate_e > 0:
                eta = max(0.0, (self.total_entries - self.entries) / rate_e)
        state = self.state
        if self.error:
            state = f"stopped: {self.error}"
        elif self.waiting:
            state = self.waiting
        return {
            "state": state,
            "phase": self.phase,
            "entries_copied": self.entries,
            "entries_total": (max(self.total_entries, self.entries)
                              if self.total_entries is not None else None),
            "bytes_copied": self.bytes,
            "bytes_total": max(self.total_bytes, self.bytes) if self.total_bytes is not None else None,
            "rate_bytes_per_s": round(rate_b),
            "rate_entries_per_s": round(rate_e, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "resumed_entries": self.resumed_entries,
            "skipped_entries": self.skipped,
            "rounds": self.rounds,
            "dirty_objects": self.dirty,
            "started_ns": self.started_ns,
            "error": self.error,
        }

    def progress_line(self) -> str:
        return progress_line(self.status())

    # -------------------------------------------------------------- the task

    async def run(self) -> None:
        """Supervise the copy, then converge, until the first complete checkpoint."""
        try:
            if self.phase == "copy":
                await self._copy_phase()
            await self._converge()
        except Stopped:
            return
        except trio.Cancelled:
            raise
        except Exception as e:
            self.error = str(e) or type(e).__name__
            log.error("seed: stopped: %s (the mount keeps journaling; mount again to retry)", self.error)
        finally:
            if self.foreground_tty:
                print(file=sys.stderr)

    async def _tick(self) -> None:
        if self.foreground_tty:
            print("\r" + self.progress_line() + "\033[K", end="", file=sys.stderr, flush=True)
        await trio.sleep(0.2)

    async def _copy_phase(self) -> None:
        delay = 0.5
        stuck_at = 0                            # entries copied when the space ran out
        while True:
            if not self.copy_running() and self._copy_thread is None:
                self._start_walk()
            while self.copy_running():
                await self._tick()
                if self.waiting is not None and self.entries > stuck_at:
                    self.waiting = None         # the retry copies again: there is room
            err = self._copy_error
            if err is None:
                self.waiting = None
                break
            if isinstance(err, Stopped):
                raise err
            if not _space_error(err):
                raise err
            # (status says so until a retry copies an entry more, not just while it sleeps)
            self.waiting = f"waiting for space on the shadow's filesystem ({self.shadow.root}): {err}"
            stuck_at = self.entries
            log.warning("seed: %s", self.waiting)
            await trio.sleep(delay)
            delay = min(delay * 2, 8.0)
            self._start_walk()
        n = await self._in_thread(sweep_hidden_links, self.shadow)
        if n:
            log.info("seed: %d hidden link(s) of replaced objects removed", n)
        self.phase = "converge"
        self.state = "converging"
        await self._in_thread(self.persist)
        log.info("seed: copy done: %d entries, %d bytes (%d changed under the walk); converging",
                 self.entries, self.bytes, self.skipped)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any, low: bool = True) -> Any:
        """Run ``fn`` in a fresh worker thread (low priority); on cancellation ask it to stop
        and wait for it (it never outlives the daemon's fds)."""
        box: dict[str, Any] = {}

        def target() -> None:
            if low:
                set_low_priority()
            try:
                box["v"] = fn(*args)
            except BaseException as e:
                box["e"] = e
        t = threading.Thread(target=target, name="fusejournal-seed-work", daemon=True)
        self._work = t
        t.start()
        try:
            while t.is_alive():
                await trio.sleep(0.05)
        except trio.Cancelled:
            self._stop = True
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(t.join)
            raise
        finally:
            self._work = None
        if "e" in box:
            raise box["e"]
        return box.get("v")

    async def _converge(self) -> None:
        carry = list(self.extra)
        sizes: list[int] = []
        per_object: float | None = None
        delay = 0.5
        failures = 0
        # a final round with deferred contents may have been left unreplayed (a kill, a
        # failed replay): the shadow's files then show the original's size and mtime with
        # other contents, so the next round compares every file it reaches
        distrust = bool(self.doc.get("final_attempted"))
        skipping = 0          # rounds in a row that succeeded but skipped a file (no replay base)
        while not self.done:
            # the records since this round began are in the checkpoints after this one (a
            # checkpoint taken but not yet appended holds only earlier records: harmless)
            log_base = self.olog.last_checkpoint if self.olog is not None else 0
            unjournaled = self.unjournaled()
            ready, self.replay_after = self.replay_after, None
            closed = self.new_period()
            intents = unique(carry + await self._in_thread(read_periods, self.activity_dir,
                                                           self.last_period, closed))
            self.last_period = closed
            carry = []
            self.dirty = len(intents)
            est = None if per_object is None else per_object * len(intents)
            sizes.append(len(intents))
            # not converging: the set has not shrunk below its size of STALL_ROUNDS rounds ago
            # (a file rewritten all the time): more rounds only cost the application
            stalled = (len(sizes) > STALL_ROUNDS and est is not None and est <= STALL_BUDGET_S
                       and sizes[-1] >= min(sizes[-1 - STALL_ROUNDS:-1]))
            # the final round needs the previous round to have succeeded (with a log: its
            # replay starts there; ``carry`` is then empty)
            # With a log, the final halt reads no file data (the contents are replayed after
            # it), so the rounds' time per object, which is mostly reading files, says nothing
            # of it: a set of at most FINAL_MAX objects is enough.
            small = len(intents) <= FINAL_MAX and (
                self.olog is not None or (est is not None and est <= FINAL_BUDGET_S))
            # An application that renames files all the time can make every round skip one
            # (moved while read): no round is then a base for the replay.  After SKIP_ROUNDS
            # such rounds in a row (a round without a skip usually comes long before) the
            # final round compares contents under the halt instead (no replay: longer,
            # exact), when the rounds' time per object (distrusting rounds read contents
            # too) puts it within STALL_BUDGET_S, or after MAX_ROUNDS whatever it says.
            compare = (ready is None and skipping >= SKIP_ROUNDS and len(intents) <= FINAL_MAX
                       and (self.rounds >= MAX_ROUNDS or (est is not None and est <= STALL_BUDGET_S)))
            if compare or (ready is not None and (small or self.rounds >= MAX_ROUNDS or stalled)):
                if compare:
                    log.warning("seed: %d rounds in a row skipped a file that moved while it was "
                                "read: the last %d object(s) are reconciled under the halt, "
                                "contents compared (estimated %.3f s)", skipping, len(intents),
                                est or 0.0)
                elif not small:
                    log.warning("seed: not converging after %d rounds: the last %d object(s) are "
                                "reconciled under the halt anyway (estimated %.3f s%s)", self.rounds,
                                len(intents), est or 0.0,
                                ", file contents replayed after it" if self.olog is not None else "")
                self.final_intents = intents
                self.replay_after = ready
                self.final_compare = compare
                if self.olog is not None and not self.doc.get("final_attempted"):
                    self.doc["final_attempted"] = True       # survives a kill (no fsync needed:
                    await self._in_thread(self.persist, False)   # the shadow is not synced either)
                self.state = "ready"
                asked = await self._trigger()
                # a group member's session may still be deciding a final round its halt ran
                # (the coordinator's answer can reach this task before the member's session
                # has its outcome): never reconcile beside it
                while self.state == "final" and not self.done:
                    await trio.sleep(0.05)
                if self.done:
                    return
                carry, self.final_intents = self.final_intents, []
                self.replay_after = None             # a round first: the replay starts there
                distrust = True
                self.state = "converging"
                # (a group member whose group cannot checkpoint yet, e.g. another member not
                # running: asked again less and less often, up to every 30 s)
                await trio.sleep(1.0 if asked else min(30.0, 2.0 ** self._trigger_failures))
                continue
            self.state = f"converging (round {self.rounds + 1}, {len(intents)} object(s))"
            t0 = time.monotonic()
            # a file that moves or goes while the round reads it is skipped: the change made
            # an intent of the new period (its directory's), and the next round distrusts
            # what it reaches, since the skipped file's size and mtime may already be set
            round_stats: dict[str, int] = {}
            try:
                await self._in_thread(reconcile, self.source_fd, self.shadow, intents,
                                      self.started_ns, self.spill_dir, lambda: self._stop, None,
                                      round_stats, distrust, True)
            except Stopped:
                raise
            except Exception as e:
                carry = intents
                skipping = 0                         # (ready is None for a failure's own reason)
                if _space_error(e):
                    self.waiting = f"waiting for space on the shadow's filesystem ({self.shadow.root}): {e}"
                    log.warning("seed: %s", self.waiting)
                    await trio.sleep(delay)
                    delay = min(delay * 2, 8.0)
                else:
                    failures += 1
                    if failures >= MAX_FAILURES:
                        raise RuntimeError(f"reconciling the changes made during the seed failed "
                                           f"{failures} times in a row: {e}") from e
                    log.info("seed: round %d did not finish (%s): its objects stay dirty",
                             self.rounds + 1, e)
                    self.state = (f"converging (round {self.rounds + 1} failed {failures} time(s): "
                                  f"{e})")
                    await trio.sleep(min(0.2 * 2 ** failures, 8.0))
                continue
            self.waiting = None
            delay = 0.5
            failures = 0
            # a round that skipped a file is no base for the final round's replay: another
            # round (distrusting) first
            skipped = round_stats.get("skipped", 0)
            distrust = skipped > 0
            skipping = skipping + 1 if skipped else 0
            self.replay_after = None if distrust else log_base
            self.replay_unjournaled = unjournaled
            self.rounds += 1
            per_object = (time.monotonic() - t0) / max(1, len(intents))
            log.info("seed: round %d: %d object(s) reconciled in %.3f s%s", self.rounds, len(intents),
                     time.monotonic() - t0,
                     f" ({skipped} file(s) skipped: moved while read)" if skipped else "")
            fault("seed.round")

    async def _trigger(self) -> bool:
        """Ask for the checkpoint whose halt runs the final round (unless one comes first);
        False if it failed (logged on the 1st, 2nd, 4th, 8th ... failure in a row)."""
        assert self.checkpoint is not None
        try:
            await self.checkpoint("seed complete")
        except trio.Cancelled:
            raise
        except Exception as e:
            self._trigger_failures += 1
            n = self._trigger_failures
            if n & (n - 1) == 0:
                log.warning("seed: the checkpoint that completes the seed failed (%s)%s; retrying",
                            e, f" ({n} times in a row)" if n > 1 else "")
            return False
        self._trigger_failures = 0
        return True

    # -------------------------------------------------------------- the final round

    async def at_halt(self, timeout: float | None = None) -> None:
        """Inside a checkpoint's halt (gate closed, store taken, new period begun): if the
        dirty set is ready, make the records that reconcile its names, types, attributes,
        links and xattrs with the original as it stands now, with the contents of files
        deferred (``resync``'s ``defer``: no file data is read; they are replayed from the
        log by :meth:`complete`).  The shadow is only read here: the records are applied by
        :meth:`complete`, after the append.  Without a log the contents are compared here
        too.  Never raises: a failure leaves the seed converging.  ``timeout`` (a group
        member: the group's halt bound): past it the round stops at its next record and is
        not attempted (the seed converges again)."""
        if self.state != "ready" or self.done:
            return
        deadline = None if timeout is None else time.monotonic() + timeout

        def stop() -> bool:
            return self._stop or (deadline is not None and time.monotonic() > deadline)
        closed = self.current_period() - 1
        t0 = time.monotonic()
        self.state = "final"
        intents: list[Intent] = list(self.final_intents)
        compare = self.final_compare
        defer = Deferred() if self.olog is not None and not compare else None
        if defer is not None and self.unjournaled() != self.replay_unjournaled:
            log.warning("seed: a change since the last round reached the original without a "
                        "record: the final round compares the contents under the halt")
            defer = None
        stats: dict[str, int] = {}
        try:
            intents = unique(intents + read_periods(self.activity_dir, self.last_period, closed))
            self.dirty = len(intents)
            batch = await trio.to_thread.run_sync(plan_records, self.source_fd, self.shadow, intents,
                                                  self.started_ns, self.spill_dir, stop,
                                                  defer, stats, compare)
            if deadline is not None and time.monotonic() > deadline:
                batch.close()
                raise Stopped()
        except Exception as e:
            if isinstance(e, Stopped) and timeout is not None and not self._stop:
                e = Stopped(f"not done within the halt bound of {timeout:g} s")
            log.warning("seed: the final round failed (%s); converging again", e)
            self.final_intents = intents
            self.last_period = closed
            self.state = "converging"
            return
        # kept until complete(): if the replay or the append fails, they are dirty again
        self.final_intents = intents
        self.final_defer = defer
        self._drop_batch()
        self.final_batch = batch
        self.last_period = closed
        self.final_pending = True
        self.final_halt_s = time.monotonic() - t0
        self.final_stats = {"objects": len(intents),
                            "data_bytes_read": stats.get("data_bytes_read", 0),
                            "deferred_files": len(defer.files) if defer is not None else 0}
        log.info("seed: final round: %d object(s) reconciled under the halt in %.3f s "
                 "(%d bytes of file data read, %d file(s) left to the replay)", len(intents),
                 self.final_halt_s, self.final_stats["data_bytes_read"],
                 self.final_stats["deferred_files"])

    def final_failed(self) -> None:
        """The checkpoint whose halt ran the final round was not made durable (or its
        contents not replayed): the objects of the final round, and every change since
        the halt (new periods), are dirty: converge again."""
        self.final_pending = False
        self.final_defer = None
        self._drop_batch()
        self.state = "converging"

    def _drop_batch(self) -> None:
        if self.final_batch is not None:
            self.final_batch.close()
            self.final_batch = None

    def _replay(self, checkpoint: int) -> dict[str, int]:
        """The contents of the final round's files from the records of the checkpoints after
        ``replay_after`` through ``checkpoint`` (the one whose halt ran it): :func:`replay`."""
        defer, olog, after = self.final_defer, self.olog, self.replay_after
        if defer is None or olog is None:
            return {}
        if after is None:
            raise ReplayError("no round to replay from")
        infos = [i for i in olog.checkpoints(after) if i.marker.checkpoint <= checkpoint]
        if not infos or infos[-1].marker.checkpoint != checkpoint \
                or infos[0].marker.checkpoint != after + 1:
            raise ReplayError(f"checkpoints {after + 1}..{checkpoint} are not all in the log")

        def records() -> Iterator[Record]:
            for info in infos:
                yield from olog.records(info)
        return replay(self.shadow, defer, records(), lambda: self._stop)

    async def complete(self, checkpoint: int, marker_time_ns: int) -> None:
        """The checkpoint whose halt ran the final round is durable: apply the records made
        in the halt, replay the contents of its files (:meth:`_replay`); then the shadow
        holds it: record that."""
        def write() -> None:
            t0 = time.monotonic()
            if self.final_batch is not None:
                batch, self.final_batch = self.final_batch, None
                apply_batch(self.shadow, batch, lambda: self._stop)
            counts = self._replay(checkpoint)
            replay_s = time.monotonic() - t0
            if counts:
                log.info("seed: final round: contents of %d file(s) replayed from checkpoints "
                         "%d..%d in %.3f s (%d record(s), %d write(s), %d bytes)", counts["files"],
                         (self.replay_after or 0) + 1, checkpoint, replay_s,
                         counts["records"], counts["writes"], counts["bytes_written"])
            sh = self.shadow
            doc: dict[str, object] = {"first_complete": checkpoint, "time_ns": marker_time_ns,
                   "started_ns": self.started_ns, "entries": self.entries,
                   "bytes": self.bytes, "rounds": self.rounds,
                   "final_halt_s": self.final_halt_s,
                   "final_halt": self.final_stats,
                   "final_replay": dict(counts, seconds=round(replay_s, 6)),
                   "online": True}
            if self.group_checkpoint is not None:    # a group member (groupseed.py)
                doc["group_checkpoint"] = self.group_checkpoint
            sh.write_state(SEEDED, doc)
            sh.set_applied(checkpoint, marker_time_ns)
            sh.remove_state(SEEDING)
        try:
            await trio.to_thread.run_sync(write)
        except Exception:
            self.final_failed()
            raise
        self.final_pending = False
        self.final_intents = []
        self.final_defer = None
        self._drop_batch()
        self.done = True
        self.first_complete = checkpoint
        self.state = "complete"
        self.done_event.set()
        log.info("seed: complete: checkpoint %d is the first complete checkpoint (%d entries, "
                 "%d bytes, %d round(s), final halt %.3f s)", checkpoint, self.entries, self.bytes,
                 self.rounds, self.final_halt_s or 0.0)

    def stop(self) -> None:
        """Ask every worker to stop and wait for them (shutdown; the state on disk resumes)."""
        self._stop = True
        if not self.done:
            log.info("seed: stopping (the next mount resumes it)")
        for t in (self._copy_thread, self._count_thread, self._work):
            if t is not None and t.is_alive():
                t.join()


def progress_line(st: dict[str, Any]) -> str:
    """One line of seeding progress for a terminal: a bar, counts, rate, time left."""
    done, total = st.get("bytes_copied") or 0, st.get("bytes_total")
    e_done, e_total = st.get("entries_copied") or 0, st.get("entries_total")
    if st.get("phase") != "copy":
        return (f"seeding: copy done ({e_done} entries, {_size(done)}); {st.get('state')}")
    frac = None
    if total:
        frac = min(1.0, done / total)
    elif e_total:
        frac = min(1.0, e_done / e_total)
    bar = ""
    if frac is not None:
        width = 24
        filled = int(frac * width)
        bar = "[" + "#" * filled + "." * (width - filled) + f"] {frac * 100:5.1f}% "
    eta = st.get("eta_s")
    eta_s = f", {_duration(eta)} left" if eta is not None else ""
    of_e = f"/{e_total}" if e_total is not None else ""
    of_b = f"/{_size(total)}" if total is not None else ""
    return (f"seeding: {bar}{e_done}{of_e} entries, {_size(done)}{of_b}, "
            f"{_size(st.get('rate_bytes_per_s') or 0)}/s{eta_s}"
            + (f" ({st['state']})" if str(st.get("state", "")).startswith(("waiting", "stopped")) else ""))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


__all__ = ["SeedingTask", "reconcile", "read_periods", "progress_line", "set_low_priority", "Stopped"]
