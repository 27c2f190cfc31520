"""The daemon's lifecycle: check, open the journal, seed the shadow, mount,
serve, run the updater, and shut down without losing anything captured.

One FUSE session per process (pyfuse3 keeps module-level state), so the
journaled mount and each browse mount are separate daemons.

``fusejournal mount`` starts the daemon as a child process in its own session
and waits on a pipe for it to report ``ready`` (or an error, or seeding
progress), like sshfs: when the command returns 0 the mount is usable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from . import layout
from .acquisition import sync_through_mount
from .errors import EXIT_BUG, EXIT_DAMAGED, EXIT_UNUSABLE, EXIT_USAGE, UserError
from .fs import Operations
from .halt import Halt
from .inodes import raise_fd_limit

ACTIVITY_DIR = layout.ACTIVITY_DIR
from .activity import ActivityLog
from .journal import PENDING, Journal, read_daemon_info
from .log import OrderedLog
from .resyncflag import NO_HANDLE, ResyncFlag
from .shadow import Shadow
from .tempstore import TempStore

log = logging.getLogger("fusejournal")


@dataclass
class MountConfig:
    source: Path
    mountpoint: Path
    journal: Path
    shadow: Path
    options: list[str] = field(default_factory=list)
    memory_limit: int = 64 << 20
    halt_timeout: float = 5.0
    segment_limit: int = 64 << 20
    reseed: bool = False
    writeback: bool = False
    debug: bool = False
    group: Path | None = None       # a consistency group's file (fusejournal/group.py) ...
    member: str | None = None       # ... and this tree's member name in it


# ------------------------------------------------------------------ checks

def _unescape_mountinfo(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def fuse_mount_at(path: Path) -> str | None:
    """fsname of the FUSE filesystem mounted exactly at ``path``, else None."""
    target = os.path.abspath(path)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or _unescape_mountinfo(fields[4]) != target:
                    continue
                fstype, fsname = (right.split() + ["", ""])[:2]
                found = fsname if fstype.startswith("fuse") else None   # the topmost mount wins
    except OSError:
        return None
    return found


def lazy_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", os.fspath(path)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def check_dir(path: Path, what: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UserError(f"{what} {path} is a dead FUSE mount: run `fusermount3 -u -z {path}`") from None
        raise UserError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {path} is not a directory")


def journal_is_free(journal: Path) -> bool:
    """True if no daemon holds the journal's lock (or there is no journal yet)."""
    import fcntl
    try:
        fd = os.open(Path(journal) / layout.LOCK, os.O_RDWR)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def check_mountpoint(mountpoint: Path, *, journal_free: bool) -> None:
    """Refuse a mountpoint that already carries a FUSE mount.

    A dead fusejournal mount (its daemon was killed: ENOTCONN) is cleared with
    a lazy unmount when this journal is free, so a restart after a crash works.
    """
    fsname = fuse_mount_at(mountpoint)
    if fsname is None:
        return
    dead = False
    try:
        os.statvfs(mountpoint)       # never answered from the kernel's caches
    except OSError as e:
        dead = e.errno == errno.ENOTCONN
    if dead and journal_free and fsname.startswith("fusejournal"):
        log.warning("clearing the dead fusejournal mount at %s", mountpoint)
        lazy_unmount(mountpoint)
        if fuse_mount_at(mountpoint) is None:
            return
    if dead:
        raise UserError(f"mountpoint {mountpoint} is a dead FUSE mount: run `fusermount3 -u -z {mountpoint}`")
    raise UserError(f"mountpoint {mountpoint} is already a FUSE mount ({fsname})")


#: ``-o`` options libfuse 3.14 accepts (lib/mount.c fuse_mount_opts, fuse_lowlevel.c
#: fuse_ll_opts; probed with pyfuse3.init), plus our own two; blkdev/blksize need a
#: block device, and with max_read the session dies at the first read: refused
_FLAG_OPTIONS = frozenset({
    "allow_other", "allow_root", "auto_unmount", "default_permissions", "debug",
    "ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "sync", "dirsync",
    "atime", "noatime", "no_default_permissions", "noallow_other"})
