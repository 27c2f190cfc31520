"""What the kernel caches in front of the Operations, and that nothing it caches is
ever stale (promise 4): real mounts, changes made from other processes and
another uid (65534, via ``setpriv``), in the default mode and with
``--writeback-cache``.

The per-handler request counter (``user.fusejournal.requests`` on the mount
root) shows which requests reach the daemon; docs/performance-analysis.md,
"Requests per operation", has the table for each workload.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fusejournal.fs import KEEP_PAGES, KILLPRIV_V2  # (the daemon runs this checkout)

from conftest import Mounted, checkpoint_and_compare, daemon_errors, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
MODES = {"default": [], "writeback": ["--writeback-cache"]}
# The kernel clears set-id bits and file capabilities itself unless the daemon was granted
# FUSE_HANDLE_KILLPRIV_V2 (pyfuse3 patch version 3 on libfuse >= 3.17, the default where
# scripts/setup-venv.sh could build it); "kernel-kills" declines it, so both paths are tested.
KILLPRIV_MODES = ["default", "kernel-kills", "writeback"]
ENV = {"kernel-kills": {"FUSEJOURNAL_KILLPRIV_V2": "off"},
       "auto-inval": {"FUSEJOURNAL_AUTO_INVAL_DATA": "on"}}


@pytest.fixture(params=sorted(MODES))
def m(request: pytest.FixtureRequest) -> Mounted:
    """A journaled mount whose root every user may write, in each caching mode.  Its
    base directory is its own (0711), not pytest's: pytest resets its temporary root to
    0700 whenever a session starts, which would lock the other user out mid-test."""
    base = Path(tempfile.mkdtemp(prefix="fj-kcache-", dir="/tmp"))
    os.chmod(base, 0o711)
    src, mnt = base / "src", base / "mnt"
    src.mkdir(mode=0o777)
    mnt.mkdir()
    os.chmod(src, 0o777)
    mk = Mounted(src, mnt, base / "journal", base / "shadow")
    mk.base = base
    try:
        mk.mount(*MODES.get(request.param, []), env=ENV.get(request.param))
        mk.mode = "writeback" if request.param == "writeback" else "default"
        mk.param = request.param
        mk.killpriv_asked = KILLPRIV_V2 and request.param != "kernel-kills"
        yield mk
    finally:
        mk.cleanup()
        errors = daemon_errors(mk.journal)
        shutil.rmtree(base, ignore_errors=True)
    assert not errors, errors


def libfuse_version(pid: int) -> tuple[int, ...]:
    """The version of the libfuse3 the daemon ``pid`` runs with, from its mappings."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith("libfuse3.so."):
            return tuple(int(x) for x in name.split(".")[2:])
    raise AssertionError("no libfuse3 mapped in the daemon")


def requests(m: Mounted) -> dict[str, int]:
    return json.loads(os.getxattr(m.mountpoint, b"user.fusejournal.requests"))


def sent(before: dict[str, int], after: dict[str, int], op: str) -> int:
    return after.get(op, 0) - before.get(op, 0)


