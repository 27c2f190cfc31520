"""``fusejournal restore``: a byte-exact copy of the shadow's checkpoint into a directory.

``restore MOUNTPOINT|JOURNAL [--path SUBPATH] [--checkpoint N] [--force] DEST``:

1. Find the shadow (MOUNTPOINT|JOURNAL as everywhere) and check DEST: not
   inside the shadow, the journal or the live mount; absent or empty unless
   ``--force``.
2. Hold the shadow (``browsegate.holding``): wait for a batch being applied to
   finish, then keep the updater out until the copy is done, so the copy is
   one checkpoint.  Browse mounts keep working; checkpoints keep being made
   durable in the ordered log; the shadow catches up afterwards.
3. Refuse a half-applied shadow (a staging cursor) and a ``--checkpoint``
   not applied yet; an older ``--checkpoint`` must be retained, and is read
   through the reverse batches (:class:`ViewRestorer`, history_view.py).
4. Resolve SUBPATH one component at a time with ``O_NOFOLLOW`` (``..`` and
   symlinks on the way are refused: nothing outside the tree is read).
5. Walk the subtree depth-first with one open directory per level (memory
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
import errno
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import layout
from .browsegate import holding
from .errors import EXIT_USAGE, UserError
from .history_view import HistoryError, Node, NotRetained, TreeAt
from .shadow import Shadow, ShadowError
from .treewalk import O_DIR as _O_DIR
from .treewalk import O_PATH as _O_PATH
from .treewalk import O_READ as _O_READ
from .treewalk import copy_data, copy_path_xattrs, read_xattrs, write_xattrs

_CURSOR = "cursor"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _real(path: Path) -> Path:
    """realpath of ``path``, whose tail may not exist yet."""
    return Path(os.path.realpath(path))


def resolve_subpath(tree_fd: int, subpath: str) -> tuple[int, bytes | None]:
    """(fd of the directory holding the object, its name) for SUBPATH in the tree; name None
    for the tree root (fd is then the root's).  Refuses ``..`` and symlinks on the way."""
    parts = [p for p in os.fsencode(subpath).split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise UserError(f"--path {subpath!r}: '..' is not allowed (the path must stay inside the tree)",
                        EXIT_USAGE)
    fd = os.open(".", _O_DIR, dir_fd=tree_fd)
    if not parts:
        return fd, None
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nfd = os.open(part, _O_DIR, dir_fd=fd)
            except OSError as e:
                where = b"/".join(parts[:i + 1]).decode("utf-8", "backslashreplace")
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UserError(f"--path {subpath!r}: {where} is not a directory (a symlink is "
                                    f"never followed)", EXIT_USAGE) from None
                if e.errno == errno.ENOENT:
                    raise UserError(f"--path {subpath!r}: {where} does not exist in the checkpoint",
                                    EXIT_USAGE) from None
                raise
            os.close(fd)
            fd = nfd
        try:
            os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            raise UserError(f"--path {subpath!r} does not exist in the checkpoint", EXIT_USAGE) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


class Restorer:
    """Copies one subtree of the shadow into DEST (steps 5 of the module docstring)."""

    def __init__(self, force: bool, progress: Callable[[int, int], None] | None = None) -> None:
        self.force = force
        self.progress = progress
        self.entries = 0
        self.bytes = 0
        self.owner_skipped = 0
        self.links: dict[int, bytes] = {}     # shadow st_ino -> DEST-relative path of its first name
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

    def run(self, src_parent: int, name: bytes | None, dest: Path) -> None:
        dest.mkdir(mode=0o700, exist_ok=True)
        self.dest_root = os.open(dest, _O_DIR)
        try:
            if name is None:
                src = os.open(".", _O_DIR, dir_fd=src_parent)
                self._copy_tree(src, os.open(".", _O_DIR, dir_fd=self.dest_root), b"")
            else:
                st = os.stat(name, dir_fd=src_parent, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    src = os.open(name, _O_DIR, dir_fd=src_parent)
                    self._copy_tree(src, os.open(".", _O_DIR, dir_fd=self.dest_root), b"")
                else:
                    self._sync_names(src_parent, self.dest_root, {name})
                    self._copy_entry(src_parent, self.dest_root, name, name)
        finally:
            os.close(self.dest_root)

    def _sync_names(self, src: int, dst: int, keep: set[bytes] | None = None) -> None:
        """With --force: remove from ``dst`` every name not in ``src`` (or not in ``keep``)."""
        names = keep if keep is not None else {os.fsencode(n) for n in os.listdir(src)}
        for n in os.listdir(dst):
            b = os.fsencode(n)
            if b not in names:
                self._remove(dst, b)

    @staticmethod
    def _remove(dst: int, name: bytes) -> None:
        st = os.stat(name, dir_fd=dst, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(os.fsdecode(name), dir_fd=dst)
        else:
            os.unlink(name, dir_fd=dst)

    def _copy_tree(self, src: int, dst: int, path: bytes) -> None:
        # (src dir fd, dst dir fd, remaining names, DEST-relative path)
        stack = [(src, dst, iter(sorted(os.fsencode(n) for n in os.listdir(src))), path)]
        if self.force:
            self._sync_names(src, dst)
        try:
            while stack:
                s, d, names, p = stack[-1]
                name = next(names, None)
                if name is None:
                    stack.pop()
                    try:
                        self._finish_dir(s, d)
                    finally:
                        os.close(s)
                        os.close(d)
                    continue
                sub = self._copy_entry(s, d, name, p + b"/" + name if p else name)
                if sub is not None:
                    stack.append(sub)
        finally:
            for s, d, _, _ in stack:
                os.close(s)
                os.close(d)

    def _finish_dir(self, src: int, dst: int) -> None:
        st = os.fstat(src)
        self._chown(dst, st.st_uid, st.st_gid)
        os.fchmod(dst, stat.S_IMODE(st.st_mode))
        write_xattrs(dst, False, read_xattrs(src, False))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _existing(self, dst: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dst, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _copy_entry(self, src: int, dst: int, name: bytes,
                    rel: bytes) -> tuple[int, int, Iterator[bytes], bytes] | None:
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        mode = st.st_mode
        have = self._existing(dst, name)
        if stat.S_ISDIR(mode):
            if have is not None and not stat.S_ISDIR(have.st_mode):
                self._remove(dst, name)
                have = None
            if have is None:
                os.mkdir(name, 0o700, dir_fd=dst)
            s = os.open(name, _O_DIR, dir_fd=src)
            try:
                d = os.open(name, _O_DIR, dir_fd=dst)
            except BaseException:
                os.close(s)
                raise
            if have is not None:
                os.fchmod(d, 0o700)        # writable while it is filled (mode set at the end)
                if self.force:
                    self._sync_names(s, d)
            self._tick()
            return s, d, iter(sorted(os.fsencode(n) for n in os.listdir(s))), rel
        # the shadow holds one hidden link per non-directory: more than 2 means hard links
        linked = st.st_nlink > 2
        first = self.links.get(st.st_ino) if linked else None
        if have is not None:
            if (first is None and stat.S_ISREG(mode) and stat.S_ISREG(have.st_mode) and have.st_nlink == 1
                    and not linked and have.st_size == st.st_size and have.st_mtime_ns == st.st_mtime_ns
                    and stat.S_IMODE(have.st_mode) == stat.S_IMODE(mode)
                    and (have.st_uid, have.st_gid) == (st.st_uid, st.st_gid)):
                self._tick()             # copied completely by an earlier run
                return None
            self._remove(dst, name)
        if first is not None:
            os.link(first, name, src_dir_fd=self.dest_root, dst_dir_fd=dst, follow_symlinks=False)
            self._tick()
            return None
        if stat.S_ISREG(mode):
            self._copy_file(src, dst, name)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            self._chown(name, st.st_uid, st.st_gid, dir_fd=dst)
            copy_path_xattrs(src, dst, name)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)
        else:                        # fifo, socket, device
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst)
            self._chown(name, st.st_uid, st.st_gid, dir_fd=dst)
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dst)
            copy_path_xattrs(src, dst, name)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)
        if linked:
            self.links[st.st_ino] = rel
        self._tick()
        return None

    def _copy_file(self, src: int, dst: int, name: bytes) -> None:
        s = os.open(name, _O_READ, dir_fd=src)
        try:
            st = os.fstat(s)
            d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600, dir_fd=dst)
            try:
                copy_data(s, d, st.st_size)
                self.bytes += st.st_size
                self._chown(d, st.st_uid, st.st_gid)
                os.fchmod(d, stat.S_IMODE(st.st_mode))
                write_xattrs(d, False, read_xattrs(s, False))
                os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))     # last: marks it complete
            finally:
                os.close(d)
        finally:
            os.close(s)



