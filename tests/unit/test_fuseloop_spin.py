"""The request loop's adaptive spin window (fusejournal/fuseloop.py, step 3), as pure units.

The window is the time the waiting task polls the FUSE fd before it sleeps in
trio's ``epoll_wait``.  It must stay where requests follow each other closely,
shrink to nothing where they come far apart (so an idle or slow client costs no
CPU), grow back when they come closer, and never pass its limit.
"""

from __future__ import annotations

import pytest

from fusejournal.fuseloop import _Spin, spin_limit_ns

US = 1000


def test_requests_far_apart_shrink_the_window_to_nothing() -> None:
    sp = _Spin(50 * US)
    seen = []
    for _ in range(10):
        sp.slept(5_000 * US)             # 5 ms between requests
        seen.append(sp.window_ns)
    assert seen[:5] == [25 * US, 12_500, 6_250, 3_125, 1_562]
    assert sp.window_ns == 0             # 1.5 µs halved is under 1 µs: no spin at all


def test_requests_close_again_grow_it_back_to_the_limit_not_beyond() -> None:
    sp = _Spin(50 * US)
    for _ in range(20):
        sp.slept(1_000_000 * US)
    assert sp.window_ns == 0
    seen = []
    for _ in range(6):
        sp.slept(40 * US)                # within the limit, longer than the window
        seen.append(sp.window_ns)
    assert seen == [6_250, 12_500, 25 * US, 50 * US, 50 * US, 50 * US]


def test_a_sleep_within_the_window_leaves_it_alone() -> None:
    sp = _Spin(50 * US)
    sp.slept(30 * US)                     # woke sooner than the window: nothing to learn
    assert sp.window_ns == 50 * US
    sp.slept(50 * US)                     # exactly the limit: not "far apart"
    assert sp.window_ns == 50 * US
    sp.slept(50 * US + 1)
    assert sp.window_ns == 25 * US


def test_a_limit_of_zero_never_spins() -> None:
    sp = _Spin(0)
    for idle in (1, 10 * US, 10_000 * US):
        sp.slept(idle)
        assert sp.window_ns == 0


@pytest.mark.parametrize("value, ns", [(None, 50_000), ("0", 0), ("50", 50_000), ("12.5", 12_500),
                                       ("10000", 10_000_000)])
def test_the_limit_from_the_environment(value: str | None, ns: int) -> None:
    assert spin_limit_ns(value) == ns


@pytest.mark.parametrize("value", ["", "fast", "-1", "10001", "nan", "inf", "1e9", "５\udcff"])
def test_a_bad_limit_is_one_clear_line(value: str) -> None:
    with pytest.raises(ValueError) as e:
        spin_limit_ns(value)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("FUSEJOURNAL_SPIN_US=")


def test_a_huge_bad_limit_is_still_a_short_line() -> None:
    with pytest.raises(ValueError) as e:
        spin_limit_ns("9" * 1_000_000)
    assert len(str(e.value)) < 200 and "..." in str(e.value)
