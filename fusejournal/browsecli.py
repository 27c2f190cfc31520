"""Commands around the browse mount: ``browse --group`` (and, below, restore and verify).

``browse --group FILE POINT``: POINT is an existing empty directory; one
directory per member is made in it (``POINT/<member>``) and each is a browse
mount of that member's shadow, served by its own daemon (one FUSE session per
process).  Every member's daemon takes the browse gate of *every* member's
shadow and admits a request only while all the members' shadows stand at one
group checkpoint (fusejournal/browse.py, ``GroupPosition``), so a reader of
POINT sees all members at the same group checkpoint.  Unmount with
``fusejournal umount POINT/<member>`` for each member.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from . import layout
from .errors import EXIT_USAGE, UserError


def browse_group(a: argparse.Namespace) -> int:
    from .group import GroupFileError, load_group
    from .mount import spawn
    if a.browsepoint is not None:
        raise UserError("browse --group FILE POINT takes one POINT (no MOUNTPOINT|JOURNAL)", EXIT_USAGE)
    if a.all or a.checkpoint is not None:
        return browse_group_history(a)
    point = Path(os.path.abspath(a.target))
    try:
        group = load_group(a.group, check=False)
    except GroupFileError as e:
        raise UserError(str(e), EXIT_USAGE) from None
    if not point.is_dir():
        raise UserError(f"{point} is not a directory", EXIT_USAGE)
    if os.listdir(point):
        raise UserError(f"{point} is not empty", EXIT_USAGE)
    from .groupseed import refuse_while_seeding
    refuse_while_seeding(group, "browse")
    done: list[Path] = []
    try:
        for m in group.members:
            tree = m.shadow / layout.SHADOW_TREE
            if not tree.is_dir():
                raise UserError(f"member {m.name!r}: the shadow tree {tree} does not exist")
            bp = point / m.name
            bp.mkdir(mode=0o755)
            argv = ["browse", os.fspath(tree), os.fspath(bp), "--tree", "--group",
                    os.fspath(group.path), "--member", m.name]
            for o in a.o or []:
                argv += ["-o", o]
            spawn(argv)
            done.append(bp)
    except BaseException:
        for bp in done:
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(bp)], capture_output=True)
        for m in group.members:
            try:
                (point / m.name).rmdir()
            except OSError:
                pass
        raise
    print(f"browsing group {group.name!r} at {point}: {', '.join(m.name for m in group.members)} "
          f"(read-only, every member at one group checkpoint)")
    return 0


def browse_group_history(a: argparse.Namespace) -> int:
    """``browse --all --group FILE POINT`` / ``browse --checkpoint N --group FILE POINT``: the
    group's time machine, indexed by group checkpoint ids (browse.GroupHistoryBrowseOperations),
    served by one daemon (:func:`run_group_history_browse`) that reads every member's shadow."""
    from .group import GroupFileError, GroupHistoryError, find_point, load_group, retained_points
    from .mount import spawn
    point = Path(os.path.abspath(a.target))
    if a.all and a.checkpoint is not None:
        raise UserError("give either --all or --checkpoint N, not both", EXIT_USAGE)
    if a.tree and a.foreground:
        return run_group_history_browse(a.group, point, a.o or [], a.ready_fd, a.debug, a.checkpoint)
    try:
        group = load_group(a.group, check=False)
        if a.checkpoint is not None:
            find_point(group, a.checkpoint)
            what = f"group checkpoint {a.checkpoint}"
        else:
            points = retained_points(group)
            if not points:
                raise GroupHistoryError(f"group {group.name!r}: no group checkpoint is retained by every "
                                        f"member yet (`fusejournal log --group {a.group}`)")
            what = f"{len(points)} group checkpoint(s) retained by every member and latest"
    except GroupFileError as e:
        raise UserError(str(e), EXIT_USAGE) from None
    except GroupHistoryError as e:
        raise UserError(str(e), EXIT_USAGE) from None
    if not point.is_dir():
        raise UserError(f"{point} is not a directory", EXIT_USAGE)
    argv = ["browse", "--group", os.fspath(group.path), os.fspath(point), "--tree"]
    argv += ["--checkpoint", str(a.checkpoint)] if a.checkpoint is not None else ["--all"]
    for o in a.o or []:
        argv += ["-o", o]
    spawn(argv)
    print(f"browsing {what} of group {group.name!r} at {point} (read-only; unmount with "
          f"`fusejournal umount {point}`)")
    return 0


def run_group_history_browse(group_file: str, point: Path, options: list[str], ready_fd: int | None,
                             debug: bool, only: int | None) -> int:
    """The daemon of ``browse --all|--checkpoint N --group`` (until unmounted)."""
    from collections.abc import Callable

    from .checks import fsname_for
    from .mount import serve_read_only
    from .session import FuseOperations

    def open_ops() -> tuple[FuseOperations, Callable[[], None]]:
        from .browse import GroupHistoryBrowseOperations
        from .group import GroupFileError
        try:
            ops = GroupHistoryBrowseOperations(group_file, only)
        except GroupFileError as e:
            raise UserError(str(e), EXIT_USAGE) from None
        except OSError as e:
            where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
            raise UserError(f"group {group_file}: cannot open a member's shadow: {where}{e.strerror}") from None
        return ops, ops.close_all
    return serve_read_only(point, options, ready_fd, debug,
                           fsname_for(Path(os.path.abspath(group_file)), "fusejournal-group-history"), open_ops)


# ------------------------------------------------------------------ retained checkpoints

