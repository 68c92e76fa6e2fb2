"""ShrinkableTTLCache and ShrinkableTLRUCache: what memory pressure adds to cachetools' contract.

The contract itself is cachetools' own test suite (tests/upstream/test_cachetools_suite.py);
here: expired entries go first when memory is asked for, the expiry times stay in step with the
C core's entries whoever removes them, copies keep the times, and threads with requests.
"""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pyshrinker import (
    Controller,
    EmbeddedTransport,
    ShrinkableTLRUCache,
    ShrinkableTTLCache,
    settle,
)
from pyshrinker._lru import LRUCore

from .helpers import private_controller
from .test_lru import count, request


class Clock:
    """A timer the test moves."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def hundred(value: object) -> int:
    """Every entry is 100 bytes (a module-level function: pickled by reference)."""
    return 100


def ten_more(key: object, value: object, now: int) -> int:
    """A TLRU entry's time to use: 10 after it was set."""
    return now + 10


@pytest.fixture
def ctl() -> Iterator[tuple[Controller, EmbeddedTransport]]:
    with private_controller() as pair:
        yield pair


@pytest.fixture(params=["ttl", "tlru"])
def timed(request: Any, ctl: tuple[Controller, EmbeddedTransport]) -> Iterator[Any]:
    """Make a TTL (ttl=10) or a TLRU (ttu: now + 10) cache on a Clock, each entry 100 bytes."""
    made: list[Any] = []

    def make(maxsize: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("transport", ctl[1])
        kwargs.setdefault("memsize", hundred)
        kwargs.setdefault("chunk_size", 100)
        kwargs.setdefault("batch_bytes", 0)
        clock = Clock()
        if request.param == "ttl":
            cache = ShrinkableTTLCache(maxsize, ttl=10, timer=clock, **kwargs)
        else:
            cache = ShrinkableTLRUCache(maxsize, ttu=ten_more, timer=clock, **kwargs)
        made.append(cache)
        return cache, clock

    yield make
    for cache in made:
        cache.close()


def consistent(cache: Any) -> None:
    """Every entry of the C core has its expiry time, and only they."""
    cache._check()
    keys = [key for key, _value in cache._items()]
    assert sorted(keys) == sorted(cache._expires), (keys, cache._expires)


class TestRequests:
    def test_expired_go_first(self, timed, ctl):
        """Expired entries are dropped first, though used most recently; then LRU ones."""
        cache, clock = timed()
        cache["old1"] = cache["old2"] = 1
        clock.now = 5
        cache["new1"] = cache["new2"] = cache["new3"] = 2
        clock.now = 11  # old1, old2 expired (not yet dropped)
        LRUCore.get(cache, "old1")
        LRUCore.get(cache, "old2")
        assert count(ctl, cache) == 5
        request(ctl, cache, 2)
        assert sorted(cache) == ["new1", "new2", "new3"]
        assert count(ctl, cache) == 3 == cache.chunks
        assert cache.stats().evicted_on_request == 2
        consistent(cache)

    def test_then_least_recently_used(self, timed, ctl):
        """Asked for more than expired: the rest comes least recently used first."""
        evicted: list[Any] = []
        cache, clock = timed(on_evict=lambda k, v: evicted.append(k))
        cache["old"] = 1
        clock.now = 5
        cache["a"] = cache["b"] = cache["c"] = 2
        cache["a"]  # b is now least recently used
        clock.now = 11
        request(ctl, cache, 2)
        assert sorted(cache) == ["a", "c"]
        assert sorted(evicted) == ["b", "old"]
        assert count(ctl, cache) == 2
        consistent(cache)

    def test_times_follow_every_removal(self, timed, ctl):
        """maxsize evictions, requests, del, pop, popitem, clear: the times go with entries."""
        cache, clock = timed(5)
        for i in range(6):
            cache[i] = i
        consistent(cache)
        request(ctl, cache, 1)
        consistent(cache)
        del cache[5]
        cache.pop(4)
        cache.popitem()
        consistent(cache)
        cache.update({7: 7, 8: 8})
        clock.now = 100
        assert len(cache) == 0
        consistent(cache)
        cache[9] = 9
        cache.clear()
        consistent(cache)
        assert len(cache._expires) == 0


class TestCopies:
    @pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
    def test_times_kept(self, timed, how):
        """A copy's entries expire when the source's do (on its own timer, for deepcopy)."""
        cache, clock = timed()
        cache["a"] = 1
        clock.now = 5
        cache["b"] = 2
        # A pickled cache uses the process's default transport where it is unpickled.
        new = pickle.loads(pickle.dumps(cache)) if how == "pickle" else getattr(copy, how)(cache)
        try:
            assert sorted(new) == ["a", "b"]
            new_clock = new.timer._timer
            assert (new_clock is clock) == (how == "copy")
            new_clock.now = 12
            assert list(new) == ["b"]
            consistent(new)
        finally:
            new.close()


class TestThreads:
    def test_sets_and_requests(self, timed, ctl):
        """Sets and gets on two threads while requests arrive: times and entries agree."""
        cache, clock = timed(500)
        stop = threading.Event()
        errors: list[BaseException] = []

        def work(offset: int) -> None:
            try:
                i = 0
                while not stop.is_set():
                    cache[offset + i % 700] = i
                    cache.get(offset + (i * 7) % 700)
                    clock.now = i // 50
                    i += 1
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(n * 1000,)) for n in range(2)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(50):
                ctl[0].request(cache.shrinker.efd, 20)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert settle()
        assert not errors
        consistent(cache)
        cache.flush()
        assert count(ctl, cache) == cache.chunks


