"""The caching HTTP service under a memory limit: ShrinkableLRU against the best fixed size.

The service is ``examples/lru_service.py``'s (its request handler and slow backend: ``GET
/item/<key>`` answers ``--value-size`` bytes, 100 KiB, from the cache or, after
``--backend-latency`` seconds, from the backend, and caches them), run as its own process in a
fresh cgroup v1 memory group of ``--limits`` MiB (256, then 1024) with one of two caches:

* ``shrinkable``: a :class:`~pyshrinker.ShrinkableLRU` with no maxsize (sizes: the values'
  lengths, given explicitly), whose process's embedded controller watches the group;
* ``cachetools-<N>``: a ``cachetools.LRUCache(maxsize=N)`` (one per entry), behind a lock.

The load generator is this script, outside the group: ``--clients`` threads on keep-alive
connections send ``--requests`` requests in all, keys drawn from Zipf(``--zipf-s``) over
``--keys`` keys (20,000 keys of 100 KiB: the load wants about 2 GB), each thread seeded, so every
variant is sent the same sequences; a hit is an answer with ``X-Cache: hit``. The hit rate is
over all requests sent (the same count for every variant, so warming up costs all alike); a
server that is OOM-killed ends its run, and the size counts as not surviving.

The best fixed size is found in the same run, by bisection: the largest N whose server survives
(exit after SIGTERM, no OOM kill in the group), between half of ``limit / value-size`` (which must
survive) and ``limit / value-size`` (values alone the size of the limit: taken as not surviving),
to ``--precision`` entries. Usage (``memory.usage_in_bytes``) is sampled every 20 ms; the mean
reported is over the steady state, from the first eviction the service reports (``/stats``,
polled every 0.25 s) to the end, and over the whole run.

Target (issue 13): ShrinkableLRU's hit rate at least the best surviving fixed size's, its mean
steady usage at least 92 % of the limit, no OOM kill. Figures are printed, never asserted. One
JSON line per limit; the last line is one JSON object: the first limit's figures, and ``runs``
with every limit's. Needs root and cgroup v1; every group is removed, and only processes this
script started are signalled, by pid.

    python benchmarks/service.py                     (256 MiB and 1 GiB)
    python benchmarks/service.py --limits 256
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import itertools
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

MiB = 1 << 20
HERE = os.path.abspath(__file__)
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples")
TARGET_USAGE_PCT = 92.0
SAMPLE_S = 0.02
STATS_S = 0.25


# ---------------------------------------------------------------------- the server


class BenchService:
    """``lru_service.CachingService`` with the cache given: ShrinkableLRU or cachetools."""

    def __init__(self, backend: Any, kind: str, entries: int) -> None:
        self.backend = backend
        self.kind = kind
        self.lock = threading.Lock()
        if kind == "shrinkable":
            from pyshrinker import ShrinkableLRU

            # Sizes are the values' bytes, given explicitly (not the class's default sizer).
            self.cache: Any = ShrinkableLRU(name="service-bench", getsizeof=len)
        else:
            import cachetools

            self.cache = cachetools.LRUCache(maxsize=entries)
        self.entries = entries

    def get(self, key: str) -> tuple[bytes, bool]:
        if self.kind == "shrinkable":
            value = self.cache.get(key)
        else:
            with self.lock:  # cachetools' caches are not thread-safe
                value = self.cache.get(key)
        if value is not None:
            return value, True
        value = self.backend.fetch(key)
        if self.kind == "shrinkable":
            self.cache[key] = value
        else:
            with self.lock:
                self.cache[key] = value
        return value, False

    def stats(self) -> dict[str, Any]:
        if self.kind == "shrinkable":
            stats = self.cache.stats()
            shrinker = self.cache.shrinker.stats()
            return {
                "entries": stats.entries,
                "evicting": stats.evicted_on_request > 0,
                "shrink_requests": shrinker.requests,
            }
        with self.lock:
            entries = len(self.cache)
        return {"entries": entries, "evicting": entries >= self.entries}


def trace(controller: Any, cache: Any) -> None:
    """Every 10 ms, to stderr: the watermarks, the growth measured, the last reading (probes)."""
    while True:
        time.sleep(0.01)
        marks = controller.watermarks
        state = controller._last_state
        rate, rise, _ = controller.growth()
        print(
            f"{time.monotonic():.3f} high {marks.high / MiB if marks else -1:.0f} "
            f"low {marks.low / MiB if marks else -1:.0f} ws "
            f"{state.working_set / MiB if state else -1:.1f} usage "
            f"{state.usage / MiB if state else -1:.1f} rate {rate / 1e6:.0f} MB/s rise "
            f"{rise / MiB:.1f} grace {controller.current_grace() * 1000:.1f} ms "
            f"asked {sum(r.chunks for r in controller.history()) * 4096 / MiB:.0f} MiB "
            f"in flight {sum(r.outstanding for r in controller._in_flight) / MiB:.1f} MiB "
            f"freed {cache.stats().evicted_on_request} entries "
            f"late {controller._late.at(time.monotonic()) * 1000:.0f} ms",
            file=sys.stderr,
            flush=True,
        )


def run_server(args: argparse.Namespace) -> int:
    """The service in this process, until SIGTERM."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # the OOM killer takes the server, whose fate is the measurement
    sys.path.insert(0, EXAMPLES)
    from http.server import ThreadingHTTPServer

    import lru_service

    service = BenchService(
        lru_service.SlowBackend(args.backend_latency, args.value_size), args.cache, args.entries
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), lru_service.make_handler(service))
    server.daemon_threads = True

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    if args.cache == "shrinkable":
        from pyshrinker import default_controller

        controller = default_controller()
        print(json.dumps({"signals": controller.describe_signals()}), file=sys.stderr, flush=True)
        if args.trace:
            threading.Thread(target=trace, args=(controller, service.cache), daemon=True).start()
    try:
        server.serve_forever()
    finally:
        server.server_close()
    if args.cache == "shrinkable" and hasattr(default_controller(), "growth"):
        marks = default_controller().watermarks
        rate, rise, boost = default_controller().growth()
        print(
            json.dumps(
                {
                    "watermarks": None if marks is None else [marks.limit, marks.high, marks.low],
                    "growth_rate": round(rate),
                    "rise": round(rise),
                    "boost": round(boost) if boost < 2**63 else "inf",
                    "grace_s": round(default_controller().current_grace(), 4),
                    "requests": len(default_controller().history()),
                }
            ),
            flush=True,
        )
    return 0


