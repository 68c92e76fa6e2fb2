"""The client: Shrinker reports, requests, re-adds, the listener thread, levels, fork."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

import pyshrinker
from pyshrinker import AbiError, ClosedError, Level, Shrinker, settle, subscribe_levels
from pyshrinker._syscalls import eventfd_write
from pyshrinker.client import get_listener

from .helpers import ScriptedMemory, private_controller

MiB = 1 << 20


@pytest.fixture
def ctl():
    """A private controller and its embedded transport."""
    with private_controller() as pair:
        yield pair


class Recorder:
    """A reclaim callback that frees what it is told to and remembers the asks."""

    def __init__(self, held: int = 0, mode: str = "all") -> None:
        self.held = held
        self.mode = mode
        self.asked: list[int] = []
        self.thread: str | None = None

    def __call__(self, n: int) -> int:
        self.asked.append(n)
        self.thread = threading.current_thread().name
        if self.mode == "raise":
            raise RuntimeError("reclaim exploded")
        if self.mode == "none":
            return None  # type: ignore[return-value]
        if self.mode == "half":
            freed = min(self.held, n // 2)
        elif self.mode == "extra":
            freed = min(self.held, n + 2)
        else:
            freed = min(self.held, n)
        self.held -= freed
        return freed


class TestRegister:
    """Registration checks its arguments."""

    @pytest.mark.parametrize("size", [0, -1, -(1 << 20)])
    def test_bad_chunk_size(self, ctl, size):
        """Zero or negative chunk sizes are refused with a clear error."""
        _, transport = ctl
        with pytest.raises(AbiError, match="chunk size"):
            Shrinker.register(size, Recorder(), transport=transport)

    def test_reclaim_must_be_callable(self, ctl):
        """A non-callable reclaim is a TypeError."""
        _, transport = ctl
        with pytest.raises(TypeError):
            Shrinker.register(4096, 42, transport=transport)  # type: ignore[arg-type]

    def test_no_eventfd_leak_on_failed_registration(self, ctl):
        """If the controller refuses, the eventfd is closed again."""
        controller, transport = ctl
        controller.close()
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ClosedError):
            Shrinker.register(4096, Recorder(), transport=transport)
        assert len(os.listdir("/proc/self/fd")) == before


class TestReports:
    """Reports are batched and reach the controller exactly."""

    def test_batched_until_flush(self, ctl):
        """Small reports wait for a batch; flush sends them."""
        controller, transport = ctl
        with Shrinker.register(4096, Recorder(), transport=transport) as s:
            s.report(10)
            assert controller.count(s.efd) == 0
            assert s.held == 10
            s.flush()
            assert controller.count(s.efd) == 10

    def test_batch_sent_when_full(self, ctl):
        """A batch's worth of chunks (1 MiB by default) goes out without flush."""
        controller, transport = ctl
        with Shrinker.register(4096, Recorder(), transport=transport) as s:
            for _ in range(256):
                s.report(1)
            assert controller.count(s.efd) == 256

    def test_report_after_close(self, ctl):
        """Reporting on a closed shrinker raises ClosedError; close is idempotent."""
        _, transport = ctl
        s = Shrinker.register(4096, Recorder(), transport=transport)
        s.close()
        s.close()
        with pytest.raises(ClosedError):
            s.report(1)


