"""Commands around the browse mount: ``browse --group`` (and, below, restore and verify).

``browse --group FILE POINT``: POINT is an existing empty directory; one
directory per member is made in it (``POINT/<member>``) and each is a browse
mount of that member's shadow, served by its own daemon (one FUSE session per
process).  Every member's daemon takes the browse gate of *every* member's
shadow and admits a request only while all the members' shadows stand at one
group checkpoint (fusejournal/browse.py, ``GroupPosition``), so a reader of
POINT sees all members at the same group checkpoint.  Unmount with
``fusejournal umount POINT/<member>`` for each member.

Every browse command forks its daemon (daemonize.fork_daemon) once it has imported
what the daemon needs, never ``fusejournal.mount`` (the journaled mount's machinery):
one interpreter's start-up and one set of imports (docs/design.md, "Browse starts
fast").  The daemons themselves, :func:`run_browse` and :func:`serve_read_only`, are
here for that reason.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout
from .errors import EXIT_USAGE, UserError

if TYPE_CHECKING:                   # imported where used: a browse starts fast
    from collections.abc import Callable

    from .session import FuseOperations


def browse_group(a: argparse.Namespace) -> int:
    from .daemonize import fork_daemon
    from .group import GroupFileError, load_group
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
            _import_daemon()
            fork_daemon(functools.partial(run_browse, tree, bp, a.o or [], debug=a.debug,
                                          group=(os.fspath(group.path), m.name)))
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
    from .daemonize import fork_daemon
    from .group import GroupFileError, GroupHistoryError, find_point, load_group, retained_points
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
    _import_daemon(history=True)
    group_file = os.fspath(group.path)
    fork_daemon(lambda fd: run_group_history_browse(group_file, point, a.o or [], fd, a.debug, a.checkpoint))
    print(f"browsing {what} of group {group.name!r} at {point} (read-only; unmount with "
          f"`fusejournal umount {point}`)")
    return 0


def run_group_history_browse(group_file: str, point: Path, options: list[str], ready_fd: int | None,
                             debug: bool, only: int | None) -> int:
    """The daemon of ``browse --all|--checkpoint N --group`` (until unmounted)."""
    from .checks import fsname_for

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
    cps = retained(t.shadow, applied, down_to=a.checkpoint)     # --checkpoint K: the revs from K on
    if a.checkpoint is not None and a.checkpoint not in {c.id for c in cps}:
        cps = retained(t.shadow, applied)
        have = f"{cps[0].id}..{cps[-1].id}" if len(cps) > 1 else f"{cps[-1].id}"
        why = "not applied to the shadow yet" if a.checkpoint > applied else "not retained"
        raise UserError(f"checkpoint {a.checkpoint} is {why} (retained: {have})", EXIT_USAGE)
    _read_ahead(t.shadow, [c.id for c in cps if c.id != applied
                           and (a.checkpoint is None or c.id >= a.checkpoint)])
    _import_daemon(history=True)
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
    from .checks import fsname_for

    def open_ops() -> tuple[FuseOperations, Callable[[], None]]:
        from .browse import HistoryBrowseOperations
        ops = HistoryBrowseOperations(shadow, only)
        return ops, ops.close_all
    return serve_read_only(browsepoint, options, ready_fd, debug,
                           fsname_for(shadow, "fusejournal-history"), open_ops)


# ------------------------------------------------------------------ browse (the latest checkpoint)

def browse_latest(a: argparse.Namespace) -> int:
    """``browse MOUNTPOINT|JOURNAL BROWSEPOINT``: the shadow's latest applied checkpoint,
    moving with the updater (browse.BrowseOperations), served by a daemon forked from this
    command once it has imported what the daemon needs (as ``--checkpoint``); ``--tree``
    (a shadow's tree given directly) and ``--foreground`` serve it in this process."""
    from .cli import Target
    from .daemonize import fork_daemon
    if a.browsepoint is None:
        raise UserError("BROWSEPOINT is required", EXIT_USAGE)
    browsepoint = Path(os.path.abspath(a.browsepoint))
    t = None
    if a.tree:
        tree = Path(a.target)
    else:
        t = Target(a.target)
        tree = t.shadow / layout.SHADOW_TREE
    if not tree.is_dir():
        raise UserError(f"the shadow tree {tree} does not exist")
    if t is not None:
        from .shadow import Shadow
        if Shadow(t.shadow).seeding:
            live = t.live_status() or {}
            seed = live.get("seeding") or {}
            raise UserError(f"the shadow is being seeded ({seed.get('entries_copied', '?')} entries "
                            f"copied so far): it holds no complete checkpoint to browse yet; "
                            f"`fusejournal wait {a.target}` waits for the first one")
    group = (a.group, a.member) if a.group else None
    if a.foreground:
        return run_browse(tree, browsepoint, a.o or [], a.ready_fd, a.debug, group)
    _import_daemon()
    fork_daemon(lambda fd: run_browse(tree, browsepoint, a.o or [], fd, a.debug, group))
    print(f"browsing the shadow {tree} at {browsepoint} (read-only)")
    return 0


# ------------------------------------------------------------------ the read-only daemons

def _import_daemon(history: bool = False) -> None:
    """Import what a browse daemon needs, before it is forked (so that it is done once, in
    the command, and the daemon starts serving at once): the FUSE session (pyfuse3, trio),
    the browse Operations and, for retained checkpoints, the history view.  Nothing of the
    journaled mount (fusejournal.mount and what it wires: the acquisition, the updater,
    seeding, the streamer), which tests/mount/test_browse_start.py checks."""
    from . import browse, checks, session  # noqa: F401
    if history:
        from . import history_view  # noqa: F401


def run_browse(tree: Path, browsepoint: Path, options: list[str], ready_fd: int | None, debug: bool,
               group: tuple[str, str] | None = None) -> int:
    """Serve a read-only view of a shadow tree until unmounted (browse.BrowseOperations)."""
    from .checks import fsname_for

    def open_ops() -> tuple[FuseOperations, Callable[[], None]]:
        fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
        from .browse import browse_operations
        try:
            ops = browse_operations(tree, fd, group)
        except BaseException:
            os.close(fd)
            raise

        def close() -> None:
            ops.close_all()
            os.close(fd)
        return ops, close
    return serve_read_only(browsepoint, options, ready_fd, debug, fsname_for(tree, "fusejournal-browse"),
                           open_ops)


def serve_read_only(browsepoint: Path, options: list[str], ready_fd: int | None, debug: bool,
                    fsname: str, open_ops: Callable[[], tuple[FuseOperations, Callable[[], None]]]) -> int:
    """A read-only mount's daemon, until unmounted: the browse mount (:func:`run_browse`) and
    the browse of retained checkpoints (:func:`run_history_browse`,
    :func:`run_group_history_browse`).  ``open_ops`` builds the Operations once the browse
    point is checked, and returns them with what closes them.

    1. the browse point is checked (a directory, not already a FUSE mount);
    2. the Operations are opened (``open_ops``);
    3. the FUSE session is mounted and ``ready`` is reported at once (the command returns;
       nothing else is done before: no scan, no sync), then requests are served until
       unmounted or signalled; the Operations are closed whatever happens."""
    import trio

    from .checks import check_dir, check_mountpoint, mount_options
    from .daemonize import Reporter, setup_logging
    from .session import serve_session
    reporter = Reporter(ready_fd)
    setup_logging(None, debug, ready_fd is None)
    try:
        check_dir(browsepoint, "browse point")
        check_mountpoint(browsepoint, journal_free=False)
        ops, close = open_ops()

        async def serve() -> None:
            try:
                await serve_session(ops, browsepoint, mount_options(options, fsname=fsname, read_only=True),
                                    lambda: reporter.ready({"browsepoint": os.fspath(browsepoint),
                                                            "pid": os.getpid()}))
            finally:
                close()
        trio.run(serve)
    except UserError as e:
        reporter.error(e.exit_code, str(e))
        if ready_fd is None:
            raise
        return e.exit_code
    return 0