def run(code: str, *args: object, nobody: bool = True) -> None:
    """Run python ``code`` in another process (as uid 65534 unless ``nobody`` is False)."""
    cmd = [*SETPRIV] if nobody else []
    r = subprocess.run([*cmd, sys.executable, "-c", code, *map(os.fspath, args)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (code, r.stderr)


def missing(p: Path) -> bool:
    try:
        os.stat(p)
    except FileNotFoundError:
        return True
    return False


def test_a_missing_name_is_looked_up_once(m: Mounted) -> None:
    """A negative entry: the second stat of a missing name is answered by the kernel
    (failed before: one LOOKUP per stat, the daemon answered ENOENT)."""
    p = m.mountpoint / "later"
    assert missing(p)
    before = requests(m)
    for _ in range(5):
        assert missing(p)
    assert sent(before, requests(m), "lookup") == 0


def test_names_made_after_a_negative_entry_are_seen(m: Mounted) -> None:
    """Every way of making a name, by another process and another uid, over a name the
    kernel holds as missing: each is seen at once through the mount (by this process
    too), and the checkpoint has it."""
    mnt = m.mountpoint
    names = ["file", "dir", "sym", "hard", "moved", "fifo"]
    for n in names + ["src"]:
        assert missing(mnt / n)
        assert missing(mnt / n)                  # now a cached negative entry
    run("import os, sys; d = sys.argv[1]\n"
        "fd = os.open(d + '/file', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)\n"
        "os.write(fd, b'made'); os.close(fd)\n"
        "os.mkdir(d + '/dir'); os.symlink('file', d + '/sym'); os.link(d + '/file', d + '/hard')\n"
        "open(d + '/src', 'w').write('x'); os.rename(d + '/src', d + '/moved')\n"
        "os.mkfifo(d + '/fifo')", mnt)
    assert (mnt / "file").read_bytes() == b"made"
    assert (mnt / "dir").is_dir() and os.readlink(mnt / "sym") == "file"
    assert os.stat(mnt / "hard").st_ino == os.stat(mnt / "file").st_ino
    assert os.stat(mnt / "file").st_nlink == 2
    assert (mnt / "moved").read_text() == "x" and missing(mnt / "src")
    assert stat.S_ISFIFO(os.stat(mnt / "fifo").st_mode)
    # and gone again: the kernel does not keep a removed name
    run("import os, sys; os.unlink(sys.argv[1] + '/moved')", mnt)
    assert missing(mnt / "moved")
    checkpoint_and_compare(m)


SUID_CASES = [0o6777, 0o4777, 0o2777, 0o2767]    # setgid without group-exec is kept on ext4


def suid_results(d: Path) -> list[tuple[int, str, int]]:
    """Mode of a set-id file after a write, a truncate and an O_TRUNC open by another
    uid, and after a write by root, for each starting mode."""
    out = []
    for mode in SUID_CASES:
        f = d / f"m{mode:o}"
        for how, code, nobody in (
                ("write", "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_APPEND); "
                          "os.write(fd, b'x'); os.close(fd)", True),
                ("truncate", "import os,sys; os.truncate(sys.argv[1], 1)", True),
                ("otrunc", "import os,sys; os.close(os.open(sys.argv[1], os.O_WRONLY|os.O_TRUNC))", True),
                ("root write", "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_APPEND); "
                               "os.write(fd, b'x'); os.close(fd)", False)):
            if not f.exists():
                f.write_bytes(b"0123")
            os.chmod(f, mode)
            run(code, f, nobody=nobody)
            out.append((mode, how, stat.S_IMODE(os.stat(f).st_mode)))
    return out


@pytest.mark.parametrize("m", KILLPRIV_MODES, indirect=True)
def test_set_id_bits_are_cleared_on_write_as_on_the_backing_filesystem(m: Mounted) -> None:
    """A write or truncate by a user without CAP_FSETID clears S_ISUID (and S_ISGID
    with group-exec) exactly as the backing filesystem does when written directly; a
    write by root keeps them.  The shadow gets the cleared modes.  Whether the kernel
    or the daemon (FUSE_HANDLE_KILLPRIV_V2) clears them."""
    native = m.base / "native"
    native.mkdir()
    os.chmod(native, 0o777)
    expected = suid_results(native)
    assert (0o4777, "write", 0o777) in expected          # the backing filesystem clears it
    assert suid_results(m.mountpoint) == expected
    for mode in SUID_CASES:                              # the original holds what the mount showed
        f = f"m{mode:o}"
        assert os.stat(m.source / f).st_mode == os.stat(m.mountpoint / f).st_mode
    checkpoint_and_compare(m)


ATTRS = ("st_mode", "st_uid", "st_gid", "st_size", "st_nlink", "st_mtime_ns", "st_blocks")


def attrs(p: Path | int, mode: str = "default") -> dict[str, int]:
    """The attributes compared, the mtime included in both modes: with the writeback
    cache the kernel owns it, and the daemon's WRITE keeps the original's as it was, so
    that the original's is only ever the kernel's (docs/design.md, "Writeback cache").
    (``mode`` is kept for the callers.)"""
    st = os.stat(p)
    return {a: getattr(st, a) for a in ATTRS}


def test_attributes_are_fresh_after_changes_by_another_process(m: Mounted) -> None:
    """This process caches a file's attributes (stat, and an open fd); another process
    and another uid write, truncate, chmod and utime it through the mount: every stat
    and fstat here then shows what the original holds (a stale size, mode or mtime
    would break promise 4)."""
    f = m.mountpoint / "f"
    f.write_bytes(b"a" * 100)
    os.chmod(f, 0o666)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert attrs(f, m.mode) == attrs(m.source / "f", m.mode)
        steps = [
            ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_APPEND); "
             "os.write(fd, b'b' * 5000); os.close(fd)", True),
            ("import os,sys; os.truncate(sys.argv[1], 50)", True),
            ("import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); os.pwrite(fd, b'c', 9000); "
             "os.fsync(fd); os.close(fd)", True),
            ("import os,sys; os.chmod(sys.argv[1], 0o640)", False),
            ("import os,sys; os.utime(sys.argv[1], ns=(1, 1_000_000_123))", False),
            ("import os,sys; os.chown(sys.argv[1], 65534, 65534)", False),
        ]
        for code, nobody in steps:
            run(code, f, nobody=nobody)
            want = attrs(m.source / "f", m.mode)
            assert attrs(f, m.mode) == want, code
            assert attrs(fd, m.mode) == want, code
        assert os.pread(fd, 1, 9000) == b"c" and os.stat(f).st_size == 9001
    finally:
        os.close(fd)
    checkpoint_and_compare(m)


