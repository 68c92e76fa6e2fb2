"""The controller: registry, requests, proportional sharing, watermarks, escalation."""

from __future__ import annotations

import logging
import os
import select
import threading
import time

import pytest

from pyshrinker import AbiError, ClosedError, Level, policy
from pyshrinker._syscalls import EventfdFlag, eventfd, eventfd_read
from pyshrinker.cgroup import CgroupV1
from pyshrinker.controller import Controller, ControllerConfig, parse_size
from pyshrinker.policy import Watermarks
from pyshrinker.signals.v1 import UsageThreshold

from .helpers import ScriptedMemory, private_controller

MiB = 1 << 20


@pytest.fixture
def efds():
    """Factory of non-blocking eventfds, closed after the test."""
    made: list[int] = []

    def make() -> int:
        fd = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        os.close(fd)


def read_counter(fd: int) -> int:
    try:
        return eventfd_read(fd)
    except BlockingIOError:
        return 0


class TestRegistry:
    """Registration and the +N/-N accounting of the ABI."""

    def test_counts_follow_reports(self, efds):
        """Positive reports add, negative ones remove."""
        c = Controller.create(None)
        fd = efds()
        c.register(fd, fd, 4096)
        c.report(fd, 10)
        c.report(fd, -3)
        assert c.count(fd) == 7

    def test_count_never_below_zero(self, efds):
        """Removing more than is held leaves the count at 0."""
        c = Controller.create(None)
        fd = efds()
        c.register(fd, fd, 4096)
        c.report(fd, 2)
        c.report(fd, -5)
        assert c.count(fd) == 0

    def test_deficit_paid_back_by_readd(self, efds):
        """Frees that raced an in-flight request are paid back by the re-add that follows."""
        c = Controller.create(None)
        fd = efds()
        c.register(fd, fd, 4096)
        c.report(fd, 10)
        assert c.request(fd, 5) == 5  # count 5, client still holds 10
        c.report(fd, -8)  # client frees 8 on its own: really holds 2, count floored at 0
        c.report(fd, 3)  # reclaim(5) freed 2, re-adds 3
        assert c.count(fd) == 0
        c.report(fd, 1)
        assert c.count(fd) == 1

    def test_deficit_without_requests_is_not_kept(self, efds):
        """Without requests in flight a client cannot owe chunks: over-frees are just floored."""
        c = Controller.create(None)
        fd = efds()
        c.register(fd, fd, 4096)
        c.report(fd, -4)
        c.report(fd, 4)
        assert c.count(fd) == 4

    @pytest.mark.parametrize("size", [0, -1, -4096, 2**41, 1.5, True])
    def test_bad_chunk_size(self, efds, size):
        """Chunk sizes that are not a positive int of at most 1 TiB are refused."""
        c = Controller.create(None)
        fd = efds()
        with pytest.raises(AbiError):
            c.register(fd, fd, size)
        with pytest.raises(ValueError):  # AbiError is a ValueError too
            c.register(fd, fd, size)

    @pytest.mark.parametrize("cost", [0, -1.0, 1e-320, 1e-4, 1e4, float("inf"), float("nan")])
    def test_bad_cost(self, efds, cost):
        """Costs must be from 0.001 to 1000 (issue 9: 1e-320 made shares infinite, then NaN)."""
        c = Controller.create(None)
        fd = efds()
        with pytest.raises(AbiError):
            c.register(fd, fd, 4096, cost)

    def test_duplicate_and_unknown(self, efds):
        """A key registers once; reports to unknown keys are errors."""
        c = Controller.create(None)
        fd = efds()
        c.register(fd, fd, 4096)
        with pytest.raises(AbiError):
            c.register(fd, fd, 4096)
        with pytest.raises(AbiError):
            c.report(fd + 1000, 1)
        c.unregister(fd)
        with pytest.raises(AbiError):
            c.report(fd, 1)

    def test_closed_controller_refuses(self, efds):
        """After close, registration raises ClosedError; close is idempotent."""
        c = Controller.create(None).start()
        c.close()
        c.close()
        fd = efds()
        with pytest.raises(ClosedError):
            c.register(fd, fd, 4096)


