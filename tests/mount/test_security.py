"""Users and permissions: nobody but the mount's owner (and root) can touch the
journal or the shadow, the updater never follows a symlink it did not create,
and a journal never adopts (or empties) a directory that is not its own shadow.

Real mounts, driven from this process; the other user is uid/gid 65534 via
``setpriv``.  The test directories live in a base directory under /tmp that
other users may traverse (0711), so a refusal comes from the journal's or the
shadow's own modes, not from a private parent; each test checks that the
other user does reach the directory itself (stat) before checking what it
cannot do inside.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import Mounted, fj, fj_as_nobody, needs_fuse
from snapshot import assert_same, snapshot

pytestmark = [needs_fuse, pytest.mark.mount]

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def world() -> Mounted:
    """Source, mountpoint, journal and shadow paths in a base directory other users can traverse."""
    base = Path(tempfile.mkdtemp(prefix="fj-security-", dir="/tmp"))
    os.chmod(base, 0o711)
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    os.chmod(src, 0o755)
    os.chmod(mnt, 0o755)
    m = Mounted(src, mnt, base / "state" / "journal", base / "state" / "shadow")
    try:
        yield m
    finally:
        m.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(code: str, *args: object) -> dict:
    """Run python ``code`` as uid/gid 65534; it prints a JSON object, returned here."""
    r = subprocess.run([*SETPRIV, sys.executable, "-c", code, *map(os.fspath, args)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


#: tries each operation as the other user; "ok" or the errno name
ATTEMPTS = r"""
import errno, json, os, sys
out = {}
def attempt(what, fn, *a):
    try:
        fn(*a)
        out[what] = "ok"
    except OSError as e:
        out[what] = errno.errorcode.get(e.errno, str(e.errno))
