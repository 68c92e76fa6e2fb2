"""Run by tests/test_lru_kernel.py inside a memory-limited v1 group (not a test module).

Several threads read and write a ShrinkableLRU of ~100 KiB values over more keys than the group
can hold, each thread checking every value it reads; a miss costs ``--miss-latency`` seconds, as
a backend would. The process's embedded controller (which finds the group and its limit) sends
shrink requests while they run. At the end, at a quiescent point (every request sent has been
handled and none is sent while the books are read), print one JSON line with the figures and
whether the controller's count equals the cache's chunks.

    python tests/lru_pressure_worker.py --threads 4 --keys 3000 --ops 4000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time

from pyshrinker import ShrinkableLRU, default_controller, settle

VALUE_SIZE = 100 * 1024


def value_for(key: int) -> bytes:
    """The value stored under ``key``: recognisable, ~100 KiB, a fresh allocation each time."""
    return key.to_bytes(4, "little") * (VALUE_SIZE // 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--keys", type=int, default=3000)
    parser.add_argument("--ops", type=int, default=4000, help="operations per thread")
    parser.add_argument("--miss-latency", type=float, default=0.001, help="seconds per miss")
    args = parser.parse_args(argv)

    controller = default_controller()
    cache: ShrinkableLRU[int, bytes] = ShrinkableLRU(name="pressure-worker")
    errors: list[str] = []
    counts = {"hits": 0, "misses": 0}
    lock = threading.Lock()

    def work(seed: int) -> None:
        rng = random.Random(seed)
        hits = misses = 0
        try:
            for _ in range(args.ops):
                # A skewed key choice, so there is something worth keeping.
                key = int(args.keys * rng.random() ** 2)
                value = cache.get(key)
                if value is None:
                    misses += 1
                    time.sleep(args.miss_latency)
                    cache[key] = value_for(key)
                elif value != value_for(key):
                    errors.append(f"wrong value under {key}")
                else:
                    hits += 1
                if rng.random() < 0.02:
                    cache.pop(rng.randrange(args.keys), None)
        except BaseException as err:
            errors.append(repr(err))
        with lock:
            counts["hits"] += hits
            counts["misses"] += misses

    threads = [threading.Thread(target=work, args=(n,)) for n in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    balanced = False
    for _attempt in range(100):
        sent = len(controller.history())
        settle()
        cache.flush()
        counted = controller.count(cache.shrinker.efd)
        stats = cache.stats()
        if len(controller.history()) == sent:
            balanced = counted == stats.chunks
            break
        time.sleep(0.01)
    shrinker = cache.shrinker.stats()
    print(
        json.dumps(
            {
                "errors": errors,
                "hits": counts["hits"],
                "misses": counts["misses"],
                "entries": stats.entries,
                "chunks": stats.chunks,
                "controller_count": counted,
                "books_balance": balanced,
                "evicted_on_request": stats.evicted_on_request,
                "requests": shrinker.requests,
                "signals": controller.describe_signals(),
            }
        ),
        flush=True,
    )
    cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
