"""The README's demo: the two-thread allocator inside a 256 MiB memory cgroup.

Creates a cgroup v1 memory group limited to 256 MiB, runs ``two_thread_allocator.py --total 8G``
in it with pyshrinker (it must finish, never OOM-killed, peak usage under the limit), then the
same allocator with ``--no-shrinker`` (the kernel's OOM killer ends it), and removes the group.
Where no group can be created (not root, no v1 memory controller) it runs the allocator under a
process budget of the same size instead (``PYSHRINKER_BUDGET``), and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

from pyshrinker.cgroup import ManagedCgroupV1, v1_memory_available
from pyshrinker.controller import parse_size

HERE = os.path.dirname(os.path.abspath(__file__))
ALLOCATOR = os.path.join(HERE, "two_thread_allocator.py")


def _last_json(output: str) -> dict[str, object] | None:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def run_in_cgroup(limit: int, total: str, shrinker: bool) -> dict[str, object]:
    """Run the allocator once in a fresh group; return its figures and the group's."""
    name = f"pyshrinker-demo-{os.getpid()}-{'on' if shrinker else 'off'}"
    with ManagedCgroupV1.create(name, limit) as group:
        argv = [sys.executable, ALLOCATOR, "--total", total]
        if not shrinker:
            argv.append("--no-shrinker")
        proc = group.spawn(argv, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate()
        figures = _last_json(out) or {}
        return {
            "run": "with pyshrinker" if shrinker else "without pyshrinker",
            "outcome": _describe(proc.returncode),
            "returncode": proc.returncode,
            "oom_kill": group.read_keyed("memory.oom_control").get("oom_kill", 0),
            "max_usage_mib": round(group.read_int("memory.max_usage_in_bytes") / 2**20, 1),
            "limit_mib": limit // 2**20,
            "allocated_mib": int(figures.get("allocated_bytes", 0)) // 2**20,  # type: ignore[call-overload]
            "alloc_mib_per_s": figures.get("alloc_mib_per_s"),
            "requests": figures.get("requests"),
        }


def run_with_budget(limit: int, total: str) -> dict[str, object]:
    """No cgroup available: the same allocator steered by a process budget."""
    env = dict(os.environ, PYSHRINKER_BUDGET=str(limit))
    proc = subprocess.run(
        [sys.executable, ALLOCATOR, "--total", total], env=env, stdout=subprocess.PIPE, text=True
    )
    figures = _last_json(proc.stdout) or {}
    return {
        "run": "with pyshrinker, process budget",
        "outcome": _describe(proc.returncode),
        **figures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", default="256M", help="memory limit of the group (256M)")
    parser.add_argument("--total", default="8G", help="bytes the allocator allocates (8G)")
    args = parser.parse_args()
    limit = parse_size(args.limit)
    if not v1_memory_available():
        print(
            "No cgroup v1 memory group can be created here (not root, or no v1 memory "
            "controller): running under a process budget of "
            f"{limit // 2**20} MiB instead (no hard limit, so nothing can be OOM-killed).",
            flush=True,
        )
        result = run_with_budget(limit, args.total)
        print(json.dumps(result))
        return 0 if result["outcome"] == "exit status 0" else 1
    print(
        f"Allocating {args.total} in 1 MiB chunks inside a {limit // 2**20} MiB cgroup...",
        flush=True,
    )
    with_ = run_in_cgroup(limit, args.total, shrinker=True)
    print(
        f"  with pyshrinker:    {with_['outcome']}, oom_kill {with_['oom_kill']}, "
        f"peak {with_['max_usage_mib']} MiB of {with_['limit_mib']} MiB, "
        f"{with_['allocated_mib']} MiB allocated at {with_['alloc_mib_per_s']} MiB/s, "
        f"{with_['requests']} shrink requests",
        flush=True,
    )
    without = run_in_cgroup(limit, args.total, shrinker=False)
    print(
        f"  without pyshrinker: {without['outcome']}, oom_kill {without['oom_kill']}, "
        f"peak {without['max_usage_mib']} MiB of {without['limit_mib']} MiB",
        flush=True,
    )
    print(json.dumps({"with_shrinker": with_, "without_shrinker": without}))
    ok = with_["returncode"] == 0 and with_["oom_kill"] == 0 and without["oom_kill"] != 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
