"""A cache-heavy workload beside a neighbour whose memory grows and shrinks, in a 512 MiB group.

Each variant runs as its own worker process in a fresh cgroup v1 memory group (``--limit``, 512
MiB) together with its own neighbour process, which cycles its memory between ``--low`` (50 MiB)
and ``--high`` (350 MiB) in a triangle wave of ``--period`` seconds (anonymous mmap, every page
touched; given back with munmap, so the kernel sees it at once). The variants:

* ``shrinkable``: a :class:`~pyshrinker.ShrinkableLRU` with no maxsize, whose process's embedded
  controller watches the group;
* ``cachetools-<N>``: a ``cachetools.LRUCache`` sized so its entries total N MiB, for N in
  ``--fixed`` (64, 128, 256, 384).

The worker runs the same loop for every variant for ``--duration`` seconds: a key drawn from
Zipf(s=1.0) over ``--keys`` keys; ``v = cache.get(k)``; on a miss, the backend takes
``--miss-latency`` seconds and returns a fresh ``--value-size`` value (100 KiB), which is stored.
No worker changes an allocator setting (pyshrinker changes none either: what its caches free on
request is returned by a heap trim, see :mod:`pyshrinker.trim`). Every worker raises its own
``oom_score_adj`` to 1000 (lowering the neighbour's would need CAP_SYS_RESOURCE), so when the
group runs out of memory the OOM killer takes the cache worker, whose fate is the measurement,
and not the neighbour.

Reported per variant: operations, hit rate (up to the kill, from the last progress line, if the
worker was OOM-killed), OOM kills in the group, peak usage. Every group is removed afterwards;
only processes this script started are killed, by pid. Needs root and cgroup v1.

Success: the shrinkable worker is never OOM-killed, and its hit rate is higher than that of every
fixed-size cache that survived. The last line of output is one JSON object.

    python benchmarks/fluctuating.py
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import mmap
import os
import random
import subprocess
import sys
import time
from typing import Any

MiB = 1 << 20
HERE = os.path.abspath(__file__)


# ---------------------------------------------------------------------- neighbour


def run_neighbour(low: int, high: int, period: float, step: int) -> int:
    """Grow from ``low`` to ``high`` bytes and back every ``period`` seconds, until killed."""
    regions: list[mmap.mmap] = []
    page = mmap.PAGESIZE
    start = time.monotonic()
    print("ready", flush=True)
    while True:
        phase = ((time.monotonic() - start) % period) / period
        fraction = 2 * phase if phase < 0.5 else 2 * (1 - phase)
        target = low + int((high - low) * fraction)
        held = len(regions) * step
        if held + step <= target:
            region = mmap.mmap(-1, step, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            for offset in range(0, step, page):
                region[offset] = 1
            regions.append(region)
        elif held - step >= target and regions:
            regions.pop().close()
        else:
            time.sleep(0.005)


# ---------------------------------------------------------------------- worker


def zipf_cdf(n_keys: int, s: float) -> list[float]:
    """Cumulative Zipf(s) weights over ``n_keys`` ranks."""
    return list(itertools.accumulate(1.0 / (rank**s) for rank in range(1, n_keys + 1)))


def run_worker(args: argparse.Namespace) -> int:
    """The cache loop for ``args.duration`` seconds, with progress lines twice a second."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    cache: Any
    if args.cache == "shrinkable":
        from pyshrinker import ShrinkableLRU, default_controller

        controller = default_controller()
        cache = ShrinkableLRU(name="fluctuating")
        print(json.dumps({"signals": controller.describe_signals()}), file=sys.stderr, flush=True)
    else:
        import cachetools

        cache = cachetools.LRUCache(args.size_mib * MiB, getsizeof=sys.getsizeof)

    cdf = zipf_cdf(args.keys, args.zipf_s)
    total = cdf[-1]
    rng = random.Random(args.seed)
    value_size = args.value_size
    latency = args.miss_latency
    ops = hits = 0
    start = time.monotonic()
    next_report = start + 0.5
    deadline = start + args.duration

    def progress(final: bool) -> None:
        size = getattr(cache, "currsize", 0)
        print(
            json.dumps(
                {
                    "final": final,
                    "t": round(time.monotonic() - start, 3),
                    "ops": ops,
                    "hits": hits,
                    "cached_mib": round(size / MiB, 1),
                }
            ),
            flush=True,
        )

    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        if now >= next_report:
            progress(False)
            next_report = now + 0.5
        for _ in range(100):
            key = bisect.bisect_left(cdf, rng.random() * total)
            value = cache.get(key)
            ops += 1
            if value is None:
                time.sleep(latency)
                cache[key] = bytes([key % 251]) * value_size
            else:
                hits += 1
    progress(True)
    return 0


# ---------------------------------------------------------------------- orchestration