def test_mtimes_through_the_mount_are_the_originals(m: Mounted) -> None:
    """Files written and closed (half of them chmod'ed after), and one kept open and
    written a page at a time: every mtime a ``stat`` through the mount shows is the
    original's, and so the checkpoint's.  With the writeback cache the kernel's SETATTR
    of its times can reach the daemon before the WRITE of the pages; the WRITE used to
    move the original's mtime after it (199 files of 200 differed by a few ms)."""
    mp = m.mountpoint
    for i in range(60):
        (mp / f"f{i}").write_bytes(b"x" * 5000)
        if i % 2:
            os.chmod(mp / f"f{i}", 0o640)
    fd = os.open(mp / "open", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for k in range(30):
            os.pwrite(fd, b"y" * 4096, k * 4096)
        os.fsync(fd)
        names = [f"f{i}" for i in range(60)] + ["open"]
        differ = [n for n in names if os.stat(mp / n).st_mtime_ns != os.stat(m.source / n).st_mtime_ns]
        assert differ == []
    finally:
        os.close(fd)
    checkpoint_and_compare(m)


@pytest.mark.skipif(shutil.which("setcap") is None, reason="needs setcap")
@pytest.mark.parametrize("m", KILLPRIV_MODES, indirect=True)
def test_security_capability_passes_through_the_per_inode_cache(m: Mounted) -> None:
    """The daemon remembers "no security.capability" per inode (the kernel asks before
    every write); a capability set through the mount is seen at once, the kernel's own
    removal at the next write by another process reaches the original, and the
    checkpoint has the file as the original has it."""
    f = m.mountpoint / "prog"
    f.write_bytes(b"#!/bin/sh\n")
    with open(f, "ab") as w:                 # several writes: "none" is cached now
        for _ in range(3):
            w.write(b"# x\n")
            w.flush()
    subprocess.run(["setcap", "cap_net_raw+ep", f], check=True)
    caps = os.getxattr(f, "security.capability")
    assert caps and os.getxattr(m.source / "prog", "security.capability") == caps
    run("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_APPEND); os.write(fd, b'# y'); "
        "os.close(fd)", f, nobody=False)
    for p in (f, m.source / "prog"):         # a write drops file capabilities, as on ext4
        with pytest.raises(OSError):
            os.getxattr(p, "security.capability")
    checkpoint_and_compare(m)


@pytest.mark.parametrize("m", KILLPRIV_MODES, indirect=True)
def test_requests_per_write_and_stat(m: Mounted) -> None:
    """A guard on what the kernel sends (docs/performance-analysis.md, "Requests per
    operation"): a 4 KiB write(2) is a WRITE, and the GETXATTR of security.capability
    unless FUSE_HANDLE_KILLPRIV_V2 was granted (the WRITEs merged with the writeback
    cache), nothing more; after the writes the second stat is served by the kernel.
    Zero attribute timeouts, or an invalidation of our own, would add requests here."""
    killpriv = m.status()["killpriv_v2"]
    assert killpriv == (m.killpriv_asked and libfuse_version(m.pid) >= (3, 17)), killpriv
    f = m.mountpoint / "w"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 4096)           # the file's first write: caches "no capability"
        before = requests(m)
        for _ in range(100):
            os.write(fd, b"x" * 4096)
        after = requests(m)
    finally:
        os.close(fd)
    assert sent(before, after, "getxattr") - 1 == (0 if killpriv else 100)   # -1: the counter
    if m.mode == "default":
        assert sent(before, after, "write") == 100
    else:                                   # merged; a sync(2) elsewhere may start write-back
        assert sent(before, after, "write") <= 5
    # nothing else (FORGETs come when another process drops the machine's caches)
    assert {op for op in after if sent(before, after, op)} <= {"getxattr", "write", "forget"}
    os.stat(f)
    before = requests(m)
    for _ in range(10):
        os.stat(f)
    assert sent(before, requests(m), "getattr") == 0