_VALUE_OPTIONS = frozenset({"fsname", "subtype", "context", "fscontext", "defcontext",
                            "rootcontext", "user"})     # max_read: pyfuse3 then dies on reads


def check_options(extra: list[str]) -> None:
    """Refuse any ``-o`` option libfuse would reject, before anything touches the disk."""
    for o in extra:
        for part in o.split(","):
            part = part.strip()
            if not part:
                continue
            name, eq, value = part.partition("=")
            if eq:
                ok = name in _VALUE_OPTIONS and value != "" and "\0" not in value
            else:
                ok = part in _FLAG_OPTIONS
            if not ok:
                raise UserError(f"unknown or invalid mount option {part!r} (-o accepts "
                                f"{', '.join(sorted(_FLAG_OPTIONS))}, and "
                                f"{'=, '.join(sorted(_VALUE_OPTIONS))}=VALUE)", EXIT_USAGE)


def _mount_points() -> list[tuple[str, str, str]]:
    """(mount point, fstype, fsname) of every mount this process sees."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5:
                    fstype, fsname = (right.split() + ["", ""])[:2]
                    out.append((_unescape_mountinfo(fields[4]), fstype, fsname))
    except OSError:
        pass
    return out


def _within(p: str, d: str) -> bool:
    """``p`` is ``d`` or lies below it (both real, absolute paths)."""
    return p == d or p.startswith(d.rstrip("/") + "/")


def validate_config(cfg: MountConfig) -> None:
    """Check everything about a mount request before anything is created or changed.

    Options, the source (a directory, not a FUSE mount, no other filesystem
    mounted inside it), the mountpoint, and how source, mountpoint, journal
    and shadow lie relative to each other.  Raises UserError (one line).
    """
    check_options(cfg.options)
    for o in mount_options(cfg.options, fsname=_fsname(cfg.source, "fusejournal")):
        if not o.isascii():
            raise UserError(f"mount option {o!r} is not ASCII (libfuse takes ASCII options only)",
                            EXIT_USAGE)
    check_dir(cfg.source, "source")
    if cfg.mountpoint != cfg.source:
        check_dir(cfg.mountpoint, "mountpoint")
    for p, what in ((cfg.journal, "journal"), (cfg.shadow, "shadow")):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue                                # created at the mount
        except OSError as e:
            raise UserError(f"the {what} {p} is not writable: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UserError(f"the {what} {p} exists and is not a directory (--{what} names the "
                            f"directory to keep it in)", EXIT_USAGE)
    src, mp, jr, sh = (os.path.realpath(os.fsdecode(p)) for p in
                       (cfg.source, cfg.mountpoint, cfg.journal, cfg.shadow))
    if jr == sh:
        raise UserError(f"the journal and the shadow must be different directories (both {jr})",
                        EXIT_USAGE)
    if _within(sh, jr) or _within(jr, sh):
        raise UserError(f"the journal {jr} and the shadow {sh} must not lie inside one another",
                        EXIT_USAGE)
    for p, what in ((jr, "journal"), (sh, "shadow")):
        if _within(p, src):
            raise UserError(f"the {what} {p} must not be inside the source {src}", EXIT_USAGE)
        if _within(src, p):
            raise UserError(f"the source {src} must not be inside the {what} {p}", EXIT_USAGE)
        if _within(mp, p):
            raise UserError(f"the mountpoint {mp} must not be inside the {what} {p}", EXIT_USAGE)
    if mp != src and _within(mp, src):
        raise UserError(f"the mountpoint {mp} must not be inside the source {src} (mount over the "
                        f"source itself, or outside it)", EXIT_USAGE)
    mounts = _mount_points()
    if mp != src and fuse_mount_at(Path(src)) is not None:
        raise UserError(f"the source {src} is a FUSE mount ({fuse_mount_at(Path(src))}): journal the "
                        f"directory underneath it instead")
    below = [(m, t) for m, t, _ in mounts if m != src and _within(m, src) and m != mp]
    if below:
        m, t = below[0]
        more = f" (and {len(below) - 1} more)" if len(below) > 1 else ""
        raise UserError(f"{m} is a mount point ({t}) inside the source {src}{more}: a source must be "
                        f"one filesystem; unmount it, or journal it separately")
    # the filesystem the source lies on: the longest mount point above it
    home = max((x for x in mounts if _within(src, x[0])), key=lambda x: len(x[0]), default=None)
    if home is not None and home[0] != src and home[1].startswith("fuse") \
            and home[2].startswith("fusejournal"):
        raise UserError(f"the source {src} lies inside the fusejournal mount {home[0]}: journal the "
                        f"original directory instead")


def discard_seed(root: Path, made: list[str]) -> None:
    """Remove what an aborted seed made in the shadow directory ``root``: only the
    entries named in ``made`` (those that did not exist before it; "" is ``root`` itself)."""
    import shutil
    for name in made:
        p = root / name
        if name == "":
            continue
        if name in (layout.SHADOW_APPLIED, layout.SHADOW_IDENTITY):
            for q in (p, root / (name + ".tmp")):
                with contextlib.suppress(OSError):
                    os.unlink(q)
        else:
            shutil.rmtree(p, ignore_errors=True)
    if "" in made:
        with contextlib.suppress(OSError):
            os.rmdir(root)


def mount_options(extra: list[str], *, fsname: str, read_only: bool = False) -> set[str]:
    opts = {"default_permissions", f"fsname={fsname}", "subtype=fusejournal"}
    if os.geteuid() == 0:
        opts.add("allow_other")
    if read_only:
        opts.add("ro")
    for o in extra:
        for part in o.split(","):
            part = part.strip()
            if not part:
                continue
            if part.startswith("no_default_permissions"):
                opts.discard("default_permissions")
            elif part == "noallow_other":
                opts.discard("allow_other")
            else:
                opts.add(part)
    return opts


def _fsname(source: Path, prefix: str) -> str:
    # libfuse takes options as ASCII: show other bytes (non-UTF-8 or not) as \xNN
    s = os.fsencode(source).decode("ascii", "backslashreplace").replace(",", "_").replace(" ", "_")
    return f"{prefix}:{s}"


# ------------------------------------------------------------------ daemon

async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for signum in sigs:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


async def serve_session(ops: Operations, mountpoint: Path, opts: set[str],
                        on_ready: Callable[[], None], *background: Callable) -> None:
    """Mount ``ops`` (one FUSE session per process), call ``on_ready``, serve until
    unmounted or signalled, with ``background`` tasks alongside; always close the session."""
    try:
        pyfuse3.init(ops, os.fspath(mountpoint), opts)
    except RuntimeError as e:
        raise UserError(f"cannot mount at {mountpoint}: {e}") from None
    unmounted = False
    try:
        on_ready()
        async with trio.open_nursery() as nursery:
            for task in background:
                nursery.start_soon(task)
            nursery.start_soon(_terminate_on_signal)
            await pyfuse3.main()
            unmounted = True
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=not unmounted)


class Reporter:
    """Tells the waiting ``fusejournal mount`` how start-up goes (or stderr in the foreground)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self._last = 0.0

    def _send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode("utf-8", "surrogateescape"))
        except OSError:
            pass

    def progress(self, n: int) -> None:
        now = time.monotonic()
        if now - self._last >= 0.2:
            self._last = now
            self._send(f"progress {n}")
            if self.fd is None and sys.stderr.isatty():
                print(f"\rseeding the shadow: {n} entries", end="", file=sys.stderr)

    def message(self, text: str) -> None:
        self._send(f"message {text}")
        if self.fd is None:
            print(text, file=sys.stderr)

    def ready(self, info: dict) -> None:
        self._send("ready " + json.dumps(info))
        self.close()

    def error(self, code: int, text: str) -> None:
        self._send(f"error {code} {text}")
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def setup_logging(journal: Path | None, debug: bool, foreground: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    if journal is not None:
        try:
            # 0600 and never through a symlink: the daemon runs with umask 0
            fd = os.open(journal / layout.DAEMON_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                         | os.O_NOFOLLOW | os.O_CLOEXEC, layout.PRIVATE_FILE_MODE)
            os.fchmod(fd, layout.PRIVATE_FILE_MODE)
            h = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace"))
            h.setFormatter(fmt)
            root.addHandler(h)
        except OSError:
            pass
    if foreground:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)


