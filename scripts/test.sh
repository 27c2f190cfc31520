#!/usr/bin/env bash
# Run the whole test suite (unit tests, Operations tests, real FUSE mounts).
# Real mounts need root and /dev/fuse; without them those tests are skipped.
#
# With no arguments the test files are spread over worker processes (pytest-xdist,
# --dist loadfile: a file's tests stay together, in one worker), to keep CI's wall time
# down: most real-mount tests wait on daemons, disks and other processes more than they
# use a core.  FJ_TEST_WORKERS sets how many (default 3; 0 runs everything in one
# process).  Each worker has its own --basetemp below ours.  With arguments (or
# FJ_TEST_SERIAL=1) it is one plain pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/setup-venv.sh
.venv/bin/python -c 'import xdist' 2>/dev/null || .venv/bin/pip install -q -e '.[test]'
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)
if [ $# -gt 0 ] || [ "${FJ_TEST_SERIAL:-}" = 1 ]; then
  exec "${PYTEST[@]}" "$@"
fi
workers=${FJ_TEST_WORKERS:-3}
case "$workers" in
  ''|*[!0-9]*) echo "FJ_TEST_WORKERS must be a number of worker processes, not '$workers'" >&2; exit 2;;
esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
args=(--basetemp="$tmp/t" --durations=15 tests/unit tests/ops tests/mount)
if [ "$workers" -gt 0 ]; then
  args=(-n "$workers" --dist loadfile "${args[@]}")
fi
"${PYTEST[@]}" "${args[@]}"
