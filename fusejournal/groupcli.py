"""``fusejournal mount|umount|checkpoint|status|wait --group FILE``: the consistency group commands.

The group file is read and checked completely (fusejournal/group.py) before
anything is started, created or seeded.  ``mount --group`` starts the
coordinator (its own process) and then each member's daemon with the same
spawn-and-wait-for-ready machinery as a single mount; a member already mounted
is kept (so the same command brings a member back after its daemon died); if
any member cannot be mounted, everything this command started is stopped
again and the error says which member and why.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import layout
from .errors import EXIT_DAMAGED, EXIT_FAILED, EXIT_IN_USE, EXIT_TIMEOUT, EXIT_USAGE, UserError
from .group import COORDINATOR_PID, CommitLog, Group, GroupFileError, Member, ensure_run_dir, load_group
from .history import Checkpoint, Policy


def _load(path: str, check: bool = True) -> Group:
    try:
        return load_group(path, check=check)
    except GroupFileError as e:
        raise UserError(str(e), EXIT_USAGE) from None


def _coordinator(group: Group, obj: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    from .coordinator import ProtocolError, request
    try:
        return request(group.coordinator_socket, obj, timeout)
    except ProtocolError as e:
        raise UserError(f"group {group.name!r}: {e}", EXIT_FAILED) from None


def _coordinator_alive(group: Group) -> bool:
    try:
        return bool(_coordinator(group, {"op": "status"}, 5.0).get("ok"))
    except UserError:
        return False


def _member_mounted(m: Member) -> bool:
    """True if the member's mountpoint is a live fusejournal mount of its journal."""
    from .cli import _getxattr
    try:
        j = _getxattr(m.mountpoint, layout.XATTR_JOURNAL)
    except UserError:
        return False                         # a dead mount: the member's daemon clears it
    return j is not None and os.path.abspath(os.fsdecode(j)) == os.path.abspath(m.journal)


def _unmount(mountpoint: Path, timeout: float = 60.0) -> None:
    from .cli import cmd_umount
    with open(os.devnull, "w") as null:
        out, sys.stdout = sys.stdout, null
        try:
            cmd_umount(argparse.Namespace(mountpoint=os.fspath(mountpoint), timeout=timeout))
        finally:
            sys.stdout = out


def _stop_coordinator(group: Group, timeout: float = 30.0) -> None:
    from .cli import _alive
    try:
        pid = int((group.run_dir / COORDINATOR_PID).read_text())
    except (OSError, ValueError):
        pid = None
    try:
        _coordinator(group, {"op": "stop"}, 5.0)
    except UserError:
        return
    deadline = time.monotonic() + timeout
    while pid and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def mount_group(a: argparse.Namespace) -> int:
    from .daemonize import spawn
    seeding: list[str] = []             # members whose shadow is seeded behind the mount
    if getattr(a, "reseed", False):
        # each member would recopy its own shadow outside the group's checkpoints
        raise UserError("mount --group does not take --reseed: the members of a group are seeded "
                        "together at their first mount; nothing was mounted", EXIT_USAGE)
    group = _load(a.group)
    try:
        ensure_run_dir(group)
    except (GroupFileError, OSError) as e:
        raise UserError(f"group journal {group.journal}: {e}") from None
    started_coordinator = False
    mounted: list[Member] = []
    current = None
    _check_running_coordinator(group)
    try:
        if not _coordinator_alive(group):
            spawn([os.fspath(group.path)], module="fusejournal.coordinator")
            started_coordinator = True
        for m in group.members:
            current = m
            if _member_mounted(m):
                print(f"member {m.name}: already mounted at {m.mountpoint}")
                continue
            argv = ["mount", os.fspath(m.source), os.fspath(m.mountpoint), "--journal", os.fspath(m.journal),
                    "--shadow", os.fspath(m.shadow), "--halt-timeout", str(group.halt_timeout),
                    "--memory-limit", str(a.memory_limit), "--segment-limit", str(a.segment_limit),
                    "--group", os.fspath(group.path), "--member", m.name]
            argv += _retention_argv(a, group)
            if getattr(a, "seed_wait", None) is not None:
                argv += ["--seed-wait", str(a.seed_wait)]
            for o in a.o or []:
                argv += ["-o", o]
            if a.debug:
                argv.append("--debug")
            if getattr(a, "writeback_cache", False):
                argv.append("--writeback-cache")
            def tell(text: str, name: str = m.name) -> None:
                print(f"member {name}: {text}", file=sys.stderr)
            info = spawn(argv, on_message=tell)
            mounted.append(m)
            print(f"member {m.name}: mounted {m.source} at {m.mountpoint} (journal {m.journal}, "
                  f"shadow {m.shadow}, pid {info.get('pid')})")
            if info.get("seeding"):
                seeding.append(m.name)
    except UserError as e:
        for m in reversed(mounted):
            try:
                _unmount(m.mountpoint)
            except UserError as ue:
                print(f"fusejournal: could not unmount member {m.name}: {ue}", file=sys.stderr)
        if started_coordinator:
            _stop_coordinator(group)
        who = f"member {current.name!r}" if current is not None else "the coordinator"
        undone = f"; unmounted the {len(mounted)} member(s) this command had mounted" if mounted else ""
        raise UserError(f"group {group.name!r}: {who}: {e}{undone}", e.exit_code) from None
    print(f"group {group.name}: {len(group.members)} member(s) mounted")
    if seeding:
        print(f"member(s) {', '.join(seeding)}: the shadow is being seeded in the background: "
              f"`fusejournal status --group {group.path}` shows the progress, `fusejournal wait "
              f"--group {group.path}` waits for the first complete group checkpoint")
    return 0


