"""Fault injection on the embedded controller and the client: threads, bad arguments, races
between requests and the application's own frees, limit changes, a moved process, fork, and a
reclaim callback that never returns. Each test here failed before the fix it guards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import pyshrinker
from pyshrinker import ChunkCache, Shrinker, settle
from pyshrinker import controller as controller_module
from pyshrinker.cgroup import CgroupV1, ManagedCgroupV1
from pyshrinker.controller import Controller
from pyshrinker.transport import EmbeddedTransport

from .helpers import private_controller

MiB = 1 << 20
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")


class ManualShrinker(Shrinker):
    """A shrinker no listener thread watches: the test decides when a request is handled."""

    def _listen(self) -> None:
        pass

    def _stop_listening(self) -> None:
        pass


class Holder:
    """A reclaim callback over a number of chunks held, freeing as much as it is asked."""

    def __init__(self) -> None:
        self.held = 0

    def __call__(self, asked: int) -> int:
        freed = min(asked, self.held)
        self.held -= freed
        return freed


@pytest.fixture
def ctl() -> Iterator[tuple[Controller, EmbeddedTransport]]:
    """A private controller with no memory source: requests are the test's."""
    with private_controller() as pair:
        yield pair


class TestConcurrentReports:
    """Reporting threads deciding at once (direct reclaim) never see each other's poll."""

    @pytest.mark.kernel
    def test_four_threads_report_against_thresholds(
        self, v1_group: Callable[[int], ManagedCgroupV1]
    ) -> None:
        """4 threads x 3,000 reports with v1 usage thresholds armed: no exception, exact books."""
        group = v1_group(256 * MiB)
        controller = Controller.create(CgroupV1.open(group.path)).start()
        transport = EmbeddedTransport(controller)
        errors: list[BaseException] = []
        shrinkers = [
            Shrinker.register(4096, Holder(), transport=transport, batch_bytes=0) for _ in range(4)
        ]
        try:
            assert controller.describe_signals()[1].startswith("cgroup v1 usage threshold")

            def work(s: Shrinker) -> None:
                try:
                    for _ in range(3000):
                        s.report(1)
                except BaseException as err:
                    errors.append(err)

            threads = [threading.Thread(target=work, args=(s,)) for s in shrinkers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == []
            assert [controller.count(s.efd) for s in shrinkers] == [3000] * 4
        finally:
            for s in shrinkers:
                s.close()
            controller.close()


class TestBadArguments:
    """A bad argument raises before any lock is taken, and leaves the shrinker usable."""

    @pytest.mark.parametrize("bad", ["3", 1.5, True, None, 2**64])
    def test_report_refuses_and_close_returns(self, ctl, bad) -> None:
        """report(bad) raises TypeError/ValueError; the books are untouched; close() returns."""
        controller, transport = ctl
        s = Shrinker.register(4096, Holder(), transport=transport, batch_bytes=0)
        s.report(2)
        with pytest.raises((TypeError, ValueError)):
            s.report(bad)
        assert s.held == 2
        assert controller.count(s.efd) == 2
        assert type(controller.count(s.efd)) is int
        s.report(1)
        assert controller.count(s.efd) == 3
        closer = threading.Thread(target=s.close, daemon=True)
        closer.start()
        closer.join(5)
        assert not closer.is_alive(), "close() hung: a lock was left held"

    def test_int_subclass_is_a_plain_int(self, ctl) -> None:
        """An int subclass (an IntEnum, numpy-like ints) is accepted and stored as an int."""
        import enum

        class Two(enum.IntEnum):
            TWO = 2

        controller, transport = ctl
        with Shrinker.register(4096, Holder(), transport=transport, batch_bytes=0) as s:
            s.report(Two.TWO)
            assert type(controller.count(s.efd)) is int
            assert controller.count(s.efd) == 2


class _DelayedWrites:
    """Replaces the controller's eventfd write: requests are queued, delivered by the test."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, int]] = []
        self.real = controller_module.eventfd_write
        self.hook: Callable[[], None] | None = None

    def __call__(self, fd: int, value: int) -> None:
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook()  # runs between the controller's subtraction and its write
            self.real(fd, value)
            return
        self.queue.append((fd, value))

    def deliver(self) -> None:
        fd, value = self.queue.pop(0)
        self.real(fd, value)


class TestBooksUnderRaces:
    """After quiescence the controller's count equals what the application holds, whatever
    the interleaving of requests, the application's own frees and settlements."""

    def test_own_free_and_earlier_settlement_inside_the_request_window(
        self, ctl, monkeypatch
    ) -> None:
        """The window that refused a real request as absurd, staged deterministically.

        Holding 100, request A=50 is on the eventfd. While the controller, holding its lock,
        subtracts request B=50, the application frees 10 on its own (its books change; the
        report waits for the controller's lock) and the listener reads and settles A. Then B
        is written and read: it must be honoured, and the books must end exact.
        """
        controller, transport = ctl
        holder = Holder()
        s = ManualShrinker.register(4096, holder, transport=transport, batch_bytes=0)
        holder.held = 100
        s.report(100)
        writes = _DelayedWrites()
        monkeypatch.setattr(controller_module, "eventfd_write", writes)
        controller.request(s.efd, 50)
        writes.deliver()  # A is on the eventfd
        reporter = threading.Thread(target=s.report, args=(-10,), daemon=True)

        def own_free_then_settle_a() -> None:
            holder.held -= 10
            reporter.start()
            deadline = time.monotonic() + 5
            while s._reported != 90:  # the books changed; the send waits for the lock
                assert time.monotonic() < deadline, "the report never reached the books"
                time.sleep(0.001)
            s._on_request()  # reads and settles A

        writes.hook = own_free_then_settle_a
        controller.request(s.efd, 50)  # B: subtracted, the hook, then written
        reporter.join(5)
        assert not reporter.is_alive()
        s._on_request()  # reads B
        assert s._absurd_requests == 0
        assert holder.held == 0
        assert controller.count(s.efd) == holder.held == s.held
        s.close()

    def test_stray_writer_still_refused(self, ctl) -> None:
        """The bound that replaced the old one still refuses what the controller never asked."""
        controller, transport = ctl
        holder = Holder()
        s = ManualShrinker.register(4096, holder, transport=transport, batch_bytes=0)
        holder.held = 10
        s.report(10)
        controller_module.eventfd_write(s.efd, 11)
        s._on_request()
        assert s._absurd_requests == 1
        assert holder.held == 10 == controller.count(s.efd)
        s.close()


@settings(max_examples=600, stateful_step_count=25, deadline=None)
class RequestWindowMachine(RuleBasedStateMachine):
    """Requests written late, own allocations and frees, settlements in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.controller = Controller.create(None)
        self.transport = EmbeddedTransport(self.controller)
        self.holder = Holder()
        self.shrinker = ManualShrinker.register(
            4096, self.holder, transport=self.transport, batch_bytes=4 * 4096
        )
        self.writes = _DelayedWrites()
        self.saved = controller_module.eventfd_write
        controller_module.eventfd_write = self.writes

    def teardown(self) -> None:
        try:
            self.quiesce_and_check()
        finally:
            controller_module.eventfd_write = self.saved
            self.shrinker.close()
            self.controller.close()

    @rule(n=st.integers(1, 20))
    def allocate(self, n: int) -> None:
        self.holder.held += n
        self.shrinker.report(n)

    @rule(n=st.integers(1, 12))
    def free_own(self, n: int) -> None:
        n = min(n, self.holder.held)
        if n:
            self.holder.held -= n
            self.shrinker.report(-n)

    @rule(percent=st.sampled_from([100, 100, 90, 50, 10, 1]))
    def controller_asks(self, percent: int) -> None:
        count = self.controller.count(self.shrinker.efd)
        self.controller.request(self.shrinker.efd, max(1, count * percent // 100))

    @rule()
    def write_arrives(self) -> None:
        if self.writes.queue:
            self.writes.deliver()

    @rule()
    def listener_handles(self) -> None:
        self.shrinker._on_request()

    @rule()
    def flush(self) -> None:
        self.shrinker.flush()

    @rule()
    def quiesce_and_check(self) -> None:
        """Every request written and handled, every report sent: the books agree."""
        while self.writes.queue:
            self.writes.deliver()
        self.shrinker._on_request()
        self.shrinker.flush()
        assert self.shrinker._absurd_requests == 0
        assert self.controller.count(self.shrinker.efd) == self.holder.held == self.shrinker.held

    @invariant()
    def never_negative(self) -> None:
        assert self.controller.count(self.shrinker.efd) >= 0
        assert self.holder.held >= 0


TestRequestWindow = RequestWindowMachine.TestCase
TestRequestWindow.__doc__ = "Hypothesis drives the interleavings; the books agree at quiescence."


def run_worker(
    group: ManagedCgroupV1,
    scenario: str,
    *args: str,
    midway: Callable[[int], None] | None = None,
    timeout: float = 120,
) -> tuple[int, dict[str, object] | None, str]:
    """Run a fault_worker scenario in ``group``; ``midway(pid)`` runs when it says ready.

    Returns the exit status, the figures it printed (None if it died) and its stderr's tail.
    """
    proc = group.spawn(
        [sys.executable, WORKER, scenario, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        if midway is not None:
            line = proc.stdout.readline().strip()
            if line == "ready":
                midway(proc.pid)
                proc.stdin.write("go\n")
                proc.stdin.flush()
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.strip().splitlines()
    figures = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return proc.returncode, figures, err[-3000:]


@pytest.mark.kernel
class TestConfigurationChanges:
    """A limit lowered while idle, and a process moved to another group, are noticed."""

    def test_limit_lowered_while_idle(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """400 -> 150 MiB with 70 MiB held, then 400 MiB more: no OOM kill, books exact."""
        group = v1_group(400 * MiB)

        def lower(_pid: int) -> None:
            group.write("memory.limit_in_bytes", str(150 * MiB))

        status, figures, err = run_worker(group, "lowered-limit", midway=lower)
        oom = group.read_keyed("memory.oom_control")["oom_kill"]
        assert oom == 0 and status == 0, f"status {status}, oom_kill {oom}: {err}"
        assert figures is not None
        assert figures["requests"] > 0
        assert figures["controller_count"] == figures["chunks"]
        assert group.read_int("memory.max_usage_in_bytes") <= 150 * MiB

    def test_moved_to_a_tighter_group(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """Moved from a 400 MiB group to a 150 MiB one, then 400 MiB more: no OOM kill."""
        roomy = v1_group(400 * MiB)
        tight = v1_group(150 * MiB)
        status, figures, err = run_worker(roomy, "moved", midway=tight.add_process)
        oom = tight.read_keyed("memory.oom_control")["oom_kill"]
        assert oom == 0 and status == 0, f"status {status}, oom_kill {oom}: {err}"
        assert figures is not None
        assert any(tight.path in line for line in figures["signals"]), figures["signals"]
        assert figures["controller_count"] == figures["chunks"]


@pytest.mark.kernel
class TestStuckCallback:
    """A reclaim callback that never returns holds only its own shrinker."""

    def test_other_shrinkers_served(self, ctl) -> None:
        """A's callback blocks; B's request is still handled; A's books settle when it returns."""
        controller, transport = ctl
        release = threading.Event()
        entered = threading.Event()

        def blocks(asked: int) -> int:
            entered.set()
            release.wait(30)
            return asked

        b_holder = Holder()
        a = Shrinker.register(4096, blocks, transport=transport, batch_bytes=0)
        b = Shrinker.register(4096, b_holder, transport=transport, batch_bytes=0)
        try:
            a.report(10)
            b_holder.held = 10
            b.report(10)
            controller.request(a.efd, 4)
            assert entered.wait(5)
            controller.request(b.efd, 3)
            deadline = time.monotonic() + 5
            while b_holder.held != 7:
                assert time.monotonic() < deadline, "B was never served while A was stuck"
                time.sleep(0.005)
            assert controller.count(b.efd) == 7
            assert not settle(0.2), "settle() returned while A's callback runs"
            release.set()
            assert settle()
            assert controller.count(a.efd) == 6
        finally:
            release.set()
            a.close()
            b.close()

    def test_in_a_limited_group(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """128 MiB group: one callback stuck for good, memory grows outside every cache by
        100 MiB; the healthy cache gives back enough: no OOM kill."""
        group = v1_group(128 * MiB)
        status, figures, err = run_worker(
            group, "stuck-callback", "--before", "60", "--after", "100"
        )
        oom = group.read_keyed("memory.oom_control")["oom_kill"]
        assert oom == 0 and status == 0, f"status {status}, oom_kill {oom}: {err}"
        assert figures is not None and figures["evicted"] > 0


@pytest.mark.kernel
class TestHeapSizedValues:
    """ChunkCache values of 8-32 KiB, put as fast as a thread can: reclaim keeps up."""

    def test_two_gib_through_a_48_mib_group(
        self, v1_group: Callable[[int], ManagedCgroupV1]
    ) -> None:
        """2 GiB of 8-32 KiB values through a 48 MiB group: no OOM kill, books exact."""
        group = v1_group(48 * MiB)
        status, figures, err = run_worker(group, "heap-values", "--after", "2048")
        oom = group.read_keyed("memory.oom_control")["oom_kill"]
        assert oom == 0 and status == 0, f"status {status}, oom_kill {oom}: {err}"
        assert figures is not None
        assert figures["controller_count"] == figures["chunks"]


def wait_child(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None (and the child killed) if it did not end in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


class TestFork:
    """fork() while other threads use pyshrinker: the child never hangs, its books are whole."""

    def test_children_of_a_busy_process(self) -> None:
        """30 forks while threads send requests, report and fill a ChunkCache: every child
        re-registers, its cache's chunks equal its entries' and the controller's count."""
        holder = Holder()
        asked = Shrinker.register(4096, holder, batch_bytes=0)
        holder.held = 1_000_000
        asked.report(1_000_000)
        reporter = Shrinker.register(4096, Holder(), batch_bytes=0)
        cache: ChunkCache[int, bytes] = ChunkCache(4096)
        controller = pyshrinker.default_controller()
        stop = threading.Event()

        def send_requests() -> None:
            while not stop.is_set():
                controller.request(asked.efd, 1)

        def report() -> None:
            while not stop.is_set():
                reporter.report(1)
                reporter.report(-1)

        def fill() -> None:
            count = 0
            while not stop.is_set():
                key = count % 500
                cache.put(key, b"x", chunks=1 + key % 3)
                count += 1

        threads = [threading.Thread(target=f, daemon=True) for f in (send_requests, report, fill)]
        for thread in threads:
            thread.start()
        codes = []
        try:
            for _ in range(30):
                time.sleep(0.01)
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        cache.put(-1, b"child", chunks=2)
                        cache.flush()
                        code = 2
                        expected = sum(1 + k % 3 for k in cache if k >= 0) + 2
                        if cache.chunks != expected:
                            raise SystemExit
                        code = 3
                        if cache.shrinker.controller_count() != expected:
                            raise SystemExit
                        code = 4
                        reporter.report(5)
                        reporter.flush()
                        if reporter.controller_count() != reporter.held:
                            raise SystemExit
                        code = 0
                    finally:
                        os._exit(code)
                codes.append(wait_child(pid, 10))
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            for each in (asked, reporter, cache):
                each.close()
        assert codes == [0] * 30, f"child exit codes (None: hung): {codes}"


@pytest.mark.v1
class TestStress:
    """benchmarks/stress.py, short: threads, caches and 10k requests/s in a 256 MiB group."""

    def test_short_stress_run(self, v1_group) -> None:
        """8 threads for 4 s: no exception, no lost request, no drift, no deadlock, no OOM.

        (``v1_group`` only checks the v1 hierarchy is there; the benchmark makes its own group.)
        """
        script = os.path.join(os.path.dirname(WORKER), "..", "benchmarks", "stress.py")
        done = subprocess.run(
            [sys.executable, script, "--seconds", "4", "--threads", "8"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        assert done.returncode == 0, (figures, done.stderr[-2000:])
        assert figures["exceptions"] == figures["lost_requests"] == figures["drift_chunks"] == 0
        assert not figures["deadlock"] and figures["oom_kills"] == 0
        assert figures["chunks_asked"] > 0
