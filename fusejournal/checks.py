"""What a mount request is, and everything checked about it before anything is
created or changed: the mount point (not already a FUSE mount; a dead
fusejournal mount is cleared), the ``-o`` options (only what libfuse 3.14
accepts), and how source, mountpoint, journal and shadow lie relative to each
other.  Every refusal is a UserError of one line (promise 6).

Used by the journaled mount (mount.py), the browse mount and the group CLI.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import layout
from .errors import EXIT_USAGE, UserError

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
    seed_wait: float = 1.0          # an online seed copies this long before mounting (seeding.py)
    keep_last: int | None = None    # retention (fusejournal/history.py Policy); both None: the default
    keep_within: float | None = None


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
    for o in mount_options(cfg.options, fsname=fsname_for(cfg.source, "fusejournal")):
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
    for d, what in ((jr, "journal"), (sh, "shadow")):
        if _within(d, src):
            raise UserError(f"the {what} {d} must not be inside the source {src}", EXIT_USAGE)
        if _within(src, d):
            raise UserError(f"the source {src} must not be inside the {what} {d}", EXIT_USAGE)
        if _within(mp, d):
            raise UserError(f"the mountpoint {mp} must not be inside the {what} {d}", EXIT_USAGE)
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


def mount_options(extra: list[str], *, fsname: str, read_only: bool = False) -> set[str]:
    """The FUSE options of a mount: ``default_permissions`` (the kernel checks modes), and
    for root's journaling mount ``allow_other`` (the application may run as another user).

    A read-only (browse) mount is private to its owner unless ``-o allow_other`` is given:
    the shadow is private on disk (promise 5), and a browse point does not reproduce the
    protection of the directories above the original, so publishing old checkpoints to
    other users is the owner's explicit choice."""
    opts = {"default_permissions", f"fsname={fsname}", "subtype=fusejournal"}
    if os.geteuid() == 0 and not read_only:
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


def fsname_for(source: Path, prefix: str) -> str:
    # libfuse takes options as ASCII: show other bytes (non-UTF-8 or not) as \xNN
    s = os.fsencode(source).decode("ascii", "backslashreplace").replace(",", "_").replace(" ", "_")
    return f"{prefix}:{s}"


def _shown(value: str) -> str:
    """An environment variable's value for a one-line error: quoted, at most 40 characters."""
    return repr(value[:40]) + ("..." if len(value) > 40 else "")


def env_switch(var: str, value: str | None, default: bool) -> bool:
    """An environment variable's ``on`` or ``off`` (None: the default); ValueError with a
    one-line reason for anything else."""
    if value is None:
        return default
    if value in ("on", "off"):
        return value == "on"
    raise ValueError(f"{var}={_shown(value)} is neither 'on' nor 'off'")


def env_microseconds(var: str, value: str | None, default_us: int, max_us: int) -> int:
    """An environment variable's number of microseconds, in nanoseconds (None: the
    default); ValueError with a one-line reason for anything but 0 to ``max_us``."""
    if value is None:
        return default_us * 1000
    shown = _shown(value)
    try:
        us = float(value)
    except ValueError:
        raise ValueError(f"{var}={shown} is not a number of microseconds") from None
    if not 0 <= us <= max_us:
        raise ValueError(f"{var}={shown} is not between 0 and {max_us} microseconds")
    return int(us * 1000)
