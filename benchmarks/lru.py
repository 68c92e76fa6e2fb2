"""Per-operation cost of ShrinkableLRU and @shrinkable_cache against the caches people use.

One run measures, interleaved, on the same precomputed workload:

* mapping caches, each driven by the same get-or-set loop
  ``v = c.get(k); if v is None: c[k] = value``:
  :class:`~pyshrinker.ShrinkableLRU`, ``cachetools.LRUCache``, ``lru.LRU`` (lru-dict, C) and a
  plain ``OrderedDict`` LRU (``move_to_end`` on a hit, ``popitem(last=False)`` when full);
* memoizing decorators, each called as ``f(k)``: :func:`~pyshrinker.shrinkable_cache` and
  ``functools.lru_cache`` (C).

Workload: ``--ops`` operations (1,000,000) on keys drawn from a Zipf distribution (s = 1.0) over
``--keys`` keys (100,000), precomputed with a fixed seed (a CDF and bisect: no numpy); values are
``--value-size`` bytes (1 KiB) taken from a preallocated pool, so no run measures allocation;
every cache holds ``--capacity`` entries (10,000): ``maxsize=capacity``, as for cachetools (a
ShrinkableLRU from before its sizes were cachetools', in a baseline, capped bytes: there its
``maxsize`` is ``capacity * sys.getsizeof(value)``, the same entries). The hit rates must all be
equal (checked). Each cache is measured
``--runs`` times (5), interleaved, with the garbage collector off during the timed loop as timeit
does; the figure is the median. The pyshrinker caches are registered with a private controller
that has no memory source, so nothing but the workload touches them.

Then the cost of a shrink request: a ShrinkableLRU of ``--shrink-entries`` entries (no maxsize)
is asked, through the controller, for half its chunks; the time from ``controller.request`` to
``pyshrinker.settle()`` returning (wake-up, eviction, heap trim) is divided by the entries evicted.

``--baseline REF`` measures, in the same run and interleaved, the ShrinkableLRU and
shrinkable_cache of git revision REF (say ``main``) too: its ``lru.py`` and ``_lru.c`` are taken
from git, the C core compiled as setuptools compiles ours (the interpreter's CC and CFLAGS) and
loaded beside ours under another name (``baseline_*`` in the figures).

The machine is shared and noisy: compare the ratios within one run. The last line of output is one
JSON object.

    python benchmarks/lru.py [--baseline main]
"""

from __future__ import annotations

import argparse
import bisect
import functools
import gc
import importlib
import importlib.util
import itertools
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import cachetools

from pyshrinker import (
    Controller,
    EmbeddedTransport,
    ShrinkableLRU,
    settle,
    shrinkable_cache,
)

#: Targets from the issue: ShrinkableLRU at most 0.55x cachetools.LRUCache and 1.6x the
#: OrderedDict LRU; @shrinkable_cache at most 2x functools.lru_cache.
TARGET_VS_CACHETOOLS = 0.55
TARGET_VS_ORDEREDDICT = 1.6
TARGET_DECORATOR_VS_FUNCTOOLS = 2.0

_MISS: Any = object()


def _import_lru_dict() -> Any:
    """lru-dict's module is called ``lru``, like this script: import it from elsewhere."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        return importlib.import_module("lru")
    finally:
        sys.path[:] = saved


lru_dict = _import_lru_dict()


class OrderedDictLRU:
    """The textbook LRU: an OrderedDict, ``move_to_end`` on a hit, ``popitem(last=False)``."""

    def __init__(self, maxsize: int) -> None:
        self._data: OrderedDict[Hashable, object] = OrderedDict()
        self._maxsize = maxsize

    def get(self, key: Hashable, default: object = None) -> object:
        data = self._data
        value = data.get(key, _MISS)
        if value is _MISS:
            return default
        data.move_to_end(key)
        return value

    def __setitem__(self, key: Hashable, value: object) -> None:
        data = self._data
        data[key] = value
        data.move_to_end(key)
        if len(data) > self._maxsize:
            data.popitem(last=False)


def zipf_indices(n_keys: int, n_ops: int, s: float, seed: int) -> list[int]:
    """``n_ops`` key indices drawn from Zipf(s) over ``n_keys`` keys (index 0 the most popular)."""
    cdf = list(itertools.accumulate(1.0 / (rank**s) for rank in range(1, n_keys + 1)))
    total = cdf[-1]
    rng = random.Random(seed)
    return [min(n_keys - 1, bisect.bisect_left(cdf, rng.random() * total)) for _ in range(n_ops)]


def run_mapping(cache: Any, keys: list[str], values: list[bytes]) -> tuple[float, int]:
    """Run the get-or-set loop once; returns (ns per operation, misses)."""
    misses = 0
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for k, value in zip(keys, values, strict=True):
            v = cache.get(k)
            if v is None:
                cache[k] = value
                misses += 1
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / len(keys), misses


def run_decorated(function: Callable[[str], bytes], keys: list[str]) -> float:
    """Call the decorated function once per key; returns ns per operation."""
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for k in keys:
            function(k)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / len(keys)


def measure_shrink(
    transport: EmbeddedTransport, controller: Controller, entries: int, value: bytes
) -> dict[str, float]:
    """Time one request for half a ShrinkableLRU's chunks, from the request to settle()."""
    cache: ShrinkableLRU[int, bytes] = ShrinkableLRU(transport=transport)
    try:
        for i in range(entries):
            cache[i] = value
        cache.flush()
        half = cache.chunks // 2
        start = time.perf_counter_ns()
        asked = controller.request(cache.shrinker.efd, half)
        settled = settle()
        elapsed = time.perf_counter_ns() - start
        evicted = cache.stats().evicted_on_request
        if not settled or asked != half or evicted == 0:
            raise RuntimeError(f"shrink request not handled: asked {asked}, evicted {evicted}")
        return {"ns": elapsed, "evicted": evicted}
    finally:
        cache.close()


