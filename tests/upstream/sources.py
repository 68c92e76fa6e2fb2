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
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

#: The cachetools release whose test suite runs against our caches (pyproject's test extra
#: pins the same: 8.x needs Python 3.11).
CACHETOOLS_VERSION = "8.0.2" if sys.version_info >= (3, 11) else "7.3.3"
#: Where the sdists are kept: the repository's .cache/upstream (not committed), or
#: $PYSHRINKER_UPSTREAM_CACHE.
CACHE = Path(
    os.environ.get(
        "PYSHRINKER_UPSTREAM_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "upstream"
    )
)
#: The name the cachetools tests package is imported under (theirs is "tests", as ours).
CACHETOOLS_TESTS = "cachetools_upstream_tests"


class UpstreamMissing(RuntimeError):
    """An upstream suite cannot be had: the message says what to install."""


def sdist(distribution: str, version: str) -> Path:
    """The unpacked sdist of ``distribution==version`` under :data:`CACHE` (downloaded once)."""
    target = CACHE / f"{distribution.lower()}-{version}"
    if (target / "PKG-INFO").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"{distribution.lower()}-{version}.tar.gz"
    if not archive.is_file():
        # --no-binary for this distribution only: ":all:" would also build its build
        # dependencies (setuptools...) from source, for minutes.
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        done = subprocess.run(
            [*pip, "--no-binary", distribution, "--dest", str(CACHE), f"{distribution}=={version}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not archive.is_file():
            raise UpstreamMissing(
                f"cannot download the {distribution} {version} sdist into {CACHE}: "
                f"{done.stderr.strip()[-500:]}"
            )
    # Unpacked beside the target, then renamed: a half-unpacked tree is never taken for one.
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch, tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.10.12+, 3.11.4+
            tar.extractall(scratch, filter="data")
        else:
            tar.extractall(scratch)
        if target.exists():  # a tree left half-made by an older run: replaced
            shutil.rmtree(target)
        os.replace(os.path.join(scratch, target.name), target)
    return target


def cachetools_tests_dir() -> Path:
    """The cachetools sdist's tests/ directory, fetched and unpacked if not there yet."""
    return sdist("cachetools", CACHETOOLS_VERSION) / "tests"


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
