#!/usr/bin/env bash
# Sets everything up and runs the test suite. Tests that need the real kernel (cgroup v1
# memory controller, PSI, FUSE) fail instead of skipping here: PYSHRINKER_REQUIRE_KERNEL=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYSHRINKER_REQUIRE_KERNEL="${PYSHRINKER_REQUIRE_KERNEL:-1}"
.venv/bin/python -m ruff check src tests examples benchmarks
.venv/bin/python -m mypy
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
exec .venv/bin/python -m pytest "$@"
