"""Shared pieces of the Operations-level tests (tests/ops): a journaled Operations
over a scratch source with an in-memory temporary store, and setattr's field set."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from fusejournal.fs import Operations
from fusejournal.halt import Halt
from fusejournal.tempstore import TempStore


def fields(**kw) -> SimpleNamespace:
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
             "update_gid", "update_size")
    return SimpleNamespace(**{n: kw.get(n, False) for n in names})


@pytest.fixture
def ops(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    o = Operations(fd, store=TempStore(None), halt=Halt())
    o.src = src
    yield o
    o.close_all()
    os.close(fd)
