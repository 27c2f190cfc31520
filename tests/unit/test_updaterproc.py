"""Pure units of the updater's process (updaterproc.py, updatetask.py)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusejournal.log import Marker, OrderedLog
from fusejournal.records import Mkdir, Write
from fusejournal.updaterproc import ForwardedLog, Lines, encode_message, info_from_json, info_to_json
from fusejournal.updatetask import wait_for_previous_updater


def test_checkpoint_info_round_trip_reads_the_same_records(tmp_path: Path) -> None:
    olog = OrderedLog(tmp_path / "log")
    olog.open()
    olog.append([Mkdir(0o755, 0, 0, 1, 2, b"d")], Marker(1, "a", 5, 0, 0, 0, extra={"group_checkpoint": 3}))
    olog.append([Write(7, 0, 9, b"x" * 100)], Marker(2, "b\u00e9", 6, 0, 0, 0))
    infos = olog.checkpoints(0)
    sent = Lines().feed(encode_message({"infos": [info_to_json(i) for i in infos]}))[0]["infos"]
    back = [info_from_json(d) for d in sent]
    assert back == infos and back[0].marker.extra == {"group_checkpoint": 3}
    flog = ForwardedLog(tmp_path / "log")
    flog.add(back[:1])
    flog.add(back)                       # told twice: kept once
    assert [i.marker.checkpoint for i in flog.checkpoints(0)] == [1, 2]
    seen = []
    flog.on_batch = seen.append
    flog.verify(back[1])
    assert seen == [back[1]] and list(flog.records(back[1])) == list(olog.records(infos[1]))
    flog.forget(1)
    assert [i.marker.checkpoint for i in flog.checkpoints(0)] == [2]
    olog.close()


def test_lines_split_across_chunks() -> None:
    lines = Lines()
    data = encode_message({"op": "state", "seq": 1}) + encode_message({"op": "applied", "applied": 2})
    assert lines.feed(data[:5]) == []
    assert lines.feed(data[5:-3]) == [{"op": "state", "seq": 1}]
    assert lines.feed(data[-3:]) == [{"op": "applied", "applied": 2}]


def _hold_then_die(root: Path, child_seconds: float) -> subprocess.Popen:
    """A process (a daemon) that flocks ``root``, starts a child (its updater) that inherits
    the open file and lives ``child_seconds``, then dies itself.  Returns the child."""
    script = (
        "import fcntl, os, subprocess, sys\n"
        f"fd = os.open({os.fspath(root)!r}, os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep("
        f"{child_seconds})'], pass_fds=(fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(r.stdout)


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_new_daemon_waits_for_the_previous_updater_to_be_gone(tmp_path: Path) -> None:
    """The flock a dead daemon took, still held by its updater's process (which inherited
    it), is waited for: when wait_for_previous_updater returns, that process is gone."""
    root = tmp_path / "shadow"
    root.mkdir()
    child = _hold_then_die(root, 1.0)
    try:
        assert not _gone(child)
        wait_for_previous_updater(root, timeout=60)
        assert _gone(child)
        fd = os.open(root, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # and the claim is free
        os.close(fd)
    finally:
        if not _gone(child):
            os.kill(child, 9)


def test_a_live_daemons_claim_is_not_waited_for(tmp_path: Path) -> None:
    """A flock taken by a live process (another daemon using this shadow) is left to the
    claim, which refuses it at once: no waiting out the bound."""
    import time
    wait_for_previous_updater(tmp_path / "missing")
    root = tmp_path / "held"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)           # held by this very (live) process
    try:
        t0 = time.monotonic()
        wait_for_previous_updater(root, timeout=60)
        assert time.monotonic() - t0 < 60
    finally:
        os.close(fd)


async def test_telling_a_process_that_is_gone_returns_quietly(tmp_path: Path) -> None:
    """The daemon tells its updater's process of a checkpoint just after that process
    died: the send fails (EPIPE) and ``_tell`` returns; an error escaping it would be
    wrapped in an ExceptionGroup by the nursery and end the daemon."""
    import socket

    import trio

    from fusejournal.updatetask import UpdateTask
    olog = OrderedLog(tmp_path / "log")
    olog.open()
    olog.append([Write(7, 0, 9, b"x")], Marker(1, "a", 5, 0, 0, 0))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.close()                        # the process is gone
    task = UpdateTask(None, olog, None, 0)   # type: ignore[arg-type]
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    with trio.fail_after(10):
        await task._tell(stream)
    await stream.aclose()
    olog.close()


def test_receive_works_on_a_socket_fd_above_fd_setsize() -> None:
    """The updater process's socket may be numbered above 1024 (select() refused it with
    "filedescriptor out of range" after a deep walk; test_depth's updater died of it)."""
    import resource
    import socket

    from fusejournal.updaterproc import UpdaterLoop
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2100:          # raise it only, never lower it
        if hard != resource.RLIM_INFINITY and hard < 2100:
            pytest.skip(f"the hard open-file limit {hard} is below 2100")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2100, hard))
    try:
        a, b = socket.socketpair()
        with a, b:
            high = fcntl.fcntl(b.fileno(), fcntl.F_DUPFD_CLOEXEC, 2000)
            loop = UpdaterLoop.__new__(UpdaterLoop)
            loop.sock = socket.socket(fileno=high)
            with loop.sock:
                loop.lines = Lines()
                assert loop.receive(0.01) == []
                a.sendall(encode_message({"op": "x"}))
                assert loop.receive(5) == [{"op": "x"}]
                a.shutdown(socket.SHUT_WR)
                assert loop.receive(5) is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
