#!/usr/bin/env bash
# The LRU caches' CI stages (issue 8), run by scripts/test.sh after the main suite:
#
#   bash scripts/lru_ci.sh setup        install what the stages need (called by scripts/setup.sh):
#                                       python3.11-dbg through apt (as root), and a venv per
#                                       interpreter in .venvs/ with the test dependencies
#   bash scripts/lru_ci.sh [STAGE...]   run every stage, or the ones named:
#     pythons  the tests not marked `kernel`, on every CPython >= 3.10 under pyenv (with them the
#              upstream suites of tests/upstream: cachetools', and that CPython's lru_cache tests)
#     debug    the whole suite under python3.11-dbg, with _lru.c built with Py_DEBUG
#     leaks    the refcount and memory-block check of every LRU operation (tests/test_lru_leaks.py)
#              under python3.11-dbg, $PYSHRINKER_LEAK_ITERATIONS times each (10000, in 3 rounds)
#     asan     _lru.c built with AddressSanitizer and UndefinedBehaviorSanitizer: the LRU tests,
#              then the stateful fuzz (tests/test_lru_fuzz.py) for $PYSHRINKER_FUZZ_SECONDS (150)
#
# Each interpreter gets its own build of _lru.c (warnings are errors) in build/lru-ci/NAME, a copy
# of the package that PYTHONPATH puts first; src/ and .venv are left alone. A stage that finds a
# problem, or cannot run (an interpreter, a package or the sanitizer runtime missing), fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PYENV_VERSIONS=${PYENV_ROOT:-/root/.pyenv}/versions
#: The CPython versions the `pythons` stage must find (newer ones found are run too).
REQUIRED_MINORS=(3.10 3.11 3.12 3.13)
DEBUG_PYTHON=/usr/bin/python3.11-dbg
BUILD=build/lru-ci

