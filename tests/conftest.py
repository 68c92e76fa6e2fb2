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
from pyshrinker.shared import SCOPE_ENV
from pyshrinker.signals.psi import psi_available

pytest.register_assert_rewrite("tests.kernel_features")

from .kernel_features import REQUIRE_KERNEL, need  # noqa: E402

pytest_plugins = ["tests.kernel_features"]

__all__ = ["REQUIRE_KERNEL", "need"]

MiB = 1 << 20

# Processes of one memory cgroup elect one controller (pyshrinker.shared). This run's processes
# (the test process and the children it starts) elect among themselves, apart from any other
# run on the machine in the same cgroup.
os.environ.setdefault(SCOPE_ENV, f"tests-{uuid.uuid4().hex[:12]}")

#: Name prefix of the cgroups the tests create; ``PYSHRINKER_CGROUP_PREFIX`` overrides it, so
#: that runs side by side on one machine can tell theirs apart.
CGROUP_PREFIX = os.environ.get("PYSHRINKER_CGROUP_PREFIX", "pyshrinker-test-")


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
        name = f"{CGROUP_PREFIX}{uuid.uuid4().hex[:12]}"
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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a real-kernel fixture are kernel tests, marked so or not (-m "not kernel")."""
    for item in items:
        if {"v1_group", "require_psi"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kernel)
