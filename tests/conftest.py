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
        group = ManagedCgroupV1.create(f"pyshrinker-test-{uuid.uuid4().hex[:12]}", limit)
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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a real-kernel fixture are kernel tests, marked so or not (-m "not kernel")."""
    for item in items:
        if {"v1_group", "require_psi"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kernel)
