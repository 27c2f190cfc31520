"""Consistency groups: the group file, its validation, and the group commit log.

A group file (TOML, read with :mod:`tomllib`) declares several trees that are
checkpointed together (docs/design.md, "Consistency groups")::

    [group]
    name = "shop"
    journal = "/backup/shop/journal"   # the group journal: commit log, sockets,
                                        # and by default each member's journal and shadow
    halt_timeout = 5.0                  # optional: the bound of the group halt (s)
    append_timeout = 60.0               # optional: the bound for every member's batch to be durable
    keep_last = 24                      # optional: retain the last N group checkpoints (default 24)
    keep_within = "7d"                  # optional: retain the group checkpoints younger than this

    [[member]]
    name = "db"
    source = "/srv/shop/db"             # mounted in place unless mountpoint is given
    shadow = "/backup/shop/db"          # optional (default JOURNAL/members/NAME/shadow)
    journal = "/backup/shop/db-journal" # optional (default JOURNAL/members/NAME/journal)
    mountpoint = "/mnt/db"              # optional (default: the source, in place)

Relative paths are relative to the group file's directory.  :func:`load_group`
checks everything before anything is mounted, created or seeded and raises
:class:`GroupFileError` with a one-line message.

The group commit log (``JOURNAL/commits.jsonl``) is the one place that makes a
group checkpoint count: one line per committed (or aborted) group checkpoint,
``<crc32 hex> <json>\\n``, appended by the coordinator with ``O_APPEND`` and
``fdatasync``-ed before a checkpoint is reported done.  A commit line names,
for every member, the checkpoint id of that member's batch in its own ordered
log; a member's updater applies a batch of a group checkpoint only when a
commit line names it (:meth:`CommitLog.verdict`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tomllib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layout

COMMITS = layout.GROUP_COMMITS
RUN_DIR = layout.GROUP_RUN_DIR               # 0700: the coordinator's and the members' sockets
COORDINATOR_SOCK = layout.GROUP_COORDINATOR_SOCK
COORDINATOR_PID = layout.GROUP_COORDINATOR_PID
MEMBERS_DIR = layout.GROUP_MEMBERS_DIR
MAX_SOCKET_PATH = 107           # sun_path is 108 bytes with the NUL
MAX_GROUP_FILE = 1 << 20        # a group file is a few hundred bytes; more is not a group file

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_GROUP_KEYS: dict[str, type | tuple[type, ...]] = {"name": str, "journal": str, "halt_timeout": (int, float),
                                                   "append_timeout": (int, float), "keep_last": int,
                                                   "keep_within": str}
_MEMBER_KEYS: dict[str, type | tuple[type, ...]] = {"name": str, "source": str, "shadow": str, "journal": str, "mountpoint": str}
_REQUIRED_GROUP = ("name", "journal")
_REQUIRED_MEMBER = ("name", "source")


class GroupFileError(Exception):
    """The group file is unusable; the message is one line, naming the file."""


@dataclass(frozen=True)
class Member:
    name: str
    source: Path
    mountpoint: Path
    journal: Path
    shadow: Path


@dataclass(frozen=True)
class Group:
    path: Path                  # the group file
    name: str
    journal: Path
    members: tuple[Member, ...]
    halt_timeout: float = 5.0
    append_timeout: float = 60.0
    keep_last: int | None = None            # retention given in the file (None: not given)
    keep_within: float | None = None        # seconds

    @property
    def run_dir(self) -> Path:
        return self.journal / RUN_DIR

    @property
    def coordinator_socket(self) -> Path:
        return self.run_dir / COORDINATOR_SOCK

    def member_socket(self, name: str) -> Path:
        return self.run_dir / f"m-{name}.sock"

    @property
    def gate_path(self) -> Path:
        return self.run_dir / layout.GROUP_GATE

    def wake_path(self, name: str) -> Path:
        return self.run_dir / f"{layout.GROUP_WAKE_PREFIX}{name}"

    @property
    def commits_path(self) -> Path:
        return self.journal / COMMITS

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise GroupFileError(f"group file {self.path}: no member named {name!r}")


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return "a number"
    return {str: "a string", int: "a whole number"}.get(t, t.__name__)


def _check_table(where: str, table: object, keys: dict[str, type | tuple[type, ...]],
                 required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    for k, v in table.items():
        if k not in keys:
            raise ValueError(f"unknown key {k!r} in {where} (known: {', '.join(sorted(keys))})")
        t = keys[k]
        if isinstance(v, bool) or not isinstance(v, t):
            raise ValueError(f"{where}.{k} must be {_type_name(t)}, not {type(v).__name__}")
        if isinstance(v, str) and ("\0" in v or not v):
            raise ValueError(f"{where}.{k} must not be empty or contain NUL")
    for k in required:
        if k not in table:
            raise ValueError(f"{where} has no {k!r}")
    return table


def _exists_dir(p: Path) -> str | None:
    """None if ``p`` is a directory (or a dead FUSE mount, cleared at mount), else why not."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return None
        return e.strerror
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    return None