@pytest.mark.parametrize("m", ["default", "auto-inval"], indirect=True)
def test_a_new_mtime_does_not_drop_the_page_cache(m: Mounted) -> None:
    """Each write invalidates the file's attributes in the kernel; the next fstat (or
    PostgreSQL's lseek(SEEK_END)) is a GETATTR that brings the mtime of the daemon's
    pwrite.  With libfuse's default FUSE_CAP_AUTO_INVAL_DATA the kernel then drops the
    whole page cache of the file, and reading back what was just written is a READ
    (pgbench: two per transaction).  The journaling mount declines it (the patch's
    version 4; ``auto-inval`` keeps libfuse's default): the pages stay, and hold exactly
    what was written."""
    declined = not m.status()["auto_inval_data"]
    assert declined == (KEEP_PAGES and m.param == "default")
    data = bytearray(os.urandom(64 * 4096))
    fd = os.open(m.mountpoint / "rel", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)                  # whole pages: the kernel keeps them cached
        assert os.pread(fd, len(data), 0) == data
        for i in range(0, 64, 4):
            time.sleep(0.005)                   # (a new tick: the mtime moves)
            page = os.urandom(4096)
            os.pwrite(fd, page, i * 4096)
            data[i * 4096:(i + 1) * 4096] = page
            os.fstat(fd)                        # the GETATTR after the write
        before = requests(m)
        got = os.pread(fd, len(data), 0)
        after = requests(m)
    finally:
        os.close(fd)
    assert got == data
    assert (m.source / "rel").read_bytes() == data
    if declined:
        assert sent(before, after, "read") == 0
    else:
        assert sent(before, after, "read") > 0  # (the check above is not vacuous)
    # another process, another uid: the same bytes
    run("import hashlib, sys; assert hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest() "
        "== sys.argv[2]", m.mountpoint / "rel", hashlib.sha256(data).hexdigest())
    checkpoint_and_compare(m)


# ------------------------------------------------- FOPEN_NOFLUSH and FOPEN_CACHE_DIR

def test_close_sends_no_flush_and_a_listing_is_read_once(m: Mounted) -> None:
    """With pyfuse3 built with vendor/pyfuse3's patch (scripts/setup-venv.sh, which CI
    runs): a ``close`` sends no FLUSH (FOPEN_NOFLUSH; the writeback cache's close still
    flushes, which the kernel decides), and a directory listed again sends no READDIR
    (FOPEN_CACHE_DIR).  With pyfuse3 as released, both are sent as before."""
    from fusejournal.fs import PATCHED_PYFUSE3
    d = m.mountpoint / "d"
    d.mkdir()
    for i in range(50):
        (d / f"f{i:02d}").write_bytes(b"x")
    sorted(os.listdir(d))                       # the first listing fills the cache
    before = requests(m)
    fd = os.open(d / "f00", os.O_RDONLY)
    os.close(fd)
    for _ in range(5):
        assert sorted(os.listdir(d)) == [f"f{i:02d}" for i in range(50)]
    after = requests(m)
    patched = PATCHED_PYFUSE3
    assert sent(before, after, "flush") == (1 if m.mode == "writeback" or not patched else 0)
    assert sent(before, after, "opendir") == 5            # each listing still opens it
    assert sent(before, after, "readdir") == (0 if patched else 10)   # entries, then the end


