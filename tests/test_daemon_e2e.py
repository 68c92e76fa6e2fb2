"""pyshrinkerd end to end: many processes in one 512 MiB cgroup v1 group, one daemon outside it.

Three Python processes each keep a ChunkCache filled (different sizes, chunk sizes and costs),
the C client (examples/c) allocates 1 MiB chunks, and a neighbour that registers nothing
allocates and frees 100 MiB again and again. The daemon watches the group (``--cgroup``) and
asks the shrinkers for memory as pressure comes. What must hold:

* nobody is OOM-killed (``memory.oom_control`` says ``oom_kill 0``, every process exits 0);
* the chunks asked of each process are in proportion to what it held divided by its cost:
  for each episode the status file records the counts the daemon saw, which processes it
  distrusted (a sixteenth of the weight) and what it asked, and the bytes asked of each process
  over the run are within 20 % of its proportional share;
* the counts the daemon keeps are the processes' real holdings (within one report batch).

Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from pyshrinker.daemon import Status
from pyshrinker.policy import DISTRUSTED_WEIGHT
from pyshrinker.transport import CONTROLLER_DIR_ENV

from .daemon_helpers import compile_c_client, running_daemons
from .helpers import reap

pytestmark = pytest.mark.kernel

MiB = 1 << 20
WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "daemon_workers.py")
SECONDS = 10.0

#: name, chunk size, cost, target MiB: weights (target / cost) 96, 64, 96 and the C client's 64.
CACHES = [
    ("A", 1 * MiB, 1.0, 96),
    ("B", 256 * 1024, 2.0, 128),
    ("C", 512 * 1024, 0.5, 48),
]
C_CLIENT_MIB = 64


def read_json_lines(procs: dict[str, subprocess.Popen[str]], want: dict[str, int], timeout: float):
    """Read stdout lines until each process has printed ``want[name]`` JSON lines."""
    got: dict[str, list[dict]] = defaultdict(list)
    selector = selectors.DefaultSelector()
    for name, proc in procs.items():
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), True)
        selector.register(proc.stdout, selectors.EVENT_READ, name)
    deadline = time.monotonic() + timeout
    pending = {name for name in procs if want.get(name, 0) > 0}
    while pending:
        left = deadline - time.monotonic()
        assert left > 0, f"no figures from {sorted(pending)} in time"
        for key, _ in selector.select(left):
            name = key.data
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                selector.unregister(key.fileobj)
                pending.discard(name)
                continue
            if line.startswith("{"):
                got[name].append(json.loads(line))
                if len(got[name]) >= want.get(name, 0):
                    selector.unregister(key.fileobj)
                    pending.discard(name)
    selector.close()
    return got


def proportions(status: Status) -> tuple[dict[int, float], dict[int, float], int]:
    """Bytes asked of each pid, and its proportional share of the same episodes' asks."""
    actual: dict[int, float] = defaultdict(float)
    expected: dict[int, float] = defaultdict(float)
    used = 0
    for episode in status.episodes:
        sizes = {(h.pid, h.efd): h.chunk_size for h in episode.holdings}
        # The policy's weights: held bytes / cost, a sixteenth for a process that let a round of
        # asks down this episode (its memory did not show as freed in time).
        weights = {
            (h.pid, h.efd): h.count
            * h.chunk_size
            / h.cost
            * (DISTRUSTED_WEIGHT if h.distrusted else 1)
            for h in episode.holdings
        }
        total_weight = sum(weights.values())
        asked_bytes = sum(chunks * sizes[(pid, efd)] for pid, efd, chunks in episode.asked)
        if total_weight <= 0 or asked_bytes <= 0:
            continue
        used += 1
        for pid, efd, chunks in episode.asked:
            actual[pid] += chunks * sizes[(pid, efd)]
        for (pid, _efd), weight in weights.items():
            expected[pid] += asked_bytes * weight / total_weight
    return actual, expected, used


