"""A browse listing is held in memory while the directory is open (one checkpoint per
listing): it must cost no more than its names and attributes.  It kept every entry's
os.stat_result too (about 600 bytes each, ~940 bytes an entry in all: 94 MB for a
directory of 100,000 entries, bench/benchlib/browsebench.py)."""

from __future__ import annotations

import os
import stat
import tracemalloc
from pathlib import Path

import trio

from fusejournal.browse import BrowseOperations

N = 5000


def test_a_listing_holds_names_and_attributes_only(tmp_path: Path) -> None:
    d = tmp_path / "big"
    d.mkdir()
    for i in range(N):
        os.close(os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT, 0o640))
    os.mkdir(d / "sub")
    os.symlink("f00000", d / "link")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    ops = BrowseOperations(fd, None)
    try:
        entry = trio.run(ops.lookup, 1, b"big", None)
        fh = trio.run(ops.opendir, entry.st_ino, None)
        h = ops.dir_handles[fh]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            listing = ops._list(h)
            per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(listing)
        finally:
            tracemalloc.stop()
        assert len(listing) == N + 4                       # . .. sub link f*
        assert per_entry < 500, f"{per_entry:.0f} bytes an entry"
        # what the inode table is told of each entry is still the original's identity
        for name, attr, fino in listing[2:]:
            st = os.lstat(d / os.fsdecode(name))
            ident = ops._identity(attr, fino)
            assert (ident.st_ino, ident.st_mode) == (st.st_ino, st.st_mode)
            assert stat.S_ISDIR(ident.st_mode) == (name == b"sub")
            assert stat.S_ISLNK(ident.st_mode) == (name == b"link")
    finally:
        ops.close_all()
        os.close(fd)
