"""`fusejournal checkpoint`: when the mount stops telling the checkpoint's id after the
checkpoint was taken (unmounted in between), a clear one-line error, not a traceback
(promise 6; found by mypy --strict, issue 8 item 6)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fusejournal import cli, layout
from fusejournal.errors import EXIT_FAILED


def test_a_checkpoint_whose_id_cannot_be_read_back_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def getxattr(path: Path, name: bytes) -> bytes | None:
        return b"/journal" if name == layout.XATTR_JOURNAL else None     # gone after the setxattr

    set_calls: list[bytes] = []
    monkeypatch.setattr(cli, "_getxattr", getxattr)
    monkeypatch.setattr(os, "setxattr", lambda path, name, value: set_calls.append(name))
    assert cli.main(["checkpoint", os.fspath(tmp_path), "--label", "x"]) == EXIT_FAILED
    assert set_calls == [layout.XATTR_UPDATE_PERMISSION]
    err = capsys.readouterr().err
    assert err.startswith("fusejournal: the checkpoint was taken") and err.count("\n") == 1
