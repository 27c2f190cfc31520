"""The activity log without handles (a daemon without CAP_DAC_READ_SEARCH).  By fd, while
seeding: the intent names a held fd that follows its object through renames; a closed or
reused fd number is refused (never taken for "gone"); beyond the budget the intent names
the inode number only and cannot be opened; a walk finds an earlier run's objects by inode
number.  By inode number, after the seed: every first touch per period still makes an
intent durable."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fusejournal import sysc
from fusejournal.activity import ActivityLog, decode_intents, hold_by_walk

O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _opath(p: Path) -> int:
    return os.open(p, O_PATH)


def test_the_intent_follows_its_object_through_renames(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    f = src / "a" / "b" / "f"
    f.write_bytes(b"one")
    log = ActivityLog(tmp_path / "act", by_fd=True)
    log.open()
    fd = _opath(f)
    log.touch(os.fstat(fd).st_ino, fd, False)
    os.close(fd)                                    # the inode table's fd may go: it is held
    data = (tmp_path / "act" / "0000000000000001.act").read_bytes()
    [intent] = decode_intents(data)
    assert intent.handle_type == sysc.FD_HANDLE
    os.rename(src / "a", src / "z")                 # the directory above it moves
    os.rename(src / "z" / "b" / "f", src / "z" / "g")
    root = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rfd = sysc.open_by_handle(root, intent.handle_type, intent.handle, os.O_RDONLY | os.O_NOFOLLOW)
        assert os.read(rfd, 10) == b"one"
        assert os.readlink(f"/proc/self/fd/{rfd}").endswith("/src/z/g")
        os.close(rfd)
        log.release()                                # the fd is closed: refused, not "gone"
        with pytest.raises(OSError) as e:
            sysc.open_by_handle(root, intent.handle_type, intent.handle, O_PATH)
        assert e.value.errno == errno.EBADF
    finally:
        os.close(root)
        log.close()


def test_beyond_the_budget_the_intent_cannot_be_opened(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "act", by_fd=True)
    log.open()
    log.budget = 2
    inos = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x")
        fd = _opath(p)
        inos.append(os.fstat(fd).st_ino)
        log.touch(inos[-1], fd, False)
        os.close(fd)
    intents = decode_intents((tmp_path / "act" / "0000000000000001.act").read_bytes())
    assert [i.handle_type for i in intents] == [sysc.FD_HANDLE, sysc.FD_HANDLE, sysc.INO_ONLY]
    assert intents[2].ino == inos[2] and log.over_budget == 1
    with pytest.raises(OSError) as e:
        sysc.open_by_handle(-1, sysc.INO_ONLY, b"", O_PATH)
    assert e.value.errno == errno.EMFILE and "mount again" in str(e.value)
    log.close()


def test_the_walk_finds_an_earlier_runs_objects_by_inode_number(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "f").write_bytes(b"f")
    (src / "other").write_bytes(b"o")
    first = ActivityLog(tmp_path / "act", by_fd=True)
    first.open()
    for p, is_dir in ((src / "d" / "e" / "f", False), (src / "d" / "e", True), (src / "other", False)):
        fd = _opath(p)
        first.touch(os.fstat(fd).st_ino, fd, is_dir)
        os.close(fd)
    first.close()                                    # the earlier run is gone with its fds
    os.unlink(src / "other")                         # (as that run did before it stopped)
    again = ActivityLog(tmp_path / "act", by_fd=True)
    earlier = again.open()
    assert len(earlier) == 3
    root = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        held = hold_by_walk(again, root, earlier)
        assert sorted((i.ino, i.is_dir) for i in held) == sorted(
            [(os.stat(src / "d" / "e" / "f").st_ino, False), (os.stat(src / "d" / "e").st_ino, True)])
        for i in held:
            assert i.handle_type == sysc.FD_HANDLE
            fd = sysc.open_by_handle(root, i.handle_type, i.handle, O_PATH)
            assert os.fstat(fd).st_ino == i.ino
            os.close(fd)
    finally:
        os.close(root)
        again.close()


def _touch(log: ActivityLog, p: Path, is_dir: bool = False) -> int:
    fd = _opath(p)
    ino = os.fstat(fd).st_ino
    log.touch(ino, fd, is_dir)
    os.close(fd)
    return ino


def _periods(tmp_path: Path) -> list[str]:
    return sorted(p for p in os.listdir(tmp_path / "act") if p.endswith(".act"))


def test_after_the_seed_the_log_goes_on_by_inode_number(tmp_path: Path) -> None:
    """The seed completes while mounted: the held fds close, the current period's intents
    stay (they name objects changed since the final halt), and later touches are still
    made durable, by inode number (a crash needs them: recovery.recover walks for them)."""
    for n in "fgh":
        (tmp_path / n).write_bytes(b"x")
    log = ActivityLog(tmp_path / "act", by_fd=True, by_ino=True)
    log.open()
    f = _touch(log, tmp_path / "f")
    assert len(log.held) == 1
    log.seed_done()
    assert log.enabled and not log.by_fd and log.by_ino and not log.held
    g = _touch(log, tmp_path / "g")
    log.new_period()
    h = _touch(log, tmp_path / "h")
    assert _periods(tmp_path) == ["0000000000000001.act", "0000000000000002.act"]
    first = decode_intents((tmp_path / "act" / "0000000000000001.act").read_bytes())
    assert [(i.ino, i.handle_type) for i in first] == [(f, sysc.FD_HANDLE), (g, sysc.INO_ONLY)]
    [second] = decode_intents((tmp_path / "act" / "0000000000000002.act").read_bytes())
    assert (second.ino, second.handle_type, second.handle) == (h, sysc.INO_ONLY, b"")
    # what a crash leaves is found again by a walk, whichever form the intent has
    again = ActivityLog(tmp_path / "act", by_ino=True)
    earlier = again.open()
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        held = hold_by_walk(again, root, earlier)
        assert sorted(i.ino for i in held) == sorted([f, g, h])
    finally:
        os.close(root)
        again.close()
        log.close()


def test_seeded_before_the_mount_drops_every_period(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    log = ActivityLog(tmp_path / "act", by_fd=True, by_ino=True)
    log.open()
    _touch(log, tmp_path / "f")
    log.seed_done(remove_periods=True)
    assert log.enabled and log.by_ino and not log.held and _periods(tmp_path) == []
    _touch(log, tmp_path / "f")                # touched again: a new intent, not "seen"
    [i] = decode_intents((tmp_path / "act" / "0000000000000001.act").read_bytes())
    assert i.handle_type == sysc.INO_ONLY
    log.close()


def test_with_handles_seed_done_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    log = ActivityLog(tmp_path / "act")
    log.open()
    log.seed_done(remove_periods=True)
    _touch(log, tmp_path / "f")
    [i] = decode_intents((tmp_path / "act" / "0000000000000001.act").read_bytes())
    assert i.handle_type >= 0 and not log.by_ino
    log.close()


def test_out_of_fds_the_operation_goes_on_and_the_intent_names_the_inode_only(tmp_path: Path) -> None:
    """The process at its open-file limit (the application's files): the touch must not fail
    the operation; the intent names the inode number only (the seed cannot complete)."""
    import subprocess
    import sys
    code = f"""
import os
from pathlib import Path
from fusejournal import sysc
from fusejournal.activity import ActivityLog, decode_intents
tmp = Path({os.fspath(tmp_path)!r})
(tmp / "f").write_bytes(b"x")
log = ActivityLog(tmp / "act", by_fd=True)
log.open()
fd = os.open(tmp / "f", os.O_PATH | os.O_NOFOLLOW)
log.touch(0, os.open(tmp / "act", os.O_RDONLY), False)   # opens the period file first
fill = []
try:
    while True:
        fill.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
log.touch(os.fstat(fd).st_ino, fd, False)
for f in fill:
    os.close(f)
types = [i.handle_type for i in decode_intents((tmp / "act" / "0000000000000001.act").read_bytes())]
print(types[-1] == sysc.INO_ONLY, log.over_budget)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.fspath(Path(__file__).resolve().parents[2])},
                       preexec_fn=lambda: __import__("resource").setrlimit(
                           __import__("resource").RLIMIT_NOFILE, (256, 256)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "1"], r.stdout