class TestRequests:
    """Requests run reclaim on the listener thread and re-add what was not freed."""

    def test_full_free(self, ctl):
        """All asked chunks freed: nothing re-added, count drops."""
        controller, transport = ctl
        rec = Recorder(held=10)
        with Shrinker.register(MiB, rec, transport=transport) as s:
            s.report(10)
            controller.request(s.efd, 4)
            assert settle()
            assert rec.asked == [4]
            assert rec.thread == "pyshrinker-listener"
            assert controller.count(s.efd) == 6
            assert s.stats().chunks_freed == 4
            assert s.stats().chunks_readded == 0

    def test_partial_free_readds(self, ctl):
        """Chunks the callback could not free are given back."""
        controller, transport = ctl
        rec = Recorder(held=10, mode="half")
        with Shrinker.register(MiB, rec, transport=transport) as s:
            s.report(10)
            controller.request(s.efd, 6)
            assert settle()
            assert controller.count(s.efd) == 7  # 10 - 6 + 3 re-added
            assert s.stats().chunks_readded == 3
            assert rec.held == 7

    def test_extra_freed_reported(self, ctl):
        """Whole entries freed beyond the request are reported as our own frees."""
        controller, transport = ctl
        rec = Recorder(held=10, mode="extra")
        with Shrinker.register(MiB, rec, transport=transport) as s:
            s.report(10)
            controller.request(s.efd, 3)
            assert settle()
            assert controller.count(s.efd) == rec.held == 5

    def test_raising_callback_readds_all_and_listener_lives(self, ctl, caplog):
        """A callback that raises is logged, everything is re-added, and later requests work."""
        controller, transport = ctl
        rec = Recorder(held=10, mode="raise")
        with Shrinker.register(MiB, rec, transport=transport) as s:
            s.report(10)
            with caplog.at_level(logging.ERROR):
                controller.request(s.efd, 4)
                assert settle()
            assert "reclaim exploded" in caplog.text
            assert controller.count(s.efd) == 10
            assert s.stats().callback_errors == 1
            rec.mode = "all"
            controller.request(s.efd, 4)
            assert settle()
            assert controller.count(s.efd) == 6
            assert get_listener().alive

    def test_bogus_return_counts_as_nothing_freed(self, ctl, caplog):
        """A callback returning something other than a count frees nothing in the books."""
        controller, transport = ctl
        rec = Recorder(held=10, mode="none")
        with Shrinker.register(MiB, rec, transport=transport) as s:
            s.report(10)
            with caplog.at_level(logging.ERROR):
                controller.request(s.efd, 4)
                assert settle()
            assert "not a count" in caplog.text
            assert controller.count(s.efd) == 10

    def test_absurd_count_on_eventfd(self, ctl, caplog):
        """A count larger than we ever reported is refused: nothing freed, nothing lost."""
        controller, transport = ctl
        rec = Recorder(held=10)
        with Shrinker.register(MiB, rec, transport=transport) as s:
            s.report(10)
            s.flush()
            with caplog.at_level(logging.WARNING):
                eventfd_write(s.efd, 2**40)  # a stray writer, not the controller
                assert settle()
            assert "absurd" in caplog.text
            assert rec.asked == []
            assert controller.count(s.efd) == 10
            assert s.held == 10
            controller.request(s.efd, 2)  # real requests still work
            assert settle()
            assert rec.asked == [2]
            assert controller.count(s.efd) == 8

    def test_close_from_inside_callback(self, ctl):
        """A callback may close its own shrinker without deadlocking."""
        controller, transport = ctl
        box: list[Shrinker] = []

        def reclaim(n: int) -> int:
            box[0].close()
            return n

        s = Shrinker.register(MiB, reclaim, transport=transport)
        box.append(s)
        s.report(3)
        s.flush()
        controller.request(s.efd, 1)
        assert settle()
        assert controller.shrinkers() == []


class TestDirectReclaim:
    """reclaim_pending() serves a request the controller made at once."""

    def test_request_handled_before_reclaim_pending_returns(self):
        """The report crosses the watermark; the request is served by the time it returns."""
        memory = ScriptedMemory.with_limit(256 * MiB, working_set=250 * MiB)
        with private_controller(memory, shortest_poll=60.0, longest_poll=60.0) as (_, transport):
            rec = Recorder(held=200)
            with Shrinker.register(MiB, rec, transport=transport) as s:
                s.report(200)
                s.reclaim_pending()
                assert rec.asked, "no request served"
                assert s.stats().chunks_freed == sum(rec.asked)

    def test_nothing_to_do_costs_nothing(self, ctl):
        """Without new chunks sent, reclaim_pending reads nothing."""
        _, transport = ctl
        rec = Recorder()
        with Shrinker.register(4096, rec, transport=transport) as s:
            s.reclaim_pending()
            s.report(1)  # batched: nothing sent
            s.reclaim_pending()
            assert rec.asked == []


