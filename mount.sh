#!/usr/bin/env bash
# Mount SOURCE in place with the default journal and shadow, installing what is
# missing first (Debian/Ubuntu: fuse3, attr, a venv with fusejournal).
#   ./mount.sh SOURCE [extra `fusejournal mount` options]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -lt 1 ]; then
  echo "usage: $0 SOURCE [fusejournal mount options]" >&2
  exit 2
fi
missing=""
command -v fusermount3 >/dev/null || missing="$missing fuse3"
command -v setfattr >/dev/null || missing="$missing attr"
dpkg-query -W -f='${Status}' libfuse3-dev 2>/dev/null | grep -q "install ok installed" || missing="$missing libfuse3-dev pkg-config gcc python3-venv python3-dev"
if [ -n "$missing" ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing
fi
[ -x "$here/.venv/bin/fusejournal" ] || "$here/scripts/setup-venv.sh"
exec "$here/.venv/bin/fusejournal" mount "$@"
