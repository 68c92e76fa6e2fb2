"""The mempressure proposal's example program, done right.

Thread 1 registers a shrinker and allocates chunks (1 MiB by default, every page touched)
forever, or until --total bytes or --duration seconds, reporting them as it goes (the Shrinker
batches the reports). Thread 2 - pyshrinker's listener thread - waits on the eventfd and frees
the oldest chunks, as many as the controller asks.

Run it in a memory-limited cgroup and it allocates many times the limit without being
OOM-killed; with --no-shrinker the same allocator is killed once it reaches the limit.
The last line of output is one JSON object with the run's figures.

    python -m pyshrinker.allocator --total 8G
    python -m pyshrinker.allocator --no-shrinker --total 8G

``--trace FILE`` appends one line per event to FILE, unbuffered (so the lines written before
an OOM kill survive it), with ``time.monotonic()`` timestamps, comparable across processes:

* ``start <t> <pid>`` once the shrinker (if any) is registered;
* ``request <t> <chunks> <reason>`` for each shrink request the controller sends;
* ``progress <t> <allocated bytes> <held bytes>`` every 10 ms while allocating;
* ``end <t>`` when the allocation loop is over.

``pyshrinker demo`` runs this module in a cgroup with a trace to draw its plot.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from typing import Any

from pyshrinker.cgroup import CgroupV1, memory_source_of
from pyshrinker.client import Shrinker
from pyshrinker.controller import ShrinkRequest, default_controller, parse_size
from pyshrinker.errors import PyshrinkerError

#: Seconds between ``progress`` lines in a trace.
TRACE_PROGRESS_INTERVAL = 0.01


class Trace:
    """Event lines appended to a file with one unbuffered ``write`` each."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def event(self, kind: str, *fields: object) -> None:
        """Append ``kind <monotonic time> fields...`` as one line."""
        words = " ".join(str(f) for f in fields)
        line = f"{kind} {time.monotonic():.6f} {words}".rstrip() + "\n"
        os.write(self.fd, line.encode("ascii", "replace"))

    def request(self, request: ShrinkRequest) -> None:
        """Append a ``request`` line for a request the controller sent (a request hook)."""
        line = f"request {request.monotonic:.6f} {request.chunks} {request.reason}\n"
        os.write(self.fd, line.encode("ascii", "replace"))

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _v1_cgroup_figures() -> dict[str, int]:
    """memory.max_usage_in_bytes and oom_kill of our v1 group, when there is one."""
    try:
        source = memory_source_of()
    except PyshrinkerError:
        return {}
    with source:
        if not isinstance(source, CgroupV1):
            return {}
        return {
            "cgroup_max_usage_bytes": source.max_usage(),
            "cgroup_oom_kill": source.oom_control().get("oom_kill", 0),
        }


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM), 0 if unknown.

    Not ``getrusage().ru_maxrss``: Linux keeps that across execve, so a child forked from a large
    parent (a test runner) reports the parent's size. VmHWM belongs to the address space, which
    exec replaces.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The allocator's command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--chunk-size", default="1M", help="bytes per chunk (default 1M)")
    parser.add_argument("--total", help="stop after allocating this much (e.g. 8G)")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--no-shrinker", action="store_true", help="run with pyshrinker off")
    parser.add_argument("--progress", type=float, default=0, help="print progress every N s")
    parser.add_argument(
        "--trace", metavar="FILE", help="append start, request and progress events to FILE"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the two-thread allocator; prints one JSON line of figures at the end."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        chunk_size = parse_size(args.chunk_size)
        total = parse_size(args.total) if args.total else None
    except ValueError as err:
        parser.error(str(err))
    if chunk_size <= 0:
        parser.error("--chunk-size must be positive")

    chunks: collections.deque[bytearray] = collections.deque()
    freed = [0]

    def reclaim(n: int) -> int:
        # Thread 2: free the oldest chunks, as many as asked (fewer if we hold fewer).
        done = 0
        while done < n:
            try:
                chunks.popleft()
            except IndexError:
                break
            done += 1
        freed[0] += done
        return done

    trace = Trace(args.trace) if args.trace else None
    shrinker = None
    controller = None if args.no_shrinker else default_controller()
    if controller is not None:
        if trace is not None:
            controller.add_request_hook(trace.request)
        shrinker = Shrinker.register(chunk_size, reclaim, name="two-thread-allocator")
    if trace is not None:
        trace.event("start", os.getpid())

    allocated = 0
    start = time.perf_counter()
    next_progress = start + args.progress if args.progress else None
    next_trace = start if trace is not None else None
    while True:
        now = time.perf_counter()
        if total is not None and allocated >= total:
            break
        if args.duration is not None and now - start >= args.duration:
            break
        # bytearray(n) memsets the block, so every page is really touched.
        chunks.append(bytearray(chunk_size))
        allocated += chunk_size
        if shrinker is not None:
            shrinker.report(1, serve_here=True)
            # Thread 1 frees here when the controller asked at once (direct reclaim).
            shrinker.reclaim_pending()
        if next_progress is not None and now >= next_progress:
            held = len(chunks) * chunk_size
            print(
                f"allocated {allocated >> 20} MiB, holding {held >> 20} MiB",
                file=sys.stderr,
                flush=True,
            )
            next_progress = now + args.progress
        if next_trace is not None and trace is not None and now >= next_trace:
            trace.event("progress", allocated, len(chunks) * chunk_size)
            next_trace = now + TRACE_PROGRESS_INTERVAL
    seconds = time.perf_counter() - start
    if trace is not None:
        trace.event("progress", allocated, len(chunks) * chunk_size)
        trace.event("end")

    stats = shrinker.stats() if shrinker is not None else None
    if controller is not None:
        # After the run: describe_signals() waits until the controller thread has armed its
        # v1 usage thresholds, which the allocation need not wait for.
        signals = controller.describe_signals()
        print("controller signals:", "; ".join(signals), file=sys.stderr)
    if shrinker is not None:
        shrinker.close()
    result: dict[str, Any] = {
        "shrinker": shrinker is not None,
        "chunk_size": chunk_size,
        "allocated_bytes": allocated,
        "freed_bytes": freed[0] * chunk_size,
        "held_bytes": len(chunks) * chunk_size,
        "requests": stats.requests if stats else 0,
        "readded_chunks": stats.chunks_readded if stats else 0,
        "seconds": round(seconds, 4),
        "alloc_mib_per_s": round(allocated / (1 << 20) / seconds, 1) if seconds else 0.0,
        "peak_rss_bytes": peak_rss(),
        "pid": os.getpid(),
        "threads": threading.active_count(),
    }
    result.update(_v1_cgroup_figures())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
