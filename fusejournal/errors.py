"""User errors: one exception type carrying a message and an exit code; and the
updater's errors (shared by updater.py, staging.py and records_check.py).

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

import errno

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


class UpdaterError(Exception):
    """A batch could not be applied (rejected as unsafe, or the shadow disagrees with it)."""


#: errnos that mean "the shadow's filesystem is full": a state to wait out, not damage
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class NoSpace(UpdaterError):
    """The shadow's filesystem ran out of space (ENOSPC/EDQUOT) while applying a batch.

    Transient: the staging cursor keeps the position, nothing is wrong with
    the shadow or the log, and :meth:`Updater.run_once` resumes exactly
    there once space is freed.  ``checkpoint``/``record`` say where it stopped.
    """

    def __init__(self, message: str, checkpoint: int | None = None, record: int | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.record = record


class NoFds(NoSpace):
    """The updater ran out of file descriptors (EMFILE/ENFILE) while applying a batch.

    Transient like :class:`NoSpace` (it is one, so every caller that waits a full
    shadow out waits this out too): nothing is wrong with the shadow, the batch's fds
    are closed, and the next pass resumes at the staging cursor.
    """
