"""The Django and Flask example services, under gunicorn, survive a small memory cgroup.

Each runs (examples/frameworks/, two gunicorn workers) with pyshrinker.contrib's backend and no
size cap in a 160 MiB cgroup v1 group, and answers 3,000 requests over 4,000 keys of 64 KiB
(250 MiB in all, more than fits beside the two workers) drawn from a Zipf distribution: every
answer must be right, with hits, and no process OOM-killed. benchmarks/frameworks.py does the
same at 256 MiB against the best fixed size of the built-in backends.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from types import ModuleType

import pytest

from .conftest import CGROUP_PREFIX

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARK = os.path.join(HERE, os.pardir, "benchmarks", "frameworks.py")


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("frameworks_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.v1
@pytest.mark.parametrize("framework", ["django", "flask"])
def test_service_survives_a_small_group(
    framework: str,
    report_figure: Callable[..., None],
) -> None:
    pytest.importorskip("gunicorn")
    pytest.importorskip("django" if framework == "django" else "flask_caching")
    bench = load_benchmark()
    plan = bench.zipf_plan(keys=4000, requests=3000, exponent=0.9, seed=2)
    run = bench.run_service(
        framework,
        "shrinkable",
        None,
        limit=160 * MiB,
        plan=plan,
        value_size=64 * 1024,
        workers=2,
        threads=2,
        clients=4,
        prefix=CGROUP_PREFIX,
    )
    report_figure(
        f"{framework} service, 3000 requests, 160 MiB",
        hit_rate=run["hit_rate"],
        oom_kills=run["oom_kills"],
        peak_mib=run["peak_mib"],
    )
    assert run["errors"] == [], run
    assert run["oom_kills"] == 0, run
    assert run["wrong"] == 0 and run["failed"] == 0, run
    assert run["answered"] == len(plan), run
    assert run["master_alive"], run
    assert run["hit_rate"] > 0.1, run
    assert run["worker_stats"]["cache"] == "shrinkable", run
