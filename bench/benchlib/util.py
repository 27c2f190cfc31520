"""Small helpers shared by the benchmark: processes, mounts, caches, /proc."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO = BENCH_DIR.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"    # ./scripts/setup-venv.sh makes it

MiB = 1 << 20
GiB = 1 << 30


class BenchError(Exception):
    """A failure that is reported as "failed: reason" in the table."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- processes


def run_cmd(cmd, *, timeout: float, on_timeout=None, cwd=None, env=None,
            stdout_path: Path | None = None, check: bool = True,
            stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """Run cmd in its own session; on timeout call on_timeout() (e.g. abort the
    FUSE connection so that blocked syscalls return), then SIGKILL the group.

    If stdout_path is given, stdout and stderr go to that file (needed for
    commands that daemonize: a daemon keeping our pipe open would hang us).
    """
    cmd = [str(c) for c in cmd]
    out_f = open(stdout_path, "ab") if stdout_path else None
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=stdin,
            stdout=out_f if out_f else subprocess.PIPE,
            stderr=subprocess.STDOUT if out_f else subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as e:
        if out_f:
            out_f.close()
        raise BenchError(f"cannot run {cmd[0]}: {e}") from e
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException as exc:
            if not isinstance(exc, subprocess.TimeoutExpired):
                # interrupted (SIGTERM/SIGINT): never leave the child running
                kill_group(proc)
                raise
            if on_timeout is not None:
                try:
                    on_timeout()
                except Exception:  # noqa: BLE001 - best effort
                    pass
            kill_group(proc)
            try:
                proc.communicate(timeout=20)
            except Exception:  # noqa: BLE001
                pass
            raise BenchError(f"timeout after {timeout:.0f}s: {' '.join(cmd[:3])}") from None
    finally:
        if out_f:
            out_f.close()
    if stdout_path:
        out = Path(stdout_path).read_bytes()[-20000:]
        err = b""
    res = subprocess.CompletedProcess(cmd, proc.returncode,
                                      (out or b"").decode(errors="replace"),
                                      (err or b"").decode(errors="replace"))
    if check and res.returncode != 0:
        # the end of the output says why (a Python traceback ends with the exception)
        lines = [ln for ln in ((res.stderr or "") + "\n" + (res.stdout or "")).splitlines() if ln.strip()]
        tail_lines = [ln for ln in lines if not ln.startswith((" ", "Traceback"))][-2:]
        name = Path(cmd[1]).name if Path(cmd[0]).name.startswith("python") and len(cmd) > 1 else Path(cmd[0]).name
        raise BenchError(f"{name} exited {res.returncode}: {short(' | '.join(tail_lines), 220)}")
    return res


def kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGKILL,):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def kill_pid(pid: int, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after grace seconds, a process we started."""
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------------- mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_entry(path) -> dict | None:
    """The /proc/self/mountinfo entry whose mount point is path, if any."""
    path = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        parts = line.split()
        if len(parts) < 10 or _unescape(parts[4]) != path:
            continue
        sep = parts.index("-")
        found = {"dev": parts[2], "fstype": parts[sep + 1], "source": parts[sep + 2]}
    return found  # the last one wins (stacked mounts)


def is_mounted(path, fstype_prefix: str = "fuse") -> bool:
    ent = mount_entry(path)
    return bool(ent and ent["fstype"].startswith(fstype_prefix))


def wait_mounted(path, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(path):
            return
        if not alive():
            raise BenchError("daemon exited before the mount appeared")
        time.sleep(0.05)
    raise BenchError(f"not mounted after {timeout:.0f}s")


def fuse_abort(path) -> bool:
    """Abort the FUSE connection mounted at path (blocked syscalls then fail
    with ENOTCONN instead of hanging).  Best effort."""
    ent = mount_entry(path)
    if not ent or not ent["fstype"].startswith("fuse"):
        return False
    minor = ent["dev"].split(":")[1]
    try:
        Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
        return True
    except OSError:
        return False


def fuse_unmount(path, timeout: float = 30) -> None:
    """Lazy unmount; tolerate "not mounted"."""
    if not is_mounted(path):
        return
    try:
        run_cmd(["fusermount3", "-u", "-z", path], timeout=timeout, check=False)
    except BenchError:
        pass
    if is_mounted(path):
        try:
            run_cmd(["umount", "-l", path], timeout=timeout, check=False)
        except BenchError:
            pass


@contextmanager
def watchdog(seconds: float, on_fire, what: str = "operation"):
    """Call on_fire() (e.g. abort the FUSE connection) if the block takes longer
    than seconds; the blocked syscall then fails and we report a timeout."""
    fired = threading.Event()

    def fire():
        fired.set()
        try:
            on_fire()
        except Exception:  # noqa: BLE001
            pass

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception as e:
        if fired.is_set():
            raise BenchError(f"{what} timed out after {seconds:.0f}s ({short(e, 80)})") from e
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise BenchError(f"{what} timed out after {seconds:.0f}s")


def mounts_under(path) -> list[str]:
    path = os.path.realpath(path)
    out = []
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mp = _unescape(line.split()[4])
            if mp == path or mp.startswith(path.rstrip("/") + "/"):
                out.append(mp)
    except OSError:
        pass
    return out


def rmtree(path) -> None:
    """Remove a tree; first get rid of any mount still inside it (never delete
    through a live mount)."""
    path = Path(path)
    if not path.exists():
        return
    for mp in mounts_under(path):
        fuse_abort(mp)
        fuse_unmount(mp)
    if mounts_under(path):
        log(f"warning: {path} still has mounts, not removing it")
        return
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- caches & /proc


def drop_caches() -> bool:
    ok = True
    try:
        subprocess.run(["sync"], timeout=300, check=False)
    except Exception:  # noqa: BLE001
        ok = False
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        ok = False
    return ok


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # after the comm field: state is fields[0]; utime=14th, stime=15th of the full line
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_hwm_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def proc_reset_hwm(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- stats


def median(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def percentile(values, p: float):
    """Nearest-rank-with-interpolation percentile (numpy's default 'linear')."""
    vals = sorted(v for v in values if isinstance(v, (int, float)))
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    k = (len(vals) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
        info["memory_gib"] = round(int(mem) / (1 << 20), 1)
    except (OSError, IndexError, ValueError):
        pass
    for name, cmd in (("fio", ["fio", "--version"]), ("dbench", ["dbench", "--help"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            first = (out.stdout or out.stderr).strip().splitlines()[0]
            info[name] = first.replace(" - Copyright Andrew Tridgell 1999-2004", "")
        except Exception:  # noqa: BLE001
            info[name] = "missing"
    try:
        st = os.statvfs("/var/tmp")
        ent = None
        # the filesystem /var/tmp lives on
        best = ""
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            parts = line.split()
            mp = _unescape(parts[4])
            if "/var/tmp".startswith(mp.rstrip("/") + "/") or mp == "/var/tmp" or mp == "/":
                if len(mp) >= len(best):
                    sep = parts.index("-")
                    best, ent = mp, f"{parts[sep + 1]} on {parts[sep + 2]} (mounted at {mp})"
        info["disk"] = ent
        info["disk_free_gib"] = round(st.f_bavail * st.f_frsize / GiB, 1)
    except (OSError, ValueError):
        pass
    return info


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