class TestRequests:
    """Subtract, then signal: the proposal's request."""

    def test_request_subtracts_and_signals(self, efds):
        """The eventfd carries the number of chunks; the count already lost them."""
        c = Controller.create(None)
        fd = efds()
        c.register(fd, fd, 4096)
        c.report(fd, 10)
        assert c.request(fd, 4) == 4
        assert c.count(fd) == 6
        assert read_counter(fd) == 4
        assert [r.chunks for r in c.history()] == [4]

    def test_request_capped_at_count(self, efds):
        """A request larger than the holdings asks only what is held."""
        c = Controller.create(None)
        fd = efds()
        c.register(fd, fd, 4096)
        c.report(fd, 3)
        assert c.request(fd, 100) == 3
        assert read_counter(fd) == 3
        assert c.request(fd, 1) == 0
        assert read_counter(fd) == 0

    def test_unregistered_fd_never_written(self, efds):
        """After unregister, shrink() writes nothing to the old fd."""
        c = Controller.create(None)
        fd = efds()
        c.register(fd, fd, 4096)
        c.report(fd, 10)
        c.unregister(fd)
        assert c.shrink(10 * 4096) == {}
        assert read_counter(fd) == 0

    def test_shrink_in_proportion_to_bytes_over_cost(self, efds):
        """Two shrinkers of different chunk sizes and costs are asked held/cost in proportion."""
        c = Controller.create(None)
        a, b = efds(), efds()
        c.register(a, a, 4096, cost=1.0)
        c.register(b, b, 65536, cost=2.0)
        c.report(a, 10_000)  # ~39 MiB
        c.report(b, 1_000)  # ~62 MiB at cost 2 -> weight ~31 MiB
        asked = c.shrink(20 * MiB)
        bytes_a, bytes_b = asked[a] * 4096, asked[b] * 65536
        weight_a, weight_b = 10_000 * 4096 / 1.0, 1_000 * 65536 / 2.0
        assert bytes_a / bytes_b == pytest.approx(weight_a / weight_b, rel=0.02)
        assert bytes_a + bytes_b >= 20 * MiB
        # Chunk counts asked are in proportion to holdings times weight (1/cost).
        assert (asked[a] / 10_000) / (asked[b] / 1_000) == pytest.approx(2.0, rel=0.03)

    def test_not_first_come_first_asked(self, efds):
        """Unlike the proposal, the first registered shrinker is not drained first."""
        c = Controller.create(None)
        a, b = efds(), efds()
        c.register(a, a, 4096)
        c.register(b, b, 4096)
        c.report(a, 1000)
        c.report(b, 1000)
        asked = c.shrink(400 * 4096)
        assert asked == {a: 200, b: 200}

    def test_hooks_run_and_errors_are_logged(self, efds, caplog):
        """Request hooks see each request; one that raises does not stop the others."""
        c = Controller.create(None)
        fd = efds()
        c.register(fd, fd, 4096)
        c.report(fd, 10)
        seen = []

        def bad(_request):
            raise RuntimeError("hook failed")

        c.add_request_hook(bad)
        c.add_request_hook(seen.append)
        with caplog.at_level(logging.ERROR):
            c.request(fd, 2)
        assert [r.chunks for r in seen] == [2]
        assert "hook failed" in caplog.text

    def test_broken_fd_drops_registration(self, efds):
        """A shrinker whose eventfd cannot be written is dropped, not retried forever."""
        c = Controller.create(None)
        r, w = os.pipe()
        os.close(w)
        try:
            c.register("gone", r, 4096)  # a read-only pipe end: writes fail with EBADF
            c.report("gone", 5)
            assert c.request("gone", 1) == 0
            assert c.shrinkers() == []
        finally:
            os.close(r)


class TestLevels:
    """Level listeners hear their level and those above."""

    def test_listeners_hear_their_level_and_above(self, efds):
        """A MEDIUM event reaches LOW and MEDIUM listeners, not OOM ones."""
        c = Controller.create(None)
        low, medium, oom = efds(), efds(), efds()
        c.register_level(low, low, Level.LOW)
        c.register_level(medium, medium, Level.MEDIUM)
        c.register_level(oom, oom, Level.OOM)
        assert c.notify_level(Level.MEDIUM) == 2
        assert (read_counter(low), read_counter(medium), read_counter(oom)) == (1, 1, 0)