j, s = sys.argv[1], sys.argv[2]
seg = sys.argv[3]
attempt("stat journal", os.stat, j)
attempt("stat shadow", os.stat, s)
attempt("list journal", os.listdir, j)
attempt("list journal/log", os.listdir, j + "/log")
attempt("remove meta.json", os.unlink, j + "/meta.json")
attempt("rename segment", os.rename, j + "/log/" + seg, j + "/log/moved")
attempt("remove segment", os.unlink, j + "/log/" + seg)
attempt("write daemon.log", lambda: os.close(os.open(j + "/daemon.log", os.O_WRONLY | os.O_APPEND)))
attempt("create in journal", lambda: os.close(os.open(j + "/pending.fjrec", os.O_WRONLY | os.O_CREAT, 0o666)))
attempt("create in spill", lambda: os.close(os.open(j + "/spill/x", os.O_WRONLY | os.O_CREAT, 0o666)))
attempt("list shadow", os.listdir, s)
attempt("list shadow/tree", os.listdir, s + "/tree")
attempt("read shadow file", lambda: open(s + "/tree/public.txt").read())
attempt("remove applied.json", os.unlink, s + "/applied.json")
attempt("rename shadow/tree", os.rename, s + "/tree", s + "/t2")
attempt("create in staging", lambda: os.close(os.open(s + "/staging/x", os.O_WRONLY | os.O_CREAT, 0o666)))
print(json.dumps(out))
"""


def _modes(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (mode bits, uid) of root and everything below (not following symlinks)."""
    out = {".": (stat.S_IMODE(os.lstat(root).st_mode), os.lstat(root).st_uid)}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            out[os.fspath(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_uid)
    return out


def _assert_private_journal(journal: Path) -> None:
    modes = _modes(journal)
    for rel, (mode, uid) in modes.items():
        want = 0o700 if (journal / rel).is_dir() else 0o600
        assert (mode, uid) == (want, os.geteuid()), f"journal {rel}: {mode:#o} uid {uid}"
    for name in ("meta.json", "lock", "log", "spill", "daemon.log"):
        assert name in modes, sorted(modes)


def _assert_private_shadow(shadow: Path, source_root_mode: int) -> None:
    assert stat.S_IMODE(os.stat(shadow).st_mode) == 0o700
    for name in ("inodes", "staging"):
        assert stat.S_IMODE(os.stat(shadow / name).st_mode) == 0o700, name
    for p in (shadow / "staging").iterdir():
        assert stat.S_IMODE(os.lstat(p).st_mode) == 0o600, p
    for name in ("applied.json", "shadow.json"):
        assert stat.S_IMODE(os.stat(shadow / name).st_mode) == 0o600, name
    # the shadow tree is the backup: it keeps the original's modes
    assert stat.S_IMODE(os.stat(shadow / "tree").st_mode) == source_root_mode


# ------------------------------------------------------------------ item 10: private journal and shadow

def test_journal_and_shadow_are_private(world: Mounted) -> None:
    (world.source / "public.txt").write_text("everyone may read the original")
    os.chmod(world.source / "public.txt", 0o644)
    world.mount()
    try:
        (world.mountpoint / "more.txt").write_text("x" * 100_000)
        n = world.checkpoint()
        world.wait(n)
        # everything the daemon made for itself: 0700 directories, 0600 files, ours
        _assert_private_journal(world.journal)
        _assert_private_shadow(world.shadow, 0o755)
        # the parent directories mount created for --journal/--shadow, too
        assert stat.S_IMODE(os.stat(world.journal.parent).st_mode) == 0o700
        # the shadow tree's contents keep the original's modes
        assert stat.S_IMODE(os.stat(world.tree / "public.txt").st_mode) == 0o644
    finally:
        world.umount()
    _assert_private_journal(world.journal)


def test_other_user_cannot_touch_journal_or_shadow(world: Mounted) -> None:
    (world.source / "public.txt").write_text("everyone may read the original")
    os.chmod(world.source / "public.txt", 0o644)
    # the journal and shadow directly in the traversable base: only their own modes protect them
    world.journal = world.source.parent / "journal"
    world.shadow = world.source.parent / "shadow"
    world.mount()
    try:
        (world.mountpoint / "f").write_bytes(b"data")
        world.wait(world.checkpoint())
        seg = sorted(os.listdir(world.journal / "log"))[0]
        before_j, before_s = snapshot(world.journal), snapshot(world.shadow)
        got = as_nobody(ATTEMPTS, world.journal, world.shadow, seg)
        assert got.pop("stat journal") == "ok"       # it reaches them: the denials below are theirs
        assert got.pop("stat shadow") == "ok"
        assert all(v in ("EACCES", "EPERM") for v in got.values()), got
        # nothing changed, and the mount still works for the owner
        assert_same(before_j, snapshot(world.journal))
        assert_same(before_s, snapshot(world.shadow))
        assert world.checkpoint() == 2
    finally:
        world.umount()


def test_application_files_keep_the_callers_mode_and_owner(world: Mounted) -> None:
    """The daemon's own files are private, but the application's are exactly what it asked for."""
    os.chmod(world.source, 0o777)
    world.mount()
    try:
        code = ("import json, os, sys\nos.umask(0o022)\n"
                "fd = os.open(sys.argv[1] + '/app.txt', os.O_WRONLY | os.O_CREAT, 0o666); os.close(fd)\n"
                "os.mkdir(sys.argv[1] + '/appdir', 0o777)\n"
                "fd = os.open(sys.argv[1] + '/exact', os.O_WRONLY | os.O_CREAT, 0o604); os.close(fd)\n"
                "print(json.dumps({}))")
        as_nobody(code, world.mountpoint)
        for name, mode in (("app.txt", 0o644), ("appdir", 0o755), ("exact", 0o604)):
            st = os.lstat(world.source / name)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, NOBODY, NOBODY), name
        world.wait(world.checkpoint())
        assert stat.S_IMODE(os.stat(world.tree / "app.txt").st_mode) == 0o644
        assert os.stat(world.tree / "app.txt").st_uid == NOBODY
    finally:
        world.umount()


def test_loose_journal_and_shadow_are_tightened(world: Mounted) -> None:
    """A journal and shadow left world-writable (by an older version, or by hand) are made
    private on mount; so is an empty journal directory created loose beforehand."""
    world.mount()
    (world.mountpoint / "f").write_text("x")
    world.wait(world.checkpoint())
    world.umount()
    for root in (world.journal, world.shadow):
        for dirpath, _dirnames, filenames in os.walk(root):
            if dirpath.startswith(os.fspath(world.tree)):
                continue
            os.chmod(dirpath, 0o777)
            for n in filenames:
                os.chmod(Path(dirpath) / n, 0o666)
    tree_mode = stat.S_IMODE(os.stat(world.tree).st_mode)
    world.mount()
    try:
        _assert_private_journal(world.journal)
        _assert_private_shadow(world.shadow, tree_mode)
    finally:
        world.umount()
    # a new journal and shadow in directories pre-created loose
    loose_j, loose_s = world.source.parent / "loose-j", world.source.parent / "loose-s"
    loose_j.mkdir(mode=0o777)
    loose_s.mkdir(mode=0o777)
    os.chmod(loose_j, 0o1777)
    os.chmod(loose_s, 0o777)
    world.journal, world.shadow = loose_j, loose_s
    world.mount()
    try:
        _assert_private_journal(loose_j)
        _assert_private_shadow(loose_s, tree_mode)
    finally:
        world.umount()


