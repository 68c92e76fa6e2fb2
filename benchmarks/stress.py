"""Stress: many threads on three kinds of cache, under a limit that forces frequent requests.

A child process runs in a fresh cgroup v1 memory group (``--limit-mib``, default 256 MiB) with a
ChunkCache, a ShrinkableLRU and a ``@shrinkable_cache`` function, all holding values of 16-128
KiB, and ``--threads`` threads (default 16) doing random gets, puts, pops and calls on them for
``--seconds`` (default 60), wanting several times the limit. One more thread sends requests of
one chunk to the three caches in turn, ``--request-rate`` a second (default 10,000), through the
controller, as a daemon or another process would. The controller's own requests come on top.

At the end, at a quiescent point (every thread stopped, every request handled, reports flushed):

* ``exceptions``: anything any thread caught from a cache (there must be none);
* ``lost_requests``: chunks the controller asked for (counted by a request hook) that no
  shrinker read from its eventfd, plus requests a shrinker refused as absurd;
* ``drift_chunks``: the sum of |controller's count - cache's chunks| over the three caches;
* ``deadlock``: whether the run failed to finish within its time plus 60 s (the child's threads'
  stacks are then printed);
* ``oom_kills``: the group's OOM kills.

Last line: one JSON object with these and the operation and request counts.

    python benchmarks/stress.py                  # 60 s, 16 threads, 10k requests/s
    python benchmarks/stress.py --seconds 5      # a quick run
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Hashable
from typing import Any

MiB = 1 << 20


def child(args: argparse.Namespace) -> dict[str, Any]:
    """The work, in the limited group."""
    from pyshrinker import ChunkCache, ShrinkableLRU, default_controller, settle, shrinkable_cache
    from pyshrinker.controller import ShrinkRequest

    faulthandler.dump_traceback_later(args.seconds + 60, exit=True)
    controller = default_controller()
    asked: dict[Hashable, int] = {}
    asked_lock = threading.Lock()

    def count_asked(request: ShrinkRequest) -> None:
        with asked_lock:
            asked[request.key] = asked.get(request.key, 0) + request.chunks

    controller.add_request_hook(count_asked)
    sizes = [16 << 10, 32 << 10, 64 << 10, 128 << 10]
    chunk_cache: ChunkCache[int, bytes] = ChunkCache(4096, name="stress-chunks")
    lru: ShrinkableLRU[int, bytes] = ShrinkableLRU(name="stress-lru", memsize=len)

    @shrinkable_cache(maxsize=None, name="stress-function")
    def render(key: int) -> bytes:
        return b"\x03" * sizes[key % len(sizes)]

    keys = args.keys
    errors: list[str] = []
    ops = [0] * args.threads
    stop = threading.Event()

    def work(index: int) -> None:
        rng = random.Random(index)
        done = 0
        while not stop.is_set():
            key = int(keys * rng.random() ** 2)
            size = sizes[key % len(sizes)]
            which = rng.random()
            try:
                if which < 0.35:
                    if chunk_cache.get(key) is None:
                        chunk_cache.put(key, b"\x01" * size, nbytes=size)
                elif which < 0.7:
                    if lru.get(key) is None:
                        lru[key] = b"\x02" * size
                elif which < 0.95:
                    render(key)
                elif which < 0.975:
                    chunk_cache.pop(key, None)
                else:
                    lru.pop(key, None)
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
            done += 1
        ops[index] = done

    requests_sent = [0]

    def send_requests() -> None:
        # Paced by catching up: each turn sends what the rate owes since the start, so the
        # thread keeps the rate on average even when it waits for the GIL.
        targets = [chunk_cache.shrinker.efd, lru.shrinker.efd, render.shrinker.efd]
        begun = time.perf_counter()
        while not stop.is_set():
            owed = int((time.perf_counter() - begun) * args.request_rate) - requests_sent[0]
            for _ in range(min(owed, 1000)):
                try:
                    controller.request(targets[requests_sent[0] % 3], 1, reason="stress")
                except Exception as err:
                    errors.append(f"sender {type(err).__name__}: {err}")
                requests_sent[0] += 1
            time.sleep(0.0005)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(args.threads)]
    threads.append(threading.Thread(target=send_requests))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(args.seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started

    # Quiescence: nothing sent any more; every request read and settled; reports flushed.
    caches = {"chunk_cache": chunk_cache, "lru": lru, "function": render}
    for _ in range(200):
        before = sum(asked.values())
        settle()
        for cache in caches.values():
            cache.flush()
        settle()
        if sum(asked.values()) == before:
            break
    drift = {}
    lost = 0
    absurd = 0
    for name, cache in caches.items():
        shrinker = cache.shrinker
        drift[name] = controller.count(shrinker.efd) - cache.chunks
        stats = shrinker.stats()
        lost += asked.get(shrinker.efd, 0) - stats.chunks_requested
        absurd += shrinker._absurd_requests
    faulthandler.cancel_dump_traceback_later()
    return {
        "seconds": round(elapsed, 1),
        "threads": args.threads,
        "ops": sum(ops),
        "requests_sent_by_the_stress_thread": requests_sent[0],
        "request_rate": round(requests_sent[0] / elapsed),
        "chunks_asked": sum(asked.values()),
        "exceptions": len(errors),
        "first_exceptions": errors[:5],
        "lost_requests": lost + absurd,
        "drift_chunks": sum(abs(d) for d in drift.values()),
        "drift": drift,
        "evicted_on_request": chunk_cache.stats().evicted_on_request
        + lru.stats().evicted_on_request
        + render.stats().evicted_on_request,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--request-rate", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--limit-mib", type=int, default=256)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0

    from pyshrinker.cgroup import ManagedCgroupV1

    prefix = os.environ.get("PYSHRINKER_CGROUP_PREFIX", "pyshrinker-bench-")
    group = ManagedCgroupV1.create(f"{prefix}stress-{uuid.uuid4().hex[:8]}", args.limit_mib * MiB)
    try:
        argv_child = [sys.executable, os.path.abspath(__file__), "--child", *(argv or sys.argv[1:])]
        proc = group.spawn(argv_child, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadlock = False
        try:
            out, err = proc.communicate(timeout=args.seconds + 90)
        except subprocess.TimeoutExpired:
            deadlock = True
            proc.kill()  # our own child, by pid
            out, err = proc.communicate()
        oom = group.read_keyed("memory.oom_control")["oom_kill"]
        peak = group.read_int("memory.max_usage_in_bytes")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        group.remove()
    lines = out.strip().splitlines()
    figures: dict[str, Any] = json.loads(lines[-1]) if lines and lines[-1][:1] == "{" else {}
    # The child dumps its threads' stacks and exits if it has not finished by then: a deadlock.
    deadlock = deadlock or "Timeout (" in err
    figures.update(
        deadlock=deadlock,
        oom_kills=oom,
        exit_status=proc.returncode,
        peak_mib=round(peak / MiB, 1),
        limit_mib=args.limit_mib,
    )
    if not lines or proc.returncode != 0:
        print(err[-4000:], file=sys.stderr)
    for key in ("ops", "chunks_asked", "evicted_on_request"):
        if key in figures:
            print(f"{key:>22}: {figures[key]}")
    print(json.dumps(figures))
    ok = (
        figures.get("exceptions") == 0
        and figures.get("lost_requests") == 0
        and figures.get("drift_chunks") == 0
        and not deadlock
        and oom == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