def retained_lines(shadow: Path) -> list[str]:
    """``log``'s listing of the retained checkpoints (what browse --all and restore --checkpoint
    can show), or why there are none."""
    from datetime import UTC, datetime

    from .history import retained
    from .shadow import Shadow, ShadowError
    try:
        applied = Shadow(shadow).applied
        cps = retained(shadow, applied)
    except (ShadowError, OSError) as e:
        return [f"retained: none (the shadow {shadow}: {e})"]
    out = [f"retained in the shadow ({len(cps)}; browse --all, restore --checkpoint):"]
    for c in cps:
        when = datetime.fromtimestamp(c.time_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S") if c.time_ns else "-"
        latest = "  (latest)" if c.id == applied else ""
        out.append(f"{c.id:>6}  {when:20}  {c.label}{latest}")
    return out


def cmd_prune(a: argparse.Namespace) -> int:
    """``prune MOUNTPOINT|JOURNAL --keep-last N | --keep-within DURATION``: delete the reverse
    batches (and the objects only they hold) of the checkpoints the rule does not keep, oldest
    first; the latest is always kept.  Runs like a batch of the updater: it waits for a batch
    being applied and for restores/verifies, and browse requests wait for it."""
    from .browsegate import UpdaterSide
    from .cli import Target
    from .history import Policy, prune, retained
    from .shadow import Shadow, ShadowError
    t = Target(a.target)
    policy = Policy(keep_last=a.keep_last, keep_within=a.keep_within)
    side = UpdaterSide(t.shadow)
    try:
        with side.pinning(wait=True), side.updating():     # after any restore reading history
            try:
                applied = Shadow(t.shadow).applied
            except ShadowError as e:
                raise UserError(str(e)) from None
            dropped = prune(t.shadow, applied, policy)
            left = retained(t.shadow, applied)
    finally:
        side.close()
    kept = f"{left[0].id}..{left[-1].id}" if len(left) > 1 else f"{left[-1].id}"
    if dropped:
        gone = f"{dropped[0]}..{dropped[-1]}" if len(dropped) > 1 else f"{dropped[0]}"
        print(f"pruned checkpoint(s) {gone}; retained: {kept}")
    else:
        print(f"nothing to prune; retained: {kept}")
    return 0


# ------------------------------------------------------------------ browse --all, --checkpoint N

def browse_history(a: argparse.Namespace) -> int:
    """``browse --all|--checkpoint N MOUNTPOINT|JOURNAL BROWSEPOINT``: start the daemon
    (:func:`run_history_browse`) serving browse.HistoryBrowseOperations, forked from this
    process once it has imported what the daemon needs (daemonize.fork_daemon: one Python
    start-up instead of two)."""
    from .cli import Target
    from .daemonize import fork_daemon
    from .history import retained
    from .shadow import Shadow, ShadowError
    if a.browsepoint is None:
        raise UserError("BROWSEPOINT is required", EXIT_USAGE)
    if a.group:
        raise UserError("--all and --checkpoint do not go with --group", EXIT_USAGE)
    browsepoint = Path(os.path.abspath(a.browsepoint))
    t = Target(a.target)
    try:
        applied = Shadow(t.shadow).applied
    except ShadowError as e:
        raise UserError(str(e)) from None
    cps = retained(t.shadow, applied)
    if a.checkpoint is not None and a.checkpoint not in {c.id for c in cps}:
        have = f"{cps[0].id}..{cps[-1].id}" if len(cps) > 1 else f"{cps[-1].id}"
        why = "not applied to the shadow yet" if a.checkpoint > applied else "not retained"
        raise UserError(f"checkpoint {a.checkpoint} is {why} (retained: {have})", EXIT_USAGE)
    _read_ahead(t.shadow, [c.id for c in cps if c.id != applied
                           and (a.checkpoint is None or c.id >= a.checkpoint)])
    from . import browse, history_view, mount  # noqa: F401  (the daemon's imports, done once, before the fork)
    shadow = t.shadow
    fork_daemon(lambda ready_fd: run_history_browse(shadow, browsepoint, a.o or [], ready_fd, a.debug,
                                                     a.checkpoint))
    what = f"checkpoint {a.checkpoint}" if a.checkpoint is not None else \
        f"{len(cps)} retained checkpoint(s) and latest"
    print(f"browsing {what} of the shadow {t.shadow} at {browsepoint} (read-only)")
    return 0


def _read_ahead(shadow: Path, ids: list[int]) -> None:
    """Have the kernel start reading the revs the daemon's first request indexes
    (posix_fadvise WILLNEED does not wait), so that the disk works while this command
    imports the daemon's modules."""
    from .history import rev_name
    hdir = shadow / layout.SHADOW_HISTORY
    for n in ids:
        try:
            fd = os.open(hdir / rev_name(n), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def run_history_browse(shadow: Path, browsepoint: Path, options: list[str], ready_fd: int | None,
                       debug: bool, only: int | None) -> int:
    """The daemon of ``browse --all`` / ``--checkpoint N`` (until unmounted)."""
    from collections.abc import Callable

    from .checks import fsname_for
    from .mount import serve_read_only
    from .session import FuseOperations

    def open_ops() -> tuple[FuseOperations, Callable[[], None]]:
        from .browse import HistoryBrowseOperations
        ops = HistoryBrowseOperations(shadow, only)
        return ops, ops.close_all
    return serve_read_only(browsepoint, options, ready_fd, debug,
                           fsname_for(shadow, "fusejournal-history"), open_ops)