class TestEvaluate:
    """Watermarks, in-flight requests and escalation, on scripted readings."""

    def make(self, efds, *, limit=256 * MiB, **config):
        # The fixed rule's watermarks (Watermarks.for_limit): these tests are about requests in
        # flight and escalation; TestAdaptiveWatermarks is about where the watermarks go.
        config.setdefault("headroom", 32 * MiB)
        memory = ScriptedMemory.with_limit(limit)
        c = Controller.create(memory, config=ControllerConfig(**config))
        c._rewatermark()
        fd = efds()
        c.register(fd, fd, MiB)
        c.report(fd, 1000)
        return c, memory, fd

    def test_nothing_below_high(self, efds):
        """Below the high watermark nothing is asked."""
        c, memory, fd = self.make(efds)
        memory.set(200 * MiB)
        c.evaluate()
        assert read_counter(fd) == 0

    def test_down_to_low_watermark(self, efds):
        """At the high watermark, enough is asked to reach the low one."""
        c, memory, fd = self.make(efds)
        marks = Watermarks.for_limit(256 * MiB)
        memory.set(marks.high + 5 * MiB)
        c.evaluate()
        asked = read_counter(fd)
        assert asked * MiB >= marks.high + 5 * MiB - marks.low
        assert asked * MiB < marks.high + 5 * MiB - marks.low + MiB

    def test_in_flight_not_asked_twice(self, efds):
        """A request still in flight is not asked again; a dip of 1 MiB settles 1 MiB of it,
        not all of it (issue 12: every request was cancelled and a second full one sent)."""
        c, memory, fd = self.make(efds, grace=60.0)
        marks = Watermarks.for_limit(256 * MiB)
        memory.set(marks.high + MiB)
        c.evaluate()
        first = read_counter(fd)
        assert first * MiB == marks.high + MiB - marks.low
        c.evaluate()
        assert read_counter(fd) == 0
        memory.set(marks.high)  # 1 MiB of it showed
        c.evaluate()
        assert read_counter(fd) == 0

    def test_given_back_is_asked_of_the_others(self, efds):
        """What a shrinker gives back (re-adds) no longer counts as in flight."""
        c, memory, fd = self.make(efds, grace=60.0)
        marks = Watermarks.for_limit(256 * MiB)
        memory.set(marks.high + MiB)
        c.evaluate()
        assert read_counter(fd) > 0
        c.report(fd, 10)  # could not free 10 MiB of it
        c.evaluate()
        assert read_counter(fd) == 10

    def test_a_reading_begun_before_a_request_does_not_judge_it(self, efds):
        """The time a reading is judged by is taken before it is read."""
        c, memory, fd = self.make(efds, grace=0.05)
        marks = Watermarks.for_limit(256 * MiB)
        memory.set(marks.high + MiB)
        c.evaluate()
        assert read_counter(fd) > 0
        with c._lock:
            (round_,) = c._in_flight
            # A reading that began before the round was sent shows none of it, whenever it
            # is judged, even after the grace.
            assert c._in_flight_bytes(round_.sent_at - 1e-6, marks.high + MiB) == round_.asked
        time.sleep(0.06)
        c.evaluate()  # the grace is over: asked again
        assert read_counter(fd) > 0

    def test_grace_follows_reclaim_times(self, efds):
        """Rounds that take 40 ms to show make the grace 80 ms (twice the median)."""
        c, memory, fd = self.make(efds, grace=0.005)
        marks = Watermarks.for_limit(256 * MiB)
        for _ in range(5):
            memory.set(marks.high + MiB)
            c.evaluate()
            assert read_counter(fd) > 0
            time.sleep(0.04)
            memory.set(marks.low)
            c.evaluate()
            c.report(fd, 100)
        assert 0.07 <= c.current_grace() <= 0.25

    def test_escalation_levels_gc_and_trim(self, efds, monkeypatch):
        """Memory stuck above the watermark: medium, then gc + malloc_trim + oom."""
        c, memory, _ = self.make(efds, escalate_after=0.0, grace=0.0)
        levels = {lvl: efds() for lvl in Level}
        for lvl, lfd in levels.items():
            c.register_level(("level", lvl), lfd, lvl)
        collected = []
        monkeypatch.setattr("pyshrinker.controller.gc.collect", lambda: collected.append(1))
        memory.set(255 * MiB)
        c.evaluate()  # episode starts: LOW, then step 1: MEDIUM
        assert read_counter(levels[Level.LOW]) >= 1
        assert read_counter(levels[Level.MEDIUM]) == 1
        assert read_counter(levels[Level.OOM]) == 0
        c.evaluate()  # step 2: gc, trim, OOM
        assert collected == [1]
        assert read_counter(levels[Level.OOM]) == 1
        for _ in range(5):
            c.evaluate()
        assert len(collected) <= 2  # bounded by max_escalation
        memory.set(10 * MiB)  # episode over
        c.evaluate()
        assert c._episode_step == 0

    def test_no_limit_asks_nothing(self, efds):
        """Without a limit there are no watermarks."""
        memory = ScriptedMemory(
            ScriptedMemory.with_limit(MiB).version, "scripted"
        )  # limit None by default
        c = Controller.create(memory)
        fd = efds()
        c.register(fd, fd, MiB)
        c.report(fd, 10)
        c.evaluate()
        assert read_counter(fd) == 0


