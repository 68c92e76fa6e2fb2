"""Throughput of the two-thread allocator inside a 256 MiB cgroup versus with no limit.

Runs ``examples/two_thread_allocator.py --total 4G`` (1 MiB chunks, every page touched)
in cgroup v1 memory groups this script creates with :class:`~pyshrinker.cgroup.ManagedCgroupV1`:

* *limited*: a group limited to 256 MiB. pyshrinker's controller in the allocator sees the
  limit and asks the listener thread to free old chunks, so the allocator churns 4 GiB through
  256 MiB without being OOM-killed.
* *unlimited*: a group limited to 64 GiB, more than the machine has (so never reached: the
  allocator keeps all 4 GiB). A group rather than no group at all, so that both runs pay the
  same memcg charging on every page fault and the controller arms the same kinds of signals
  (v1 usage thresholds, pressure levels, OOM notification); only the limit differs. Outside a
  created group the allocator would sit in whatever group this script runs in, whose limit and
  accounting are not ours to know or set.

On this VM the host backs fresh guest memory lazily, so the first run that touches 4 GiB is
much slower than later ones: a warm-up unlimited run comes first and is reported apart; then
limited and unlimited runs alternate (3 each) so drift on the shared machine hits both alike.
The throughput is the allocator's own figure (allocation loop only, not interpreter start-up).

Reading the ratio: the two runs do not touch the same memory. The unlimited run faults in 4 GiB
of distinct pages, freed only at exit, and this VM's balloon device has free page reporting
(VIRTIO_BALLOON_F_REPORTING), so the host takes back guest pages that stay free for a few
seconds and the next touch of them faults on the host again: the baseline varies with how long
the machine sat idle before it. The limited run recycles about 256 MiB of pages that are freed
and faulted in again within milliseconds. A ratio above 1 is therefore no speed-up by
pyshrinker; it says the limit costs less than the baseline's fresh-memory faults.
Then the ``--no-shrinker`` allocator runs once in a 256 MiB group: it must be OOM-killed.

Against an oracle (section ``oracle``). ``benchmarks/oracle_allocator.py`` is the same allocator
written by someone who knows the limit: a ring of 200 chunks, the oldest freed as each new one
comes, glibc's mmap threshold pinned so that each free is a munmap; no pyshrinker at all. It and
pyshrinker's allocator (``--total 4G``) alternate in one 256 MiB group, created once for the
section (its peak usage is reset before each run, its OOM-kill counter read as a difference), 5
runs each. The figure is whole-process wall time, measured here from spawn to exit, interpreter
start-up and imports included, because that is what pyshrinker costs a program of this shape;
the ratio is oracle time / pyshrinker time (target: at least 0.95). pyshrinker's bytecode is
written first, as an installed copy has it (see ``compile_package``).

Survival (section ``survival``): pyshrinker's allocator allocates 32 times the limit in groups of
48, 64, 128 and 256 MiB and 1 GiB; each must exit 0 with no OOM kill.

Every group is removed in a ``finally`` block once its process has exited. Group names start with
``--group-prefix`` (default ``$PYSHRINKER_CGROUP_PREFIX`` or ``pyshrinker-bench-``). Figures are
printed, never asserted; the last line of output is one JSON object.

    python benchmarks/allocator.py            (as root, cgroup v1 memory hierarchy)
    python benchmarks/allocator.py --sections oracle,survival
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from pyshrinker.cgroup import ManagedCgroupV1, v1_memory_available
from pyshrinker.controller import parse_size

HERE = os.path.dirname(os.path.abspath(__file__))
ALLOCATOR = os.path.join(os.path.dirname(HERE), "examples", "two_thread_allocator.py")
ORACLE = os.path.join(HERE, "oracle_allocator.py")
MiB = 1 << 20
LIMIT = 256 * MiB
UNLIMITED = 64 << 30
TARGET_RATIO = 0.70
TARGET_ORACLE_RATIO = 0.95
ORACLE_RING = 200
SURVIVAL_LIMITS = (48 * MiB, 64 * MiB, 128 * MiB, 256 * MiB, 1 << 30)
SURVIVAL_FACTOR = 32
SECTIONS = ("limit", "oracle", "survival", "no-shrinker")
RUN_TIMEOUT_S = 600.0
_prefix = os.environ.get("PYSHRINKER_CGROUP_PREFIX", "pyshrinker-bench-")


def _last_json(output: str) -> dict[str, Any] | None:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _outcome(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def new_group(label: str, limit: int) -> ManagedCgroupV1:
    """A v1 group of our own for ``label``, limited to ``limit``."""
    return ManagedCgroupV1.create(f"{_prefix}{os.getpid()}-{label}-{uuid.uuid4().hex[:6]}", limit)


def run_in(
    group: ManagedCgroupV1, label: str, total: str, *, shrinker: bool = True, oracle: bool = False
) -> dict[str, Any]:
    """Run the allocator (or the oracle) in ``group`` and collect its figures.

    The group's peak usage is reset first and its OOM kills counted as a difference, so a group
    can serve several runs one after the other.
    """
    group.write("memory.max_usage_in_bytes", "0")
    ooms_before = group.read_keyed("memory.oom_control").get("oom_kill", 0)
    if oracle:
        argv = [sys.executable, ORACLE, "--total", total, "--ring", str(ORACLE_RING)]
    else:
        argv = [sys.executable, ALLOCATOR, "--total", total]
        if not shrinker:
            argv.append("--no-shrinker")
    started = time.perf_counter()
    proc = group.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by pid
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - started
    figures = _last_json(out) or {}
    result = {
        "label": label,
        "limit_bytes": group.limit,
        "returncode": proc.returncode,
        "outcome": _outcome(proc.returncode),
        "oom_kill": group.read_keyed("memory.oom_control").get("oom_kill", 0) - ooms_before,
        "max_usage_bytes": group.read_int("memory.max_usage_in_bytes"),
        "wall_s": round(wall, 4),
        "mib_per_s": figures.get("alloc_mib_per_s"),
        "seconds": figures.get("seconds"),
        "allocated_bytes": figures.get("allocated_bytes"),
        "requests": figures.get("requests"),
        "readded_chunks": figures.get("readded_chunks"),
    }
    if (shrinker or oracle) and proc.returncode != 0:
        result["stderr_tail"] = err[-2000:]
    return result


def run_once(label: str, limit: int, total: str, *, shrinker: bool = True) -> dict[str, Any]:
    """Run the allocator in a new group limited to ``limit``; the group is always removed."""
    group = new_group(label, limit)
    try:
        return run_in(group, label, total, shrinker=shrinker)
    finally:
        group.remove()


def _row(result: dict[str, Any]) -> str:
    rate = result["mib_per_s"]
    rate_text = f"{rate:8.1f} MiB/s" if rate is not None else "       - MiB/s"
    return (
        f"  {result['label']:<14} {rate_text}  wall {result['wall_s']:6.2f} s  "
        f"{result['outcome']:<22} "
        f"oom_kill {result['oom_kill']}  peak {result['max_usage_bytes'] / MiB:7.1f} MiB "
        f"(limit {_limit_text(result['limit_bytes'])})  requests {result['requests']}"
    )


def _limit_text(limit: int) -> str:
    return f"{limit >> 30} GiB" if limit >= 1 << 30 else f"{limit / MiB:g} MiB"


def _rates(runs: list[dict[str, Any]]) -> list[float]:
    return [float(r["mib_per_s"]) for r in runs if r["returncode"] == 0 and r["mib_per_s"]]


def limit_section(total: str, rounds: int) -> dict[str, Any]:
    """256 MiB against a 64 GiB group, alternating, after a warm-up run."""
    print(
        f"two_thread_allocator.py --total {total} (1 MiB chunks), "
        f"limited to {LIMIT // MiB} MiB vs a {UNLIMITED >> 30} GiB group:",
        flush=True,
    )
    warmup = run_once("warm-up", UNLIMITED, total)
    print(_row(warmup) + "   (not counted)", flush=True)
    limited: list[dict[str, Any]] = []
    unlimited: list[dict[str, Any]] = []
    for i in range(1, rounds + 1):
        for kind, limit, runs in (("limited", LIMIT, limited), ("unlimited", UNLIMITED, unlimited)):
            result = run_once(f"{kind}-{i}", limit, total)
            runs.append(result)
            print(_row(result), flush=True)
    limited_rate = statistics.median(_rates(limited)) if _rates(limited) else 0.0
    unlimited_rate = statistics.median(_rates(unlimited)) if _rates(unlimited) else 0.0
    ratio = limited_rate / unlimited_rate if unlimited_rate else 0.0
    limited_peak = max(r["max_usage_bytes"] for r in limited)
    limited_ooms = sum(int(r["oom_kill"]) for r in limited)
    failed = [r for r in limited + unlimited if r["returncode"] != 0]
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(
        f"Medians: limited {limited_rate:.1f} MiB/s, unlimited {unlimited_rate:.1f} MiB/s, "
        f"ratio {ratio:.3f} (target >= {TARGET_RATIO:g}: {verdict}); limited peak usage "
        f"{limited_peak / MiB:.1f} MiB of {LIMIT // MiB} MiB, {limited_ooms} OOM kills",
        flush=True,
    )
    _print_failures(failed)
    return {
        "limited_mib_per_s": round(limited_rate, 1),
        "unlimited_mib_per_s": round(unlimited_rate, 1),
        "ratio": round(ratio, 3),
        "limited_max_usage_bytes": limited_peak,
        "limit_bytes": LIMIT,
        "limited_oom_kills": limited_ooms,
        "limited_runs_mib_per_s": [r["mib_per_s"] for r in limited],
        "unlimited_runs_mib_per_s": [r["mib_per_s"] for r in unlimited],
        "warmup_mib_per_s": warmup["mib_per_s"],
        "unlimited_limit_bytes": UNLIMITED,
        "failed_runs": [r["label"] for r in failed],
    }


def compile_package() -> None:
    """Write pyshrinker's bytecode, as installing it does, before timing whole processes.

    The oracle imports only the standard library, whose bytecode is on disk. pyshrinker checked
    out and installed editable has none until a run writes it, and with PYTHONDONTWRITEBYTECODE
    set (as on the project's machines) no run does: each child then compiled every module from
    source, some 75 ms that no installed copy pays.
    """
    import pyshrinker

    compileall.compile_dir(os.path.dirname(pyshrinker.__file__), quiet=1)


def oracle_section(total: str, rounds: int) -> dict[str, Any]:
    """pyshrinker's allocator against the oracle, alternating in one 256 MiB group."""
    compile_package()
    print(
        f"Against the oracle (ring of {ORACLE_RING} chunks, mmap threshold pinned), --total "
        f"{total}, alternating in one {LIMIT // MiB} MiB group; whole-process wall time:",
        flush=True,
    )
    group = new_group("oracle", LIMIT)
    oracle: list[dict[str, Any]] = []
    ours: list[dict[str, Any]] = []
    try:
        for i in range(1, rounds + 1):
            order = [("oracle", True), ("pyshrinker", False)]
            for kind, is_oracle in order if i % 2 else order[::-1]:
                result = run_in(group, f"{kind}-{i}", total, oracle=is_oracle)
                (oracle if is_oracle else ours).append(result)
                print(_row(result), flush=True)
    finally:
        group.remove()

    def walls(runs: list[dict[str, Any]]) -> list[float]:
        return [float(r["wall_s"]) for r in runs if r["returncode"] == 0]

    oracle_wall = statistics.median(walls(oracle)) if walls(oracle) else 0.0
    our_wall = statistics.median(walls(ours)) if walls(ours) else 0.0
    ratio = oracle_wall / our_wall if our_wall and len(walls(ours)) == len(ours) else 0.0
    paired = [
        a["wall_s"] / b["wall_s"]
        for a, b in zip(oracle, ours, strict=True)
        if a["returncode"] == 0 and b["returncode"] == 0
    ]
    paired_ratio = statistics.median(paired) if paired else 0.0
    failed = [r for r in oracle + ours if r["returncode"] != 0]
    verdict = "met" if ratio >= TARGET_ORACLE_RATIO else "MISSED"
    print(
        f"Medians: oracle {oracle_wall:.3f} s, pyshrinker {our_wall:.3f} s: pyshrinker at "
        f"{ratio:.3f} of the oracle (paired {paired_ratio:.3f}; target >= "
        f"{TARGET_ORACLE_RATIO:g}: {verdict}); pyshrinker peak usage "
        f"{max(r['max_usage_bytes'] for r in ours) / MiB:.1f} MiB, "
        f"{sum(int(r['oom_kill']) for r in ours)} OOM kills",
        flush=True,
    )
    _print_failures(failed)
    return {
        "oracle_ratio": round(ratio, 3),
        "oracle_paired_ratio": round(paired_ratio, 3),
        "oracle_wall_s": round(oracle_wall, 3),
        "pyshrinker_wall_s": round(our_wall, 3),
        "oracle_runs_wall_s": [r["wall_s"] for r in oracle],
        "pyshrinker_runs_wall_s": [r["wall_s"] for r in ours],
        "oracle_mib_per_s": statistics.median(_rates(oracle)) if _rates(oracle) else 0.0,
        "pyshrinker_mib_per_s": statistics.median(_rates(ours)) if _rates(ours) else 0.0,
        "pyshrinker_max_usage_bytes": max(r["max_usage_bytes"] for r in ours),
        "oracle_failed_runs": [r["label"] for r in failed],
    }


def survival_section() -> dict[str, Any]:
    """The allocator at 32 times the limit in groups of 48 MiB to 1 GiB."""
    print(f"Survival: {SURVIVAL_FACTOR} times the limit in each group:", flush=True)
    rows = []
    for limit in SURVIVAL_LIMITS:
        total = str(SURVIVAL_FACTOR * limit)
        result = run_once(f"survive-{limit >> 20}M", limit, total)
        print(_row(result), flush=True)
        rows.append(result)
    survived = all(r["returncode"] == 0 and r["oom_kill"] == 0 for r in rows)
    print(f"Survived in every group: {'yes' if survived else 'NO'}", flush=True)
    _print_failures([r for r in rows if r["returncode"] != 0])
    return {
        "survival": [
            {
                "limit_bytes": r["limit_bytes"],
                "allocated_bytes": r["allocated_bytes"],
                "outcome": r["outcome"],
                "oom_kill": r["oom_kill"],
                "max_usage_bytes": r["max_usage_bytes"],
                "mib_per_s": r["mib_per_s"],
            }
            for r in rows
        ],
        "survived_all": survived,
    }


def no_shrinker_section(total: str) -> dict[str, Any]:
    """The allocator with pyshrinker off in 256 MiB: it must be OOM-killed."""
    result = run_once("no-shrinker", LIMIT, total, shrinker=False)
    print(_row(result), flush=True)
    killed = int(result["oom_kill"]) > 0 and result["returncode"] == -signal.SIGKILL
    print(
        f"--no-shrinker in {LIMIT // MiB} MiB: {result['outcome']}, oom_kill {result['oom_kill']} "
        f"({'OOM-killed' if killed else 'NOT OOM-killed'})",
        flush=True,
    )
    return {"no_shrinker_oom_killed": killed}


def _print_failures(failed: list[dict[str, Any]]) -> None:
    for run in failed:
        print(f"  run {run['label']} failed: {run['outcome']}", flush=True)
        if run.get("stderr_tail"):
            print(run["stderr_tail"], flush=True)


def main(argv: list[str] | None = None) -> int:
    global _prefix
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", default="4G", help="bytes each run allocates (4G)")
    parser.add_argument("--rounds", type=int, default=3, help="limited/unlimited pairs (3)")
    parser.add_argument("--oracle-rounds", type=int, default=5, help="oracle/pyshrinker pairs (5)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--group-prefix", default=_prefix, help="name prefix of created groups")
    args = parser.parse_args(argv)
    parse_size(args.total)  # fail early on a bad size
    sections = [each for each in args.sections.split(",") if each]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {sorted(unknown)}")
    _prefix = args.group_prefix
    if not v1_memory_available():
        print("needs root and a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory", flush=True)
        return 1

    result: dict[str, Any] = {}
    if "limit" in sections:
        result.update(limit_section(args.total, args.rounds))
    if "oracle" in sections:
        result.update(oracle_section(args.total, args.oracle_rounds))
    if "survival" in sections:
        result.update(survival_section())
    if "no-shrinker" in sections:
        result.update(no_shrinker_section(args.total))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
