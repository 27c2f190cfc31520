#!/usr/bin/env bash
# Run the whole test suite (unit tests, Operations tests, real FUSE mounts).
# Real mounts need root and /dev/fuse; without them those tests are skipped.
#
# With no arguments the layers run side by side, to keep CI's wall time down: the real
# mounts in one pytest, the unit and Operations tests in another (each with its own
# --basetemp); the second one's output follows the first's, and both must pass.  With
# arguments (or FJ_TEST_SERIAL=1) it is one plain pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/setup-venv.sh
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)
if [ $# -gt 0 ] || [ "${FJ_TEST_SERIAL:-}" = 1 ]; then
  exec "${PYTEST[@]}" "$@"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTEST[@]}" --basetemp="$tmp/layers" tests/unit tests/ops >"$tmp/layers.log" 2>&1 &
layers=$!
mounts=0
"${PYTEST[@]}" --basetemp="$tmp/mounts" tests/mount || mounts=$?
rest=0
wait "$layers" || rest=$?
echo "--- tests/unit and tests/ops (run beside the real mounts): exit $rest"
cat "$tmp/layers.log"
echo "--- tests/mount: exit $mounts"
[ "$mounts" -eq 0 ] && [ "$rest" -eq 0 ]
