#!/usr/bin/env bash
# Run the whole test suite (unit tests, Operations tests, real FUSE mounts).
# Real mounts need root and /dev/fuse; without them those tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/setup-venv.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
