"""The four targets: native directory, pyfuse3's reference passthroughfs,
fusejournal, and fusejournal with a checkpoint every second.

Each measurement gets a fresh target: setup() makes new backing directories
under the run's scratch directory (on the same disk for every target), mounts,
and returns the directory the workload runs in; teardown() always unmounts,
stops any daemon we started and removes the directories.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import os
import subprocess
import tarfile
import threading
import time
from pathlib import Path

from .util import (
    BENCH_DIR,
    REPO,
    VENV_PYTHON,
    BenchError,
    fuse_abort,
    fuse_unmount,
    is_mounted,
    kill_pid,
    log,
    pid_alive,
    rmtree,
    run_cmd,
    short,
    tail,
    wait_mounted,
)

CONTROL_XATTR = "user.fusejournal.update_permission"
CHECKPOINT_XATTR = "user.fusejournal.checkpoint"
SHADOW_XATTR = "user.fusejournal.shadow_checkpoint"

_LIVE: set = set()


def _teardown_all() -> None:
    for t in list(_LIVE):
        try:
            t.teardown()
        except Exception as e:  # noqa: BLE001
            log(f"atexit teardown of {t.key} failed: {e}")


atexit.register(_teardown_all)


# --------------------------------------------------------------------------- tools


def python_with_pyfuse3() -> str:
    """An interpreter that can import pyfuse3 (ours if it can, else the venv's)."""
    import sys
    for py in (sys.executable, str(VENV_PYTHON)):
        if py and Path(py).exists():
            r = subprocess.run([py, "-c", "import pyfuse3, trio"], capture_output=True, timeout=60)
            if r.returncode == 0:
                return py
    raise BenchError("no Python with pyfuse3 and trio found (tried this one and .venv: run ./scripts/setup-venv.sh)")


def fetch_passthroughfs(py: str, cache: Path) -> Path:
    """pyfuse3's own, unmodified examples/passthroughfs.py for the installed
    pyfuse3 version, extracted from its sdist (downloaded once with pip)."""
    r = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('pyfuse3'))"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise BenchError(f"cannot tell the pyfuse3 version: {short(r.stderr)}")
    # a local build (3.5.0+fusejournal.2: pyfuse3 with vendor/pyfuse3's patch, which
    # changes nothing for a filesystem that does not ask for its flags) runs the example
    # of the release it was built from
    version = r.stdout.strip().split("+")[0]
    out = cache / f"pyfuse3-{version}" / "passthroughfs.py"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    sdists = glob.glob(str(cache / f"pyfuse3-{version}.tar.gz"))
    if not sdists:
        log(f"downloading the pyfuse3=={version} sdist for examples/passthroughfs.py")
        run_cmd([py, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                 f"pyfuse3=={version}", "-d", cache], timeout=600)
        sdists = glob.glob(str(cache / f"pyfuse3-{version}.tar.gz"))
        if not sdists:
            raise BenchError(f"pip download left no pyfuse3-{version}.tar.gz in {cache}")
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith("/examples/passthroughfs.py")]
        if not members:
            raise BenchError("no examples/passthroughfs.py in the pyfuse3 sdist")
        data = tar.extractfile(members[0]).read()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    (out.parent / "SOURCE.txt").write_text(
        f"{members[0].name} from {Path(sdists[0]).name}, sha256 {hashlib.sha256(data).hexdigest()}\n")
    return out


def fusejournal_cli() -> tuple[list[str], dict]:
    """How to run the fusejournal CLI of *this checkout*: `python -m
    fusejournal.cli` with the repo on PYTHONPATH (so a clone benchmarks its own
    code), else .venv/bin/fusejournal.  FJBENCH_FUSEJOURNAL
    (a command line) overrides both."""
    env = dict(os.environ)
    if env.get("FJBENCH_FUSEJOURNAL"):
        import shlex
        return shlex.split(env["FJBENCH_FUSEJOURNAL"]), env
    if (REPO / "fusejournal" / "cli.py").exists():
        py = python_with_pyfuse3()
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return [py, "-m", "fusejournal.cli"], env
    exe = REPO / ".venv" / "bin" / "fusejournal"
    if exe.exists():
        return [str(exe)], env
    raise BenchError("fusejournal CLI not found (no fusejournal/cli.py, no .venv/bin/fusejournal)")


# --------------------------------------------------------------------------- targets