def _check_running_coordinator(group: Group) -> None:
    """A coordinator already running for this group journal must coordinate the members of
    this group file: one started from another file (a second group given the same journal,
    or this file before a member was added or removed) would checkpoint its own members
    only, and a member it does not know would be told its checkpoints succeeded while none
    of them ever reached its shadow."""
    try:
        st = _coordinator(group, {"op": "status"}, 5.0).get("status") or {}
    except UserError:
        return                               # none running: this command starts one
    names = [m.name for m in group.members]
    if st.get("group") != group.name or sorted(map(str, st.get("members") or [])) != sorted(names):
        running = ", ".join(map(str, st.get("members") or [])) or "?"
        raise UserError(f"group {group.name!r}: the group journal {group.journal} is in use by the "
                        f"coordinator of group {st.get('group')!r} with member(s) {running}, not "
                        f"{', '.join(names)}: unmount that group first (`fusejournal umount --group`), "
                        f"or give this group its own journal", EXIT_IN_USE)


def _retention_argv(a: argparse.Namespace, group: Group) -> list[str]:
    """Every member's retention: ``mount --group``'s --keep-last/--keep-within, each one
    given on the command line replacing the group file's ``keep_last``/``keep_within``;
    neither anywhere: each member's default (the last 24)."""
    keep_last = a.keep_last if getattr(a, "keep_last", None) is not None else group.keep_last
    keep_within = a.keep_within if getattr(a, "keep_within", None) is not None else group.keep_within
    out = []
    if keep_last is not None:
        out += ["--keep-last", str(keep_last)]
    if keep_within is not None:
        out += ["--keep-within", f"{keep_within:.9f}s"]
    return out


def umount_group(a: argparse.Namespace) -> int:
    group = _load(a.group, check=False)
    errors = []
    for m in group.members:
        from .checks import fuse_mount_at
        if fuse_mount_at(m.mountpoint) is None:
            continue
        try:
            os.statvfs(m.mountpoint)
        except OSError as e:
            if e.errno == errno.ENOTCONN:          # its daemon died: clear the dead mount
                from .checks import lazy_unmount
                lazy_unmount(m.mountpoint)
                print(f"member {m.name}: cleared the dead mount at {m.mountpoint}")
                continue
        try:
            _unmount(m.mountpoint, a.timeout)
            print(f"member {m.name}: unmounted {m.mountpoint}")
        except UserError as e:
            errors.append(f"member {m.name!r}: {e}")
    _stop_coordinator(group, a.timeout)
    if errors:
        raise UserError("; ".join(errors), EXIT_FAILED)
    print(f"group {group.name}: unmounted")
    return 0


