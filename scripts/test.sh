#!/usr/bin/env bash
# Sets everything up and runs the test suite. Tests that need the real kernel (cgroup v1
# memory controller, PSI, FUSE) fail instead of skipping here: PYSHRINKER_REQUIRE_KERNEL=1.
#
# Two stages: the tests that need cgroup v2 with the memory controller (markers v2 and vm) run
# in a qemu guest (scripts/vm-test.sh), then everything else on this machine. Each stage writes
# what happened to every test; the last one fails unless every test passed in some stage, so a
# test that no stage can run does not pass unnoticed (tests/kernel_features.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYSHRINKER_SETUP_LRU_CI=1  # setup.sh: what scripts/lru_ci.sh needs, too
bash scripts/setup.sh
export PYSHRINKER_REQUIRE_KERNEL="${PYSHRINKER_REQUIRE_KERNEL:-1}"
.venv/bin/python -m ruff check src tests examples benchmarks
.venv/bin/python -m mypy
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

outcomes=$(mktemp -d /tmp/pyshrinker-outcomes.XXXXXX)
trap 'rm -rf "$outcomes"' EXIT
guest=0
start=$SECONDS
PYSHRINKER_OUTCOMES="$outcomes/guest.json" bash scripts/vm-test.sh "$@" || guest=$?
echo "test.sh: cgroup v2 guest stage: exit status $guest, $((SECONDS - start)) s"
# The LRU caches' stages (not when given pytest arguments): the tests on every other CPython
# >= 3.10, the whole suite under python3.11-dbg (its outcomes count like a stage's: the
# reference-count checks run only there), a leak check, ASan+UBSan and the fuzz.
lru=0
others="$outcomes/guest.json"
if (($# == 0)); then
    start=$SECONDS
    PYSHRINKER_DEBUG_OUTCOMES="$outcomes/debug.json" bash scripts/lru_ci.sh || lru=$?
    echo "test.sh: LRU stages: exit status $lru, $((SECONDS - start)) s"
    others="$others,$outcomes/debug.json"
fi
host=0
PYSHRINKER_OUTCOMES="$outcomes/host.json" PYSHRINKER_OTHER_OUTCOMES="$others" \
    .venv/bin/python -m pytest -m "not v2 and not vm" "$@" || host=$?
exit $((host ? host : guest ? guest : lru))
