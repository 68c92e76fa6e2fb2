"""The Django and Flask example services under gunicorn in a memory cgroup: shrinkable vs fixed.

Each service (examples/frameworks/) runs under gunicorn (``--workers`` processes of
``--threads`` threads, gthread) in a fresh cgroup v1 memory group of ``--limit-mib`` (256 MiB
by default), and a load generator outside the group sends ``--requests`` ``GET /item/<key>``
over ``--keys`` keys drawn from a Zipf distribution (exponent ``--zipf``), each on a new
connection (so the workers share the load). Every value is ``--value-kib`` KiB, so all the
keys want several times the limit (16,000 x 64 KiB = 1 GiB by default, 4x 256 MiB). Every
answer is checked against the value it must be.

For each framework:

* ``shrinkable``: pyshrinker.contrib's backend with no size cap (memory pressure bounds it);
* ``best_fixed``: the built-in backend (Django's ``LocMemCache``, Flask-Caching's
  ``SimpleCache``) at the largest ``MAX_ENTRIES``/``threshold`` that survives the same load
  (no OOM kill, no failed request), found by bisection between 0 and twice the entries the
  limit could hold (each probe a full run; a probe stops at its first OOM kill). A larger cache
  has a higher hit rate, so the largest that survives is the best fixed size for this limit.

Reported per run: hit rate (hits / answered, over the second half of the requests: in steady
state; the whole run's too), OOM kills, failed requests, the group's peak
(``memory.max_usage_in_bytes``) and requests per second. Figures are printed, never asserted;
the last line is one JSON object.

    python benchmarks/frameworks.py                      # both frameworks (~10 min)
    python benchmarks/frameworks.py --framework flask --requests 10000
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from itertools import accumulate
from types import ModuleType
from typing import Any

from pyshrinker.cgroup import ManagedCgroupV1

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, os.pardir, "examples", "frameworks")
APPS = {"django": "django_service:application", "flask": "flask_service:app"}
BUILTIN = {"django": "LocMemCache (MAX_ENTRIES)", "flask": "SimpleCache (threshold)"}


def _common() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "service_common", os.path.join(EXAMPLES, "service_common.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zipf_plan(keys: int, requests: int, exponent: float, seed: int) -> list[str]:
    """``requests`` keys ``k<rank>``, rank r drawn with probability ~ 1 / (r + 1) ** exponent."""
    cum = list(accumulate(1.0 / (rank + 1) ** exponent for rank in range(keys)))
    ranks = random.Random(seed).choices(range(keys), cum_weights=cum, k=requests)
    return [f"k{rank}" for rank in ranks]


def _wait_for_port(log_path: str, proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", f.read())
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        raise RuntimeError(f"gunicorn did not start:\n{f.read()[-3000:]}")


def _get(port: int, path: str, timeout: float = 30) -> tuple[int, bytes, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("X-Cache")
    finally:
        conn.close()


def _wait_ready(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _get(port, "/stats", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the service never answered /stats")
        time.sleep(0.1)


def drive(
    port: int, plan: list[str], clients: int, value_size: int, group: ManagedCgroupV1
) -> dict[str, Any]:
    """Send the plan from ``clients`` threads; stop at the group's first OOM kill."""
    common = _common()
    work: queue.Queue[tuple[int, str]] = queue.Queue()
    for item in enumerate(plan):
        work.put(item)
    # The hit rate in steady state: over the second half of the plan, once the cache is full.
    steady_from = len(plan) // 2
    tally: dict[str, Any] = {
        "ok": 0, "wrong": 0, "hits": 0, "failed": 0, "errors": [], "steady_ok": 0,
        "steady_hits": 0,
    }  # fmt: skip
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        # A connection per request, as behind a load balancer: each request goes to whichever
        # worker accepts it, so the workers share the load evenly (a kept-alive connection
        # would stay with one worker, and the split would be luck).
        while not stop.is_set():
            try:
                index, key = work.get_nowait()
            except queue.Empty:
                break
            try:
                status, body, cached = _get(port, f"/item/{key}", timeout=60)
                right = status == 200 and body == common.value_for(key, value_size)
                with lock:
                    tally["ok" if right else "wrong"] += 1
                    hit = right and cached == "hit"
                    tally["hits"] += hit
                    if index >= steady_from:
                        tally["steady_ok"] += right
                        tally["steady_hits"] += hit
            except (OSError, http.client.HTTPException) as err:
                with lock:
                    tally["failed"] += 1
                    if len(tally["errors"]) < 5:
                        tally["errors"].append(repr(err))

    def watch() -> None:
        while not stop.wait(0.25):
            if group.oom_kills():
                stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tally["seconds"] = time.monotonic() - started
    stop.set()
    watcher.join()
    return tally