def test_cached_listings_follow_every_entry_change(m: Mounted) -> None:
    """Every kind of entry change through the mount — by this process and by another
    user — shows in the very next listing, as on the backing filesystem, though listings
    may be served from the kernel's cache (promise 4)."""
    d = m.mountpoint / "d"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    other = m.mountpoint / "other"
    other.mkdir(mode=0o777)
    os.chmod(other, 0o777)

    def check() -> None:
        for p, q in ((d, m.source / "d"), (other, m.source / "other")):
            assert sorted(os.listdir(p)) == sorted(os.listdir(q))
            # each name's type, as a listing reports it
            got = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in os.scandir(p)}
            want = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in os.scandir(q)}
            assert got == want

    check()
    steps = [
        lambda: (d / "a").write_bytes(b"a"),
        lambda: os.mkdir(d / "sub"),
        lambda: os.symlink("a", d / "ln"),
        lambda: os.link(d / "a", d / "hard"),
        lambda: os.mknod(d / "fifo", 0o644 | stat.S_IFIFO),
        lambda: os.rename(d / "a", d / "b"),
        lambda: os.rename(d / "b", other / "moved"),          # out of one, into the other
        lambda: os.rename(other / "moved", d / "hard"),       # over an existing name
        lambda: os.rmdir(d / "sub"),
        lambda: os.rename(d / "ln", d / "sub"),               # a symlink where a dir was
        lambda: os.unlink(d / "fifo"),
        lambda: run("import os, sys; open(os.path.join(sys.argv[1], 'by_nobody'), 'w').close()", d),
        lambda: run("import os, sys; os.rename(os.path.join(sys.argv[1], 'by_nobody'),"
                    " os.path.join(sys.argv[2], 'from_nobody'))", d, other),
        lambda: run("import os, sys; os.mkdir(os.path.join(sys.argv[1], 'dir_nobody'))", d),
        lambda: run("import os, sys; os.rmdir(os.path.join(sys.argv[1], 'dir_nobody'))", d),
        lambda: os.unlink(other / "from_nobody"),
    ]
    for step in steps:
        step()
        check()
    checkpoint_and_compare(m)


def test_large_listings_by_plain_readdir_equal_the_original(m: Mounted) -> None:
    """A directory too large for one READDIRPLUS reply, after the kernel dropped its
    caches: with pyfuse3 carrying the patch's second version, the kernel asks for the
    rest by plain READDIR (FUSE_CAP_READDIRPLUS_AUTO).  What getdents reports (names,
    inode numbers, types) and what stat then shows equal the original, before and after
    entry changes of every kind, by this process and by another user."""
    from fusejournal.fs import PLAIN_READDIR
    d = m.mountpoint / "big"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    for i in range(1500):
        (d / f"file-with-a-longish-name-{i:05d}").write_bytes(b"")
    for i in range(0, 1500, 100):
        os.mkdir(d / f"dir-{i:05d}")
        os.symlink(f"file-with-a-longish-name-{i:05d}", d / f"link-{i:05d}")
        os.link(d / f"file-with-a-longish-name-{i:05d}", d / f"hard-{i:05d}")
    os.mkfifo(d / "fifo")

    def entries(p: Path) -> dict[str, tuple[int, bool, bool, bool]]:
        return {e.name: (e.inode(), e.is_dir(follow_symlinks=False), e.is_symlink(),
                         e.is_file(follow_symlinks=False)) for e in os.scandir(p)}

    def check() -> None:
        with open("/proc/sys/vm/drop_caches", "w") as f:   # the listing comes from the daemon
            f.write("2")
        got = entries(d)
        assert got == entries(m.source / "big")
        for name in list(got)[::97]:                        # what a later stat shows
            assert os.stat(d / name, follow_symlinks=False).st_ino == got[name][0]

    before = requests(m)
    check()
    if PLAIN_READDIR:
        assert sent(before, requests(m), "readdir_plain") > 0
    os.rename(d / "file-with-a-longish-name-00007", d / "renamed")
    os.unlink(d / "file-with-a-longish-name-00008")
    os.rmdir(d / "dir-00100")
    os.symlink("renamed", d / "dir-00100")                  # a symlink where a directory was
    os.rename(d / "file-with-a-longish-name-00010", d / "file-with-a-longish-name-00011")  # over a name
    run("import os, sys; os.mkdir(os.path.join(sys.argv[1], 'by_nobody'))", d)
    check()
    checkpoint_and_compare(m)
