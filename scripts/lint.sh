#!/usr/bin/env bash
# Lint and type checks (CI runs them before the tests): ruff (pyflakes, bugbear,
# import order, pyupgrade) over the whole tree, and mypy --strict over the units.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/ruff ] && [ -x .venv/bin/mypy ] || .venv/bin/pip install -q -e '.[test,lint]'
.venv/bin/ruff check fusejournal tests bench
# The units, strictly typed; pyfuse3 stays out of them (only fs.py, browse.py and
# session.py, the FUSE layer, import it: checked below).
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/halt.py fusejournal/compression.py fusejournal/faults.py fusejournal/layout.py \
  fusejournal/errors.py fusejournal/tempstore.py fusejournal/activity.py fusejournal/sysc.py \
  fusejournal/resyncflag.py fusejournal/inodes.py fusejournal/staging.py fusejournal/session.py \
  fusejournal/checks.py fusejournal/daemonize.py fusejournal/treewalk.py fusejournal/streamer.py \
  fusejournal/fuseloop.py
# the browse gate, restore and verify (issue 10)
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/browsegate.py fusejournal/restore.py fusejournal/verify_cmd.py \
  fusejournal/history.py fusejournal/history_view.py
# the shadow, its seed, verifier and resync; record validation; recovery
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/shadow.py fusejournal/seed.py fusejournal/verify.py fusejournal/resync.py \
  fusejournal/records_check.py fusejournal/recovery.py
# the updater's process and its task in the daemon (issue 11)
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/updatetask.py fusejournal/updaterproc.py
# consistency groups (issue 9): the group file and commit log, the shared cut, the
# coordinator, a member's side, the group commands
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/group.py fusejournal/groupgate.py fusejournal/coordinator.py fusejournal/member.py \
  fusejournal/groupcli.py fusejournal/groupretention.py fusejournal/groupseed.py
# the online seed (issue 12)
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/seeding.py
# the acquisition, the control attributes (issue 8 item 6)
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/acquisition.py fusejournal/control.py
# the FUSE layer's Operations and the daemon's wiring
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/fs.py fusejournal/mount.py
# the journal directory, the record types
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/journal.py fusejournal/records.py
# the ordered log, the updater
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/log.py fusejournal/updater.py
# the command line; the browse mounts
.venv/bin/mypy --strict --follow-imports=silent --ignore-missing-imports \
  fusejournal/cli.py fusejournal/browse.py fusejournal/browsecli.py fusejournal/__init__.py
# No merge left half-done: conflict markers in any tracked file
if git grep -nE '^(<<<<<<<|>>>>>>>) ' -- . ':!scripts/lint.sh' ; then
  echo "conflict markers left in the files above" >&2; exit 1
fi
# One FUSE layer: no other module imports pyfuse3
if grep -lE '^\s*(import pyfuse3|from pyfuse3)' fusejournal/*.py | grep -vE '/(fs|browse|session|fuseloop)\.py$'; then
  echo "pyfuse3 is imported outside the FUSE layer (fs.py, browse.py, session.py, fuseloop.py)" >&2; exit 1
fi
