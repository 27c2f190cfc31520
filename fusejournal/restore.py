"""``fusejournal restore``: a byte-exact copy of the shadow's checkpoint into a directory.

``restore MOUNTPOINT|JOURNAL [--path SUBPATH] [--checkpoint N] [--force] DEST``:

1. Find the shadow (MOUNTPOINT|JOURNAL as everywhere) and check DEST: not
   inside the shadow, the journal, the live mount or the source; absent or empty unless
   ``--force``.
2. Pin the shadow's history (``browsegate.StepReader``): no checkpoint is
   pruned while the restore runs; the updater is *not* held up.
3. Checkpoint K (``--checkpoint``, default the latest applied) must be
   applied and retained; it is read through ``history_view.TreeAt`` (the
   mirror and the reverse batches), whose contents at K never change: every
   access is one *step* under the browse gate (a listing, an entry, 1 MiB of
   a file), between which the updater may apply checkpoints; after it moved,
   the view is opened again and reads K as before.  So the copy is exactly
   checkpoint K, and the updater waits at most one step.  A half-applied
   shadow (a staging cursor: its updater stopped) is refused.
4. Resolve SUBPATH at K one component at a time (``..`` and symlinks on the
   way are refused: nothing outside the tree is read).
5. Walk the subtree depth-first with one open directory per level (the
   top 16 levels; a deeper parent is opened again by '..' when its child is done; memory
   bounded by depth, plus one entry per multiply-linked file for its hard
   links), copying names, types, contents with holes, modes, owners, symlink
   targets, device numbers, hard links, xattrs and mtimes; a directory's mode,
   xattrs and mtime are set after its contents.  With ``--force`` DEST is made
   equal: names not in the checkpoint are removed, an existing regular file
   with the same size, mtime, mode and owner is kept (so an interrupted
   restore is rerun cheaply), anything else is replaced.
6. Progress on stderr when it is a terminal.

A directory SUBPATH (or none: the whole tree) becomes DEST itself; a
non-directory SUBPATH is copied to ``DEST/NAME``.  Interrupted, DEST holds a
partial copy (files not yet given their mtime); rerun with ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .browsegate import StepReader
from .errors import EXIT_USAGE, UserError
from .faults import fault
from .history_view import HistoryError, Node, NotRetained, Stat, TreeAt
from .shadow import Shadow, ShadowError
from .treewalk import O_DIR as _O_DIR
from .treewalk import O_PATH as _O_PATH
from .treewalk import copy_range, write_xattrs

_CURSOR = "cursor"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _real(path: Path) -> Path:
    """realpath of ``path``, whose tail may not exist yet."""
    return Path(os.path.realpath(path))


class Source:
    """Checkpoint K as ViewRestorer reads it: a history_view.TreeAt opened again whenever the
    shadow moved (between steps, under a StepReader), and the objects found again by their
    path at K.  Without a reader (tests), the view is fixed."""

    def __init__(self, shadow_root: Path, k: int, reader: StepReader | None) -> None:
        self.root = shadow_root
        self.k = k
        self.reader = reader
        self.view: TreeAt | None = None
        self.gen = 0

    def _open(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None
        try:
            self.view = TreeAt(self.root, self.k)
        except NotRetained as e:
            raise UserError(str(e), EXIT_USAGE) from None
        except HistoryError as e:
            raise UserError(f"checkpoint {self.k} cannot be read: {e}") from None
        self.gen += 1

    @contextlib.contextmanager
    def step(self) -> Iterator[TreeAt]:
        fault("restore.step")           # between two steps: nothing is held here
        if self.reader is None:
            if self.view is None:
                self._open()
            assert self.view is not None
            yield self.view
            return
        try:
            with self.reader.step() as moved:
                if moved or self.view is None:
                    self._open()
                assert self.view is not None
                yield self.view
        except OSError as e:
            if e.errno == errno.EIO and "half-way" in str(e):
                raise UserError(f"{e.strerror}: mount the journal again so that it finishes, then "
                                f"restore (--force reruns cheaply)") from None
            raise

    def node(self, ref: _Ref) -> Node:
        """``ref``'s node in the current view (looked up again by its path after a move)."""
        if ref.gen == self.gen:
            return ref.node
        assert self.view is not None
        n = self.view.resolve(ref.kpath)
        if n is None or n.sino != ref.node.sino:
            raise OSError(errno.ESTALE, f"{ref.kpath!r} of checkpoint {self.k} is not found again")
        ref.node, ref.gen = n, self.gen
        return n

    def close(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None


@dataclass
class _Ref:
    node: Node
    kpath: bytes        # its path at checkpoint K
    gen: int


class ViewRestorer:
    """Copies one subtree of a checkpoint into DEST through a :class:`Source` (step 5).

    Names, types, contents (data extents only: holes stay holes; unchanged files by
    ``copy_file_range`` from the mirror), modes, owners, symlinks, devices, hard links
    (by object), xattrs, mtimes; a directory's mode, xattrs and mtime after its
    contents.  With ``--force`` DEST is made equal: names not in the checkpoint are
    removed, a regular file with the same size, mtime, mode and owner is kept (a rerun
    is cheap), anything else replaced.  Every access is one step of the source: the
    updater waits at most for one directory listing or 1 MiB of a file.
    """

    def __init__(self, src: Source, force: bool, progress: Callable[[int, int], None] | None = None) -> None:
        self.src = src
        self.force = force
        self.progress = progress
        self.entries = 0
        self.bytes = 0
        self.owner_skipped = 0
        self.links: dict[int, bytes] = {}     # sino -> DEST-relative path of its first name
        self.dest_root = -1
        self.is_root = os.geteuid() == 0

    def _tick(self) -> None:
        self.entries += 1
        if self.progress is not None:
            self.progress(self.entries, self.bytes)

    def _chown(self, fd_or_name: int | bytes, uid: int, gid: int, dir_fd: int | None = None) -> None:
        try:
            if isinstance(fd_or_name, int):
                os.fchown(fd_or_name, uid, gid)
            else:
                os.chown(fd_or_name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        except PermissionError:
            if self.is_root:
                raise
            self.owner_skipped += 1

    def run(self, ref: _Ref, name: bytes | None, dest: Path) -> None:
        dest.mkdir(mode=0o700, exist_ok=True)
        self.dest_root = os.open(dest, _O_DIR)
        try:
            if ref.node.kind == stat.S_IFDIR:
                self._copy_tree(ref, os.open(".", _O_DIR, dir_fd=self.dest_root))
            else:
                assert name is not None
                if self.force:
                    for n in os.listdir(self.dest_root):
                        if os.fsencode(n) != name:
                            _remove(self.dest_root, os.fsencode(n))
                self._copy_entry(ref, self.dest_root, name, name)
        finally:
            os.close(self.dest_root)

    def _children(self, ref: _Ref) -> list[tuple[bytes, _Ref]]:
        with self.src.step() as v:
            node = self.src.node(ref)
            return [(name, _Ref(n, ref.kpath + b"/" + name if ref.kpath else name, self.src.gen))
                    for name, n in v.listdir(node)]

    def _copy_tree(self, ref: _Ref, dst: int) -> None:
        kids = self._children(ref)
        stack: list[tuple[_Ref, int, Iterator[tuple[bytes, _Ref]], bytes]] = [(ref, dst, iter(kids), b"")]
        if self.force:
            self._sync_names(kids, dst)
        try:
            while stack:
                r, d, it, p = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    stack.pop()
                    try:
                        if stack and stack[-1][1] < 0:          # a deep parent: found again by '..'
                            pr, _, pit, pp = stack[-1]
                            stack[-1] = (pr, os.open("..", _O_DIR, dir_fd=d), pit, pp)
                        self._finish_dir(r, d)
                    finally:
                        os.close(d)
                    continue
                name, child = nxt
                sub = self._copy_entry(child, d, name, p + b"/" + name if p else name)
                if sub is not None:
                    if len(stack) >= _OPEN_LEVELS:     # fds bounded, not one per level of a deep tree
                        os.close(d)
                        stack[-1] = (r, -1, it, p)
                    stack.append(sub)
        finally:
            for _, d, _, _ in stack:
                if d >= 0:
                    os.close(d)

    @staticmethod
    def _sync_names(kids: list[tuple[bytes, _Ref]], dst: int) -> None:
        keep = {name for name, _ in kids}
        for n in os.listdir(dst):
            if os.fsencode(n) not in keep:
                _remove(dst, os.fsencode(n))

    def _about(self, ref: _Ref) -> tuple[Stat, dict[str, bytes], bytes | None]:
        with self.src.step() as v:
            node = self.src.node(ref)
            st = v.stat(node)
            xattrs = {os.fsdecode(k): val for k, val in v.xattrs(node).items()}
            target = v.readlink(node) if stat.S_ISLNK(st.mode) else None
            return st, xattrs, target

    def _finish_dir(self, ref: _Ref, dst: int) -> None:
        st, xattrs, _ = self._about(ref)
        self._chown(dst, st.uid, st.gid)
        os.fchmod(dst, stat.S_IMODE(st.mode))
        write_xattrs(dst, False, xattrs)
        os.utime(dst, ns=(st.atime_ns, st.mtime_ns))

    def _copy_entry(self, ref: _Ref, dst: int, name: bytes,
                    rel: bytes) -> tuple[_Ref, int, Iterator[tuple[bytes, _Ref]], bytes] | None:
        st, xattrs, target = self._about(ref)
        mode = st.mode
        try:
            have: os.stat_result | None = os.stat(name, dir_fd=dst, follow_symlinks=False)
        except FileNotFoundError:
            have = None
        if stat.S_ISDIR(mode):
            if have is not None and not stat.S_ISDIR(have.st_mode):
                _remove(dst, name)
                have = None
            if have is None:
                os.mkdir(name, 0o700, dir_fd=dst)
            d = os.open(name, _O_DIR, dir_fd=dst)
            try:
                if have is not None:
                    os.fchmod(d, 0o700)        # writable while it is filled (mode set at the end)
                kids = self._children(ref)
                if have is not None and self.force:
                    self._sync_names(kids, d)
            except BaseException:
                os.close(d)
                raise
            self._tick()
            return ref, d, iter(kids), rel
        linked = st.nlink > 1
        first = self.links.get(ref.node.sino) if linked else None
        if have is not None:
            if (first is None and not linked and stat.S_ISREG(mode) and stat.S_ISREG(have.st_mode)
                    and have.st_nlink == 1 and have.st_size == st.size and have.st_mtime_ns == st.mtime_ns
                    and stat.S_IMODE(have.st_mode) == stat.S_IMODE(mode)
                    and (have.st_uid, have.st_gid) == (st.uid, st.gid)):
                self._tick()             # copied completely by an earlier run
                return None
            _remove(dst, name)
        if first is not None:
            os.link(first, name, src_dir_fd=self.dest_root, dst_dir_fd=dst, follow_symlinks=False)
            self._tick()
            return None
        if stat.S_ISREG(mode):
            self._copy_file(ref, st, xattrs, dst, name)
        elif stat.S_ISLNK(mode):
            assert target is not None
            os.symlink(target, name, dir_fd=dst)
            self._chown(name, st.uid, st.gid, dir_fd=dst)
            os.utime(name, ns=(st.atime_ns, st.mtime_ns), dir_fd=dst, follow_symlinks=False)
        else:
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.rdev, dir_fd=dst)
            self._chown(name, st.uid, st.gid, dir_fd=dst)
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dst)
            if xattrs:
                f = os.open(name, _O_PATH, dir_fd=dst)
                try:
                    write_xattrs(f, True, xattrs)
                finally:
                    os.close(f)
            os.utime(name, ns=(st.atime_ns, st.mtime_ns), dir_fd=dst, follow_symlinks=False)
        if linked:
            self.links[ref.node.sino] = rel
        self._tick()
        return None

    def _copy_file(self, ref: _Ref, st: Stat, xattrs: dict[str, bytes], dst: int, name: bytes) -> None:
        d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600, dir_fd=dst)
        try:
            with self.src.step() as v:
                extents = v.data_map(self.src.node(ref), st.size)
            for a, b in extents:
                p = a
                while p < b:                 # one step per MiB: the updater waits at most that
                    n = min(b - p, _STEP_BYTES)
                    with self.src.step() as v:
                        node = self.src.node(ref)
                        fd = v.open(node, os.O_RDONLY)
                        try:
                            if v.unchanged(node):
                                copy_range(fd, d, p, p + n)
                            else:
                                os.pwrite(d, v.read(node, p, n, fd), p)
                        finally:
                            os.close(fd)
                    p += n
            os.ftruncate(d, st.size)
            self.bytes += st.size
            self._chown(d, st.uid, st.gid)
            os.fchmod(d, stat.S_IMODE(st.mode))
            write_xattrs(d, False, xattrs)
            os.utime(d, ns=(st.atime_ns, st.mtime_ns))     # last: marks it complete
        finally:
            os.close(d)


