"""Where things live on disk: the journal directory and the shadow directory.

Journal (``--journal DIR``)::

    meta.json      format version, source path and identity, shadow path
    lock           flock()ed by the daemon that owns the journal
    daemon.json    pid and mountpoint of the running daemon (removed at exit)
    daemon.log     the daemon's log
    pending.fjrec  operations captured after the last checkpoint, kept at unmount
    log/           the ordered log: segment files NNNNNNNNNNNNNNNN.fjlog and
                   end.json, see fusejournal.log
    spill/         temporary-store spill files (never needed after a restart)
    needs_resync   objects the original changed that could not be recorded: the
                   next mount resyncs them (fusejournal.resyncflag); absent
                   when there are none
    activity/      write intents for crash recovery (daemons running as root):
                   files *.act, see fusejournal.activity

Shadow (``--shadow DIR``)::

    tree/          the shadow tree: the original as of the applied checkpoint
    inodes/        one hidden hard link per non-directory of tree/, named by
                   the original's inode number (decimal): the inode keys
    staging/       the batch being applied: the updater's cursor (fusejournal.staging)
    applied.json   the checkpoint tree/ stands at (written durably)
    history/       retained checkpoints (fusejournal.history): N.rev, the reverse
                   increment from checkpoint N+1 back to N; N.held/, the objects
                   batch N+1 removed from tree/ (hard links or moved directories,
                   named by their shadow inode number); marker.json, the marker
                   of the applied checkpoint; N.rev.tmp while batch N+1 is applied
    shadow.json    the shadow's identity: a random id shared with the
                   journal's meta.json (``shadow_id``) and the source's identity

A consistency group's journal (``journal =`` in the group file, fusejournal.group)::

    commits.jsonl    the coordinator's commit log
    coordinator.log  the coordinator's log
    run/             0700: coordinator.sock, coordinator.pid, coordinator.lock
    members/         one directory per member

Any file is written atomically as ``NAME.tmp``, then renamed to ``NAME``.

Everything the daemon keeps for itself is private to the mounting user:
directories 0700, files 0600 (``PRIVATE_DIR_MODE``/``PRIVATE_FILE_MODE``,
always given explicitly: the daemon runs with umask 0 so that the
application's files get exactly the caller's mode).  Only the contents of
tree/ keep the original's modes; tree/ is reached only through the 0700
shadow root.

All names here are the single source of truth; code never spells them itself.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

JOURNAL_FORMAT = 1

META = "meta.json"
LOCK = "lock"
DAEMON = "daemon.json"
LOG_DIR = "log"
SPILL_DIR = "spill"
NEEDS_RESYNC = "needs_resync"
ACTIVITY_DIR = "activity"
DAEMON_LOG = "daemon.log"
PENDING = "pending.fjrec"
LOG_SEGMENT_SUFFIX = ".fjlog"   # in LOG_DIR: 16 decimal digits + this
LOG_END = "end.json"            # in LOG_DIR
ACTIVITY_SUFFIX = ".act"        # in ACTIVITY_DIR
#: every name a journal directory may hold (plus ``NAME.tmp`` during an atomic write)
JOURNAL_NAMES = frozenset({META, LOCK, DAEMON, LOG_DIR, SPILL_DIR, ACTIVITY_DIR, DAEMON_LOG, PENDING,
                           NEEDS_RESYNC})

SHADOW_TREE = "tree"
SHADOW_INODES = "inodes"
SHADOW_STAGING = "staging"
SHADOW_APPLIED = "applied.json"
SHADOW_IDENTITY = "shadow.json"
SHADOW_BROWSE_LOCK = "browse.lock"    # fusejournal/browsegate.py
STAGING_CURSOR = "cursor"       # in SHADOW_STAGING
SHADOW_HISTORY = "history"
SHADOW_SEEDING = "seeding.json"  # an online seed in progress (seeding.py): tree/ holds no checkpoint
SHADOW_SEEDED = "seeded.json"    # how the shadow was seeded, and its first complete checkpoint
HISTORY_REV_SUFFIX = ".rev"     # in SHADOW_HISTORY: N + this
HISTORY_HELD_SUFFIX = ".held"   # in SHADOW_HISTORY: N + this, a directory
HISTORY_MARKER = "marker.json"  # in SHADOW_HISTORY

# a consistency group's journal
GROUP_COMMITS = "commits.jsonl"
GROUP_LOG = "coordinator.log"
GROUP_RUN_DIR = "run"
GROUP_COORDINATOR_SOCK = "coordinator.sock"     # in GROUP_RUN_DIR
GROUP_COORDINATOR_PID = "coordinator.pid"       # in GROUP_RUN_DIR
GROUP_COORDINATOR_LOCK = "coordinator.lock"     # in GROUP_RUN_DIR
GROUP_GATE = "gate"                             # in GROUP_RUN_DIR: the shared gate page (groupgate.py)
GROUP_WAKE_PREFIX = "w-"                        # in GROUP_RUN_DIR: w-MEMBER, a member's wake FIFO
GROUP_MEMBERS_DIR = "members"

#: the name a file is written under before it is renamed over NAME
TMP_SUFFIX = ".tmp"
#: every name a shadow directory may hold (plus ``NAME.tmp`` during an atomic write)
SHADOW_NAMES = frozenset({SHADOW_TREE, SHADOW_INODES, SHADOW_STAGING, SHADOW_APPLIED, SHADOW_IDENTITY,
                          SHADOW_BROWSE_LOCK, SHADOW_HISTORY, SHADOW_SEEDING, SHADOW_SEEDED})

#: modes of everything the daemon creates for itself (never the application's files)
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

#: control attributes on the mount's root directory
XATTR_PREFIX = b"user.fusejournal."
XATTR_UPDATE_PERMISSION = XATTR_PREFIX + b"update_permission"
XATTR_CHECKPOINT = XATTR_PREFIX + b"checkpoint"
XATTR_SHADOW_CHECKPOINT = XATTR_PREFIX + b"shadow_checkpoint"
XATTR_STATUS = XATTR_PREFIX + b"status"
XATTR_JOURNAL = XATTR_PREFIX + b"journal"
XATTR_PID = XATTR_PREFIX + b"pid"          # also answered by browse mounts


def known_name(name: str, names: frozenset[str]) -> bool:
    """True if ``name`` belongs in a directory of the layout ``names`` (temp files included)."""
    return name in names or (name.endswith(TMP_SUFFIX) and name[:-len(TMP_SUFFIX)] in names)


def make_private_dirs(path: str | Path) -> None:
    """Create ``path`` and each missing parent with mode 0700.

    Explicit, because the daemon runs with umask 0 (``Path.mkdir(parents=True)``
    would make the parents 0777).  Existing directories are left as they are.
    """
    path = Path(os.path.abspath(path))
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, PRIVATE_DIR_MODE)
        except FileExistsError:
            pass


class LayoutError(Exception):
    """A journal or shadow directory that must not be used (a symlink, another user's, ...)."""


_O_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_dir_stat(lst: os.stat_result, path: str | Path, what: str) -> None:
    """Refuse (LayoutError) a journal or shadow path that is a symlink, not a
    directory, or owned by a user other than this one or root (``lst``: its lstat)."""
    if stat.S_ISLNK(lst.st_mode):
        raise LayoutError(f"{what} {path} is a symlink: name the real directory "
                          f"(--{what} {os.path.realpath(path)}; a symlink could be swapped to send "
                          f"the data elsewhere)")
    if not stat.S_ISDIR(lst.st_mode):
        raise LayoutError(f"{what} {path} is not a directory")
    euid = os.geteuid()
    if lst.st_uid not in (euid, 0):
        raise LayoutError(f"{what} {path} is owned by uid {lst.st_uid}, not by this user "
                          f"(uid {euid}) or root: that user could change it; use a directory "
                          f"of your own")


def check_state_dir(path: str | Path, what: str) -> bool:
    """May ``path`` be used as the journal or shadow?  Reads only: :func:`check_ancestors`,
    then :func:`check_dir_stat` if it exists.  False if it does not exist yet; LayoutError if
    it must not be used; OSError from its lstat other than ENOENT."""
    check_ancestors(path, what)
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return False
    check_dir_stat(lst, path, what)
    return True


def _private_group(gid: int, uid: int) -> bool:
    """True for a user-private group (named like its user, no other member): group write
    permission there gives nobody else access (umask 002 setups)."""
    import grp
    import pwd
    try:
        g, user = grp.getgrgid(gid), pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return g.gr_name == user and set(g.gr_mem) <= {user} and pwd.getpwuid(uid).pw_gid == gid


def check_ancestors(path: str | Path, what: str) -> None:
    """Refuse (LayoutError) a journal or shadow whose parent directories another user can change.

    Whoever may write a parent (without the sticky bit) can move the journal
    or shadow away and put their own in its place, whatever the modes inside.
    Like OpenSSH's StrictModes: every existing directory above ``path``
    (symlinks resolved) must be owned by this user or root and not writable
    by group or others, unless sticky (/tmp); group write is allowed for the
    owner's own user-private group.
    """
    euid = os.geteuid()
    d = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    while True:
        try:
            st = os.stat(d)
        except OSError:
            st = None                               # not created yet: checked once it exists
        if st is not None:
            why = None
            if st.st_uid not in (euid, 0):
                why = f"is owned by uid {st.st_uid}"
            elif (st.st_mode & 0o002 or st.st_mode & 0o020 and not _private_group(st.st_gid, st.st_uid)) \
                    and not st.st_mode & stat.S_ISVTX:
                why = "is writable by other users"
            if why:
                raise LayoutError(f"{what} {path}: the directory {d} above it {why}, who could move the "
                                  f"{what} away and put another in its place; use a location that only "
                                  f"you and root can change (or `chmod go-w {d}`)")
        parent = os.path.dirname(d)
        if parent == d:
            return
        d = parent


def open_private_dir(path: str | Path, what: str) -> int:
    """Open the directory ``path`` without following a symlink and make it private.

    1. lstat ``path``: a symlink or a non-directory is refused (LayoutError).
    2. Open it with O_NOFOLLOW|O_DIRECTORY and check the fd is the object
       just lstat'ed (a swap in between is refused).
    3. Its owner must be this user or root; another user's is refused: that
       user could change what the daemon keeps there.
    4. Owned by this user and not 0700: chmod 0700 (a journal or shadow
       created loose by an older version is tightened).  Owned by root
       while this user is not, and writable by others: refused.

    Returns the open fd (the caller closes it).  OSError (ENOENT, EACCES ...)
    is passed on.
    """
    lst = os.lstat(path)
    check_dir_stat(lst, path, what)
    fd = os.open(path, _O_DIR_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
            raise LayoutError(f"{what} {path} was replaced while being opened")
        euid = os.geteuid()
        if stat.S_IMODE(st.st_mode) != PRIVATE_DIR_MODE:
            if st.st_uid == euid:
                os.fchmod(fd, PRIVATE_DIR_MODE)
            elif st.st_mode & 0o022:
                raise LayoutError(f"{what} {path} is writable by other users and owned by root: "
                                  f"run `chmod 700 {path}` as root")
    except BaseException:
        os.close(fd)
        raise
    return fd


def tighten_entries(dir_fd: int, what: str, *, recurse: frozenset[str] = frozenset(),
                    skip: frozenset[str] = frozenset()) -> None:
    """Make every entry of the directory at ``dir_fd`` private (dirs 0700, files 0600).

    Entries named in ``skip`` are left alone; directories named in
    ``recurse`` get the same treatment one level down.  A symlink is refused
    (LayoutError): the daemon never creates one here, so another user put
    it there.  An entry owned by another user is taken over (chown, as root)
    or refused.
    """
    euid = os.geteuid()
    for name in os.listdir(dir_fd):
        if name in skip:
            continue
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise LayoutError(f"{what}/{name} is a symlink, which fusejournal never creates "
                              f"there: remove it (was it planted by another user?)")
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            continue
        if st.st_uid != euid:
            try:
                os.chown(name, euid, -1, dir_fd=dir_fd, follow_symlinks=False)
            except PermissionError:
                raise LayoutError(f"{what}/{name} is owned by uid {st.st_uid}, not this user: "
                                  f"remove it") from None
        want = PRIVATE_DIR_MODE if stat.S_ISDIR(st.st_mode) else PRIVATE_FILE_MODE
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(name, want, dir_fd=dir_fd)      # lstat'ed just before: not a symlink
        if stat.S_ISDIR(st.st_mode) and name in recurse:
            sub = os.open(name, _O_DIR_NOFOLLOW, dir_fd=dir_fd)
            try:
                tighten_entries(sub, f"{what}/{name}")
            finally:
                os.close(sub)


def state_root() -> Path:
    """Base directory for default journals and shadows.

    root: ``/var/lib/fusejournal``; others: ``$XDG_STATE_HOME/fusejournal``
    (``~/.local/state/fusejournal`` when unset).
    """
    if os.geteuid() == 0:
        return Path("/var/lib/fusejournal")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "fusejournal"


def tighten_state_dirs(source: Path) -> list[Path]:
    """Make fusejournal's own default state directories private again.

    Versions before 0.2 created ``state_root()`` and the per-source directory
    below it with mode 0777 (the daemon's umask is 0), and the journal's
    parent check then refuses them.  Only these two directories, and only when
    each is a real directory (not a symlink) owned by this user, are set to
    0700; anything else is left for the parent check to refuse.  Returns the
    directories changed.
    """
    euid = os.geteuid()
    changed = []
    base = default_dirs(source)[0].parent
    for d in (state_root(), base):
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == euid and st.st_mode & 0o022:
            os.chmod(d, PRIVATE_DIR_MODE)
            changed.append(d)
    return changed


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