def checkpoint_group(a: argparse.Namespace) -> int:
    from .control import check_label
    group = _load(a.group, check=False)
    label = a.label if a.label is not None else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:        # the rule of setfattr on a mount (control.py): a label is one line of text
        check_label(os.fsencode(label))
    except ValueError as e:
        raise UserError(f"checkpoint --group: {e} (labels: 1-200 bytes of printable UTF-8)", EXIT_USAGE) from None
    r = _coordinator(group, {"op": "checkpoint", "label": label},
                     3 * group.halt_timeout + group.append_timeout + 60)
    if not r.get("ok"):
        raise UserError(r.get("error", "group checkpoint failed"),
                        EXIT_USAGE if r.get("errno") == 22 else EXIT_FAILED)
    print(r["id"])
    return 0


def _member_status(m: Member) -> dict[str, Any]:
    from .cli import Target
    try:
        t = Target(os.fspath(m.mountpoint) if _member_mounted(m) else os.fspath(m.journal))
        return dict(t.status())
    except UserError as e:
        return {"error": str(e)}


def status_group(a: argparse.Namespace) -> int:
    group = _load(a.group, check=False)
    commits = CommitLog(group.commits_path)
    commits.refresh()
    last = commits.commit_record(commits.last_committed)
    st: dict[str, Any] = {"group": group.name, "last_group_checkpoint": commits.last_committed,
                "last_group_halt_ns": last["halt_ns"] if last else 0,
                "group_halts_committed": len(commits.commits), "group_aborted": len(commits.aborts),
                "coordinator": None, "members": {}}
    from .group import GroupHistoryError, retained_points
    # what browse --all --group and restore --group --checkpoint can show: always a list (none
    # while a member's shadow holds no checkpoint, e.g. while it is seeded), and why not
    st["retained_group_checkpoints_error"] = None
    try:
        st["retained_group_checkpoints"] = [p.id for p in retained_points(group)]
    except GroupHistoryError as e:
        st["retained_group_checkpoints"] = []
        st["retained_group_checkpoints_error"] = str(e)
    try:
        r = _coordinator(group, {"op": "status"}, 5.0)
        st["coordinator"] = r.get("status")
    except UserError as e:
        st["coordinator_error"] = str(e)
    for m in group.members:
        st["members"][m.name] = _member_status(m)
    # the members' online seeds (groupseed.py): no group checkpoint is complete before this one
    from .groupseed import first_complete
    first, parts = first_complete(group, commits)
    st["first_complete_group_checkpoint"] = first
    st["seeding_members"] = [n for n, p in parts.items() if p.seeding]
    bad = any(s.get("error") or s.get("updater_error") or s.get("log_damage") or s.get("group_error")
              or str((s.get("seeding") or {}).get("state", "")).startswith("stopped")
              for s in st["members"].values())
    if a.json:
        print(json.dumps(st, indent=1, sort_keys=True))
    else:
        for k in sorted(st):
            if k not in ("members", "coordinator"):
                print(f"{k}: {st[k]}")
        for k, v in sorted((st["coordinator"] or {}).items()):
            print(f"coordinator.{k}: {v}")
        from .seeding import progress_line
        for name, ms in st["members"].items():
            for k in sorted(ms):
                v = ms[k]
                if k == "seeding" and isinstance(v, dict) and "entries_copied" in v and "phase" in v:
                    print(f"{name}.seeding: {progress_line(v).removeprefix('seeding: ')}")
                else:
                    print(f"{name}.{k}: {v}")
    return EXIT_DAMAGED if bad else 0


