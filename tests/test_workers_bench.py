"""benchmarks/workers.py, short: its machinery works, and worker processes share one controller.

The figures themselves (eviction against need, shares, usage, hit rates) are the benchmark's to
print, not the tests' to assert: the machine is shared and noisy. What is checked is what must
hold however loaded the machine is: the workers ran under pressure in their group, nobody was
OOM-killed, every worker reported, and with the election exactly one worker runs the controller
and every worker's cache is registered with it, while with elections off each runs its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "workers.py")


def run_bench(*argv: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, BENCH, "--quick", "--no-baseline", "--seconds", "2", *argv],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-12000:]  # a hung run prints its stacks
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert "skipped" not in figures, figures
    runs: list[dict[str, Any]] = figures["runs"]
    return runs


def check_run(run: dict[str, Any], workers: int) -> None:
    """What any run must show: pressure met, no OOM kill, every worker's figures."""
    assert run["oom_kills"] == 0, run
    assert run["processes_dumped"] == workers, run
    assert run["episodes"] > 0 and run["evicted_mib"] > 0, "the load never met the watermark"
    assert run["lookups"] > 0
    assert len(run["share_errors"]) == workers
    assert run.get("client_counts", {}).get("error", 0) == 0, run


def check_elected(run: dict[str, Any], workers: int) -> None:
    """One controller: one worker leads, the others follow it, all registered with it."""
    assert run["roles"] == ["follower"] * (workers - 1) + ["leader"], run
    assert run["controllers"] == 1
    elected = run["elected"]
    assert elected["all_workers_registered"], elected
    assert elected["followers"] == workers - 1
    assert elected["shrinkers"] == workers


@pytest.mark.v1
def test_gunicorn_workers_elect_one_controller(v1_group) -> None:
    """Two gunicorn sync workers in a 256 MiB group under HTTP load share one controller.

    (``v1_group`` only checks the v1 hierarchy is there; the benchmark makes its own groups.)
    """
    (on,) = run_bench("--kinds", "gunicorn", "--modes", "on")
    check_run(on, 2)
    check_elected(on, 2)


@pytest.mark.v1
def test_pool_workers_elect_one_controller(v1_group) -> None:
    """A multiprocessing.Pool of two workers in a 256 MiB group shares one controller; with
    ``PYSHRINKER_ELECTION=off`` each worker runs its own (what the benchmark compares with)."""
    on, off = run_bench("--kinds", "pool", "--modes", "on,off")
    for run in (on, off):
        check_run(run, 2)
    check_elected(on, 2)
    assert off["roles"] == ["own", "own"] and off["controllers"] == 2