class TestManyProcessesInOneGroup:
    """Three ChunkCache processes, the C client and a neighbour share a 512 MiB group."""

    def test_no_oom_and_proportional_asks(self, v1_group, tmp_path):
        """No OOM kill; each process asked within 20 % of held bytes / cost share."""
        group = v1_group(512 * MiB)
        c_client = compile_c_client(str(tmp_path))
        procs: dict[str, subprocess.Popen[str]] = {}
        with running_daemons(str(tmp_path)) as daemons:
            daemon = daemons.start(
                "--cgroup", group.path, "--status-history", "10000", test_control=False
            )
            env = dict(os.environ, **{CONTROLLER_DIR_ENV: daemon.mount})
            popen = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
            try:
                for name, chunk, cost, target in CACHES:
                    argv = ["cache", "--name", name, "--chunk-size", str(chunk)]
                    argv += ["--cost", str(cost), "--target-mib", str(target)]
                    argv += ["--rate-mib", "60", "--seconds", str(SECONDS)]
                    procs[name] = group.spawn([sys.executable, WORKERS, *argv], env=env, **popen)
                procs["c"] = group.spawn(
                    [c_client, "-r", "100", daemon.mount, str(C_CLIENT_MIB), str(SECONDS)],
                    **popen,
                )
                argv = ["neighbour", "--mib", "100", "--rate-mib", "200", "--hold", "0.7"]
                argv += ["--pause", "0.8", "--delay", "2", "--seconds", str(SECONDS - 2)]
                procs["neighbour"] = group.spawn([sys.executable, WORKERS, *argv], **popen)
                want = {name: 1 for name in procs}
                want["c"] = 2  # the "registered" line, then the figures
                figures = read_json_lines(procs, want, timeout=SECONDS + 60)
                status = daemon.status()
                for proc in procs.values():
                    assert proc.stdin is not None
                    proc.stdin.close()
                codes = {name: proc.wait(30) for name, proc in procs.items()}
            finally:
                for proc in procs.values():
                    reap(proc)
        oom = group.read_keyed("memory.oom_control")
        max_usage = group.read_int("memory.max_usage_in_bytes")
        pids = {name: figures[name][-1]["pid"] for name in procs}
        actual, expected, used = proportions(status)
        # For comparison: the shares the targets / costs alone would give (holdings vary).
        targets = {name: target * MiB / cost for name, _, cost, target in CACHES}
        targets["c"] = C_CLIENT_MIB * MiB
        all_asked = sum(actual.values()) or 1.0
        report = {
            "episodes": used,
            "requests": len(status.requests),
            "oom_kill": oom.get("oom_kill", 0),
            "max_usage_mib": round(max_usage / MiB, 1),
            "exit_codes": codes,
            "per_process": {
                name: {
                    "asked_mib": round(actual.get(pids[name], 0) / MiB, 1),
                    "expected_mib": round(expected.get(pids[name], 0) / MiB, 1),
                    "ratio": round(actual.get(pids[name], 0) / expected[pids[name]], 3)
                    if expected.get(pids[name])
                    else None,
                    "share_of_asked": round(actual.get(pids[name], 0) / all_asked, 3),
                    "target_share": round(targets[name] / sum(targets.values()), 3),
                }
                for name in [*(c[0] for c in CACHES), "c"]
            },
            "figures": {name: figures[name][-1] for name in procs},
        }
        print(json.dumps(report))

        assert oom.get("oom_kill", 0) == 0
        assert codes == {name: 0 for name in procs}
        assert used >= 3, "too few episodes to judge proportions"
        for name in [*(c[0] for c in CACHES), "c"]:
            ratio = report["per_process"][name]["ratio"]
            assert ratio is not None and 0.8 <= ratio <= 1.2, (name, report["per_process"])
        # What each cache says it was asked is what the daemon says it asked of it.
        for name, *_ in CACHES:
            mine = figures[name][-1]
            line = next(s for s in status.shrinkers if s.pid == mine["pid"])
            assert line.chunks_requested == mine["chunks_requested"]
            assert abs(line.count - mine["held"]) <= 0, (line, mine)
            assert mine["transport"] == "DirectoryTransport"
        final_c = figures["c"][-1]
        assert final_c["requests"] > 0 and final_c["report_errors"] == 0
