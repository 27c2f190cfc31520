"""open_by_handle_at on a gone object whose inode number is being reused.

ext4 answers ENOMEM, not ESTALE, while a create elsewhere on the filesystem holds the
freed inode number in I_CREATING (find_inode_fast -> iget_locked NULL -> __ext4_iget
-ENOMEM).  CI met it once in test_resync; a resync, a seed round or a forgotten
inode's reopen would have failed on it.  sysc.open_by_handle tries ENOMEM again for
about 50 ms and then answers what the object really is."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fusejournal import sysc

ROOT = os.geteuid() == 0


@pytest.mark.skipif(not ROOT, reason="open_by_handle_at needs CAP_DAC_READ_SEARCH")
def test_a_gone_file_is_estale_while_creates_reuse_inode_numbers(tmp_path: Path) -> None:
    """The race itself: three threads create and unlink files beside a file that is made,
    its handle taken, and unlinked; every open of that handle is ESTALE.  Before the retry,
    about one try in a thousand here was ENOMEM."""
    stop = threading.Event()

    def churn(k: int) -> None:
        i = 0
        while not stop.is_set():
            p = tmp_path / f"c{k}_{i % 50}"
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))
            os.unlink(p)
            i += 1

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    src = os.open(tmp_path, os.O_RDONLY)
    seen: Counter[str] = Counter()
    try:
        for _ in range(2000):
            victim = tmp_path / "victim"
            os.close(os.open(victim, os.O_CREAT | os.O_WRONLY, 0o600))
            pf = os.open(victim, os.O_PATH)
            htype, handle = sysc.name_to_handle(pf)
            os.close(pf)
            os.unlink(victim)
            for _ in range(10):
                try:
                    os.close(sysc.open_by_handle(src, htype, handle))
                    seen["opened"] += 1
                except OSError as e:
                    seen[errno.errorcode.get(e.errno or 0, str(e.errno))] += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        os.close(src)
    assert seen == Counter({"ESTALE": 20000})


class _FakeCall:
    """Stands in for libc's open_by_handle_at: fails with each errno of ``errnos`` in turn
    (0: succeed with fd 7), and counts the calls."""

    def __init__(self, *errnos: int) -> None:
        self.errnos = list(errnos)
        self.calls = 0

    def __call__(self, *_args: Any) -> int:
        self.calls += 1
        e = self.errnos.pop(0)
        if e == 0:
            return 7
        ctypes.set_errno(e)
        return -1


def _open_with(monkeypatch: pytest.MonkeyPatch, fake: _FakeCall) -> int:
    monkeypatch.setattr(sysc._libc, "open_by_handle_at", fake)
    monkeypatch.setattr(sysc.time, "sleep", lambda _s: None)
    return sysc.open_by_handle(3, 1, b"\x01" * 8)


def test_enomem_then_the_true_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCall(errno.ENOMEM, errno.ENOMEM, errno.ESTALE)
    with pytest.raises(OSError) as ei:
        _open_with(monkeypatch, fake)
    assert ei.value.errno == errno.ESTALE and fake.calls == 3


def test_enomem_then_the_object(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCall(errno.ENOMEM, 0)
    assert _open_with(monkeypatch, fake) == 7 and fake.calls == 2


def test_enomem_that_lasts_is_raised_after_the_bounded_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    tries = len(sysc._REUSE_PAUSES) + 1              # the first, and one after each pause
    fake = _FakeCall(*[errno.ENOMEM] * (tries + 5))
    with pytest.raises(OSError) as ei:
        _open_with(monkeypatch, fake)
    assert ei.value.errno == errno.ENOMEM and fake.calls == tries
    assert sum(sysc._REUSE_PAUSES) < 0.1


@pytest.mark.parametrize("err", [errno.ESTALE, errno.EPERM, errno.EINVAL])
def test_other_errors_are_not_tried_again(monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    fake = _FakeCall(err, 0)
    with pytest.raises(OSError) as ei:
        _open_with(monkeypatch, fake)
    assert ei.value.errno == err and fake.calls == 1
