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
Finally the ``--no-shrinker`` allocator runs once in a 256 MiB group: it must be OOM-killed.

Every group is removed in a ``finally`` block once its process has exited. Figures are
printed, never asserted; the last line of output is one JSON object.

    python benchmarks/allocator.py            (as root, cgroup v1 memory hierarchy)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from typing import Any

from pyshrinker.cgroup import ManagedCgroupV1, v1_memory_available
from pyshrinker.controller import parse_size

HERE = os.path.dirname(os.path.abspath(__file__))
ALLOCATOR = os.path.join(os.path.dirname(HERE), "examples", "two_thread_allocator.py")
MiB = 1 << 20
LIMIT = 256 * MiB
UNLIMITED = 64 << 30
TARGET_RATIO = 0.70
RUN_TIMEOUT_S = 600.0


def _last_json(output: str) -> dict[str, Any] | None:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _outcome(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def run_once(label: str, limit: int, total: str, *, shrinker: bool = True) -> dict[str, Any]:
    """Run the allocator in a new group limited to ``limit``; the group is always removed."""
    name = f"pyshrinker-bench-{os.getpid()}-{label}"
    group = ManagedCgroupV1.create(name, limit)
    proc: subprocess.Popen[str] | None = None
    try:
        argv = [sys.executable, ALLOCATOR, "--total", total]
        if not shrinker:
            argv.append("--no-shrinker")
        proc = group.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by pid
            out, err = proc.communicate()
        figures = _last_json(out) or {}
        result = {
            "label": label,
            "limit_bytes": limit,
            "returncode": proc.returncode,
            "outcome": _outcome(proc.returncode),
            "oom_kill": group.read_keyed("memory.oom_control").get("oom_kill", 0),
            "max_usage_bytes": group.read_int("memory.max_usage_in_bytes"),
            "mib_per_s": figures.get("alloc_mib_per_s"),
            "seconds": figures.get("seconds"),
            "allocated_bytes": figures.get("allocated_bytes"),
            "requests": figures.get("requests"),
            "readded_chunks": figures.get("readded_chunks"),
        }
        if shrinker and proc.returncode != 0:
            result["stderr_tail"] = err[-2000:]
        return result
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        group.remove()


def _row(result: dict[str, Any]) -> str:
    rate = result["mib_per_s"]
    rate_text = f"{rate:8.1f} MiB/s" if rate is not None else "       - MiB/s"
    return (
        f"  {result['label']:<14} {rate_text}  {result['outcome']:<22} "
        f"oom_kill {result['oom_kill']}  peak {result['max_usage_bytes'] / MiB:7.1f} MiB "
        f"(limit {_limit_text(result['limit_bytes'])})  requests {result['requests']}"
    )


def _limit_text(limit: int) -> str:
    return f"{limit >> 30} GiB" if limit >= 1 << 30 else f"{limit / MiB:g} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", default="4G", help="bytes each run allocates (4G)")
    parser.add_argument("--rounds", type=int, default=3, help="limited/unlimited pairs (3)")
    args = parser.parse_args(argv)
    parse_size(args.total)  # fail early on a bad size
    if not v1_memory_available():
        print("needs root and a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory", flush=True)
        return 1

    print(
        f"two_thread_allocator.py --total {args.total} (1 MiB chunks), "
        f"limited to {LIMIT // MiB} MiB vs a {UNLIMITED >> 30} GiB group:",
        flush=True,
    )
    warmup = run_once("warm-up", UNLIMITED, args.total)
    print(_row(warmup) + "   (not counted)", flush=True)
    limited: list[dict[str, Any]] = []
    unlimited: list[dict[str, Any]] = []
    for i in range(1, args.rounds + 1):
        for kind, limit, runs in (("limited", LIMIT, limited), ("unlimited", UNLIMITED, unlimited)):
            result = run_once(f"{kind}-{i}", limit, args.total)
            runs.append(result)
            print(_row(result), flush=True)
    no_shrinker = run_once("no-shrinker", LIMIT, args.total, shrinker=False)
    print(_row(no_shrinker), flush=True)

    def rates(runs: list[dict[str, Any]]) -> list[float]:
        return [float(r["mib_per_s"]) for r in runs if r["returncode"] == 0 and r["mib_per_s"]]

    limited_rate = statistics.median(rates(limited)) if rates(limited) else 0.0
    unlimited_rate = statistics.median(rates(unlimited)) if rates(unlimited) else 0.0
    ratio = limited_rate / unlimited_rate if unlimited_rate else 0.0
    limited_peak = max(r["max_usage_bytes"] for r in limited)
    limited_ooms = sum(int(r["oom_kill"]) for r in limited)
    limited_failed = [r for r in limited + unlimited if r["returncode"] != 0]
    no_shrinker_killed = (
        int(no_shrinker["oom_kill"]) > 0 and no_shrinker["returncode"] == -signal.SIGKILL
    )
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(
        f"Medians: limited {limited_rate:.1f} MiB/s, unlimited {unlimited_rate:.1f} MiB/s, "
        f"ratio {ratio:.3f} (target >= {TARGET_RATIO:g}: {verdict})",
        flush=True,
    )
    print(
        f"Limited runs: peak usage {limited_peak / MiB:.1f} MiB of {LIMIT // MiB} MiB, "
        f"{limited_ooms} OOM kills; --no-shrinker in {LIMIT // MiB} MiB: "
        f"{no_shrinker['outcome']}, oom_kill {no_shrinker['oom_kill']} "
        f"({'OOM-killed' if no_shrinker_killed else 'NOT OOM-killed'})",
        flush=True,
    )
    for failed in limited_failed:
        print(f"  run {failed['label']} failed: {failed['outcome']}", flush=True)
        if failed.get("stderr_tail"):
            print(failed["stderr_tail"], flush=True)
    result = {
        "limited_mib_per_s": round(limited_rate, 1),
        "unlimited_mib_per_s": round(unlimited_rate, 1),
        "ratio": round(ratio, 3),
        "limited_max_usage_bytes": limited_peak,
        "limit_bytes": LIMIT,
        "limited_oom_kills": limited_ooms,
        "no_shrinker_oom_killed": no_shrinker_killed,
        "limited_runs_mib_per_s": [r["mib_per_s"] for r in limited],
        "unlimited_runs_mib_per_s": [r["mib_per_s"] for r in unlimited],
        "warmup_mib_per_s": warmup["mib_per_s"],
        "unlimited_limit_bytes": UNLIMITED,
        "failed_runs": [r["label"] for r in limited_failed],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
