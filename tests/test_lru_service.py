"""examples/lru_service.py for real: serving in a 128 MiB group over a ~200 MB working set."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import queue
import select
import subprocess
import sys
import threading
from collections.abc import Callable
from types import ModuleType

import pytest

from pyshrinker.cgroup import ManagedCgroup, ManagedCgroupV1, ManagedCgroupV2

from .helpers import reap

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
SERVICE = os.path.join(HERE, os.pardir, "examples", "lru_service.py")
VALUE_SIZE = 100 * 1024


def load_service_module() -> ModuleType:
    """The example as a module, for its value_for() (what a correct answer is)."""
    spec = importlib.util.spec_from_file_location("lru_service_example", SERVICE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_port(proc: subprocess.Popen[str], timeout: float) -> int:
    """The port from the server's first line, ``listening on http://127.0.0.1:<port>``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the service did not start"
    line = proc.stdout.readline()
    assert line.startswith("listening on http://127.0.0.1:"), line
    return int(line.rsplit(":", 1)[1])


def drive(port: int, plan: list[str], clients: int, check: Callable[[str, bytes], bool]) -> dict:
    """Send every key of ``plan`` as GET /item/<key> from ``clients`` threads; tally answers."""
    work: queue.Queue[str] = queue.Queue()
    for key in plan:
        work.put(key)
    tally = {"ok": 0, "wrong": 0, "hits": 0, "errors": []}
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while True:
                try:
                    key = work.get_nowait()
                except queue.Empty:
                    return
                conn.request("GET", f"/item/{key}")
                response = conn.getresponse()
                body = response.read()
                with lock:
                    if response.status == 200 and check(key, body):
                        tally["ok"] += 1
                    else:
                        tally["wrong"] += 1
                    tally["hits"] += response.getheader("X-Cache") == "hit"
        except Exception as err:
            with lock:
                tally["errors"].append(repr(err))
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def serve_past_the_limit(group: ManagedCgroup) -> tuple[dict, dict]:
    """3,000 requests over 2,000 keys of 100 KiB to the service in ``group``: (tally, stats)."""
    service = load_service_module()
    proc = group.spawn(
        [
            sys.executable,
            SERVICE,
            "--port",
            "0",
            "--value-size",
            str(VALUE_SIZE),
            "--backend-latency",
            "0.002",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = read_port(proc, timeout=120)

        def check(key: str, body: bytes) -> bool:
            return body == service.value_for(key, VALUE_SIZE)

        # Every key once (2,000 x 100 KiB: ~200 MB, more than fits), then the most recent
        # 500 again and again: those fit, and should mostly be hits.
        keys = [f"item-{n}" for n in range(2000)]
        plan = keys + keys[-500:] * 2
        tally = drive(port, plan, clients=4, check=check)
        assert tally["errors"] == []
        assert tally["wrong"] == 0
        assert tally["ok"] == len(plan) == 3000
        assert tally["hits"] > 0

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/stats")
        stats = json.loads(conn.getresponse().read())
        conn.close()

        assert proc.poll() is None, "the service died"
        assert group.oom_kills() == 0
        assert group.peak() <= 128 * MiB
        assert stats["shrink_requests"] > 0
        assert stats["evicted_on_request"] > 0
        assert stats["entries"] < len(keys)
        return tally, stats
    finally:
        reap(proc, timeout=30)


class TestLRUService:
    """The caching service keeps answering correctly inside a memory limit."""

    @pytest.mark.v1
    def test_serves_past_the_limit(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """3,000 requests over 2,000 keys of 100 KiB in 128 MiB: all right, no OOM kill."""
        _, stats = serve_past_the_limit(v1_group(128 * MiB))
        assert any("memory: v1" in line for line in stats["signals"])

    @pytest.mark.v2
    def test_serves_past_a_v2_limit(
        self, v2_group: Callable[..., ManagedCgroupV2], report_figure: Callable[..., None]
    ) -> None:
        """The same in a cgroup v2 group with memory.max 128 MiB; the hit rate is reported."""
        group = v2_group(128 * MiB)
        tally, stats = serve_past_the_limit(group)
        report_figure(
            "LRU service, 3000 requests, memory.max 128 MiB",
            hit_rate=round(tally["hits"] / tally["ok"], 3),
            hits=tally["hits"],
            oom_kill=group.oom_kills(),
            peak_mib=round(group.peak() / MiB, 1),
            shrink_requests=stats["shrink_requests"],
            evicted_on_request=stats["evicted_on_request"],
        )
        assert any(f"memory: v2 {group.path}" in line for line in stats["signals"])
