"""Snapshots of a directory tree, to compare an original at checkpoint N with the shadow.

A snapshot records, per path (bytes, relative): type, mode, uid, gid, size,
mtime_ns, content digest (regular files), symlink target, rdev, user.* and
trusted.* xattrs, and the hard-link group (the set of paths sharing one inode).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path


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

    def visit(rel: bytes) -> None:
        full = root_b + (b"/" + rel if rel else b"")
        st = os.lstat(full)
        mode = st.st_mode
        kind = stat.S_IFMT(mode)
        digest = target = None
        if stat.S_ISREG(mode):
            digest = content_digest(full, st.st_size)
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
    return {"entries": entries, "links": links}


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
    return out


def assert_same(a: dict, b: dict) -> None:
    d = diff(a, b)
    assert not d, "trees differ:\n" + "\n".join(d)