def test_symlinked_journal_or_shadow_is_refused(world: Mounted) -> None:
    base = world.source.parent
    real = base / "real"
    real.mkdir()
    (base / "jlink").symlink_to(real)
    r = fj("mount", world.source, world.mountpoint, "--journal", base / "jlink",
           "--shadow", world.shadow, check=False)
    assert r.returncode == 3 and "is a symlink" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(real) == [] and not world.shadow.exists()
    (base / "slink").symlink_to(real)
    r = fj("mount", world.source, world.mountpoint, "--journal", world.journal,
           "--shadow", base / "slink", check=False)
    assert r.returncode == 3 and "is a symlink" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(real) == [] and not world.journal.exists()


def test_journal_or_shadow_of_another_user_is_refused(world: Mounted) -> None:
    base = world.source.parent
    theirs = base / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    r = fj("mount", world.source, world.mountpoint, "--journal", theirs,
           "--shadow", world.shadow, check=False)
    assert r.returncode == 3 and f"owned by uid {NOBODY}" in r.stderr, r.stderr
    assert os.listdir(theirs) == []
    r = fj("mount", world.source, world.mountpoint, "--journal", world.journal,
           "--shadow", theirs, check=False)
    assert r.returncode == 3 and f"owned by uid {NOBODY}" in r.stderr, r.stderr
    assert os.listdir(theirs) == []
    # an existing journal handed over to another user is refused too
    world.mount()
    world.umount()
    os.chown(world.shadow, NOBODY, NOBODY)
    r = fj("mount", world.source, world.mountpoint, "--journal", world.journal,
           "--shadow", world.shadow, check=False)
    assert r.returncode == 3 and f"owned by uid {NOBODY}" in r.stderr, r.stderr


def test_updater_does_not_follow_a_swapped_shadow(world: Mounted) -> None:
    """Another user's copy of the shadow, swapped in with a symlink while mounted, is never
    written: the updater refuses, and resumes once the real shadow is back."""
    (world.source / "a").write_text("a")
    world.mount()
    try:
        world.wait(world.checkpoint())
        evil = world.source.parent / "evil"
        subprocess.run(["cp", "-a", os.fspath(world.shadow), os.fspath(evil)], check=True)
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", os.fspath(evil)], check=True)
        before = snapshot(evil)
        moved = world.shadow.with_name("shadow.moved")
        os.rename(world.shadow, moved)
        world.shadow.symlink_to(evil)
        (world.mountpoint / "secret").write_text("not for the other user")
        n = world.checkpoint()
        r = fj("wait", world.mountpoint, "--checkpoint", str(n), "--timeout", "20", check=False)
        assert r.returncode != 0
        assert not (evil / "tree" / "secret").exists()
        assert_same(before, snapshot(evil))
        assert "symlink" in world.status()["updater_error"]
        # the real shadow comes back: the next checkpoint brings it up to date
        world.shadow.unlink()
        os.rename(moved, world.shadow)
        world.wait(world.checkpoint())
        assert (world.tree / "secret").read_text() == "not for the other user"
    finally:
        world.umount()


# ------------------------------------------------------------------ item 11: the shadow's identity

def _ids(m: Mounted) -> tuple[str, str]:
    meta = json.loads((m.journal / "meta.json").read_text())
    ident = json.loads((m.shadow / "shadow.json").read_text())
    return meta["shadow_id"], ident["id"]


def _user_dir(path: Path) -> dict:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(os.urandom(5000))
    return snapshot(path)


def _refused(m: Mounted, *more: object, text: str) -> None:
    r = fj("mount", m.source, m.mountpoint, "--journal", m.journal, "--shadow", m.shadow, *more,
           check=False)
    assert r.returncode == 3, r.stderr
    assert text in r.stderr, r.stderr
    assert "nothing was changed" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_identity_written_and_shared(world: Mounted) -> None:
    world.mount()
    world.umount()
    jid, sid = _ids(world)
    assert jid == sid and len(jid) == 32
    ident = json.loads((world.shadow / "shadow.json").read_text())
    assert ident["source"]["path"] == os.fspath(world.source)
    assert ident["source"]["ino"] == os.stat(world.source).st_ino


