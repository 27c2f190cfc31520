"""File descriptors are a cache, not one per inode the kernel knows (issue 7, item 2).

Real mounts whose daemon runs under a hard RLIMIT_NOFILE of 1024 (set in the
``fusejournal mount`` CLI process, inherited by the daemon) serve thousands
of files — creates, ``ls -lR``, walks with lstat, writes, renames, hard
links, checkpoints — without EMFILE, and the shadow equals the original.
Operations called directly with a tiny fd cache show every object stays
reachable after its fd was evicted: renamed, hard-linked, unlinked-but-open,
deep.  Also: listings show ``.`` and ``..`` (item 3).
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import subprocess
from pathlib import Path

import pyfuse3
import pytest

from fusejournal import records as R
from fusejournal.fs import ROOT, Operations
from fusejournal.halt import Halt
from fusejournal.tempstore import TempStore

from conftest import Mounted, can_mount, fj
from snapshot import assert_same, snapshot

CTX = pyfuse3.RequestContext()
LIMIT = 1024


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def mount_limited(m: Mounted) -> None:
    """``fusejournal mount`` with soft and hard RLIMIT_NOFILE 1024 (the daemon inherits it)."""
    fj("mount", m.source, m.mountpoint, "--journal", m.journal, "--shadow", m.shadow,
       preexec_fn=_limit_fds)
    m.pid = m.status()["pid"]
    with open(f"/proc/{m.pid}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max open files"))
    assert line.split()[3:5] == [str(LIMIT), str(LIMIT)], line


def daemon_fds(m: Mounted) -> int:
    return len(os.listdir(f"/proc/{m.pid}/fd"))


def no_emfile(m: Mounted) -> None:
    text = (m.journal / "daemon.log").read_text(errors="replace")
    assert "Too many open files" not in text and "EMFILE" not in text, text[-3000:]
    assert m.status()["pid"] == m.pid          # the daemon still answers


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root, /dev/fuse and fusermount3")


@needs_mount
def test_thousands_of_files_under_a_hard_limit_of_1024(dirs: Mounted) -> None:
    m = dirs
    mount_limited(m)
    mnt = m.mountpoint
    ndirs, per_dir = 40, 140                       # 5,600 files, 40 directories
    for d in range(ndirs):
        os.mkdir(mnt / f"d{d:02}")
        for i in range(per_dir):
            fd = os.open(mnt / f"d{d:02}" / f"f{i:03}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, f"{d}/{i}\n".encode())
            finally:
                os.close(fd)
    assert daemon_fds(m) < LIMIT
    m.checkpoint("created")

    r = subprocess.run(["ls", "-lRa", os.fspath(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(" f1") == ndirs * 40        # f100..f139 in every directory
    r = subprocess.run(["find", os.fspath(mnt), "-type", "f", "-printf", "%i %s\n"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("\n") == ndirs * per_dir, r.stderr[-2000:]
    seen = 0
    for root, dnames, fnames in os.walk(mnt):
        for n in dnames + fnames:
            os.lstat(os.path.join(root, n))
            seen += 1
    assert seen == ndirs * (per_dir + 1)

    # writes to many files (every third), chmod, xattrs
    for d in range(ndirs):
        for i in range(0, per_dir, 3):
            with open(mnt / f"d{d:02}" / f"f{i:03}", "ab") as f:
                f.write(b"more\n" * (i + 1))
        os.chmod(mnt / f"d{d:02}" / "f001", 0o600)
        os.setxattr(mnt / f"d{d:02}" / "f002", b"user.k", b"v%d" % d)
    m.checkpoint("written")

    # renames of directories and files, across directories; hard links
    for d in range(0, ndirs, 4):
        os.rename(mnt / f"d{d:02}", mnt / f"r{d:02}")
    for d in range(1, ndirs, 4):
        for i in range(0, per_dir, 7):
            os.rename(mnt / f"d{d:02}" / f"f{i:03}", mnt / f"d{d + 1:02}" / f"moved{d}_{i}")
    for d in range(2, ndirs, 4):
        for i in range(1, per_dir, 5):
            os.link(mnt / f"d{d:02}" / f"f{i:03}", mnt / f"d{d + 1:02}" / f"link{d}_{i}")
    for d in range(3, ndirs, 4):
        for i in range(2, per_dir, 9):
            os.unlink(mnt / f"d{d:02}" / f"f{i:03}")
    # write through both names of a linked file, and into renamed directories
    for d in range(2, ndirs, 4):
        with open(mnt / f"d{d + 1:02}" / f"link{d}_1", "ab") as f:
            f.write(b"via link\n")
    for d in range(0, ndirs, 4):
        with open(mnt / f"r{d:02}" / "new", "wb") as f:
            f.write(b"in a renamed directory\n")
    r = subprocess.run(["ls", "-lR", os.fspath(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert daemon_fds(m) < LIMIT
    cp = m.checkpoint("moved")
    m.wait(cp)
    no_emfile(m)
    assert_same(snapshot(m.source), snapshot(m.tree))
    m.umount()


@needs_mount
@pytest.mark.skipif(os.environ.get("FJ_BIG") != "1",
                    reason="100,000 entries, about 40 s: set FJ_BIG=1 to run it")
def test_ls_l_of_100000_entries_under_a_hard_limit_of_1024(dirs: Mounted) -> None:
    n = 100_000
    big = dirs.source / "big"
    big.mkdir()
    dfd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(n):
            os.close(os.open(f"e{i:06}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)
    mount_limited(dirs)
    r = subprocess.run(["ls", "-l", os.fspath(dirs.mountpoint / "big")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("\n") == n + 1          # "total" and one line per entry
    with open(dirs.mountpoint / "big" / "e099999", "wb") as f:
        f.write(b"last")
    cp = dirs.checkpoint("big")
    dirs.wait(cp)
    no_emfile(dirs)
    assert (dirs.tree / "big" / "e099999").read_bytes() == b"last"
    dirs.umount()


@needs_mount
def test_ls_a_shows_dot_and_dotdot(mounted: Mounted) -> None:
    mnt = mounted.mountpoint
    os.makedirs(mnt / "a" / "b")
    (mnt / "a" / "f").write_bytes(b"x")

    def listing(p: Path) -> dict[str, int]:
        out = subprocess.run(["ls", "-ai1", os.fspath(p)], capture_output=True, text=True, check=True).stdout
        return {name: int(ino) for ino, name in (ln.split(None, 1) for ln in out.splitlines())}

    root = listing(mnt)
    assert {".", "..", "a"} <= set(root)
    assert root["."] == os.stat(mnt).st_ino      # (ls shows the host's ".." of a mount point)
    a = listing(mnt / "a")
    assert set(a) == {".", "..", "b", "f"}
    assert a["."] == os.stat(mnt / "a").st_ino and a[".."] == os.stat(mnt).st_ino
    b = listing(mnt / "a" / "b")
    assert set(b) == {".", ".."} and b[".."] == os.stat(mnt / "a").st_ino
    assert sorted(os.listdir(mnt / "a")) == ["b", "f"]         # Python hides the dots
    cp = mounted.checkpoint()
    mounted.wait(cp)
    assert_same(snapshot(mounted.source), snapshot(mounted.tree))
    mounted.umount()


# ---------------------------------------------------------------- Operations called directly


@pytest.fixture(params=["names", "handles"])
def small(tmp_path: Path, request):
    """Operations with an fd cache of 4: almost every fd must be reopened (by name and
    open file only, or by file handle first as a root daemon does)."""
    if request.param == "handles" and os.geteuid() != 0:
        pytest.skip("open_by_handle_at needs root")
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    o = Operations(fd, store=TempStore(None), halt=Halt(), fd_cache=4)
    o.inodes.use_handles = request.param == "handles"
    o.src = src
    yield o
    o.close_all()
    os.close(fd)


async def test_evicted_inodes_reopen_by_name(small: Operations) -> None:
    o = small
    d = (await o.mkdir(ROOT, b"d", 0o755, CTX)).st_ino
    files = []
    for i in range(30):
        fi, attr = await o.create(d, b"f%d" % i, 0o644, os.O_WRONLY, CTX)
        await o.write(fi.fh, 0, b"%d" % i)
        await o.release(fi.fh)
        files.append(attr.st_ino)
    assert o.inodes.cached_fds <= o.inodes.capacity
    for i, fino in enumerate(files):                 # every one reopened by (parent, name)
        assert (await o.getattr(fino, CTX)).st_size == len(b"%d" % i)
    assert o.inodes.reopened > 20
    # renamed: its directory's name follows; the file follows too
    await o.rename(ROOT, b"d", ROOT, b"e", 0, CTX)
    await o.rename(d, b"f3", d, b"g3", 0, CTX)
    for fino in files:
        await o.getattr(fino, CTX)
    a = pyfuse3.EntryAttributes()
    a.st_mode = 0o600
    from types import SimpleNamespace
    f = SimpleNamespace(update_mode=True, update_size=False, update_uid=False, update_gid=False,
                        update_atime=False, update_mtime=False)
    await o.setattr(files[3], a, f, None, CTX)
    assert stat.S_IMODE(os.stat(o.src / "e" / "g3").st_mode) == 0o600
    rec = list(o.store.take())[-1]
    assert isinstance(rec, R.Setattr)
    assert (rec.ino, rec.mask, rec.mode, rec.path) == (os.stat(o.src / "e" / "g3").st_ino,
                                                       R.ATTR_MODE, 0o600, b"")


async def test_hard_links_and_unlinked_open_files_stay_reachable(small: Operations) -> None:
    o = small
    a = (await o.mkdir(ROOT, b"a", 0o755, CTX)).st_ino
    b = (await o.mkdir(ROOT, b"b", 0o755, CTX)).st_ino
    fi, attr = await o.create(a, b"x", 0o644, os.O_RDWR, CTX)
    x = attr.st_ino
    await o.link(x, b, b"y", CTX)                    # the kernel now knows both names
    await o.unlink(b, b"y", CTX)                     # the newest name goes: the other remains
    for i in range(10):                               # push x's fd out of the cache
        await o.mkdir(ROOT, b"pad%d" % i, 0o755, CTX)
    assert (await o.getattr(x, CTX)).st_nlink == 1
    await o.unlink(a, b"x", CTX)                     # unlinked, still open: reached via the open file
    for i in range(10):
        await o.lookup(ROOT, b"pad%d" % i, CTX)
        await o.getattr((await o.lookup(ROOT, b"pad%d" % i, CTX)).st_ino, CTX)
    assert (await o.getattr(x, CTX)).st_nlink == 0
    await o.release(fi.fh)
    for fd, _ in o.inodes._cache.values():            # as if evicted
        os.close(fd)
    o.inodes._cache.clear()
    with pytest.raises(pyfuse3.FUSEError) as e:       # gone for good: an error, not a crash
        await o.getattr(x, CTX)
    assert e.value.errno == errno.ESTALE


async def test_readdir_remembers_without_opening(small: Operations) -> None:
    o = small
    for i in range(200):
        (o.src / f"n{i}").write_bytes(b"")
    from fusejournal.fs import PATCHED_PYFUSE3, dir_fh
    opened = await o.opendir(ROOT, CTX)
    if PATCHED_PYFUSE3:                               # FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE
        assert opened.cache_readdir and opened.keep_cache
    fh = dir_fh(opened)
    got = []

    class Token:
        pass
    import unittest.mock as mock
    with mock.patch.object(pyfuse3, "readdir_reply", lambda tok, name, attr, nid: got.append((name, attr.st_ino)) or True):
        await o.readdir(fh, 0, Token())
    await o.releasedir(fh)
    assert [g[0] for g in got[:2]] == [b".", b".."] and len(got) == 202
    assert got[0][1] == got[1][1] == ROOT            # the mount root is its own parent
    assert o.inodes.cached_fds == 0                  # identity only, no fd per entry
    sub = (await o.mkdir(ROOT, b"sub", 0o755, CTX)).st_ino
    fh = dir_fh(await o.opendir(sub, CTX))
    got.clear()
    with mock.patch.object(pyfuse3, "readdir_reply", lambda tok, name, attr, nid: got.append((name, attr.st_ino)) or True):
        await o.readdir(fh, 0, Token())
    await o.releasedir(fh)
    assert got == [(b".", sub), (b"..", ROOT)]
    assert all(o.inodes.get(os.stat(o.src / f"n{i}").st_ino).lookups == 1 for i in range(200))
    assert o.inodes.get(ROOT).lookups == 1 << 62      # no lookup taken for . or ..


async def test_fd_fetched_in_a_request_is_not_evicted(small: Operations) -> None:
    o = small
    dirs = [(await o.mkdir(ROOT, b"s%d" % i, 0o755, CTX)).st_ino for i in range(8)]
    o.inodes.new_request()
    fds = [o.inodes.get(d).fd for d in dirs]          # 8 fetches in one request, capacity 4
    for fd, d in zip(fds, dirs):
        assert os.fstat(fd).st_ino == d               # none was closed under us
    o.inodes.new_request()
    o.inodes.get(dirs[0]).fd
    assert o.inodes.cached_fds <= o.inodes.capacity  # the overflow is trimmed afterwards


async def test_out_of_fds_empties_the_cache_instead_of_failing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"f{i}").write_bytes(b"x" * i)
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    o = Operations(fd, store=TempStore(None), halt=Halt(), fd_cache=1000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        finos = [(await o.lookup(ROOT, b"f%d" % i, CTX)).st_ino for i in range(60)]
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 10, hard))
        for i, fino in enumerate(finos):          # each getattr opens an fd: the limit is hit
            assert (await o.getattr(fino, CTX)).st_size == i
        assert o.inodes.capacity < 1000
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        o.close_all()
        os.close(fd)


async def test_file_handle_reaches_an_object_renamed_behind_the_mount(small: Operations) -> None:
    o = small
    d = (await o.mkdir(ROOT, b"d", 0o755, CTX)).st_ino
    fi, attr = await o.create(d, b"f", 0o644, os.O_WRONLY, CTX)
    await o.release(fi.fh)
    for i in range(8):                                # evict f's fd
        await o.mkdir(ROOT, b"pad%d" % i, 0o755, CTX)
    os.rename(o.src / "d" / "f", o.src / "elsewhere")  # not through the mount: names are stale
    if o.inodes.use_handles:
        assert (await o.getattr(attr.st_ino, CTX)).st_ino == attr.st_ino
    else:
        with pytest.raises(pyfuse3.FUSEError) as e:
            await o.getattr(attr.st_ino, CTX)
        assert e.value.errno == errno.ESTALE


async def test_a_reused_inode_number_reaches_the_new_object(small: Operations) -> None:
    o = small
    old = (await o.mkdir(ROOT, b"old", 0o755, CTX)).st_ino
    for i in range(8):                                # its fd leaves the cache
        await o.mknod(ROOT, b"pad%d" % i, stat.S_IFIFO | 0o600, 0, CTX)
    await o.rmdir(ROOT, b"old", CTX)                 # the kernel still knows the number
    reused = None
    for i in range(200):                              # ext4 hands a freed number out again soon
        fd = os.open(o.src / f"n{i}", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"new object")
        os.close(fd)
        if os.stat(o.src / f"n{i}").st_ino == old:
            reused = b"n%d" % i
            break
    if reused is None:
        pytest.skip("the filesystem did not reuse the inode number")
    o.store.take()
    assert (await o.lookup(ROOT, reused, CTX)).st_ino == old
    assert (await o.getattr(old, CTX)).st_size == len(b"new object")
    await o.setxattr(old, b"user.k", b"v", CTX)       # named by inode key, as a file
    (rec,) = o.store.take()
    assert isinstance(rec, R.Setxattr) and (rec.ino, rec.path) == (os.stat(o.src / os.fsdecode(reused)).st_ino, b"")
