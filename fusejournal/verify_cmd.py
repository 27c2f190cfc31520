"""``fusejournal verify MOUNTPOINT``: check that the shadow holds what the original held.

1. Note the time T, then take a checkpoint N on the live mount (update
   permission, label ``verify``).
2. Wait until the shadow has applied N (``--timeout``), then hold it
   (``browsegate.holding``): the updater stays out while the comparison runs,
   so the shadow stands still at some M ≥ N.
3. Open the original tree *underneath* the mount: when the mount is in place,
   through the daemon's own fd of the source directory
   (``/proc/PID/fd/N``: the same user or root); otherwise the source path.
4. Compare the whole shadow with the original (the shadow verifier,
   ``verify.Verifier``: names, types, contents, sizes, modes, owners, symlink
   targets, devices, hard links, xattrs, mtimes, and the hidden links), and
   keep only the differences in objects **not modified since N**: an object
   whose ctime (in the original, now) is at or after T − 1 s (coarse-clock
   margin), or which is gone from the original, changed after the checkpoint,
   and so may rightly differ from the shadow; for a name missing or extra,
   its directory's ctime decides.  Everything else must be equal.
5. Print each difference as it is found (the verifier streams: memory does
   not follow the tree, see verify.py); exit 1 if there is any, 0 if none.

The applications may keep running: what they change after T is left out, at
the price of leaving it unchecked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import layout
from .browsegate import holding
from .errors import EXIT_DAMAGED, EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE, UserError
from .shadow import Shadow, ShadowError
from .verify import Verifier as _Verifier

_MARGIN_NS = 1_000_000_000      # ctimes come from a coarse clock: be generous


def _original_root(source: Path, mountpoint: Path, pid: int | None) -> int:
    """An fd of the original tree's root, beneath the mount (step 3)."""
    msrc = os.path.realpath(source)
    if os.path.realpath(mountpoint) != msrc:
        return os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if pid is None:
        raise UserError(f"cannot reach the original tree beneath the mount at {mountpoint} (no daemon pid)")
    mst = os.stat(mountpoint)
    fds = Path(f"/proc/{pid}/fd")
    try:
        entries = sorted(fds.iterdir(), key=lambda p: int(p.name))
    except OSError as e:
        raise UserError(f"cannot reach the original tree beneath the mount at {mountpoint}: {e}") from None
    for entry in entries:
        try:
            if os.readlink(entry) != msrc:
                continue
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        if os.fstat(fd).st_dev != mst.st_dev:
            return fd
        os.close(fd)
    raise UserError(f"cannot reach the original tree beneath the mount at {mountpoint}")


class ChangedSinceVerifier(_Verifier):
    """The shadow verifier, keeping only differences in objects unchanged since ``since_ns``."""

    def __init__(self, shadow: Shadow, source_fd: int, since_ns: int,
                 progress: Callable[[int], None] | None = None,
                 on_diff: Callable[[str], None] | None = None) -> None:
        super().__init__(shadow, source_fd, on_diff=on_diff, progress=progress)
        self.since_ns = since_ns - _MARGIN_NS
        self.left_out = 0

    def _fresh(self, path: bytes) -> bool:
        try:
            st = os.stat(path or b".", dir_fd=self.source_fd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return st.st_ctime_ns >= self.since_ns

    def diff(self, path: bytes, what: str) -> None:
        parent = path.rpartition(b"/")[0]
        if "missing in the shadow" in what or "extra in the shadow" in what:
            fresh = self._fresh(parent)          # a name: its directory decides
        else:
            fresh = self._fresh(path) or (what.startswith("hard links differ") and self._fresh(parent))
        if fresh:
            self.left_out += 1
            return
        super().diff(path, what)

    def stale_link(self, name: str) -> None:
        if self.left_out:
            # a file removed from the original since the checkpoint still has its hidden link
            self.left_out += 1
            return
        super().stale_link(name)


class _Output:
    """Differences to stdout as they are found; on a terminal, a progress line on stderr,
    cleared before each difference."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.last = 0.0
        self.shown = False

    def progress(self, dirs: int) -> None:
        now = time.monotonic()
        if self.tty and now - self.last >= 0.2:
            self.last = now
            self.shown = True
            print(f"\rverifying: {dirs} directories compared", end="", file=sys.stderr, flush=True)

    def diff(self, line: str) -> None:
        if self.shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
            self.shown = False
        print(line, flush=self.tty)

    def end(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def cmd_verify(a: argparse.Namespace) -> int:
    from .cli import Target
    mp = Path(os.path.abspath(a.mountpoint))
    t = Target(a.mountpoint)
    if t.mountpoint is None or os.path.realpath(t.mountpoint) != os.path.realpath(mp):
        raise UserError(f"{a.mountpoint} is not a journaled fusejournal mount", EXIT_USAGE)
    st = json.loads(os.getxattr(mp, layout.XATTR_STATUS))
    since = time.time_ns()
    try:
        os.setxattr(mp, layout.XATTR_UPDATE_PERMISSION, b"verify")
    except OSError as e:
        raise UserError(f"the checkpoint failed: {e.strerror}", EXIT_FAILED) from None
    n = int(os.getxattr(mp, layout.XATTR_CHECKPOINT))
    shadow = Shadow(t.shadow)
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    tty = sys.stderr.isatty()
    while True:
        try:
            applied = shadow.applied
        except ShadowError as e:
            raise UserError(str(e)) from None
        if applied >= n:
            break
        cur = json.loads(os.getxattr(mp, layout.XATTR_STATUS))
        if cur.get("updater_error"):
            raise UserError(f"the updater is stopped: {cur['updater_error']}", EXIT_DAMAGED)
        if deadline is not None and time.monotonic() > deadline:
            raise UserError(f"timed out waiting for the shadow to apply checkpoint {n}", EXIT_TIMEOUT)
        time.sleep(0.05)
    if tty:
        print(f"checkpoint {n} applied; comparing the shadow with the original ...", file=sys.stderr)
    src = _original_root(Path(t.meta["source"]["path"]), mp, st.get("pid"))
    out = _Output(tty)
    try:
        with holding(t.shadow):
            v = ChangedSinceVerifier(shadow, src, since, out.progress, out.diff)
            v.run()
    finally:
        os.close(src)
        out.end()
    note = f" ({v.left_out} in objects changed since the checkpoint, left out)" if v.left_out else ""
    if v.count:
        print(f"fusejournal: checkpoint {n}: {v.count} difference(s) between the shadow and the "
              f"original{note}", file=sys.stderr)
        return 1
    print(f"verified checkpoint {n}: the shadow equals the original{note}")
    return 0
