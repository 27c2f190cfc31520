"""fusejournal's own default state directories, left 0777 by older versions, are made
private again on mount; anything that is not ours (a symlink, another user's) is left
alone for the journal's parent check to refuse."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fusejournal import layout


@pytest.fixture
def state(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "state" / "fusejournal"
    monkeypatch.setattr(layout, "state_root", lambda: root)
    return root


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_loose_state_dirs_are_tightened(state: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    base = layout.default_dirs(src)[0].parent
    base.mkdir(parents=True)
    os.chmod(state, 0o777)
    os.chmod(base, 0o777)
    assert layout.tighten_state_dirs(src) == [state, base]
    assert mode(state) == 0o700 and mode(base) == 0o700
    assert layout.tighten_state_dirs(src) == []          # nothing left to do
    layout.check_ancestors(layout.default_dirs(src)[0], "journal")   # the parent check now passes


def test_missing_state_dirs_are_fine(state: Path, tmp_path: Path) -> None:
    assert layout.tighten_state_dirs(tmp_path / "src") == []
    assert not state.exists()


def test_a_symlinked_state_root_is_not_followed(state: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    os.chmod(elsewhere, 0o777)
    state.parent.mkdir(parents=True)
    state.symlink_to(elsewhere)
    assert layout.tighten_state_dirs(tmp_path / "src") == []
    assert mode(elsewhere) == 0o777


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_another_users_state_root_is_left_for_the_parent_check(state: Path, tmp_path: Path) -> None:
    state.mkdir(parents=True)
    os.chmod(state, 0o777)
    os.chown(state, 65534, 65534)
    assert layout.tighten_state_dirs(tmp_path / "src") == []
    assert mode(state) == 0o777
