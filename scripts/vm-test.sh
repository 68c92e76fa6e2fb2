#!/usr/bin/env bash
# Runs the tests that need a real cgroup v2 kernel (markers v2 and vm) in a qemu guest.
#
# This machine binds the memory controller to cgroup v1, and that cannot change here; a guest
# kernel gives cgroup v2 with the memory controller (shared/KERNEL.md, section 7). virtme-ng
# boots Debian's kernel from /boot with this machine's root filesystem shared read-only over
# 9p (so the venv made on the host runs there) and one scratch directory writable. KVM does
# not work here: software emulation, about 20 s to boot, Python about 10x slower.
#
# In the guest, as root (with CAP_SYS_RESOURCE, so PSI's 500 ms windows are allowed): load
# FUSE, enable the memory controller for the root's children, then
#   pytest -m "v2 or vm" ARGS...
# with PYSHRINKER_VM=1 (the tests may fill the guest's memory and remount its cgroupfs).
# The output ends with pytest's own summary line. The exit status is pytest's; a guest that
# does not boot, or a run that does not finish in time, fails (status 1), never skips.
#
#   bash scripts/vm-test.sh [PYTEST ARGS...]
#
# Environment: PYSHRINKER_OUTCOMES=FILE copies the guest's per-test outcomes there (see
# tests/kernel_features.py); PYSHRINKER_REQUIRE_KERNEL is passed on (default 1);
# PYSHRINKER_VM_TIMEOUT (seconds, default 1200) bounds the whole guest run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z $kernel ]]; then
    echo "vm-test: no kernel in /boot (bash scripts/setup.sh installs linux-image-amd64)" >&2
    exit 1
fi
if [[ ! -x .venv/bin/vng ]]; then
    echo "vm-test: no virtme-ng in .venv (bash scripts/setup.sh installs it)" >&2
    exit 1
fi

scratch=$(mktemp -d /tmp/pyshrinker-vm.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

# The tests that need the guest: the files that use a v2 or vm marker or fixture (a test missed
# here passes in no stage, which scripts/test.sh's last stage reports as a failure).
mapfile -t files < <(grep -lE 'mark\.(v2|vm)\b|\bv2_(group|run)\b' tests/test_*.py)

# Python in the guest reads every module over 9p, with no cache, under emulation: importing
# pyshrinker takes 10 s there. So the stdlib, the venv's packages and the project are copied
# into the guest's memory and laid over their paths (overlayfs: what was not copied still
# reads from the host). Compiled here first: the guest's compiler is slow and cannot write.
stdlib=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
.venv/bin/python -m compileall -q "$stdlib" src tests examples >/dev/null 2>&1 || true
.venv/bin/python -m pytest --collect-only -q -p no:cacheprovider "${files[@]}" >/dev/null 2>&1 || true
tar -C / -cf "$scratch/fast.tar" \
    --exclude="${stdlib#/}/test" --exclude="${stdlib#/}/site-packages" \
    --exclude="${stdlib#/}/idlelib" --exclude="${stdlib#/}/tkinter" \
    --exclude="${stdlib#/}/lib2to3" --exclude="${stdlib#/}/ensurepip" \
    --exclude="${stdlib#/}/config-*" --exclude="${stdlib#/}/turtledemo" \
    --exclude=.git --exclude=docs/_build --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.hypothesis --exclude="${root#/}/.venvs" --exclude="${root#/}/build" \
    --exclude="${root#/}/.cache" --exclude='.venv/lib/python*/site-packages/'{numpy,matplotlib,mypy,sphinx,babel,fontTools,PIL,pillow,pip,setuptools,docutils,contourpy,kiwisolver,ruff,django}'*' \
    --exclude='.venv/lib/python*/site-packages/*mypyc*' \
    "${stdlib#/}" "${root#/}"

# The guest's environment is its own: everything it needs is written into the script it runs.
{
    echo 'set -u'
    echo "cd $(printf '%q' "$root")"
    echo 'modprobe fuse 2>/dev/null || true'
    echo 'mkdir -p /run/pyshrinker-fast && mount -t tmpfs -o size=1G fast /run/pyshrinker-fast'
    # A copy that does not fit (or any other failure here) ends the guest before the tests: a
    # half-unpacked tree laid over the real one would run truncated modules.
    echo "tar -C /run/pyshrinker-fast -xf $(printf '%q' "$scratch/fast.tar") || exit 1"
    for dir in "$stdlib" "$root"; do
        printf 'mount -t overlay overlay -o lowerdir=%q %q || exit 1\n' "/run/pyshrinker-fast$dir:$dir" "$dir"
    done
    echo 'echo +memory > /sys/fs/cgroup/cgroup.subtree_control'
    echo 'export PYSHRINKER_VM=1 PYSHRINKER_STAGE=guest PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1'
    echo 'export HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis'
    echo "export PYSHRINKER_REQUIRE_KERNEL=$(printf '%q' "${PYSHRINKER_REQUIRE_KERNEL:-1}")"
    # The allocator's memory.max there (tests/test_allocator.py): 128 MiB unless asked.
    echo "export PYSHRINKER_GUEST_LIMIT_MIB=$(printf '%q' "${PYSHRINKER_GUEST_LIMIT_MIB:-128}")"
    echo "export PYSHRINKER_OUTCOMES=$(printf '%q' "$scratch/outcomes.json")"
    printf '.venv/bin/python -m pytest -p no:cacheprovider -v --durations=15 -m "v2 or vm"'
    if (($#)); then printf ' %q' "$@"; else printf ' %q' "${files[@]}"; fi
    echo
    echo "echo \$? > $(printf '%q' "$scratch/status")"
} > "$scratch/guest.sh"

# Through a pipe: qemu opens the guest's output as a file, which truncates a log file we write to.
status=0
PATH="$root/.venv/bin:$PATH" timeout --kill-after=30 "${PYSHRINKER_VM_TIMEOUT:-1200}" \
    vng --run "$kernel" --disable-kvm --force-9p --disable-microvm --memory 3G --cpus 2 \
    --rwdir "$scratch" --exec "bash $scratch/guest.sh" </dev/null 2>&1 | cat || status=$?

if [[ ! -s $scratch/status ]]; then
    echo "vm-test: the guest did not finish its tests (vng exit status $status: no boot, or timed out)" >&2
    exit 1
fi
if [[ ! -s $scratch/outcomes.json ]]; then
    echo "vm-test: the guest's pytest wrote no outcomes (it did not run the tests)" >&2
    exit 1
fi
if [[ -n ${PYSHRINKER_OUTCOMES:-} ]]; then
    cp "$scratch/outcomes.json" "$PYSHRINKER_OUTCOMES"
fi
exit "$(cat "$scratch/status")"