# ---------------------------------------------------------------------- the load


def zipf_cdf(n_keys: int, s: float) -> list[float]:
    """Cumulative Zipf(s) weights over ``n_keys`` ranks."""
    return list(itertools.accumulate(1.0 / (rank**s) for rank in range(1, n_keys + 1)))


class Load:
    """``clients`` threads sending ``requests`` requests in all; hits and requests so far."""

    def __init__(self, args: argparse.Namespace, port: int) -> None:
        self.args = args
        self.port = port
        self.cdf = zipf_cdf(args.keys, args.zipf_s)
        self.lock = threading.Lock()
        self.sent = 0
        self.hits = 0
        self.failed: str | None = None

    def client(self, index: int, count: int) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        total = self.cdf[-1]
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            for _ in range(count):
                key = bisect.bisect_left(self.cdf, rng.random() * total)
                try:
                    conn.request("GET", f"/item/k{key}")
                    response = conn.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException) as err:
                    with self.lock:
                        self.failed = self.failed or f"{type(err).__name__}: {err}"
                    return
                hit = response.getheader("X-Cache") == "hit"
                if len(body) != self.args.value_size:
                    with self.lock:
                        self.failed = self.failed or f"answer of {len(body)} bytes"
                    return
                with self.lock:
                    self.sent += 1
                    self.hits += hit
        finally:
            conn.close()

    def run(self) -> None:
        per = self.args.requests // self.args.clients
        threads = [
            threading.Thread(target=self.client, args=(i, per), daemon=True)
            for i in range(self.args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def poll_stats(port: int) -> dict[str, Any] | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/stats")
            parsed: dict[str, Any] = json.loads(conn.getresponse().read())
            return parsed
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError):
        return None


# ---------------------------------------------------------------------- one run


def run_variant(args: argparse.Namespace, limit_mib: int, kind: str, entries: int) -> dict:
    """One server in a fresh group under load; the group is removed afterwards."""
    from pyshrinker.cgroup import ManagedCgroupV1

    name = "shrinkable" if kind == "shrinkable" else f"cachetools-{entries}"
    prefix = os.environ.get("PYSHRINKER_CGROUP_PREFIX", "pyshrinker-bench-")
    group = ManagedCgroupV1.create(f"{prefix}{os.getpid()}-svc-{limit_mib}-{name}", limit_mib * MiB)
    server = None
    try:
        argv = [sys.executable, HERE, "--role", "server", "--cache", kind]
        argv += ["--entries", str(entries), "--value-size", str(args.value_size)]
        argv += ["--backend-latency", str(args.backend_latency)]
        argv += ["--trace"] if args.trace else []
        server = group.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 30)
        line = server.stdout.readline() if ready else ""
        if not line.startswith("listening on http://127.0.0.1:"):
            raise RuntimeError(f"the server did not start: {line!r}")
        port = int(line.rsplit(":", 1)[1])
        # Drained meanwhile: a full pipe would stop the server's logging, and it.
        errors: list[str] = []
        assert server.stderr is not None
        drain = threading.Thread(target=lambda: errors.extend(server.stderr), daemon=True)
        drain.start()
        load = Load(args, port)
        samples: list[tuple[float, int]] = []
        steady: dict[str, Any] = {}
        done = threading.Event()

        def sample() -> None:
            next_stats = 0.0
            while not done.wait(SAMPLE_S):
                now = time.monotonic()
                try:
                    samples.append((now, group.read_int("memory.usage_in_bytes")))
                except OSError:
                    return
                if not steady and now >= next_stats:
                    next_stats = now + STATS_S
                    stats = poll_stats(port)
                    if stats is not None and stats.get("evicting"):
                        with load.lock:
                            steady.update(at=now, sent=load.sent, hits=load.hits)

        sampler = threading.Thread(target=sample, daemon=True)
        started = time.monotonic()
        sampler.start()
        load.run()
        seconds = time.monotonic() - started
        done.set()
        sampler.join()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)  # our own child, by pid
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        out = server.stdout.read()
        drain.join(timeout=30)
        err = "".join(errors)
        oom_kills = group.read_keyed("memory.oom_control").get("oom_kill", 0)
        peak = group.read_int("memory.max_usage_in_bytes")
        limit = limit_mib * MiB
        whole = [usage for _, usage in samples]
        in_steady = [usage for at, usage in samples if steady and at >= steady["at"]]
        survived = server.returncode == 0 and oom_kills == 0 and load.failed is None
        result: dict[str, Any] = {
            "variant": name,
            "entries": entries if kind != "shrinkable" else None,
            "survived": survived,
            "returncode": server.returncode,
            "oom_kills": oom_kills,
            "requests": load.sent,
            "hit_rate": round(load.hits / load.sent, 4) if load.sent else 0.0,
            "steady_hit_rate": (
                round((load.hits - steady["hits"]) / (load.sent - steady["sent"]), 4)
                if steady and load.sent > steady["sent"]
                else None
            ),
            "steady_from_s": round(steady["at"] - started, 2) if steady else None,
            "mean_usage_pct": (
                round(100 * statistics.fmean(in_steady) / limit, 1) if in_steady else None
            ),
            "whole_run_mean_usage_pct": (
                round(100 * statistics.fmean(whole) / limit, 1) if whole else None
            ),
            "peak_mib": round(peak / MiB, 1),
            "seconds": round(seconds, 1),
            "requests_per_s": round(load.sent / seconds) if seconds else 0,
        }
        if load.failed:
            result["load_failed"] = load.failed
        tail = [line for line in out.splitlines() if line.startswith("{")]
        if tail:
            result["controller"] = json.loads(tail[-1])
        if server.returncode not in (0, -signal.SIGKILL):
            result["stderr"] = err[-2000:]
        if args.trace:
            with open(f"/tmp/service-trace-{name}-{limit_mib}.log", "w") as f:
                f.write(err)
        return result
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        if server is not None and server.stdout is not None:
            server.stdout.close()
        if server is not None and server.stderr is not None:
            server.stderr.close()
        group.remove()


