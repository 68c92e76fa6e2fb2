"""The two-thread allocator's oracle: it knows the limit, so it needs no controller.

The same allocation as ``examples/two_thread_allocator.py`` (1 MiB ``bytearray`` chunks, every
page touched) written as a program that knows its group's limit in advance: it keeps a ring of
``--ring`` chunks (200 for a 256 MiB group) and frees the oldest whenever it takes a new one,
with glibc's mmap threshold pinned at 128 KiB so that each freed chunk goes back to the kernel at
once (munmap). No pyshrinker, no thread, no signal: the fastest an allocator of this shape can go
inside the limit, and what ``benchmarks/allocator.py`` measures pyshrinker against.

The last line of output is one JSON object.

    python benchmarks/oracle_allocator.py --total 4G --ring 200
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import sys
import time

MiB = 1 << 20
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``4G`` -> bytes (no pyshrinker import here: the oracle pays for nothing it does not need)."""
    text = text.strip().upper()
    factor = _SUFFIXES.get(text[-1:], 1)
    return int(float(text[:-1] if factor != 1 else text) * factor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--total", default="4G", help="bytes to allocate (4G)")
    parser.add_argument("--ring", type=int, default=200, help="chunks held at most (200)")
    parser.add_argument("--chunk-size", default="1M", help="bytes per chunk (1M)")
    args = parser.parse_args(argv)
    total, chunk_size = parse_size(args.total), parse_size(args.chunk_size)
    if ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024) != 1:
        print("mallopt(M_MMAP_THRESHOLD) failed", file=sys.stderr)
        return 1
    ring: collections.deque[bytearray] = collections.deque()
    allocated = 0
    start = time.perf_counter()
    while allocated < total:
        # bytearray(n) memsets the block, so every page is really touched.
        ring.append(bytearray(chunk_size))
        allocated += chunk_size
        if len(ring) > args.ring:
            ring.popleft()
    seconds = time.perf_counter() - start
    result = {
        "oracle": True,
        "allocated_bytes": allocated,
        "held_bytes": len(ring) * chunk_size,
        "seconds": round(seconds, 4),
        "alloc_mib_per_s": round(allocated / MiB / seconds, 1) if seconds else 0.0,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