def last_progress(output: str) -> dict[str, Any]:
    """The last progress line a worker printed (its final one, unless it was killed)."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    return {"ops": 0, "hits": 0, "final": False}


def run_variant(args: argparse.Namespace, name: str, worker_args: list[str]) -> dict[str, Any]:
    """One variant in a fresh group with its own neighbour; the group is removed afterwards."""
    from pyshrinker.cgroup import ManagedCgroupV1

    prefix = os.environ.get("PYSHRINKER_CGROUP_PREFIX", "pyshrinker-bench-")
    group = ManagedCgroupV1.create(f"{prefix}{os.getpid()}-{name}", args.limit * MiB)
    neighbour = worker = None
    try:
        neighbour = group.spawn(
            [
                sys.executable,
                HERE,
                "--role",
                "neighbour",
                "--low",
                str(args.low),
                "--high",
                str(args.high),
                "--period",
                str(args.period),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert neighbour.stdout is not None
        if neighbour.stdout.readline().strip() != "ready":
            raise RuntimeError("the neighbour did not start")
        common = [
            "--duration",
            str(args.duration),
            "--keys",
            str(args.keys),
            "--zipf-s",
            str(args.zipf_s),
            "--value-size",
            str(args.value_size),
            "--miss-latency",
            str(args.miss_latency),
            "--seed",
            str(args.seed),
        ]
        worker = group.spawn(
            [sys.executable, HERE, "--role", "worker", *worker_args, *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = worker.communicate(timeout=args.duration * 3 + 60)
        oom_kills = group.read_keyed("memory.oom_control").get("oom_kill", 0)
        peak = group.read_int("memory.max_usage_in_bytes")
        figures = last_progress(out)
        killed = worker.returncode == -9
        hit_rate = figures["hits"] / figures["ops"] if figures["ops"] else 0.0
        result = {
            "variant": name,
            "oom_killed": killed and oom_kills > 0,
            "returncode": worker.returncode,
            "group_oom_kills": oom_kills,
            "ops": figures["ops"],
            "hit_rate": round(hit_rate, 4),
            "seconds": figures.get("t"),
            "peak_mib": round(peak / MiB, 1),
            "neighbour_alive": neighbour.poll() is None,
        }
        if worker.returncode not in (0, -9):
            result["stderr"] = err[-2000:]
        return result
    finally:
        for proc in (worker, neighbour):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait(timeout=30)
                if proc.stdout is not None:
                    proc.stdout.close()
        group.remove()


def orchestrate(args: argparse.Namespace) -> int:
    from pyshrinker.cgroup import v1_memory_available

    if not v1_memory_available():
        print("needs root and a cgroup v1 memory hierarchy", file=sys.stderr)
        return 1
    variants: list[tuple[str, list[str]]] = [("shrinkable", ["--cache", "shrinkable"])]
    for size in args.fixed:
        variants.append((f"cachetools-{size}", ["--cache", "cachetools", "--size-mib", str(size)]))
    print(
        f"{args.limit} MiB group, neighbour {args.low}..{args.high} MiB every {args.period} s, "
        f"{args.duration} s per variant, Zipf({args.zipf_s}) over {args.keys:,} keys of "
        f"{args.value_size // 1024} KiB, miss latency {args.miss_latency * 1000:g} ms",
        flush=True,
    )
    results = []
    for name, worker_args in variants:
        result = run_variant(args, name, worker_args)
        results.append(result)
        print(
            f"{name:<16} hit rate {result['hit_rate']:.4f}  ops {result['ops']:>9,}  "
            f"OOM-killed {'yes' if result['oom_killed'] else 'no ':<3}  "
            f"group OOM kills {result['group_oom_kills']}  peak {result['peak_mib']} MiB",
            flush=True,
        )

    shrinkable = results[0]
    surviving_fixed = [r for r in results[1:] if not r["oom_killed"] and r["returncode"] == 0]
    best_fixed = max((r["hit_rate"] for r in surviving_fixed), default=None)
    beats = best_fixed is None or shrinkable["hit_rate"] > best_fixed
    never_killed = not shrinkable["oom_killed"] and shrinkable["group_oom_kills"] == 0
    print(
        f"shrinkable never OOM-killed: {never_killed}; hit rate {shrinkable['hit_rate']:.4f} "
        f"vs best surviving fixed-size cache {best_fixed}: "
        f"{'higher' if beats else 'NOT higher'}"
    )
    summary = {
        "limit_mib": args.limit,
        "neighbour_mib": [args.low, args.high],
        "period_s": args.period,
        "duration_s": args.duration,
        "variants": results,
        "shrinkable_hit_rate": shrinkable["hit_rate"],
        "shrinkable_oom_killed": not never_killed,
        "best_surviving_fixed_hit_rate": best_fixed,
        "surviving_fixed": [r["variant"] for r in surviving_fixed],
        "target_met": never_killed and beats,
    }
    print(json.dumps(summary), flush=True)
    return 0 if summary["target_met"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--role",
        choices=["orchestrate", "worker", "neighbour"],
        default="orchestrate",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--limit", type=int, default=512, help="group limit, MiB")
    parser.add_argument("--low", type=int, default=50, help="neighbour's low, MiB")
    parser.add_argument("--high", type=int, default=350, help="neighbour's high, MiB")
    parser.add_argument("--period", type=float, default=4.0, help="neighbour's cycle, seconds")
    parser.add_argument(
        "--fixed",
        type=int,
        nargs="+",
        default=[64, 128, 256, 384],
        help="sizes of the cachetools caches, MiB",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per variant")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--value-size", type=int, default=100 * 1024)
    parser.add_argument("--miss-latency", type=float, default=0.0002, help="seconds per miss")
    parser.add_argument("--seed", type=int, default=20130103)
    parser.add_argument("--cache", choices=["shrinkable", "cachetools"], help=argparse.SUPPRESS)
    parser.add_argument("--size-mib", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--step", type=int, default=10, help="neighbour's step, MiB")
    args = parser.parse_args(argv)
    if args.role == "neighbour":
        return run_neighbour(args.low * MiB, args.high * MiB, args.period, args.step * MiB)
    if args.role == "worker":
        return run_worker(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
