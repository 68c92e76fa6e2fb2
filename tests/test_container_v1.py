"""A cgroup v1 container's shape on this machine: the memory hierarchy mounted read-only.

Registering v1 usage thresholds and pressure levels writes cgroup.event_control; where the
cgroupfs is read-only the controller must fall back to reading usage, and say why.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pyshrinker.cgroup import V1_MOUNT, ManagedCgroupV1

from .v2_helpers import probe

MiB = 1 << 20

# A mount namespace of its own, where the v1 memory mount is read-only (the host's is not
# touched), then the probe.
READ_ONLY = f'mount -o remount,bind,ro {V1_MOUNT} && exec "$@"'


@pytest.mark.v1
class TestReadOnlyV1:
    """The controller in a v1 group whose cgroupfs it cannot write."""

    def test_thresholds_fall_back_to_reads(
        self, v1_group: Callable[[int], ManagedCgroupV1]
    ) -> None:
        """No usage threshold can be registered: adaptive reads steer, and that is said."""
        group = v1_group(256 * MiB)
        chosen = probe(group, prefix=("unshare", "--mount", "/bin/sh", "-c", READ_ONLY, "sh"))
        assert (chosen["version"], chosen["path"]) == ("v1", group.path)
        assert chosen["marks"][0] == 256 * MiB
        assert "adaptive polling of usage" in chosen["signals"]
        assert not any("usage threshold" in line for line in chosen["signals"])
        why = chosen["unavailable"]["v1 usage thresholds"]
        assert "Read-only file system" in why and why.endswith("reading usage adaptively")
        assert "Read-only file system" in chosen["unavailable"]["v1 pressure level low"]
