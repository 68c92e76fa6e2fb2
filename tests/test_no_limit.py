"""No cgroup limit anywhere up the hierarchy: the machine's MemAvailable steers.

Most processes on a host live in such a group (the v1 root here, a systemd slice without
MemoryMax=): nothing but the RAM there is bounds them. A controller then reads /proc/meminfo
with watermarks of its own (policy.Watermarks.for_machine), and a budget the user gives still
wins. The guest's run of the allocator past the machine's memory is in test_allocator.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyshrinker.cache import ChunkCache
from pyshrinker.cgroup import HostMemory, ManagedCgroupV1
from pyshrinker.controller import Controller
from pyshrinker.policy import Watermarks
from pyshrinker.transport import EmbeddedTransport

from .test_cgroup import _wait_until as wait_until
from .v2_helpers import probe

MiB = 1 << 20
GiB = 1 << 30


def write_meminfo(path: Path, total: int, available: int) -> None:
    """A /proc/meminfo with the figures the controller reads (in kB, as the kernel writes)."""
    path.write_text(
        f"MemTotal: {total // 1024} kB\nMemFree: {available // 1024} kB\n"
        f"MemAvailable: {available // 1024} kB\n"
    )


class TestMachineWatermarks:
    """A controller over the host's memory asks caches to shrink when MemAvailable runs low."""

    def test_cache_asked_when_memavailable_drops(self, tmp_path: Path) -> None:
        """4 GiB machine: MemAvailable falls under its 128 MiB watermark; the cache is asked."""
        meminfo = tmp_path / "meminfo"
        write_meminfo(meminfo, 4 * GiB, 3 * GiB)
        with Controller.create(HostMemory.open(str(meminfo))) as controller:
            marks = controller.watermarks
            assert marks == Watermarks.for_machine(4 * GiB)
            assert (marks.limit - marks.high, marks.limit - marks.low) == (128 * MiB, 256 * MiB)
            cache: ChunkCache[int, bytes] = ChunkCache(MiB, transport=EmbeddedTransport(controller))
            try:
                for key in range(64):
                    cache.put(key, b"x", chunks=1)
                time.sleep(0.3)
                assert cache.chunks == 64 and controller.history() == []
                # Other processes took memory: 100 MiB available, under the 128 MiB watermark.
                write_meminfo(meminfo, 4 * GiB, 100 * MiB)
                assert wait_until(lambda: cache.chunks < 64)
                # Asked for down to the low watermark (256 MiB available): more than it holds.
                assert wait_until(lambda: cache.chunks == 0)
                asked = sum(request.chunks for request in controller.history())
                assert asked == 64
            finally:
                cache.close()

    def test_quiet_with_memory_available(self, tmp_path: Path) -> None:
        """Above the watermark nothing is asked, however full the cache."""
        meminfo = tmp_path / "meminfo"
        write_meminfo(meminfo, 4 * GiB, 129 * MiB)
        with Controller.create(HostMemory.open(str(meminfo))) as controller:
            cache: ChunkCache[int, bytes] = ChunkCache(MiB, transport=EmbeddedTransport(controller))
            try:
                for key in range(64):
                    cache.put(key, b"x", chunks=1)
                time.sleep(1.5)  # longer than the longest poll interval
                assert cache.chunks == 64
                assert controller.history() == []
            finally:
                cache.close()


@pytest.mark.v1
class TestUnlimitedV1Group:
    """A real v1 group with no limit, as most processes on this machine are in."""

    def test_controller_steers_by_the_machine(
        self, v1_group: Callable[[int], ManagedCgroupV1]
    ) -> None:
        """limit -1 on a group under the unlimited root: host MemAvailable, said so."""
        group = v1_group(64 * MiB)
        group.write("memory.limit_in_bytes", "-1")
        chosen = probe(group)
        assert (chosen["version"], chosen["path"]) == ("host", "/proc/meminfo")
        with HostMemory.open() as host:
            total = host.read().limit
        assert total is not None
        marks = Watermarks.for_machine(total)
        assert chosen["marks"] == [marks.limit, marks.high, marks.low]
        assert chosen["signals"][0] == (
            f"memory: host /proc/meminfo (MemAvailable: no limit on v1 group {group.path})"
        )
        assert f"no limit on v1 group {group.path}" in chosen["unavailable"]["cgroup limit"]

    def test_budget_still_wins(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """PYSHRINKER_BUDGET's path: a budget steers in a group with no limit."""
        group = v1_group(64 * MiB)
        group.write("memory.limit_in_bytes", "-1")
        chosen = probe(group, str(192 * MiB))
        assert chosen["version"] == "budget"
        assert chosen["marks"][0] == 192 * MiB