def test_reseed_refuses_an_ordinary_directory(world: Mounted) -> None:
    base = world.source.parent
    world.mount()
    world.umount()
    # the journal's own shadow path now holds someone's files
    os.rename(world.shadow, base / "shadow.old")
    before = _user_dir(world.shadow)
    _refused(world, "--reseed", text="is not a fusejournal shadow")
    assert_same(before, snapshot(world.shadow))
    # a new journal with --reseed naming an ordinary directory
    world.journal = base / "journal2"
    _refused(world, "--reseed", text="is not a fusejournal shadow")
    assert_same(before, snapshot(world.shadow))
    assert not world.journal.exists()


def test_shadow_of_another_source_is_refused(world: Mounted) -> None:
    base = world.source.parent
    world.mount()
    world.umount()
    before = snapshot(world.shadow)
    other = Mounted(base / "src2", world.mountpoint, base / "journal2", world.shadow)
    other.source.mkdir()
    (other.source / "b").write_text("b")
    _refused(other, text="is the shadow of another source")                 # a fresh journal
    _refused(other, "--reseed", text="is the shadow of another source")     # nor with --reseed
    assert_same(before, snapshot(world.shadow))
    assert not other.journal.exists()
    world.mount()                                                           # still ours
    world.umount()


def test_fresh_journal_does_not_adopt_an_old_shadow_of_this_source(world: Mounted) -> None:
    (world.source / "a").write_text("a")
    world.mount()
    world.umount()
    shutil.rmtree(world.journal)
    (world.source / "b").write_text("changed while nothing journaled it")
    before = snapshot(world.shadow)
    _refused(world, text="kept by another journal")
    assert_same(before, snapshot(world.shadow))
    world.mount("--reseed")                                 # the user's explicit choice
    try:
        assert (world.tree / "b").exists()
        jid, sid = _ids(world)
        assert jid == sid
    finally:
        world.umount()


def test_non_empty_ordinary_directories_are_refused(world: Mounted) -> None:
    base = world.source.parent
    before = _user_dir(world.shadow)
    _refused(world, text="is not a fusejournal shadow")
    assert_same(before, snapshot(world.shadow))
    assert not world.journal.exists()
    world.shadow = base / "shadow2"
    before_j = _user_dir(world.journal)
    r = fj("mount", world.source, world.mountpoint, "--journal", world.journal, "--shadow", world.shadow,
           check=False)
    assert r.returncode == 3 and "is not a fusejournal journal" in r.stderr, r.stderr
    assert_same(before_j, snapshot(world.journal))
    assert not world.shadow.exists()


def test_empty_directory_is_adopted(world: Mounted) -> None:
    world.shadow.parent.mkdir()
    world.shadow.mkdir()
    world.journal.mkdir()
    (world.source / "a").write_text("a")
    world.mount()
    try:
        assert (world.tree / "a").read_text() == "a"
        jid, sid = _ids(world)
        assert jid == sid
    finally:
        world.umount()


def test_shadow_from_before_identities_still_mounts(world: Mounted) -> None:
    """A journal and shadow made before shadow.json existed: adopted because the journal's
    meta.json names the shadow, then both get the identity."""
    world.mount()
    (world.mountpoint / "a").write_text("a")
    world.wait(world.checkpoint())
    world.umount()
    os.unlink(world.shadow / "shadow.json")
    meta = json.loads((world.journal / "meta.json").read_text())
    del meta["shadow_id"]
    (world.journal / "meta.json").write_text(json.dumps(meta))
    world.mount()
    try:
        jid, sid = _ids(world)
        assert jid == sid
        (world.mountpoint / "b").write_text("b")
        world.wait(world.checkpoint())
        assert (world.tree / "b").read_text() == "b"
    finally:
        world.umount()
    # the same legacy shadow is not adopted by a journal that does not name it
    os.unlink(world.shadow / "shadow.json")
    before = snapshot(world.shadow)
    world.journal = world.source.parent / "journal2"
    _refused(world, text="without an identity")
    _refused(world, "--reseed", text="without an identity")
    assert_same(before, snapshot(world.shadow))