def _inside(a: Path, b: Path) -> bool:
    """True if ``a`` is ``b`` or below it (both absolute, normalized)."""
    return a == b or os.fspath(a).startswith(os.fspath(b).rstrip("/") + "/")


def _real(p: Path) -> Path:
    try:
        return Path(os.path.realpath(p))
    except OSError:
        return Path(os.path.abspath(p))


def parse_group(text: str, path: Path) -> Group:
    """Parse and check a group file's text (no file system access but path arithmetic)."""
    base = Path(os.path.abspath(path)).parent

    def resolve(s: str) -> Path:
        return Path(os.path.normpath(os.path.join(base, os.path.expanduser(s))))

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"not valid TOML: {e}") from None
    for k in doc:
        if k not in ("group", "member"):
            raise ValueError(f"unknown key {k!r} (expected [group] and [[member]] tables)")
    if "group" not in doc:
        raise ValueError("no [group] table")
    g = _check_table("[group]", doc["group"], _GROUP_KEYS, _REQUIRED_GROUP)
    if not _NAME_RE.fullmatch(g["name"]):
        raise ValueError(f"[group].name {g['name']!r} must be 1-64 letters, digits, '_', '.' or '-'")
    for k in ("halt_timeout", "append_timeout"):
        if k in g and not 0 < g[k] <= 3600:
            raise ValueError(f"[group].{k} must be a positive number of seconds (at most 3600)")
    keep_last, keep_within = _retention(g)
    journal = resolve(g["journal"])
    members_raw = doc.get("member")
    if members_raw is None:
        raise ValueError("no [[member]] tables")
    if not isinstance(members_raw, list):
        raise ValueError("member must be an array of tables ([[member]])")
    if not members_raw:
        raise ValueError("no [[member]] tables")
    members: list[Member] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(members_raw, 1):
        m = _check_table(f"[[member]] #{i}", raw, _MEMBER_KEYS, _REQUIRED_MEMBER)
        name = m["name"]
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"member name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if name in seen:
            raise ValueError(f"duplicate member name {name!r} (members #{seen[name]} and #{i})")
        seen[name] = i
        source = resolve(m["source"])
        mdir = journal / MEMBERS_DIR / name
        members.append(Member(name=name, source=source,
                              mountpoint=resolve(m["mountpoint"]) if "mountpoint" in m else source,
                              journal=resolve(m["journal"]) if "journal" in m else mdir / "journal",
                              shadow=resolve(m["shadow"]) if "shadow" in m else mdir / "shadow"))
    return Group(path=Path(os.path.abspath(path)), name=g["name"], journal=journal,
                 members=tuple(members), halt_timeout=float(g.get("halt_timeout", 5.0)),
                 append_timeout=float(g.get("append_timeout", 60.0)),
                 keep_last=keep_last, keep_within=keep_within)


def _retention(g: dict[str, Any]) -> tuple[int | None, float | None]:
    """``[group].keep_last`` (a whole number, at least 1) and ``keep_within`` (a duration:
    ``"90s"``, ``"15m"``, ``"24h"``, ``"7d"``, ``"2w"``), checked like the command line's."""
    from .history import parse_duration
    keep_last = g.get("keep_last")
    if keep_last is not None and not 1 <= keep_last <= 1_000_000:
        raise ValueError(f"[group].keep_last must be at least 1 (the latest group checkpoint is always "
                         f"kept) and at most 1000000, not {keep_last}")
    keep_within = None
    if "keep_within" in g:
        try:
            keep_within = parse_duration(g["keep_within"])
        except ValueError as e:
            raise ValueError(f"[group].keep_within: {e}") from None
        if keep_within > 100 * 366 * 86400:
            raise ValueError(f"[group].keep_within {g['keep_within']!r} is longer than 100 years")
    return keep_last, keep_within


