"""Bringing the shadow to where the journal says it is, before the mount serves.

- ``seed_or_discard``: seed a new shadow (checkpoint 0); on any failure remove
  exactly what the seed made, so there is never a half-seeded shadow.
- ``reseed``: throw the shadow away and copy it afresh from the original (a
  shadow changed by hand, damaged, or behind a repaired log); it then stands
  for the log's last checkpoint, and saved pending operations, write intents
  and the needs-resync state are superseded.
- ``start_fresh_seed``, ``reseed_online``, ``prepare_online_seed``: the same
  two, online (fusejournal/seeding.py): the copy starts before the mount and
  goes on behind it; if it is done within ``--seed-wait`` seconds and nothing
  changed meanwhile, the shadow holds the checkpoint at once, as before;
- ``recover``: the last daemon did not stop cleanly, so what its temporary
  store held is lost: apply every confirmed checkpoint, then resync exactly
  the objects its activity log (and the needs-resync state) names into the
  temporary store, to be journaled by the next checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout
from .activity import ActivityLog, Intent
from .daemonize import Reporter
from .errors import UserError
from .journal import Journal
from .log import OrderedLog
from .resyncflag import NO_HANDLE, ResyncFlag
from .shadow import SEEDED, SEEDING, Shadow, ShadowError
from .tempstore import TempStore
from .updater import Updater

if TYPE_CHECKING:
    from .checks import MountConfig
    from .seeding import SeedingTask

log = logging.getLogger("fusejournal")


def discard_seed(root: Path, made: list[str]) -> None:
    """Remove what an aborted seed made in the shadow directory ``root``: only the
    entries named in ``made`` (those that did not exist before it; "" is ``root`` itself)."""
    for name in made:
        p = root / name
        if name == "":
            continue
        if name in (layout.SHADOW_APPLIED, layout.SHADOW_IDENTITY, SEEDING, SEEDED):
            for q in (p, root / (name + layout.TMP_SUFFIX)):
                with contextlib.suppress(OSError):
                    os.unlink(q)
        else:
            shutil.rmtree(p, ignore_errors=True)
    if "" in made:
        with contextlib.suppress(OSError):
            os.rmdir(root)


def seed_or_discard(shadow: Shadow, source_fd: int, source: Path,
                    progress: Callable[[int], None]) -> int:
    """Seed a new shadow; on any failure remove what the seed made (never a half-seeded shadow)."""
    root = shadow.root
    made = [n for n in ("", layout.SHADOW_TREE, layout.SHADOW_INODES, layout.SHADOW_STAGING,
                        layout.SHADOW_APPLIED, layout.SHADOW_IDENTITY) if not os.path.lexists(root / n)]
    try:
        shadow.create()
        n: int = shadow.seed(source_fd, progress)
        return n
    except BaseException as e:
        discard_seed(root, made)
        if isinstance(e, (OSError, ShadowError)):
            why = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else (
                e.strerror if isinstance(e, OSError) else str(e))
            raise UserError(f"seeding the shadow {root} from {source} failed ({why}); "
                            f"the partial copy was removed: fix that and mount again") from None
        raise


def reseed(journal: Journal, shadow: Shadow, olog: OrderedLog, source_fd: int, source: Path,
           reporter: Reporter) -> None:
    """Throw the shadow away and copy it afresh from the original.

    For a shadow modified by hand, damaged, or behind a repaired log.  The
    copy stands for the last checkpoint in the log plus everything after
    it, so saved pending operations and write intents are superseded.
    """
    root = shadow.root
    # Journal.open checked (before anything was created) that this is a shadow of
    # this source, an empty directory or nothing: anything else was refused
    if journal.shadow_verdict not in ("missing", "empty", "ours", "legacy", "reseed"):
        raise UserError(f"shadow {root}: refusing to re-seed a directory that is not a shadow "
                        f"of {source} (nothing was changed)")
    if journal.shadow_verdict != "missing":
        shadow.attach()              # private, pinned, locked: not in use, not a swapped symlink
    reporter.message(f"re-seeding the shadow {root} from {source}")
    if journal.shadow_verdict != "missing":
        rfd = shadow.open_root()
        try:
            for name in os.listdir(rfd):
                st = os.stat(name, dir_fd=rfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=rfd)
                else:
                    os.unlink(name, dir_fd=rfd)
        finally:
            os.close(rfd)
    shadow.create()
    n = shadow.seed(source_fd, reporter.progress)
    shadow.set_applied(olog.last_checkpoint)
    olog.discard_unmarked()          # streamed after the last marker: the copy has them
    journal.clear_pending()
    journal.remove_daemon_info()
    act = journal.path / layout.ACTIVITY_DIR
    if act.exists():
        shutil.rmtree(act)
    (journal.path / layout.NEEDS_RESYNC).unlink(missing_ok=True)   # the copy is whole
    log.info("shadow re-seeded: %d entries, standing at checkpoint %d", n, olog.last_checkpoint)


def _seed_failed(root: Path, source: Path, e: BaseException) -> UserError:
    why = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else (
        e.strerror if isinstance(e, OSError) else str(e))
    return UserError(f"seeding the shadow {root} from {source} failed ({why}); "
                     f"the partial copy was removed: fix that and mount again")


def start_fresh_seed(shadow: Shadow) -> list[str]:
    """Create an empty shadow for an online seed; returns the names it made (to discard them
    if the seed fails before the mount is ready)."""
    root = shadow.root
    made = [n for n in ("", layout.SHADOW_TREE, layout.SHADOW_INODES, layout.SHADOW_STAGING,
                        layout.SHADOW_APPLIED, layout.SHADOW_IDENTITY, SEEDING, SEEDED)
            if not os.path.lexists(root / n)]
    shadow.prepare_seed()
    return made


def reseed_online(journal: Journal, shadow: Shadow, olog: OrderedLog, source: Path,
                  reporter: Reporter) -> None:
    """``--reseed`` with an online seed: mark the shadow as being seeded (durably, first: a
    kill from here on resumes a seed, never trusts the old copy), empty it, and drop what the
    copy supersedes (saved pending operations, write intents, the needs-resync state)."""
    from .seeding import SeedingTask
    root = shadow.root
    if journal.shadow_verdict not in ("missing", "empty", "ours", "legacy", "reseed"):
        raise UserError(f"shadow {root}: refusing to re-seed a directory that is not a shadow "
                        f"of {source} (nothing was changed)")
    if journal.shadow_verdict != "missing":
        shadow.attach()              # private, pinned, locked: not in use, not a swapped symlink
    reporter.message(f"re-seeding the shadow {root} from {source} (in the background)")
    shadow.create()
    shadow.write_state(SEEDING, SeedingTask.new_state(1, 0))
    # the identity goes too: the re-seeded shadow belongs to this journal (written again below)
    keep = {SEEDING, layout.SHADOW_BROWSE_LOCK}
    rfd = shadow.open_root()
    try:
        for name in os.listdir(rfd):
            if name in keep:
                continue
            st = os.stat(name, dir_fd=rfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=rfd)
            else:
                os.unlink(name, dir_fd=rfd)
        os.fsync(rfd)
    finally:
        os.close(rfd)
    shadow.create()
    olog.discard_unmarked()          # streamed after the last marker: the copy will have them
    journal.clear_pending()
    journal.remove_daemon_info()
    act = journal.path / layout.ACTIVITY_DIR
    if act.exists():
        shutil.rmtree(act)
    (journal.path / layout.NEEDS_RESYNC).unlink(missing_ok=True)   # the copy reads the original


def prepare_online_seed(mode: str, shadow: Shadow, source_fd: int, activity: ActivityLog,
                        olog: OrderedLog, journal: Journal, flagged: list[Intent], cfg: MountConfig,
                        reporter: Reporter, made: list[str]) -> SeedingTask | None:
    """Start (``mode`` "fresh") or resume ("resume") an online seed before the mount.

    The copy runs in a worker thread; this waits for it at most ``cfg.seed_wait``
    seconds.  If it finished and nothing changed since the seed began (no activity
    period, nothing flagged), the shadow stands at the log's last checkpoint at once
    and None is returned (no online seed).  A fresh seed that fails within that time
    removes what it made and is a UserError (nothing was mounted yet; with a wait of 0
    the mount goes ahead and ``status`` shows the error).  Otherwise the
    :class:`SeedingTask` is returned, to run beside the mount.
    """
    import sys

    from .seed import sweep_hidden_links
    from .seeding import SeedingTask, read_periods
    from .staging import clear_cursor
    root = shadow.root
    if mode == "fresh":
        state = SeedingTask.new_state(activity.period, olog.last_checkpoint)
    else:
        state = shadow.read_state(SEEDING) or {}
        if not isinstance(state.get("started_ns"), int) or not isinstance(state.get("first_period"), int):
            raise UserError(f"{root / SEEDING} is damaged: re-seed the shadow "
                            f"(fusejournal mount --reseed)")
        if os.path.lexists(shadow.applied_path):        # left by an interrupted completion
            os.unlink(shadow.applied_path)
    clear_cursor(shadow)                     # a reconciliation round killed half-way
    task = SeedingTask(shadow, source_fd, activity_dir=activity.dir, spill_dir=journal.spill_dir,
                       state=state, new_period=activity.new_period,
                       current_period=lambda: activity.period, extra_intents=flagged,
                       foreground_tty=reporter.fd is None and sys.stderr.isatty(), olog=olog)
    if task.phase != "copy":
        reporter.message(f"resuming the seed of the shadow {root}: reconciling the changes made "
                         f"while it was copied")
        return task
    reporter.message(f"{'seeding' if mode == 'fresh' else 'resuming the seed of'} the shadow {root} "
                     f"from the original (in the background once mounted)")
    try:
        task.start_copy()
    except BaseException as e:
        if mode == "fresh":
            discard_seed(root, made)
            if isinstance(e, (OSError, ShadowError)):
                raise _seed_failed(root, Path(os.readlink(f"/proc/self/fd/{source_fd}")), e) from None
        raise
    finished = task.wait_copy(cfg.seed_wait)
    err = task.copy_error
    if finished and err is not None and cfg.seed_wait > 0:      # (0: mount at once, whatever)
        if mode == "fresh" and made:
            discard_seed(root, made)
            raise _seed_failed(root, Path(os.readlink(f"/proc/self/fd/{source_fd}")), err) from None
        if not isinstance(err, OSError) or err.errno not in (28, 122):   # ENOSPC, EDQUOT: waited out
            raise UserError(f"seeding the shadow {root} failed: {err}; the copy resumes at the "
                            f"next mount (or re-seed: fusejournal mount --reseed)") from None
    if finished and err is None and not flagged and not read_periods(activity.dir, task.first_period - 1,
                                                                     1 << 62):
        # nothing changed since the seed began: the copy is exact now
        sweep_hidden_links(shadow)
        base = olog.last_checkpoint
        shadow.write_state(SEEDED, {"first_complete": base, "time_ns": state["started_ns"],
                                    "started_ns": state["started_ns"], "entries": task.entries,
                                    "bytes": task.bytes, "online": False})
        shadow.set_applied(base)
        shadow.remove_state(SEEDING)
        log.info("shadow seeded before mounting: %d entries, standing at checkpoint %d",
                 task.entries, base)
        return None
    log.info("seed: continuing in the background after the mount (%d entries copied so far)",
             task.entries)
    return task


def recover(intents: list[Intent], *, activity: ActivityLog, reporter: Reporter, olog: OrderedLog,
            updater: Updater, shadow: Shadow, source_fd: int, store: TempStore,
            resync_flag: ResyncFlag, applied: int, handles: bool = True, kept: bool = True) -> int:
    """The last daemon did not stop cleanly: what its temporary store held is
    lost, so resync exactly the objects its activity log names.  Returns the
    checkpoint the shadow stands at (``applied`` if nothing was applied).

    ``handles``: this daemon can open objects by handle (CAP_DAC_READ_SEARCH).  If
    not, the objects are first found by inode number in one metadata walk of the
    original (:func:`~fusejournal.activity.hold_by_walk`; exact: nothing changes the
    original while it is not mounted) and held open for the resync, then closed.
    ``kept``: the last daemon kept an activity log (one without handles from before
    2026-12-02 kept none: then a warning, and nothing is resynced)."""
    from .activity import hold_by_walk
    from .resync import resync_iter
    # records streamed into the log after the last marker (kept by a clean close the
    # run before): superseded like the pending ones, by the resync below
    dropped = olog.discard_unmarked()
    if dropped:
        log.info("recovery: %d streamed operation(s) after the last marker dropped (resynced "
                 "instead)", dropped)
    if not activity.enabled or not kept:
        msg = ("the last daemon did not stop cleanly and kept no activity log (it did not run "
               "as root): files changed since the last checkpoint may differ in the shadow; "
               "re-seed it (new journal and shadow) to be sure")
        log.warning(msg)
        reporter.message("warning: " + msg)
        return applied
    reporter.message(f"recovering after an unclean stop: applying checkpoints up to "
                     f"{olog.last_checkpoint}, then resyncing {len(intents)} object(s)")
    found_all = vanished_dir = False
    budget = activity.budget
    try:
        if not handles:
            # one held fd per object; before the mount nothing else holds many
            named = len({(i.ino, i.is_dir) for i in intents})
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            activity.budget = max(budget, min(named, soft - 256))
            named_dirs = {i.ino for i in intents if i.is_dir}
            intents = hold_by_walk(activity, source_fd, intents)
            # a directory the walk did not find is gone, maybe replaced: by handle, the
            # resync learns that from ESTALE; here, it compares every directory it reaches
            vanished_dir = len(named_dirs) > sum(1 for i in intents if i.is_dir)
            if activity.over_budget:
                raise UserError(f"recovering after an unclean stop needs {named} objects held "
                                f"open, more than the open-file limit allows ({soft}): raise it "
                                f"(ulimit -n) and mount again")
            log.info("recovery: %d object(s) named by the activity log, %d found in the "
                     "original by a walk (the others are gone: their directories' intents "
                     "remove them)", named, len(intents))
            found_all = True
        applied = updater.run_once()     # the shadow at the last confirmed checkpoint
        # when the last confirmed checkpoint was taken: directories changed before it
        # (ctime) are known to the shadow already, so resync need not read them
        # (the last *applied* one: in a consistency group, later ones may be uncommitted)
        cps = olog.checkpoints(applied - 1) if applied else []
        cps = [c for c in cps if c.marker.checkpoint == applied]
        since_ns: int | None
        if cps:
            since_ns = cps[-1].marker.time_ns
        elif applied:
            # its segment was deleted (the log rolled: OrderedLog._roll): applied.json keeps the
            # marker's time; without it (written by an older fusejournal) compare every directory
            since_ns = shadow.applied_checkpoint_time_ns
        else:
            since_ns = os.stat(shadow.applied_path).st_mtime_ns   # the seed (checkpoint 0)
        if vanished_dir:
            since_ns = None
        n = 0
        for rec in resync_iter(source_fd, shadow, intents, since_ns=since_ns):
            store.append(rec)                        # spills beyond the memory limit
            n += 1
    finally:
        if not handles:
            activity.budget = budget
            activity.release()                   # the walk's fds
    log.info("recovery: %d intent(s) resynced into %d record(s); saved pending operations, "
             "if any, are superseded", len(intents), n)
    # (found by a walk, an object flagged without a handle is resynced too)
    if found_all or not any(i.handle_type == NO_HANDLE for i in resync_flag.loaded):
        resync_flag.recovered = True          # cleared once the next checkpoint is durable
    return applied