class TestHostileClaims:
    """Issue 9: a shrinker claiming 2**48 chunks cannot take all the asks."""

    def make(self, efds, **config):
        memory = ScriptedMemory.with_limit(256 * MiB, 250 * MiB)  # high 224, low 192 MiB
        config.setdefault("headroom", 32 * MiB)  # the fixed rule's watermarks
        c = Controller.create(memory, config=ControllerConfig(**config))
        liar, honest = efds(), efds()
        c.register(liar, liar, 4096)
        c.register(honest, honest, 4096)
        c.report(liar, 2**48)
        c.report(honest, 200 * 256)  # 200 MiB
        return c, memory, liar, honest

    def test_claim_weighs_at_most_the_working_set(self, efds):
        """Before: the honest shrinker was asked one chunk; now its share against 250 MiB."""
        c, _, _, honest = self.make(efds)
        c.evaluate()
        need = 58 * MiB
        asked = read_counter(honest) * 4096
        assert asked == pytest.approx(need * 200 / 450, abs=4096)

    def test_a_round_that_did_not_help_asks_the_others(self, efds):
        """Usage did not fall after the liar was asked the most: it weighs 1/16 from then on."""
        c, memory, liar, honest = self.make(efds, escalate_after=0.05, grace=0.0)
        c.evaluate()
        first = read_counter(honest)
        read_counter(liar)
        time.sleep(0.06)
        c.evaluate()  # judged: the working set did not move
        second = read_counter(honest) * 4096
        held = 200 * MiB - first * 4096
        assert second == pytest.approx(58 * MiB * held / (held + 250 * MiB / 16), abs=4096)
        memory.set(100 * MiB)  # the episode is over: everyone trusted again
        c.evaluate()
        memory.set(250 * MiB)
        c.evaluate()
        assert read_counter(honest) * 4096 < second / 2

    def test_a_round_that_helped_changes_nothing(self, efds):
        """A round after which usage fell by half of what it asked leaves the liar trusted."""
        c, memory, _, honest = self.make(efds, escalate_after=0.05, grace=0.0)
        c.evaluate()
        held = 200 * MiB - read_counter(honest) * 4096
        memory.set(220 * MiB)  # fell by 30 MiB, more than half of the 58 MiB asked
        c.evaluate()
        time.sleep(0.06)
        memory.set(250 * MiB)
        c.evaluate()
        asked = read_counter(honest) * 4096
        assert asked == pytest.approx(58 * MiB * held / (held + 250 * MiB), abs=4096)


class TestBoundedBooks:
    """Issue 9: what the controller remembers per request stays bounded."""

    def test_in_flight_bounded_without_evaluations(self, efds):
        """Shrinks with no evaluation between them (pyshrinkerd's test control, many shrinkers):
        expired in-flight entries go when the next request is sent (before: only on evaluate)."""
        c = Controller.create(None, config=ControllerConfig(grace=0.0))
        for fd in [efds() for _ in range(10)]:
            c.register(fd, fd, 4096)
            c.report(fd, 10_000)
        for _ in range(200):
            assert sum(c.shrink(10 * 4096).values()) == 10
        assert len(c._in_flight) <= 10
        assert len(c._rounds) <= 64


class TestThread:
    """The background thread reacts to readings and stops cleanly."""

    def test_polls_budget_like_source_and_asks(self, efds):
        """With no notifier, adaptive polling notices memory crossing the watermark."""
        memory = ScriptedMemory.with_limit(256 * MiB, working_set=10 * MiB)
        with private_controller(memory) as (c, _):
            fd = efds()
            c.register(fd, fd, MiB)
            c.report(fd, 100)
            memory.set(250 * MiB)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            assert poller.poll(5000), "controller never asked"
            assert read_counter(fd) > 0

    def test_close_joins_thread(self):
        """close() joins the controller thread and is idempotent."""
        c = Controller.create(ScriptedMemory.with_limit(MiB * 256)).start()
        thread = c._thread
        c.close()
        c.close()
        assert thread is not None and not thread.is_alive()


