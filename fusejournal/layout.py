"""Where things live on disk: the journal directory and the shadow directory.

Journal (``--journal DIR``)::

    meta.json      format version, source path and identity, shadow path
    lock           flock()ed by the daemon that owns the journal
    daemon.json    pid and mountpoint of the running daemon (removed at exit)
    log/           the ordered log: segment files, see fusejournal.log
    spill/         temporary-store spill files (never needed after a restart)
    needs_resync   objects the original changed that could not be recorded: the
                   next mount resyncs them (fusejournal.resyncflag); absent
                   when there are none

Shadow (``--shadow DIR``)::

    tree/          the shadow tree: the original as of the applied checkpoint
    inodes/        one hidden hard link per non-directory of tree/, named by
                   the original's inode number (decimal): the inode keys
    staging/       the batch being applied and the updater's cursor
    applied.json   the checkpoint tree/ stands at (written durably)

All names here are the single source of truth; code never spells them itself.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

JOURNAL_FORMAT = 1

META = "meta.json"
LOCK = "lock"
DAEMON = "daemon.json"
LOG_DIR = "log"
SPILL_DIR = "spill"
NEEDS_RESYNC = "needs_resync"

SHADOW_TREE = "tree"
SHADOW_INODES = "inodes"
SHADOW_STAGING = "staging"
SHADOW_APPLIED = "applied.json"

#: control attributes on the mount's root directory
XATTR_PREFIX = b"user.fusejournal."
XATTR_UPDATE_PERMISSION = XATTR_PREFIX + b"update_permission"
XATTR_CHECKPOINT = XATTR_PREFIX + b"checkpoint"
XATTR_SHADOW_CHECKPOINT = XATTR_PREFIX + b"shadow_checkpoint"
XATTR_STATUS = XATTR_PREFIX + b"status"
XATTR_JOURNAL = XATTR_PREFIX + b"journal"
XATTR_PID = XATTR_PREFIX + b"pid"          # also answered by browse mounts


def state_root() -> Path:
    """Base directory for default journals and shadows.

    root: ``/var/lib/fusejournal``; others: ``$XDG_STATE_HOME/fusejournal``
    (``~/.local/state/fusejournal`` when unset).
    """
    if os.geteuid() == 0:
        return Path("/var/lib/fusejournal")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "fusejournal"


def default_dirs(source: Path) -> tuple[Path, Path]:
    """Default (journal, shadow) for a source directory.

    One state directory per source, named after its last component plus a
    short hash of its absolute path, so two sources never share one.
    """
    source = Path(os.path.abspath(source))
    digest = hashlib.sha256(os.fsencode(source)).hexdigest()[:12]
    name = (source.name or "root") + "-" + digest
    base = state_root() / name
    return base / "journal", base / "shadow"
