#!/usr/bin/env bash
# Sets everything up and runs the test suite. Tests that need the real kernel (cgroup v1
# memory controller, PSI, FUSE) fail instead of skipping here: PYSHRINKER_REQUIRE_KERNEL=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYSHRINKER_SETUP_LRU_CI=1  # setup.sh: what scripts/lru_ci.sh needs, too
bash scripts/setup.sh
export PYSHRINKER_REQUIRE_KERNEL="${PYSHRINKER_REQUIRE_KERNEL:-1}"
.venv/bin/python -m ruff check src tests examples benchmarks
.venv/bin/python -m mypy
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
.venv/bin/python -m pytest "$@"
# The LRU caches' stages, after the whole suite (not when given pytest arguments): the tests on
# every CPython >= 3.10, the suite under python3.11-dbg, a leak check, ASan+UBSan and the fuzz.
if (($# == 0)); then bash scripts/lru_ci.sh; fi