def wait_group(a: argparse.Namespace) -> int:
    """``wait --group FILE [--checkpoint G]``: until every member's shadow stands at G.
    While the members are seeded online (groupseed.py) no group checkpoint is complete
    before the group's first complete one F: a G before F is waited for as F (which
    includes it), and said so."""
    group = _load(a.group, check=False)
    commits = CommitLog(group.commits_path)
    commits.refresh()
    target = a.checkpoint if a.checkpoint is not None else commits.last_committed
    if target > 0 and commits.commit_record(target) is None:
        if target <= commits.last_id:
            raise UserError(f"group checkpoint {target} was not committed (it failed)", EXIT_USAGE)
        raise UserError(f"group checkpoint {target} does not exist (last is {commits.last_committed})",
                        EXIT_USAGE)
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    from .groupseed import first_complete
    from .shadow import Shadow, ShadowError
    while True:
        commits.refresh()
        first, parts = first_complete(group, commits)
        if first is None:
            waiting = []
            for m in group.members:
                part = parts[m.name]
                if part.complete_at is not None:
                    continue
                st = _member_status(m)
                if st.get("error"):
                    raise UserError(f"member {m.name!r}: {st['error']}", EXIT_FAILED)
                seed = st.get("seeding") or {}
                if str(seed.get("state", "")).startswith("stopped"):
                    raise UserError(f"member {m.name!r}: the seed of its shadow is {seed['state']}",
                                    EXIT_DAMAGED)
                if st.get("pid") is None:
                    raise UserError(f"member {m.name!r}: its shadow is {part.why} and no daemon is "
                                    f"running to finish it: mount the group again", EXIT_FAILED)
                if not part.seeding and not seed:         # not seeding: nothing to wait for
                    raise UserError(f"member {m.name!r}: {part.why}", EXIT_FAILED)
                waiting.append(f"{m.name} ({seed.get('state') or part.why})")
            if deadline is not None and time.monotonic() >= deadline:
                raise UserError(f"timed out: the members are still being seeded: {', '.join(waiting)}; "
                                f"no group checkpoint is complete yet (waiting for {target})",
                                EXIT_TIMEOUT)
            time.sleep(0.05)
            continue
        goal = max(target, first)
        if goal == 0:
            print(0)
            return 0
        rec = commits.commit_record(goal)
        if rec is None:              # (first is a committed group checkpoint: not reached)
            raise UserError(f"group checkpoint {goal} is not in the commit log", EXIT_FAILED)
        behind = []
        for m in group.members:
            local = rec["members"].get(m.name)
            if local is None:
                raise UserError(f"group checkpoint {goal} has no batch of member {m.name!r}")
            st = _member_status(m)
            if st.get("error"):
                raise UserError(f"member {m.name!r}: {st['error']}", EXIT_FAILED)
            applied = st.get("shadow_checkpoint")
            if applied is None:
                try:
                    applied = Shadow(m.shadow).applied
                except ShadowError as e:
                    if st.get("pid") is None:
                        raise UserError(f"member {m.name!r}: {e}") from None
                    applied = -1          # completing its seed this very moment
            if applied < local:
                if st.get("pid") is None:
                    raise UserError(f"member {m.name!r}: its shadow is behind and no daemon is running "
                                    f"to apply it: mount the group again", EXIT_FAILED)
                if st.get("updater_error"):
                    raise UserError(f"member {m.name!r}: the updater is stopped: {st['updater_error']}",
                                    EXIT_DAMAGED)
                behind.append(m.name)
        if not behind:
            if target < first:
                print(f"fusejournal: group checkpoint {target} was taken while the members were being "
                      f"seeded; every member stands at group checkpoint {goal}, the first complete "
                      f"group checkpoint, which includes it", file=sys.stderr)
            print(goal)
            return 0
        if deadline is not None and time.monotonic() >= deadline:
            raise UserError(f"timed out: member(s) {', '.join(behind)} not yet at group checkpoint {goal}",
                            EXIT_TIMEOUT)
        time.sleep(0.05)


