"""Shared fixtures: real-kernel requirements and cgroups the tests create (and always remove)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from pyshrinker.cgroup import ManagedCgroupV1, v1_memory_available
from pyshrinker.signals.psi import psi_available

#: Set by scripts/test.sh (and so CI): a missing kernel feature fails the test instead of skipping.
REQUIRE_KERNEL = os.environ.get("PYSHRINKER_REQUIRE_KERNEL") == "1"

MiB = 1 << 20

#: Name prefix of the cgroups the tests create; ``PYSHRINKER_CGROUP_PREFIX`` overrides it, so
#: that runs side by side on one machine can tell theirs apart.
CGROUP_PREFIX = os.environ.get("PYSHRINKER_CGROUP_PREFIX", "pyshrinker-test-")


def need(available: bool, reason: str) -> None:
    """Skip (or, where the kernel is required, fail) unless ``available``."""
    if available:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"required kernel feature missing: {reason} (PYSHRINKER_REQUIRE_KERNEL=1)")
    pytest.skip(reason)


@pytest.fixture
def v1_group() -> Iterator[Callable[[int], ManagedCgroupV1]]:
    """Factory for v1 memory groups with a limit; every group made is removed afterwards.

    Processes the test started in a group must be ended by the test (by pid) before it returns.
    """
    need(v1_memory_available(), "needs root and a cgroup v1 memory hierarchy")
    made: list[ManagedCgroupV1] = []

    def make(limit: int = 128 * MiB) -> ManagedCgroupV1:
        group = ManagedCgroupV1.create(f"{CGROUP_PREFIX}{uuid.uuid4().hex[:12]}", limit)
        made.append(group)
        return group

    yield make
    for group in made:
        group.remove()


@pytest.fixture
def require_psi() -> str:
    """The system PSI memory file, required."""
    need(psi_available(), "needs PSI (/proc/pressure/memory)")
    return "/proc/pressure/memory"


# ---------------------------------------------------------------------- pyshrinkerd (FUSE)
# (daemon_helpers imports this module: it is imported inside the fixtures.)


@pytest.fixture
def daemons(tmp_path):
    """Factory for pyshrinkerd processes, all stopped and unmounted afterwards."""
    from .daemon_helpers import running_daemons

    with running_daemons(str(tmp_path)) as made:
        yield made


@pytest.fixture
def daemon(daemons):
    """One pyshrinkerd with --test-control, mounted on a fresh directory."""
    return daemons.start()


@pytest.fixture
def raw(daemon):
    """The daemon's files, opened by hand (closed afterwards)."""
    from .daemon_helpers import Raw

    files = Raw(daemon.mount)
    try:
        yield files
    finally:
        files.close()
