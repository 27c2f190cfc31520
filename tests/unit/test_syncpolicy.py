"""Where an FSYNC's sync runs (fusejournal/syncpolicy.py): pure units, no mount."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusejournal.syncpolicy import INLINE_BYTES, UNKNOWN, SyncPolicy, inline_limit_ns

LIMIT = 500_000      # the default, in ns
FAST = 150_000       # a 0.15 ms fdatasync


def warmed(limit: int = LIMIT) -> SyncPolicy:
    """A policy that has seen enough fast syncs to go inline."""
    p = SyncPolicy(limit)
    for _ in range(40):
        p.done(4096, FAST, p.inline(4096))
    assert p.inline(4096)
    return p


def test_a_new_mount_syncs_on_workers_until_it_has_seen_fast_syncs() -> None:
    p = SyncPolicy(LIMIT)
    chosen = []
    for _ in range(10):
        inline = p.inline(4096)
        chosen.append(inline)
        p.done(4096, FAST, inline)
    # the average starts at twice the limit and falls by 1/8 of the gap per sync
    assert chosen == [False] * 7 + [True] * 3
    assert (p.worker_syncs, p.inline_syncs, p.slow_inline) == (7, 3, 0)


def test_unknown_and_large_syncs_go_to_workers() -> None:
    p = warmed()
    assert not p.inline(UNKNOWN)                 # not synced since the daemon knew it
    assert not p.inline(INLINE_BYTES + 1)
    assert p.inline(INLINE_BYTES)
    assert p.inline(0)


def test_a_large_syncs_length_does_not_move_the_average() -> None:
    p = warmed()
    before = p.average_ns
    p.done(UNKNOWN, 2_000_000_000, False)        # two seconds for a gigabyte: expected
    p.done(INLINE_BYTES + 1, 50_000_000, False)
    assert p.average_ns == before and p.inline(4096)
    assert p.worker_syncs == 2 + 7


def test_one_slow_sync_sends_the_next_to_workers_and_fast_ones_bring_them_back() -> None:
    p = warmed()
    p.done(4096, 6 * LIMIT, True)                # the disk stalled once, inline
    assert p.slow_inline == 1
    assert not p.inline(4096)
    back = 0
    while not p.inline(4096):
        p.done(4096, FAST, False)                # measured on the workers
        back += 1
        assert back < 50
    assert 1 <= back <= 12


def test_a_slow_disk_stays_on_workers() -> None:
    p = SyncPolicy(LIMIT)
    for _ in range(200):
        inline = p.inline(4096)
        assert not inline
        p.done(4096, 10_000_000, inline)         # 10 ms: a spinning disk's flush
    assert p.inline_syncs == 0 and p.slow_inline == 0


def test_limit_zero_never_inlines() -> None:
    p = SyncPolicy(0)
    for _ in range(100):
        assert not p.inline(0)
        p.done(0, 0, False)


@given(st.lists(st.tuples(st.integers(0, 2 * INLINE_BYTES), st.integers(0, 50_000_000)), max_size=300))
def test_only_small_syncs_with_a_fast_average_go_inline(syncs: list[tuple[int, int]]) -> None:
    p = SyncPolicy(LIMIT)
    for unsynced, took in syncs:
        inline = p.inline(unsynced)
        assert inline == (unsynced <= INLINE_BYTES and p.average_ns <= LIMIT)
        p.done(unsynced, took, inline)
    assert p.inline_syncs + p.worker_syncs == len(syncs)
    assert p.slow_inline <= p.inline_syncs
    assert 0 <= p.average_ns <= max([2 * LIMIT] + [t for _, t in syncs])


def test_status_keys() -> None:
    p = warmed()
    s = p.status()
    assert s["fsync_inline"] == p.inline_syncs > 0
    assert s["fsync_worker"] == 7
    assert s["fsync_slow_inline"] == 0
    assert s["fsync_inline_limit_us"] == 500
    assert 0 < s["fsync_average_us"] <= 500


@pytest.mark.parametrize(("value", "ns"), [(None, 500_000), ("0", 0), ("250", 250_000),
                                           ("100000", 100_000_000), ("0.5", 500)])
def test_limit_parsed(value: str | None, ns: int) -> None:
    assert inline_limit_ns(value) == ns


@pytest.mark.parametrize("value", ["", "fast", "-1", "100001", "nan", "inf", "1e9", "５\udcff"])
def test_bad_limit_refused_in_one_line(value: str) -> None:
    with pytest.raises(ValueError, match="FUSEJOURNAL_FSYNC_INLINE_US=") as e:
        inline_limit_ns(value)
    assert "\n" not in str(e.value)


def test_huge_limit_value_is_cut_in_the_message() -> None:
    with pytest.raises(ValueError) as e:
        inline_limit_ns("9" * 1_000_000)
    assert len(str(e.value)) < 200


def test_the_sync_threads_durations_feed_the_average_in_bulk() -> None:
    # (pyfuse3's sync threads report totals; each sync counts as one of their mean)
    one_by_one, in_bulk = SyncPolicy(LIMIT), SyncPolicy(LIMIT)
    for _ in range(7):
        one_by_one.threads_done(1, FAST)
    in_bulk.threads_done(7, 7 * FAST)
    assert abs(one_by_one.average_ns - in_bulk.average_ns) <= 7      # (integer steps)
    assert in_bulk.inline(4096) and not SyncPolicy(LIMIT).inline(4096)
    in_bulk.threads_done(0, 0)                        # nothing finished: unchanged
    assert in_bulk.inline(4096)
    in_bulk.threads_done(1, 40 * LIMIT)               # one slow one: over at once
    assert not in_bulk.inline(4096)
    in_bulk.threads_done(10_000, 10_000 * FAST)       # a long run of fast ones: back
    assert in_bulk.average_ns == pytest.approx(FAST, rel=0.01)
    assert in_bulk.status()["fsync_thread"] == 0      # (counted by the handler, not here)