class GoesWhenLookedUp:
    """A key that, on its ``n``-th hash, deletes its own entry: the window between get()'s
    check and its fetch, where another thread (or a request) drops the entry, made certain."""

    def __init__(self, cache: Any, n: int) -> None:
        self.cache = cache
        self.calls = 0
        self.n = n

    def __hash__(self) -> int:
        self.calls += 1
        if self.calls == self.n:
            LRUCore.pop(self.cache, self, None)
        return 7

    def __eq__(self, other: object) -> bool:
        return self is other


class TestRaces:
    def test_get_of_an_entry_dropped_after_the_check(self, timed):
        """get() of an entry that goes between 'in' and the fetch gives the default, no KeyError."""
        cache, _clock = timed()
        key = GoesWhenLookedUp(cache, n=0)
        cache[key] = 1
        # Hashes in get(): one for the 'in' check (the times), the next for the core's fetch.
        key.calls, key.n = 0, 2
        assert cache.get(key, "gone") == "gone"
        assert key.calls >= 2

    def test_frozen_time_is_each_threads_own(self, timed):
        """One thread inside an operation (time frozen) does not freeze another's clock."""
        cache, clock = timed()
        timer = cache.timer
        inside, done = threading.Event(), threading.Event()
        seen: list[int] = []

        def operation() -> None:
            with timer as now:
                seen.append(now)
                inside.set()
                done.wait(10)

        thread = threading.Thread(target=operation)
        thread.start()
        try:
            assert inside.wait(10)
            clock.now = 42
            assert timer() == 42  # this thread's clock runs
            with timer as now:
                clock.now = 43
                assert now == 42 and timer() == 42  # and freezes for this thread alone
            assert timer() == 43
        finally:
            done.set()
            thread.join()
        assert seen == [0]


class TestViews:
    def test_expired_not_shown(self, timed):
        """items(), values() and keys() leave out expired entries not yet dropped, as iter."""
        cache, clock = timed()
        cache["old"] = 1
        clock.now = 5
        cache["new"] = 2
        clock.now = 11
        assert list(cache.items()) == [("new", 2)]
        assert list(cache.values()) == [2]
        assert list(cache.keys()) == ["new"]
        assert ("old", 1) not in cache.items() and ("new", 2) in cache.items()
        assert cache.stats().hits == 0
        with pytest.raises(KeyError):
            cache["old"]
        assert cache.stats().hits == 0
        consistent(cache)
