"""Small-file workload, run in a child process (so a hung mount can be aborted
and killed without taking the benchmark down).  Standard library only.

    python smallfile_worker.py DIR COUNT [--no-drop-caches]

Prints one JSON object: seconds for each phase and the entry count seen.
Phases, in order:
  create     create + write 4 KiB + close, COUNT files, then sync()
  stat_warm  os.stat every file (right after creating them)
  list       os.scandir the directory, names and d_type only (like `ls -f`)
  stat_cold  sync; drop caches; os.stat every file
  unlink     os.unlink every file
"""

import json
import os
import sys
import time


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    d = sys.argv[1]
    n = int(sys.argv[2])
    drop = "--no-drop-caches" not in sys.argv
    sub = os.path.join(d, "smallfiles")
    os.mkdir(sub)
    names = [os.path.join(sub, f"f{i:06d}") for i in range(n)]
    # distinct, incompressible 4 KiB per file, generated before the clock starts
    blob = os.urandom(4096 * min(n, 4096))
    chunks = [blob[(i % 4096) * 4096:(i % 4096 + 1) * 4096] for i in range(min(n, 4096))]
    res = {"files": n}
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL

    t = time.perf_counter()
    for i, p in enumerate(names):
        fd = os.open(p, flags, 0o644)
        os.write(fd, chunks[i % len(chunks)])
        os.close(fd)
    os.sync()
    res["create"] = time.perf_counter() - t

    t = time.perf_counter()
    for p in names:
        os.stat(p)
    res["stat_warm"] = time.perf_counter() - t

    t = time.perf_counter()
    count = 0
    with os.scandir(sub) as it:
        for e in it:
            e.name
            e.is_dir(follow_symlinks=False)   # d_type only, no stat
            count += 1
    res["list"] = time.perf_counter() - t
    res["listed"] = count

    res["dropped_caches"] = drop_caches() if drop else False
    t = time.perf_counter()
    for p in names:
        os.stat(p)
    res["stat_cold"] = time.perf_counter() - t

    t = time.perf_counter()
    for p in names:
        os.unlink(p)
    res["unlink"] = time.perf_counter() - t
    os.rmdir(sub)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
