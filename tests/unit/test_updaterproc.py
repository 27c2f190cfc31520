"""Pure units of the updater's process (updaterproc.py, updatetask.py)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

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


def test_a_new_daemon_waits_for_the_previous_updater_to_be_gone(tmp_path: Path) -> None:
    """A process holding the shadow root's flock (as a dying updater's process does) is
    waited for: when wait_for_previous_updater returns, it has exited."""
    root = tmp_path / "shadow"
    root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({os.fspath(root)!r}, os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(0.7)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        wait_for_previous_updater(root, timeout=30)
        assert holder.poll() is not None
        fd = os.open(root, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # and the claim is free
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()


def test_waiting_is_bounded_and_missing_shadow_is_fine(tmp_path: Path) -> None:
    wait_for_previous_updater(tmp_path / "missing")
    root = tmp_path / "held"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)           # held by this very process (another fd)
    try:
        wait_for_previous_updater(root, timeout=0.2)    # returns: the claim reports it
    finally:
        os.close(fd)