def check_group(group: Group) -> None:
    """The checks that look at the file system: sources, nesting, journals, socket paths."""
    for m in group.members:
        why = _exists_dir(m.source)
        if why is not None:
            raise ValueError(f"member {m.name!r}: source {m.source} {why}")
    real = {m.name: _real(m.source) for m in group.members}
    for a in group.members:
        for b in group.members:
            if a is b:
                continue
            if real[a.name] == real[b.name]:
                raise ValueError(f"members {a.name!r} and {b.name!r} have the same source {a.source}")
            if _inside(real[a.name], real[b.name]):
                raise ValueError(f"member {a.name!r} (source {a.source}) is inside member {b.name!r} "
                                 f"(source {b.source})")
    for m in group.members:
        # a mount is made where the path leads: a group that names it through a symlink
        # would not find it again (umount --group, a dead mount's clearing)
        for what, p in (("source", m.source), ("mountpoint", m.mountpoint)):
            if _real(p) != p:
                raise ValueError(f"member {m.name!r}: {what} {p} is a symlink or lies below one: "
                                 f"name the real directory {_real(p)}")
    mps: dict[Path, str] = {}
    for m in group.members:
        if m.mountpoint in mps:
            raise ValueError(f"members {mps[m.mountpoint]!r} and {m.name!r} have the same mountpoint "
                             f"{m.mountpoint}")
        mps[m.mountpoint] = m.name
        if m.mountpoint != m.source:
            why = _exists_dir(m.mountpoint)
            if why is not None:
                raise ValueError(f"member {m.name!r}: mountpoint {m.mountpoint} {why}")
    state = [("the group journal", group.journal)]
    for m in group.members:
        state += [(f"member {m.name!r}'s journal", m.journal), (f"member {m.name!r}'s shadow", m.shadow)]
    for what, p in state:
        rp = _real(p)
        for m in group.members:
            if _inside(rp, real[m.name]) or _inside(p, m.source):
                raise ValueError(f"{what} {p} must not be inside member {m.name!r}'s source {m.source}")
    seen: dict[Path, str] = {}
    for what, p in state[1:]:
        if p in seen:
            raise ValueError(f"{seen[p]} and {what} are the same directory {p}")
        seen[p] = what
    _check_across(group, real, state)
    longest = max([os.fspath(group.coordinator_socket)] +
                  [os.fspath(group.member_socket(m.name)) for m in group.members], key=len)
    if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
        raise ValueError(f"the group journal path {group.journal} is too long for its sockets "
                         f"({longest} exceeds {MAX_SOCKET_PATH} bytes)")


def _check_across(group: Group, real: dict[str, Path], state: list[tuple[str, Path]]) -> None:
    """How members lie relative to each other's directories.  Each member's daemon checks
    its own source, mountpoint, journal and shadow, but only when it mounts, after the
    members before it; these cross-member cases would otherwise mount a member over
    another's shadow, or one member inside another's mount (which then cannot be
    unmounted)."""
    rstate = [(what, p, _real(p)) for what, p in state]
    for m in group.members:
        for what, p, rp in rstate:
            if _inside(real[m.name], rp):
                raise ValueError(f"member {m.name!r}'s source {m.source} must not be inside {what} {p}")
    gj = rstate[0][2]
    for what_a, a, ra in rstate[1:]:
        if _inside(gj, ra):
            raise ValueError(f"the group journal {group.journal} must not be {what_a} {a} or lie inside it")
    for what_a, a, ra in rstate[1:]:
        for what_b, b, rb in rstate[1:]:
            if a != b and _inside(ra, rb):
                raise ValueError(f"{what_a} {a} must not be inside {what_b} {b}")
    mreal = {m.name: _real(m.mountpoint) for m in group.members}
    for m in group.members:
        mp = mreal[m.name]
        if m.mountpoint != m.source and _inside(mp, real[m.name]):
            raise ValueError(f"member {m.name!r}'s mountpoint {m.mountpoint} must not be inside its source "
                             f"{m.source} (mount over the source itself, or outside it)")
        for o in group.members:
            if o is m:
                continue
            if _inside(mp, real[o.name]):
                raise ValueError(f"member {m.name!r}'s mountpoint {m.mountpoint} must not be inside member "
                                 f"{o.name!r}'s source {o.source}")
            if _inside(mp, mreal[o.name]):
                raise ValueError(f"member {m.name!r}'s mountpoint {m.mountpoint} must not be inside member "
                                 f"{o.name!r}'s mountpoint {o.mountpoint}")
        for what, p, rp in rstate:
            if _inside(mp, rp):
                raise ValueError(f"member {m.name!r}'s mountpoint {m.mountpoint} must not be inside {what} {p}")


