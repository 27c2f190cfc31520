"""Real FUSE mounts: pass-through semantics, checkpoints, the shadow, the CLI."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Mounted, checkpoint_and_compare, fj, is_mounted, make_traversable, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# ----------------------------------------------------------- the basic path

def test_write_checkpoint_shadow(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    (mp / "a.txt").write_bytes(b"hello\n")
    (mp / "dir").mkdir()
    (mp / "dir" / "b.bin").write_bytes(os.urandom(300_000))
    assert (mounted.source / "a.txt").read_bytes() == b"hello\n"      # passed through
    assert not (mounted.tree / "a.txt").exists()                       # not before update permission
    n = checkpoint_and_compare(mounted)
    assert n == 1
    assert int(os.getxattr(mp, b"user.fusejournal.shadow_checkpoint")) == 1
    # later changes are not in the shadow until the next checkpoint
    (mp / "a.txt").write_bytes(b"changed\n")
    time.sleep(0.2)
    assert (mounted.tree / "a.txt").read_bytes() == b"hello\n"
    assert checkpoint_and_compare(mounted) == 2


def test_seed_is_checkpoint_zero(dirs: Mounted) -> None:
    s = dirs.source
    (s / "old").mkdir()
    (s / "old" / "f").write_bytes(b"x" * 5000)
    os.symlink("old/f", s / "link")
    os.link(s / "old" / "f", s / "hard")
    os.setxattr(s / "old" / "f", b"user.k", b"v")
    os.chown(s / "hard", 1234, 5678)
    expected = snapshot(s)
    dirs.mount()
    assert dirs.status()["shadow_checkpoint"] == 0
    assert_same(expected, snapshot(dirs.tree))


def test_in_place_mount(tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    (src / "existing").write_text("before")
    m = Mounted(src, src, tmp_path / "j", tmp_path / "s")
    try:
        m.mount()
        assert is_mounted(src)
        assert (src / "existing").read_text() == "before"
        (src / "new").write_text("through the mount")
        (src / "existing").write_text("after")
        n = m.checkpoint("inplace")
        expected = snapshot(src)
        m.wait(n)
        assert_same(expected, snapshot(m.tree))
        m.umount()
        assert not is_mounted(src)
        assert (src / "new").read_text() == "through the mount"      # really in the original
    finally:
        m.cleanup()


# ---------------------------------------------------------- pass-through

def test_posix_semantics(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    # O_APPEND and O_TRUNC
    with open(mp / "log", "ab") as f:
        f.write(b"one\n")
    with open(mp / "log", "ab") as f:
        f.write(b"two\n")
    assert (mp / "log").read_bytes() == b"one\ntwo\n"
    fd = os.open(mp / "log", os.O_WRONLY | os.O_APPEND)
    os.pwrite(fd, b"three\n", 0)          # O_APPEND: appends whatever the offset
    os.close(fd)
    assert (mp / "log").read_bytes() == b"one\ntwo\nthree\n"
    (mp / "trunc").write_bytes(b"long content here")
    fd = os.open(mp / "trunc", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"short")
    os.close(fd)
    assert (mp / "trunc").read_bytes() == b"short"
    os.truncate(mp / "log", 4)
    # sparse file beyond 4 GiB
    with open(mp / "sparse", "wb") as f:
        f.seek(5 << 30)
        f.write(b"far")
    assert os.stat(mp / "sparse").st_size == (5 << 30) + 3
    # modes exactly as asked, despite any umask
    old = os.umask(0o077)
    try:
        fd = os.open(mp / "mode644", os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
        os.mkdir(mp / "dir755", 0o755)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(mp / "mode644").st_mode) == 0o644 & ~0o077
    os.chmod(mp / "mode644", 0o4751)
    assert stat.S_IMODE(os.stat(mp / "mode644").st_mode) == 0o4751
    os.chown(mp / "mode644", 1234, 5678)
    os.utime(mp / "mode644", ns=(1_000_000_123, 2_000_000_456))
    assert os.stat(mp / "mode644").st_mtime_ns == 2_000_000_456
    # links, renames
    os.symlink("target/does/not/exist", mp / "dangling")
    os.link(mp / "trunc", mp / "trunc.hard")
    assert os.stat(mp / "trunc").st_nlink == 2
    (mp / "over").write_text("will be replaced")
    os.rename(mp / "trunc.hard", mp / "over")
    (mp / "x").write_text("x")
    (mp / "y").write_text("y")
    renameat2(mp / "x", mp / "y", 2)                                  # RENAME_EXCHANGE
    assert (mp / "x").read_text() == "y"
    with pytest.raises(OSError) as e:
        renameat2(mp / "x", mp / "y", 1)                              # RENAME_NOREPLACE
    assert e.value.errno == errno.EEXIST
    os.makedirs(mp / "d1" / "sub")
    (mp / "d1" / "sub" / "f").write_text("deep")
    os.rename(mp / "d1", mp / "dir755" / "d2")
    (mp / "dir755" / "d2" / "sub" / "g").write_text("after dir rename")
    # fifo, xattrs, non-UTF-8 names
    os.mkfifo(mp / "fifo", 0o640)
    os.setxattr(mp / "dir755", b"user.dir", b"dv")
    os.setxattr(mp / "log", b"user.a", b"1")
    os.setxattr(mp / "log", b"user.b", b"2")
    os.removexattr(mp / "log", b"user.a")
    assert os.getxattr(mp / "log", b"user.b") == b"2"
    assert b"user.b" in [os.fsencode(n) for n in os.listxattr(mp / "log")]
    weird = os.fsencode(mp) + b"/caf\xe9-\xff"
    with open(weird, "wb") as f:
        f.write(b"latin1 name")
    os.mkdir(mp / "empty")
    os.rmdir(mp / "empty")
    os.unlink(mp / "dangling")
    # fsync and fdatasync reach the original
    fd = os.open(mp / "synced", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"durable")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    checkpoint_and_compare(mounted)


def test_open_files_across_rename_and_unlink(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    f = open(mp / "a", "wb", buffering=0)
    f.write(b"first")
    os.rename(mp / "a", mp / "b")           # renamed while open
    f.write(b"-second")
    g = open(mp / "gone", "wb", buffering=0)
    g.write(b"x")
    os.unlink(mp / "gone")                  # unlinked while open
    g.write(b"written after unlink")
    (mp / "keep").write_bytes(b"k")
    os.link(mp / "keep", mp / "keep2")
    h = open(mp / "keep", "r+b", buffering=0)
    os.unlink(mp / "keep")                  # one of two links
    h.write(b"K")
    n = checkpoint_and_compare(mounted)
    f.close(), g.close(), h.close()
    assert (mounted.tree / "b").read_bytes() == b"first-second"
    assert (mounted.tree / "keep2").read_bytes() == b"K"
    assert n == 1


def test_mmap_shared_write(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    (mp / "m").write_bytes(b"\0" * 8192)
    with open(mp / "m", "r+b") as f:
        mm = mmap.mmap(f.fileno(), 8192, mmap.MAP_SHARED)
        mm[100:105] = b"MMAP!"
        mm.flush()
        mm.close()
    assert (mounted.source / "m").read_bytes()[100:105] == b"MMAP!"
    checkpoint_and_compare(mounted)


def test_statfs_and_errors(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    sv, native = os.statvfs(mp), os.statvfs(mounted.source)
    assert sv.f_namemax == native.f_namemax
    with pytest.raises(FileNotFoundError):
        os.stat(mp / "missing")
    (mp / "f").write_text("x")
    with pytest.raises(FileExistsError):
        os.mkdir(mp / "f")
    with pytest.raises(OSError) as e:
        os.rmdir(mp / "f")
    assert e.value.errno == errno.ENOTDIR
    # O_DIRECT works (the daemon strips it on the backing fd: FUSE needs no alignment)
    fd = os.open(mp / "direct", os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    try:
        assert os.write(fd, b"y" * 4096) == 4096
    finally:
        os.close(fd)
    assert (mp / "direct").read_bytes() == b"y" * 4096
    # a failed operation is not recorded: the checkpoint still matches
    n = checkpoint_and_compare(mounted)
    assert mounted.status()["pending_operations"] == 0
    assert n == 1


def test_readdir_large_directory(mounted: Mounted) -> None:
    d = mounted.mountpoint / "many"
    d.mkdir()
    names = {f"file-{i:05d}" for i in range(3000)}
    for n in names:
        (d / n).write_bytes(b"")
    assert set(os.listdir(d)) == names
    assert {e.name for e in os.scandir(d)} == names


# -------------------------------------------------------- control attributes

def test_control_attributes(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    assert os.getxattr(mp, b"user.fusejournal.checkpoint") == b"0"
    for bad in (b"", b"x" * 201, b"\xff\xfe", b"new\nline"):
        with pytest.raises(OSError) as e:
            os.setxattr(mp, b"user.fusejournal.update_permission", bad)
        assert e.value.errno == errno.EINVAL, bad
    with pytest.raises(OSError) as e:
        os.setxattr(mp, b"user.fusejournal.bogus", b"1")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.setxattr(mp, b"user.fusejournal.checkpoint", b"7")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.getxattr(mp, b"user.fusejournal.bogus")
    assert e.value.errno == errno.ENODATA
    assert os.getxattr(mp, b"user.fusejournal.checkpoint") == b"0"   # nothing was taken
    os.setxattr(mp, b"user.plain", b"passes through")
    assert os.getxattr(mounted.source, b"user.plain") == b"passes through"
    n = mounted.checkpoint("ok label ✓")
    assert n == 1
    assert not [x for x in os.listxattr(mp) if x.startswith("user.fusejournal")]
    assert not [x for x in os.listxattr(mounted.source) if x.startswith("user.fusejournal")]
    mounted.wait(n)
    assert not [x for x in os.listxattr(mounted.tree) if x.startswith("user.fusejournal")]
    assert os.getxattr(mounted.tree, b"user.plain") == b"passes through"
    r = fj("log", mounted.journal)
    assert "ok label ✓" in r.stdout


def test_only_owner_or_root_may_checkpoint(mounted: Mounted) -> None:
    make_traversable(mounted.mountpoint.parent)
    os.chmod(mounted.mountpoint, 0o777)
    code = ("import os,sys; os.setgid(4321); os.setuid(4321)\n"
            "try:\n os.setxattr(sys.argv[1], b'user.fusejournal.update_permission', b'x')\n"
            "except OSError as e: print(e.errno)\nelse: print(0)")
    r = subprocess.run(["python3", "-c", code, os.fspath(mounted.mountpoint)], capture_output=True, text=True)
    assert r.stdout.strip() == str(errno.EPERM), r.stderr
    os.chown(mounted.mountpoint, 4321, 4321)
    r = subprocess.run(["python3", "-c", code, os.fspath(mounted.mountpoint)], capture_output=True, text=True)
    assert r.stdout.strip() == "0", r.stderr


def test_created_with_caller_ownership(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    make_traversable(mp.parent)
    os.chmod(mp, 0o777)
    code = ("import os,sys; os.setgid(4321); os.setuid(1234); os.umask(0o022)\n"
            "p=sys.argv[1]; fd=os.open(p+'/u', os.O_CREAT|os.O_WRONLY, 0o640); os.close(fd)\n"
            "os.mkdir(p+'/ud', 0o750); os.symlink('u', p+'/ul')")
    subprocess.run(["python3", "-c", code, os.fspath(mp)], check=True)
    for name in ("u", "ud"):
        st = os.lstat(mounted.source / name)
        assert (st.st_uid, st.st_gid) == (1234, 4321), name
    assert stat.S_IMODE(os.stat(mounted.source / "u").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(mounted.source / "ud").st_mode) == 0o750
    assert os.lstat(mounted.source / "ul").st_uid == 1234
    checkpoint_and_compare(mounted)


# ------------------------------------------------------------ the CLI

def test_cli_checkpoint_status_wait_log(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    (mp / "f").write_bytes(b"z" * 10000)
    st = json.loads(fj("status", mp, "--json").stdout)
    assert st["pending_operations"] >= 2 and st["pending_bytes"] >= 10000
    r = fj("checkpoint", mp, "--label", "nightly")
    assert r.stdout.strip() == "1"
    fj("wait", mp, "--timeout", "30")
    st = json.loads(fj("status", mp, "--json").stdout)
    assert st["last_checkpoint"] == 1 and st["shadow_checkpoint"] == 1
    assert st["pending_operations"] == 0 and st["log_stored_bytes"] > 0
    r = fj("log", mounted.journal)
    table, _, retained = r.stdout.partition("retained in the shadow")   # then what the shadow keeps
    assert "nightly" in table and table.count("\n") == 2
    assert "nightly  (latest)" in retained
    # the journal directory works as a target too
    assert json.loads(fj("status", mounted.journal, "--json").stdout)["last_checkpoint"] == 1
    r = fj("wait", mp, "--checkpoint", "5", "--timeout", "0.3", check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = fj("checkpoint", mp, "--label", "", check=False)
    assert r.returncode == 2 and "Invalid argument" in r.stderr


def test_unmount_keeps_pending_operations(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    (mp / "before").write_text("in checkpoint 1")
    mounted.checkpoint("one")
    (mp / "after").write_text("captured, not yet checkpointed")
    mounted.umount()
    assert not is_mounted(mp)
    mounted.mount()
    assert mounted.status()["pending_operations"] >= 2
    (mp / "more").write_text("after the remount")
    n = checkpoint_and_compare(mounted, "two")
    assert n == 2
    assert (mounted.tree / "after").read_text() == "captured, not yet checkpointed"


def test_browse_is_read_only(mounted: Mounted, tmp_path: Path) -> None:
    mp = mounted.mountpoint
    (mp / "f").write_text("browse me")
    os.link(mp / "f", mp / "g")
    n = mounted.checkpoint()
    mounted.wait(n)
    bp = tmp_path / "browse"
    bp.mkdir()
    try:
        fj("browse", mp, bp)
        assert (bp / "f").read_text() == "browse me"
        assert os.stat(bp / "f").st_nlink == 2          # the hidden inode-key link is not shown
        with pytest.raises(OSError) as e:
            (bp / "new").write_text("x")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.unlink(bp / "f")
        assert e.value.errno == errno.EROFS
        fj("umount", bp)
        assert not is_mounted(bp)
    finally:
        if is_mounted(bp):
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(bp)])


@pytest.mark.parametrize("case", ["missing", "not_dir", "already_mounted", "journal_unwritable",
                                  "journal_in_use", "other_source"])
def test_mount_errors(dirs: Mounted, tmp_path: Path, case: str) -> None:
    if case == "missing":
        r = fj("mount", tmp_path / "nope", dirs.mountpoint, check=False)
        assert "does not exist" in r.stderr
    elif case == "not_dir":
        (tmp_path / "file").write_text("x")
        r = fj("mount", tmp_path / "file", dirs.mountpoint, "--journal", dirs.journal,
               "--shadow", dirs.shadow, check=False)
        assert "not a directory" in r.stderr
    elif case == "already_mounted":
        dirs.mount()
        other = tmp_path / "src2"
        other.mkdir()
        r = fj("mount", other, dirs.mountpoint, "--journal", tmp_path / "j2", "--shadow", tmp_path / "s2",
               check=False)
        assert "already a FUSE mount" in r.stderr
    elif case == "journal_unwritable":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the journal's parent should be")
        r = fj("mount", dirs.source, dirs.mountpoint, "--journal", blocker / "j", "--shadow", dirs.shadow,
               check=False)
        assert "not writable" in r.stderr
    elif case == "journal_in_use":
        dirs.mount()
        mp2 = tmp_path / "mnt2"
        mp2.mkdir()
        r = fj("mount", dirs.source, mp2, "--journal", dirs.journal, "--shadow", dirs.shadow, check=False)
        assert "in use" in r.stderr
        assert not is_mounted(mp2)
    elif case == "other_source":
        dirs.mount()
        dirs.umount()
        other = tmp_path / "src2"
        other.mkdir()
        r = fj("mount", other, dirs.mountpoint, "--journal", dirs.journal, "--shadow", dirs.shadow,
               check=False)
        assert "belongs to another source" in r.stderr
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_writeback_cache_checkpoint_flushes_dirty_pages(dirs: Mounted) -> None:
    """With --writeback-cache, data still in the kernel's page cache at the trigger
    reaches the checkpoint (flushed before the halt)."""
    dirs.mount("--writeback-cache")
    mp = dirs.mountpoint
    with open(mp / "small-writes", "wb") as f:          # no fsync, no close before the trigger
        for i in range(2000):
            f.write(b"%06d\n" % i)
        f.flush()
        n = dirs.checkpoint("dirty")
        dirs.wait(n)
        assert (dirs.tree / "small-writes").read_bytes() == b"".join(b"%06d\n" % i for i in range(2000))
    fd = os.open(mp / "wronly", os.O_WRONLY | os.O_CREAT, 0o600)   # write-only opens work too
    os.write(fd, b"abc")
    os.pwrite(fd, b"Z", 1)
    os.close(fd)
    assert (mp / "wronly").read_bytes() == b"aZc"
    n = dirs.checkpoint()
    dirs.wait(n)
    # the shadow equals the original on disk (the kernel's cached mtimes may differ: design.md)
    assert_same(snapshot(dirs.source), snapshot(dirs.tree))
