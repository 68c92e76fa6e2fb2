"""ShrinkableLRU against the real kernel: requests arrive while threads read and write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from pyshrinker.cgroup import ManagedCgroupV1

MiB = 1 << 20
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lru_pressure_worker.py")


@pytest.mark.kernel
class TestUnderAMemoryLimit:
    """A ShrinkableLRU in a 128 MiB v1 group, its working set ~300 MB."""

    def test_threads_and_requests(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """Four threads serve 16,000 lookups; requests evict; no OOM kill; the books balance."""
        group = v1_group(128 * MiB)
        proc = group.spawn(
            [sys.executable, WORKER, "--threads", "4", "--keys", "3000", "--ops", "4000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        oom = group.read_keyed("memory.oom_control")
        assert oom["oom_kill"] == 0, f"OOM-killed; stderr: {err[-2000:]}"
        assert proc.returncode == 0, err[-2000:]
        figures = json.loads(out.strip().splitlines()[-1])
        assert figures["errors"] == []
        assert figures["hits"] + figures["misses"] == 16_000
        assert any("memory: v1" in line for line in figures["signals"])
        assert figures["requests"] > 0
        assert figures["evicted_on_request"] > 0
        assert figures["books_balance"], figures
        assert group.read_int("memory.max_usage_in_bytes") <= 128 * MiB
