"""The fsync path (issue 11, docs/performance-analysis.md, "pgbench: where the time
goes"): an application's fsync through the mount syncs the original (promises 2
and 3 lean on it), in a worker thread so the FUSE loop keeps serving; and the
daemon lowers the GIL switch interval so that the handoff back from that thread
does not wait up to CPython's default 5 ms while another thread runs Python."""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

import pyfuse3
import pytest
import trio
from opshelp import ops  # noqa: F401  (ops is a fixture)

from fusejournal import session
from fusejournal.fs import ROOT, Operations

CTX = pyfuse3.RequestContext()   # uid 0, gid 0


@pytest.mark.parametrize("datasync", [True, False])
async def test_fsync_syncs_the_original_in_a_worker_thread(ops: Operations, monkeypatch,
                                                           datasync: bool) -> None:
    fi, attr = await ops.create(ROOT, b"wal", stat.S_IFREG | 0o600, os.O_WRONLY, CTX)
    assert await ops.write(fi.fh, 0, b"commit") == 6
    calls: list[tuple[str, int, bool]] = []
    loop_thread = threading.get_ident()

    def spy(name: str, real):
        def call(fd: int) -> None:
            calls.append((name, os.fstat(fd).st_ino, threading.get_ident() != loop_thread))
            real(fd)
        return call
    monkeypatch.setattr(os, "fdatasync", spy("fdatasync", os.fdatasync))
    monkeypatch.setattr(os, "fsync", spy("fsync", os.fsync))
    await ops.fsync(fi.fh, datasync)
    ino = os.stat(ops.src / "wal").st_ino
    assert calls == [("fdatasync" if datasync else "fsync", ino, True)]
    await ops.release(fi.fh)


def test_the_session_lowers_the_gil_switch_interval(monkeypatch, tmp_path: Path) -> None:
    seen: list[float] = []

    async def fake_main() -> None:
        seen.append(sys.getswitchinterval())

    monkeypatch.setattr(session.pyfuse3, "init", lambda ops, mnt, opts: None)
    monkeypatch.setattr(session.pyfuse3, "main", fake_main)
    monkeypatch.setattr(session.pyfuse3, "close", lambda unmount=True: None)
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)          # CPython's default
    try:
        trio.run(session.serve_session, object(), tmp_path, set(), lambda: None)
    finally:
        sys.setswitchinterval(before)
    assert seen and seen[0] <= 0.001      # CPython's default 0.005 before the fix
