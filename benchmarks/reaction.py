"""Reaction time: from a shrink request on a shrinker's eventfd to its reclaim callback returning.

Uses the real client and controller: a :class:`~pyshrinker.Controller` with no memory source
(only explicit requests) and a :class:`~pyshrinker.Shrinker` registered through an
:class:`~pyshrinker.EmbeddedTransport`. Each sample:

1. ``t0 = perf_counter_ns()``;
2. ``controller.request(shrinker.efd, 1)`` (subtracts the chunk and writes the eventfd);
3. the listener thread wakes, reads the eventfd and calls ``reclaim(1)``, which records
   ``perf_counter_ns()`` as its last act and sets a :class:`threading.Event`;
4. the measuring thread, blocked in ``Event.wait()`` (which releases the GIL, so the waiting
   costs the listener nothing), wakes and re-reports the chunk.

Two situations: (a) other threads idle; (b) a CPU-bound pure-Python thread running the whole
time, so the listener must get the GIL from it. Case (b) is also run in a subprocess with
``pyshrinker.client.REACTION_SWITCH_INTERVAL = None``, i.e. with the interpreter's default 5 ms
switch interval, to show what the listener's lowering of it (to 1 ms) buys.

Placement. When the measuring thread blocks in ``Event.wait()`` it drops the GIL, and both the
listener (just woken by the eventfd) and the busy thread want it. Who wins depends on where the
scheduler put the three threads, and that tends to hold for a whole run: measured here, the
median of (b) was 6-20 us in some placements and 1.1 ms (one switch interval) when the measuring
and busy threads shared a CPU and the listener had the other. So the headline figures pin the
measuring thread and the busy thread to one CPU and the listener to another
(``sched_setaffinity``): case (b) is then the worst case on every sample, which is what a target
on its p99 is about, and case (a) pays a cross-CPU wake-up every time. Unpinned figures are
printed as well. The busy thread's speed against its speed alone shows it really competed.

The machine is shared and noisy: the figures are printed, never asserted. The last line of
output is one JSON object.

    python benchmarks/reaction.py
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from array import array
from typing import Any

import attrs

import pyshrinker.client
from pyshrinker import Controller, EmbeddedTransport, Shrinker

CHUNK_SIZE = 4096
TARGET_IDLE_MEDIAN_US = 100.0
TARGET_BUSY_P99_US = 5000.0


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def summarize(samples_ns: array[int]) -> dict[str, float]:
    """Median, p90, p99, max and mean of nanosecond samples, in microseconds."""
    values = sorted(v / 1000 for v in samples_ns)
    return {
        "samples": len(values),
        "min_us": round(values[0], 1),
        "median_us": round(statistics.median(values), 1),
        "p90_us": round(percentile(values, 0.90), 1),
        "p99_us": round(percentile(values, 0.99), 1),
        "max_us": round(values[-1], 1),
        "mean_us": round(statistics.fmean(values), 1),
    }


class Busy:
    """A thread spinning on pure-Python arithmetic (it holds the GIL whenever it can)."""

    def __init__(self, cpu: int | None) -> None:
        self._cpu = cpu
        self._stop = False
        self.iterations = 0
        self._thread = threading.Thread(target=self._run, name="busy", daemon=True)

    def _run(self) -> None:
        if self._cpu is not None:
            os.sched_setaffinity(0, {self._cpu})
        x = 1
        n = 0
        while not self._stop:
            for _ in range(1000):
                x = (x * 1103515245 + 12345) % 2147483648
            n += 1
        self.iterations = n * 1000

    def __enter__(self) -> Busy:
        self._thread.start()
        time.sleep(0.05)  # let it reach its loop
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()


def _listener_native_id() -> int:
    for thread in threading.enumerate():
        if thread.name == "pyshrinker-listener" and thread.native_id is not None:
            return thread.native_id
    raise RuntimeError("pyshrinker's listener thread is not running")


def placement_cpus() -> tuple[int, int] | None:
    """Two CPUs to separate the measuring thread from the listener, if there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


class Pinned:
    """Pin the calling thread (and the busy thread) to one CPU and the listener to another.

    On Linux ``sched_setaffinity(0)`` applies to the calling thread only. Restores both on exit.
    """

    def __init__(self, cpus: tuple[int, int] | None) -> None:
        self._cpus = cpus
        self._saved: list[tuple[int, set[int]]] = []

    def __enter__(self) -> Pinned:
        if self._cpus is None:
            return self
        here, there = self._cpus
        listener = _listener_native_id()
        self._saved = [(0, os.sched_getaffinity(0)), (listener, os.sched_getaffinity(listener))]
        os.sched_setaffinity(0, {here})
        os.sched_setaffinity(listener, {there})
        return self

    def __exit__(self, *exc: object) -> None:
        for tid, cpus in self._saved:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass
        self._saved = []


