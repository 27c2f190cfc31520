"""Bad input of any kind: a clear one-line error, a non-zero exit, and nothing created or lost.

Everything goes through the real CLI (``fj(..., check=False)``).  Each case
checks the exit code, that stderr is one line without a traceback, and that
no journal or shadow directory was created and foreign files are untouched.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fusejournal import layout
from fusejournal.log import _FILE_HEADER

from conftest import Mounted, fj, fj_as_nobody, is_mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]



def refused(r: subprocess.CompletedProcess, code: int | None = None, *words: str) -> str:
    """Assert a clean refusal; return its message."""
    assert r.returncode != 0, f"accepted: {r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    # the error is the last line, one line; lines before it are progress or warnings
    lines = r.stderr.strip().splitlines()
    err = lines[-1]
    assert err.startswith("fusejournal"), f"not a one-line error: {r.stderr!r}"
    for line in lines[:-1]:
        assert line.startswith(("seeding the shadow", "warning:", "re-seeding")), r.stderr
    if code is not None:
        assert r.returncode == code, (r.returncode, r.stderr)
    for w in words:
        assert w in err, (w, err)
    return err


def tree_state(*paths: Path) -> dict:
    """Names, sizes and mtimes below each path (None if absent): to see nothing changed."""
    out = {}
    for p in paths:
        if not os.path.lexists(p):
            out[str(p)] = None
            continue
        entries = {}
        for dirpath, dirnames, filenames in os.walk(p):
            for n in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, n))
                entries[os.path.join(dirpath, n)] = (st.st_size, st.st_mtime_ns, st.st_mode)
        st = os.lstat(p)
        out[str(p)] = (st.st_mode, entries)
    return out


@pytest.fixture
def area(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "data.txt").write_bytes(b"precious\n")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "afile").write_bytes(b"a foreign file\n")
    return tmp_path


def mount_refused(area: Path, *args: str, code: int | None = None, words: tuple = (),
                  journal: Path | None = None, shadow: Path | None = None,
                  source: Path | None = None, mountpoint: Path | None = None,
                  watch: Path | None = None) -> str:
    source = source or area / "src"
    mountpoint = mountpoint or area / "mnt"
    journal = journal or area / "j"
    shadow = shadow or area / "s"
    watch = watch or area
    before = tree_state(watch, journal, shadow)
    was_mounted = is_mounted(mountpoint)
    try:
        r = fj("mount", source, mountpoint, "--journal", journal, "--shadow", shadow, *args, check=False)
        msg = refused(r, code, *words)
    finally:
        if is_mounted(mountpoint) and not was_mounted:
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(mountpoint)])
    assert tree_state(watch, journal, shadow) == before, "the refused mount created or changed something"
    return msg


# ------------------------------------------------------------------ mount arguments

def test_shadow_naming_a_file(area: Path) -> None:
    mount_refused(area, shadow=area / "afile", code=2, words=("not a directory",))
    assert (area / "afile").read_bytes() == b"a foreign file\n"


def test_journal_naming_a_file(area: Path) -> None:
    mount_refused(area, journal=area / "afile", code=2, words=("not a directory",))


def test_journal_and_shadow_the_same_directory(area: Path) -> None:
    mount_refused(area, journal=area / "x", shadow=area / "x", code=2, words=("different",))


@pytest.mark.parametrize("case", ["journal-in-source", "shadow-in-source", "source-in-journal",
                                  "source-in-shadow", "shadow-in-journal", "journal-in-shadow",
                                  "mountpoint-in-journal", "mountpoint-in-shadow",
                                  "mountpoint-in-source", "shadow-via-symlink-in-source"])
def test_nested_directories_are_refused(area: Path, case: str) -> None:
    src = area / "src"
    kw: dict = {}
    if case == "journal-in-source":
        kw = dict(journal=src / "j")
    elif case == "shadow-in-source":
        kw = dict(shadow=src / "s")
    elif case == "source-in-journal":
        (area / "outer" / "src").mkdir(parents=True)
        kw = dict(journal=area / "outer", source=area / "outer" / "src")
    elif case == "source-in-shadow":
        (area / "outer" / "src").mkdir(parents=True)
        kw = dict(shadow=area / "outer", source=area / "outer" / "src")
    elif case == "shadow-in-journal":
        kw = dict(journal=area / "j", shadow=area / "j" / "s")
    elif case == "journal-in-shadow":
        kw = dict(shadow=area / "s", journal=area / "s" / "j")
    elif case == "mountpoint-in-journal":
        (area / "state" / "m").mkdir(parents=True)
        kw = dict(journal=area / "state", mountpoint=area / "state" / "m")
    elif case == "mountpoint-in-shadow":
        (area / "state" / "m").mkdir(parents=True)
        kw = dict(shadow=area / "state", mountpoint=area / "state" / "m")
    elif case == "mountpoint-in-source":
        (src / "m").mkdir()
        kw = dict(mountpoint=src / "m")
    elif case == "shadow-via-symlink-in-source":
        os.symlink(src, area / "link")
        kw = dict(shadow=area / "link" / "s")
    mount_refused(area, code=2, words=("must not",), **kw)
    assert (src / "data.txt").read_bytes() == b"precious\n"


@pytest.mark.parametrize("opt", ["bogus", "max_read=x", "max_read=131072", "blkdev",
                                 "allow_other,nonsense", "fsname="])
def test_bad_mount_option_touches_nothing(area: Path, opt: str) -> None:
    mount_refused(area, "-o", opt, code=2, words=("mount option",))


def test_good_mount_options_still_work(area: Path) -> None:
    m = Mounted(area / "src", area / "mnt", area / "j", area / "s")
    try:
        m.mount("-o", "noatime,nodev", "-o", "subtype=x")
        assert (area / "mnt" / "data.txt").read_bytes() == b"precious\n"
        m.umount()
    finally:
        m.cleanup()


def test_mount_point_inside_the_source(area: Path) -> None:
    sub = area / "src" / "sub"
    sub.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", os.fspath(sub)], check=True)
    try:
        (sub / "inner").write_bytes(b"x")
        msg = mount_refused(area, code=3, words=("mount point",))
        assert os.fspath(sub) in msg
    finally:
        subprocess.run(["umount", "-l", os.fspath(sub)], check=False)
    # the retry (with the mount gone) works
    m = Mounted(area / "src", area / "mnt", area / "j", area / "s")
    try:
        m.mount()
        m.umount()
    finally:
        m.cleanup()


def test_live_fuse_mount_as_source(area: Path) -> None:
    m = Mounted(area / "src", area / "mnt", area / "j", area / "s")
    try:
        m.mount()
        (area / "mnt" / "d").mkdir()
        (area / "mnt2").mkdir()
        for source, word in ((area / "mnt", "is a FUSE mount"), (area / "mnt" / "d", "fusejournal mount")):
            mount_refused(area, source=source, mountpoint=area / "mnt2", journal=area / "j2",
                          shadow=area / "s2", code=3, words=(word,), watch=area / "src")
        # in place over a live mount
        mount_refused(area, source=area / "mnt", mountpoint=area / "mnt", journal=area / "j2",
                      shadow=area / "s2", code=3, words=("already a FUSE mount",), watch=area / "src")
        m.umount()
    finally:
        m.cleanup()


def test_failed_seed_leaves_no_half_seeded_shadow(area: Path) -> None:
    """A seed that fails (here: the shadow's disk is too small) removes its partial copy,
    says so in one line, and the retry once there is room works."""
    (area / "src" / "big.bin").write_bytes(os.urandom(3 << 20))
    shadow = area / "small"
    shadow.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", os.fspath(shadow)], check=True)
    m = Mounted(area / "src", area / "mnt", area / "j", shadow)
    try:
        r = fj("mount", m.source, m.mountpoint, "--journal", m.journal, "--shadow", shadow, check=False)
        refused(r, 3, "seeding the shadow", "No space left")
        assert os.listdir(shadow) == [], os.listdir(shadow)        # nothing half-seeded left
        assert not is_mounted(m.mountpoint)
        subprocess.run(["mount", "-o", "remount,size=16m", os.fspath(shadow)], check=True)
        m.mount()
        m.umount()
        r = fj("fsck", m.journal, "--verify-shadow", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        m.cleanup()
        subprocess.run(["umount", "-l", os.fspath(shadow)], check=False)


# ------------------------------------------------------------------ odd arguments

def test_non_utf8_source_path(tmp_path: Path) -> None:
    src = Path(os.fsdecode(os.fsencode(tmp_path) + b"/src\xff\xfe"))
    src.mkdir()
    (src / "f").write_bytes(b"x")
    (tmp_path / "mnt").mkdir()
    m = Mounted(src, tmp_path / "mnt", tmp_path / "j", tmp_path / "s")
    try:
        r = fj("mount", m.source, m.mountpoint, "--journal", m.journal, "--shadow", m.shadow,
               check=False, errors="surrogateescape")
        assert r.returncode == 0, r.stdout + r.stderr
        m.pid = m.status()["pid"]
        (m.mountpoint / "g").write_bytes(b"y")
        r = fj("checkpoint", m.mountpoint)
        m.wait(int(r.stdout))
        r = fj("status", m.mountpoint, check=False, errors="surrogateescape")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert (m.tree / "g").read_bytes() == b"y"
        m.umount()
    finally:
        m.cleanup()


def test_overlong_and_odd_arguments(area: Path) -> None:
    long = area / ("x" * 300)
    before = tree_state(area)
    for args in (["mount", area / "src", area / "mnt", "--journal", long, "--shadow", area / "s"],
                 ["mount", long, area / "mnt"],
                 ["status", long], ["log", long], ["fsck", long], ["wait", long],
                 ["log", area / "afile"], ["fsck", area / "src"], ["status", area / "src"],
                 ["wait", area / "src"], ["wait", area / "nowhere"], ["umount", area / "mnt"],
                 ["checkpoint", area / "mnt"], ["wait", area / "src", "--checkpoint", "-1"],
                 ["wait", area / "src", "--timeout", "-3"], ["mount", area / "src", "--memory-limit", "0"]):
        refused(fj(*args, check=False))
    assert tree_state(area) == before


def test_checkpoint_and_wait_arguments_on_a_live_mount(area: Path) -> None:
    m = Mounted(area / "src", area / "mnt", area / "j", area / "s")
    try:
        m.mount()
        refused(fj("checkpoint", m.mountpoint, "--label", "x" * 5000, check=False), 2, "label")
        refused(fj("checkpoint", m.mountpoint, "--label", os.fsdecode(b"\xff\xfe"), check=False), 2)
        refused(fj("checkpoint", m.mountpoint, "--label", "", check=False), 2)
        refused(fj("wait", m.mountpoint, "--checkpoint", "-1", check=False), 2)
        refused(fj("wait", m.mountpoint, "--checkpoint", str(10 ** 30), check=False), 2, "does not exist")
        refused(fj("wait", m.mountpoint, "--checkpoint", "huge", check=False), 2)
        assert m.status()["last_checkpoint"] == 0
        m.umount()
    finally:
        m.cleanup()


# ------------------------------------------------------------------ another user

def test_log_fsck_status_as_another_user(area: Path) -> None:
    m = Mounted(area / "src", area / "mnt", area / "j", area / "s")
    try:
        m.mount()
        (m.mountpoint / "f").write_bytes(b"1")
        m.checkpoint()
        m.wait()
        m.umount()
    finally:
        m.cleanup()
    for p in [area, *area.parents]:              # let nobody reach the journal's parent
        if p == Path("/"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o011)
    r = fj_as_nobody("--version")
    if r.returncode != 0:
        pytest.skip(f"the interpreter is not usable by another user: {r.stderr.strip()}")
    mode0 = os.stat(area / "j").st_mode
    before = tree_state(area / "j")
    for mode in (0o700, 0o755):                  # a private journal, and one whose files are private
        os.chmod(area / "j", mode)
        for cmd in (["log", area / "j"], ["fsck", area / "j"], ["fsck", area / "j", "--repair"],
                    ["status", area / "j"], ["wait", area / "j"], ["browse", area / "j", area / "mnt"]):
            r = fj_as_nobody(*cmd)
            msg = refused(r)
            if cmd[0] in ("log", "fsck", "status", "wait"):
                assert "permission denied" in msg, msg
    os.chmod(area / "j", mode0)
    assert tree_state(area / "j") == before


# ------------------------------------------------------------------ damaged logs

def _journal_with_checkpoints(area: Path, n: int = 4, segment_limit: str = "1k") -> Mounted:
    m = Mounted(area / "src", area / "mnt", area / "j", area / "s",
                extra=["--segment-limit", segment_limit])
    try:
        m.mount()
        for i in range(n):
            (m.mountpoint / f"f{i}").write_bytes(os.urandom(1500))
            m.checkpoint()
        m.wait()
        m.umount()
    finally:
        m.cleanup()
    return m


def _segments(m: Mounted) -> list[Path]:
    return sorted((m.journal / layout.LOG_DIR).glob("*.fjlog"))


@pytest.mark.parametrize("how", ["truncate-last-mid", "truncate-last-to-header", "remove-last",
                                 "truncate-rolled-header", "remove-rolled"])
def test_cut_off_confirmed_checkpoints_are_reported(area: Path, how: str) -> None:
    """Confirmed checkpoints cut off the log while unmounted: in the one segment that holds
    them (a large segment limit), or, once the shadow applied them and the log rolled (1 KiB
    segments: only an empty last segment is left, whose header keeps the ids going), that
    segment's header torn or the segment removed."""
    rolled = how.endswith("rolled") or how.endswith("rolled-header")
    m = _journal_with_checkpoints(area, segment_limit="1k" if rolled else "1M")
    [last] = _segments(m)
    assert (last.stat().st_size == _FILE_HEADER.size) == rolled
    if how == "truncate-last-mid":
        os.truncate(last, last.stat().st_size - 40)
    elif how == "truncate-last-to-header":
        os.truncate(last, _FILE_HEADER.size)
    elif how == "truncate-rolled-header":
        os.truncate(last, _FILE_HEADER.size // 2)
    else:
        last.unlink()
    r = fj("log", m.journal, check=False)
    assert r.returncode == 7, r.stdout + r.stderr
    assert "missing" in r.stderr and "Traceback" not in r.stderr
    r = fj("status", m.journal, check=False)
    assert r.returncode == 7, r.stdout + r.stderr
    assert "missing" in r.stdout
    r = fj("fsck", m.journal, check=False)
    assert r.returncode == 7 and "missing" in r.stdout, r.stdout + r.stderr
    # the mount refuses rather than silently continuing without them
    r = fj("mount", m.source, m.mountpoint, "--journal", m.journal, "--shadow", m.shadow, check=False)
    try:
        refused(r, None)
    finally:
        Mounted(m.source, m.mountpoint, m.journal, m.shadow).cleanup()
    # the recovery path: fsck --repair (accepts the loss), then --reseed
    r = fj("fsck", m.journal, "--repair", check=False)
    assert "reseed" in r.stdout, r.stdout
    m2 = Mounted(m.source, m.mountpoint, m.journal, m.shadow)
    try:
        m2.mount("--reseed")
        m2.umount()
    finally:
        m2.cleanup()
    assert fj("log", m.journal, check=False).returncode == 0
    assert fj("fsck", m.journal, "--verify-shadow", check=False).returncode == 0