def run_service(
    framework: str,
    cache: str,
    max_entries: int | None,
    *,
    limit: int,
    plan: list[str],
    value_size: int,
    workers: int,
    threads: int,
    clients: int,
    prefix: str,
) -> dict[str, Any]:
    """One run of ``framework``'s service with ``cache`` in a fresh group; its figures."""
    group = ManagedCgroupV1.create(f"{prefix}{uuid.uuid4().hex[:12]}", limit)
    env = dict(os.environ)
    env.update(
        PYSHRINKER_EXAMPLE_CACHE=cache,
        PYSHRINKER_EXAMPLE_VALUE_SIZE=str(value_size),
        PYSHRINKER_EXAMPLE_MAX_ENTRIES="" if max_entries is None else str(max_entries),
    )
    argv = [
        sys.executable, "-m", "gunicorn", "--chdir", EXAMPLES, "--bind", "127.0.0.1:0",
        "--workers", str(workers), "--worker-class", "gthread", "--threads", str(threads),
        "--timeout", "120", "--graceful-timeout", "5", APPS[framework],
    ]  # fmt: skip
    with tempfile.NamedTemporaryFile(prefix="pyshrinker-gunicorn-", suffix=".log") as log:
        try:
            proc = group.spawn(argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
        except BaseException:
            group.remove()
            raise
        try:
            port = _wait_for_port(log.name, proc, timeout=120)
            _wait_ready(port, timeout=120)
            tally = drive(port, plan, clients, value_size, group)
            stats: dict[str, Any] = {}
            try:
                stats = json.loads(_get(port, "/stats")[1])
            except (OSError, ValueError):
                pass
            answered = tally["ok"]
            return {
                "framework": framework,
                "cache": cache,
                "max_entries": max_entries,
                "requests": len(plan),
                "answered": answered,
                "hit_rate": _rate(tally["steady_hits"], tally["steady_ok"]),
                "hit_rate_whole_run": _rate(tally["hits"], answered),
                "wrong": tally["wrong"],
                "failed": tally["failed"],
                "errors": tally["errors"],
                "oom_kills": group.oom_kills(),
                "peak_mib": round(group.peak() / MiB, 1),
                "requests_per_s": round((answered + tally["failed"]) / tally["seconds"], 1),
                "master_alive": proc.poll() is None,
                "worker_stats": stats,
            }
        finally:
            _stop(proc, group)


def _rate(hits: int, answered: int) -> float:
    return round(hits / answered, 4) if answered else 0.0


def _stop(proc: subprocess.Popen[bytes], group: ManagedCgroupV1) -> None:
    """End gunicorn (our child) and its workers (in our group, by pid); remove the group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while True:
        pids = group.pids()
        if not pids:
            break
        for pid in pids:  # gunicorn's workers, which only we started in this new group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} stay in {group.path}")
        time.sleep(0.05)
    group.remove()


def survived(run: dict[str, Any]) -> bool:
    """No OOM kill, every request answered, and rightly."""
    return (
        run["oom_kills"] == 0
        and run["failed"] == 0
        and run["wrong"] == 0
        and run["answered"] == run["requests"]
    )


def _line(run: dict[str, Any]) -> str:
    size = "no cap" if run["max_entries"] is None else f"max {run['max_entries']}"
    return (
        f"  {run['framework']:6} {run['cache']:10} {size:10}: hit rate {run['hit_rate']:.4f}, "
        f"oom kills {run['oom_kills']}, failed {run['failed']}, wrong {run['wrong']}, "
        f"peak {run['peak_mib']} MiB, {run['requests_per_s']} req/s"
    )


def benchmark(framework: str, args: argparse.Namespace, plan: list[str]) -> dict[str, Any]:
    value_size = args.value_kib * 1024
    options = dict(
        limit=args.limit_mib * MiB,
        plan=plan,
        value_size=value_size,
        workers=args.workers,
        threads=args.threads,
        clients=args.clients,
        prefix=args.group_prefix,
    )
    print(f"{framework}: shrinkable backend, {BUILTIN[framework]} bisection", flush=True)
    shrinkable = run_service(framework, "shrinkable", None, **options)  # type: ignore[arg-type]
    print(_line(shrinkable), flush=True)
    # Between 0 entries (survives) and twice what the limit holds, per worker (cannot).
    lo, hi = 0, min(args.keys, 2 * args.limit_mib * MiB // value_size)
    probes: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    resolution = max(1, hi // args.resolution)
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        run = run_service(framework, "builtin", mid, **options)  # type: ignore[arg-type]
        print(_line(run), flush=True)
        probes.append(run)
        if survived(run):
            lo, best = mid, run
        else:
            hi = mid
    if best is None:
        best = run_service(framework, "builtin", lo, **options)  # type: ignore[arg-type]
        print(_line(best), flush=True)
        probes.append(best)
    gap = round(shrinkable["hit_rate"] - best["hit_rate"], 4)
    print(
        f"{framework}: shrinkable hit rate {shrinkable['hit_rate']:.4f} "
        f"({shrinkable['oom_kills']} OOM kills) vs best surviving fixed size "
        f"{best['max_entries']}: {best['hit_rate']:.4f} (difference {gap:+.4f})",
        flush=True,
    )
    return {"shrinkable": shrinkable, "best_fixed": best, "hit_rate_difference": gap,
            "probes": probes}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=["django", "flask", "both"], default="both")
    parser.add_argument("--limit-mib", type=int, default=256)
    parser.add_argument("--keys", type=int, default=16_000)
    parser.add_argument("--value-kib", type=int, default=64)
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--zipf", type=float, default=0.9)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32,
                        help="bisection stops at (upper bound / this) entries")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--group-prefix",
        default=os.environ.get("PYSHRINKER_CGROUP_PREFIX", "pyshrinker-bench-"),
    )
    args = parser.parse_args(argv)
    plan = zipf_plan(args.keys, args.requests, args.zipf, args.seed)
    wanted = args.keys * args.value_kib / 1024
    print(
        f"{args.requests} requests over {args.keys} keys of {args.value_kib} KiB (Zipf "
        f"{args.zipf}; all keys: {wanted:.0f} MiB, {wanted / args.limit_mib:.1f}x the "
        f"{args.limit_mib} MiB limit); gunicorn {args.workers} workers x {args.threads} threads",
        flush=True,
    )
    frameworks = ["django", "flask"] if args.framework == "both" else [args.framework]
    result = {"config": vars(args)} | {name: benchmark(name, args, plan) for name in frameworks}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
