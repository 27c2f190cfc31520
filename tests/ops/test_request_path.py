"""The request path between the kernel and the Operations (issue 11): what the
kernel may cache, and the per-handler request counter behind
``user.fusejournal.requests`` (docs/performance-analysis.md, "Requests per
operation").  The kernel's side is proven on real mounts in
tests/mount/test_kernel_cache.py."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import time
from types import SimpleNamespace

import pyfuse3
import pytest
from opshelp import ops  # noqa: F401  (ops is a fixture)

from fusejournal import records as R
from fusejournal.fs import ROOT, XATTR_REQUESTS, Operations

CTX = pyfuse3.RequestContext()   # uid 0, gid 0


def ctx(uid: int) -> SimpleNamespace:
    return SimpleNamespace(pid=1, uid=uid, gid=uid, umask=0)


async def test_missing_name_is_a_negative_entry_with_the_entry_timeout(ops: Operations) -> None:
    """ENOENT would make the kernel ask again at every stat of the name; an entry with
    st_ino 0 and an entry timeout is cached as "no such name" (fuse_lookup_name)."""
    known = len(ops.inodes)
    e = await ops.lookup(ROOT, b"missing", CTX)
    assert e.st_ino == 0
    assert e.entry_timeout == ops.timeout > 0
    # no inode remembered (no lookup count: the kernel sends no FORGET for it), nothing recorded
    assert len(ops.inodes) == known
    assert list(ops.store.take()) == []
    # the name made afterwards through the mount is found and journaled as usual
    fi, attr = await ops.create(ROOT, b"missing", stat.S_IFREG | 0o644, os.O_WRONLY, CTX)
    await ops.release(fi.fh)
    assert (await ops.lookup(ROOT, b"missing", CTX)).st_ino == attr.st_ino != 0
    assert [type(r) for r in ops.store.take()] == [R.Mknod]


async def test_other_lookup_errors_are_still_errors(ops: Operations) -> None:
    (ops.src / "f").write_bytes(b"x")
    f = await ops.lookup(ROOT, b"f", CTX)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(f.st_ino, b"below", CTX)      # a file is no directory
    assert e.value.errno == errno.ENOTDIR


async def test_read_only_mount_answers_enoent(tmp_path) -> None:
    """The browse mount's timeouts are short or zero and its tree changes behind the
    kernel: it never hands out negative entries."""
    src = tmp_path / "tree"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    o = Operations(fd, read_only=True)
    try:
        with pytest.raises(pyfuse3.FUSEError) as e:
            await o.lookup(ROOT, b"missing", CTX)
        assert e.value.errno == errno.ENOENT
    finally:
        o.close_all()
        os.close(fd)


async def test_requests_are_counted_per_handler(ops: Operations) -> None:
    (ops.src / "f").write_bytes(b"x")
    f = await ops.lookup(ROOT, b"f", CTX)
    await ops.getattr(f.st_ino, CTX)
    await ops.getattr(f.st_ino, CTX)
    fi = await ops.open(f.st_ino, os.O_WRONLY, CTX)
    await ops.write(fi.fh, 0, b"y")
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getxattr(f.st_ino, b"security.capability", CTX)
    await ops.flush(fi.fh)
    await ops.release(fi.fh)
    await ops.forget([(f.st_ino, 1)])
    counts = json.loads(await ops.getxattr(ROOT, XATTR_REQUESTS, CTX))
    assert counts == {"lookup": 1, "getattr": 2, "open": 1, "write": 1, "getxattr": 2,
                      "flush": 1, "release": 1, "forget": 1}


async def test_request_counts_are_for_root_and_the_owner_only(ops: Operations) -> None:
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getxattr(ROOT, XATTR_REQUESTS, ctx(65534))
    assert e.value.errno == errno.EPERM
    os.chown(ops.src, 65534, 65534)
    assert json.loads(await ops.getxattr(ROOT, XATTR_REQUESTS, ctx(65534)))["getxattr"] == 2
    # only on the mount root: elsewhere the name is reserved and absent
    (ops.src / "f").write_bytes(b"x")
    f = await ops.lookup(ROOT, b"f", CTX)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getxattr(f.st_ino, XATTR_REQUESTS, CTX)
    assert e.value.errno == pyfuse3.ENOATTR
    assert XATTR_REQUESTS not in await ops.listxattr(ROOT, CTX)


@pytest.fixture
def nobody_pid():
    """The pid of a process running as uid/gid 65534 without capabilities (the caller
    a request names: its credentials are read from /proc/PID/status)."""
    p = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"])
    try:
        # until setpriv has exec'ed sleep as 65534: setpriv sets the uid first and keeps its
        # capabilities (PR_SET_KEEPCAPS) to set the gid and groups after, so "Uid 65534" alone
        # can be read while CapEff still holds CAP_FSETID (a flaky failure in CI)
        deadline = time.monotonic() + 10
        while True:
            with open(f"/proc/{p.pid}/status") as f:
                status = f.read()
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if (fields.get("Name") == "sleep" and fields.get("Uid", "").split()[:1] == ["65534"]
                    and int(fields.get("CapEff", "1"), 16) == 0 and not fields.get("Groups", "").strip()):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the uid-65534 caller never got ready: {status}")
            time.sleep(0.01)
        yield p.pid
    finally:
        p.kill()
        p.wait()


def caller(pid: int, uid: int) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, uid=uid, gid=uid, umask=0)


async def test_o_trunc_open_by_another_user_clears_set_id_bits(ops: Operations, nobody_pid: int) -> None:
    """The kernel leaves an O_TRUNC truncation to the daemon (atomic_o_trunc) and with it
    the set-id bits ext4 clears; root (CAP_FSETID) keeps them."""
    for name, pid, uid, kept in ((b"a", nobody_pid, 65534, False), (b"b", os.getpid(), 0, True)):
        (ops.src / name.decode()).write_bytes(b"data")
        os.chmod(ops.src / name.decode(), 0o6777)
        f = await ops.lookup(ROOT, name, CTX)
        list(ops.store.take())
        fi = await ops.open(f.st_ino, os.O_WRONLY | os.O_TRUNC, caller(pid, uid))
        await ops.release(fi.fh)
        st = os.stat(ops.src / name.decode())
        assert st.st_size == 0
        assert stat.S_IMODE(st.st_mode) == (0o6777 if kept else 0o777)
        (rec,) = ops.store.take()
        assert isinstance(rec, R.Setattr)
        assert rec.mask == (R.ATTR_SIZE if kept else R.ATTR_SIZE | R.ATTR_MODE)
        assert stat.S_IMODE(rec.mode) == stat.S_IMODE(st.st_mode)


async def test_the_kernels_empty_setattr_after_a_write_clears_setgid(ops: Operations, nobody_pid: int) -> None:
    """After a write by a caller outside the file's group, the kernel drops S_ISGID
    without group-exec (as ext4 does) but FUSE's own recalculation keeps it and sends a
    SETATTR with no attribute: the daemon applies the rule; a member of the group keeps it."""
    from opshelp import fields
    for name, gid, kept in ((b"other", 0, False), (b"member", 65534, True)):
        p = ops.src / name.decode()
        p.write_bytes(b"data")
        os.chown(p, 0, gid)
        os.chmod(p, 0o2767)
        f = await ops.lookup(ROOT, name, CTX)
        list(ops.store.take())
        attr = await ops.setattr(f.st_ino, pyfuse3.EntryAttributes(), fields(), None,
                                 caller(nobody_pid, 65534))
        assert stat.S_IMODE(attr.st_mode) == (0o2767 if kept else 0o767)
        assert stat.S_IMODE(os.stat(p).st_mode) == stat.S_IMODE(attr.st_mode)
        recs = list(ops.store.take())
        assert [r.mask for r in recs] == ([] if kept else [R.ATTR_MODE])


async def test_no_capability_is_answered_from_the_cache_until_an_xattr_changes(ops: Operations, monkeypatch) -> None:
    """The kernel asks for security.capability before every write(2): after the first
    ENODATA the answer comes from the per-inode cache (no system call, counted as a
    getxattr); a setxattr or removexattr through the mount ends it."""
    (ops.src / "f").write_bytes(b"x")
    f = await ops.lookup(ROOT, b"f", CTX)
    calls = []
    real = os.getxattr
    monkeypatch.setattr(os, "getxattr", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    for _ in range(50):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getxattr(f.st_ino, b"security.capability", CTX)
        assert e.value.errno == pyfuse3.ENOATTR
    assert calls == [b"security.capability"]
    assert ops.requests["getxattr"] == 50
    await ops.setxattr(f.st_ino, b"user.a", b"1", CTX)
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getxattr(f.st_ino, b"security.capability", CTX)
    assert len(calls) == 2
    await ops.getxattr(f.st_ino, b"user.a", CTX)            # other names are never cached
    await ops.getxattr(f.st_ino, b"user.a", CTX)
    assert calls[2:] == [b"user.a", b"user.a"]


# ----------------------------------------- FUSE_HANDLE_KILLPRIV_V2: the daemon's duties

def _rec_kinds(recs: list) -> list[tuple[str, int]]:
    return [(type(r).__name__, getattr(r, "mask", 0)) for r in recs]


async def test_killpriv_v2_write_clears_set_id_bits_before_the_write(ops: Operations, nobody_pid: int) -> None:
    """Granted FUSE_HANDLE_KILLPRIV_V2, the contract leaves the set-id bits a write drops
    to the file system (FUSE_WRITE_KILL_SUIDGID); pyfuse3 then passes the writer's
    context to ``write``.  A writer without CAP_FSETID loses S_ISUID, and S_ISGID with
    group-exec or outside the file's group; root, and a group member without
    group-exec, keep them.  The mode is recorded before the write."""
    ops.handle_killpriv_v2_granted = True
    for name, pid, uid, want in ((b"u", nobody_pid, 65534, 0o777), (b"r", os.getpid(), 0, 0o6777),
                                 (b"g", nobody_pid, 65534, 0o2767), (b"o", nobody_pid, 65534, 0o767)):
        p = ops.src / name.decode()
        p.write_bytes(b"data")
        os.chown(p, 0, 65534 if name == b"g" else 0)
        os.chmod(p, 0o2767 if name in (b"g", b"o") else 0o6777)
        f = await ops.lookup(ROOT, name, CTX)
        fi = await ops.open(f.st_ino, os.O_WRONLY, CTX)
        list(ops.store.take())
        assert await ops.write(fi.fh, 4, b"more", caller(pid, uid)) == 4
        await ops.release(fi.fh)
        assert stat.S_IMODE(os.stat(p).st_mode) == want, name
        kinds = _rec_kinds(list(ops.store.take()))
        if want in (0o777, 0o767):
            assert kinds == [("Setattr", R.ATTR_MODE), ("Write", 0)], kinds
        else:
            assert kinds == [("Write", 0)], kinds


@pytest.mark.skipif(os.geteuid() != 0, reason="security.capability needs root")
async def test_killpriv_v2_write_truncate_and_chown_remove_the_file_capability(ops: Operations) -> None:
    """Granted FUSE_HANDLE_KILLPRIV_V2, the kernel stops asking for security.capability
    before writes; a write, a truncate and a chown drop the capability as on ext4,
    and the daemon removes it itself and records the removal before the change (the
    backing filesystem would drop it unrecorded, and the shadow would keep it)."""
    from opshelp import fields
    ops.handle_killpriv_v2_granted = True
    caps = bytes.fromhex("0000000201200000000000000000000000000000")   # cap_net_raw+ep
    for how in ("write", "truncate", "chown"):
        p = ops.src / how
        p.write_bytes(b"data")
        f = await ops.lookup(ROOT, how.encode(), CTX)
        await ops.setxattr(f.st_ino, b"security.capability", caps, CTX)
        assert os.getxattr(p, "security.capability")
        list(ops.store.take())
        if how == "write":
            fi = await ops.open(f.st_ino, os.O_WRONLY, CTX)
            await ops.write(fi.fh, 0, b"x", caller(os.getpid(), 0))
            await ops.release(fi.fh)
        elif how == "truncate":
            await ops.setattr(f.st_ino, pyfuse3.EntryAttributes(st_size=1), fields(update_size=True), None, CTX)
        else:
            attr = pyfuse3.EntryAttributes()
            attr.st_uid = 65534
            await ops.setattr(f.st_ino, attr, fields(update_uid=True), None, CTX)
        with pytest.raises(OSError):
            os.getxattr(p, "security.capability")
        recs = list(ops.store.take())
        assert isinstance(recs[0], R.Removexattr) and recs[0].name == b"security.capability", recs
        # known "none" now: the next write asks nothing
        if how == "write":
            fi = await ops.open(f.st_ino, os.O_WRONLY, CTX)
            await ops.write(fi.fh, 0, b"y", caller(os.getpid(), 0))
            await ops.release(fi.fh)
            assert [type(r) for r in ops.store.take()] == [R.Write]


async def test_killpriv_v2_chown_records_the_set_id_bits_it_drops(ops: Operations) -> None:
    """chown drops S_ISUID (and S_ISGID with group-exec) on the backing filesystem; with
    FUSE_HANDLE_KILLPRIV_V2 the kernel no longer sends that as a mode, so the daemon
    records the mode the chown left, or the shadow would keep the bits."""
    from opshelp import fields
    p = ops.src / "s"
    p.write_bytes(b"data")
    os.chmod(p, 0o6755)
    f = await ops.lookup(ROOT, b"s", CTX)
    list(ops.store.take())
    attr = pyfuse3.EntryAttributes()
    attr.st_uid = 65534
    await ops.setattr(f.st_ino, attr, fields(update_uid=True), None, CTX)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o755
    recs = list(ops.store.take())
    assert [r.mask for r in recs] == [R.ATTR_UID | R.ATTR_MODE]
    assert stat.S_IMODE(recs[0].mode) == 0o755