class TestAdaptiveWatermarks:
    """The default watermarks follow the growth measured (issue 13): close to the limit while
    memory grows slowly, the fixed rule's margin at once when it races."""

    NARROW = Watermarks(256 * MiB, 248 * MiB, 247 * MiB)

    @pytest.fixture(autouse=True)
    def trust_at_once(self, monkeypatch):
        """The rule applies at once here (by default after 1 s of measuring: TRUST_AFTER)."""
        monkeypatch.setattr(policy, "TRUST_AFTER", 0.0)

    def test_a_second_of_measuring_first(self, efds, monkeypatch):
        """Under TRUST_AFTER of measuring (a controller that just took over), the fixed rule's
        watermarks even after a round showed."""
        monkeypatch.setattr(policy, "TRUST_AFTER", 0.3)
        c, _, _ = self.make(efds, first_low=192)  # the fixed rule's band too
        assert c.watermarks == Watermarks.for_limit(256 * MiB)
        time.sleep(0.31)
        c.evaluate()
        assert c.watermarks == self.NARROW

    def make(self, efds, first_low=223, **config):
        """A controller whose first request showed: 250 MiB asks down to ``first_low`` MiB,
        which is read. The first episode has the fixed rule's high watermark (224 MiB) and,
        once growth was measured for TRUST_AFTER, the band that growth needs: nothing grew, the
        least (1 MiB); before, the fixed rule's low watermark (192 MiB)."""
        memory = ScriptedMemory.with_limit(256 * MiB, 250 * MiB)
        c = Controller.create(memory, config=ControllerConfig(**config))
        fd = efds()
        c.register(fd, fd, MiB)
        c.report(fd, 100)  # before the first reading: not counted as growth
        c.evaluate()
        assert read_counter(fd) == 250 - first_low
        memory.set(first_low * MiB)
        c.evaluate()
        return c, memory, fd

    def test_the_first_episode_asks_for_the_band_growth_needs(self, efds):
        """Before a round showed, growth measured at 100 MB/s: the fixed rule's high watermark
        (224 MiB) with a band of about 20 ms of that growth (2 MiB), not the fixed rule's 32."""
        memory = ScriptedMemory.with_limit(256 * MiB, 100 * MiB)
        c = Controller.create(memory)
        fd = efds()
        c.register(fd, fd, MiB)
        c.evaluate()
        for ws in range(101, 141):
            time.sleep(0.01)
            memory.set(ws * MiB)
            c.report(fd, 1)
            c.evaluate()
        marks = c.watermarks
        assert marks is not None
        assert marks.high == Watermarks.for_limit(256 * MiB).high
        assert MiB <= marks.high - marks.low <= 4 * MiB  # 1 MiB if the sleeps ran late
        memory.set(225 * MiB)
        c.evaluate()
        assert 2 <= read_counter(fd) <= 5  # down to the low watermark: 225 - (224 - band)

    def test_with_two_processes_the_first_episode_keeps_the_fixed_band(self, efds):
        """Shrinkers of two processes (keys (pid, efd), as the doors register them): who frees
        is not known yet, and the first episode is the fixed rule's, band included."""
        memory = ScriptedMemory.with_limit(256 * MiB, 100 * MiB)
        c = Controller.create(memory)
        mine, theirs = efds(), efds()
        c.register((1, mine), mine, MiB)
        c.register((2, theirs), theirs, MiB)
        c.evaluate()
        assert c.watermarks == Watermarks.for_limit(256 * MiB)
        c.unregister((2, theirs))
        c.evaluate()
        assert c.watermarks == Watermarks(256 * MiB, 224 * MiB, 223 * MiB)

    def test_the_first_episode_keeps_the_most_headroom(self, efds):
        """Before any request showed: the fixed rule's headroom, with the least band (nothing
        grew); after, 8 MiB under 256 MiB (the least headroom, the least band)."""
        memory = ScriptedMemory.with_limit(256 * MiB, 10 * MiB)
        c = Controller.create(memory)
        c.evaluate()
        assert c.watermarks == Watermarks(256 * MiB, 224 * MiB, 223 * MiB)
        c, _, _ = self.make(efds)
        assert c.watermarks == self.NARROW

    def test_slow_growth_runs_close_to_the_limit(self, efds):
        """1 MiB every 10 ms (100 MB/s) reported and read: 10 MiB under the limit (100 MB/s x
        0.1 s, the least reaction assumed; less if the sleeps ran late), a band of about 20 ms
        of growth."""
        c, memory, fd = self.make(efds)
        for ws in range(193, 233):
            time.sleep(0.01)
            memory.set(ws * MiB)
            c.report(fd, 1)
            c.evaluate()
        marks = c.watermarks
        assert marks is not None
        assert 246 * MiB <= marks.high <= 248 * MiB
        assert MiB <= marks.high - marks.low <= 4 * MiB  # 1 MiB if the sleeps ran late

    def test_a_burst_widens_the_margin_at_once(self, efds):
        """240 MiB asks nothing while growth is slow; 1000 MiB reported in 10 ms makes the
        headroom the fixed rule's, and the same reading asks down to the new low watermark.
        (A grace of 50 ms at least: 1 GB/s fills the most headroom even if sleeps run late.)"""
        c, memory, fd = self.make(efds, grace=0.05)
        memory.set(240 * MiB)
        c.report(fd, 48)  # the 48 MiB it grew by, slowly
        time.sleep(1.0)
        c.evaluate()
        assert read_counter(fd) == 0
        c.report(fd, 1000)
        time.sleep(0.03)  # a rate is measured over 20 ms at least
        c.evaluate()
        assert c.watermarks == Watermarks.for_limit(256 * MiB)
        assert read_counter(fd) * MiB >= 240 * MiB - Watermarks.for_limit(256 * MiB).low

    def test_re_adds_are_not_growth(self, efds):
        """Chunks given back after a request (it could not free them) are no growth."""
        c, _, fd = self.make(efds, grace=60.0)
        assert c.request(fd, 30) == 30
        assert read_counter(fd) == 30
        c.report(fd, 30)  # none of it could be freed
        time.sleep(0.03)  # a window of 20 ms at least
        c.evaluate()
        assert c.growth()[0] == 0.0
        c.report(fd, 30)  # 30 new chunks: growth
        time.sleep(0.03)
        c.evaluate()
        assert c.growth()[0] > 0.0

    def test_a_rise_after_a_request_widens_the_margin(self, efds):
        """Memory read 10 MiB above where a request was decided, before it showed: at least
        20 MiB of headroom from then on."""
        c, memory, fd = self.make(efds, grace=60.0)
        memory.set(253 * MiB)
        c.evaluate()
        assert read_counter(fd) > 0
        memory.set(263 * MiB)
        c.evaluate()
        assert c.growth()[1] == pytest.approx(10 * MiB, rel=0.01)
        marks = c.watermarks
        assert marks is not None and marks.high <= 236 * MiB

    def test_an_owner_that_does_not_free_widens_the_margin(self, efds):
        """An owner distrusted (its round did not lower usage) held the episode up for
        escalate_after: the headroom covers that long of growth from then on, not 0.1 s."""
        c, memory, fd = self.make(efds, grace=0.005, escalate_after=0.3)
        c.report(fd, 27)
        memory.set(250 * MiB)  # 27 MiB in about 0.2 s: some 140 MB/s
        time.sleep(0.2)
        c.evaluate()
        assert read_counter(fd) > 0  # 140 MB/s x 0.1 s: 14 MB of headroom, asked at 250
        before = c.watermarks
        time.sleep(0.32)
        c.evaluate()  # nothing showed: judged, distrusted
        assert c.distrusted() == [fd]
        c.evaluate()
        after = c.watermarks
        assert before is not None and after is not None
        assert after.high < before.high

    def test_the_margin_narrows_again(self, efds, monkeypatch):
        """The measured peak halves every half-life: after a burst, back near the limit."""
        monkeypatch.setattr(policy, "GROWTH_HALF_LIFE", 0.02)
        c, _, fd = self.make(efds, grace=0.05)
        c.report(fd, 1000)
        time.sleep(0.03)
        c.evaluate()
        assert c.watermarks == Watermarks.for_limit(256 * MiB)
        time.sleep(0.5)  # 25 half-lives
        c.evaluate()
        assert c.watermarks == self.NARROW

    def test_many_processes_on_few_cpus_widen_the_margin(self, efds, monkeypatch):
        """8 processes' shrinkers on 2 CPUs: the headroom covers 0.4 s of growth (least_reaction),
        not the 0.1 s one process is given; with 2 processes, the narrow watermarks stay."""
        import pyshrinker.controller as controller_module

        monkeypatch.setattr(controller_module, "_cpus", lambda: 2)
        c, memory, fd = self.make(efds)
        for ws in range(193, 213):  # 100 MB/s, as in test_slow_growth_runs_close_to_the_limit
            time.sleep(0.01)
            memory.set(ws * MiB)
            c.report(fd, 1)
            c.evaluate()
        one = c.watermarks
        assert one is not None and one.high >= 246 * MiB
        others = [efds() for _ in range(7)]
        for pid, other in enumerate(others[:1], start=1000):
            c.register((pid, other), other, MiB)
        c.evaluate()
        assert c.watermarks == one  # 2 processes on 2 CPUs
        for pid, other in enumerate(others[1:], start=2000):
            c.register((pid, other), other, MiB)
        c.evaluate()
        marks = c.watermarks
        assert marks is not None
        # 100 MB/s x 0.4 s: 40 MB of headroom, beyond the most (32 MiB: the fixed rule's); at
        # least 24 MiB even if the sleeps ran late and measured less growth.
        assert marks.high <= 232 * MiB

    def test_oom_level_pressure_boosts_the_headroom(self, efds):
        """After an OOM-level event the headroom is the most, whatever the growth."""
        c, _, _ = self.make(efds)
        c._boost_headroom()
        c.evaluate()
        marks = c.watermarks
        assert marks is not None and marks.high == Watermarks.for_limit(256 * MiB).high

    def test_bounds_and_fixed_headroom(self, efds):
        """min_headroom raises the least; an explicit headroom is the fixed rule."""
        c, _, _ = self.make(efds, min_headroom=16 * MiB)
        assert c.watermarks is not None and c.watermarks.high == 240 * MiB  # 16 MiB
        memory = ScriptedMemory.with_limit(256 * MiB, 10 * MiB)
        c = Controller.create(memory, config=ControllerConfig(headroom=0.125))
        c.evaluate()
        assert c.watermarks == Watermarks.for_limit(256 * MiB)


