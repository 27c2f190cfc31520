"""The journaled mount's daemon, as wiring: each piece lives in its own module,
and this one puts them together in order.

1. **prepare** — check the request (checks.py), open the journal and the
   ordered log, bring the shadow to the log (recovery.py: seed, re-seed,
   recover after an unclean stop), and build the temporary store, the halt,
   the checkpointer, the control attributes, the Operations and the updater's
   task (updatetask.py);
2. **serve** — run the FUSE session (session.py) with the updater's task (and
   a group member's connection) beside it, until unmounted or signalled;
3. **shutdown** — keep what was captured after the last checkpoint for the
   next mount;
and **status**, which ``fusejournal status`` reads through the control attributes.

One FUSE session per process (pyfuse3 keeps module-level state), so the
journaled mount and each browse mount are separate daemons.
``fusejournal mount`` starts the daemon as a child process in its own session
and waits on a pipe for it to report ``ready`` (or an error, or seeding
progress), like sshfs (daemonize.py): when the command returns 0 the mount is
usable.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import trio

from . import fuseloop, layout, sysc
from .acquisition import sync_through_mount
from .activity import ActivityLog, handles_usable, hold_by_walk
from .checks import (
    MountConfig,
    check_dir,
    check_mountpoint,
    check_options,
    fsname_for,
    fuse_mount_at,
    journal_is_free,
    lazy_unmount,
    mount_options,
    validate_config,
)
from .daemonize import Reporter, setup_logging, spawn
from .errors import EXIT_BUG, EXIT_DAMAGED, UserError
from .fs import SYNC_THREADS, Operations
from .halt import Halt
from .inodes import raise_fd_limit
from .journal import PENDING, Journal, read_daemon_info
from .log import CheckpointInfo, Marker, OrderedLog
from .recovery import (
    discard_seed,
    prepare_online_seed,
    recover,
    reseed,
    reseed_online,
    seed_or_discard,
    start_fresh_seed,
)
from .resyncflag import NO_HANDLE, ResyncFlag
from .seeding import ReplayError, SeedingTask
from .session import serve_session
from .shadow import SEEDED, Shadow, ShadowError
from .streamer import Streamer
from .syncpolicy import DEFAULT_LIMIT_US, inline_limit_ns
from .tempstore import TempStore
from .updatetask import UpdateTask, wait_for_previous_updater

# the names other modules and the tests import from here (moved: issue 8)
__all__ = ["MountConfig", "Daemon", "run_daemon", "run_browse", "fuse_mount_at", "lazy_unmount",
           "check_dir", "journal_is_free", "check_mountpoint", "check_options", "validate_config",
           "discard_seed", "mount_options", "serve_session", "Reporter", "setup_logging", "spawn"]

_fsname = fsname_for
ACTIVITY_DIR = layout.ACTIVITY_DIR

log = logging.getLogger("fusejournal")


class Daemon:
    """One journaled mount: owns every resource through an ExitStack."""

    def __init__(self, cfg: MountConfig, reporter: Reporter) -> None:
        self.cfg = cfg
        self.reporter = reporter
        self.stack = contextlib.ExitStack()
        self.update_task: UpdateTask           # the updater's background task (prepare)

    def prepare(self) -> None:
        from .acquisition import Checkpointer
        from .control import Control
        from .history import retention_policy
        from .updater import Updater

        cfg = self.cfg
        os.umask(0)
        if fuse_mount_at(cfg.mountpoint) is not None:
            check_mountpoint(cfg.mountpoint, journal_free=journal_is_free(cfg.journal))
        validate_config(cfg)                 # nothing is created or changed before this
        check_dir(cfg.source, "source")
        if cfg.mountpoint != cfg.source:
            check_dir(cfg.mountpoint, "mountpoint")
        source_fd = os.open(cfg.source, os.O_RDONLY | os.O_DIRECTORY)
        self.stack.callback(os.close, source_fd)
        self.source_fd = source_fd
        source_st = os.fstat(source_fd)

        self.journal = Journal.open(cfg.journal, cfg.source, source_st, cfg.shadow, reseed=cfg.reseed)
        self.stack.callback(self.journal.close)
        setup_logging(cfg.journal, cfg.debug, self.reporter.fd is None)
        log.info("starting: source %s, mountpoint %s, journal %s, shadow %s",
                 cfg.source, cfg.mountpoint, cfg.journal, self.journal.shadow_path)

        self.olog = OrderedLog(self.journal.log_dir, segment_limit=cfg.segment_limit)
        for w in self.olog.open():
            log.warning("ordered log: %s", w)
            self.reporter.message(f"warning: {w}")
        self.stack.callback(self.olog.close)
        if self.olog.damage is not None:
            raise UserError(f"the ordered log is damaged: {self.olog.damage}. Checkpoints before it are "
                            f"intact. Run `fusejournal fsck --repair {cfg.journal}` to cut the log "
                            f"before the damage (it reports what is dropped)", EXIT_DAMAGED)

        self.shadow = Shadow(self.journal.shadow_path, identity=self.journal.shadow_identity)
        self.stack.callback(self.shadow.close)
        wait_for_previous_updater(self.shadow.root)     # a killed daemon's updater process, dying
        # the seed runs online (seeding.py), a consistency group member's too (groupseed.py):
        # its changes are tracked by the activity log, by handle (CAP_DAC_READ_SEARCH: root)
        # or else by fd (activity.py)
        self.handles = handles_usable()
        online = True
        self.seed_mode: str | None = None          # "fresh" / "resume": an online seed (seeding.py)
        self.seeding: SeedingTask | None = None
        self._seed_made: list[str] = []
        if cfg.reseed:
            if online:
                reseed_online(self.journal, self.shadow, self.olog, cfg.source, self.reporter)
                self.seed_mode = "fresh"
            else:
                reseed(self.journal, self.shadow, self.olog, source_fd, cfg.source, self.reporter)
        elif self.shadow.seeding:
            self.shadow.attach()
            self.seed_mode = "resume"
        elif not self.shadow.exists():
            if self.olog.last_checkpoint:
                raise UserError(f"the shadow {self.shadow.root} is missing but the journal has "
                                f"{self.olog.last_checkpoint} checkpoint(s): restore the shadow or "
                                f"start over with a new journal")
            if online:
                self._seed_made = start_fresh_seed(self.shadow)
                self.seed_mode = "fresh"
            else:
                self.reporter.message(f"seeding the shadow {self.shadow.root} from {cfg.source} "
                                      f"(checkpoint 0)")
                n = seed_or_discard(self.shadow, source_fd, cfg.source, self.reporter.progress)
                log.info("shadow seeded: %d entries", n)
        else:
            self.shadow.attach()          # private, pinned; a shadow from before identities gets one
        applied = self.shadow.applied if self.seed_mode is None else 0
        if applied > self.olog.last_checkpoint:
            raise UserError(f"the shadow stands at checkpoint {applied}, beyond the "
                            f"journal's last ({self.olog.last_checkpoint}): confirmed checkpoints are "
                            f"missing from the log, or they do not belong together; re-seed the "
                            f"shadow (`fusejournal mount --reseed`, application stopped)")

        self.store = TempStore(self.journal.spill_dir, memory_limit=cfg.memory_limit)
        self.updater = Updater(self.olog, self.shadow, keep_bytes=cfg.memory_limit,
                               retention=retention_policy(cfg.keep_last, cfg.keep_within,
                                                          (os.fspath(cfg.group), cfg.member)
                                                          if cfg.group is not None and cfg.member else None))
        group_member: tuple[Path, str] | None = None
        if cfg.group is not None:
            if cfg.member is None:              # the CLI gives both (cli.py)
                raise UserError("a consistency group member needs its member name (--member)")
            group_member = (cfg.group, cfg.member)
        self.update_task = UpdateTask(self.updater, self.olog, self.shadow, applied, journal=cfg.journal,
                                      group=((os.fspath(group_member[0]), group_member[1])
                                             if group_member else None),
                                      debug=cfg.debug)
        self.member = None
        if group_member is not None:            # a consistency group member (member.py)
            from .member import GroupMember
            self.member = GroupMember(*group_member)
            self.stack.callback(self.member.close)
            self.updater.committed = self.member.committed
        # without handles the activity log is kept by fd while seeding, else by inode number
        # (activity.py)
        self.activity = ActivityLog(self.journal.path / ACTIVITY_DIR,
                                    by_fd=not self.handles and self.seed_mode is not None,
                                    by_ino=not self.handles)
        intents = self.activity.open()
        last_run = read_daemon_info(self.journal.path)
        crashed = last_run is not None
        self.had_pending = (self.journal.path / PENDING).exists()
        self.resync_flag = ResyncFlag(self.journal.path / layout.NEEDS_RESYNC)
        flagged = self.resync_flag.load()
        if self.seed_mode is not None:
            # every change since the seed began is in the activity periods it keeps: nothing
            # to recover (the shadow claims no checkpoint); flagged objects are dirty too
            dirty = [i for i in flagged if i.handle_type != NO_HANDLE] if self.handles else []
            earlier = [i for i in intents if i.handle_type < 0 or not self.handles]
            if earlier:
                # named by fds of an earlier run (or by handles this daemon cannot open): found
                # again by a walk, before mounting (activity.hold_by_walk); the rounds then
                # read only this run's periods
                held = hold_by_walk(self.activity, source_fd, earlier)
                log.info("seed: %d object(s) changed during the seed before this mount, %d "
                         "found in the original by a walk", len({i.ino for i in earlier}), len(held))
                dirty += held + [i for i in intents if i.handle_type >= 0 and self.handles]
            self.seeding = prepare_online_seed(
                self.seed_mode, self.shadow, source_fd, self.activity, self.olog, self.journal,
                dirty, cfg, self.reporter, self._seed_made)
            if self.seeding is not None and earlier:
                self.seeding.last_period = self.activity.period - 1
            if self.seeding is None:
                # seeded before the mount: no log by fd needed, nothing changed since it began
                self.activity.seed_done(remove_periods=True)
            # seeded before the mount (prepare_online_seed returned None): the shadow stands at
            # the log's last checkpoint already; otherwise at none until the first complete one
            self.update_task.applied = 0 if self.seeding is not None else self.shadow.applied
            for rec in self.journal.load_pending():
                self.store.append(rec)
        elif crashed or (self.resync_flag.present and self.activity.enabled):
            # changes the last run could not record: recover as after a crash, with those objects
            self.update_task.applied = recover(
                # (without handles every flagged object is found by inode number, handle or not)
                intents + [i for i in flagged if i.handle_type != NO_HANDLE or not self.handles],
                activity=self.activity,
                reporter=self.reporter, olog=self.olog, updater=self.updater, shadow=self.shadow,
                source_fd=source_fd, store=self.store, resync_flag=self.resync_flag,
                applied=applied, handles=self.handles,
                # a daemon without handles kept no activity log before it said so here
                kept=self.handles or last_run is None or "activity" in last_run)
        else:
            pending = 0
            for rec in self.journal.load_pending():
                self.store.append(rec)
                pending += 1
            if pending:
                log.info("%d operation(s) pending from before the last unmount", pending)

        self.halt = (Halt() if self.member is None        # a member's gate is the group's epoch
                     else self.member.make_halt(self.store, self.activity))
        self.streamer = Streamer(self.store, self.olog)     # the store into the log, in the background
        self.checkpointer = Checkpointer(self.store, self.halt, self.olog,
                                         halt_timeout=cfg.halt_timeout, activity=self.activity,
                                         barrier=self.flush_mount,
                                         on_confirmed=self._confirmed, streamer=self.streamer)
        self.control = Control(self.checkpointer, root_uid=lambda: os.fstat(source_fd).st_uid,
                               shadow_checkpoint=lambda: (-1 if self.shadow_applied is None
                                                          else self.shadow_applied),
                               checkpoint=self.checkpoint if self.seeding is not None else None,
                               status=self.status, journal_path=os.fspath(os.path.abspath(cfg.journal)))
        try:
            fsync_limit = inline_limit_ns(os.environ.get("FUSEJOURNAL_FSYNC_INLINE_US"))
        except ValueError as e:          # `mount` refuses it; another caller gets the default
            log.warning("%s: the default (%d µs) is used", e, DEFAULT_LIMIT_US)
            fsync_limit = inline_limit_ns(None)
        self.ops = Operations(source_fd, store=self.store, halt=self.halt, control=self.control,
                              activity=self.activity, writeback=cfg.writeback,
                              resync_flag=self.resync_flag, fsync_limit_ns=fsync_limit,
                              sync_threads=SYNC_THREADS)
        self.stack.callback(self.ops.close_all)
        self.ops.backpressure = self.streamer       # writes wait while the streamer catches up
        if self.member is not None:
            self.member.attach(self.checkpointer, self.control)

        if self.seeding is not None:
            self.seeding.unjournaled = lambda: len(self.resync_flag.reasons)
            if self.member is not None:         # its checkpoints are group checkpoints
                from .groupseed import MemberSeed
                member = self.member
                member.seed = MemberSeed(self.seeding, self._member_seed_done,
                                         member.group.halt_timeout)
                self.seeding.checkpoint = lambda label: member.request_checkpoint(label, auto=True)
            else:
                self.seeding.checkpoint = lambda label: self.checkpoint(label, auto=True)

    def _member_seed_done(self, checkpoint: int) -> None:
        """A group member's seed completed at its ``checkpoint`` (groupseed.py; called before
        the batch is confirmed): the updater starts there, as after Daemon.checkpoint."""
        self.update_task.applied = checkpoint
        self.resync_flag.recovered = True            # flagged objects were reconciled
        if self.member is not None:
            self.member.seed = None
        self.activity.seed_done()            # by fd: go on by inode number

    @property
    def shadow_applied(self) -> int | None:
        """The checkpoint the shadow stands at (the updater's task keeps it); None while the
        shadow is being seeded (it holds none)."""
        if self.seeding is not None and not self.seeding.done:
            return None
        return self.update_task.applied

    async def checkpoint(self, label: str, auto: bool = False) -> Marker:
        """Update permission while an online seed runs (seeding.py, step 4): the halt may
        run the seed's final round; checkpoints before the first complete one keep their
        activity periods (the seed's dirty set) and are never applied."""
        s = self.seeding
        cp = self.checkpointer
        if s is None or s.done:
            return await cp.checkpoint(label)
        async with cp.lock:
            if s.done:
                if auto:                         # the seed completed meanwhile: nothing to do
                    return Marker(self.olog.last_checkpoint, label, 0, 0, 0, 0)
                return await self._plain_checkpoint(label)
            taken = await cp.take(label, hold=s.at_halt)
            final = s.final_pending
            try:
                info = await cp.append(taken, {"seeding": "first complete" if final else "incomplete"})
            except BaseException:
                if final:
                    s.final_failed()
                raise
            if final:
                try:
                    await s.complete(info.marker.checkpoint, info.marker.time_ns)
                except ReplayError as e:
                    # by design (seeding.py, the replay): the records cannot prove the contents
                    # of every file at this checkpoint; nothing was claimed
                    log.warning("seed: checkpoint %d is not the first complete one (%s); "
                                "converging again", info.marker.checkpoint, e)
                except Exception as e:
                    log.error("seed: could not record the first complete checkpoint %d (%s); "
                              "converging again", info.marker.checkpoint, e)
            if s.done:
                self.update_task.applied = info.marker.checkpoint
                self.resync_flag.recovered = True        # flagged objects were reconciled
            else:
                taken.period = 0                 # keep the intents: the seed's dirty set
            cp.confirm(taken, info)
            if s.done:
                self.activity.seed_done()        # by fd: go on by inode number
            return info.marker

    async def _plain_checkpoint(self, label: str) -> Marker:
        """Checkpointer.checkpoint without taking its lock (held by the caller)."""
        cp = self.checkpointer
        taken = await cp.take(label)
        info = await cp.append(taken)
        cp.confirm(taken, info)
        return info.marker

    async def _run_updater(self) -> None:
        """The updater's task, once the shadow holds a checkpoint."""
        if self.seeding is not None:
            await self.seeding.done_event.wait()
        await self.update_task.run()

    async def flush_mount(self) -> int:
        """The barrier before the halt (acquisition.sync_through_mount): every inode
        with a handle open for writing is opened through the mount and fsync'ed, so
        the kernel's dirty pages and queued WRITE requests reach the temporary store
        first.  A ``syncfs`` of the mount is not enough: for FUSE it starts writeback
        but does not wait for it (measured on 6.18: docs/design.md).

        From a worker thread (the trio thread must keep serving the WRITE requests
        this causes); abandoned if the checkpoint's bound expires.  Returns the
        number of inodes synced.
        """
        by_path = not (self.ops.is_root and self.handles)
        targets = self.ops.barrier_targets(with_paths=by_path)
        if not targets:
            return 0
        source = os.readlink(f"/proc/self/fd/{self.source_fd}").encode()
        mountpoint = os.fsencode(os.path.abspath(self.cfg.mountpoint))
        return await trio.to_thread.run_sync(sync_through_mount, mountpoint, targets,
                                             self.ops.barrier_tids, source,
                                             self._barrier_path if by_path else None,
                                             abandon_on_cancel=True)

    def _barrier_path(self, fino: int) -> bytes | None:
        """From the barrier's thread: the original's path of ``fino`` now, asked of
        the Operations in the trio thread (None once the barrier was abandoned:
        the checkpoint it served has failed already)."""
        try:
            return trio.from_thread.run_sync(self.ops.barrier_path, fino)
        except (trio.Cancelled, trio.RunFinishedError):
            return None

    def _confirmed(self, info: CheckpointInfo) -> None:
        if self.had_pending:
            self.journal.clear_pending()
            self.had_pending = False
        try:
            self.resync_flag.settle()
        except OSError as e:
            log.error("could not clear the needs-resync state: %s", e)
        self.update_task.wake()                     # status/wait: catching up, not stopped

    def status(self) -> dict[str, object]:
        cps = self.olog.checkpoints(0)
        hist = sorted(self.checkpointer.halt_history)
        streamed_ops, streamed_bytes = self.streamer.pending()
        return {
            "source": os.fspath(self.cfg.source),
            "mountpoint": os.fspath(self.cfg.mountpoint),
            "journal": os.fspath(os.path.abspath(self.cfg.journal)),
            "shadow": os.fspath(self.shadow.root),
            "pid": os.getpid(),
            "last_checkpoint": self.olog.last_checkpoint,
            "shadow_checkpoint": self.shadow_applied,
            "pending_operations": self.store.operations + streamed_ops,
            "pending_bytes": self.store.raw_bytes + streamed_bytes,
            "pending_memory_bytes": self.store.memory_bytes,
            "pending_spilled_bytes": self.store.spilled_bytes,
            "log_raw_bytes": sum(c.marker.raw_bytes for c in cps),
            "log_stored_bytes": sum(c.marker.stored_bytes for c in cps),
            "log_segments": len(self.olog.segments()),
            "session_raw_bytes": self.checkpointer.confirmed_raw_bytes,
            "session_stored_bytes": self.checkpointer.confirmed_stored_bytes,
            "last_halt_ns": self.checkpointer.last_halt_ns,
            "halt_p99_ns": hist[min(len(hist) - 1, int(len(hist) * 0.99))] if hist else 0,
            "halts": len(hist),
            "activity_intents_written": self.activity.intents_written,
            "activity_held_fds": len(self.activity.held),     # by fd: the seed's dirty objects
            "needs_resync": self.resync_flag.count,
            "needs_resync_reason": self.resync_flag.reason,
            "checkpoint_error": self.checkpointer.last_error,
            "updater_error": self.update_task.error,
            "updater_state": (self.update_task.state() if self.shadow_applied is not None
                              else "waiting for the seed"),
            "seeding": (self.seeding.status() if self.seeding is not None and not self.seeding.done
                        else None),
            "first_complete_checkpoint": self._first_complete(),
            **self.streamer.status(),
            "updater_pid": self.update_task.pid,
            "writeback_cache": self.cfg.writeback,
            # the daemon, not the kernel, drops set-id bits and file capabilities
            # (FUSE_HANDLE_KILLPRIV_V2: one request per write(2), docs/design.md)
            "killpriv_v2": self.ops.handle_killpriv_v2_granted,
            "auto_inval_data": self.ops.auto_inval_data_granted,
            "fuse_loop": "fusejournal" if fuseloop.installed() else "pyfuse3",
            "fuse_loop_waits": fuseloop.waits(),
            "fuse_loop_standbys": fuseloop.standbys(),
            **{f"fuse_loop_spin_{k}": v for k, v in fuseloop.spin_stats().items()},
            "fuse_loop_direct_reads": fuseloop.direct_reads(),
            **self.ops.sync_status(),
            "log_damage": str(self.olog.damage) if getattr(self.olog, "damage", None) else None,
            **(self.member.status() if self.member is not None else {}),
        }

    def _first_complete(self) -> int | None:
        if self.seeding is not None and self.seeding.first_complete is not None:
            return self.seeding.first_complete
        try:
            doc = self.shadow.read_state(SEEDED)
        except ShadowError:
            return None
        n = doc.get("first_complete") if doc else None
        return n if isinstance(n, int) else None

    async def serve(self) -> None:
        cfg = self.cfg
        mounted = False

        def ready() -> None:
            nonlocal mounted
            mounted = True
            self.journal.write_daemon_info({"pid": os.getpid(),
                                            "mountpoint": os.fspath(os.path.abspath(cfg.mountpoint)),
                                            "source": os.fspath(cfg.source),
                                            # what a recovery after a crash finds its objects by
                                            "activity": "handles" if self.handles else "inode numbers"})
            self.reporter.ready({"mountpoint": os.fspath(cfg.mountpoint), "journal": os.fspath(cfg.journal),
                                 "shadow": os.fspath(self.shadow.root), "pid": os.getpid(),
                                 "last_checkpoint": self.olog.last_checkpoint,
                                 "seeding": self.seeding is not None})
        try:
            await serve_session(self.ops, cfg.mountpoint,
                                mount_options(cfg.options, fsname=_fsname(cfg.source, "fusejournal")),
                                ready, self._run_updater, self.streamer.run,
                                *([self.seeding.run] if self.seeding is not None else []),
                                *([self.member.serve] if self.member is not None else []))
        finally:
            if mounted:
                self.shutdown()

    def shutdown(self) -> None:
        """Keep what was captured after the last checkpoint for the next mount."""
        if self.seeding is not None:
            self.seeding.stop()              # the workers end; seeding.json resumes the seed
            if not self.seeding.done:
                try:
                    self.seeding.persist()
                except Exception as e:
                    log.error("seed: could not record the cursor (%s): the next mount resumes "
                              "from the last one recorded", e)
        try:
            if self.member is not None:
                self.member.shutdown()           # a batch in doubt is confirmed or put back
            ops = self.store.operations
            if ops:
                n = self.journal.save_pending(self.store.take())
                log.info("%d operation(s), %d bytes, kept pending for the next mount", ops, n)
            self.olog.close()          # streamed entries not yet marked: kept for the next marker
        except Exception:
            # daemon.json stays: the next mount treats this as a crash and resyncs
            log.exception("could not save the pending operations; the next mount will resync")
            return
        self.activity.close()
        if self.resync_flag.unsaved:
            log.error("the needs-resync state is not on disk: daemon.json stays, so the next "
                      "mount recovers as after a crash")
            return
        self.journal.remove_daemon_info()
        log.info("stopped")


def run_daemon(cfg: MountConfig, ready_fd: int | None) -> int:
    """Run a journaled mount in this process until it is unmounted."""
    raise_fd_limit()             # soft RLIMIT_NOFILE to the hard limit, before seeding
    sysc.keep_heap()             # no page fault per page of every WRITE's data (sysc.py)
    reporter = Reporter(ready_fd)
    daemon = Daemon(cfg, reporter)
    try:
        with daemon.stack:
            daemon.prepare()
            trio.run(daemon.serve)
    except UserError as e:
        log.error("%s", e)
        reporter.error(e.exit_code, str(e))
        if ready_fd is None:
            raise
        return e.exit_code
    except Exception as e:
        log.exception("daemon failed")
        reporter.error(EXIT_BUG, f"internal error: {e!r} (see {cfg.journal / layout.DAEMON_LOG})")
        if ready_fd is None:
            raise
        return EXIT_BUG
    return 0


# the read-only daemons live with the browse commands (browsecli.py), which import none of
# this module: a browse starts without the journaled mount's machinery
from .browsecli import run_browse  # noqa: E402