class Daemon:
    """One journaled mount: owns every resource through an ExitStack."""

    def __init__(self, cfg: MountConfig, reporter: Reporter) -> None:
        self.cfg = cfg
        self.reporter = reporter
        self.stack = contextlib.ExitStack()
        self.shadow_applied = 0
        self.updater_error: str | None = None
        self.updater_waiting: str | None = None     # a full shadow filesystem: waited out
        self.updater_busy = False                   # a pass is running or about to run
        self._wake = trio.Event()

    def prepare(self) -> None:
        from .acquisition import Checkpointer
        from .control import Control
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

        self.log = OrderedLog(self.journal.log_dir, segment_limit=cfg.segment_limit)
        for w in self.log.open():
            log.warning("ordered log: %s", w)
            self.reporter.message(f"warning: {w}")
        self.stack.callback(self.log.close)
        if self.log.damage is not None:
            raise UserError(f"the ordered log is damaged: {self.log.damage}. Checkpoints before it are "
                            f"intact. Run `fusejournal fsck --repair {cfg.journal}` to cut the log "
                            f"before the damage (it reports what is dropped)", EXIT_DAMAGED)

        self.shadow = Shadow(self.journal.shadow_path, identity=self.journal.shadow_identity)
        self.stack.callback(self.shadow.close)
        if cfg.reseed:
            self.reseed()
        elif not self.shadow.exists():
            if self.log.last_checkpoint:
                raise UserError(f"the shadow {self.shadow.root} is missing but the journal has "
                                f"{self.log.last_checkpoint} checkpoint(s): restore the shadow or "
                                f"start over with a new journal")
            self.reporter.message(f"seeding the shadow {self.shadow.root} from {cfg.source} (checkpoint 0)")
            n = self._seed_or_discard(source_fd)
            log.info("shadow seeded: %d entries", n)
        else:
            self.shadow.attach()          # private, pinned; a shadow from before identities gets one
        self.shadow_applied = self.shadow.applied
        if self.shadow_applied > self.log.last_checkpoint:
            raise UserError(f"the shadow stands at checkpoint {self.shadow_applied}, beyond the "
                            f"journal's last ({self.log.last_checkpoint}): confirmed checkpoints are "
                            f"missing from the log, or they do not belong together; re-seed the "
                            f"shadow (`fusejournal mount --reseed`, application stopped)")

        self.store = TempStore(self.journal.spill_dir, memory_limit=cfg.memory_limit)
        self.updater = Updater(self.log, self.shadow)
        self.member = None
        if cfg.group is not None:               # a consistency group member (member.py)
            from .member import GroupMember
            self.member = GroupMember(cfg.group, cfg.member)
            self.stack.callback(self.member.close)
            self.updater.committed = self.member.committed
        self.activity = ActivityLog(self.journal.path / ACTIVITY_DIR, enabled=os.geteuid() == 0)
        intents = self.activity.open() if self.activity.enabled else []
        crashed = read_daemon_info(self.journal.path) is not None
        self.had_pending = (self.journal.path / PENDING).exists()
        self.resync_flag = ResyncFlag(self.journal.path / layout.NEEDS_RESYNC)
        flagged = self.resync_flag.load()
        if self.resync_flag.present and not crashed and not self.activity.enabled:
            msg = (f"{self.resync_flag.count or 'some'} object(s) changed in the original could not "
                   f"be journaled (see {layout.NEEDS_RESYNC} in the journal, daemon.log) and without "
                   f"an activity log (not root) they cannot be resynced: re-seed the shadow "
                   f"(mount --reseed) to be sure")
            log.warning(msg)
            self.reporter.message("warning: " + msg)
        if crashed or (self.resync_flag.present and self.activity.enabled):
            # changes the last run could not record: recover as after a crash, with those objects
            self.recover(intents + [i for i in flagged if i.handle_type != NO_HANDLE])
        else:
            pending = 0
            for rec in self.journal.load_pending():
                self.store.append(rec)
                pending += 1
            if pending:
                log.info("%d operation(s) pending from before the last unmount", pending)

        self.halt = Halt()
        self.checkpointer = Checkpointer(self.store, self.halt, self.log,
                                         halt_timeout=cfg.halt_timeout, activity=self.activity,
                                         barrier=self.flush_mount,
                                         on_confirmed=self._confirmed)
        self.control = Control(self.checkpointer, root_uid=lambda: os.fstat(source_fd).st_uid,
                               shadow_checkpoint=lambda: self.shadow_applied,
                               status=self.status, journal_path=os.fspath(os.path.abspath(cfg.journal)))
        self.ops = Operations(source_fd, store=self.store, halt=self.halt, control=self.control,
                              activity=self.activity, writeback=cfg.writeback,
                              resync_flag=self.resync_flag)
        self.stack.callback(self.ops.close_all)
        if self.member is not None:
            self.member.attach(self.checkpointer, self.control)

    def _seed_or_discard(self, source_fd: int) -> int:
        """Seed a new shadow; on any failure remove what the seed made (never a half-seeded shadow)."""
        from .shadow import ShadowError
        root = self.shadow.root
        made = [n for n in ("", layout.SHADOW_TREE, layout.SHADOW_INODES, layout.SHADOW_STAGING,
                            layout.SHADOW_APPLIED, layout.SHADOW_IDENTITY) if not os.path.lexists(root / n)]
        try:
            self.shadow.create()
            return self.shadow.seed(source_fd, self.reporter.progress)
        except BaseException as e:
            discard_seed(root, made)
            if isinstance(e, (OSError, ShadowError)):
                why = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else (
                    e.strerror if isinstance(e, OSError) else str(e))
                raise UserError(f"seeding the shadow {root} from {self.cfg.source} failed ({why}); "
                                f"the partial copy was removed: fix that and mount again") from None
            raise

    def reseed(self) -> None:
        """Throw the shadow away and copy it afresh from the original.

        For a shadow modified by hand, damaged, or behind a repaired log.  The
        copy stands for the last checkpoint in the log plus everything after
        it, so saved pending operations and write intents are superseded.
        """
        import shutil
        root = self.shadow.root
        # Journal.open checked (before anything was created) that this is a shadow of
        # this source, an empty directory or nothing: anything else was refused
        if self.journal.shadow_verdict not in ("missing", "empty", "ours", "legacy", "reseed"):
            raise UserError(f"shadow {root}: refusing to re-seed a directory that is not a shadow "
                            f"of {self.cfg.source} (nothing was changed)")
        if self.journal.shadow_verdict != "missing":
            self.shadow.attach()              # private, pinned, locked: not in use, not a swapped symlink
        self.reporter.message(f"re-seeding the shadow {root} from {self.cfg.source}")
        if self.journal.shadow_verdict != "missing":
            rfd = self.shadow.open_root()
            try:
                for name in os.listdir(rfd):
                    st = os.stat(name, dir_fd=rfd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        shutil.rmtree(name, dir_fd=rfd)
                    else:
                        os.unlink(name, dir_fd=rfd)
            finally:
                os.close(rfd)
        self.shadow.create()
        n = self.shadow.seed(self.source_fd, self.reporter.progress)
        self.shadow.set_applied(self.log.last_checkpoint)
        self.journal.clear_pending()
        self.journal.remove_daemon_info()
        act = self.journal.path / ACTIVITY_DIR
        if act.exists():
            shutil.rmtree(act)
        (self.journal.path / layout.NEEDS_RESYNC).unlink(missing_ok=True)   # the copy is whole
        log.info("shadow re-seeded: %d entries, standing at checkpoint %d", n, self.log.last_checkpoint)

    def recover(self, intents: list) -> None:
        """The last daemon did not stop cleanly: what its temporary store held is
        lost, so resync exactly the objects its activity log names."""
        from .resync import resync_iter
        if not self.activity.enabled:
            msg = ("the last daemon did not stop cleanly and kept no activity log (it did not run "
                   "as root): files changed since the last checkpoint may differ in the shadow; "
                   "re-seed it (new journal and shadow) to be sure")
            log.warning(msg)
            self.reporter.message("warning: " + msg)
            return
        self.reporter.message(f"recovering after an unclean stop: applying checkpoints up to "
                              f"{self.log.last_checkpoint}, then resyncing {len(intents)} object(s)")
        self.shadow_applied = self.updater.run_once()     # the shadow at the last confirmed checkpoint
        # when the last confirmed checkpoint was taken: directories changed before it
        # (ctime) are known to the shadow already, so resync need not read them
        # (the last *applied* one: in a consistency group, later ones may be uncommitted)
        cps = self.log.checkpoints(self.shadow_applied - 1) if self.shadow_applied else []
        cps = [c for c in cps if c.marker.checkpoint == self.shadow_applied]
        if cps:
            since_ns = cps[-1].marker.time_ns
        else:
            since_ns = os.stat(self.shadow.applied_path).st_mtime_ns   # the seed (checkpoint 0)
        n = 0
        for rec in resync_iter(self.source_fd, self.shadow, intents, since_ns=since_ns):
            self.store.append(rec)                        # spills beyond the memory limit
            n += 1
        log.info("recovery: %d intent(s) resynced into %d record(s); saved pending operations, "
                 "if any, are superseded", len(intents), n)
        flag = getattr(self, "resync_flag", None)
        if flag is not None and not any(i.handle_type == NO_HANDLE for i in flag.loaded):
            flag.recovered = True          # cleared once the next checkpoint is durable

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
        targets = self.ops.barrier_targets(with_paths=not self.ops.is_root)
        if not targets:
            return 0
        source = os.readlink(f"/proc/self/fd/{self.source_fd}").encode()
        mountpoint = os.fsencode(os.path.abspath(self.cfg.mountpoint))
        return await trio.to_thread.run_sync(sync_through_mount, mountpoint, targets,
                                             self.ops.barrier_tids, source, abandon_on_cancel=True)

    def _confirmed(self, info) -> None:
        if self.had_pending:
            self.journal.clear_pending()
            self.had_pending = False
        try:
            self.resync_flag.settle()
        except OSError as e:
            log.error("could not clear the needs-resync state: %s", e)
        self.updater_busy = True                    # status/wait: catching up, not stopped
        self._wake.set()

    def status(self) -> dict:
        cps = self.log.checkpoints(0)
        hist = sorted(self.checkpointer.halt_history)
        return {
            "source": os.fspath(self.cfg.source),
            "mountpoint": os.fspath(self.cfg.mountpoint),
            "journal": os.fspath(os.path.abspath(self.cfg.journal)),
            "shadow": os.fspath(self.shadow.root),
            "pid": os.getpid(),
            "last_checkpoint": self.log.last_checkpoint,
            "shadow_checkpoint": self.shadow_applied,
            "pending_operations": self.store.operations,
            "pending_bytes": self.store.raw_bytes,
            "pending_memory_bytes": self.store.memory_bytes,
            "pending_spilled_bytes": self.store.spilled_bytes,
            "log_raw_bytes": sum(c.marker.raw_bytes for c in cps),
            "log_stored_bytes": sum(c.marker.stored_bytes for c in cps),
            "log_segments": len(self.log.segments()),
            "session_raw_bytes": self.checkpointer.confirmed_raw_bytes,
            "session_stored_bytes": self.checkpointer.confirmed_stored_bytes,
            "last_halt_ns": self.checkpointer.last_halt_ns,
            "halt_p99_ns": hist[min(len(hist) - 1, int(len(hist) * 0.99))] if hist else 0,
            "halts": len(hist),
            "activity_intents_written": self.activity.intents_written,
            "needs_resync": self.resync_flag.count,
            "needs_resync_reason": self.resync_flag.reason,
            "checkpoint_error": self.checkpointer.last_error,
            "updater_error": self.updater_error,
            "updater_state": self.updater_state(),
            "log_damage": str(self.log.damage) if getattr(self.log, "damage", None) else None,
            **(self.member.status() if self.member is not None else {}),
        }

    def updater_state(self) -> str:
        """One line for status: idle, applying, waiting for space, or stopped (an error)."""
        if self.updater_busy:
            return (f"applying checkpoints {self.shadow_applied + 1}..{self.log.last_checkpoint}"
                    if self.log.last_checkpoint > self.shadow_applied else "applying")
        if self.updater_waiting:
            return self.updater_waiting
        if self.updater_error:
            return f"stopped: {self.updater_error}"
        return "idle"

    def _shadow_space(self) -> str:
        try:
            st = os.statvfs(self.shadow.root)
            dev = os.stat(self.shadow.root).st_dev
        except OSError:
            return f"the shadow's filesystem ({self.shadow.root})"
        return (f"the shadow's filesystem ({self.shadow.root}, device {os.major(dev)}:{os.minor(dev)}): "
                f"{st.f_bavail * st.f_frsize} bytes, {st.f_favail} inodes free")

    async def _updater_loop(self) -> None:
        """Apply each confirmed checkpoint to the shadow.

        1. Run the updater (a worker thread) up to the last checkpoint; prune
           the segments the shadow has fully applied.
        2. A full shadow filesystem (NoSpace) is a state to wait out, not an
           error: status says "waiting for space", and the pass is retried on
           every new checkpoint and by itself after 0.5 s, doubling up to 8 s;
           the staging cursor makes it resume exactly where it stopped.
        3. Any other error stops the updater (status: "stopped: ..."); it is
           retried on each new checkpoint only.
        Cancellation (unmount) may interrupt the wait, never a running pass.
        """
        from .updater import NoSpace
        delay: float | None = None
        while True:
            self._wake = trio.Event()          # a fresh event per pass: no wake-up is lost
            self.updater_busy = True
            try:
                self.shadow_applied = await trio.to_thread.run_sync(self.updater.run_once)
                if self.updater_waiting:
                    log.info("updater: space is back; caught up to checkpoint %d", self.shadow_applied)
                self.updater_error = self.updater_waiting = None
                delay = None
            except NoSpace as e:
                with contextlib.suppress(Exception):
                    self.shadow_applied = self.shadow.applied     # earlier batches may have landed
                if not self.updater_waiting:
                    log.warning("updater: %s; waiting for space", e)
                self.updater_waiting = f"waiting for space on {self._shadow_space()} ({e})"
                self.updater_error = None
                delay = 0.5 if delay is None else min(delay * 2, 8.0)
            except Exception as e:             # CorruptLog, OSError ...: reported by status
                self.updater_error = str(e)
                self.updater_waiting = None
                delay = None
                log.error("updater: %s", e)
            try:
                # the shadow holds it now: segments it has fully applied are not needed
                # (this also frees space when the journal shares the shadow's filesystem)
                await trio.to_thread.run_sync(self.log.prune, self.shadow_applied)
            except Exception as e:
                log.error("pruning the ordered log: %s", e)
            self.updater_busy = self._wake.is_set()     # woken meanwhile: another pass follows
            if delay is None:
                await self._wake.wait()
            else:
                with trio.move_on_after(delay):
                    await self._wake.wait()

    async def serve(self) -> None:
        cfg = self.cfg
        mounted = False

        def ready() -> None:
            nonlocal mounted
            mounted = True
            self.journal.write_daemon_info({"pid": os.getpid(),
                                            "mountpoint": os.fspath(os.path.abspath(cfg.mountpoint)),
                                            "source": os.fspath(cfg.source)})
            self.reporter.ready({"mountpoint": os.fspath(cfg.mountpoint), "journal": os.fspath(cfg.journal),
                                 "shadow": os.fspath(self.shadow.root), "pid": os.getpid(),
                                 "last_checkpoint": self.log.last_checkpoint})
        try:
            await serve_session(self.ops, cfg.mountpoint,
                                mount_options(cfg.options, fsname=_fsname(cfg.source, "fusejournal")),
                                ready, self._updater_loop,
                                *([self.member.serve] if self.member is not None else []))
        finally:
            if mounted:
                self.shutdown()

    def shutdown(self) -> None:
        """Keep what was captured after the last checkpoint for the next mount."""
        try:
            if self.member is not None:
                self.member.shutdown()           # a batch in doubt is confirmed or put back
            ops = self.store.operations
            if ops:
                n = self.journal.save_pending(self.store.take())
                log.info("%d operation(s), %d bytes, kept pending for the next mount", ops, n)
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
        reporter.error(EXIT_BUG, f"internal error: {e!r} (see {cfg.journal}/daemon.log)")
        if ready_fd is None:
            raise
        return EXIT_BUG
    return 0


def run_browse(tree: Path, browsepoint: Path, options: list[str], ready_fd: int | None, debug: bool,
               group: tuple[str, str] | None = None) -> int:
    """Serve a read-only view of a shadow tree until unmounted."""
    reporter = Reporter(ready_fd)
    setup_logging(None, debug, ready_fd is None)
    try:
        check_dir(browsepoint, "browse point")
        check_mountpoint(browsepoint, journal_free=False)
        fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
        from .browse import browse_operations
        ops = browse_operations(tree, fd, group)

        async def serve() -> None:
            try:
                await serve_session(ops, browsepoint,
                                    mount_options(options, fsname=_fsname(tree, "fusejournal-browse"),
                                                  read_only=True),
                                    lambda: reporter.ready({"browsepoint": os.fspath(browsepoint),
                                                            "pid": os.getpid()}))
            finally:
                ops.close_all()
                os.close(fd)
        trio.run(serve)
    except UserError as e:
        reporter.error(e.exit_code, str(e))
        if ready_fd is None:
            raise
        return e.exit_code
    return 0


def spawn(argv: list[str], on_progress: Callable[[int], None] | None = None,
          on_message: Callable[[str], None] | None = None, module: str = "fusejournal.cli") -> dict:
    """Start ``python -m fusejournal.cli ARGV --ready-fd N`` detached; wait until it is ready.

    Returns the ready info; raises UserError with the daemon's own message.
    """
    r, w = os.pipe()
    cmd = [sys.executable, "-m", module, *argv, "--foreground", "--ready-fd", str(w)]
    proc = subprocess.Popen(cmd, pass_fds=(w,), start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        with os.fdopen(r, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                kind, _, rest = line.rstrip("\n").partition(" ")
                if kind == "progress" and on_progress is not None:
                    on_progress(int(rest))
                elif kind == "message" and on_message is not None:
                    on_message(rest)
                elif kind == "ready":
                    return json.loads(rest)
                elif kind == "error":
                    code, _, msg = rest.partition(" ")
                    raise UserError(msg, int(code))
    except BaseException:
        if proc.poll() is None and not isinstance(sys.exc_info()[1], UserError):
            proc.terminate()
        raise
    rc = proc.wait()
    raise UserError(f"the daemon exited (status {rc}) before the mount was ready", EXIT_UNUSABLE)
