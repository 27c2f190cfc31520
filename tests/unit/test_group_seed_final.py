"""A group member's final seed round (fusejournal/groupseed.py, ``MemberSeed``; the seed
itself is seeding.py's, tested in tests/unit/test_seeding_final.py, whose helpers build
the original, the shadow and the log here): bounded by the group's halt bound (past it
the round is not attempted and claims nothing), completed only by the commit (with the
group checkpoint in seeded.json), and the periods of a checkpoint that does not complete
the seed kept."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import trio
from test_seeding_final import MiB, _marker, _task, assert_exact, seeded

from fusejournal.groupseed import MemberSeed
from fusejournal.log import OrderedLog
from fusejournal.seeding import unique
from fusejournal.shadow import SEEDED


def _outcome(cp: int, period: int = 7) -> tuple[SimpleNamespace, SimpleNamespace]:
    taken = SimpleNamespace(period=period)
    info = SimpleNamespace(marker=SimpleNamespace(checkpoint=cp, time_ns=time.time_ns()))
    return taken, info


def test_a_final_round_past_the_halt_bound_is_not_attempted(tmp_path: Path) -> None:
    orig, sh, fd, _ = seeded(tmp_path, 1 * MiB)
    olog = OrderedLog(tmp_path / "log")
    olog.open()
    try:
        orig.new_period()
        orig.write("d0/big", 10, b"changed since the last round")
        orig.create("d1/new", b"N" * 5000)
        olog.append(orig.records, _marker(1))
        task = _task(sh, fd, tmp_path, olog)
        final = unique(orig.new_period())
        task.final_intents = final
        task.replay_after = 0
        task.state = "ready"
        done: list[int] = []
        seed = MemberSeed(task, done.append, halt_timeout=0.0)     # no time at all
        assert seed.wants_hold()
        trio.run(seed.at_cut)
        assert not task.final_pending and task.state == "converging" and task.final_intents == final
        assert seed.marker_extra() == {"seeding": "incomplete"}
        taken, info = _outcome(1)
        trio.run(seed.committed, 1, taken, info)                   # an ordinary group checkpoint
        assert taken.period == 0 and done == [] and not task.done  # its periods kept: dirty set
        assert not (sh.root / SEEDED).exists() and not sh.applied_path.exists()
        # with the bound the group gives, the next final round runs, and the commit completes it
        task.state = "ready"
        task.replay_after = 0
        seed.halt_timeout = 30.0
        trio.run(seed.at_cut)
        assert task.final_pending and seed.marker_extra() == {"seeding": "first complete"}
        taken, info = _outcome(1)
        trio.run(seed.committed, 4, taken, info)
        assert task.done and done == [1] and taken.period == 7     # confirmed normally
        assert sh.applied == 1
        assert json.loads((sh.root / SEEDED).read_text())["group_checkpoint"] == 4
        assert_exact(sh, fd, orig)
    finally:
        olog.close()
        os.close(fd)


def test_an_aborted_or_doubtful_final_round_is_dropped_and_claims_nothing(tmp_path: Path) -> None:
    orig, sh, fd, _ = seeded(tmp_path, 1 * MiB)
    olog = OrderedLog(tmp_path / "log")
    olog.open()
    try:
        orig.new_period()
        orig.write("d0/big", 99, b"x" * 100)
        olog.append(orig.records, _marker(1))
        task = _task(sh, fd, tmp_path, olog)
        task.final_intents = unique(orig.new_period())
        for end in ("failed", "in_doubt"):
            task.state = "ready"
            task.replay_after = 0
            seed = MemberSeed(task, lambda cp: None, halt_timeout=30.0)
            trio.run(seed.at_cut)
            assert task.final_pending and task.final_batch is not None
            taken, _ = _outcome(1)
            if end == "failed":
                seed.failed()
            else:
                seed.in_doubt(taken)
                assert taken.period == 0                           # kept whatever is decided
            assert not task.final_pending and task.final_batch is None and task.state == "converging"
            assert task.final_intents and not task.done
            assert not (sh.root / SEEDED).exists() and not sh.applied_path.exists()
    finally:
        olog.close()
        os.close(fd)