class TestDirectEvaluation:
    """A report of new chunks near the watermark is decided on the reporting thread."""

    def test_report_asks_synchronously(self, efds):
        """Crossing the high watermark, report() itself signals: no wait for the thread."""
        memory = ScriptedMemory.with_limit(256 * MiB, working_set=10 * MiB)
        # The thread stays asleep; the fixed rule's watermarks (high at 224 MiB).
        config = {"shortest_poll": 60.0, "longest_poll": 60.0, "headroom": 32 * MiB}
        with private_controller(memory, **config) as (c, _):
            fd = efds()
            c.register(fd, fd, MiB)
            c.report(fd, 100)
            c.evaluate()  # a first reading, far from the watermark
            assert read_counter(fd) == 0
            memory.set(250 * MiB)
            c.report(fd, 120)  # 120 MiB more: over half the 214 MiB left to the watermark
            assert read_counter(fd) > 0
            assert c.history()[-1].reason == "direct"

    def test_small_growth_far_from_watermark_reads_nothing(self, efds):
        """Far from the watermark, a small report costs no reading."""
        memory = ScriptedMemory.with_limit(256 * MiB, working_set=10 * MiB)
        with private_controller(memory, shortest_poll=60.0, longest_poll=60.0) as (c, _):
            fd = efds()
            c.register(fd, fd, MiB)
            c.evaluate()
            reads = memory.reads
            c.report(fd, 1)
            assert memory.reads == reads

    def test_direct_evaluation_never_escalates(self, efds, monkeypatch):
        """Stuck above the watermark, reports never run gc.collect on their thread."""
        memory = ScriptedMemory.with_limit(256 * MiB, working_set=255 * MiB)
        collected = []
        monkeypatch.setattr("pyshrinker.controller.gc.collect", lambda: collected.append(1))
        config = {"shortest_poll": 60.0, "longest_poll": 60.0, "escalate_after": 0.0}
        with private_controller(memory, **config) as (c, _):
            fd = efds()
            c.register(fd, fd, MiB)
            for _ in range(5):
                c.report(fd, 300)
            assert collected == []