def _read_group_file(p: Path) -> bytes:
    """The group file's bytes: a regular file of at most MAX_GROUP_FILE bytes (a FIFO, a
    device such as /dev/zero or a huge file would block or exhaust memory)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise GroupFileError(f"group file {p} does not exist") from None
    except OSError as e:
        raise GroupFileError(f"group file {p}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise GroupFileError(f"group file {p} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise GroupFileError(f"group file {p} is not a regular file")
        too_big = f"group file {p} is larger than {MAX_GROUP_FILE >> 20} MiB: not a group file"
        if st.st_size > MAX_GROUP_FILE:
            raise GroupFileError(too_big)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_GROUP_FILE:
            chunk = os.read(fd, MAX_GROUP_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_GROUP_FILE:
            raise GroupFileError(too_big)
        return b"".join(chunks)
    except OSError as e:
        raise GroupFileError(f"group file {p}: {e.strerror}") from None
    finally:
        os.close(fd)


def load_group(path: str | os.PathLike[str], *, check: bool = True) -> Group:
    """Read, parse and check a group file; GroupFileError with one line on any problem."""
    p = Path(path)
    raw = _read_group_file(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GroupFileError(f"group file {p}: not UTF-8") from None
    try:
        group = parse_group(text, p)
        if check:
            check_group(group)
    except ValueError as e:
        msg = " ".join(str(e).split())       # one line, whatever tomllib said
        raise GroupFileError(f"group file {p}: {msg}") from None
    return group


def ensure_run_dir(group: Group) -> Path:
    """Create the group journal (private, as every journal: docs/reliability.md, "Users and
    permissions") and its 0700 socket directory; refuse a group journal that is a symlink,
    another user's, or below a directory another user can change.

    A group journal found loose (made by an older version, or by hand) may hold what
    another user put there while it was open: its entries and those of ``run/`` are
    made private as a journal's are (layout.tighten_entries): a symlink (the
    coordinator's log, the commit log, its pid file would be written through it) is
    refused, an entry of another user's is taken over (as root) or refused."""
    from . import layout
    try:
        layout.check_ancestors(group.journal, "group journal")
        layout.make_private_dirs(group.journal)
        layout.check_dir_stat(os.lstat(group.journal), group.journal, "group journal")
    except layout.LayoutError as e:
        raise GroupFileError(str(e)) from None
    if stat.S_IMODE(os.lstat(group.journal).st_mode) & 0o077:
        os.chmod(group.journal, 0o700)
    d = group.run_dir
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise GroupFileError(f"{d} is not a directory")
    if st.st_uid != os.geteuid():
        raise GroupFileError(f"the socket directory {d} belongs to uid {st.st_uid}, not to this user")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(d, 0o700)
    for attempt in range(3):        # (an entry may go meanwhile: a coordinator stopping)
        try:
            fd = layout.open_private_dir(group.journal, "group journal")
            try:
                layout.tighten_entries(fd, os.fspath(group.journal), recurse=frozenset({RUN_DIR}))
            finally:
                os.close(fd)
            break
        except layout.LayoutError as e:
            raise GroupFileError(str(e)) from None
        except FileNotFoundError:
            if attempt == 2:
                raise
    return d


# ------------------------------------------------------------ the commit log

def _line(rec: dict[str, Any]) -> bytes:
    body = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        rec = json.loads(body)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


@dataclass
class CommitLog:
    """The group commit log: read by everyone, appended by the coordinator only."""
    path: Path
    commits: list[dict[str, Any]] = field(default_factory=list)
    aborts: list[dict[str, Any]] = field(default_factory=list)
    _size: int = 0

    def refresh(self) -> None:
        """Read what was appended since the last call (a torn last line is left for later)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            if size < self._size:           # replaced: start over
                self.commits, self.aborts, self._size = [], [], 0
            if size == self._size:
                return
            data = os.pread(fd, size - self._size, self._size)
        finally:
            os.close(fd)
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            rec = _parse(data[pos:nl + 1])
            pos = nl + 1
            if rec is None:
                continue                    # a torn line from a crash: never committed
            if "commit" in rec:
                self.commits.append(rec)
            elif "abort" in rec:
                self.aborts.append(rec)
        self._size += pos

    @property
    def last_id(self) -> int:
        ids = [r["commit"] for r in self.commits] + [r["abort"] for r in self.aborts]
        return max(ids, default=0)

    @property
    def last_committed(self) -> int:
        return max((r["commit"] for r in self.commits), default=0)

    def commit_record(self, gid: int) -> dict[str, Any] | None:
        for r in self.commits:
            if r["commit"] == gid:
                return r
        return None

    def verdict(self, member: str, local: int) -> bool | None:
        """May ``member`` apply its own checkpoint ``local`` (a group checkpoint's batch)?

        True: a commit names it.  False: aborted — an abort names it, or a later
        batch of this member is committed (a batch is committed only in order,
        so an uncommitted earlier one never will be).  None: not decided yet."""
        latest = 0
        for r in self.commits:
            n = r["members"].get(member)
            if n == local:
                return True
            if isinstance(n, int):
                latest = max(latest, n)
        if local < latest:
            return False
        for r in self.aborts:
            if r.get("members", {}).get(member) == local:
                return False
        return None

    def append(self, rec: dict[str, Any], *, durable: bool) -> None:
        """Append one line (and ``fdatasync`` it if ``durable``).

        1. A file that does not end with a newline ends with a torn line (a crash
           in the middle of a write): the new line starts on a line of its own,
           else it would be read as part of the torn one and never count.
        2. Write the line in one ``write``; ``fdatasync`` it.
        3. On any failure (ENOSPC, a short write on a full disk, EIO) the file is
           cut back to its size before, so no fragment of a line the caller is told
           failed stays in front of the next one (nor reads as committed)."""
        new = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            data = _line(rec)
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.EIO, "short write to the group commit log (is its disk full?)")
                if durable:
                    os.fdatasync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)
        if new:
            from .sysc import fsync_dir
            fsync_dir(self.path.parent)
        self.refresh()


# ------------------------------------------------------------ the group's time machine

class GroupHistoryError(Exception):
    """A group checkpoint cannot be browsed, restored or pruned; the message is one line."""


@dataclass(frozen=True)
class GroupPoint:
    """A committed group checkpoint that every member still retains."""
    id: int
    label: str
    time_ns: int
    members: dict[str, int]          # member name -> that member's own checkpoint id


def points_from(group: Group, commits: CommitLog, have: dict[str, set[int]]) -> list[GroupPoint]:
    """The committed group checkpoints whose batch every member retains (``have``: each
    member's retained checkpoint ids), oldest first."""
    out = []
    for r in sorted(commits.commits, key=lambda r: int(r["commit"])):
        mem = r.get("members")
        if not isinstance(mem, dict):
            continue
        if all(type(mem.get(m.name)) is int and mem[m.name] in have.get(m.name, ()) for m in group.members):
            t = r.get("time_ns")
            out.append(GroupPoint(int(r["commit"]), str(r.get("label", "")), t if type(t) is int else 0,
                                  {m.name: int(mem[m.name]) for m in group.members}))
    return out


def member_retained(m: Member) -> set[int]:
    """The checkpoint ids the member's shadow retains (GroupHistoryError if it cannot be read)."""
    from .history import retained
    from .shadow import Shadow, ShadowError
    try:
        applied = Shadow(m.shadow).applied
        return {c.id for c in retained(m.shadow, applied)}
    except (ShadowError, OSError) as e:
        raise GroupHistoryError(f"member {m.name!r}: {e}") from None


def retained_points(group: Group) -> list[GroupPoint]:
    """:func:`points_from` with every member's shadow read now."""
    commits = CommitLog(group.commits_path)
    commits.refresh()
    return points_from(group, commits, {m.name: member_retained(m) for m in group.members})


def find_point(group: Group, gid: int) -> GroupPoint:
    """Group checkpoint ``gid`` if every member retains it; else why not, in one line."""
    commits = CommitLog(group.commits_path)
    commits.refresh()
    have = {m.name: member_retained(m) for m in group.members}
    for p in points_from(group, commits, have):
        if p.id == gid:
            return p
    points = points_from(group, commits, have)
    kept = (f"{points[0].id}..{points[-1].id}" if len(points) > 1 else f"{points[0].id}") if points else "none"
    rec = commits.commit_record(gid)
    if rec is None:
        why = ("was not committed (it failed)" if 0 < gid <= commits.last_id else
               f"does not exist (last is {commits.last_committed})")
        raise GroupHistoryError(f"group checkpoint {gid} {why}; retained by every member: {kept}")
    for m in group.members:
        local = rec.get("members", {}).get(m.name)
        if type(local) is not int:
            raise GroupHistoryError(f"group checkpoint {gid} has no batch of member {m.name!r}")
        if local not in have[m.name]:
            newest = max(have[m.name], default=0)
            why = ("not applied to its shadow yet: `fusejournal wait --group` first" if local > newest
                   else "not retained (pruned)")
            raise GroupHistoryError(f"group checkpoint {gid} is {why} on member {m.name!r} (its checkpoint "
                                    f"{local}); retained by every member: {kept}")
    raise GroupHistoryError(f"group checkpoint {gid} is not retained by every member; retained: {kept}")