def test_symlink_planted_in_a_journal_is_refused(world: Mounted) -> None:
    """A journal left loose by an older version may hold a symlink another user planted
    (log/ pointing at their directory): the mount refuses it instead of following it."""
    world.mount()
    world.umount()
    elsewhere = world.source.parent / "elsewhere"
    os.rename(world.journal / "log", elsewhere)
    (world.journal / "log").symlink_to(elsewhere)
    before = snapshot(elsewhere)
    r = fj("mount", world.source, world.mountpoint, "--journal", world.journal, "--shadow", world.shadow,
           check=False)
    assert r.returncode == 3 and "log is a symlink" in r.stderr, r.stderr
    assert_same(before, snapshot(elsewhere))


def test_symlinked_shadow_of_an_existing_journal_can_be_renamed(world: Mounted) -> None:
    """A journal whose shadow path was a symlink (accepted before): the mount names the real
    directory in its refusal, and mounting with that path re-points the journal to it."""
    base = world.source.parent
    real = base / "real-shadow"
    world.shadow = real
    world.mount()
    world.umount()
    link = base / "shadow-link"
    link.symlink_to(real)
    meta = json.loads((world.journal / "meta.json").read_text())
    meta["shadow"] = os.fspath(link)                 # as an older version would have kept it
    (world.journal / "meta.json").write_text(json.dumps(meta))
    world.shadow = link
    r = fj("mount", world.source, world.mountpoint, "--journal", world.journal, "--shadow", link,
           check=False)
    assert r.returncode == 3 and f"--shadow {real}" in r.stderr, r.stderr
    world.shadow = real
    world.mount()
    try:
        assert json.loads((world.journal / "meta.json").read_text())["shadow"] == os.fspath(real)
    finally:
        world.umount()


def test_journal_or_shadow_in_a_directory_others_can_write_is_refused(world: Mounted) -> None:
    """Whoever may write a parent can move the journal away and put their own in its place."""
    base = world.source.parent
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    r = fj("mount", world.source, world.mountpoint, "--journal", shared / "j", "--shadow", world.shadow,
           check=False)
    assert r.returncode == 3 and "writable by other users" in r.stderr, r.stderr
    r = fj("mount", world.source, world.mountpoint, "--journal", world.journal, "--shadow", shared / "s",
           check=False)
    assert r.returncode == 3 and "writable by other users" in r.stderr, r.stderr
    assert os.listdir(shared) == [] and not world.journal.exists()
    os.chmod(shared, 0o1777)                         # sticky, like /tmp: others cannot move our entries
    world.journal, world.shadow = shared / "j", shared / "s"
    world.mount()
    world.umount()


def test_shadow_in_use_is_not_reseeded_by_another_journal(world: Mounted) -> None:
    """A second journal of the same source may not re-seed a shadow a running daemon uses."""
    (world.source / "a").write_text("a")
    world.mount()
    try:
        world.wait(world.checkpoint())
        before = snapshot(world.shadow)
        mnt2 = world.source.parent / "mnt2"
        mnt2.mkdir()
        second = Mounted(world.source, mnt2, world.source.parent / "journal2", world.shadow)
        try:
            r = fj("mount", second.source, mnt2, "--journal", second.journal, "--shadow", world.shadow,
                   "--reseed", check=False)
            assert r.returncode == 3 and "in use by another fusejournal daemon" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        finally:
            second.cleanup()
        assert_same(before, snapshot(world.shadow))
        (world.mountpoint / "b").write_text("b")
        world.wait(world.checkpoint())                # the running daemon is unaffected
        assert (world.tree / "b").read_text() == "b"
    finally:
        world.umount()


# ------------------------------------------------------------------ the control attributes

#: reads every control attribute of the mount root as the other user; "ok" or the errno name
CONTROL_READS = r"""
import errno, json, os, sys
mp = sys.argv[1]
out = {}
for name in ("checkpoint", "shadow_checkpoint", "status", "journal", "pid", "requests", "nonsense"):
    try:
        os.getxattr(mp, "user.fusejournal." + name)
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
try:
    os.setxattr(mp, "user.fusejournal.update_permission", b"theirs")
    out["update_permission"] = "ok"
except OSError as e:
    out["update_permission"] = errno.errorcode.get(e.errno, str(e.errno))
out["listed"] = [n for n in os.listxattr(mp) if n.startswith("user.fusejournal.")]
out["listing"] = sorted(os.listdir(mp))          # the mount itself is theirs to use (allow_other)
print(json.dumps(out))
"""