class _DrainableThreshold:
    """A stand-in for a usage threshold: an eventfd the test signals, drained by consume()."""

    threshold = 0
    events = select.POLLIN

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def consume(self) -> bool:
        return read_counter(self.fd) > 0

    def close(self) -> None:
        """The fd is the efds fixture's to close."""


class TestControllerThreadReads:
    """When the controller thread reads memory after a wake-up."""

    def test_a_drained_threshold_is_read_only_at_the_threads_pace(self, efds, monkeypatch):
        """A threshold a reporting thread already drained (and read after) is not read again at
        once; once episode_poll has passed since the thread's own reading it is, since only the
        thread's readings escalate. A threshold still signalled is always read."""
        evaluations: list[str] = []
        monkeypatch.setattr(
            Controller, "_evaluate", lambda self, reason, escalate=True: evaluations.append(reason)
        )
        c = Controller.create(ScriptedMemory.with_limit(256 * MiB))
        fd = efds()
        c._thresholds = [_DrainableThreshold(fd)]
        event = [(fd, select.POLLIN)]
        c._handle(event)  # the thread has not read yet
        assert evaluations == ["poll"]
        c._handle(event)  # drained, and the thread read a moment ago
        assert evaluations == ["poll"]
        os.write(fd, (1).to_bytes(8, "little"))
        c._handle(event)  # signalled: read
        assert evaluations == ["poll", "usage threshold"]
        c._thread_read_at -= c.config.episode_poll
        c._handle(event)  # drained, but the thread's own reading is episode_poll old
        assert evaluations == ["poll", "usage threshold", "poll"]
        c._handle([])  # a timed wake-up always reads
        assert len(evaluations) == 4
        c.close()


class TestParseSize:
    """Sizes as people write them."""

    @pytest.mark.parametrize(
        ("text", "value"),
        [("8G", 8 << 30), ("256M", 256 << 20), ("512KiB", 512 << 10), ("100", 100), ("1.5K", 1536)],
    )
    def test_sizes(self, text, value):
        """Suffixes are powers of 1024."""
        assert parse_size(text) == value

    @pytest.mark.parametrize("text", ["", "G", "-1M", "lots", "8X"])
    def test_bad_sizes(self, text):
        """Anything else is a ValueError."""
        with pytest.raises(ValueError):
            parse_size(text)


def _hold_threshold_registrations(monkeypatch) -> tuple[threading.Event, list[threading.Thread]]:
    """Make each v1 usage-threshold registration wait for the returned event (at most 10 s);
    the list gets the thread of each registration."""
    release = threading.Event()
    registered_by: list[threading.Thread] = []
    real_register = UsageThreshold.register.__func__  # type: ignore[attr-defined]

    def held_register(cls, path, at):
        registered_by.append(threading.current_thread())
        release.wait(10)
        return real_register(cls, path, at)

    monkeypatch.setattr(UsageThreshold, "register", classmethod(held_register))
    return release, registered_by


