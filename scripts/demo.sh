#!/usr/bin/env bash
# Sets everything up and runs the main demo: the two-thread allocator inside a 256 MiB memory
# cgroup, with pyshrinker and then without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
