"""A journal's meta.json of the wrong shape is refused with a clear error (promise 6),
not a traceback: read_meta checks every field it is trusted for (issue 8, item 6)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fusejournal import layout
from fusejournal.errors import UserError
from fusejournal.journal import Journal, read_meta


def _journal_with_meta(tmp_path: Path, meta: object) -> Path:
    j = tmp_path / "journal"
    j.mkdir(mode=0o700)
    (j / layout.META).write_text(json.dumps(meta))
    return j


@pytest.mark.parametrize("meta", [
    {"format": 1, "source": 5, "shadow": "/nowhere"},
    {"format": 1, "source": {"path": 7, "dev": 1, "ino": 2}, "shadow": "/nowhere"},
    {"format": 1, "source": {"path": "/src", "dev": 1, "ino": "2"}, "shadow": "/nowhere"},
    {"format": 1, "source": {"path": "/src", "dev": 1, "ino": 2}, "shadow": ["/nowhere"]},
    {"format": 1, "source": {"path": "/src", "dev": 1, "ino": 2}},
    {"format": 1, "source": {"path": "/src", "dev": 1, "ino": 2}, "shadow": "/x", "shadow_id": 3},
])
def test_a_meta_of_the_wrong_shape_is_refused(tmp_path: Path, meta: object) -> None:
    j = _journal_with_meta(tmp_path, meta)
    with pytest.raises(UserError, match="is not a fusejournal journal"):
        read_meta(j)
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(UserError, match="is not a fusejournal journal"):
        Journal.open(j, src, os.stat(src), None)


def test_a_journal_from_before_identities_is_read(tmp_path: Path) -> None:
    meta = {"format": 1, "source": {"path": "/src", "dev": 1, "ino": 2}, "shadow": "/sh"}
    assert read_meta(_journal_with_meta(tmp_path, meta)) == meta
