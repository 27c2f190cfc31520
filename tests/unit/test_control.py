"""control.py on its own (no FUSE, no Operations): the table of names, operations
and errnos in its docstring, with a fake checkpoint."""

from __future__ import annotations

import errno
import json
from types import SimpleNamespace

import pytest

from fusejournal import layout
from fusejournal.control import MAX_LABEL, Control, check_label
from fusejournal.halt import HaltTimeout

OWNER = 1000


class Fake:
    """The checkpoint Control calls, recording labels; fails as told."""

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.fail: BaseException | None = None
        self.olog = SimpleNamespace(last_checkpoint=4)

    async def checkpoint(self, label: str) -> int:
        if self.fail is not None:
            raise self.fail
        self.labels.append(label)
        return 5


def control(fake: Fake) -> Control:
    return Control(fake, root_uid=lambda: OWNER, shadow_checkpoint=lambda: 3,   # type: ignore[arg-type]
                   status=lambda: {"b": 1, "a": 2}, journal_path="/j/ournal")


def ctx(uid: int) -> SimpleNamespace:
    return SimpleNamespace(uid=uid, gid=uid)


async def test_update_permission_by_owner_and_root() -> None:
    f = Fake()
    c = control(f)
    await c.setxattr(layout.XATTR_UPDATE_PERMISSION, b"nightly", ctx(OWNER))
    await c.setxattr(layout.XATTR_UPDATE_PERMISSION, "ünï".encode(), ctx(0))
    assert f.labels == ["nightly", "ünï"]


@pytest.mark.parametrize("name, value, uid, code", [
    (layout.XATTR_CHECKPOINT, b"x", 0, errno.EINVAL),                  # not settable
    (layout.XATTR_PREFIX + b"other", b"x", 0, errno.EINVAL),
    (layout.XATTR_UPDATE_PERMISSION, b"x", 1001, errno.EPERM),         # another user
    (layout.XATTR_UPDATE_PERMISSION, b"", 0, errno.EINVAL),
    (layout.XATTR_UPDATE_PERMISSION, b"a" * (MAX_LABEL + 1), 0, errno.EINVAL),
    (layout.XATTR_UPDATE_PERMISSION, b"\xff\xfe", 0, errno.EINVAL),    # not UTF-8
    (layout.XATTR_UPDATE_PERMISSION, b"a\nb", 0, errno.EINVAL),        # control character
])
async def test_refusals_are_plain_oserrors_and_take_nothing(name: bytes, value: bytes, uid: int,
                                                            code: int) -> None:
    f = Fake()
    with pytest.raises(OSError) as e:
        await control(f).setxattr(name, value, ctx(uid))
    assert e.value.errno == code and f.labels == []


@pytest.mark.parametrize("failure, code", [
    (HaltTimeout("the halt did not close in 5 s"), errno.EBUSY),
    (OSError(errno.ENOSPC, "journal full"), errno.ENOSPC),
    (OSError(0, "no errno"), errno.EIO),
    (RuntimeError("a bug"), errno.EIO),
])
async def test_a_failed_checkpoint_maps_to_its_errno(failure: BaseException, code: int) -> None:
    f = Fake()
    f.fail = failure
    with pytest.raises(OSError) as e:
        await control(f).setxattr(layout.XATTR_UPDATE_PERMISSION, b"l", ctx(0))
    assert e.value.errno == code


def test_readable_attributes() -> None:
    c = control(Fake())
    assert c.getxattr(layout.XATTR_CHECKPOINT) == b"4"          # the ordered log's last
    assert c.getxattr(layout.XATTR_SHADOW_CHECKPOINT) == b"3"
    assert json.loads(c.getxattr(layout.XATTR_STATUS)) == {"a": 2, "b": 1}
    assert c.getxattr(layout.XATTR_JOURNAL) == b"/j/ournal"
    with pytest.raises(OSError) as e:
        c.getxattr(layout.XATTR_PREFIX + b"nothing")
    assert e.value.errno == errno.ENODATA


def test_check_label_limits() -> None:
    assert check_label(b"a" * MAX_LABEL) == "a" * MAX_LABEL
    with pytest.raises(ValueError, match="control"):
        check_label(b"tab\there")
    with pytest.raises(ValueError, match="control"):
        check_label(b"del\x7f")