@attrs.frozen
class Case:
    """One measured situation."""

    samples: array[int]
    #: Pure-Python loop iterations per second the busy thread managed meanwhile (0 if none).
    busy_rate: float
    switch_interval_s: float


def measure(samples: int, *, busy: bool, pinned: bool, max_seconds: float) -> Case:
    """Collect up to ``samples`` reaction times (ns), stopping early after ``max_seconds``.

    ``pinned``: the measuring thread and the busy thread share one CPU and the listener has
    another, so that when the measuring thread blocks the busy thread is the one that takes the
    GIL and the listener has to win it back: the worst case, on every sample. Unpinned, the
    scheduler decides, and from one run to the next it may favour either outcome.
    """
    controller = Controller.create(None).start()
    done = threading.Event()
    finished = [0]

    def reclaim(n: int) -> int:
        finished[0] = time.perf_counter_ns()
        done.set()
        return n

    shrinker = Shrinker.register(
        CHUNK_SIZE,
        reclaim,
        name="reaction-bench",
        transport=EmbeddedTransport(controller),
        batch_bytes=0,  # every report goes to the controller at once
    )
    results: array[int] = array("q")
    cpus = placement_cpus() if pinned else None
    busy_thread: Busy | None = None
    try:
        shrinker.report(1)
        # Warm up (first calls, code paths) before measuring.
        for _ in range(50):
            done.clear()
            controller.request(shrinker.efd, 1)
            done.wait()
            shrinker.report(1)
        gc.collect()
        with Pinned(cpus):
            busy_thread = Busy(cpus[0] if cpus else None) if busy else None
            with busy_thread if busy_thread is not None else contextlib.nullcontext():
                started = time.perf_counter()
                deadline = time.monotonic() + max_seconds
                for i in range(samples):
                    done.clear()
                    t0 = time.perf_counter_ns()
                    asked = controller.request(shrinker.efd, 1)
                    if asked != 1:
                        raise RuntimeError(f"controller asked {asked} chunks, expected 1")
                    if not done.wait(10.0):
                        raise RuntimeError("reclaim callback never ran")
                    results.append(finished[0] - t0)
                    shrinker.report(1)
                    if i % 128 == 127 and time.monotonic() > deadline:
                        break
                elapsed = time.perf_counter() - started
        stats = shrinker.stats()
        if stats.chunks_readded or stats.callback_errors:
            raise RuntimeError(f"unexpected shrinker stats: {stats}")
    finally:
        shrinker.close()
        controller.close()
    rate = busy_thread.iterations / elapsed if busy_thread is not None else 0.0
    return Case(results, rate, sys.getswitchinterval())


def _figures(case: Case, busy_alone_rate: float) -> dict[str, float]:
    figures = summarize(case.samples)
    if case.busy_rate:
        # Share of the GIL the busy thread got, against it running alone: proof it competed.
        figures["busy_thread_share"] = round(case.busy_rate / busy_alone_rate, 2)
    return figures


def _print_row(label: str, figures: dict[str, float]) -> None:
    share = figures.get("busy_thread_share")
    print(
        f"  {label:<40} n={figures['samples']:>5}  median {figures['median_us']:>7.1f}  "
        f"p90 {figures['p90_us']:>7.1f}  p99 {figures['p99_us']:>7.1f}  "
        f"max {figures['max_us']:>8.1f} us"
        + (f"  (busy thread ran {share:.0%} of its solo speed)" if share is not None else ""),
        flush=True,
    )


def busy_alone_rate(seconds: float = 0.3) -> float:
    """Iterations per second of the busy loop with nothing else wanting the GIL."""
    started = time.perf_counter()
    with Busy(None) as busy:
        time.sleep(seconds)
    return busy.iterations / (time.perf_counter() - started)