def load_baseline(ref: str) -> types.ModuleType:
    """pyshrinker.lru as it is at git revision ``ref``, beside ours: ``baseline_pyshrinker.lru``.

    Its C core is built from ``ref``'s _lru.c with the interpreter's compiler and flags (as
    setuptools builds ours) and imported as ``baseline_pyshrinker._lru`` (an extension module is
    found by the last part of its name); its lru.py imports it instead of ours, and the rest of
    pyshrinker (client, transport) is ours: the layers under the caches.
    """
    root = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
    ).stdout.strip()

    def show(path: str) -> str:
        return subprocess.run(
            ["git", "-C", root, "show", f"{ref}:{path}"], capture_output=True, text=True, check=True
        ).stdout

    build = tempfile.mkdtemp(prefix="pyshrinker-baseline-")
    source = os.path.join(build, "_lru.c")
    with open(source, "w") as out:
        out.write(show("src/pyshrinker/_lru.c"))
    target = os.path.join(build, "_lru" + sysconfig.get_config_var("EXT_SUFFIX"))
    config = sysconfig.get_config_vars()
    command = [
        *shlex.split(config["CC"]),
        *shlex.split(config.get("CFLAGS") or ""),
        *shlex.split(config.get("CCSHARED") or ""),
        "-I" + sysconfig.get_paths()["include"],
        "-shared",
        source,
        "-o",
        target,
    ]
    subprocess.run(command, check=True)
    package = types.ModuleType("baseline_pyshrinker")
    package.__path__ = [build]
    sys.modules["baseline_pyshrinker"] = package
    spec = importlib.util.spec_from_file_location("baseline_pyshrinker._lru", target)
    assert spec is not None and spec.loader is not None
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    sys.modules["baseline_pyshrinker._lru"] = core
    code = show("src/pyshrinker/lru.py").replace(
        "from pyshrinker._lru import", "from baseline_pyshrinker._lru import"
    )
    lru = types.ModuleType("baseline_pyshrinker.lru")
    sys.modules["baseline_pyshrinker.lru"] = lru
    exec(compile(code, f"{ref}:src/pyshrinker/lru.py", "exec"), lru.__dict__)
    return lru


