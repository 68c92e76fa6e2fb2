"""Run by tests/test_faults.py inside memory-limited v1 groups (not a test module).

Each scenario allocates through ChunkCaches with the process's embedded controller and prints
one JSON line of figures at the end. Scenarios that need the test to change something midway
(lower the limit, move the process) print ``ready`` once they hold ``--before`` MiB and wait for
a line on stdin before going on.

    python tests/fault_worker.py lowered-limit --before 70 --after 400
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from pyshrinker import ChunkCache, Shrinker, default_controller, settle

MiB = 1 << 20


def filled(nbytes: int) -> bytes:
    """A value whose pages are really touched (bytes(n) and bytearray(n) may not be)."""
    return b"\x01" * nbytes


def fill(cache: ChunkCache[int, bytes], start: int, mib: int, value_size: int) -> int:
    """Put ``mib`` MiB into ``cache`` as values of ``value_size`` bytes; returns the next key."""
    key = start
    for _ in range(mib * MiB // value_size):
        cache.put(key, filled(value_size), nbytes=value_size)
        key += 1
    return key


def wait_for_go() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected 'go'")


def books(cache: ChunkCache[int, bytes]) -> dict[str, object]:
    settle()
    cache.flush()
    controller = default_controller()
    return {
        "controller_count": controller.count(cache.shrinker.efd),
        "chunks": cache.chunks,
        "requests": cache.shrinker.stats().requests,
        "evicted": cache.stats().evicted_on_request,
        "signals": controller.describe_signals(),
    }


def changed_midway(args: argparse.Namespace) -> dict[str, object]:
    """Hold ``--before`` MiB, let the test change the limit or the group, then add ``--after``."""
    default_controller()
    cache: ChunkCache[int, bytes] = ChunkCache(MiB, name="midway")
    key = fill(cache, 0, args.before, MiB)
    wait_for_go()
    fill(cache, key, args.after, MiB)
    return books(cache)


def stuck_callback(args: argparse.Namespace) -> dict[str, object]:
    """One shrinker's callback blocks for good; memory then grows outside every cache.

    Only the listener can serve the healthy cache then (no report of new chunks, so no direct
    reclaim): it must be asked and answer while the other callback stays stuck.
    """
    controller = default_controller()
    stuck = threading.Event()

    def never_returns(asked: int) -> int:
        stuck.set()
        threading.Event().wait()
        return 0

    blocked = Shrinker.register(MiB, never_returns, name="stuck")
    blocked.report(64)
    blocked.flush()
    cache: ChunkCache[int, bytes] = ChunkCache(MiB, name="healthy")
    fill(cache, 0, args.before, MiB)
    controller.request(blocked.efd, 1)
    if not stuck.wait(10):
        raise SystemExit("the stuck callback was never called")
    outside = []
    for _ in range(args.after):
        outside.append(filled(MiB))
        time.sleep(0.002)
    figures = {
        "evicted": cache.stats().evicted_on_request,
        "chunks": cache.chunks,
        "outside_mib": len(outside),
    }
    return figures


def heap_values(args: argparse.Namespace) -> dict[str, object]:
    """Values of 8-32 KiB (heap-allocated, below the mmap threshold), as fast as possible."""
    default_controller()
    cache: ChunkCache[int, bytes] = ChunkCache(4096, name="heap")
    sizes = [8 << 10, 12 << 10, 16 << 10, 24 << 10, 32 << 10]
    total = 0
    key = 0
    start = time.monotonic()
    while total < args.after * MiB:
        size = sizes[key % len(sizes)]
        cache.put(key, filled(size), nbytes=size)
        total += size
        key += 1
    figures = books(cache)
    figures["seconds"] = time.monotonic() - start
    return figures


SCENARIOS = {
    "lowered-limit": changed_midway,
    "moved": changed_midway,
    "stuck-callback": stuck_callback,
    "heap-values": heap_values,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--before", type=int, default=70, help="MiB held before the change")
    parser.add_argument("--after", type=int, default=400, help="MiB allocated afterwards")
    args = parser.parse_args(argv)
    figures = SCENARIOS[args.scenario](args)
    figures["pid"] = os.getpid()
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
