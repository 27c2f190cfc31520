"""The control attributes on the mount's root directory.

=====================================  ====  ==========================================
name                                   op    meaning
=====================================  ====  ==========================================
``user.fusejournal.update_permission`` set   value = label: take a checkpoint; returns
                                             once it is durable in the ordered log
``user.fusejournal.checkpoint``        get   last confirmed checkpoint id (decimal)
``user.fusejournal.shadow_checkpoint`` get   checkpoint the shadow has applied (decimal)
``user.fusejournal.status``            get   JSON status (see ``fusejournal status``)
``user.fusejournal.journal``           get   absolute path of the journal directory
=====================================  ====  ==========================================

Errors (raised as :class:`OSError` with the errno; the FUSE handler that
calls in maps it to the reply, so this module does not depend on pyfuse3):
setting or removing any ``user.fusejournal.*`` name anywhere but the
mount root → EPERM (the name is reserved; it is never stored on a file or a
subdirectory; reading one there → ENODATA).  On the root: setting any other
``user.fusejournal.*`` name, removing one, or a label that is
empty, longer than 200 bytes, not UTF-8 or has control characters → EINVAL;
a caller that is neither root nor the owner of the mount root → EPERM, for
reads as well (the journaling mount's getxattr checks the caller before it
calls :meth:`Control.getxattr`); a
checkpoint that fails → the errno of the failure (ENOSPC, EIO ...), or EBUSY
when the halt could not close in time.  Unknown names read → ENODATA.  These
names are never listed, never stored in the original tree nor the shadow.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Protocol

from . import layout
from .acquisition import Checkpointer
from .halt import HaltTimeout

log = logging.getLogger(__name__)

MAX_LABEL = 200


def check_label(value: bytes) -> str:
    """Validate an update-permission label; raise ValueError with the reason."""
    if not value:
        raise ValueError("the label is empty")
    if len(value) > MAX_LABEL:
        raise ValueError(f"the label is longer than {MAX_LABEL} bytes")
    try:
        label = value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the label is not UTF-8") from None
    if any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise ValueError("the label contains control characters")
    return label


class Requester(Protocol):
    """Who sent the request: what the control attributes read of pyfuse3's RequestContext."""

    @property
    def uid(self) -> int: ...


class Control:
    def __init__(self, checkpointer: Checkpointer, *, root_uid: Callable[[], int],
                 shadow_checkpoint: Callable[[], int], status: Callable[[], dict[str, object]],
                 journal_path: str, checkpoint: Callable[[str], Awaitable[object]] | None = None,
                 checkpoint_id: Callable[[], int] | None = None) -> None:
        self.checkpointer = checkpointer
        # a consistency group member: update permission makes a group checkpoint,
        # and the checkpoint attribute is the group's (fusejournal/member.py)
        self.checkpoint = checkpoint or checkpointer.checkpoint
        self.checkpoint_id = checkpoint_id or (lambda: checkpointer.olog.last_checkpoint)
        self.root_uid = root_uid
        self.shadow_checkpoint = shadow_checkpoint
        self.status = status
        self.journal_path = journal_path

    async def setxattr(self, name: bytes, value: bytes, ctx: Requester) -> None:
        if name != layout.XATTR_UPDATE_PERMISSION:
            log.warning("refused setxattr of %r: not a settable control attribute", name)
            raise OSError(errno.EINVAL, "not a settable control attribute")
        if ctx.uid != 0 and ctx.uid != self.root_uid():
            log.warning("refused update permission from uid %d: only root or the owner may", ctx.uid)
            raise OSError(errno.EPERM, "only root or the owner of the mount root may checkpoint")
        try:
            label = check_label(value)
        except ValueError as e:
            log.warning("refused update permission: %s", e)
            raise OSError(errno.EINVAL, str(e)) from None
        try:
            await self.checkpoint(label)
        except HaltTimeout as e:
            log.error("checkpoint %r failed: %s", label, e)
            raise OSError(errno.EBUSY, str(e)) from None
        except OSError as e:
            raise OSError(e.errno or errno.EIO, str(e)) from None
        except Exception:
            log.exception("checkpoint %r failed", label)
            raise OSError(errno.EIO, "checkpoint failed") from None

    def getxattr(self, name: bytes) -> bytes:
        if name == layout.XATTR_CHECKPOINT:
            return str(self.checkpoint_id()).encode()
        if name == layout.XATTR_SHADOW_CHECKPOINT:
            return str(self.shadow_checkpoint()).encode()
        if name == layout.XATTR_STATUS:
            return json.dumps(self.status(), sort_keys=True).encode()
        if name == layout.XATTR_JOURNAL:
            return os.fsencode(self.journal_path)
        raise OSError(errno.ENODATA, "no such control attribute")
