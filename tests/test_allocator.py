"""The proposal's two-thread allocator, end to end on the real kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyshrinker.cgroup import HostMemory

from .v2_helpers import run_in_container, run_in_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOCATOR = os.path.join(ROOT, "examples", "two_thread_allocator.py")
MiB = 1 << 20


def last_json(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in output: {text!r}"
    return json.loads(lines[-1])


def run_in(group, *args: str, timeout: float = 120) -> tuple[int, str]:
    done = run_in_group(group, [sys.executable, ALLOCATOR, *args], timeout=timeout)
    return done.returncode, done.stdout


@pytest.mark.v1
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


def survived(done: subprocess.CompletedProcess[str], total: int) -> dict:
    """The allocator exited 0 having allocated ``total`` and been asked to free: its figures."""
    assert done.returncode == 0, done.stdout + done.stderr
    figures = last_json(done.stdout)
    assert figures["allocated_bytes"] == total
    assert figures["requests"] > 0
    return figures


def outcome(done: subprocess.CompletedProcess[str], group, figures: dict | None = None) -> dict:
    """What the issue asks to see of a run: exit status, oom_kill, memory.peak (and pace)."""
    seen = {"exit": done.returncode, "oom_kill": group.oom_kills(), "peak": group.peak()}
    if figures is not None:
        seen.update(seconds=figures["seconds"], requests=figures["requests"])
    return seen


def report(report_figure, what: str, seen: dict) -> None:
    report_figure(what, **{**seen, "peak": f"{seen['peak'] / MiB:.1f} MiB"})


#: memory.max of the guest's allocator runs: 128 MiB in CI (4 GiB allocated, 32 times it);
#: ``PYSHRINKER_GUEST_LIMIT_MIB=256`` for the issue's figures (8 GiB, about 150 s a run in the
#: guest's software emulation).
GUEST_LIMIT = int(os.environ.get("PYSHRINKER_GUEST_LIMIT_MIB", "128")) * MiB
GUEST_TOTAL = 32 * GUEST_LIMIT
ALLOCATE_32X = [sys.executable, ALLOCATOR, "--total", str(GUEST_TOTAL)]
LIMIT_TEXT = f"memory.max {GUEST_LIMIT // MiB} MiB"
TOTAL_TEXT = f"{GUEST_TOTAL >> 30} GiB"


@pytest.mark.v2
class TestInV2Group:
    """On a real cgroup v2 kernel: 32 times memory.max, never OOM-killed."""

    def test_own_memory_max(self, v2_group, report_figure):
        """memory.max on the allocator's group: exit 0, oom_kill 0, peak <= limit."""
        group = v2_group(GUEST_LIMIT)
        done = run_in_group(group, ALLOCATE_32X, timeout=900)
        seen = outcome(done, group, survived(done, GUEST_TOTAL))
        report(report_figure, f"{TOTAL_TEXT} in {LIMIT_TEXT}", seen)
        assert f"memory: v2 {group.path}" in done.stderr
        assert seen["oom_kill"] == 0 and seen["peak"] <= GUEST_LIMIT

    def test_limit_on_the_parent_only(self, v2_group, report_figure):
        """memory.max on the parent, none on the group: the same, by the parent's."""
        parent = v2_group(GUEST_LIMIT)
        child = v2_group(None, parent=parent.path)
        done = run_in_group(child, ALLOCATE_32X, timeout=900)
        seen = outcome(done, parent, survived(done, GUEST_TOTAL))
        what = f"{TOTAL_TEXT} under a parent's {LIMIT_TEXT} (parent's figures)"
        report(report_figure, what, seen)
        assert f"memory.events.local ({parent.path})" in done.stderr
        assert seen["oom_kill"] == 0 and child.oom_kills() == 0
        assert seen["peak"] <= GUEST_LIMIT

    def test_container_shape(self, v2_group, report_figure):
        """Namespace, read-only cgroupfs, non-root, memory.max: the same."""
        group = v2_group(GUEST_LIMIT)
        done = run_in_container(group, ALLOCATE_32X, timeout=900)
        seen = outcome(done, group, survived(done, GUEST_TOTAL))
        report(report_figure, f"{TOTAL_TEXT} in {LIMIT_TEXT}, container-shaped", seen)
        assert "memory: v2 /sys/fs/cgroup;" in done.stderr
        assert seen["oom_kill"] == 0 and seen["peak"] <= GUEST_LIMIT

    def test_without_pyshrinker_is_oom_killed(self, v2_group, report_figure):
        """--no-shrinker in the same group: killed by the OOM killer."""
        group = v2_group(GUEST_LIMIT)
        done = run_in_group(group, [*ALLOCATE_32X, "--no-shrinker"], timeout=900)
        seen = outcome(done, group)
        report(report_figure, f"{TOTAL_TEXT} in {LIMIT_TEXT} without pyshrinker", seen)
        assert done.returncode == -9
        assert seen["oom_kill"] >= 1


@pytest.mark.vm
class TestNoLimitInTheGuest:
    """A group with no limit in the guest: only the machine's memory bounds the allocator."""

    def test_machine_memory_steers(self, v2_group, report_figure):
        """1.25 times the guest's memory allocated under MemAvailable's watermarks: exit 0."""
        with HostMemory.open() as host:
            total_memory = host.read().limit
        assert total_memory is not None
        total = (total_memory * 5 // 4) // MiB * MiB
        group = v2_group(None)
        # If anything is to be OOM-killed, let it be the allocator and not the test runner.
        argv = ["/bin/sh", "-c", 'echo 1000 > /proc/self/oom_score_adj && exec "$@"', "sh"]
        argv += [sys.executable, ALLOCATOR, "--total", str(total)]
        done = run_in_group(group, argv, timeout=900)
        seen = outcome(done, group, survived(done, total))
        what = f"{total / MiB:.0f} MiB with no cgroup limit in a {total_memory / MiB:.0f} MiB guest"
        report(report_figure, what, seen)
        where = f"memory: host /proc/meminfo (MemAvailable: no limit on v2 group {group.path})"
        assert where in done.stderr
        assert seen["oom_kill"] == 0


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
