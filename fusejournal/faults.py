"""Named fault points, for crash tests.

``FUSEJOURNAL_FAULT=NAME`` (or ``NAME:N``, the N-th time it is reached) in the
daemon's environment makes :func:`fault` kill the process with SIGKILL at that
point, exactly as a crash would.  Unset (always, in production) it costs one
comparison.  The points are listed in docs/reliability.md.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("FUSEJOURNAL_FAULT", "")
_name, _, _n = _spec.partition(":")
_remaining = int(_n) if _n.isdigit() else 1


def fault(name: str) -> None:
    global _remaining
    if _name and name == _name:
        _remaining -= 1
        if _remaining <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
