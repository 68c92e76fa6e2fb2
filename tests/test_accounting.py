"""The books balance: after every quiescent point the controller counts what the caches hold."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pyshrinker import ChunkCache, Shrinker, settle
from pyshrinker.controller import Controller
from pyshrinker.transport import EmbeddedTransport

from .helpers import private_controller

keys = st.integers(0, 30)


class RawHolder:
    """A bare Shrinker client whose reclaim can free all, part, or raise."""

    def __init__(self) -> None:
        self.held = 0
        self.mode = "all"

    def reclaim(self, n: int) -> int:
        if self.mode == "raise":
            raise RuntimeError("raw reclaim failed")
        freed = min(self.held, n if self.mode == "all" else n // 3)
        self.held -= freed
        return freed


class Books(RuleBasedStateMachine):
    """Random allocs, frees, pins, requests larger than holdings, partial frees and raises."""

    def __init__(self) -> None:
        super().__init__()
        self.controller = Controller.create(None).start()
        transport = EmbeddedTransport(self.controller)
        self.caches = [
            ChunkCache(4096, cost=1.0, transport=transport, name="small"),
            ChunkCache(65536, cost=4.0, transport=transport, name="large"),
        ]
        self.raw = RawHolder()
        self.shrinker = Shrinker.register(1 << 20, self.raw.reclaim, transport=transport)
        self.pins = ExitStack()
        self.pinned: set[tuple[int, int]] = set()

    @rule(which=st.integers(0, 1), key=keys, chunks=st.integers(1, 8))
    def put(self, which: int, key: int, chunks: int) -> None:
        self.caches[which].put(key, object(), chunks=chunks)

    @rule(which=st.integers(0, 1), key=keys)
    def pop(self, which: int, key: int) -> None:
        self.caches[which].pop(key, None)
        self.pinned.discard((which, key))

    @rule(which=st.integers(0, 1), key=keys)
    def pin(self, which: int, key: int) -> None:
        cache = self.caches[which]
        if key in cache and (which, key) not in self.pinned:
            self.pins.enter_context(cache.pinned(key))
            self.pinned.add((which, key))

    @precondition(lambda self: self.pinned)
    @rule()
    def unpin_all(self) -> None:
        self.pins.close()
        self.pins = ExitStack()
        self.pinned.clear()

    @rule(which=st.integers(0, 1), factor=st.floats(0.1, 3.0))
    def request(self, which: int, factor: float) -> None:
        cache = self.caches[which]
        cache.flush()
        self.controller.request(cache.shrinker.efd, int(cache.chunks * factor) + 1)
        assert settle()

    @rule(nbytes=st.integers(1, 4 << 20))
    def shrink_all(self, nbytes: int) -> None:
        for cache in self.caches:
            cache.flush()
        self.shrinker.flush()
        self.controller.shrink(nbytes)
        assert settle()

    @rule(n=st.integers(1, 20))
    def raw_alloc(self, n: int) -> None:
        self.raw.held += n
        self.shrinker.report(n)

    @rule(n=st.integers(1, 20))
    def raw_free(self, n: int) -> None:
        n = min(n, self.raw.held)
        self.raw.held -= n
        if n:
            self.shrinker.report(-n)

    @rule(mode=st.sampled_from(["all", "partial", "raise"]))
    def raw_mode(self, mode: str) -> None:
        self.raw.mode = mode

    @rule(factor=st.floats(0.1, 3.0))
    def raw_request(self, factor: float) -> None:
        self.shrinker.flush()
        self.controller.request(self.shrinker.efd, int(self.raw.held * factor) + 1)
        assert settle()

    @invariant()
    def books_balance(self) -> None:
        for cache in self.caches:
            cache.flush()
            assert self.controller.count(cache.shrinker.efd) == cache.chunks
            for which, key in self.pinned:
                if self.caches[which] is cache:
                    assert key in cache, "a pinned entry was freed"
        self.shrinker.flush()
        assert self.controller.count(self.shrinker.efd) == self.raw.held

    def teardown(self) -> None:
        self.pins.close()
        for cache in self.caches:
            cache.close()
        self.shrinker.close()
        self.controller.close()


TestBooks = Books.TestCase
TestBooks.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


class TestProportion:
    """Two ChunkCaches with different chunk sizes and costs are asked in proportion."""

    def test_asked_in_proportion_to_held_over_cost(self):
        """Bytes evicted from each cache follow held bytes / cost."""
        with private_controller() as (controller, transport):
            small = ChunkCache(4096, cost=1.0, transport=transport)  # 40 MiB held, weight 40
            large = ChunkCache(1 << 20, cost=2.0, transport=transport)  # 60 MiB held, weight 30
            try:
                for i in range(10_240):
                    small.put(i, None)
                for i in range(60):
                    large.put(i, None)
                small.flush()
                large.flush()
                controller.shrink(35 << 20)
                assert settle()
                freed_small = small.stats().evicted_on_request * 4096
                freed_large = large.stats().evicted_on_request * (1 << 20)
                assert freed_small / freed_large == pytest.approx(40 / 30, rel=0.05)
                assert freed_small + freed_large >= 35 << 20
                assert controller.count(small.shrinker.efd) == small.chunks
                assert controller.count(large.shrinker.efd) == large.chunks
            finally:
                small.close()
                large.close()
