"""Commands around the browse mount: ``browse --group`` (and, below, restore and verify).

``browse --group FILE POINT``: POINT is an existing empty directory; one
directory per member is made in it (``POINT/<member>``) and each is a browse
mount of that member's shadow, served by its own daemon (one FUSE session per
process).  Every member's daemon takes the browse gate of *every* member's
shadow and admits a request only while all the members' shadows stand at one
group checkpoint (fusejournal/browse.py, ``GroupPosition``), so a reader of
POINT sees all members at the same group checkpoint.  Unmount with
``fusejournal umount POINT/<member>`` for each member.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from . import layout
from .errors import EXIT_USAGE, UserError


def browse_group(a: argparse.Namespace) -> int:
    from .group import GroupFileError, load_group
    from .mount import spawn
    if a.browsepoint is not None:
        raise UserError("browse --group FILE POINT takes one POINT (no MOUNTPOINT|JOURNAL)", EXIT_USAGE)
    point = Path(os.path.abspath(a.target))
    try:
        group = load_group(a.group, check=False)
    except GroupFileError as e:
        raise UserError(str(e), EXIT_USAGE) from None
    if not point.is_dir():
        raise UserError(f"{point} is not a directory", EXIT_USAGE)
    if os.listdir(point):
        raise UserError(f"{point} is not empty", EXIT_USAGE)
    done: list[Path] = []
    try:
        for m in group.members:
            tree = m.shadow / layout.SHADOW_TREE
            if not tree.is_dir():
                raise UserError(f"member {m.name!r}: the shadow tree {tree} does not exist")
            bp = point / m.name
            bp.mkdir(mode=0o755)
            argv = ["browse", os.fspath(tree), os.fspath(bp), "--tree", "--group",
                    os.fspath(group.path), "--member", m.name]
            for o in a.o or []:
                argv += ["-o", o]
            spawn(argv)
            done.append(bp)
    except BaseException:
        for bp in done:
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(bp)], capture_output=True)
        for m in group.members:
            try:
                (point / m.name).rmdir()
            except OSError:
                pass
        raise
    print(f"browsing group {group.name!r} at {point}: {', '.join(m.name for m in group.members)} "
          f"(read-only, every member at one group checkpoint)")
    return 0
