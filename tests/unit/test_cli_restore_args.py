"""restore's DEST may follow the options (``restore J --checkpoint N DEST``): DEST is optional
for ``restore --group``, and argparse alone left a DEST after options over as unrecognized."""

from __future__ import annotations

import argparse

import pytest

from fusejournal import cli, restore


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    calls: list[argparse.Namespace] = []

    def fake(a: argparse.Namespace) -> int:
        calls.append(a)
        return 0
    monkeypatch.setattr(restore, "cmd_restore", fake)
    return calls


@pytest.mark.parametrize("argv", [
    ["restore", "J", "--checkpoint", "3", "D"],
    ["restore", "J", "D", "--checkpoint", "3"],
    ["restore", "--checkpoint", "3", "J", "D"],
    ["restore", "J", "--path", "a/b", "--checkpoint", "3", "D"],
])
def test_dest_before_or_after_the_options(seen: list[argparse.Namespace], argv: list[str]) -> None:
    assert cli.main(argv) == 0
    assert (seen[0].target, seen[0].dest, seen[0].checkpoint) == ("J", "D", 3)


@pytest.mark.parametrize("argv", [
    ["restore", "J", "--checkpoint", "3", "D", "E"],
    ["restore", "J", "D", "--bogus"],
    ["status", "J", "--bogus"],
])
def test_anything_more_is_still_refused(seen: list[argparse.Namespace], argv: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code != 0 and not seen
    assert "unrecognized arguments" in capsys.readouterr().err


def test_no_dest_is_one_line(seen: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["restore", "J", "--checkpoint", "3"]) != 0
    assert capsys.readouterr().err.strip() == "fusejournal: DEST is required" and not seen
