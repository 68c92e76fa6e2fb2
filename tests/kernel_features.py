"""Kernel features as pytest markers, and the check that none is silently skipped everywhere.

A test that needs a kernel feature carries its marker (``@pytest.mark.v2``); tests that use a
feature's fixture get the marker by themselves. Before such a test runs, each feature it names
must be there: else it is skipped, or fails where ``PYSHRINKER_REQUIRE_KERNEL=1`` (CI).

No one machine has every feature: this one has the cgroup v1 memory controller and FUSE, and
scripts/vm-test.sh's guest has cgroup v2 with the memory controller. ``scripts/test.sh`` runs
the suite in both, each selecting the tests it can run (``-m``), and each writes what happened
to every test into ``$PYSHRINKER_OUTCOMES``. The last stage is given the other stages' files in
``$PYSHRINKER_OTHER_OUTCOMES`` (comma-separated) and fails unless every test passed in at least
one stage, so a test skipped or deselected everywhere cannot pass unnoticed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest

from pyshrinker.cgroup import v1_memory_available, v2_memory_available
from pyshrinker.signals.psi import psi_available

#: Set by scripts/test.sh (and so CI): a missing kernel feature fails the test instead of skipping.
REQUIRE_KERNEL = os.environ.get("PYSHRINKER_REQUIRE_KERNEL") == "1"
#: Where this stage writes its outcomes, and the other stages' files to check against.
OUTCOMES_ENV = "PYSHRINKER_OUTCOMES"
OTHER_OUTCOMES_ENV = "PYSHRINKER_OTHER_OUTCOMES"
#: Set in scripts/vm-test.sh's guest: a disposable machine of the tests' own.
VM_ENV = "PYSHRINKER_VM"


def _fuse() -> bool:
    from pyshrinker.daemon import fuse_unavailable

    return os.geteuid() == 0 and fuse_unavailable() is None


#: Each feature marker: what it needs, and how to tell whether this machine has it.
FEATURES: dict[str, tuple[str, Callable[[], bool]]] = {
    "v1": ("root and the cgroup v1 memory controller", v1_memory_available),
    "v2": ("root and cgroup v2 with the memory controller enabled", v2_memory_available),
    "psi": ("PSI (/proc/pressure/memory)", psi_available),
    "fuse": ("root and FUSE (/dev/fuse, fusermount3)", _fuse),
    "vm": (
        "a disposable machine of its own: scripts/vm-test.sh's guest",
        lambda: os.environ.get(VM_ENV) == "1" and v2_memory_available(),
    ),
}

#: Fixtures that need a feature: a test using one is marked with it.
FIXTURE_FEATURES = {
    "v1_group": "v1",
    "v1_run": "v1",
    "v2_group": "v2",
    "v2_run": "v2",
    "require_psi": "psi",
    "daemons": "fuse",
}

_available: dict[str, bool] = {}


def available(feature: str) -> bool:
    """Whether this machine has ``feature`` (checked once per session)."""
    if feature not in _available:
        _available[feature] = FEATURES[feature][1]()
    return _available[feature]


def need(available: bool, reason: str) -> None:
    """Skip (or, where the kernel is required, fail) unless ``available``."""
    if available:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"required kernel feature missing: {reason} (PYSHRINKER_REQUIRE_KERNEL=1)")
    pytest.skip(reason)


def features_of(item: pytest.Item) -> list[str]:
    """The feature markers of ``item``, in FEATURES order."""
    names = {mark.name for mark in item.iter_markers()}
    return [feature for feature in FEATURES if feature in names]


#: What happened to each test of this session: outcome and features, by node id.
_outcomes: dict[str, dict[str, Any]] = {}
#: The lines the terminal summary prints about coverage across stages.
_report: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    for feature, (what, _) in FEATURES.items():
        config.addinivalue_line("markers", f"{feature}: needs {what}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Before -m deselects: a fixture's feature must count for the selection too.
    for item in items:
        for fixture, feature in FIXTURE_FEATURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(feature)
    for item in items:
        _outcomes[item.nodeid] = {"outcome": "not run", "features": features_of(item)}


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        _outcomes[item.nodeid] = {"outcome": "deselected", "features": features_of(item)}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for feature in features_of(item):
        need(available(feature), f"needs {FEATURES[feature][0]} ({feature})")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _outcomes.setdefault(report.nodeid, {"features": []})
    if report.failed:
        entry["outcome"] = "failed"
    elif hasattr(report, "wasxfail") and entry.get("outcome") != "failed":
        # A strict xfail that failed as expected: an intended difference from an upstream
        # suite, named in the docs. It counts as having run (a strict one that passes fails).
        entry["outcome"] = "xfailed"
    elif report.skipped and entry.get("outcome") != "failed":
        entry["outcome"] = "skipped"
    elif report.when == "call" and report.passed and entry.get("outcome") != "failed":
        entry["outcome"] = "passed"


def _stage() -> str:
    return os.environ.get("PYSHRINKER_STAGE", "host")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(OUTCOMES_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"stage": _stage(), "tests": _outcomes}, f, indent=1, sort_keys=True)
    others = [each for each in os.environ.get(OTHER_OUTCOMES_ENV, "").split(",") if each]
    if not others:
        return
    problems, summary = check_coverage(_stage(), _outcomes, others)
    _report[:] = [*summary, *problems]
    if problems and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def check_coverage(
    stage: str, outcomes: dict[str, dict[str, Any]], others: list[str]
) -> tuple[list[str], list[str]]:
    """(problems, summary lines) for this stage's outcomes and the other stages' files."""
    stages = {stage: outcomes}
    problems = []
    for path in others:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data["stage"] in stages:
                # Two files of one stage would hide one of them (this one's own outcomes too).
                problems.append(f"outcomes of stage {data['stage']!r} twice (again in {path})")
                continue
            stages[data["stage"]] = data["tests"]
        except (OSError, ValueError, KeyError) as err:
            problems.append(f"no outcomes from another stage in {path}: {err}")
    every = sorted({nodeid for tests in stages.values() for nodeid in tests})
    summary = []
    for feature in FEATURES:
        marked = [
            nodeid
            for nodeid in every
            if any(feature in _features(tests, nodeid) for tests in stages.values())
        ]
        counts = ", ".join(
            f"{sum(tests.get(n, {}).get('outcome') == 'passed' for n in marked)} in {name}"
            for name, tests in stages.items()
        )
        summary.append(f"{feature}: {len(marked)} tests; passed {counts}")
    for nodeid in every:
        seen = {name: tests[nodeid]["outcome"] for name, tests in stages.items() if nodeid in tests}
        if "passed" not in seen.values() and "xfailed" not in seen.values():
            where = ", ".join(f"{outcome} in {name}" for name, outcome in seen.items())
            problems.append(f"{nodeid}: passed in no stage ({where})")
    return problems, summary


def _features(tests: dict[str, dict[str, Any]], nodeid: str) -> list[str]:
    return list(tests.get(nodeid, {}).get("features", ()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _report:
        return
    terminalreporter.section("kernel features across stages")
    for line in _report:
        terminalreporter.write_line(line)
