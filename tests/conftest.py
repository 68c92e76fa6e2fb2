"""Shared fixtures: real-kernel requirements and cgroups the tests create (and always remove)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from pyshrinker.cgroup import (
    ManagedCgroupV1,
    ManagedCgroupV2,
    v1_memory_available,
    v2_memory_available,
)
from pyshrinker.signals.psi import psi_available

pytest.register_assert_rewrite("tests.kernel_features")

from .kernel_features import REQUIRE_KERNEL, need  # noqa: E402

pytest_plugins = ["tests.kernel_features"]

__all__ = ["REQUIRE_KERNEL", "need"]

MiB = 1 << 20


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


@pytest.fixture
def v2_group() -> Iterator[Callable[..., ManagedCgroupV2]]:
    """Factory for cgroup v2 groups: ``make(limit, high=None, parent=None)``; all removed after.

    ``limit`` None leaves memory.max unset; ``parent`` is another group's path (which then
    gets the memory controller for its children). Processes a test started in a group must be
    ended by the test (by pid) before it returns.
    """
    need(v2_memory_available(), "needs root and cgroup v2 with the memory controller")
    made: list[ManagedCgroupV2] = []

    def make(
        limit: int | None = 128 * MiB, *, high: int | None = None, parent: str | None = None
    ) -> ManagedCgroupV2:
        if parent is not None:
            enable_memory_for_children(parent)
        name = f"pyshrinker-test-{uuid.uuid4().hex[:12]}"
        group = ManagedCgroupV2.create(name, limit, parent=parent, high=high)
        made.append(group)
        return group

    yield make
    for group in reversed(made):  # children before their parents
        group.remove()


def enable_memory_for_children(path: str) -> None:
    """``+memory`` in a group's cgroup.subtree_control (it must hold no process itself)."""
    with open(os.path.join(path, "cgroup.subtree_control"), "w", encoding="ascii") as f:
        f.write("+memory")


#: Figures the tests measured, printed at the end of the run (see report_figure).
FIGURES: list[str] = []


@pytest.fixture
def report_figure(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``report_figure(what, **values)``: a line in the run's "figures" section."""

    def report(what: str, **values: object) -> None:
        pairs = ", ".join(f"{key} {value}" for key, value in values.items())
        FIGURES.append(f"{request.node.nodeid}: {what}: {pairs}")

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