def log_group(a: argparse.Namespace) -> int:
    """One line per group checkpoint (committed or failed), with each member's own checkpoint id."""
    group = _load(a.group, check=False)
    commits = CommitLog(group.commits_path)
    commits.refresh()
    rows = sorted([("committed", r["commit"], r) for r in commits.commits] +
                  [("failed", r["abort"], r) for r in commits.aborts], key=lambda x: x[1])
    from .groupseed import first_complete
    first, parts = first_complete(group, commits)
    if a.json:
        print(json.dumps([{"id": i, "state": s, **r, **({"first_complete": True} if i == first and
                                                         s == "committed" else {})}
                          for s, i, r in rows], indent=1))
        return 0
    print(f"{'id':>6}  {'state':9}  {'time (UTC)':20}  {'group halt ms':>13}  members  label")
    for state, gid, r in rows:
        when = (datetime.fromtimestamp(r["time_ns"] / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")
                if "time_ns" in r else "")
        halt = f"{r['halt_ns'] / 1e6:.3f}" if "halt_ns" in r else ""
        members = ",".join(f"{n}:{c}" for n, c in sorted(r.get("members", {}).items())) or "-"
        extra = f"  ({r['error']})" if state == "failed" and r.get("error") else ""
        if state == "committed" and gid == first and first:
            extra += "  (first complete group checkpoint: every member's seed is done)"
        elif state == "committed" and (first is None or gid < first) and _seeded_online(parts):
            extra += "  (taken while seeding: not complete on every member)"
        print(f"{gid:>6}  {state:9}  {when:20}  {halt:>13}  {members}  {r.get('label', '')}{extra}")
    if first is None:
        print("no group checkpoint is complete yet: " + "; ".join(
            f"member {n}: {p.why}" for n, p in parts.items() if p.complete_at is None))
    return 0


def _seeded_online(parts: dict[str, Any]) -> bool:
    """Was the group seeded online (a member's seed completed at a group checkpoint > 0, or
    one is in progress)?  Only then are earlier rows "taken while seeding"."""
    return any(p.seeding or (p.complete_at or 0) > 0 for p in parts.values())


def fsck_group(a: argparse.Namespace) -> int:
    """fsck every member's journal; the worst exit code."""
    from .cli import cmd_fsck
    group = _load(a.group, check=False)
    worst = 0
    for m in group.members:
        print(f"member {m.name} ({m.journal}):")
        try:
            rc = cmd_fsck(argparse.Namespace(journal=os.fspath(m.journal), repair=a.repair,
                                             verify_shadow=a.verify_shadow, group=None))
        except UserError as e:
            print(f"fusejournal: member {m.name!r}: {e}", file=sys.stderr)
            rc = e.exit_code
        worst = max(worst, rc)
    return worst


# ------------------------------------------------------------------ the group's time machine

def _point(group: Group, gid: int | None) -> tuple[int, dict[str, int]]:
    """(gid, member -> its own checkpoint) of group checkpoint ``gid`` (default: the newest
    that every member retains); UserError in one line if no member may be read at it."""
    from .group import GroupHistoryError, find_point, retained_points
    try:
        if gid is not None:
            p = find_point(group, gid)
        else:
            points = retained_points(group)
            if not points:
                raise GroupHistoryError(f"group {group.name!r}: no group checkpoint is retained by every "
                                        f"member yet")
            p = points[-1]
    except GroupHistoryError as e:
        raise UserError(str(e), EXIT_USAGE) from None
    return p.id, p.members


def restore_group(a: argparse.Namespace) -> int:
    """``restore --group FILE [--member NAME] [--checkpoint GID] DEST``: the member's tree
    (or a SUBPATH of it) at group checkpoint GID into DEST; without --member, every member
    into DEST/<member>.  Every DEST is checked before anything is written."""
    from .restore import check_dest
    from .restore import cmd_restore as restore_one
    group = _load(a.group, check=False)
    dest_arg = a.dest if a.dest is not None else a.target
    if a.dest is not None and a.target is not None:
        raise UserError("restore --group FILE takes one DEST (no MOUNTPOINT|JOURNAL)", EXIT_USAGE)
    if dest_arg is None:
        raise UserError("DEST is required", EXIT_USAGE)
    if a.member is not None:
        try:
            members = [group.member(a.member)]
        except GroupFileError as e:
            raise UserError(str(e), EXIT_USAGE) from None
    else:
        if a.path:
            raise UserError("--path goes with --member NAME (a path of one member's tree)", EXIT_USAGE)
        members = list(group.members)
    gid, local = _point(group, a.checkpoint)
    dest = Path(os.path.abspath(dest_arg))
    forbidden = [(group.journal, "group journal")]
    for m in group.members:                  # as restore of one tree: its journal, shadow, live mount
        forbidden += [(m.journal, f"journal of member {m.name!r}"), (m.shadow, f"shadow of member {m.name!r}")]
        if _member_mounted(m):
            forbidden.append((m.mountpoint, f"mount of member {m.name!r}"))
    check_dest(dest, forbidden, a.force)
    if a.member is None:
        for m in members:
            if os.path.lexists(dest):
                check_dest(dest / m.name, forbidden, a.force)
        dest.mkdir(mode=0o755, exist_ok=True)
    for m in members:
        d = dest if a.member is not None else dest / m.name
        print(f"member {m.name}: group checkpoint {gid} is its checkpoint {local[m.name]}")
        restore_one(argparse.Namespace(target=os.fspath(m.journal), dest=os.fspath(d), path=a.path,
                                       checkpoint=local[m.name], force=a.force))
    return 0


def prune_group(a: argparse.Namespace) -> int:
    """``prune --group FILE --keep-last N | --keep-within DURATION``: the rule picks group
    checkpoints (of those every member retains); every member then drops its own checkpoints
    older than the oldest group checkpoint kept, so all members keep the same group
    checkpoints.  Each member is pruned like ``prune`` does it (browsecli.cmd_prune: after a
    batch being applied and any restore reading its history)."""
    from .browsegate import UpdaterSide
    from .group import GroupHistoryError, retained_points
    from .history import prune
    from .shadow import Shadow, ShadowError
    group = _load(a.group, check=False)
    try:
        points = retained_points(group)
    except GroupHistoryError as e:
        raise UserError(str(e)) from None
    if not points:
        raise UserError(f"group {group.name!r}: no group checkpoint is retained by every member; "
                        f"nothing pruned", EXIT_USAGE)
    rule = Policy(keep_last=a.keep_last, keep_within=a.keep_within)
    drop = set(rule.drop([Checkpoint(p.id, p.time_ns, p.label) for p in points], time.time_ns()))
    kept = [p for p in points if p.id not in drop]
    oldest = kept[0]
    for m in group.members:
        before = oldest.members[m.name]
        side = UpdaterSide(m.shadow)
        try:
            with side.pinning(wait=True), side.updating():
                try:
                    applied = Shadow(m.shadow).applied
                except ShadowError as e:
                    raise UserError(f"member {m.name!r}: {e}") from None
                gone = prune(m.shadow, applied, _Before(keep_last=None, before=before))
        finally:
            side.close()
        print(f"member {m.name}: pruned {len(gone)} checkpoint(s) older than its checkpoint {before}")
    span = f"{kept[0].id}..{kept[-1].id}" if len(kept) > 1 else f"{kept[0].id}"
    if drop:
        d = sorted(drop)
        gone_s = f"{d[0]}..{d[-1]}" if len(d) > 1 else f"{d[0]}"
        print(f"pruned group checkpoint(s) {gone_s}; retained by every member: {span}")
    else:
        print(f"no group checkpoint to prune; retained by every member: {span}")
    return 0



@dataclass(frozen=True)
class _Before(Policy):
    """Drop every retained checkpoint older than ``before`` (never the latest): a prefix."""
    before: int = 0

    def drop(self, cps: list[Checkpoint], now_ns: int) -> list[int]:
        return [c.id for c in cps[:-1] if c.id < self.before]
