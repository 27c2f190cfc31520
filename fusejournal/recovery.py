"""Bringing the shadow to where the journal says it is, before the mount serves.

- ``seed_or_discard``: seed a new shadow (checkpoint 0); on any failure remove
  exactly what the seed made, so there is never a half-seeded shadow.
- ``reseed``: throw the shadow away and copy it afresh from the original (a
  shadow changed by hand, damaged, or behind a repaired log); it then stands
  for the log's last checkpoint, and saved pending operations, write intents
  and the needs-resync state are superseded.
- ``recover``: the last daemon did not stop cleanly, so what its temporary
  store held is lost: apply every confirmed checkpoint, then resync exactly
  the objects its activity log (and the needs-resync state) names into the
  temporary store, to be journaled by the next checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from . import layout
from .activity import ActivityLog, Intent
from .daemonize import Reporter
from .errors import UserError
from .journal import Journal
from .log import OrderedLog
from .resyncflag import NO_HANDLE, ResyncFlag
from .shadow import Shadow, ShadowError
from .tempstore import TempStore
from .updater import Updater

log = logging.getLogger("fusejournal")


def discard_seed(root: Path, made: list[str]) -> None:
    """Remove what an aborted seed made in the shadow directory ``root``: only the
    entries named in ``made`` (those that did not exist before it; "" is ``root`` itself)."""
    for name in made:
        p = root / name
        if name == "":
            continue
        if name in (layout.SHADOW_APPLIED, layout.SHADOW_IDENTITY):
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


def recover(intents: list[Intent], *, activity: ActivityLog, reporter: Reporter, olog: OrderedLog,
            updater: Updater, shadow: Shadow, source_fd: int, store: TempStore,
            resync_flag: ResyncFlag, applied: int) -> int:
    """The last daemon did not stop cleanly: what its temporary store held is
    lost, so resync exactly the objects its activity log names.  Returns the
    checkpoint the shadow stands at (``applied`` if nothing was applied)."""
    from .resync import resync_iter
    # records streamed into the log after the last marker (kept by a clean close the
    # run before): superseded like the pending ones, by the resync below
    dropped = olog.discard_unmarked()
    if dropped:
        log.info("recovery: %d streamed operation(s) after the last marker dropped (resynced "
                 "instead)", dropped)
    if not activity.enabled:
        msg = ("the last daemon did not stop cleanly and kept no activity log (it did not run "
               "as root): files changed since the last checkpoint may differ in the shadow; "
               "re-seed it (new journal and shadow) to be sure")
        log.warning(msg)
        reporter.message("warning: " + msg)
        return applied
    reporter.message(f"recovering after an unclean stop: applying checkpoints up to "
                     f"{olog.last_checkpoint}, then resyncing {len(intents)} object(s)")
    applied = updater.run_once()     # the shadow at the last confirmed checkpoint
    # when the last confirmed checkpoint was taken: directories changed before it
    # (ctime) are known to the shadow already, so resync need not read them
    # (the last *applied* one: in a consistency group, later ones may be uncommitted)
    cps = olog.checkpoints(applied - 1) if applied else []
    cps = [c for c in cps if c.marker.checkpoint == applied]
    if cps:
        since_ns = cps[-1].marker.time_ns
    else:
        since_ns = os.stat(shadow.applied_path).st_mtime_ns   # the seed (checkpoint 0)
    n = 0
    for rec in resync_iter(source_fd, shadow, intents, since_ns=since_ns):
        store.append(rec)                        # spills beyond the memory limit
        n += 1
    log.info("recovery: %d intent(s) resynced into %d record(s); saved pending operations, "
             "if any, are superseded", len(intents), n)
    if not any(i.handle_type == NO_HANDLE for i in resync_flag.loaded):
        resync_flag.recovered = True          # cleared once the next checkpoint is durable
    return applied