def show(result: dict[str, Any]) -> None:
    mean = result["mean_usage_pct"]
    print(
        f"  {result['variant']:<18} hit rate {result['hit_rate']:.4f}  "
        f"survived {'yes' if result['survived'] else 'NO '}  oom kills {result['oom_kills']}  "
        f"mean usage {mean if mean is not None else '-'} %  peak {result['peak_mib']} MiB  "
        f"{result['requests']:,} requests in {result['seconds']} s",
        flush=True,
    )


def run_limit(args: argparse.Namespace, limit_mib: int) -> dict[str, Any]:
    """ShrinkableLRU and the bisection for the best fixed size, under ``limit_mib``."""
    print(f"{limit_mib} MiB group:", flush=True)
    shrinkable = run_variant(args, limit_mib, "shrinkable", 0)
    show(shrinkable)
    if args.shrinkable_only:
        print(json.dumps(shrinkable), flush=True)
        return {"limit_mib": limit_mib, "shrinkable": shrinkable, "target_met": False}
    fits = limit_mib * MiB // args.value_size
    low, high = fits // 2, fits
    tried: dict[int, dict[str, Any]] = {}
    while True:
        result = run_variant(args, limit_mib, "cachetools", low)
        show(result)
        tried[low] = result
        if result["survived"] or low < 2:
            break
        high, low = low, low // 2
    while high - low > args.precision:
        middle = (low + high) // 2
        result = run_variant(args, limit_mib, "cachetools", middle)
        show(result)
        tried[middle] = result
        if result["survived"]:
            low = middle
        else:
            high = middle
    best = tried[low] if tried[low]["survived"] else None
    summary = {
        "limit_mib": limit_mib,
        "shrinkable_hit_rate": shrinkable["hit_rate"],
        "shrinkable_steady_hit_rate": shrinkable["steady_hit_rate"],
        "best_fixed_entries": low if best else None,
        "best_fixed_hit_rate": best["hit_rate"] if best else None,
        "best_fixed_steady_hit_rate": best["steady_hit_rate"] if best else None,
        "best_fixed_mean_usage_pct": best["mean_usage_pct"] if best else None,
        "smallest_failing_entries": high,
        "shrinkable_mean_usage_pct": shrinkable["mean_usage_pct"],
        "shrinkable_whole_run_mean_usage_pct": shrinkable["whole_run_mean_usage_pct"],
        "shrinkable_peak_mib": shrinkable["peak_mib"],
        "oom_kills": shrinkable["oom_kills"],
        "shrinkable": shrinkable,
        "fixed": [tried[n] for n in sorted(tried)],
    }
    hit_ok = best is None or shrinkable["hit_rate"] >= best["hit_rate"]
    usage_ok = (shrinkable["mean_usage_pct"] or 0) >= TARGET_USAGE_PCT
    summary["target_met"] = hit_ok and usage_ok and shrinkable["survived"]
    print(
        f"  shrinkable {shrinkable['hit_rate']:.4f} vs best surviving fixed size "
        f"({summary['best_fixed_entries']} entries) {summary['best_fixed_hit_rate']}: "
        f"{'at least as good' if hit_ok else 'WORSE'}; mean usage "
        f"{shrinkable['mean_usage_pct']} % (target {TARGET_USAGE_PCT} %); "
        f"OOM kills {shrinkable['oom_kills']}",
        flush=True,
    )
    print(json.dumps({k: v for k, v in summary.items() if k not in ("shrinkable", "fixed")}))
    return summary


