"""Where the upstream test suites come from, fetched and loaded once.

* cachetools: its ``tests/`` package from the released sdist of :data:`CACHETOOLS_VERSION`
  (the version the test extra pins), downloaded with pip into ``.cache/upstream/`` the first
  time and kept there. The installed cachetools must be that version (its tests test it too:
  ``cachetools.keys``, ``cachetools.cached``).
* CPython: ``test.test_functools`` of the running interpreter, its own test package (pyenv builds
  have it; Debian's python3.11-dbg needs the package libpython3.11-testsuite, which
  scripts/setup.sh installs).

Nothing is skipped when a source is missing: loading fails, and says what to install.

``python -m tests.upstream.sources`` fetches what is missing (scripts/setup.sh calls it).
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

#: The cachetools release whose test suite runs against our caches (pyproject's test extra
#: pins the same: 8.x needs Python 3.11).
CACHETOOLS_VERSION = "8.0.2" if sys.version_info >= (3, 11) else "7.3.3"
#: Where the sdists are kept: the repository's .cache/upstream (not committed).
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "upstream"
#: The name the cachetools tests package is imported under (theirs is "tests", as ours).
CACHETOOLS_TESTS = "cachetools_upstream_tests"


class UpstreamMissing(RuntimeError):
    """An upstream suite cannot be had: the message says what to install."""


def cachetools_tests_dir() -> Path:
    """The sdist's tests/ directory, fetched and unpacked if not there yet."""
    root = CACHE / f"cachetools-{CACHETOOLS_VERSION}"
    tests = root / "tests"
    if (tests / "__init__.py").is_file():
        return tests
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"cachetools-{CACHETOOLS_VERSION}.tar.gz"
    if not sdist.is_file():
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"cachetools=={CACHETOOLS_VERSION}",
                "-d",
                str(CACHE),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not sdist.is_file():
            raise UpstreamMissing(
                f"cannot download the cachetools {CACHETOOLS_VERSION} sdist into {CACHE}: "
                f"{done.stderr.strip()[-500:]}"
            )
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"{root.name}/tests/")]
        if hasattr(tarfile, "data_filter"):  # 3.10.12+, 3.11.4+
            tar.extractall(CACHE, members=members, filter="data")
        else:
            tar.extractall(CACHE, members=members)
    return tests


def load_cachetools_tests(*modules: str) -> list[ModuleType]:
    """cachetools' test modules (``test_lru``...), imported from the sdist as a package."""
    import cachetools

    if cachetools.__version__ != CACHETOOLS_VERSION:
        raise UpstreamMissing(
            f"cachetools {cachetools.__version__} is installed; the upstream suite is "
            f"{CACHETOOLS_VERSION}'s: pip install 'cachetools=={CACHETOOLS_VERSION}'"
        )
    if CACHETOOLS_TESTS not in sys.modules:
        tests = cachetools_tests_dir()
        spec = importlib.util.spec_from_file_location(
            CACHETOOLS_TESTS, tests / "__init__.py", submodule_search_locations=[str(tests)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules[CACHETOOLS_TESTS] = package
        spec.loader.exec_module(package)
    return [importlib.import_module(f"{CACHETOOLS_TESTS}.{name}") for name in modules]


def load_cpython_test_functools() -> ModuleType:
    """The running interpreter's own Lib/test/test_functools.py."""
    try:
        return importlib.import_module("test.test_functools")
    except ImportError as err:
        version = "{}.{}".format(*sys.version_info[:2])
        raise UpstreamMissing(
            f"{sys.executable} has no test.test_functools ({err}): install its test package "
            f"(Debian: apt-get install libpython{version}-testsuite)"
        ) from err


if __name__ == "__main__":
    print(cachetools_tests_dir())