class Target:
    key = "?"
    label = "?"
    is_fuse = False
    is_fusejournal = False

    def __init__(self, env) -> None:
        self.env = env             # the run's settings (scratch dir, timeouts, tool paths)
        self.base: Path | None = None
        self.path: Path | None = None
        self.notes: dict = {}

    # called once per run: None when usable, else the reason it is not
    def probe(self) -> str | None:
        return None

    def setup(self, tag: str) -> Path:
        raise NotImplementedError

    def teardown(self) -> None:
        _LIVE.discard(self)
        if self.base is not None:
            rmtree(self.base)
        self.base = self.path = None

    def abort(self) -> None:
        """Make syscalls blocked on this target fail (FUSE abort)."""

    def daemon_pid(self) -> int | None:
        return None

    def _fresh(self, tag: str) -> Path:
        self.base = self.env.scratch / f"{tag}-{self.key}"
        rmtree(self.base)
        self.base.mkdir(parents=True)
        _LIVE.add(self)
        return self.base


class Native(Target):
    key = "native"
    label = "native"

    def setup(self, tag: str) -> Path:
        base = self._fresh(tag)
        self.path = base / "data"
        self.path.mkdir()
        return self.path


class Passthrough(Target):
    key = "passthrough"
    label = "reference passthrough"
    is_fuse = True

    def __init__(self, env) -> None:
        super().__init__(env)
        self.proc: subprocess.Popen | None = None
        self.mnt: Path | None = None

    def probe(self) -> str | None:
        try:
            self.py = python_with_pyfuse3()
            self.script = fetch_passthroughfs(self.py, BENCH_DIR / ".cache")
        except (BenchError, OSError, subprocess.SubprocessError) as e:
            return f"passthroughfs unavailable: {e}"
        return None

    def setup(self, tag: str) -> Path:
        base = self._fresh(tag)
        backing, self.mnt = base / "backing", base / "mnt"
        backing.mkdir()
        self.mnt.mkdir()
        self.logfile = base / "passthroughfs.log"
        with open(self.logfile, "wb") as lf:
            self.proc = subprocess.Popen([self.py, str(self.script), str(backing), str(self.mnt)],
                                         stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_mounted(self.mnt, self.env.mount_timeout, alive=lambda: self.proc.poll() is None)
        except BenchError as e:
            raise BenchError(f"mount: {e}; log: {short(tail(self.logfile), 200)}") from None
        self.path = self.mnt
        return self.path

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def abort(self) -> None:
        if self.mnt is not None:
            fuse_abort(self.mnt)

    def teardown(self) -> None:
        try:
            if self.mnt is not None:
                fuse_unmount(self.mnt)
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()
                    try:
                        self.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(timeout=10)
                if self.mnt is not None and is_mounted(self.mnt):
                    fuse_abort(self.mnt)
                    fuse_unmount(self.mnt)
        finally:
            self.proc = None
            self.mnt = None
            super().teardown()


class Fusejournal(Target):
    key = "fusejournal"
    label = "fusejournal"
    is_fuse = True
    is_fusejournal = True
    checkpoint_every: float | None = None

    def __init__(self, env) -> None:
        super().__init__(env)
        self.mnt: Path | None = None
        self.journal: Path | None = None
        self.pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def probe(self) -> str | None:
        try:
            self.cli, self.cli_env = fusejournal_cli()
            r = run_cmd(self.cli + ["--help"], timeout=60, env=self.cli_env, check=False)
        except BenchError as e:
            return str(e)
        if r.returncode != 0:
            return f"`fusejournal --help` exited {r.returncode}: {short(r.stderr or r.stdout, 200)}"
        return None

    def fj(self, *args, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return run_cmd(self.cli + [str(a) for a in args], timeout=timeout, env=self.cli_env,
                       check=check, on_timeout=self.abort, **kw)

    def setup(self, tag: str, prepare=None) -> Path:
        base = self._fresh(tag)
        source, self.mnt = base / "source", base / "mnt"
        self.journal, self.shadow = base / "journal", base / "shadow"
        source.mkdir()
        self.mnt.mkdir()
        if prepare is not None:          # fill the source before the first mount (seedpgbench.py)
            prepare(source)
        self.logfile = base / "mount.log"
        try:
            self.fj("mount", source, self.mnt, "--journal", self.journal, "--shadow", self.shadow,
                    timeout=self.env.mount_timeout, stdout_path=self.logfile)
        except BenchError as e:
            self._find_pid()
            raise BenchError(f"mount: {e}") from None
        self._find_pid()
        if not is_mounted(self.mnt):
            raise BenchError(f"mount returned but {self.mnt} is not a FUSE mount; log: {short(tail(self.logfile))}")
        self.path = self.mnt
        self.checkpoints_ok = 0
        self.checkpoint_failures: list[str] = []
        self.checkpoint_times: list[float] = []
        self.max_lag = 0
        if self.checkpoint_every:
            self._stop.clear()
            self._thread = threading.Thread(target=self._checkpoint_loop, daemon=True,
                                            name=f"checkpoint-{tag}")
            self._thread.start()
        return self.path

    def _find_pid(self) -> None:
        try:
            self.pid = int(json.loads((self.journal / "daemon.json").read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            self.pid = None

    def daemon_pid(self) -> int | None:
        return self.pid if self.pid and pid_alive(self.pid) else None

    def _checkpoint_loop(self) -> None:
        """setfattr on the mount root every checkpoint_every seconds (fixed
        cadence; if one takes longer, the next starts right away).  Records how
        long each setfattr took and how many checkpoints the shadow is behind."""
        n = 0
        next_t = time.monotonic() + self.checkpoint_every
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            n += 1
            t0 = time.perf_counter()
            try:
                run_cmd(["setfattr", "-n", CONTROL_XATTR, "-v", f"bench-{n}", self.mnt],
                        timeout=max(30.0, self.env.workload_timeout))
                self.checkpoint_times.append(time.perf_counter() - t0)
                self.checkpoints_ok += 1
                try:
                    last = int(os.getxattr(self.mnt, CHECKPOINT_XATTR))
                    applied = int(os.getxattr(self.mnt, SHADOW_XATTR))
                    self.max_lag = max(self.max_lag, last - applied)
                except (OSError, ValueError):
                    pass
            except BenchError as e:
                self.checkpoint_failures.append(short(e, 120))
            next_t = max(next_t + self.checkpoint_every, time.monotonic())

    def checkpoint_summary(self) -> dict:
        ts = sorted(self.checkpoint_times)
        out = {"checkpoints": self.checkpoints_ok, "shadow_lag_max_checkpoints": self.max_lag}
        if ts:
            out["setfattr_p50_ms"] = round(ts[len(ts) // 2] * 1000, 2)
            out["setfattr_max_ms"] = round(ts[-1] * 1000, 2)
        if self.checkpoint_failures:
            out["checkpoint_failures"] = self.checkpoint_failures[:3]
        return out

    def stop_checkpoints(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(30.0, self.env.workload_timeout))
            self._thread = None

    def status(self) -> dict:
        r = self.fj("status", self.mnt, "--json", timeout=60, check=False)
        try:
            return json.loads(r.stdout)
        except ValueError:
            raise BenchError(f"status --json exited {r.returncode}: {short(r.stderr or r.stdout)}") from None

    def abort(self) -> None:
        if self.mnt is not None:
            fuse_abort(self.mnt)

    def teardown(self) -> None:
        """Unmount the way `fusejournal umount` does (fusermount3 -u, then wait
        for the daemon to exit, so its shutdown work - saving pending operations
        - is over before the next measurement), but count a zombie as exited:
        `fusejournal umount` polls kill(pid, 0), which on a machine whose PID 1
        reaps late waits ~1-2 s per unmount for nothing.  Falls back to a lazy
        unmount and killing the daemon."""
        try:
            self.stop_checkpoints()
            if self.pid is None and self.journal is not None:
                self._find_pid()
            if self.mnt is not None and is_mounted(self.mnt):
                try:
                    run_cmd(["fusermount3", "-u", self.mnt], timeout=60, on_timeout=self.abort)
                except BenchError as e:
                    self.notes["umount_error"] = short(e, 160)
                    log(f"fusermount3 -u failed ({short(e, 120)}); forcing")
            if self.pid:
                deadline = time.monotonic() + self.env.umount_timeout
                while pid_alive(self.pid) and time.monotonic() < deadline and not (
                        self.mnt is not None and is_mounted(self.mnt)):
                    time.sleep(0.02)
                if pid_alive(self.pid) and not (self.mnt is not None and is_mounted(self.mnt)):
                    self.notes["umount_error"] = f"daemon still running {self.env.umount_timeout:.0f}s after unmount"
            if self.mnt is not None and is_mounted(self.mnt):
                fuse_abort(self.mnt)
                fuse_unmount(self.mnt)
            if self.pid and pid_alive(self.pid):
                kill_pid(self.pid)
        finally:
            self.mnt = None
            self.pid = None
            self.journal = None
            super().teardown()


class FusejournalCheckpointing(Fusejournal):
    key = "fusejournal_ckpt"
    label = "fusejournal + checkpoint/1s"
    checkpoint_every = 1.0


ALL_TARGETS = [Native, Passthrough, Fusejournal, FusejournalCheckpointing]
TARGET_KEYS = [t.key for t in ALL_TARGETS]
TARGET_ALIASES = {"1": "native", "2": "passthrough", "3": "fusejournal", "4": "fusejournal_ckpt",
                  "ref": "passthrough", "reference": "passthrough", "fj": "fusejournal",
                  "fj_ckpt": "fusejournal_ckpt", "fusejournal-ckpt": "fusejournal_ckpt"}