class TestListener:
    """The listener thread: one per process, barrier."""

    def test_two_idle_threads_at_most_for_many_shrinkers(self, ctl):
        """Ten shrinkers and 200 requests: once idle, two listener threads at most."""
        controller, transport = ctl
        shrinkers = [
            Shrinker.register(4096, Recorder(held=50), transport=transport) for _ in range(10)
        ]
        try:
            for s in shrinkers:
                s.report(50)
                s.flush()
            for _round in range(20):
                for s in shrinkers:
                    controller.request(s.efd, 1)
                assert settle()
                # One more thread than callbacks running at once; once idle, two at most.
                deadline = time.monotonic() + 2
                while get_listener().threads > 2:
                    assert time.monotonic() < deadline, get_listener().threads
                    time.sleep(0.01)
            assert all(controller.count(s.efd) == 30 for s in shrinkers)
        finally:
            for s in shrinkers:
                s.close()


class TestLevels:
    """subscribe_levels delivers the level that happened."""

    def test_level_delivered_once_with_highest(self, ctl):
        """A MEDIUM event reaches a LOW subscriber once, as MEDIUM; OOM subscribers not at all."""
        controller, transport = ctl
        heard: list[Level] = []
        heard_oom: list[Level] = []
        with (
            subscribe_levels(heard.append, "low", transport=transport),
            subscribe_levels(heard_oom.append, Level.OOM, transport=transport),
        ):
            controller.notify_level(Level.MEDIUM)
            assert settle()
            assert heard == [Level.MEDIUM]
            assert heard_oom == []
            controller.notify_level(Level.OOM)
            assert settle()
            assert heard == [Level.MEDIUM, Level.OOM]
            assert heard_oom == [Level.OOM]

    def test_raising_level_callback(self, ctl, caplog):
        """A level callback that raises is logged; the next event is still delivered."""
        controller, transport = ctl
        calls: list[Level] = []

        def callback(level: Level) -> None:
            calls.append(level)
            raise ValueError("level callback broke")

        with subscribe_levels(callback, transport=transport):
            with caplog.at_level(logging.ERROR):
                controller.notify_level(Level.LOW)
                assert settle()
                controller.notify_level(Level.LOW)
                assert settle()
            assert calls == [Level.LOW, Level.LOW]
            assert "level callback broke" in caplog.text

    def test_bad_level_name(self, ctl):
        """Unknown level names are a clear error."""
        _, transport = ctl
        with pytest.raises(AbiError, match="unknown level"):
            subscribe_levels(print, "severe", transport=transport)


class TestFork:
    """A forked child does not inherit a dead listener, nor its parent's registrations."""

    def test_child_reattaches(self):
        """The child registers anew with what it holds, through the cgroup's controller (the
        parent's, elected before the fork), and is asked through it; the parent's stays."""
        rec = Recorder(held=5)
        s = Shrinker.register(MiB, rec)
        s.report(5)
        s.flush()
        parent_controller = pyshrinker.default_controller()
        to_parent_r, to_parent_w = os.pipe()
        to_child_r, to_child_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: exit code says what went wrong
            code = 1
            try:
                os.close(to_parent_r)
                os.close(to_child_w)
                s.report(1)
                s.flush()
                code = 2
                if s.controller_count() != 6:
                    raise SystemExit
                rec.held = 6
                os.write(to_parent_w, f"{s.efd}\n".encode())
                code = 3
                if os.read(to_child_r, 16) != b"asked\n":
                    raise SystemExit
                deadline = time.monotonic() + 5
                while rec.asked[-1:] != [2] and time.monotonic() < deadline:
                    time.sleep(0.005)
                code = 4
                if rec.asked[-1:] != [2] or not settle() or s.controller_count() != 4:
                    raise SystemExit
                code = 0
            finally:
                os._exit(code)
        os.close(to_parent_w)
        os.close(to_child_r)
        try:
            line = os.read(to_parent_r, 16)
            if line:
                # The child's registration, in this process's controller: (its pid, its efd).
                assert parent_controller.count((pid, int(line))) == 6
                parent_controller.request((pid, int(line)), 2)
            os.write(to_child_w, b"asked\n")
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            # The parent's registration is untouched.
            assert parent_controller.count(s.efd) == 5
        finally:
            os.close(to_parent_r)
            os.close(to_child_w)
            s.close()
