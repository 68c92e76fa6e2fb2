"""Django's and cachelib's own test suites, from their released sdists, against pyshrinker.contrib.

* Django's ``tests/cache`` (``runtests.py cache``) with ``LocMemCache`` pointed at
  :class:`pyshrinker.contrib.django.ShrinkableCache` (tests/upstream/pyshrinker_django_settings.py);
* cachelib's ``tests/test_simple_cache.py`` with ``SimpleCache`` pointed at
  :class:`pyshrinker.contrib.cachelib.ShrinkableSimpleCache`
  (tests/upstream/pyshrinker_cachelib_plugin.py).

The sdists are downloaded once (pip, the pinned versions below, which pyproject.toml's ``test``
extra installs) into .cache/upstream/. Each suite runs in a subprocess and must pass; its counts
go to the run's "figures" section. An upstream test that fails for an intended difference would
be listed in ``INTENDED_FAILURES`` with docs/howto/django.md or flask.md naming it; today there
is none.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest

from .upstream.sources import sdist

pytestmark = pytest.mark.upstream

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ROOT / "tests" / "upstream"

DJANGO_VERSION = "5.2.19"
CACHELIB_VERSION = "0.17.0"

#: Upstream tests that fail for an intended difference (documented by name): none.
INTENDED_FAILURES: dict[str, frozenset[str]] = {"django": frozenset(), "cachelib": frozenset()}


def require_installed(distribution: str, version: str) -> None:
    """Fail unless ``distribution`` is installed at exactly the version whose tests we run."""
    try:
        found = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        if sys.version_info < (3, 11) and distribution == "cachelib":
            pytest.skip("cachelib 0.17 needs Python >= 3.11")
        pytest.fail(f"{distribution} is not installed: pip install -e '.[test]'")
    if found != version:
        pytest.fail(f"{distribution} {found} is installed; its tests are pinned to {version}")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ADAPTERS), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    )
    return env


def unittest_counts(output: str) -> dict[str, int]:
    """Counts from unittest's closing lines: ``Ran N tests`` and ``OK``/``FAILED (...)``."""
    ran = re.search(r"^Ran (\d+) tests?", output, re.M)
    assert ran, output[-3000:]
    status = re.search(r"^(OK|FAILED)(?: \((.*)\))?$", output, re.M)
    assert status, output[-3000:]
    details = dict(
        (name.strip().replace(" ", "_"), int(n))
        for name, n in re.findall(r"([a-z ]+)=(\d+)", status.group(2) or "")
    )
    counts = {
        "ran": int(ran.group(1)),
        "failed": details.get("failures", 0),
        "errors": details.get("errors", 0),
        "skipped": details.get("skipped", 0),
        "expected_failures": details.get("expected_failures", 0),
    }
    counts["passed"] = counts["ran"] - sum(
        counts[key] for key in ("failed", "errors", "skipped", "expected_failures")
    )
    return counts


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's closing line: ``60 passed, 2 failed in 3.1s``."""
    last = [line for line in output.splitlines() if re.search(r"\b(passed|failed|error)", line)]
    assert last, output[-3000:]
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0}
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed)", last[-1]):
        counts["errors" if what.startswith("error") else what] = int(n)
    return counts


def failed_names(output: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, output, re.M))


def test_django_cache_suite(report_figure: Callable[..., None]) -> None:
    """Django 5.2's tests/cache passes with LocMemCache replaced by ShrinkableCache."""
    require_installed("Django", DJANGO_VERSION)
    tests = sdist("Django", DJANGO_VERSION) / "tests"
    proc = subprocess.run(
        [
            sys.executable,
            "runtests.py",
            "cache",
            "--settings=pyshrinker_django_settings",
            "--parallel",
            "2",
            "--noinput",
        ],
        cwd=tests,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    counts = unittest_counts(output)
    report_figure(f"Django {DJANGO_VERSION} tests/cache on ShrinkableCache", **counts)
    failed = failed_names(output, r"^(?:FAIL|ERROR): (\S+ \(\S+\))")
    assert failed <= INTENDED_FAILURES["django"], output[-6000:]
    assert proc.returncode == 0 or failed, output[-6000:]
    # Our backend really served them: the suite's LocMemCache tests ran (60 of them).
    assert counts["passed"] >= 400, counts


def test_cachelib_simple_cache_suite(report_figure: Callable[..., None]) -> None:
    """cachelib's tests/test_simple_cache.py passes with SimpleCache replaced by ours."""
    require_installed("cachelib", CACHELIB_VERSION)
    root = sdist("cachelib", CACHELIB_VERSION)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "pyshrinker_cachelib_plugin",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rfE",
            "tests/test_simple_cache.py",
        ],
        cwd=root,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    counts = pytest_counts(output)
    report_figure(f"cachelib {CACHELIB_VERSION} tests/test_simple_cache.py on ours", **counts)
    failed = failed_names(output, r"^(?:FAILED|ERROR) (\S+)")
    assert failed <= INTENDED_FAILURES["cachelib"], output[-6000:]
    assert proc.returncode == 0 or failed, output[-6000:]
    assert counts["passed"] >= 60, counts