log() { printf 'lru-ci: %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# The newest pyenv CPython of each minor version >= 3.10: "3.10 /root/.pyenv/versions/3.10.13".
pyenv_pythons() {
    [[ -d $PYENV_VERSIONS ]] || return 0
    local dir
    for dir in "$PYENV_VERSIONS"/3.*; do
        [[ -x $dir/bin/python3 ]] || continue
        basename "$dir"
    done | grep -E '^3\.[0-9]+\.[0-9]+$' | sort -t. -k1,1n -k2,2n -k3,3n \
        | awk -F. -v root="$PYENV_VERSIONS" '$2 >= 10 { newest[$1 "." $2] = $0 }
            END { for (m in newest) print m, root "/" newest[m] }' | sort -t. -k2,2n
}

# The test dependencies, from pyproject.toml: the runtime ones and the test, metrics, plot and
# daemon extras (what the suite imports), one per line.
test_dependencies() {
    .venv/bin/python - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for dep in project["dependencies"] + [d for name in ("test", "metrics", "plot", "daemon") for d in extras[name]]:
    print(dep)
EOF
}

# Create venv $1 with interpreter $2 (again if the interpreter changed) and the dependencies.
make_venv() {
    local venv=$1 python=$2 deps stamp
    deps=$(test_dependencies)
    stamp="$python $("$python" -c 'import sys; print(sys.version)' | head -1) $(echo "$deps" | sha1sum)"
    if [[ -f $venv/.lru-ci-stamp && $(cat "$venv/.lru-ci-stamp") == "$stamp" ]]; then
        return 0
    fi
    log "setting up $venv ($python)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    # A requirements file: a dependency may have an environment marker, with spaces in it.
    echo "$deps" >"$venv/lru-ci-requirements.txt"
    "$venv/bin/python" -m pip install -q --no-compile -r "$venv/lru-ci-requirements.txt" 2>&1 | { grep -v -E '^WARNING: Location|ResourceWarning|_get_index_content' || true; } >&2
    # The package itself, editable, for its console scripts (which the tests run): the stages
    # put their own build first on PYTHONPATH.
    "$venv/bin/python" -m pip install -q --no-deps -e . 2>&1 | { grep -v -E '^WARNING: Location' || true; } >&2
    "$venv/bin/python" -c 'import cffi, attrs, pytest, hypothesis, cachetools'
    # The cachetools sdist whose tests run on this interpreter (tests/upstream/sources.py).
    "$venv/bin/python" -m tests.upstream.sources >/dev/null
    echo "$stamp" >"$venv/.lru-ci-stamp"
}

setup() {
    local need_apt=()
    [[ -x $DEBUG_PYTHON ]] || need_apt+=(python3.11-dbg)
    if [[ -x $DEBUG_PYTHON ]] && ! "$DEBUG_PYTHON" -c 'import ensurepip' 2>/dev/null; then
        need_apt+=(python3.11-venv)
    fi
    # CPython's own lru_cache tests (tests/upstream/test_functools_suite.py) are the running
    # interpreter's Lib/test/test_functools.py: Debian ships them apart.
    [[ -f /usr/lib/python3.11/test/test_functools.py ]] || need_apt+=(libpython3.11-testsuite)
    if ((${#need_apt[@]})); then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" python3.11-venv >/dev/null
        else
            log "not installed (needs root and apt): ${need_apt[*]}; the debug stages will fail"
        fi
    fi
    [[ -x $DEBUG_PYTHON ]] && make_venv .venvs/dbg "$DEBUG_PYTHON"
    local minor python
    while read -r minor python; do
        make_venv ".venvs/py$minor" "$python/bin/python3"
    done < <(pyenv_pythons)
    return 0
}

# A copy of the package for venv $1 in $BUILD/$2, with _lru.c (and _eventfd_fast.c, the other
# CPython extension) compiled for its interpreter; more compiler flags after. Prints the directory to put on PYTHONPATH.
build_package() {
    local python=$1/bin/python name=$2 dir=$BUILD/$2
    shift 2
    [[ -x $python ]] || die "$name: no $python (run: bash scripts/lru_ci.sh setup)"
    local include suffix
    include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    [[ -f src/pyshrinker/_native.abi3.so ]] || die "no src/pyshrinker/_native.abi3.so (run scripts/setup.sh)"
    rm -rf "$dir"
    mkdir -p "$dir"
    cp -r src/pyshrinker "$dir/"
    # _native is the abi3 build scripts/setup.sh just made (one for every interpreter), not the
    # one an editable install in .venvs/ made long ago for a single interpreter.
    find "$dir/pyshrinker" -maxdepth 1 -name '*.so' ! -name '_native.abi3.so' -delete
    gcc -shared -fPIC -g -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
        -Werror -I"$include" "$@" src/pyshrinker/_lru.c -o "$dir/pyshrinker/_lru$suffix" \
        || die "$name: _lru.c does not build cleanly"
    gcc -shared -fPIC -g -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
        -Werror -I"$include" "$@" src/pyshrinker/_eventfd_fast.c \
        -o "$dir/pyshrinker/_eventfd_fast$suffix" \
        || die "$name: _eventfd_fast.c does not build cleanly"
    echo "$dir"
}

# Run pytest with venv $1 on package copy $2; more pytest arguments after.
run_pytest() {
    local venv=$1 path=$2
    shift 2
    PYTHONPATH=$path "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
}

# Fail unless venv $1's python imports the _lru built in $2 (and not another one).
check_lru_from() {
    local where
    where=$(PYTHONPATH=$2 "$1/bin/python" -c 'import pyshrinker._lru as m; print(m.__file__)')
    [[ $where == "$PWD/$2/"* || $where == "$2/"* ]] || die "$1 imports $where, not the build in $2"
}

# The tests that need no real-kernel feature (tests/kernel_features.py's markers). Nor the
# frameworks' own suites (marker upstream): they test Python code, and run in the host stage.
NO_KERNEL="not kernel and not v1 and not v2 and not psi and not fuse and not vm and not upstream"

stage_pythons() {
    local found=() minor python
    while read -r minor python; do
        found+=("$minor")
    done < <(pyenv_pythons)
    for minor in "${REQUIRED_MINORS[@]}"; do
        [[ " ${found[*]} " == *" $minor "* ]] || die "pythons: no CPython $minor under $PYENV_VERSIONS"
    done
    local main_minor
    main_minor=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    for minor in "${found[@]}"; do
        if [[ $minor == "$main_minor" ]]; then
            log "pythons: $minor runs the whole suite already (.venv)"
            continue
        fi
        local venv=.venvs/py$minor path
        path=$(build_package "$venv" "py$minor" -O2)
        check_lru_from "$venv" "$path"
        log "pythons: $("$venv/bin/python" -V) : tests not marked kernel"
        run_pytest "$venv" "$path" -m "$NO_KERNEL" || die "pythons: the tests fail on CPython $minor"
    done
}

stage_debug() {
    local venv=.venvs/dbg path
    path=$(build_package "$venv" dbg -O0)
    "$venv/bin/python" -c 'import sys; assert hasattr(sys, "gettotalrefcount")' \
        || die "debug: $venv is not a debug CPython"
    check_lru_from "$venv" "$path"
    log "debug: $("$venv/bin/python" -V) (Py_DEBUG) : the whole suite"
    # The guest's tests (v2, vm) run in the guest stage only; the frameworks' own suites
    # (upstream: Python code) in the host stage only.
    PYSHRINKER_REQUIRE_REFCOUNTS=1 PYSHRINKER_LEAK_ITERATIONS=300 PYSHRINKER_STAGE=debug \
        PYSHRINKER_OUTCOMES=${PYSHRINKER_DEBUG_OUTCOMES:-} run_pytest "$venv" "$path" \
        -m "not v2 and not vm and not upstream" || die "debug: the suite fails under python3.11-dbg"
}

stage_leaks() {
    local venv=.venvs/dbg path
    path=$(build_package "$venv" dbg -O0)
    check_lru_from "$venv" "$path"
    local iterations=${PYSHRINKER_LEAK_ITERATIONS:-10000}
    log "leaks: every LRU operation $iterations times under $("$venv/bin/python" -V) (Py_DEBUG)"
    PYSHRINKER_REQUIRE_REFCOUNTS=1 PYSHRINKER_LEAK_ITERATIONS=$iterations \
        run_pytest "$venv" "$path" tests/test_lru_leaks.py || die "leaks: an operation leaks"
}

stage_asan() {
    local asan ubsan path
    asan=$(gcc -print-file-name=libasan.so)
    ubsan=$(gcc -print-file-name=libubsan.so)
    [[ -f $asan && -f $ubsan ]] || die "asan: gcc has no libasan/libubsan runtime"
    path=$(build_package .venv asan -O1 -fno-omit-frame-pointer \
        -fsanitize=address,undefined -fno-sanitize-recover=all)
    # The interpreter is not instrumented: the runtime is preloaded. PYTHONMALLOC=malloc sends
    # every allocation (the core's nodes and index included) to malloc, where ASan sees it.
    # Python keeps much of its memory until exit by design: leak detection is off.
    local -x LD_PRELOAD=$asan PYTHONMALLOC=malloc
    local -x ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:exitcode=99
    local -x UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
    PYTHONPATH=$path .venv/bin/python -c '
import pyshrinker._lru as m, sys
maps = open("/proc/self/maps").read()
assert "libasan" in maps and "libubsan" in maps, "sanitizer runtimes not loaded"
print("asan:", m.__file__)' || die "asan: the instrumented build is not the one loaded"
    log "asan: the LRU tests under ASan+UBSan"
    # --capture=sys: a sanitizer's report is written to file descriptor 2, which must reach us.
    run_pytest .venv "$path" --capture=sys tests/test_lru.py tests/test_lru_safety.py \
        tests/test_shrinkable_cache.py tests/test_lru_accounting.py tests/test_lru_fuzz.py \
        tests/upstream \
        || die "asan: the LRU tests fail under the sanitizers"
    local seconds=${PYSHRINKER_FUZZ_SECONDS:-150}
    log "asan: the stateful fuzz for $seconds s"
    PYTHONPATH=$path .venv/bin/python -m tests.test_lru_fuzz --seconds "$seconds" \
        || die "asan: the fuzz found a problem"
}

if [[ ${1:-} == setup ]]; then
    setup
    exit 0
fi
stages=("$@")
((${#stages[@]})) || stages=(pythons debug leaks asan)
for stage in "${stages[@]}"; do
    declare -F "stage_$stage" >/dev/null || die "no stage $stage (pythons, debug, leaks, asan)"
    start=$SECONDS
    "stage_$stage"
    log "$stage: passed in $((SECONDS - start)) s"
done
