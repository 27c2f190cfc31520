"""history_view.TreeAt reads pre-images on demand (issue 10, "without loading everything into
memory"): opening a view indexes the revs one frame at a time and keeps where each Data
pre-image is, not its bytes; a read fetches (and checks again) only the frames it needs.

Checked against a model: the original's bytes after each checkpoint, read back through views
of every retained checkpoint (at random offsets, with a frame cache small enough to evict), and
by restoring every checkpoint (test_history's History).  Memory is measured with tracemalloc in
this process, never time.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import tracemalloc

import pytest
from test_history import History

from fusejournal import history, layout
from fusejournal.history import Data, HistoryError, encode, frame
from fusejournal.history_view import PreImage, RevCache, TreeAt, index_rev

MiB = 1 << 20


def _file_at(h: History, rel: bytes) -> bytes:
    with open(h.e.orig / os.fsdecode(rel), "rb") as f:
        return f.read()


def _pre_images(cache: RevCache) -> list[tuple[tuple[int, int, int], PreImage]]:
    return [(rev.key, r) for rev in cache.index.values() for r in rev.records if isinstance(r, PreImage)]


def test_reads_across_many_revs_with_overlapping_pre_images(tmp_path):
    rng = random.Random(10)
    h = History(tmp_path, lambda r: (r.create(b"f", 0o644, rng.randbytes(300_000)),
                                     r.create(b"g", 0o644, b"g" * 9000)))
    model = {0: {b"f": _file_at(h, b"f"), b"g": _file_at(h, b"g")}}
    try:
        r = h.e.rec
        for _ in range(8):
            for _ in range(12):
                rel = rng.choice([b"f", b"f", b"g"])
                size = len(_file_at(h, rel))
                what = rng.random()
                if what < 0.75:                  # overwrites that overlap earlier ones, some past the end
                    off = rng.randrange(0, size + 5000)
                    r.write(rel, off, rng.randbytes(rng.choice([1, 100, 4096, 5000, 70_000])))
                elif what < 0.9:
                    r.truncate(rel, rng.randrange(0, size + 1))
                else:
                    r.truncate(rel, size + rng.randrange(1, 20_000))      # a hole at the end
            n = h.sync()
            model[n] = {b"f": _file_at(h, b"f"), b"g": _file_at(h, b"g")}
        cache = RevCache(frame_bytes=64 << 10, frames=3)    # small: frames are evicted and read again
        for k in sorted(model):
            v = TreeAt(h.e.shadow.root, k, cache)
            try:
                for rel, want in model[k].items():
                    node = v.resolve(rel)
                    assert v.stat(node).size == len(want)
                    assert v.read(node, 0, len(want) + 10) == want
                    for _ in range(40):
                        off = rng.randrange(0, len(want) + 100)
                        size = rng.randrange(1, 20_000)
                        assert v.read(node, off, size) == want[off:off + size], (k, rel, off, size)
            finally:
                v.close()
        # the index keeps where the old bytes are, never the bytes
        assert _pre_images(cache)
        assert not any(isinstance(rec, Data) for rev in cache.index.values() for rec in rev.records)
        assert cache.held_bytes <= 64 << 10 and len(cache.frames) <= 3
        assert h.check_all() == sorted(model)
    finally:
        h.e.close()


def _damage(path: os.PathLike[str] | str, at: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, at)
        os.pwrite(fd, bytes([b[0] ^ 0x20]), at)
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_frame_damaged_after_opening_reads_as_eio_not_as_other_bytes(tmp_path, where):
    h = History(tmp_path, lambda r: r.create(b"f", 0o644, b"old!" * 5000))
    try:
        h.e.rec.write(b"f", 100, b"new" * 1000)
        assert h.sync() == 1
        v = TreeAt(h.e.shadow.root, 0)
        try:
            node = v.resolve(b"f")
            assert v.read(node, 0, 50) == (b"old!" * 5000)[:50]        # no pre-image read yet
            assert not v.cache.frames
            [(_, p)] = _pre_images(v.cache)
            rev = h.e.shadow.root / layout.SHADOW_HISTORY / history.rev_name(0)
            _damage(rev, p.frame + 3 if where == "payload" else p.frame - 20)
            with pytest.raises(OSError) as err:
                v.read(node, 0, 4096)
            assert err.value.errno == errno.EIO and "0.rev" in str(err.value)
            assert v.read(node, 20000 - 50, 50) == (b"old!" * 5000)[-50:]  # beyond the pre-image: still served
        finally:
            v.close()
        with pytest.raises(HistoryError):                              # a new view: refused at opening
            TreeAt(h.e.shadow.root, 0)
    finally:
        h.e.close()


def test_a_rev_replaced_under_an_open_view_is_eio(tmp_path):
    h = History(tmp_path, lambda r: r.create(b"f", 0o644, b"a" * 10000))
    try:
        h.e.rec.write(b"f", 0, b"b" * 10000)
        h.sync()
        v = TreeAt(h.e.shadow.root, 0)
        try:
            rev = h.e.shadow.root / layout.SHADOW_HISTORY / history.rev_name(0)
            tmp = rev.with_name("copy")
            tmp.write_bytes(rev.read_bytes())                       # same bytes, another inode
            tmp.rename(rev)
            with pytest.raises(OSError) as err:
                v.read(v.resolve(b"f"), 0, 100)
            assert err.value.errno == errno.EIO and "replaced" in str(err.value)
        finally:
            v.close()
        with TreeAt(h.e.shadow.root, 0) as v2:                   # a new view indexes the new file
            assert v2.read(v2.resolve(b"f"), 0, 100) == b"a" * 100
    finally:
        h.e.close()


def test_opening_a_view_over_64_mib_of_pre_images_allocates_little(tmp_path):
    """64 MiB of old bytes in two revs (1 MiB writes, lz4-compressible so that the test stays
    light on disk): opening the view, and reading the whole file through it, allocate a few MiB
    at most.  (The view used to keep every decompressed frame and every pre-image: 128 MiB.)"""
    def block(i: int, tag: bytes) -> bytes:
        return ((tag + b"%09d" % i) * (MiB // 12 + 1))[:MiB]
    h = History(tmp_path, lambda r: r.create(b"big", 0o644, b"".join(block(i, b"old") for i in range(64))))
    try:
        r = h.e.rec
        for i in range(32):
            r.write(b"big", i * MiB, block(i, b"NEW"))
        assert h.sync() == 1
        for i in range(32, 64):
            r.write(b"big", i * MiB, block(i, b"NEW"))
        assert h.sync() == 2
        rev_bytes = sum((h.e.shadow.root / layout.SHADOW_HISTORY / history.rev_name(n)).stat().st_size
                        for n in (0, 1))
        assert rev_bytes < 8 * MiB                                # compressed on disk
        tracemalloc.start()
        try:
            v = TreeAt(h.e.shadow.root, 0)
            opened, open_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            try:
                assert sum(p.length for _, p in _pre_images(v.cache)) == 64 * MiB
                node = v.resolve(b"big")
                for i in range(64):
                    assert v.read(node, i * MiB, MiB) == block(i, b"old"), i
                _, read_peak = tracemalloc.get_traced_memory()
            finally:
                v.close()
        finally:
            tracemalloc.stop()
        assert opened < 2 * MiB, opened
        assert open_peak < 16 * MiB, open_peak
        assert read_peak < 24 * MiB, read_peak          # the frame cache (8 MiB) plus a read or two
    finally:
        h.e.close()


# ------------------------------------------------------------------ index_rev on damaged files

def _rev_file(tmp_path, records, big=b""):
    meta = frame(history.FRAME_META, b'{"format": 1, "checkpoint": 3, "next": 4}')
    body = frame(history.FRAME_RECORDS, history.compress(encode(records)))
    extra = [Data(9, 0, big)] if big else []
    body2 = frame(history.FRAME_RECORDS, history.compress(encode(extra))) if big else b""
    end = frame(history.FRAME_END, b'{"records": %d}' % (len(records) + len(extra)))
    p = tmp_path / "3.rev"
    p.write_bytes(meta + body + body2 + end)
    return p


def _index(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        return index_rev(fd, (3, st.st_ino, st.st_size))
    finally:
        os.close(fd)


def test_index_rev_checks_every_frame_as_parse_rev_does(tmp_path):
    recs = [Data(2, 7, b"abc" * 100), history.Hole(2, 4096, 4096), Data(5, 0, b"z")]
    big = random.Random(1).randbytes(history._SCAN_CHUNK + 12345)   # a frame past the scan's chunk
    p = _rev_file(tmp_path, recs, big)
    idx = _index(p)
    assert [type(r) for r in idx.records] == [PreImage, history.Hole, PreImage, PreImage]
    data = p.read_bytes()
    for rec, want in ((idx.records[0], b"abc" * 100), (idx.records[3], big)):
        assert isinstance(rec, PreImage)
        raw = history.decompress(data[rec.frame:rec.frame + rec.frame_len])
        assert raw[rec.at:rec.at + rec.length] == want
    assert history.parse_rev(data).records[0][0] == recs[0]
    small = _rev_file(tmp_path, recs).read_bytes()
    for i in range(0, len(small), 5):                 # any flipped bit is caught
        bad = bytearray(small)
        bad[i] ^= 0x10
        p.write_bytes(bytes(bad))
        with pytest.raises(HistoryError):
            _index(p)
    for cut in (1, 24, len(small) - 30):              # torn anywhere, END missing
        p.write_bytes(small[:-cut])
        with pytest.raises(HistoryError):
            _index(p)
    p.write_bytes(small + small[-40:])                # a frame after END
    with pytest.raises(HistoryError):
        _index(p)


def test_a_listing_with_its_stats_is_the_listing_and_the_stats(tmp_path):
    """listdir_stat (one fd of the directory, one lstat per unchanged name: what the browse
    daemon's READDIR uses) gives what listdir and stat give, at every checkpoint."""
    h = History(tmp_path, lambda r: (r.mkdir(b"d"), r.create(b"d/f", 0o644, b"one"), r.create(b"g", 0o600, b"gg"),
                                     r.mkdir(b"d/sub"), r.create(b"d/sub/x", 0o644, b"x" * 9000)))
    try:
        r = h.e.rec
        r.write(b"d/f", 1, b"XYZ")
        r.link(b"g", b"d/hard")
        r.rename(b"d/sub", b"moved")
        r.symlink(b"lnk", b"d/f")
        assert h.sync() == 1
        r.unlink(b"g")
        r.truncate(b"moved/x", 10)
        r.create(b"d/new", 0o640, b"new")
        r.chmod(b"d", 0o700)
        assert h.sync() == 2

        def walk(v, node, path=b""):
            got = v.listdir_stat(node)
            assert [(n, c) for n, c, _ in got] == list(v.listdir(node))
            for name, child, cur in got:
                assert v.stat(child, cur) == v.stat(child), (path, name)
                if child.kind == stat.S_IFDIR:
                    walk(v, child, path + b"/" + name)
        for k in (0, 1, 2):
            with TreeAt(h.e.shadow.root, k) as v:
                walk(v, v.root)
        assert h.check_all() == [0, 1, 2]
    finally:
        h.e.close()