def orchestrate(args: argparse.Namespace) -> int:
    from pyshrinker.cgroup import v1_memory_available

    if not v1_memory_available():
        print("needs root and a cgroup v1 memory hierarchy", file=sys.stderr)
        return 1
    print(
        f"Zipf({args.zipf_s}) over {args.keys:,} keys of {args.value_size // 1024} KiB "
        f"({args.keys * args.value_size / 1e9:.1f} GB), {args.requests:,} requests from "
        f"{args.clients} clients, backend latency {args.backend_latency * 1000:g} ms",
        flush=True,
    )
    runs = [run_limit(args, limit) for limit in args.limits]
    last = {k: v for k, v in runs[0].items() if k not in ("shrinkable", "fixed")}
    last["runs"] = runs
    print(json.dumps(last), flush=True)
    return 0 if all(run["target_met"] for run in runs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--role", choices=["orchestrate", "server"], default="orchestrate")
    parser.add_argument("--limits", type=int, nargs="+", default=[256, 1024], help="MiB")
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--zipf-s", type=float, default=0.9)
    parser.add_argument("--value-size", type=int, default=100 * 1024)
    parser.add_argument("--backend-latency", type=float, default=0.002, help="seconds")
    parser.add_argument("--requests", type=int, default=60_000, help="per variant, in all")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--precision", type=int, default=25, help="entries, bisection")
    parser.add_argument("--seed", type=int, default=20130103)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shrinkable-only", action="store_true", help="no bisection (probes)")
    parser.add_argument("--cache", choices=["shrinkable", "cachetools"], help=argparse.SUPPRESS)
    parser.add_argument("--entries", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "server":
        return run_server(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
