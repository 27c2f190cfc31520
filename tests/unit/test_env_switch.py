"""The measurement switches ``FUSEJOURNAL_KILLPRIV_V2`` and ``FUSEJOURNAL_AUTO_INVAL_DATA``:
``on`` or ``off``, anything else one clear line (promise 6); ``fusejournal mount``
refuses it before it mounts (tests/mount/test_fuseloop.py)."""

from __future__ import annotations

import pytest

from fusejournal.checks import env_switch


@pytest.mark.parametrize("value, default, want", [(None, True, True), (None, False, False),
                                                  ("on", False, True), ("off", True, False)])
def test_on_off_and_the_default(value: str | None, default: bool, want: bool) -> None:
    assert env_switch("FUSEJOURNAL_X", value, default) is want


@pytest.mark.parametrize("value", ["", "ON", "1", "yes", " off", "o\udcffn", "x" * 1_000_000])
def test_anything_else_is_one_short_line(value: str) -> None:
    with pytest.raises(ValueError) as e:
        env_switch("FUSEJOURNAL_X", value, True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("FUSEJOURNAL_X=") and len(msg) < 200