class ViewRestorer:
    """Copies one subtree of a retained checkpoint (history_view.TreeAt) into DEST.

    Same order and rules as :class:`Restorer` (a directory's mode, xattrs and
    mtime after its contents; ``--force`` removes what the checkpoint does not
    hold and rewrites the rest); contents are read through the view in 1 MiB
    pieces, only the checkpoint's data extents (holes stay holes).
    """

    def __init__(self, view: TreeAt, force: bool, progress: Callable[[int, int], None] | None = None) -> None:
        self.view = view
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

    def run(self, node: Node, name: bytes | None, dest: Path) -> None:
        dest.mkdir(mode=0o700, exist_ok=True)
        self.dest_root = os.open(dest, _O_DIR)
        try:
            if node.kind == stat.S_IFDIR:
                self._copy_tree(node, os.open(".", _O_DIR, dir_fd=self.dest_root))
            else:
                assert name is not None
                if self.force:
                    for n in os.listdir(self.dest_root):
                        if os.fsencode(n) != name:
                            Restorer._remove(self.dest_root, os.fsencode(n))
                self._copy_entry(node, self.dest_root, name, name)
        finally:
            os.close(self.dest_root)

    def _copy_tree(self, node: Node, dst: int) -> None:
        stack: list[tuple[Node, int, Iterator[tuple[bytes, Node]], bytes]] = [
            (node, dst, iter(list(self.view.listdir(node))), b"")]
        if self.force:
            self._sync_names(node, dst)
        try:
            while stack:
                n, d, it, p = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    stack.pop()
                    try:
                        self._finish_dir(n, d)
                    finally:
                        os.close(d)
                    continue
                name, child = nxt
                sub = self._copy_entry(child, d, name, p + b"/" + name if p else name)
                if sub is not None:
                    stack.append(sub)
        finally:
            for _, d, _, _ in stack:
                os.close(d)

    def _sync_names(self, node: Node, dst: int) -> None:
        keep = set(self.view.names(node))
        for n in os.listdir(dst):
            if os.fsencode(n) not in keep:
                Restorer._remove(dst, os.fsencode(n))

    def _finish_dir(self, node: Node, dst: int) -> None:
        st = self.view.stat(node)
        self._chown(dst, st.uid, st.gid)
        os.fchmod(dst, stat.S_IMODE(st.mode))
        write_xattrs(dst, False, {os.fsdecode(k): v for k, v in self.view.xattrs(node).items()})
        os.utime(dst, ns=(st.atime_ns, st.mtime_ns))

    def _copy_entry(self, node: Node, dst: int, name: bytes,
                    rel: bytes) -> tuple[Node, int, Iterator[tuple[bytes, Node]], bytes] | None:
        st = self.view.stat(node)
        mode = st.mode
        try:
            have: os.stat_result | None = os.stat(name, dir_fd=dst, follow_symlinks=False)
        except FileNotFoundError:
            have = None
        if stat.S_ISDIR(mode):
            if have is not None and not stat.S_ISDIR(have.st_mode):
                Restorer._remove(dst, name)
                have = None
            if have is None:
                os.mkdir(name, 0o700, dir_fd=dst)
            d = os.open(name, _O_DIR, dir_fd=dst)
            if have is not None:
                os.fchmod(d, 0o700)
                if self.force:
                    self._sync_names(node, d)
            self._tick()
            return node, d, iter(list(self.view.listdir(node))), rel
        if have is not None:
            Restorer._remove(dst, name)
        first = self.links.get(node.sino) if st.nlink > 1 else None
        if first is not None:
            os.link(first, name, src_dir_fd=self.dest_root, dst_dir_fd=dst, follow_symlinks=False)
            self._tick()
            return None
        xattrs = {os.fsdecode(k): v for k, v in self.view.xattrs(node).items()}
        if stat.S_ISREG(mode):
            d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600, dir_fd=dst)
            try:
                src = self.view.open(node, os.O_RDONLY)
                try:
                    for a, b in self.view.data_map(node, st.size):
                        p = a
                        while p < b:
                            buf = self.view.read(node, p, min(b - p, 1 << 20), src)
                            if not buf:
                                break
                            os.pwrite(d, buf, p)
                            p += len(buf)
                finally:
                    os.close(src)
                os.ftruncate(d, st.size)
                self.bytes += st.size
                self._chown(d, st.uid, st.gid)
                os.fchmod(d, stat.S_IMODE(mode))
                write_xattrs(d, False, xattrs)
                os.utime(d, ns=(st.atime_ns, st.mtime_ns))
            finally:
                os.close(d)
        elif stat.S_ISLNK(mode):
            os.symlink(self.view.readlink(node), name, dir_fd=dst)
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
        if st.nlink > 1:
            self.links[node.sino] = rel
        self._tick()
        return None


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
            ) -> tuple[int, Restorer | ViewRestorer]:
    """Steps 1-5 of the module docstring; returns (checkpoint restored, the Restorer)."""
    shadow = Shadow(shadow_root)
    check_dest(dest, forbidden + [(shadow_root, "shadow")], force)
    with holding(shadow_root):
        try:
            applied = shadow.applied
        except ShadowError as e:
            raise UserError(str(e)) from None
        if os.path.lexists(shadow.staging / _CURSOR):
            raise UserError(f"the shadow {shadow_root} is half-way through a batch (its updater is "
                            f"stopped): mount the journal again so that it finishes, then restore")
        if checkpoint is not None and checkpoint != applied:
            if checkpoint < applied:
                return checkpoint, _restore_retained(shadow_root, checkpoint, dest, subpath, force, progress)
            raise UserError(f"checkpoint {checkpoint} is not applied to the shadow yet (it stands at "
                            f"{applied}): run `fusejournal wait --checkpoint {checkpoint}` first",
                            EXIT_USAGE)
        tree_fd = shadow.open_sub(layout.SHADOW_TREE)
        try:
            parent, name = resolve_subpath(tree_fd, subpath or "")
        finally:
            os.close(tree_fd)
        try:
            r = Restorer(force, progress)
            r.run(parent, name, dest)
        finally:
            os.close(parent)
    return applied, r


def _restore_retained(shadow_root: Path, checkpoint: int, dest: Path, subpath: str | None, force: bool,
                      progress: Callable[[int, int], None] | None) -> ViewRestorer:
    """Restore an older checkpoint through the reverse batches (history_view.py)."""
    try:
        view = TreeAt(shadow_root, checkpoint)
    except NotRetained as e:
        raise UserError(str(e), EXIT_USAGE) from None
    except HistoryError as e:
        raise UserError(f"checkpoint {checkpoint} cannot be read: {e}") from None
    with view:
        node, name = resolve_view_subpath(view, subpath or "")
        r = ViewRestorer(view, force, progress)
        r.run(node, name, dest)
    return r


def cmd_restore(a: argparse.Namespace) -> int:
    from .cli import Target
    t = Target(a.target)
    dest = Path(os.path.abspath(a.dest))
    forbidden = [(t.journal, "journal")]
    if t.mountpoint is not None:
        forbidden.append((Path(os.path.abspath(t.mountpoint)), "mount"))
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
