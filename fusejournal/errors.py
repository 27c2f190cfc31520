"""User errors: one exception type carrying a message and an exit code.

The CLI prints ``fusejournal: <message>`` on one line and exits with the code.
Exit codes (documented in docs/guide.md):

==  =====================================================
0   success
1   unexpected internal error (a bug: the traceback is logged)
2   bad command line or bad argument value
3   the source, mountpoint, journal or shadow is not usable
4   the journal is in use by another daemon
5   timed out (``wait``, ``umount``)
6   the operation failed in the daemon (e.g. a checkpoint failed)
7   damaged journal or shadow found (``fsck``, ``status``)
==  =====================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_UNUSABLE = 3
EXIT_IN_USE = 4
EXIT_TIMEOUT = 5
EXIT_FAILED = 6
EXIT_DAMAGED = 7


class UserError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_UNUSABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
