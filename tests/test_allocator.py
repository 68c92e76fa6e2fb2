"""The proposal's two-thread allocator, end to end on the real kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .helpers import run_in_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOCATOR = os.path.join(ROOT, "examples", "two_thread_allocator.py")
MiB = 1 << 20


def last_json(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in output: {text!r}"
    return json.loads(lines[-1])


def run_in(group, *args: str, timeout: float = 120) -> tuple[int, str]:
    returncode, out, _ = run_in_group(group, [sys.executable, ALLOCATOR, *args], timeout)
    return returncode, out


class TestInLimitedCgroup:
    """In a 256 MiB v1 group: 32 times the limit with pyshrinker, OOM-killed without."""

    def test_allocates_32_times_the_limit_without_oom(self, v1_group):
        """--total 8G exits 0, oom_kill 0, peak usage at or under the limit."""
        group = v1_group(256 * MiB)
        code, out = run_in(group, "--total", "8G")
        assert code == 0, out
        figures = last_json(out)
        assert figures["allocated_bytes"] == 8 << 30
        assert figures["freed_bytes"] >= (8 << 30) - 256 * MiB
        assert figures["requests"] > 0
        for key in ("readded_chunks", "seconds", "alloc_mib_per_s"):
            assert key in figures
        assert group.read_keyed("memory.oom_control")["oom_kill"] == 0
        assert group.read_int("memory.max_usage_in_bytes") <= 256 * MiB

    def test_without_shrinker_is_oom_killed(self, v1_group):
        """--no-shrinker: the same allocator is killed by the OOM killer."""
        group = v1_group(256 * MiB)
        code, _ = run_in(group, "--no-shrinker", "--total", "8G")
        assert code == -9
        assert group.read_keyed("memory.oom_control")["oom_kill"] >= 1


class TestProcessBudget:
    """Without a cgroup limit, a process budget steers the same allocator."""

    def test_budget_keeps_rss_under_budget(self):
        """PYSHRINKER_BUDGET=192M: 2 GiB allocated, resident memory stays under the budget."""
        env = dict(os.environ, PYSHRINKER_BUDGET="192M")
        proc = subprocess.run(
            [sys.executable, ALLOCATOR, "--total", "2G"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "memory: budget" in proc.stderr
        figures = last_json(proc.stdout)
        assert figures["requests"] > 0
        assert figures["peak_rss_bytes"] <= 192 * MiB


class TestPeakRss:
    """The reported peak is the allocator's own, not its parent's."""

    def test_not_inherited_from_a_large_parent(self):
        """A child forked from a 300 MiB parent reports its own peak (ru_maxrss would not)."""
        ballast = bytearray(300 * MiB)  # touched: bytearray zero-fills
        proc = subprocess.run(
            [sys.executable, ALLOCATOR, "--no-shrinker", "--total", "16M"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        del ballast
        assert proc.returncode == 0, proc.stderr
        peak = last_json(proc.stdout)["peak_rss_bytes"]
        assert 16 * MiB <= peak < 150 * MiB


class TestArguments:
    """Bad arguments are usage errors."""

    @pytest.mark.parametrize("args", [["--total", "lots"], ["--chunk-size", "0"]])
    def test_bad_arguments(self, args):
        """Exit status 2 and a message on stderr."""
        proc = subprocess.run(
            [sys.executable, ALLOCATOR, *args], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2
        assert "error" in proc.stderr
