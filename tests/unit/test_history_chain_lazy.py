"""history.chain reads the revs' METAs newest first and only as far as needed (browsing or
restoring checkpoint K reads the revs from K on, not every retained one: one open and two
reads per rev, each a disk seek with cold caches, at every browse --checkpoint start).  It
must name exactly the chain the eager version named, whatever lies in history/: revs of
another tree, damaged ones, several naming the same next checkpoint, gaps."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusejournal import history
from fusejournal.history import FRAME_META, chain, frame, rev_name

TREE = [7, 9]


def _eager(metas: dict[int, dict | None], applied: int) -> list[int]:
    """The chain as it was computed before (every META read), ids oldest first."""
    by_next: dict[int, int] = {}
    for n in sorted(metas):
        meta = metas[n]
        if meta is not None and meta.get("tree") == TREE and type(meta.get("next")) is int:
            by_next[meta["next"]] = n
    out = []
    cur = applied
    while cur in by_next:
        n = by_next.pop(cur)
        if n >= cur:
            break
        out.append(n)
        cur = n
    return out[::-1]


def _write(hdir: Path, metas: dict[int, dict | None]) -> None:
    for n, meta in metas.items():
        data = frame(FRAME_META, json.dumps(meta).encode()) if meta is not None else b"damaged"
        (hdir / rev_name(n)).write_bytes(data)


rev = st.one_of(st.none(),                                              # damaged
                st.fixed_dictionaries({"tree": st.sampled_from([TREE, [7, 8]]),
                                       "next": st.integers(0, 14)}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metas=st.dictionaries(st.integers(0, 12), rev, max_size=10), applied=st.integers(0, 14),
       down_to=st.integers(0, 14))
def test_the_lazy_chain_is_the_eager_one(tmp_path_factory, metas, applied, down_to) -> None:
    hdir = tmp_path_factory.mktemp("history")
    _write(hdir, metas)
    fd = os.open(hdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        want = _eager(metas, applied)
        assert [n for n, _ in chain(fd, TREE, applied)] == want
        # down_to: the same chain, cut after the first rev at or below down_to
        got = [n for n, _ in chain(fd, TREE, applied, down_to)]
        cut = next((i for i, n in reversed(list(enumerate(want))) if n <= down_to), 0)
        assert got == want[cut:], (want, got)
    finally:
        os.close(fd)


def test_browsing_a_recent_checkpoint_reads_only_its_revs(tmp_path: Path, monkeypatch) -> None:
    _write(tmp_path, {n: {"tree": TREE, "next": n + 1} for n in range(24)})
    read: list[int] = []
    real = history.read_meta
    monkeypatch.setattr(history, "read_meta", lambda fd, n: read.append(n) or real(fd, n))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert [n for n, _ in chain(fd, TREE, 24, down_to=21)] == [21, 22, 23]
        assert sorted(read) == [21, 22, 23]
        read.clear()
        assert [n for n, _ in chain(fd, TREE, 24)] == list(range(24))
        assert len(read) == 24
    finally:
        os.close(fd)