def run_default_interval_child(samples: int, max_seconds: float) -> dict[str, Any]:
    """Run the busy case in a subprocess with the interpreter's default switch interval."""
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--child-default-interval",
        "--busy-samples",
        str(samples),
        "--max-seconds",
        str(max_seconds),
    ]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def child_default_interval(samples: int, max_seconds: float) -> int:
    """The subprocess: pinned busy case with the listener leaving the switch interval alone."""
    pyshrinker.client.REACTION_SWITCH_INTERVAL = None
    alone = busy_alone_rate()
    case = measure(samples, busy=True, pinned=True, max_seconds=max_seconds)
    print(json.dumps({"busy": _figures(case, alone), "switch_interval_s": case.switch_interval_s}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-samples", type=int, default=5000)
    parser.add_argument("--busy-samples", type=int, default=4000)
    parser.add_argument(
        "--compare-samples",
        type=int,
        default=1500,
        help="samples of the default-switch-interval and unpinned busy comparisons",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=12.0, help="stop a case early after this long"
    )
    parser.add_argument("--child-default-interval", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_default_interval:
        return child_default_interval(args.busy_samples, args.max_seconds)

    default_interval = sys.getswitchinterval()
    cpus = placement_cpus()
    print(
        "Reaction time: request written to the eventfd -> reclaim callback returned "
        f"({os.cpu_count()} CPUs, Python {sys.version.split()[0]})",
        flush=True,
    )
    alone = busy_alone_rate()
    idle = measure(args.idle_samples, busy=False, pinned=True, max_seconds=args.max_seconds)
    busy = measure(args.busy_samples, busy=True, pinned=True, max_seconds=args.max_seconds)
    idle_free = measure(args.idle_samples, busy=False, pinned=False, max_seconds=args.max_seconds)
    busy_free = measure(args.compare_samples, busy=True, pinned=False, max_seconds=args.max_seconds)
    # The listener lowered the interval when it started (it stays up between cases).
    lowered = busy.switch_interval_s
    idle_f, busy_f = _figures(idle, alone), _figures(busy, alone)
    idle_free_f, busy_free_f = _figures(idle_free, alone), _figures(busy_free, alone)
    where = (
        f"measuring + busy thread on CPU {cpus[0]}, listener on CPU {cpus[1]}"
        if cpus
        else "one CPU: nothing pinned"
    )
    print(f"Switch interval {lowered * 1000:g} ms (set by the listener); {where}:", flush=True)
    _print_row("(a) other threads idle", idle_f)
    _print_row("(b) a CPU-bound Python thread busy", busy_f)

    child = run_default_interval_child(args.compare_samples, args.max_seconds)
    child_f: dict[str, float] = child["busy"]
    child_interval = float(child["switch_interval_s"])
    print(
        "For comparison, REACTION_SWITCH_INTERVAL = None (the interpreter's "
        f"{child_interval * 1000:g} ms), same placement, in a subprocess:",
        flush=True,
    )
    _print_row("(b) a CPU-bound Python thread busy", child_f)
    print(
        "Unpinned (the scheduler decides who gets the GIL when the measuring thread blocks;"
        " it may differ from run to run), 1 ms:",
        flush=True,
    )
    _print_row("(a) other threads idle, unpinned", idle_free_f)
    _print_row("(b) busy thread, unpinned", busy_free_f)

    idle_ok = idle_f["median_us"] < TARGET_IDLE_MEDIAN_US
    busy_ok = busy_f["p99_us"] < TARGET_BUSY_P99_US
    print(
        f"Targets: idle median < {TARGET_IDLE_MEDIAN_US:g} us: "
        f"{'met' if idle_ok else 'MISSED'}; busy p99 < {TARGET_BUSY_P99_US:g} us: "
        f"{'met' if busy_ok else 'MISSED'}",
        flush=True,
    )
    result = {
        "idle_median_us": idle_f["median_us"],
        "idle_p99_us": idle_f["p99_us"],
        "busy_median_us": busy_f["median_us"],
        "busy_p99_us": busy_f["p99_us"],
        "idle_samples": idle_f["samples"],
        "busy_samples": busy_f["samples"],
        "idle_max_us": idle_f["max_us"],
        "busy_max_us": busy_f["max_us"],
        "busy_thread_share": busy_f.get("busy_thread_share"),
        "pinned_cpus": list(cpus) if cpus else None,
        "switch_interval_s": lowered,
        "default_switch_interval_s": default_interval,
        "default_interval_busy_median_us": child_f["median_us"],
        "default_interval_busy_p99_us": child_f["p99_us"],
        "default_interval_busy_samples": child_f["samples"],
        "unpinned_idle_median_us": idle_free_f["median_us"],
        "unpinned_busy_median_us": busy_free_f["median_us"],
        "unpinned_busy_p99_us": busy_free_f["p99_us"],
        "targets_met": idle_ok and busy_ok,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