CONTROL_NAMES = ["checkpoint", "shadow_checkpoint", "status", "journal", "pid", "requests", "nonsense"]


def test_other_user_cannot_read_the_control_attributes(world: Mounted) -> None:
    """Root's journaling mount is ``allow_other`` (the application may run as another
    user), so other users reach its root; the control attributes (the journal's path, the
    labels in the status, the checkpoint ids, the daemon's pid) are still root's and the
    owner's only, as the journal itself is (promise 5).  Failed before: every read was ok."""
    (world.source / "app.db").write_bytes(b"rows")
    os.chmod(world.source / "app.db", 0o644)
    world.mount()
    try:
        n = world.checkpoint("secret label")
        world.wait(n)
        got = as_nobody(CONTROL_READS, world.mountpoint)
        assert got.pop("listing") == ["app.db"]
        assert got.pop("listed") == []
        assert got.pop("update_permission") in ("EACCES", "EPERM")   # the kernel checks write access first
        assert got == {name: "EPERM" for name in CONTROL_NAMES}, got
        # the CLI says so in one line, for each command that reads a mount's state
        for cmd in (["status", world.mountpoint], ["wait", world.mountpoint, "--timeout", "5"],
                    ["checkpoint", world.mountpoint, "--label", "theirs"], ["log", world.mountpoint],
                    ["umount", world.mountpoint]):
            r = fj_as_nobody(*cmd)
            if r.returncode != 0 and "No module named" in r.stderr:
                pytest.skip(f"the interpreter is not usable by another user: {r.stderr.strip()}")
            assert r.returncode == 3, (cmd, r.returncode, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, (cmd, r.stderr)
            assert "permission denied" in r.stderr and "owner of the mount root" in r.stderr, r.stderr
            assert "secret label" not in r.stdout + r.stderr
        # root still reads all of them, nothing was taken, and the mount is still up
        assert world.status()["last_checkpoint"] == n
        assert int(os.getxattr(world.mountpoint, b"user.fusejournal.pid")) == world.pid
        assert world.checkpoint() == n + 1
    finally:
        world.umount()


def test_the_owner_of_the_mount_root_reads_and_checkpoints(world: Mounted) -> None:
    """The owner of the source's root (here uid 65534) is the mount's owner: it reads the
    control attributes and takes checkpoints, through the CLI and setfattr alike, and
    ``status`` and ``wait`` answer it from those attributes (a backup hook run as the
    application's user: checkpoint, then wait).  The journal and the shadow stay private
    to the daemon's user, root: ``log``, which reads the journal, says so in one line.
    (status and wait failed before: they read the journal's meta.json.)"""
    os.chown(world.source, NOBODY, NOBODY)
    world.mount()
    try:
        got = as_nobody(CONTROL_READS, world.mountpoint)
        assert got.pop("update_permission") == "ok"
        assert got.pop("nonsense") == "ENODATA"
        assert got.pop("listed") == [] and got.pop("listing") == []
        assert got == {name: "ok" for name in CONTROL_NAMES if name != "nonsense"}, got
        r = fj_as_nobody("checkpoint", world.mountpoint, "--label", "owner's")
        if r.returncode != 0 and "No module named" in r.stderr:
            pytest.skip(f"the interpreter is not usable by another user: {r.stderr.strip()}")
        assert r.returncode == 0 and r.stdout.strip() == "2", r.stderr
        r = fj_as_nobody("wait", world.mountpoint, "--timeout", "30")
        assert r.returncode == 0, r.stderr
        r = fj_as_nobody("status", "--json", world.mountpoint)
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["last_checkpoint"] == 2 and st["shadow_checkpoint"] == 2
        assert st["journal"] == os.fspath(world.journal)
        r = fj_as_nobody("status", world.mountpoint)
        assert r.returncode == 0 and "last_checkpoint: 2" in r.stdout, r.stderr
        r = fj_as_nobody("log", world.mountpoint)
        assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "permission denied" in r.stderr, r.stderr
        assert as_nobody(CONTROL_READS, world.mountpoint)["update_permission"] == "ok"   # the 3rd
        world.wait(3)
        assert world.status()["last_checkpoint"] == 3
    finally:
        world.umount()
