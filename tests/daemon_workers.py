"""Processes for the end-to-end daemon test, run as ``python tests/daemon_workers.py ROLE ...``.

``cache``: a ChunkCache (through ``$PYSHRINKER_CONTROLLER_DIR``) kept filled to a target at a
given rate, entries of one chunk each, every page touched; it gives back what the daemon asks.
It runs for ``--seconds`` and until it has put ``--put-mib`` in all.
``neighbour``: allocates a block of memory at a given rate, holds it, frees it, pauses, again;
it registers nothing.

Each prints one JSON line with its figures when its time is up, then waits for end of input
before exiting (so that its registrations stay visible in the daemon's status until the test
has read them).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time

from pyshrinker import ChunkCache, settle

MiB = 1 << 20


def pace(next_at: float) -> None:
    """Sleep until ``next_at`` (monotonic seconds) if it is in the future."""
    delay = next_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_cache(args: argparse.Namespace) -> dict[str, object]:
    """Keep a ChunkCache filled to ``--target-mib``; the daemon's requests evict from it."""
    cache: ChunkCache[int, bytes] = ChunkCache(args.chunk_size, cost=args.cost, name=args.name)
    target = args.target_mib * MiB // args.chunk_size
    step = args.chunk_size / (args.rate_mib * MiB)
    start = time.monotonic()
    end = start + args.seconds
    next_at = start
    key = 0
    # --put-mib: go on past the time until that much was put (a slow machine still gets there).
    put_at_least = args.put_mib * MiB // args.chunk_size
    while time.monotonic() < end or key < put_at_least:
        if cache.chunks >= target:
            time.sleep(0.002)
            next_at = time.monotonic()
            continue
        # bytes * n is one malloc (mmap-served: the threshold is pinned) and one memset.
        cache.put(key, b"\x01" * args.chunk_size, chunks=1)
        key += 1
        next_at += step
        pace(next_at)
    cache.shrinker.flush()
    settle()
    stats = cache.shrinker.stats()
    transport = cache.shrinker.transport
    return {
        "role": "cache",
        "name": args.name,
        "pid": os.getpid(),
        "efd": cache.shrinker.efd,
        "chunk_size": args.chunk_size,
        "cost": args.cost,
        "chunks": cache.chunks,
        "inserted": key,
        "held": stats.held,
        "requests": stats.requests,
        "chunks_requested": stats.chunks_requested,
        "chunks_freed": stats.chunks_freed,
        "chunks_readded": stats.chunks_readded,
        "transport": type(transport).__name__,
        # A DirectoryTransport switches to a fallback while its daemon is gone: which one served.
        "in_force": type(getattr(transport, "current", transport)).__name__,
    }


def run_neighbour(args: argparse.Namespace) -> dict[str, object]:
    """Allocate ``--mib`` at ``--rate-mib``, hold, free, pause; repeat until time is up."""
    time.sleep(args.delay)
    step = 1 / args.rate_mib
    end = time.monotonic() + args.seconds
    cycles = 0
    peak = 0
    while time.monotonic() < end:
        blocks = []
        next_at = time.monotonic()
        for _ in range(args.mib):
            block = mmap.mmap(-1, MiB)
            block.write(b"\x02" * MiB)
            blocks.append(block)
            next_at += step
            pace(next_at)
        peak = max(peak, len(blocks))
        time.sleep(args.hold)
        for block in blocks:
            block.close()
        cycles += 1
        time.sleep(args.pause)
    return {"role": "neighbour", "pid": os.getpid(), "cycles": cycles, "peak_mib": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    roles = parser.add_subparsers(dest="role", required=True)
    cache = roles.add_parser("cache")
    cache.add_argument("--name", default="cache")
    cache.add_argument("--chunk-size", type=int, default=MiB)
    cache.add_argument("--cost", type=float, default=1.0)
    cache.add_argument("--target-mib", type=int, required=True)
    cache.add_argument("--rate-mib", type=float, default=50.0)
    cache.add_argument("--seconds", type=float, required=True)
    cache.add_argument("--put-mib", type=int, default=0, help="put at least this much in all")
    neighbour = roles.add_parser("neighbour")
    neighbour.add_argument("--mib", type=int, required=True)
    neighbour.add_argument("--rate-mib", type=float, default=200.0)
    neighbour.add_argument("--hold", type=float, default=1.0)
    neighbour.add_argument("--pause", type=float, default=1.0)
    neighbour.add_argument("--delay", type=float, default=0.0)
    neighbour.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    figures = run_cache(args) if args.role == "cache" else run_neighbour(args)
    print(json.dumps(figures), flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
