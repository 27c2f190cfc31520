"""A paced writer for the consistency-group measurement, run as a child process
(so a hung mount can be aborted and the writer killed without taking the
benchmark down).  Standard library only.

    python group_writer.py DIR RATE SEED

Until SIGTERM, at RATE operations per second (0: as fast as it can), in DIR:
  - 15 of 16 operations: pwrite 4 KiB of fresh random data at a random 4 KiB
    offset of DIR/data.bin (4 MiB, created first);
  - 1 of 16: create DIR/small-N, write 4 KiB, close; once 32 exist, unlink the
    oldest in the same operation.
Every operation is timed; an operation that waits behind a halt shows as a
slow one.  On SIGTERM it finishes the operation in hand and prints one JSON
object: operations, seconds, its own CPU seconds, latency percentiles (ms),
how many took over 10 and 50 ms, and the first errors.
"""

import json
import os
import random
import signal
import sys
import time

FILE_BYTES = 4 << 20
BLOCK = 4096
KEEP_SMALL = 32


def main() -> None:
    d, rate, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "data.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, FILE_BYTES)
    pool = os.urandom(1 << 20)             # fresh-looking data without an urandom call per write
    lat: list[float] = []
    errors: list[str] = []
    small: list[str] = []
    n = made = 0
    period = 1.0 / rate if rate > 0 else 0.0
    t_start = time.perf_counter()
    next_t = t_start
    c0 = os.times()
    print("ready", file=sys.stderr, flush=True)
    while not stop:
        if period:
            now = time.perf_counter()
            if next_t > now:
                time.sleep(next_t - now)
                if stop:
                    break
            elif now - next_t > 1.0:       # fell behind (a long halt): do not burst
                next_t = now
            next_t += period
        t0 = time.perf_counter()
        try:
            if n % 16 == 15:
                name = os.path.join(d, f"small-{made}")
                made += 1
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    off = rng.randrange(0, len(pool) - BLOCK)
                    os.write(f, pool[off:off + BLOCK])
                finally:
                    os.close(f)
                small.append(name)
                if len(small) > KEEP_SMALL:
                    os.unlink(small.pop(0))
            else:
                off = rng.randrange(0, len(pool) - BLOCK)
                os.pwrite(fd, pool[off:off + BLOCK], rng.randrange(0, FILE_BYTES // BLOCK) * BLOCK)
        except OSError as e:
            if len(errors) < 5:
                errors.append(f"{type(e).__name__}: {e}")
        lat.append(time.perf_counter() - t0)
        n += 1
    elapsed = time.perf_counter() - t_start
    c1 = os.times()
    os.close(fd)
    lat.sort()

    def pct(p: float):
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(round((len(lat) - 1) * p / 100.0)))] * 1000.0
    json.dump({"operations": n, "seconds": elapsed, "ops_per_s": n / elapsed if elapsed else None,
               "cpu_s": (c1.user - c0.user) + (c1.system - c0.system),
               "lat_p50_ms": pct(50), "lat_p99_ms": pct(99), "lat_max_ms": lat[-1] * 1000.0 if lat else None,
               "over_10ms": sum(1 for x in lat if x > 0.010), "over_50ms": sum(1 for x in lat if x > 0.050),
               "errors": errors}, sys.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
