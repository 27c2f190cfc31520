"""Real applications and caller-supplied open flags on a real mount (issue 7, items 1 and 3).

Each test drives the mount from other processes (the applications themselves,
or python in a subprocess for another uid), then checkpoints and compares the
shadow with the original: what works on ext4 works through the mount, and is
journaled exactly.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Mounted, checkpoint_and_compare, make_traversable, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.posix_fallocate.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


def run(*args: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120, **kw)
    assert r.returncode == 0, f"{args} failed ({r.returncode}): {r.stdout}{r.stderr}"
    return r


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


# ------------------------------------------------------------ open flags

def test_open_nofollow_existing_file(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    (mp / "f").write_bytes(b"hello")
    os.symlink("f", mp / "link")
    for acc in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
        fd = os.open(mp / "f", acc | os.O_NOFOLLOW)
        os.close(fd)
    fd = os.open(mp / "f", os.O_RDWR | os.O_NOFOLLOW | os.O_APPEND)
    os.write(fd, b" world")
    os.close(fd)
    fd = os.open(mp / "f", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOATIME)
    assert os.read(fd, 100) == b"hello world"
    os.close(fd)
    # a symlink named with O_NOFOLLOW is still refused, as on ext4 (the kernel does that)
    with pytest.raises(OSError) as e:
        os.open(mp / "link", os.O_RDONLY | os.O_NOFOLLOW)
    assert e.value.errno == errno.ELOOP
    # O_NOFOLLOW | O_TRUNC on an existing file
    fd = os.open(mp / "f", os.O_WRONLY | os.O_NOFOLLOW | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    assert (mounted.source / "f").read_bytes() == b"new"
    # creating with O_NOFOLLOW (and O_EXCL) works; an existing name with O_CREAT without O_EXCL opens it
    fd = os.open(mp / "created", os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    os.write(fd, b"c")
    os.close(fd)
    fd = os.open(mp / "created", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    assert os.read(fd, 10) == b"c"
    os.close(fd)
    checkpoint_and_compare(mounted)


def test_open_sync_direct_and_path_flags(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    (mp / "f").write_bytes(b"x" * 8192)
    for extra in (os.O_SYNC, os.O_DSYNC, os.O_DIRECT, os.O_SYNC | os.O_NOFOLLOW):
        fd = os.open(mp / "f", os.O_RDWR | extra)
        buf = ctypes.create_string_buffer(b"y" * 4096, 4096)
        mm = __import__("mmap").mmap(-1, 4096)   # page-aligned buffer, as O_DIRECT wants
        mm.write(buf.raw)
        assert os.pwritev(fd, [mm], 4096) == 4096
        mm.close()
        os.close(fd)
    fd = os.open(mp / "f", os.O_PATH | os.O_NOFOLLOW)   # never reaches the daemon's open
    assert os.fstat(fd).st_size == 8192
    os.close(fd)
    assert (mounted.source / "f").read_bytes() == b"x" * 4096 + b"y" * 4096
    checkpoint_and_compare(mounted)


def test_open_noatime_owner_and_other_uid(mounted: Mounted) -> None:
    """O_NOATIME works for the owner and is EPERM for anyone else, as on ext4."""
    mp = mounted.mountpoint
    make_traversable(mp.parent)
    os.chmod(mp, 0o777)
    (mp / "mine").write_bytes(b"data")
    os.chown(mp / "mine", 4321, 4321)
    (mp / "theirs").write_bytes(b"data")
    os.chmod(mp / "theirs", 0o644)
    code = ("import os,sys; os.setgid(4321); os.setuid(4321)\n"
            "for n in ('mine', 'theirs'):\n"
            "  try: fd = os.open(sys.argv[1] + '/' + n, os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW)\n"
            "  except OSError as e: print(n, e.errno)\n"
            "  else: print(n, len(os.read(fd, 10))); os.close(fd)\n")
    r = run(sys.executable, "-c", code, os.fspath(mp))
    assert r.stdout.split("\n")[:2] == ["mine 4", f"theirs {errno.EPERM}"], r.stdout


# ------------------------------------------------------------ applications

def test_sqlite_reopen_and_second_process(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    db = mp / "app.db"
    con = sqlite3.connect(db)
    con.execute("pragma journal_mode=wal")
    con.execute("create table t (k integer primary key, v text)")
    con.executemany("insert into t (v) values (?)", [(f"row {i}",) for i in range(100)])
    con.commit()
    con.close()
    con = sqlite3.connect(db)                      # the second open of an existing database
    assert con.execute("select count(*) from t").fetchone() == (100,)
    # a second process while the first still has it open
    code = ("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]);"
            "c.execute(\"insert into t (v) values ('other')\"); c.commit();"
            "print(c.execute('select count(*) from t').fetchone()[0])")
    assert run(sys.executable, "-c", code, os.fspath(db)).stdout.strip() == "101"
    if shutil.which("sqlite3"):
        assert run("sqlite3", os.fspath(db), "select count(*) from t;").stdout.strip() == "101"
    con.execute("pragma wal_checkpoint(truncate)")
    con.close()
    checkpoint_and_compare(mounted)
    copy = mounted.tree / "app.db"
    c2 = sqlite3.connect(f"file:{copy}?mode=ro&immutable=1", uri=True)
    assert c2.execute("select count(*) from t").fetchone() == (101,)
    c2.close()


def test_git_honours_gitignore(mounted: Mounted) -> None:
    need("git")
    repo = mounted.mountpoint / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e", "HOME": os.fspath(repo)}
    run("git", "init", "-q", cwd=repo, env=env)
    (repo / ".gitignore").write_text("ignored.txt\nbuild/\n")
    (repo / ".gitattributes").write_text("*.bin binary\n")
    (repo / "kept.txt").write_text("keep me\n")
    (repo / "ignored.txt").write_text("skip me\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.o").write_bytes(b"\0" * 10)
    run("git", "add", "-A", cwd=repo, env=env)
    run("git", "commit", "-q", "-m", "first", cwd=repo, env=env)
    files = run("git", "ls-files", cwd=repo, env=env).stdout.split()
    assert sorted(files) == [".gitattributes", ".gitignore", "kept.txt"]
    assert run("git", "status", "--porcelain", cwd=repo, env=env).stdout == ""
    run("git", "fsck", "--no-progress", cwd=repo, env=env)
    checkpoint_and_compare(mounted)
    # the shadow's copy is a working repository at that commit
    r = run("git", "-C", os.fspath(mounted.tree / "repo"), "log", "--format=%s", env=env)
    assert r.stdout.strip() == "first"


def _sample_tree(root: Path) -> None:
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f.txt").write_text("text\n")
    (root / "d" / "e" / "big").write_bytes(os.urandom(200_000))
    os.symlink("d/f.txt", root / "sym")
    os.link(root / "d" / "f.txt", root / "hard")
    os.chmod(root / "d" / "f.txt", 0o640)
    os.chown(root / "d" / "e" / "big", 1234, 4321)
    os.setxattr(root / "d" / "f.txt", b"user.k", b"v")
    # times in the past: rsync compares whole seconds and skips setting a time that
    # looks equal (on ext4 too), so a tree made in the same second would not compare
    for i, p in enumerate(["d/e/big", "d/f.txt", "sym", "d/e", "d", "."]):
        os.utime(root / p, ns=(1_000_000_000, 1_500_000_000 + i * 1_000_000_001), follow_symlinks=False)


@pytest.mark.parametrize("tool", ["cp", "rsync"])
def test_copy_into_and_out_of_the_mount(mounted: Mounted, tmp_path: Path, tool: str) -> None:
    need(tool)
    outside = tmp_path / "outside"
    outside.mkdir()
    _sample_tree(outside)

    def copy(src: Path, dst: Path) -> None:
        if tool == "cp":
            run("cp", "-a", os.fspath(src) + "/.", os.fspath(dst))
        else:
            run("rsync", "-aHX", os.fspath(src) + "/", os.fspath(dst) + "/")

    into = mounted.mountpoint / "into"
    into.mkdir()
    copy(outside, into)
    assert_same(snapshot(outside), snapshot(into))
    # and again over the existing copy (rsync re-opens existing files; cp -a overwrites)
    (outside / "d" / "f.txt").write_text("changed\n")
    copy(outside, into)
    assert (into / "d" / "f.txt").read_text() == "changed\n"
    back = tmp_path / "back"
    back.mkdir()
    copy(into, back)
    assert_same(snapshot(into), snapshot(back))
    checkpoint_and_compare(mounted)


# ------------------------------------------------------------ fallocate and O_TMPFILE

def test_posix_fallocate_falls_back_to_zeros(mounted: Mounted) -> None:
    """fallocate(2) is EOPNOTSUPP on the mount; glibc's posix_fallocate writes zeros
    instead, and those writes are journaled like any others."""
    mp = mounted.mountpoint
    (mp / "f").write_bytes(b"a" * 5000)
    fd = os.open(mp / "f", os.O_RDWR)
    try:
        assert _libc.fallocate(fd, 0, 0, 1 << 20) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
        os.posix_fallocate(fd, 0, 1 << 20)                # python -> glibc posix_fallocate
        assert _libc.posix_fallocate(fd, 3 << 20, 12345) == 0
    finally:
        os.close(fd)
    st = os.stat(mounted.source / "f")
    assert st.st_size == (3 << 20) + 12345
    data = (mounted.source / "f").read_bytes()
    assert data[:5000] == b"a" * 5000 and data[5000:].count(0) == len(data) - 5000
    if shutil.which("fallocate"):
        r = subprocess.run(["fallocate", "-l", "64K", os.fspath(mp / "g")], capture_output=True, text=True)
        assert r.returncode != 0 and "not supported" in r.stderr.lower()
        run("fallocate", "-x", "-l", "64K", os.fspath(mp / "g"))   # the writing fallback
        assert os.stat(mounted.source / "g").st_size == 65536
    checkpoint_and_compare(mounted)
    assert os.stat(mounted.tree / "f").st_size == (3 << 20) + 12345


def test_o_tmpfile_refused_cleanly_and_fallbacks_work(mounted: Mounted) -> None:
    mp = mounted.mountpoint
    (mp / "d").mkdir()
    with pytest.raises(OSError) as e:
        os.open(mp / "d", O_TMPFILE | os.O_RDWR, 0o600)
    assert e.value.errno == errno.EOPNOTSUPP
    assert os.listdir(mounted.source / "d") == []
    # the usual fallback: create under a temporary name, then rename or unlink it
    tmp = mp / "d" / ".tmp123"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.write(fd, b"payload")
    os.fsync(fd)
    os.rename(tmp, mp / "d" / "final")
    os.close(fd)
    fd = os.open(mp / "d" / ".scratch", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.unlink(mp / "d" / ".scratch")
    os.write(fd, b"never visible")
    os.close(fd)
    # or link(2) it into place (no replace), then drop the temporary name
    fd = os.open(mp / "d" / ".tmp456", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"linked")
    os.close(fd)
    os.link(mp / "d" / ".tmp456", mp / "d" / "linked")
    os.unlink(mp / "d" / ".tmp456")
    # python's tempfile does the same when O_TMPFILE is refused
    import tempfile
    with tempfile.TemporaryFile(dir=mp / "d") as f:
        f.write(b"anonymous")
    assert sorted(os.listdir(mounted.source / "d")) == ["final", "linked"]
    checkpoint_and_compare(mounted)
    assert (mounted.tree / "d" / "final").read_bytes() == b"payload"


def test_open_rdonly_trunc_truncates_and_is_journaled(mounted: Mounted) -> None:
    """Linux truncates on O_RDONLY|O_TRUNC (given write permission); so must the mount."""
    mp = mounted.mountpoint
    (mp / "f").write_bytes(b"some data")
    mounted.checkpoint("before")
    fd = os.open(mp / "f", os.O_RDONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(mounted.source / "f").st_size == 0
    checkpoint_and_compare(mounted)
