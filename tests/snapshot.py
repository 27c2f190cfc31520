"""Snapshots of a directory tree, to compare an original at checkpoint N with the shadow.

A snapshot records, per path (bytes, relative): type, mode, uid, gid, size,
mtime_ns, content digest (regular files), symlink target, rdev, user.* and
trusted.* xattrs, and the hard-link group (the set of paths sharing one inode).

Where the tree can tell holes from data (not through a FUSE mount: pyfuse3
has no lseek, so the kernel reports every byte as data), the snapshot also
keeps each regular file's data map (SEEK_DATA/SEEK_HOLE), and :func:`diff`
compares the maps of two snapshots that both have them: the shadow must keep
the original's holes as holes and its written zeros as data.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

_BLOCK = 1 << 16


def content_digest(path: bytes, size: int) -> str:
    """sha256 of a file's bytes, where holes and zero blocks hash alike (cheap on sparse files).

    Blocks are aligned to the file offset, so two files with equal bytes hash
    equally whatever their holes are.
    """
    h = hashlib.sha256()
    zeros = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:       # ENXIO: no data after pos (a hole to the end)
                    raise
                data = size
            data -= data % _BLOCK
            if data > pos:
                zeros += data - pos
                pos = data
                continue
            block = os.pread(fd, min(_BLOCK, size - pos), pos)
            if not block:
                break
            if block.count(0) == len(block):
                zeros += len(block)
            else:
                h.update(b"Z%d;" % zeros)
                zeros = 0
                h.update(block)
            pos += len(block)
    finally:
        os.close(fd)
    h.update(b"Z%d;" % zeros)
    return h.hexdigest()


def data_map(path: bytes, size: int) -> tuple[tuple[int, int], ...]:
    """The data extents of a file in [0, size) as SEEK_DATA/SEEK_HOLE report them."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                break
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return tuple(out)


def _on_fuse(path: bytes) -> bool:
    """True if ``path`` lies on a FUSE filesystem (its longest mount-point prefix is one)."""
    target = os.path.realpath(path)
    best, fuse = b"", False
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            mp = left.split()[4].replace(b"\\040", b" ")
            if (target == mp or target.startswith(mp.rstrip(b"/") + b"/")) and len(mp) >= len(best):
                best, fuse = mp, right.split()[0].startswith(b"fuse")
    return fuse


def _xattrs(path: bytes, is_link: bool) -> dict:
    if is_link:
        return {}
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:        # a filesystem without xattrs has none
            raise
        return {}
    for n in sorted(names):
        if n.startswith(("user.", "trusted.")) and not n.startswith("user.fusejournal."):
            out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


def snapshot(root: os.PathLike | str, *, mtimes: bool = True, dir_mtimes: bool = True) -> dict:
    root_b = os.fsencode(os.fspath(root))
    entries: dict[bytes, tuple] = {}
    inodes: dict[int, list[bytes]] = {}
    holes: dict[bytes, tuple] | None = None if _on_fuse(root_b) else {}

    def visit(rel: bytes) -> None:
        full = root_b + (b"/" + rel if rel else b"")
        st = os.lstat(full)
        mode = st.st_mode
        kind = stat.S_IFMT(mode)
        digest = target = None
        if stat.S_ISREG(mode):
            digest = content_digest(full, st.st_size)
            if holes is not None:
                holes[rel] = data_map(full, st.st_size)
        elif stat.S_ISLNK(mode):
            target = os.readlink(full)
        mt = None
        if mtimes and (dir_mtimes or not stat.S_ISDIR(mode)):
            mt = st.st_mtime_ns
        entries[rel] = (kind, stat.S_IMODE(mode) if not stat.S_ISLNK(mode) else None, st.st_uid, st.st_gid,
                        st.st_size if not stat.S_ISDIR(mode) else None, mt, digest, target,
                        st.st_rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else None,
                        tuple(sorted(_xattrs(full, stat.S_ISLNK(mode)).items())))
        if not stat.S_ISDIR(mode):
            inodes.setdefault(st.st_ino, []).append(rel)
        else:
            for name in sorted(os.listdir(full)):
                visit(rel + b"/" + name if rel else name)

    visit(b"")
    links = sorted(tuple(sorted(v)) for v in inodes.values() if len(v) > 1)
    return {"entries": entries, "links": links, "holes": holes}


def diff(a: dict, b: dict, limit: int = 20) -> list[str]:
    out = []
    ea, eb = a["entries"], b["entries"]
    for k in sorted(set(ea) | set(eb)):
        if k not in eb:
            out.append(f"only in first: {k!r} {ea[k]}")
        elif k not in ea:
            out.append(f"only in second: {k!r} {eb[k]}")
        elif ea[k] != eb[k]:
            out.append(f"differs: {k!r}\n   {ea[k]}\n   {eb[k]}")
        if len(out) >= limit:
            break
    if a["links"] != b["links"]:
        out.append(f"hard links differ: {a['links']} vs {b['links']}")
    ha, hb = a.get("holes"), b.get("holes")
    if ha is not None and hb is not None:
        for k in sorted(set(ha) & set(hb)):
            if ha[k] != hb[k] and len(out) < limit:
                out.append(f"data map differs: {k!r}\n   {ha[k]}\n   {hb[k]}")
    return out


def assert_same(a: dict, b: dict) -> None:
    d = diff(a, b)
    assert not d, "trees differ:\n" + "\n".join(d)
