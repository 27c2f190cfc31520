"""The ``fusejournal`` command line.

Every command prints one clear line and exits non-zero on a user error (exit
codes in :mod:`fusejournal.errors`).  Commands that take ``MOUNTPOINT|JOURNAL``
accept a live journaled mount, a journal directory, or a source directory
whose default journal exists.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast

from . import __version__, layout
from .errors import EXIT_DAMAGED, EXIT_FAILED, EXIT_TIMEOUT, EXIT_UNUSABLE, EXIT_USAGE, UserError

if TYPE_CHECKING:                   # imported where used: the CLI starts fast
    from .journal import JournalMeta

# ----------------------------------------------------------------- helpers

def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    for suffix in ("ib", "b"):
        if t.endswith(suffix) and len(t) > len(suffix) and t[-len(suffix) - 1] in units:
            t = t[:-len(suffix)]
            break
    try:
        v = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G, 1048576)") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size: {text!r}")
    if v > 1 << 40:
        raise argparse.ArgumentTypeError(f"too large (at most 1T): {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number of seconds: {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v <= 1e7:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return v


def _keep_last(text: str) -> int:
    v = _nonneg_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1 (the latest checkpoint is always kept)")
    return v


def _duration(text: str) -> float:
    from .history import parse_duration
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _getxattr(path: Path, name: bytes) -> bytes | None:
    try:
        return os.getxattr(path, name)
    except OSError as e:
        if e.errno == errno.EPERM and _is_fusejournal_mount(path):
            # a journaling mount answers its control attributes to root and the owner only
            raise _denied_control(path) from None
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT, errno.EPERM,
                       errno.EACCES, errno.ENOTDIR):
            return None
        if e.errno == errno.ENOTCONN:
            raise UserError(f"{path} is a dead FUSE mount (its daemon is gone): run "
                            f"`fusermount3 -u -z {path}`, then mount again") from None
        raise UserError(f"{path}: {e.strerror}") from None


def _is_fusejournal_mount(path: Path) -> bool:
    """``path`` is the mount point of a fusejournal journaling mount (any user's)."""
    from .checks import _mount_points
    want = os.path.realpath(path)
    return any(mp == want and fstype == "fuse.fusejournal" and fsname.startswith("fusejournal:")
               for mp, fstype, fsname in _mount_points())


def _denied(path: os.PathLike[str] | str) -> UserError:
    try:
        st = os.stat(path)
        who = f" (owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
    except OSError:
        who = ""
    return UserError(f"permission denied: {os.fsdecode(path)}{who}: run this as its owner or root",
                     EXIT_UNUSABLE)


def _denied_control(mountpoint: os.PathLike[str] | str) -> UserError:
    try:
        who = f" (owned by uid {os.stat(mountpoint).st_uid})"
    except OSError:
        who = ""
    return UserError(f"permission denied: {os.fsdecode(mountpoint)} answers its journal's state only to "
                     f"root and the owner of the mount root{who}", EXIT_UNUSABLE)


def _exists(path: Path) -> bool:
    """Like Path.exists, but a path that cannot be checked is a clear error, not False."""
    try:
        os.stat(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        raise _denied(path.parent if path.parent != path else path) from None
    except OSError as e:
        raise UserError(f"{os.fsdecode(path)}: {e.strerror}", EXIT_USAGE) from None


def _journal_arg(arg: str) -> Path:
    """The JOURNAL argument of log/fsck: an existing, readable journal directory."""
    journal = Path(arg)
    if not _exists(journal):
        raise UserError(f"{arg} does not exist", EXIT_USAGE)
    if not journal.is_dir():
        raise UserError(f"{arg} is not a directory (a journal directory is expected)", EXIT_USAGE)
    if not os.access(journal, os.R_OK | os.X_OK):
        raise _denied(journal)
    if not _exists(journal / layout.META):
        j = _getxattr(journal, layout.XATTR_JOURNAL) if _is_fusejournal_mount(journal) else None
        if j is not None and _exists(Path(os.fsdecode(j)) / layout.META):
            return _journal_arg(os.fsdecode(j))     # a MOUNTPOINT: its journal
        raise UserError(f"{arg} is not a fusejournal journal", EXIT_USAGE)
    for p in (journal / layout.META, journal / layout.LOG_DIR):
        if os.path.exists(p) and not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
            raise _denied(p)
    return journal


class Status(TypedDict, total=False):
    """What the commands read of a status: the daemon's (``user.fusejournal.status``,
    mount.Daemon.status) or, with no daemon, :meth:`Target.offline_status`."""
    source: str
    mountpoint: str | None
    journal: str
    shadow: str
    pid: int | None
    last_checkpoint: int
    shadow_checkpoint: int | None
    log_damage: str | None
    torn_tail: str | None
    shadow_error: str | None
    seeding: dict[str, object] | None
    first_complete_checkpoint: int | None
    pending_saved: bool
    needs_resync: int
    updater_state: str
    updater_error: str | None


Command = Callable[[argparse.Namespace], int]


class Target:
    """What a MOUNTPOINT|JOURNAL argument names.

    ``live_ok``: a mount whose journal this user may not read (the owner of the
    mount root, not the daemon's user: promise 5 keeps the journal private) is
    still a target, answered from its control attributes alone (``live_only``;
    :attr:`meta` and :meth:`offline_status` then refuse); for ``status`` and ``wait``."""

    def __init__(self, arg: str, live_ok: bool = False) -> None:
        from .journal import read_daemon_info, read_meta
        path = Path(arg)
        self.mountpoint: Path | None = None
        try:
            os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise UserError(f"{arg} does not exist", EXIT_USAGE) from None
        except PermissionError:
            raise _denied(path.parent) from None
        except OSError as e:
            raise UserError(f"{arg}: {e.strerror}", EXIT_USAGE) from None
        j = _getxattr(path, layout.XATTR_JOURNAL)
        if j is not None:
            self.mountpoint = path
            self.journal = Path(os.fsdecode(j))
        elif _exists(path / layout.META):
            self.journal = _journal_arg(arg)
        else:
            jdef, _ = layout.default_dirs(path)
            if _exists(jdef / layout.META):
                self.journal = jdef
            else:
                raise UserError(f"{arg} is neither a fusejournal mount nor a journal directory", EXIT_USAGE)
        if live_ok and self.mountpoint is not None and not os.access(self.journal, os.R_OK | os.X_OK):
            live = self.live_status()
            if live is not None and live.get("shadow"):
                self._meta: JournalMeta | None = None
                self.shadow = Path(str(live["shadow"]))
                return
        meta = read_meta(self.journal)
        if meta is None:
            raise UserError(f"{self.journal} is not a fusejournal journal", EXIT_USAGE)
        self._meta = meta
        self.shadow = Path(meta["shadow"])
        if self.mountpoint is None:
            info = read_daemon_info(self.journal)
            pid = info.get("pid") if info else None
            mountpoint = info.get("mountpoint", "") if info else ""
            if isinstance(pid, int) and pid and _alive(pid) and isinstance(mountpoint, str):
                mp = Path(mountpoint)
                if _getxattr(mp, layout.XATTR_JOURNAL) is not None:
                    self.mountpoint = mp

    @property
    def live_only(self) -> bool:
        """Answered from the mount's control attributes alone (``live_ok``)."""
        return self._meta is None

    @property
    def meta(self) -> JournalMeta:
        if self._meta is None:         # live_only: the journal is not this user's to read
            raise _denied(self.journal)
        return self._meta

    def live_status(self) -> Status | None:
        if self.mountpoint is None:
            return None
        raw = _getxattr(self.mountpoint, layout.XATTR_STATUS)
        doc = json.loads(raw) if raw else None
        # the daemon's own JSON (the attribute is reserved to it): trusted for its types
        return cast(Status, doc) if isinstance(doc, dict) else None

    def offline_status(self) -> Status:
        from .log import fsck
        from .shadow import Shadow, ShadowError
        rep = fsck(self.journal / layout.LOG_DIR, repair=False)
        first = rep.last_checkpoint - rep.checkpoints_ok + 1 if rep.checkpoints_ok else None
        damage = rep.damage + _lost_checkpoints(self.journal, self.meta, first, rep.last_checkpoint,
                                                rep.torn_tail)
        sh = Shadow(self.shadow)
        seeding = None
        first_complete = None
        try:
            applied = sh.applied
        except ShadowError as e:
            applied = None
            shadow_error = None if sh.seeding else str(e)
        else:
            shadow_error = None
        try:
            if sh.seeding:
                doc = sh.read_state("seeding.json") or {}
                seeding = {"state": "paused (not mounted): the seed resumes at the next mount",
                           "phase": doc.get("phase"), "entries_copied": doc.get("entries"),
                           "bytes_copied": doc.get("bytes")}
            else:
                n = (sh.read_state("seeded.json") or {}).get("first_complete")
                first_complete = n if isinstance(n, int) else None
        except ShadowError as e:
            shadow_error = str(e)
        return {"source": self.meta["source"]["path"], "mountpoint": None,
                "journal": os.fspath(self.journal), "shadow": os.fspath(self.shadow), "pid": None,
                "last_checkpoint": rep.last_checkpoint, "shadow_checkpoint": applied,
                "log_damage": "; ".join(damage) or None, "torn_tail": rep.torn_tail,
                "shadow_error": shadow_error, "seeding": seeding,
                "first_complete_checkpoint": first_complete,
                "pending_saved": (self.journal / "pending.fjrec").exists(),
                "needs_resync": _needs_resync(self.journal)}

    def status(self) -> Status:
        return self.live_status() or self.offline_status()


def _needs_resync(journal: Path) -> int:
    from .resyncflag import ResyncFlag
    flag = ResyncFlag(journal / layout.NEEDS_RESYNC)
    try:
        n = len(flag.load())
    except OSError:
        return 1
    return n or int(flag.present)
def _cps(a: int, b: int) -> str:
    return f"checkpoint {a} is" if a == b else f"checkpoints {a}..{b} are"


def _lost_checkpoints(journal: Path, meta: JournalMeta | None, first: int | None, last: int,
                      torn: str | None) -> list[str]:
    """What the log alone does not call damage, but the journal as a whole shows:
    confirmed checkpoints missing from the log (truncated or removed segments)."""
    from .journal import read_daemon_info
    from .shadow import Shadow, ShadowError
    out = []
    try:
        applied = Shadow(Path(meta["shadow"])).applied if meta is not None else None
    except (ShadowError, KeyError, TypeError, OSError):
        applied = None
    if applied is not None and applied > last:
        out.append(f"the shadow has applied checkpoint {applied} but the log ends at {last}: "
                   f"confirmed {_cps(last + 1, applied)} missing from the log "
                   f"(a segment was truncated or removed)")
    if applied is not None and first is not None and first > applied + 1:
        out.append(f"{_cps(applied + 1, first - 1)} missing from the log, and the "
                   f"shadow (at checkpoint {applied}) has not applied them (a segment was removed)")
    if torn and read_daemon_info(journal) is None:
        out.append(f"{torn}; the daemon stopped cleanly, so this was a confirmed checkpoint: "
                   f"the segment was truncated or damaged")
    return out


def _alive(pid: int) -> bool:
    """True while the process runs (an exited one not yet reaped, a zombie, counts as gone)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat_line = f.read()
    except (OSError, ValueError):
        return False
    # the state follows the command name, which is in parentheses and may contain anything
    return stat_line[stat_line.rfind(b")") + 2:][:1] not in (b"Z", b"X")


# ---------------------------------------------------------------- commands

def _group_or(positional: str, group_fn: str) -> Callable[[Command], Command]:
    """``--group FILE`` (fusejournal/groupcli.py) instead of the positional argument, not both."""
    def wrap(single: Command) -> Command:
        def cmd(a: argparse.Namespace) -> int:
            if getattr(a, "group", None) and not getattr(a, "member", None):
                if getattr(a, positional, None) is not None:
                    raise UserError(f"give either --group FILE or {positional.upper()}, not both", EXIT_USAGE)
                from . import groupcli
                group_cmd: Command = getattr(groupcli, group_fn)
                return group_cmd(a)
            if getattr(a, positional, None) is None:
                raise UserError(f"{positional.upper()} (or --group FILE) is required", EXIT_USAGE)
            return single(a)
        return cmd
    return wrap


@_group_or("source", "mount_group")

def cmd_mount(a: argparse.Namespace) -> int:
    from .mount import MountConfig, run_daemon, spawn
    _check_env_limits(fsync=True)
    source = Path(os.path.abspath(a.source))
    mountpoint = Path(os.path.abspath(a.mountpoint or a.source))
    jdef, sdef = layout.default_dirs(source)
    if not a.journal or not a.shadow:
        for d in layout.tighten_state_dirs(source):
            print(f"fusejournal: made {d} private (0700): an older version left it writable by others",
                  file=sys.stderr)
    journal = Path(os.path.abspath(a.journal)) if a.journal else jdef
    shadow = Path(os.path.abspath(a.shadow)) if a.shadow else None
    if shadow is None:
        from .journal import read_meta
        meta = read_meta(journal) if journal.exists() else None
        shadow = Path(meta["shadow"]) if meta else sdef
    for p, what in ((journal, "journal"), (shadow, "shadow")):
        if os.path.abspath(p).startswith(os.fspath(source) + os.sep) or os.path.abspath(p) == os.fspath(source):
            raise UserError(f"the {what} {p} must not be inside the source {source}", EXIT_USAGE)
    cfg = MountConfig(source=source, mountpoint=mountpoint, journal=journal, shadow=shadow,
                      options=a.o or [], memory_limit=a.memory_limit, halt_timeout=a.halt_timeout,
                      segment_limit=a.segment_limit, reseed=a.reseed, writeback=a.writeback_cache,
                      debug=a.debug, group=Path(os.path.abspath(a.group)) if a.group else None,
                      member=a.member, seed_wait=a.seed_wait, keep_last=a.keep_last,
                      keep_within=a.keep_within)
    if a.foreground:
        return run_daemon(cfg, a.ready_fd)
    argv = ["mount", os.fspath(source), os.fspath(mountpoint), "--journal", os.fspath(journal),
            "--shadow", os.fspath(shadow), "--memory-limit", str(a.memory_limit),
            "--halt-timeout", str(a.halt_timeout), "--segment-limit", str(a.segment_limit)]
    for o in a.o or []:
        argv += ["-o", o]
    if a.debug:
        argv.append("--debug")
    if a.reseed:
        argv.append("--reseed")
    if a.writeback_cache:
        argv.append("--writeback-cache")
    argv += ["--seed-wait", str(a.seed_wait)]
    if a.keep_last is not None:
        argv += ["--keep-last", str(a.keep_last)]
    if a.keep_within is not None:
        argv += ["--keep-within", f"{a.keep_within}s"]
    tty = sys.stderr.isatty()

    def progress(n: int) -> None:
        if tty:
            print(f"\rseeding the shadow: {n} entries copied", end="", file=sys.stderr, flush=True)

    info = spawn(argv, on_progress=progress, on_message=lambda m: print(m, file=sys.stderr))
    if tty:
        print(file=sys.stderr)
    print(f"mounted {source} at {mountpoint} (journal {journal}, shadow {shadow}, "
          f"checkpoint {info.get('last_checkpoint', 0)}, pid {info.get('pid')})")
    if info.get("seeding"):
        print(f"the shadow is being seeded in the background: `fusejournal status {mountpoint}` "
              f"shows the progress, `fusejournal wait {mountpoint}` waits for the first complete "
              f"checkpoint")
    return 0


def _check_env_limits(*, fsync: bool = False) -> None:
    """Refuse a bad ``FUSEJOURNAL_SPIN_US`` (fusejournal/fuseloop.py) and, for a journaling
    mount, ``FUSEJOURNAL_FSYNC_INLINE_US`` (fusejournal/syncpolicy.py) and the switches
    ``FUSEJOURNAL_KILLPRIV_V2``, ``FUSEJOURNAL_AUTO_INVAL_DATA`` and
    ``FUSEJOURNAL_FSYNC_THREADS`` (``on`` or ``off``; fusejournal/fs.py) before anything
    is mounted."""
    from .checks import env_switch
    from .fuseloop import spin_limit_ns
    from .syncpolicy import inline_limit_ns
    try:
        spin_limit_ns(os.environ.get("FUSEJOURNAL_SPIN_US"))
        if fsync:
            inline_limit_ns(os.environ.get("FUSEJOURNAL_FSYNC_INLINE_US"))
            for var in ("FUSEJOURNAL_KILLPRIV_V2", "FUSEJOURNAL_AUTO_INVAL_DATA",
                        "FUSEJOURNAL_FSYNC_THREADS"):
                env_switch(var, os.environ.get(var), True)
    except ValueError as e:
        raise UserError(str(e), EXIT_USAGE) from None


def cmd_browse(a: argparse.Namespace) -> int:
    _check_env_limits()
    if a.group and not a.member:
        from .browsecli import browse_group
        return browse_group(a)
    if a.all or a.checkpoint is not None:
        from .browsecli import browse_history, run_history_browse
        if not (a.tree and a.foreground):
            return browse_history(a)
        return run_history_browse(Path(a.target), Path(os.path.abspath(a.browsepoint)), a.o or [],
                                  a.ready_fd, a.debug, a.checkpoint)
    from .browsecli import browse_latest
    return browse_latest(a)


def cmd_restore(a: argparse.Namespace) -> int:
    if getattr(a, "group", None):
        from .groupcli import restore_group
        return restore_group(a)
    if getattr(a, "member", None) is not None:
        raise UserError("--member goes with --group FILE", EXIT_USAGE)
    if a.dest is None:
        raise UserError("DEST is required", EXIT_USAGE)
    from .restore import cmd_restore as run
    return run(a)


@_group_or("target", "prune_group")
def cmd_prune(a: argparse.Namespace) -> int:
    from .browsecli import cmd_prune as run
    return run(a)


def cmd_verify(a: argparse.Namespace) -> int:
    from .verify_cmd import cmd_verify as run
    return run(a)


@_group_or("mountpoint", "checkpoint_group")
def cmd_checkpoint(a: argparse.Namespace) -> int:
    mp = Path(a.mountpoint)
    if _getxattr(mp, layout.XATTR_JOURNAL) is None:
        raise UserError(f"{mp} is not a journaled fusejournal mount", EXIT_USAGE)
    label = a.label if a.label is not None else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        os.setxattr(mp, layout.XATTR_UPDATE_PERMISSION, os.fsencode(label))
    except OSError as e:
        code = EXIT_USAGE if e.errno == errno.EINVAL else EXIT_FAILED
        hints: dict[int | None, str] = {errno.EINVAL: " (labels: 1-200 bytes of printable UTF-8)",
                                        errno.EPERM: " (only root or the owner of the mount root may)"}
        hint = hints.get(e.errno, "; see the daemon log")
        raise UserError(f"checkpoint failed: {e.strerror}{hint}", code) from None
    cp = _getxattr(mp, layout.XATTR_CHECKPOINT)
    if cp is None:
        raise UserError(f"the checkpoint was taken, but {mp} no longer tells its id (unmounted?)",
                        EXIT_FAILED)
    print(cp.decode())
    return 0


@_group_or("target", "wait_group")
def cmd_wait(a: argparse.Namespace) -> int:
    t = Target(a.target, live_ok=True)
    target = a.checkpoint
    if target is None:
        st = t.status()
        target = st["last_checkpoint"]
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    from .shadow import Shadow, ShadowError
    shadow = Shadow(t.shadow)
    said = False
    bar = sys.stderr.isatty()
    seeding_seen = False
    while True:
        live = t.live_status()
        if live is not None:
            applied = live["shadow_checkpoint"]
            seed = live.get("seeding")
            if applied is None:                  # the first seed is in progress (seeding.py)
                seeding_seen = True
                if seed and str(seed.get("state", "")).startswith("stopped"):
                    raise UserError(f"the seed of the shadow is {seed['state']}", EXIT_DAMAGED)
                if target > live["last_checkpoint"]:
                    raise UserError(f"checkpoint {target} does not exist (last is "
                                    f"{live['last_checkpoint']})", EXIT_USAGE)
                if bar and seed:
                    from .seeding import progress_line
                    print("\r" + progress_line(seed) + "\033[K", end="", file=sys.stderr, flush=True)
                if deadline is not None and time.monotonic() >= deadline:
                    if bar:
                        print(file=sys.stderr)
                    raise UserError(f"timed out: the shadow is still being seeded "
                                    f"({(seed or {}).get('state')}), waiting for {target}", EXIT_TIMEOUT)
                time.sleep(0.2 if bar else 0.05)
                continue
            if seeding_seen and bar:
                print(file=sys.stderr)
                seeding_seen = False
            state = live.get("updater_state")
            # a stopped updater fails the wait; one that is applying (perhaps retrying after
            # an error, on a new checkpoint) or waiting for space is waited for
            stopped = state.startswith("stopped") if state is not None else bool(live.get("updater_error"))
            if stopped and applied < target:
                raise UserError(f"the updater is stopped: {live['updater_error']}", EXIT_DAMAGED)
            waiting = bool(state and state.startswith("waiting")) and applied < target
            if waiting and not said:
                print(f"fusejournal: the updater is {state}; still waiting (free space there)",
                      file=sys.stderr, flush=True)
            said = waiting
            if target > live["last_checkpoint"]:
                raise UserError(f"checkpoint {target} does not exist (last is {live['last_checkpoint']})",
                                EXIT_USAGE)
        else:
            if t.live_only:             # and the daemon is gone since
                raise _denied(t.journal)
            try:
                applied = shadow.applied
            except ShadowError as e:
                if shadow.seeding:
                    raise UserError(f"the shadow {t.shadow} is being seeded and no daemon is running "
                                    f"to finish it: mount the source again (the seed resumes)",
                                    EXIT_FAILED) from None
                raise UserError(str(e)) from None
            if applied < target:
                raise UserError(f"the shadow stands at checkpoint {applied} and no daemon is running "
                                f"to apply {target}: mount the source again", EXIT_FAILED)
        if applied >= target:
            first = live.get("first_complete_checkpoint") if live is not None else None
            if first is not None and target < first <= applied:
                print(f"fusejournal: checkpoint {target} was taken while the shadow was being seeded; "
                      f"the shadow stands at checkpoint {applied}, which includes it (the first "
                      f"complete checkpoint is {first})", file=sys.stderr)
            print(applied)
            return 0
        if deadline is not None and time.monotonic() >= deadline:
            raise UserError(f"timed out: the shadow stands at checkpoint {applied}, waiting for {target}",
                            EXIT_TIMEOUT)
        time.sleep(0.05)


@_group_or("target", "status_group")
def cmd_status(a: argparse.Namespace) -> int:
    t = Target(a.target, live_ok=True)
    st = t.status()
    if a.json:
        print(json.dumps(st, indent=1, sort_keys=True))
    else:
        doc: dict[str, object] = dict(st)
        for k in sorted(doc):
            v = doc[k]
            if k == "seeding" and isinstance(v, dict):
                from .seeding import progress_line
                print(f"seeding: {progress_line(v).removeprefix('seeding: ')}")
                for k2 in sorted(v):
                    print(f"seeding.{k2}: {v[k2]}")
                continue
            print(f"{k}: {v}")
        if st.get("needs_resync"):
            print(f"warning: {st['needs_resync']} object(s) changed in the original could not be "
                  f"journaled; the shadow differs from the original there until the next mount "
                  f"resyncs them (umount, then mount)", file=sys.stderr)
    seed = st.get("seeding")
    stopped = isinstance(seed, dict) and str(seed.get("state", "")).startswith("stopped")
    bad = st.get("log_damage") or st.get("updater_error") or st.get("shadow_error") or stopped
    return EXIT_DAMAGED if bad else 0


@_group_or("journal", "log_group")
def cmd_log(a: argparse.Namespace) -> int:
    from .journal import read_meta
    from .log import read_log
    journal = _journal_arg(a.journal)
    markers, damage, torn, last = read_log(journal / layout.LOG_DIR)
    problems = ([damage] if damage else []) + _lost_checkpoints(
        journal, read_meta(journal), markers[0].checkpoint if markers else None, last, torn)
    first = _first_complete(journal)
    if a.json:
        print(json.dumps([{**m.__dict__, "first_complete": m.checkpoint == first} for m in markers],
                         default=str, indent=1))
    else:
        print(f"{'id':>6}  {'time (UTC)':20}  {'operations':>10}  {'raw bytes':>12}  {'stored bytes':>12}  label")
        gone = (markers[0].checkpoint if markers else last + 1) - 1
        if gone and not problems:
            # their segments were deleted once the shadow held them (pruned, or rolled: log.py)
            what = "checkpoint 1" if gone == 1 else f"checkpoints 1..{gone}"
            print(f"{'':>6}  {what}: pruned from the log (the shadow holds them)")
        for m in markers:
            when = datetime.fromtimestamp(m.time_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")
            note = ("  (first complete checkpoint: the seed is done)" if m.checkpoint == first else
                    "  (taken while seeding: never applied)" if m.extra.get("seeding") else "")
            print(f"{m.checkpoint:>6}  {when:20}  {m.operations:>10}  {m.raw_bytes:>12}  "
                  f"{m.stored_bytes:>12}  {m.label}{note}")
    if not a.json:
        from .browsecli import retained_lines
        meta = read_meta(journal)
        shadow = meta["shadow"] if meta is not None else None
        if shadow:
            print("\n".join(retained_lines(Path(shadow))))
    for p in problems:
        print(f"damage: {p}", file=sys.stderr)
    if problems:
        print(f"fusejournal: checkpoints are missing or damaged: see `fusejournal fsck {journal}`",
              file=sys.stderr)
        return EXIT_DAMAGED
    return 0


def _first_complete(journal: Path) -> int | None:
    """The first complete checkpoint of the last online seed (the shadow's seeded.json)."""
    from .journal import read_meta
    from .shadow import Shadow, ShadowError
    meta = read_meta(journal)
    if meta is None or not meta["shadow"]:
        return None
    try:
        sh = Shadow(meta["shadow"])
        if sh.seeding:
            return None
        doc = sh.read_state("seeded.json") or {}
    except (ShadowError, OSError):
        return None
    n = doc.get("first_complete")
    return n if isinstance(n, int) and doc.get("online") else None


@_group_or("journal", "fsck_group")
def cmd_fsck(a: argparse.Namespace) -> int:
    from .log import fsck
    from .mount import journal_is_free
    journal = _journal_arg(a.journal)
    if a.repair and not journal_is_free(journal):
        raise UserError(f"journal {journal} is in use: unmount before repairing", EXIT_FAILED)
    rep = fsck(journal / layout.LOG_DIR, repair=a.repair)
    print(f"checkpoints intact: {rep.checkpoints_ok} (last {rep.last_checkpoint})")
    if a.verify_shadow:
        return _verify_shadow(journal, rep.last_checkpoint)
    if rep.torn_tail:
        print(f"torn tail: {rep.torn_tail}")
    for d in rep.damage:
        print(f"damage: {d}")
    for r in rep.repaired:
        print(f"repaired: {r}")
    from .journal import read_meta
    first = rep.last_checkpoint - rep.checkpoints_ok + 1 if rep.checkpoints_ok else None
    lost = _lost_checkpoints(journal, read_meta(journal), first, rep.last_checkpoint, None)
    for d in lost:
        print(f"damage: {d}")
    if (rep.damage or rep.torn_tail) and not a.repair:
        print("run `fusejournal fsck --repair` to repair what can be repaired")
        return EXIT_DAMAGED
    if lost:
        print("the shadow no longer matches the log: re-seed it (stop the application, "
              "`fusejournal umount`, then `fusejournal mount --reseed ...`)")
        return EXIT_DAMAGED
    return 0


def _verify_shadow(journal: Path, last: int) -> int:
    """Compare the whole shadow with the original (unmounted, caught up, nothing pending)."""
    from .journal import read_meta
    from .mount import journal_is_free
    from .shadow import Shadow, ShadowError
    meta = read_meta(journal)
    if meta is None:
        raise UserError(f"{journal} is not a fusejournal journal", EXIT_USAGE)
    if not journal_is_free(journal):
        raise UserError("the journal is in use: unmount first (the original must not change "
                        "while it is compared)", EXIT_FAILED)
    shadow = Shadow(Path(meta["shadow"]))
    try:
        applied = shadow.applied
    except ShadowError as e:
        raise UserError(str(e), EXIT_DAMAGED) from None
    if applied != last or (journal / "pending.fjrec").exists() or (journal / layout.DAEMON).exists():
        raise UserError(f"the shadow is not caught up (it stands at {applied}, the log at {last}, or "
                        f"operations are pending): mount, checkpoint, wait, unmount, then verify",
                        EXIT_FAILED)
    source = meta["source"]["path"]
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    try:
        diffs = shadow.verify_matches(fd)
    finally:
        os.close(fd)
    for d in diffs[:50]:
        print(f"differs: {d}")
    if diffs:
        print(f"the shadow differs from {source} in {len(diffs)} place(s): re-seed it with "
              f"`fusejournal mount --reseed {source} ...` (application stopped)")
        return EXIT_DAMAGED
    print(f"the shadow equals {source} (checkpoint {applied})")
    return 0


@_group_or("mountpoint", "umount_group")
def cmd_umount(a: argparse.Namespace) -> int:
    mp = Path(os.path.abspath(a.mountpoint))
    pid = None
    st = None
    raw = _getxattr(mp, layout.XATTR_STATUS)
    if raw:
        st = json.loads(raw)
        pid = st.get("pid")
    else:
        raw = _getxattr(mp, layout.XATTR_PID)
        pid = int(raw) if raw else None
    from .mount import fuse_mount_at
    if fuse_mount_at(mp) is None:
        raise UserError(f"{mp} is not a FUSE mount", EXIT_USAGE)
    r = subprocess.run(["fusermount3", "-u", os.fspath(mp)], capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"cannot unmount {mp}: {r.stderr.strip() or 'fusermount3 failed'}", EXIT_FAILED)
    if pid:
        deadline = time.monotonic() + a.timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise UserError(f"unmounted, but the daemon (pid {pid}) has not exited after {a.timeout:g} s",
                                EXIT_TIMEOUT)
            time.sleep(0.02)
    print(f"unmounted {mp}")
    return 0


# ------------------------------------------------------------------ parser

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str) -> None:   # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fusejournal", description="Journaling FUSE filesystem for "
                "point-in-time consistent, continuously updated backups.")
    p.add_argument("--version", action="version", version=f"fusejournal {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    m = sub.add_parser("mount", help="mount SOURCE (in place by default) and journal every change")
    m.add_argument("source", nargs="?")
    m.add_argument("mountpoint", nargs="?")
    m.add_argument("--journal", help="journal directory (default: per-source state directory)")
    m.add_argument("--shadow", help="shadow directory (default: per-source state directory)")
    m.add_argument("--foreground", "-f", action="store_true", help="stay attached")
    m.add_argument("-o", action="append", metavar="OPT[,OPT...]", help="FUSE mount options")
    m.add_argument("--memory-limit", type=_size, default=64 << 20, metavar="SIZE",
                   help="temporary store memory before spilling to the journal, and what the "
                        "updater keeps of a batch between its passes (default 64M)")
    m.add_argument("--halt-timeout", type=_positive_float, default=5.0, metavar="S",
                   help="longest a halt may wait for in-flight operations (default 5)")
    m.add_argument("--segment-limit", type=_size, default=64 << 20, metavar="SIZE",
                   help="log segment size before rotation (default 64M)")
    m.add_argument("--reseed", action="store_true",
                   help="copy the shadow afresh from the original (after it was changed by hand or "
                        "the log was repaired); stop the application first")
    m.add_argument("--seed-wait", type=_nonneg_float, default=1.0, metavar="S",
                   help="a first mount (or --reseed) copies the original into the shadow for at most "
                        "this long before mounting, then goes on in the background (default 1)")
    m.add_argument("--writeback-cache", action="store_true",
                   help="let the kernel merge small writes (faster small writes and stats; but the "
                        "kernel then owns mtimes, which can differ from the disk's by the write-back "
                        "delay, and ENOSPC shows at fsync/close; see docs/design.md)")
    m.add_argument("--keep-last", type=_keep_last, metavar="N",
                   help="retain the last N checkpoints (default 24, unless --keep-within is given)")
    m.add_argument("--keep-within", type=_duration, metavar="DURATION",
                   help="retain the checkpoints younger than DURATION (90s, 15m, 24h, 7d, 2w)")
    m.add_argument("--debug", action="store_true")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--group", metavar="FILE", help="mount every member of a consistency group (TOML)")
    m.add_argument("--member", help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    b = sub.add_parser("browse", help="read-only mount of the shadow")
    b.add_argument("target", metavar="MOUNTPOINT|JOURNAL")
    b.add_argument("browsepoint", nargs="?")
    b.add_argument("--group", metavar="FILE", help="browse --group FILE POINT: one directory per member, "
                   "all at one group checkpoint")
    b.add_argument("--member", help=argparse.SUPPRESS)
    b.add_argument("--all", action="store_true",
                   help="one directory per retained checkpoint (<id>-<label>) plus latest")
    b.add_argument("--checkpoint", type=_nonneg_int, metavar="N", help="only the retained checkpoint N")
    b.add_argument("--foreground", "-f", action="store_true")
    b.add_argument("-o", action="append", metavar="OPT[,OPT...]")
    b.add_argument("--debug", action="store_true")
    b.add_argument("--tree", action="store_true", help=argparse.SUPPRESS)
    b.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    b.set_defaults(func=cmd_browse)

    rs = sub.add_parser("restore", help="copy the shadow's latest applied checkpoint (or a subtree) out")
    rs.add_argument("target", metavar="MOUNTPOINT|JOURNAL")
    rs.add_argument("dest", metavar="DEST", nargs="?")
    rs.add_argument("--group", metavar="FILE", help="restore --group FILE [--member NAME] --checkpoint GID "
                    "DEST: a member (or every member, into DEST/<member>) at a group checkpoint")
    rs.add_argument("--member", metavar="NAME", help="the member to restore (with --group)")
    rs.add_argument("--path", metavar="SUBPATH", help="a file or directory of the tree (default: all)")
    rs.add_argument("--checkpoint", type=_nonneg_int,
                    help="any retained checkpoint (see `fusejournal log`; default: the latest applied)")
    rs.add_argument("--force", action="store_true",
                    help="DEST may be non-empty: it is made equal to the checkpoint")
    rs.set_defaults(func=cmd_restore)

    pr = sub.add_parser("prune", help="forget the older retained checkpoints")
    pr.add_argument("target", metavar="MOUNTPOINT|JOURNAL", nargs="?")
    pr.add_argument("--group", metavar="FILE", help="prune every member, keeping the same group checkpoints")
    keep = pr.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep-last", type=_keep_last, metavar="N", help="keep the last N checkpoints")
    keep.add_argument("--keep-within", type=_duration, metavar="DURATION",
                      help="keep the checkpoints younger than DURATION (90s, 15m, 24h, 7d, 2w)")
    pr.set_defaults(func=cmd_prune)

    vf = sub.add_parser("verify", help="take a checkpoint, wait for the shadow, compare it with the original")
    vf.add_argument("mountpoint")
    vf.add_argument("--timeout", type=_positive_float, metavar="S")
    vf.set_defaults(func=cmd_verify)

    c = sub.add_parser("checkpoint", help="grant update permission: take a checkpoint")
    c.add_argument("mountpoint", nargs="?")
    c.add_argument("--label", help="label (default: the UTC time)")
    c.add_argument("--group", metavar="FILE", help="one checkpoint of the whole consistency group")
    c.set_defaults(func=cmd_checkpoint)

    w = sub.add_parser("wait", help="wait until the shadow has applied a checkpoint")
    w.add_argument("target", metavar="MOUNTPOINT|JOURNAL", nargs="?")
    w.add_argument("--group", metavar="FILE", help="wait until every member's shadow is at the checkpoint")
    w.add_argument("--checkpoint", type=_nonneg_int, help="default: the latest confirmed one")
    w.add_argument("--timeout", type=_positive_float, metavar="S")
    w.set_defaults(func=cmd_wait)

    s = sub.add_parser("status", help="checkpoints, pending operations, log size, halts")
    s.add_argument("target", metavar="MOUNTPOINT|JOURNAL", nargs="?")
    s.add_argument("--group", metavar="FILE", help="the group, its coordinator and every member")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    lg = sub.add_parser("log", help="one line per checkpoint in the ordered log")
    lg.add_argument("journal", nargs="?")
    lg.add_argument("--group", metavar="FILE", help="the group checkpoints, committed and failed")
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=cmd_log)

    f = sub.add_parser("fsck", help="check (and repair) the ordered log")
    f.add_argument("journal", nargs="?")
    f.add_argument("--group", metavar="FILE", help="check every member's journal")
    f.add_argument("--repair", action="store_true")
    f.add_argument("--verify-shadow", action="store_true",
                   help="also compare the whole shadow with the original (unmounted and caught up)")
    f.set_defaults(func=cmd_fsck)

    u = sub.add_parser("umount", help="unmount and wait for the daemon to exit")
    u.add_argument("mountpoint", nargs="?")
    u.add_argument("--group", metavar="FILE", help="unmount every member and stop the coordinator")
    u.add_argument("--timeout", type=_positive_float, default=60.0, metavar="S")
    u.set_defaults(func=cmd_umount)
    return p


def _leave(rc: int) -> None:
    """After a command that forked a daemon (browse: daemonize.fork_daemon), exit at once:
    the interpreter's teardown would touch nearly every page the daemon still shares with
    this process, each then copied (about 70 ms before the command returns, measured)."""
    daemonize = sys.modules.get("fusejournal.daemonize")
    if daemonize is None or not getattr(daemonize, "forked", 0):
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "func", None) is cmd_restore and args.dest is None \
            and len(extra) == 1 and not extra[0].startswith("-"):
        # `restore MOUNTPOINT --checkpoint N DEST`: argparse gives the optional DEST nothing in
        # the first run of positionals and leaves the later one over
        args.dest, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        func: Command = args.func
        rc = func(args)
        if argv is None:                # the program (not a call from Python): see _leave
            _leave(rc)
        return rc
    except UserError as e:
        print(f"fusejournal: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `fusejournal status | head`: the reader went away; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PermissionError as e:
        print(f"fusejournal: {_denied(e.filename) if e.filename else 'permission denied'}",
              file=sys.stderr)
        return EXIT_UNUSABLE
    except OSError as e:
        # anything the checks above did not foresee: still one line, never a traceback
        where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
        print(f"fusejournal: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE if e.errno == errno.ENAMETOOLONG else EXIT_UNUSABLE


if __name__ == "__main__":
    sys.exit(main())