def counts_entries(cls: type[Any]) -> bool:
    """Whether a ShrinkableLRU class's default getsizeof is cachetools' (1 per entry)."""
    return bool(cls.getsizeof(b"x" * 100) == 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--capacity", type=int, default=10_000)
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=20130103)
    parser.add_argument("--shrink-entries", type=int, default=100_000)
    parser.add_argument("--baseline", metavar="REF", help="also measure git revision REF's caches")
    args = parser.parse_args(argv)
    baseline = load_baseline(args.baseline) if args.baseline else None

    print(f"precomputing {args.ops:,} Zipf({args.zipf_s}) keys over {args.keys:,} ...", flush=True)
    names = [f"key-{i}" for i in range(args.keys)]
    pool = [bytes([i % 256]) * args.value_size for i in range(1024)]
    value_of = {name: pool[i % len(pool)] for i, name in enumerate(names)}
    indices = zipf_indices(args.keys, args.ops, args.zipf_s, args.seed)
    keys = [names[i] for i in indices]
    values = [value_of[k] for k in keys]
    entry_bytes = sys.getsizeof(pool[0])

    controller = Controller.create(None).start()
    transport = EmbeddedTransport(controller)
    capacity = args.capacity

    def load(key: str) -> bytes:
        return value_of[key]

    def lru_maker(cls: type[Any]) -> Callable[[], Any]:
        maxsize = capacity if counts_entries(cls) else capacity * entry_bytes
        return lambda: cls(maxsize=maxsize, transport=transport)

    mappings: dict[str, Callable[[], Any]] = {
        "shrinkable_lru": lru_maker(ShrinkableLRU),
        "cachetools_lru": lambda: cachetools.LRUCache(capacity),
        "lru_dict": lambda: lru_dict.LRU(capacity),
        "ordereddict_lru": lambda: OrderedDictLRU(capacity),
    }
    decorators: dict[str, Callable[[], Any]] = {
        "shrinkable_cache": lambda: shrinkable_cache(maxsize=capacity, transport=transport)(load),
        "functools_lru": lambda: functools.lru_cache(maxsize=capacity)(load),
    }
    if baseline is not None:
        mappings["baseline_shrinkable_lru"] = lru_maker(baseline.ShrinkableLRU)
        decorators["baseline_shrinkable_cache"] = lambda: baseline.shrinkable_cache(
            maxsize=capacity, transport=transport
        )(load)
    times: dict[str, list[float]] = {name: [] for name in [*mappings, *decorators]}
    hit_rates: dict[str, float] = {}

    for run in range(args.runs):
        for name, make in mappings.items():
            cache = make()
            ns, misses = run_mapping(cache, keys, values)
            times[name].append(ns)
            hit_rates[name] = 1 - misses / args.ops
            if hasattr(cache, "close"):
                cache.close()
        for name, make in decorators.items():
            function = make()
            times[name].append(run_decorated(function, keys))
            info = function.cache_info()
            hit_rates[name] = info.hits / (info.hits + info.misses)
            if hasattr(function, "close"):
                function.close()
        print(
            f"run {run + 1}/{args.runs}: "
            + ", ".join(f"{name} {times[name][-1]:.0f}" for name in times)
            + " ns/op",
            flush=True,
        )

    shrinks = [
        measure_shrink(transport, controller, args.shrink_entries, pool[0])
        for _ in range(args.runs)
    ]
    controller.close()

    median = {name: statistics.median(samples) for name, samples in times.items()}
    vs_cachetools = median["shrinkable_lru"] / median["cachetools_lru"]
    vs_ordereddict = median["shrinkable_lru"] / median["ordereddict_lru"]
    vs_functools = median["shrinkable_cache"] / median["functools_lru"]
    shrink_ns = statistics.median(s["ns"] for s in shrinks)
    shrink_evicted = statistics.median(s["evicted"] for s in shrinks)
    same_hits = len({round(rate, 9) for rate in hit_rates.values()}) == 1

    print()
    print(f"Python {platform.python_version()}, {args.ops:,} ops, median of {args.runs} runs")
    print(f"{'cache':<18} {'ns/op':>8} {'hit rate':>9}")
    for name in times:
        print(f"{name:<18} {median[name]:8.1f} {hit_rates[name]:9.4f}")
    print(
        f"ShrinkableLRU / cachetools.LRUCache = {vs_cachetools:.3f} "
        f"(target <= {TARGET_VS_CACHETOOLS})"
    )
    print(
        f"ShrinkableLRU / OrderedDict LRU     = {vs_ordereddict:.3f} "
        f"(target <= {TARGET_VS_ORDEREDDICT})"
    )
    print(
        f"shrinkable_cache / functools        = {vs_functools:.3f} "
        f"(target <= {TARGET_DECORATOR_VS_FUNCTOOLS})"
    )
    print(
        f"shrink request for half of {args.shrink_entries:,} entries: "
        f"{shrink_ns / 1e6:.2f} ms, {shrink_evicted:,.0f} evicted, "
        f"{shrink_ns / shrink_evicted:.0f} ns per evicted entry"
    )
    if baseline is not None:
        lru_vs_baseline = median["shrinkable_lru"] / median["baseline_shrinkable_lru"]
        cache_vs_baseline = median["shrinkable_cache"] / median["baseline_shrinkable_cache"]
        print(f"ShrinkableLRU / {args.baseline}'s        = {lru_vs_baseline:.3f}")
        print(f"shrinkable_cache / {args.baseline}'s     = {cache_vs_baseline:.3f}")
    if not same_hits:
        print("WARNING: hit rates differ; the caches did not hold the same entries")

    result: dict[str, Any] = {f"{name}_ns": round(median[name], 1) for name in times}
    result.update({f"{name}_hit_rate": round(rate, 4) for name, rate in hit_rates.items()})
    result.update(
        {
            "shrinkable_lru_vs_cachetools": round(vs_cachetools, 3),
            "shrinkable_lru_vs_ordereddict": round(vs_ordereddict, 3),
            "shrinkable_cache_vs_functools": round(vs_functools, 3),
            "target_vs_cachetools_met": vs_cachetools <= TARGET_VS_CACHETOOLS,
            "target_vs_ordereddict_met": vs_ordereddict <= TARGET_VS_ORDEREDDICT,
            "target_decorator_met": vs_functools <= TARGET_DECORATOR_VS_FUNCTOOLS,
            "hit_rates_equal": same_hits,
            "shrink_entries": args.shrink_entries,
            "shrink_evicted_entries": int(shrink_evicted),
            "shrink_request_ms": round(shrink_ns / 1e6, 3),
            "shrink_ns_per_evicted_entry": round(shrink_ns / shrink_evicted, 1),
            "ops": args.ops,
            "keys": args.keys,
            "capacity": capacity,
            "value_size": args.value_size,
            "runs": args.runs,
            "python": platform.python_version(),
        }
    )
    if baseline is not None:
        result["baseline"] = args.baseline
        result["shrinkable_lru_vs_baseline"] = round(lru_vs_baseline, 3)
        result["shrinkable_cache_vs_baseline"] = round(cache_vs_baseline, 3)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
