"""pyshrinkerd's own cost: lines per second through FUSE, and how fast pressure becomes a request.

Starts its own daemon (as a child, mounted on a temporary directory, unmounted at the end) and
measures:

1. **Throughput.** ``"<efd> <N>"`` report lines per second from one writer (this process, one
   ``os.write`` per line, each a FUSE request the daemon answers), and from two writer processes
   at once; the daemon's CPU time per line (from ``/proc/<pid>/stat``). Registrations plus
   unregistrations per second (each registration is a ``pidfd_getfd`` and two /proc reads).
   Request round trips per second: a ``mempressure.request`` line (``--test-control``) makes the
   daemon write the eventfd, this process reads it and re-adds the chunk (two FUSE writes and an
   eventfd read per request), plus the time from the request line's ``write(2)`` to the eventfd
   becoming readable.
2. **Latency from a pressure signal to the eventfd write**, on the real kernel: a second daemon
   watches a 256 MiB cgroup v1 group (``--cgroup``); a child in the group registers a shrinker,
   registers its *own* usage-threshold eventfds on the group at the daemon's thresholds (the
   high watermark and halfway to the limit, read from the status file), and allocates 1 MiB at
   a time (5 ms apart) until a request comes, frees what it is asked, and again. The kernel
   signals all threshold eventfds of a crossing together, so the child's threshold wake-up time
   is (within a wake-up) when the daemon heard the signal. From the status file's request times
   (CLOCK_MONOTONIC, after the eventfd write) it reports signal -> eventfd write, and eventfd
   write -> the client's wake-up. Needs root and cgroup v1; skipped (and said so) otherwise.

The machine is shared and noisy: figures are printed, never asserted. The last line of output is
one JSON object.

    python benchmarks/daemon.py
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from pyshrinker.cgroup import ManagedCgroupV1, v1_memory_available
from pyshrinker.daemon import REQUEST_FILE, DaemonProcess, fuse_unavailable
from pyshrinker.signals.v1 import UsageThreshold
from pyshrinker.transport import FilesTransport

MiB = 1 << 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_us(seconds: list[float]) -> dict[str, float]:
    """Median, p90, p99 and max of durations, in microseconds."""
    us = [s * 1e6 for s in seconds]
    if not us:
        return {"samples": 0}
    return {
        "samples": len(us),
        "median_us": round(statistics.median(us), 1),
        "p90_us": round(percentile(us, 0.90), 1),
        "p99_us": round(percentile(us, 0.99), 1),
        "max_us": round(max(us), 1),
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------- throughput


def writer_child(mount: str, lines: int) -> None:
    """A second writer process: register, report ``lines`` lines, print the rate."""
    with FilesTransport.open(mount) as transport:
        efd = os.eventfd(0)
        transport.register(efd, 4096, 1.0)
        start = time.perf_counter()
        for _ in range(lines):
            transport.report(efd, 1)
        elapsed = time.perf_counter() - start
        transport.unregister(efd)
    print(json.dumps({"lines": lines, "seconds": elapsed}), flush=True)


def throughput(daemon: DaemonProcess, lines: int) -> dict[str, object]:
    """Report lines/s (one and two writers), registrations/s, request round trips/s."""
    mount = daemon.mount
    out: dict[str, object] = {}
    with FilesTransport.open(mount) as transport:
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        transport.register(efd, 4096, 1.0)
        for _ in range(500):  # warm up
            transport.report(efd, 1)
        cpu0 = cpu_seconds(daemon.pid)
        start = time.perf_counter()
        for _ in range(lines):
            transport.report(efd, 1)
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(daemon.pid) - cpu0
        out["report_lines_per_s_1_writer"] = round(lines / elapsed)
        out["report_us_per_line_1_writer"] = round(elapsed / lines * 1e6, 1)
        out["daemon_cpu_us_per_line"] = round(cpu / lines * 1e6, 1)

        # Two writers at once (this machine has two cores).
        children = [
            subprocess.Popen(
                [sys.executable, __file__, "--writer", mount, str(lines)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        results = []
        for child in children:
            text, _ = child.communicate(timeout=300)
            results.append(json.loads(text.strip().splitlines()[-1]))
        slowest = max(r["seconds"] for r in results)
        out["report_lines_per_s_2_writers"] = round(sum(r["lines"] for r in results) / slowest)

        # Registration + unregistration.
        count = max(200, lines // 20)
        spare = os.eventfd(0, os.EFD_CLOEXEC)
        start = time.perf_counter()
        for _ in range(count):
            transport.register(spare, 4096, 1.0)
            transport.unregister(spare)
        elapsed = time.perf_counter() - start
        os.close(spare)
        out["register_unregister_per_s"] = round(count / elapsed)

        # Request round trips through the test-control file.
        transport.report(efd, 10)
        blocking = os.eventfd(0, os.EFD_CLOEXEC)
        transport.register(blocking, 4096, 1.0)
        transport.report(blocking, 10)
        request_fd = os.open(os.path.join(mount, REQUEST_FILE), os.O_WRONLY | os.O_CLOEXEC)
        line = f"{os.getpid()} {blocking} 1\n".encode()
        count = max(200, lines // 10)
        to_readable: list[float] = []
        start = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(request_fd, line)
            # The daemon wrote the eventfd before answering our write: it is readable now.
            asked = int.from_bytes(os.read(blocking, 8), "little")
            to_readable.append(time.perf_counter() - t0)
            transport.report(blocking, asked)  # re-add
        elapsed = time.perf_counter() - start
        os.close(request_fd)
        out["request_round_trips_per_s"] = round(count / elapsed)
        out["request_write_to_eventfd"] = summary_us(to_readable)
        transport.unregister(blocking)
        transport.unregister(efd)
        os.close(blocking)
        os.close(efd)
    out["daemon_rss_kib"] = rss_kib(daemon.pid)
    return out


# ---------------------------------------------------------------------- latency under pressure


def latency_child(mount: str, requests: int) -> None:
    """In the group: allocate 1 MiB at a time until asked, free it, again; print when asked."""
    transport = FilesTransport.open(mount)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    transport.register(efd, MiB, 1.0)
    held: list[mmap.mmap] = []
    seen: list[tuple[float, int]] = []
    lock = threading.Lock()
    asked_event = threading.Event()
    stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def watch() -> None:
        poller = select.epoll()
        poller.register(stop, select.EPOLLIN)
        poller.register(efd, select.EPOLLIN)
        while True:
            events = poller.poll()
            now = time.monotonic()
            for fd, _ in events:
                if fd == stop:
                    poller.close()
                    return
                try:
                    asked = int.from_bytes(os.read(efd, 8), "little")
                except BlockingIOError:
                    continue
                with lock:
                    seen.append((now, asked))
                asked_event.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    freed = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with lock:
            if len(seen) >= requests:
                break
        block = mmap.mmap(-1, MiB)
        block.write(b"\x03" * MiB)
        held.append(block)
        transport.report(efd, 1)
        if asked_event.wait(0.005):
            asked_event.clear()
            with lock:
                owed = sum(n for _, n in seen) - freed
            # Free what was asked (the controller subtracted it already): no report.
            for _ in range(min(owed, len(held))):
                held.pop().close()
            freed += owed
            time.sleep(0.05)  # let the usage settle below the low watermark
    os.write(stop, (1).to_bytes(8, "little"))
    watcher.join()
    transport.unregister(efd)
    transport.close()
    with lock:
        print(json.dumps({"pid": os.getpid(), "efd": efd, "seen": seen}), flush=True)


class ThresholdClock:
    """Timestamps of the kernel's usage-threshold signals, heard by an otherwise idle thread.

    The kernel signals every eventfd registered on a threshold in one loop, so these are (within
    one wake-up of an idle thread) the moments the daemon's controller was signalled too.
    """

    def __init__(self, group: str, values: list[int]) -> None:
        self.thresholds = [UsageThreshold.register(group, v) for v in values]
        self.wakes: list[float] = []
        self.realtime = False
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Real-time priority for this thread only: on a busy 2-core machine a normal thread can
        # wait a millisecond for a CPU, longer than what is measured.
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
            self.realtime = True
        except OSError:
            self.realtime = False
        poller = select.epoll()
        poller.register(self._stop, select.EPOLLIN)
        by_fd = {t.fileno(): t for t in self.thresholds}
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        while True:
            events = poller.poll()
            now = time.monotonic()
            for fd, _ in events:
                if fd == self._stop:
                    poller.close()
                    return
                by_fd[fd].consume()
                self.wakes.append(now)

    def close(self) -> None:
        os.write(self._stop, (1).to_bytes(8, "little"))
        self._thread.join()
        os.close(self._stop)
        for threshold in self.thresholds:
            threshold.close()


def pressure_latency(base: str, requests: int) -> dict[str, object]:
    """Start a daemon on a 256 MiB group and run :func:`latency_child` inside the group."""
    if not v1_memory_available():
        return {"skipped": "needs root and a cgroup v1 memory hierarchy"}
    group = ManagedCgroupV1.create(f"pyshrinker-bench-{uuid.uuid4().hex[:12]}", 256 * MiB)
    mount = tempfile.mkdtemp(prefix="pyshrinkerd-bench-", dir=base)
    try:
        argv = ["--cgroup", group.path, "--log-level", "WARNING"]
        with DaemonProcess.start(mount, argv) as daemon:
            marks = daemon.status().daemon
            clock = ThresholdClock(
                group.path, [marks["high"], (marks["high"] + marks["limit"]) // 2]
            )
            try:
                child = group.spawn(
                    [sys.executable, __file__, "--latency-child", mount, str(requests)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                try:
                    text, _ = child.communicate(timeout=300)
                finally:
                    if child.poll() is None:
                        child.kill()
                        child.wait()
            finally:
                clock.close()
            result = json.loads(text.strip().splitlines()[-1])
            status = daemon.status()
            oom_kill = group.read_keyed("memory.oom_control").get("oom_kill", 0)
    finally:
        group.remove()
        os.rmdir(mount)
    mine = [r for r in status.requests if r.pid == result["pid"] and r.efd == result["efd"]]
    wakes = sorted(clock.wakes)
    signal_to_write: list[float] = []
    reasons: dict[str, int] = {}
    for request in mine:
        reasons[request.reason] = reasons.get(request.reason, 0) + 1
        if request.reason != "usage threshold":
            continue
        # The last threshold signal before the request. Allow 0.2 ms of cross-process ordering
        # noise, no more: the client frees within a millisecond and its usage falling back
        # under the threshold is signalled too.
        before = [w for w in wakes if w <= request.t + 0.0002]
        if before:
            signal_to_write.append(request.t - before[-1])
    write_to_client = []
    seen = [t for t, _ in result["seen"]]
    for request in mine:
        after = [t for t in seen if t >= request.t - 0.0002]
        if after:
            write_to_client.append(after[0] - request.t)
    return {
        "requests": len(mine),
        "by_reason": reasons,
        "threshold_signals": len(wakes),
        "clock_thread_realtime": clock.realtime,
        "signal_to_eventfd_write": summary_us(signal_to_write),
        "eventfd_write_to_client_wakeup": summary_us(write_to_client),
        "oom_kill": oom_kill,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20000, help="report lines per writer")
    parser.add_argument("--requests", type=int, default=40, help="pressure requests to time")
    parser.add_argument("--writer", nargs=2, metavar=("MOUNT", "LINES"), help=argparse.SUPPRESS)
    parser.add_argument("--latency-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        writer_child(args.writer[0], int(args.writer[1]))
        return 0
    if args.latency_child:
        mount, requests = args.latency_child
        latency_child(mount, int(requests))
        return 0
    why = fuse_unavailable()
    if why is not None or os.geteuid() != 0:
        print(json.dumps({"skipped": why or "needs root to mount FUSE"}))
        return 0
    results: dict[str, object] = {"benchmark": "daemon", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="pyshrinker-bench-") as base:
        mount = tempfile.mkdtemp(dir=base)
        with DaemonProcess.start(mount, ["--test-control", "--log-level", "WARNING"]) as daemon:
            results["throughput"] = throughput(daemon, args.lines)
        print(json.dumps(results["throughput"], indent=2), file=sys.stderr)
        results["pressure"] = pressure_latency(base, args.requests)
        print(json.dumps(results["pressure"], indent=2), file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
