#!/usr/bin/env bash
# Sets up a development environment in .venv: system packages (as root, when missing), then
# pyshrinker with its test and benchmark extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v gcc >/dev/null || need_apt+=(gcc)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || need_apt+=(python3-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# pyshrinkerd (the daemon extra) mounts FUSE: libfuse3 and fusermount3 come with fuse3.
[[ -x /usr/bin/fusermount3 ]] || command -v fusermount3 >/dev/null || need_apt+=(fuse3)
# scripts/vm-test.sh (the cgroup v2 stage of the tests) boots Debian's kernel under qemu with
# virtme-ng, which packs a static busybox into the guest's initramfs.
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
compgen -G '/boot/vmlinuz-*' >/dev/null || need_apt+=(linux-image-amd64)
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' \
    || need_apt+=(busybox-static)
if ((${#need_apt[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
    else
        echo "setup: please install: ${need_apt[*]}" >&2
        exit 1
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q -e '.[dev]'
# The upstream test suites' sources (tests/upstream/sources.py): the pinned cachetools sdist.
.venv/bin/python -m tests.upstream.sources >/dev/null
# virtme-ng boots the test guest (scripts/vm-test.sh); a test tool, not a dependency.
[[ -x .venv/bin/vng ]] || .venv/bin/python -m pip install -q virtme-ng

# The LRU caches' CI stages (scripts/lru_ci.sh, run by scripts/test.sh, which asks for them with
# PYSHRINKER_SETUP_LRU_CI=1): python3.11-dbg through apt and a venv per CPython in .venvs/.
if [[ ${PYSHRINKER_SETUP_LRU_CI:-} == 1 ]]; then
    bash scripts/lru_ci.sh setup
fi