_STEP_BYTES = 1 << 20
_OPEN_LEVELS = 16               # directories of DEST kept open on the way down; deeper ones by '..'


def _remove(dst: int, name: bytes) -> None:
    st = os.stat(name, dir_fd=dst, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(os.fsdecode(name), dir_fd=dst)
    else:
        os.unlink(name, dir_fd=dst)


def resolve_view_subpath(view: TreeAt, subpath: str) -> tuple[Node, bytes | None]:
    """(node, its name; None for the root) of SUBPATH at the view's checkpoint; ``..`` and
    symlinks on the way are refused."""
    parts = [p for p in os.fsencode(subpath).split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise UserError(f"--path {subpath!r}: '..' is not allowed (the path must stay inside the tree)",
                        EXIT_USAGE)
    node: Node | None = view.root
    for i, part in enumerate(parts):
        assert node is not None
        if node.kind != stat.S_IFDIR:
            where = b"/".join(parts[:i]).decode("utf-8", "backslashreplace")
            raise UserError(f"--path {subpath!r}: {where} is not a directory (a symlink is never "
                            f"followed)", EXIT_USAGE)
        node = view.lookup(node, part)
        if node is None:
            raise UserError(f"--path {subpath!r} does not exist in checkpoint {view.k}", EXIT_USAGE)
    assert node is not None
    return node, parts[-1] if parts else None


def check_dest(dest: Path, forbidden: list[tuple[Path, str]], force: bool) -> None:
    real = _real(dest)
    for root, what in forbidden:
        if _inside(real, _real(root)):
            raise UserError(f"DEST {dest} is inside the {what} {root}: choose a directory outside it",
                            EXIT_USAGE)
    if os.path.lexists(dest):
        if os.path.islink(dest) or not dest.is_dir():
            raise UserError(f"DEST {dest} exists and is not a directory", EXIT_USAGE)
        if os.listdir(dest) and not force:
            raise UserError(f"DEST {dest} is not empty (--force makes it equal to the checkpoint, "
                            f"removing what the checkpoint does not hold)", EXIT_USAGE)
    elif not dest.parent.is_dir():
        raise UserError(f"the parent of DEST {dest} does not exist", EXIT_USAGE)


def restore(shadow_root: Path, dest: Path, *, subpath: str | None, checkpoint: int | None, force: bool,
            forbidden: list[tuple[Path, str]], progress: Callable[[int, int], None] | None = None
            ) -> tuple[int, ViewRestorer]:
    """Steps 1-5 of the module docstring; returns (checkpoint restored, the restorer)."""
    shadow = Shadow(shadow_root)
    check_dest(dest, forbidden + [(shadow_root, "shadow")], force)
    reader = StepReader(shadow_root)
    src: Source | None = None
    try:
        reader.pin()                    # no prune while we read (the updater goes on)
        with reader.step():
            try:
                applied = shadow.applied
            except ShadowError as e:
                raise UserError(str(e)) from None
            k = applied if checkpoint is None else checkpoint
            if k > applied:
                raise UserError(f"checkpoint {k} is not applied to the shadow yet (it stands at "
                                f"{applied}): run `fusejournal wait --checkpoint {k}` first", EXIT_USAGE)
        src = Source(shadow_root, k, reader)
        with src.step() as v:
            node, name = resolve_view_subpath(v, subpath or "")
            kpath = b"/".join(p for p in os.fsencode(subpath or "").split(b"/") if p not in (b"", b"."))
            ref = _Ref(node, kpath, src.gen)
        r = ViewRestorer(src, force, progress)
        r.run(ref, name, dest)
    except OSError as e:
        if e.errno == errno.EIO and "half-way" in str(e):
            raise UserError(f"{e.strerror}: mount the journal again so that it finishes, then "
                            f"restore") from None
        raise
    finally:
        if src is not None:
            src.close()
        reader.close()
    return k, r


def cmd_restore(a: argparse.Namespace) -> int:
    from .cli import Target
    t = Target(a.target)
    dest = Path(os.path.abspath(a.dest))
    forbidden = [(t.journal, "journal")]
    if t.mountpoint is not None:
        forbidden.append((Path(os.path.abspath(t.mountpoint)), "mount"))
    # the original underneath: a copy written there bypasses the journal (the shadow would differ)
    forbidden.append((Path(t.meta["source"]["path"]), "source"))
    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(n: int, size: int) -> None:
        now = time.monotonic()
        if tty and now - last[0] >= 0.2:
            last[0] = now
            print(f"\rrestoring: {n} entries, {size / 2**20:.1f} MiB", end="", file=sys.stderr, flush=True)

    try:
        n, r = restore(t.shadow, dest, subpath=a.path, checkpoint=a.checkpoint, force=a.force,
                       forbidden=forbidden, progress=progress)
    finally:
        if tty and last[0]:
            print(file=sys.stderr)
    if r.owner_skipped:
        print(f"fusejournal: warning: {r.owner_skipped} owner(s) not restored (not running as root)",
              file=sys.stderr)
    what = f"{a.path} of " if a.path else ""
    print(f"restored {what}checkpoint {n} into {dest}: {r.entries} entries, {r.bytes} bytes")
    return 0