class TestRealCgroup:
    """The controller on a real v1 group: thresholds drive requests; removal loses nothing."""

    def test_threshold_in_real_group_drives_request(self, v1_group, efds):
        """A child filling a real group past the high watermark makes the controller ask us."""
        group = v1_group(64 * MiB)
        c = Controller.create(CgroupV1.open(group.path))
        fd = efds()
        c.register(fd, fd, MiB)
        c.report(fd, 100)
        c.start()
        child = group.spawn(
            [
                "python3",
                "-c",
                "import time; b = bytearray(60 << 20); print('ok', flush=True); time.sleep(60)",
            ]
        )
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            assert poller.poll(10_000), "no request after the group crossed its watermark"
            assert read_counter(fd) > 0
            assert any(r.reason == "usage threshold" for r in c.history())
        finally:
            child.kill()
            child.wait()
            c.close()

    def test_thresholds_move_on_the_controller_thread(self, v1_group, efds, monkeypatch):
        """A reporting thread that reads a new limit goes on at once: the controller thread
        registers the thresholds for the new watermarks (each registration waits for an RCU
        grace period in the kernel, 7-50 ms), and the old ones stay armed until then."""
        group = v1_group(128 * MiB)
        c = Controller.create(CgroupV1.open(group.path), config=ControllerConfig(headroom=16 * MiB))
        fd = efds()
        c.register(fd, fd, MiB)
        c.start()
        before = c.describe_signals()  # once the thread has armed the first thresholds
        release, registered_by = _hold_threshold_registrations(monkeypatch)
        try:
            group.write("memory.limit_in_bytes", str(96 * MiB))
            c.report(fd, 4)  # recheck_bytes of growth: this thread reads at once
            assert c.watermarks == Watermarks(limit=96 * MiB, high=80 * MiB, low=64 * MiB)
            assert not release.is_set() and threading.current_thread() not in registered_by
            assert c.describe_signals() == before  # the old thresholds, still armed
            deadline = time.monotonic() + 10
            while not registered_by and time.monotonic() < deadline:
                time.sleep(0.01)
            assert registered_by and all(t is c._thread for t in registered_by)
            release.set()
            wanted = [f"usage threshold at {at} bytes" for at in (80 * MiB, 88 * MiB)]
            while time.monotonic() < deadline:
                signals = " ".join(c.describe_signals())
                if all(each in signals for each in wanted):
                    break
                time.sleep(0.01)
            assert all(each in " ".join(c.describe_signals()) for each in wanted)
        finally:
            release.set()
            c.close()

    def test_start_leaves_arming_the_thresholds_to_the_thread(self, v1_group, efds, monkeypatch):
        """start() (the application creating its first cache) does not wait for the kernel's
        RCU grace periods: the controller thread registers the v1 usage thresholds, and
        describe_signals() waits for it; reports go on meanwhile, checked by distance."""
        group = v1_group(128 * MiB)
        c = Controller.create(CgroupV1.open(group.path), config=ControllerConfig(headroom=16 * MiB))
        fd = efds()
        c.register(fd, fd, MiB)
        release, registered_by = _hold_threshold_registrations(monkeypatch)
        try:
            c.start()
            assert not release.is_set() and threading.current_thread() not in registered_by
            c.report(fd, 4)  # the reporting thread is not held either
            assert c.count(fd) == 4
            deadline = time.monotonic() + 10
            while not registered_by and time.monotonic() < deadline:
                time.sleep(0.01)
            assert registered_by and all(t is c._thread for t in registered_by)
            assert c._thresholds == []
            release.set()
            signals = " ".join(c.describe_signals())  # waits for the arming
            for at in (112 * MiB, 120 * MiB):
                assert f"usage threshold at {at} bytes" in signals
            assert c.watermarks is not None and c.watermarks.high == 112 * MiB
        finally:
            release.set()
            c.close()

    def test_removed_cgroup_while_listening(self, v1_group, efds, caplog):
        """Removing the watched group is logged; registrations and counts survive."""
        group = v1_group(64 * MiB)
        c = Controller.create(CgroupV1.open(group.path))
        fd = efds()
        c.register(fd, fd, MiB)
        c.report(fd, 7)
        c.start()
        try:
            with caplog.at_level(logging.ERROR, logger="pyshrinker.controller"):
                group.remove()  # the kernel signals every registered eventfd on removal
                deadline = time.monotonic() + 5
                while "memory cgroup gone" not in caplog.text and time.monotonic() < deadline:
                    time.sleep(0.01)
            assert "memory cgroup gone" in caplog.text
            assert c.count(fd) == 7
            c.report(fd, 1)
            assert c.request(fd, 3) == 3
            assert c.count(fd) == 5
            assert c._thread is not None and c._thread.is_alive()
            # It moved on to the cgroup this process is really in.
            assert c.memory is None or c.memory.path != group.path
        finally:
            c.close()
