"""ShrinkableLRU: the cachetools contract, sizes and chunks, shrink requests, eviction callbacks."""

from __future__ import annotations

import copy
import gc
import logging
import math
import pickle
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import cachetools
import pytest

import pyshrinker.lru
import pyshrinker.trim
from pyshrinker import (
    AbiError,
    ClosedError,
    Controller,
    EmbeddedTransport,
    ShrinkableLRU,
    Shrinker,
    settle,
)
from pyshrinker.errors import DependencyVersionError
from pyshrinker.lru import DEFAULT_CHUNK_SIZE, TRIM_AFTER_BYTES

from .cache_contract import LRUCacheContract
from .helpers import private_controller

MiB = 1 << 20


@pytest.fixture
def ctl() -> Iterator[tuple[Controller, EmbeddedTransport]]:
    """A private controller and its embedded transport."""
    with private_controller() as pair:
        yield pair


@pytest.fixture
def made(ctl: tuple[Controller, EmbeddedTransport]) -> Iterator[list[ShrinkableLRU[Any, Any]]]:
    """Caches a test makes, closed afterwards."""
    caches: list[ShrinkableLRU[Any, Any]] = []
    yield caches
    for cache in caches:
        cache.close()


@pytest.fixture
def lru(ctl, made):
    """Make a ShrinkableLRU on the private controller (closed afterwards)."""
    _controller, transport = ctl

    def make(*args: Any, cls: type[Any] = ShrinkableLRU, **kwargs: Any) -> Any:
        kwargs.setdefault("transport", transport)
        cache = cls(*args, **kwargs)
        made.append(cache)
        return cache

    return make


def count(ctl: tuple[Controller, EmbeddedTransport], cache: ShrinkableLRU[Any, Any]) -> int:
    """The controller's count for the cache's shrinker."""
    return ctl[0].count(cache.shrinker.efd)


def request(ctl: tuple[Controller, EmbeddedTransport], cache: Any, chunks: int) -> int:
    """Ask the cache for ``chunks`` through the controller and wait until it is handled."""
    asked = ctl[0].request(cache.shrinker.efd, chunks)
    assert settle()
    return asked


# ---------------------------------------------------------------------- the contract


class TestShrinkableLRUContract(LRUCacheContract):
    """ShrinkableLRU keeps the cachetools contract."""

    cache_class = ShrinkableLRU

    @pytest.fixture(autouse=True)
    def _controller(self, lru):
        self._make = lru

    def make(self, maxsize, getsizeof=None, cls=None):
        return self._make(maxsize, getsizeof, cls=cls or ShrinkableLRU)


class TestCachetoolsContract(LRUCacheContract):
    """cachetools.LRUCache passes the same contract, so it describes cachetools' behaviour."""

    cache_class = cachetools.LRUCache

    def make(self, maxsize, getsizeof=None, cls=None):
        return (cls or cachetools.LRUCache)(maxsize, getsizeof=getsizeof)


# ---------------------------------------------------------------------- construction


class TestConstruction:
    """Arguments, defaults and registration."""

    def test_a_cachetools_cache(self, lru):
        """With cachetools installed, the cache is a cachetools.Cache: cached() reports it."""
        cache = lru(2)
        assert isinstance(cache, cachetools.Cache)
        square = cachetools.cached(cache, info=True)(lambda x: x * x)
        assert [square(2), square(2), square(3)] == [4, 4, 9]
        assert square.cache_info() == (1, 2, 2, 2)

    def test_old_cachetools_refused(self, lru, monkeypatch):
        """An older cachetools than supported is named, with the version needed."""
        old = type(sys)("cachetools")
        old.__version__ = "4.2.4"  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "cachetools", old)
        problem = pyshrinker.lru._join_cachetools()
        assert problem is not None and "4.2.4" in problem and ">=5.5" in problem
        monkeypatch.setattr(pyshrinker.lru, "_CACHETOOLS_PROBLEM", problem)
        with pytest.raises(DependencyVersionError, match=r"cachetools>=5\.5"):
            lru()
        with pytest.raises(ImportError):
            lru()

    def test_defaults(self, lru, ctl):
        """No maxsize, 1 per entry, 4 KiB chunks, registered with cost 1."""
        cache = lru()
        assert cache.maxsize is None
        assert cache.getsizeof(b"x" * 1000) == cache.getsizeof(None) == 1
        assert cache.chunk_size == DEFAULT_CHUNK_SIZE == 4096
        info = [s for s in ctl[0].shrinkers() if s.key == cache.shrinker.efd]
        assert len(info) == 1
        assert (info[0].chunk_size, info[0].cost, info[0].count) == (4096, 1.0, 0)

    def test_no_maxsize_holds_everything(self, lru):
        """Without maxsize nothing is evicted but by requests."""
        cache = lru()
        for i in range(5000):
            cache[i] = i
        assert len(cache) == 5000
        assert cache.stats().evicted_by_maxsize == 0

    def test_arguments_reach_the_shrinker(self, lru, ctl):
        """chunk_size, cost and name are the registration's."""
        cache = lru(chunk_size=65536, cost=2.5, name="thumbnails")
        assert cache.shrinker.name == "thumbnails"
        (info,) = [s for s in ctl[0].shrinkers() if s.key == cache.shrinker.efd]
        assert (info.chunk_size, info.cost) == (65536, 2.5)

    @pytest.mark.parametrize("maxsize", ["10", True, b"1"])
    def test_maxsize_type(self, lru, maxsize):
        """maxsize is a number or None."""
        with pytest.raises(TypeError):
            lru(maxsize)

    @pytest.mark.parametrize("maxsize", [-1, -0.5, -math.inf, math.nan])
    def test_maxsize_value(self, lru, maxsize):
        """maxsize is not negative, nor NaN."""
        with pytest.raises(ValueError):
            lru(maxsize)

    def test_maxsize_float(self, lru):
        """maxsize=math.inf caps nothing; 2.5 holds what 2 holds; maxsize is kept as given."""
        endless = lru(math.inf)
        endless.update((i, i) for i in range(1000))
        assert (len(endless), endless.currsize, endless.maxsize) == (1000, 1000, math.inf)
        half = lru(2.5)
        half.update((i, i) for i in range(5))
        assert (list(half), half.maxsize) == ([3, 4], 2.5)
        huge = lru(10**30)
        huge.update((i, i) for i in range(5))
        assert len(huge) == 5

    def test_bad_arguments(self, lru):
        """Non-callable getsizeof or on_evict, negative batch, zero chunk size are refused."""
        with pytest.raises(TypeError):
            lru(getsizeof=3)
        with pytest.raises(TypeError):
            lru(on_evict="print")
        with pytest.raises(ValueError):
            lru(batch_bytes=-1)
        with pytest.raises(AbiError):
            lru(chunk_size=0)

    def test_subscriptable_for_annotations(self):
        """ShrinkableLRU[str, bytes] works at run time, as MutableMapping[str, bytes] does."""
        alias = ShrinkableLRU[str, bytes]
        assert alias.__origin__ is ShrinkableLRU


class TestSizes:
    """Sizes: 1 by default, or the user's getsizeof; bytes: sys.getsizeof, or memsize."""

    def test_default_counts_entries(self, lru):
        """maxsize=3 holds three entries, whatever their size, as cachetools.LRUCache(3) does."""
        cache = lru(3)
        for i in range(10):
            cache[i] = bytes(100_000)
        assert (list(cache), cache.currsize) == ([7, 8, 9], 3)
        assert cache.stats().evicted_by_maxsize == 7

    def test_subclass_getsizeof(self, lru):
        """A subclass's getsizeof, static or a method, sizes the entries; an argument wins."""

        class Static(ShrinkableLRU):
            @staticmethod
            def getsizeof(value):
                return len(value)

        class Method(ShrinkableLRU):
            unit = 2

            def getsizeof(self, value):
                return self.unit * len(value)

        static = lru(10, cls=Static)
        static["a"] = b"12345"
        method = lru(10, cls=Method)
        method["a"] = b"12345"
        given = lru(10, lambda v: 7, cls=Method)
        given["a"] = b"12345"
        assert (static.currsize, method.currsize, given.currsize) == (5, 10, 7)
        with pytest.raises(ValueError, match="too large"):
            method["b"] = b"123456"
        assert list(method) == ["a"]

    def test_memsize_apart_from_getsizeof(self, lru):
        """memsize gives the bytes (the chunks); getsizeof the size maxsize caps."""
        cache = lru(3, memsize=lambda v: 10_000)
        cache.update({"a": 1, "b": 2})
        assert (cache.currsize, cache.stats().nbytes, cache.chunks) == (2, 20_000, 5)
        both = lru(100, getsizeof=len, memsize=lambda v: 3 * len(v))
        both["a"] = b"x" * 40
        assert (both.currsize, both.stats().nbytes) == (40, 120)
        same = lru(100, getsizeof=len, memsize=len)
        same["a"] = b"x" * 40
        assert (same.currsize, same.stats().nbytes) == (40, 40)

    def test_memsize_errors(self, lru):
        """A memsize that raises, returns a negative or non-int, leaves the cache unchanged."""
        for bad, error in [
            (lambda v: 1 / 0, ZeroDivisionError),
            (lambda v: -1, ValueError),
            (lambda v: "1", TypeError),
        ]:
            cache = lru(memsize=bad)
            cache_ok = cache.get("k")
            with pytest.raises(error):
                cache["k"] = 1
            assert (len(cache), cache.currsize, cache.stats().nbytes, cache_ok) == (0, 0, 0, None)

    @pytest.mark.parametrize(
        "value",
        [
            b"",
            b"x",
            b"y" * 1000,
            bytes(100_000),
            "text" * 50,
            12345,
            2**100,
            [1, 2, 3],
            bytearray(300),
            (1, 2),
            None,
        ],
        ids=lambda v: type(v).__name__,
    )
    def test_default_is_sys_getsizeof(self, lru, value):
        """The bytes are sys.getsizeof(value), including the fast path for exact bytes."""
        cache = lru()
        cache["k"] = value
        assert (cache.currsize, cache.stats().nbytes) == (1, sys.getsizeof(value))

    def test_bytes_subclass_uses_sys_getsizeof(self, lru):
        """A bytes subclass is sized by sys.getsizeof (it has a __dict__ and GC header)."""

        class Blob(bytes):
            pass

        blob = Blob(b"z" * 500)
        cache = lru()
        cache["k"] = blob
        assert cache.stats().nbytes == sys.getsizeof(blob)

    def test_maxsize_counts_bytes(self, lru):
        """With getsizeof=sys.getsizeof, maxsize = 3 values' sizes holds three of them."""
        value = b"v" * 1000
        cache = lru(3 * sys.getsizeof(value), getsizeof=sys.getsizeof)
        for i in range(10):
            cache[i] = value
        assert list(cache) == [7, 8, 9]
        assert cache.stats().evicted_by_maxsize == 7

    def test_getsizeof_errors(self, lru):
        """A getsizeof that raises, or returns a non-int, leaves the cache unchanged."""

        def boom(value):
            raise RuntimeError("cannot size")

        cache = lru(getsizeof=boom)
        with pytest.raises(RuntimeError):
            cache["k"] = 1
        floaty = lru(getsizeof=lambda value: 1.5)
        with pytest.raises(TypeError):
            floaty["k"] = 1
        assert len(cache) == len(floaty) == 0
        assert cache.currsize == floaty.currsize == 0

    def test_unhashable_key(self, lru):
        """An unhashable key is a TypeError and stores nothing."""
        cache = lru()
        with pytest.raises(TypeError):
            cache[[1]] = 1
        assert len(cache) == 0
        assert cache.currsize == 0


# ---------------------------------------------------------------------- chunks


class TestChunks:
    """What the controller is told."""

    def test_chunks_sum_sizes_before_rounding(self, lru):
        """Ten 1033-byte entries are ceil(10330 / 4096) = 3 chunks, not 10."""
        cache = lru()
        for i in range(10):
            cache[i] = b"x" * 1000
        assert cache.stats().nbytes == 10 * sys.getsizeof(b"x" * 1000)
        assert cache.chunks == 3
        assert cache.stats().chunks == 3

    def test_unbatched_reports_every_change(self, lru, ctl):
        """With batch_bytes=0 the count follows every set and delete without a flush."""
        cache = lru(getsizeof=len, memsize=len, chunk_size=100, batch_bytes=0)
        cache["a"] = b"x" * 250
        assert count(ctl, cache) == 3
        cache["b"] = b"x" * 100
        assert count(ctl, cache) == 4
        del cache["a"]
        assert count(ctl, cache) == 1
        cache.clear()
        assert count(ctl, cache) == 0

    def test_batched_until_flush(self, lru, ctl):
        """Below batch_bytes nothing is reported; flush reports exactly."""
        cache = lru(getsizeof=len, memsize=len, chunk_size=100)
        for i in range(50):
            cache[i] = b"x" * 100
        assert count(ctl, cache) == 0
        cache.flush()
        assert count(ctl, cache) == 50 == cache.chunks

    def test_batch_sent_when_exceeded(self, lru, ctl):
        """Moving currsize by more than batch_bytes reports without a flush."""
        cache = lru(getsizeof=len, memsize=len, batch_bytes=MiB)
        for i in range(11):
            cache[i] = bytes(100_000)
        assert count(ctl, cache) == cache.chunks
        for i in range(11):
            del cache[i]
        assert count(ctl, cache) == 0

    def test_every_removal_is_reported(self, lru, ctl):
        """pop, popitem, del, maxsize evictions and clear all reach the books after flush."""
        cache = lru(10_000, getsizeof=len, memsize=len, chunk_size=100)
        for i in range(40):
            cache[i] = b"x" * 700
        cache.pop(39)
        cache.popitem()
        del cache[30]
        assert len(cache) == 11
        cache.flush()
        assert count(ctl, cache) == cache.chunks == 11 * 7
        cache.clear()
        cache.flush()
        assert count(ctl, cache) == 0


# ---------------------------------------------------------------------- requests


class TestRequests:
    """A shrink request evicts least recently used entries until the chunks are freed."""

    def test_least_recently_used_go_first(self, lru, ctl):
        """Asked for 3 one-chunk entries, the 3 least recently used are evicted."""
        cache = lru(getsizeof=len, memsize=len, chunk_size=100)
        for i in range(10):
            cache[i] = b"x" * 100
        cache[0]
        cache.get(1)
        cache.flush()
        assert request(ctl, cache, 3) == 3
        assert list(cache) == [5, 6, 7, 8, 9, 0, 1]
        assert count(ctl, cache) == 7 == cache.chunks
        assert cache.stats().evicted_on_request == 3

    def test_whole_entries(self, lru, ctl):
        """Entries bigger than a chunk go whole; the extra freed chunks are accounted."""
        cache = lru(getsizeof=len, memsize=len, chunk_size=100)
        for i in range(10):
            cache[i] = b"x" * 250
        cache.flush()
        assert cache.chunks == 25
        request(ctl, cache, 1)
        assert 0 not in cache
        assert len(cache) == 9
        assert count(ctl, cache) == cache.chunks == 23

    def test_more_than_held_empties(self, lru, ctl):
        """A request for everything empties the cache."""
        cache = lru(getsizeof=len, memsize=len, chunk_size=100)
        for i in range(10):
            cache[i] = b"x" * 150
        cache.flush()
        request(ctl, cache, cache.chunks)
        assert len(cache) == 0
        assert count(ctl, cache) == 0

    def test_unreported_growth_during_request(self, lru, ctl):
        """Growth not yet reported when a request comes is reported by the request."""
        cache = lru(getsizeof=len, memsize=len, chunk_size=100)
        for i in range(10):
            cache[i] = b"x" * 100
        cache.flush()
        for i in range(10, 30):
            cache[i] = b"x" * 100
        assert count(ctl, cache) == 10
        request(ctl, cache, 5)
        assert len(cache) == 25
        assert count(ctl, cache) == 25 == cache.chunks

    def test_unreported_shrinkage_during_request(self, lru, ctl):
        """Deletes not yet reported when a request comes are accounted by it."""
        cache = lru(getsizeof=len, memsize=len, chunk_size=100)
        for i in range(30):
            cache[i] = b"x" * 100
        cache.flush()
        for i in range(20):
            del cache[i]
        request(ctl, cache, 5)
        assert len(cache) == 5
        assert count(ctl, cache) == 5 == cache.chunks

    def test_own_frees_racing_a_request(self, lru, ctl):
        """Frees reported between the controller's signal and the listener's read still balance.

        The listener is held inside another shrinker's callback while the controller asks the
        cache for everything and the cache, meanwhile, is cleared (a free it reports itself).
        """
        gate, entered = threading.Event(), threading.Event()

        def blocking(asked: int) -> int:
            entered.set()
            gate.wait(10)
            return 0

        blocker = Shrinker.register(1, blocking, transport=ctl[1])
        try:
            blocker.report(1)
            blocker.flush()
            cache = lru(getsizeof=len, memsize=len, chunk_size=100, batch_bytes=0)
            for i in range(10):
                cache[i] = b"x" * 100
            assert ctl[0].request(blocker.efd, 1) == 1
            assert entered.wait(10)
            assert ctl[0].request(cache.shrinker.efd, 10) == 10
            cache.clear()
            gate.set()
            assert settle()
            cache[0] = b"x" * 500
            cache.flush()
            assert count(ctl, cache) == cache.chunks == 5
        finally:
            gate.set()
            blocker.close()

    def test_heap_trimmed_after_large_reclaim(self, lru, ctl, monkeypatch):
        """malloc_trim runs after a request frees TRIM_AFTER_BYTES or more, not after less."""
        trims: list[int] = []
        recorder = pyshrinker.trim.HeapTrimmer(trim=lambda: trims.append(0) or True)
        monkeypatch.setattr(pyshrinker.trim, "_trimmer", recorder)
        cache = lru(getsizeof=len, memsize=len)
        for i in range(40):
            cache[i] = bytes(100_000)
        cache.flush()
        request(ctl, cache, 1)
        assert trims == []
        request(ctl, cache, TRIM_AFTER_BYTES // cache.chunk_size + 1)
        assert trims == [0]

    def test_closed_cache_frees_nothing(self, lru, ctl):
        """A request that reaches a closed cache's reclaim frees nothing."""
        cache = lru(getsizeof=len, memsize=len, chunk_size=100)
        cache["a"] = b"x" * 100
        cache.close()
        assert cache._reclaim(1) == 0


# ---------------------------------------------------------------------- on_evict


class TestOnEvict:
    """The eviction callback: for maxsize and requests, never for the user's own removals."""

    def test_called_for_maxsize_after_removal(self, lru):
        """on_evict(key, value) runs once the entry is gone."""
        seen: list[tuple[Any, Any, bool]] = []
        cache = lru(2, getsizeof=lambda v: 1, on_evict=lambda k, v: seen.append((k, v, k in cache)))
        cache.update({1: "a", 2: "b", 3: "c"})
        assert seen == [(1, "a", False)]

    def test_not_called_for_user_removals(self, lru):
        """del, pop, popitem and clear do not call it."""
        seen: list[Any] = []
        cache = lru(on_evict=lambda k, v: seen.append(k))
        cache.update({1: 1, 2: 2, 3: 3, 4: 4})
        del cache[1]
        cache.pop(2)
        cache.popitem()
        cache.clear()
        assert seen == []

    def test_called_for_requests_on_the_listener(self, lru, ctl):
        """Entries evicted by a request are passed to on_evict on the listener thread."""
        seen: list[tuple[Any, str]] = []

        def on_evict(key: Any, value: Any) -> None:
            seen.append((key, threading.current_thread().name))

        cache = lru(getsizeof=len, memsize=len, chunk_size=100, on_evict=on_evict)
        for i in range(5):
            cache[i] = b"x" * 100
        cache.flush()
        request(ctl, cache, 2)
        assert seen == [(0, "pyshrinker-listener"), (1, "pyshrinker-listener")]

    def test_raising_callback_is_logged(self, lru, ctl, caplog):
        """An exception from on_evict is logged; the entry stays evicted, the cache works."""

        def on_evict(key: Any, value: Any) -> None:
            raise RuntimeError("write-back failed")

        cache = lru(1, getsizeof=lambda v: 1, on_evict=on_evict, chunk_size=1)
        with caplog.at_level(logging.ERROR, logger="pyshrinker.lru"):
            cache["a"] = 1
            cache["b"] = 2
            cache.flush()
            request(ctl, cache, 1)
        assert len(cache) == 0
        assert [r.message.count("on_evict") for r in caplog.records] == [1, 1]
        cache["c"] = 3
        assert cache["c"] == 3

    def test_callback_may_use_the_cache(self, lru):
        """on_evict can write to the cache it is called from (a write-back log, say)."""
        cache: Any = None

        def on_evict(key: Any, value: Any) -> None:
            if key != "log":
                cache["log"] = (cache.get("log") or ()) + (key,)

        cache = lru(3, getsizeof=lambda v: 1, on_evict=on_evict)
        for i in range(6):
            cache[i] = i
        assert cache.stats().evicted_by_maxsize >= 3
        assert len(cache) == 3


# ---------------------------------------------------------------------- views and copies


class TestViews:
    """Iteration is a snapshot, least recently used first, and changes no recency."""

    def test_order_least_recently_used_first(self, lru):
        """iter, keys, values and items run LRU to MRU."""
        cache = lru()
        cache.update({1: "a", 2: "b", 3: "c"})
        cache[1]
        assert list(cache) == [2, 3, 1]
        assert list(cache.keys()) == [2, 3, 1]
        assert list(cache.values()) == ["b", "c", "a"]
        assert list(cache.items()) == [(2, "b"), (3, "c"), (1, "a")]

    def test_iterating_changes_no_recency(self, lru):
        """Reading every item leaves the eviction order as it was."""
        cache = lru()
        cache.update({1: "a", 2: "b", 3: "c"})
        assert dict(cache.items()) == {1: "a", 2: "b", 3: "c"}
        assert (1, "a") in cache.items()
        assert cache.popitem() == (1, "a")

    def test_mutation_during_iteration(self, lru):
        """Changing the cache while iterating raises nothing: the iteration is a snapshot."""
        cache = lru()
        cache.update({i: i for i in range(10)})
        for key in cache:
            del cache[key]
            cache[key + 100] = key
        assert len(cache) == 10

    def test_repr(self, lru):
        """The repr shows the entries, maxsize and currsize, as cachetools' does."""
        cache = lru(10, getsizeof=lambda v: 1)
        cache["a"] = 1
        assert repr(cache) == "ShrinkableLRU({'a': 1}, maxsize=10, currsize=1)"

    @pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
    def test_copies(self, lru, ctl, how):
        """A copy has the entries, their order and sizes, the settings, and its own registration."""
        cache = lru(4, getsizeof=len, memsize=len, chunk_size=100, batch_bytes=0, name="orig")
        cache.update({"a": b"x" * 1, "b": b"y" * 2, "c": [1]})
        cache.get("a")
        cache.extra = {"kept": True}
        # A pickled cache uses the process's default transport where it is unpickled.
        new = pickle.loads(pickle.dumps(cache)) if how == "pickle" else getattr(copy, how)(cache)
        try:
            assert new is not cache and type(new) is type(cache)
            assert (
                list(new.items()) == list(cache.items()) == [("b", b"yy"), ("c", [1]), ("a", b"x")]
            )
            assert (new.currsize, new.maxsize, new.stats().nbytes) == (4, 4, 4)
            assert new.chunk_size == 100 and new.shrinker.name == "orig"
            assert new.shrinker.efd != cache.shrinker.efd
            assert new.extra == {"kept": True}
            assert (new.extra is cache.extra) == (how == "copy")
            assert (new["c"] is cache["c"]) == (how == "copy")
            new["d"] = b"zzz"
            assert "b" not in new and "b" in cache and cache.currsize == 4
            new._check()
            cache._check()
        finally:
            new.close()


# ---------------------------------------------------------------------- lifetime


class TestLifetime:
    """close(), the context manager, garbage collection, a controller that goes away."""

    def test_close(self, lru, ctl):
        """close unregisters, drops the entries and refuses new ones; it is idempotent."""
        cache = lru(getsizeof=len, memsize=len, chunk_size=100, batch_bytes=0)
        cache["a"] = b"x" * 100
        efd = cache.shrinker.efd
        cache.close()
        assert efd not in [s.key for s in ctl[0].shrinkers()]
        assert len(cache) == 0
        assert cache.get("a") is None
        with pytest.raises(ClosedError):
            cache["b"] = b"y"
        cache.close()

    def test_context_manager(self, ctl):
        """Leaving the with block closes the cache."""
        with ShrinkableLRU(transport=ctl[1]) as cache:
            efd = cache.shrinker.efd
            assert efd in [s.key for s in ctl[0].shrinkers()]
        assert efd not in [s.key for s in ctl[0].shrinkers()]

    def test_collected_cache_unregisters(self, ctl):
        """A cache nobody holds is collected, and its registration goes with it."""
        cache: ShrinkableLRU[int, bytes] = ShrinkableLRU(transport=ctl[1])
        cache[1] = b"x"
        efd = cache.shrinker.efd
        ref = weakref.ref(cache)
        del cache
        gc.collect()
        assert ref() is None
        assert efd not in [s.key for s in ctl[0].shrinkers()]

    def test_cycle_through_a_value_is_collected(self, ctl):
        """A value that refers to its cache does not keep either alive."""
        cache: ShrinkableLRU[str, Any] = ShrinkableLRU(transport=ctl[1])
        cache["self"] = [cache]
        ref = weakref.ref(cache)
        del cache
        gc.collect()
        assert ref() is None

    def test_controller_gone(self, caplog):
        """When the controller goes away the cache logs once and keeps serving."""
        controller = Controller.create(None).start()
        cache: ShrinkableLRU[int, bytes] = ShrinkableLRU(
            transport=EmbeddedTransport(controller), batch_bytes=0
        )
        try:
            cache[0] = b"x"
            controller.close()
            with caplog.at_level(logging.ERROR, logger="pyshrinker.lru"):
                for i in range(1, 10):
                    cache[i] = b"y" * 5000
            assert len(cache) == 10
            assert len([r for r in caplog.records if "cannot report" in r.message]) == 1
        finally:
            cache.close()


# ---------------------------------------------------------------------- references


class TestReferences:
    """No reference is leaked or dropped early, whatever removes an entry."""

    @pytest.mark.parametrize(
        "how", ["del", "pop", "popitem", "clear", "maxsize", "request", "close"]
    )
    def test_value_released(self, lru, ctl, how):
        """The value's reference count returns to what it was."""
        value = object()
        cache = lru(100, getsizeof=lambda v: 1, chunk_size=1, batch_bytes=0)
        before = sys.getrefcount(value)
        cache["k"] = value
        assert sys.getrefcount(value) == before + 1
        if how == "del":
            del cache["k"]
        elif how == "pop":
            assert cache.pop("k") is value
        elif how == "popitem":
            assert cache.popitem() == ("k", value)
        elif how == "clear":
            cache.clear()
        elif how == "maxsize":
            for i in range(100):
                cache[i] = i
        elif how == "request":
            request(ctl, cache, 1)
        else:
            cache.close()
        assert "k" not in cache
        assert sys.getrefcount(value) == before

    def test_replaced_value_released(self, lru):
        """Setting a key again releases the old value."""
        old = object()
        cache = lru()
        before = sys.getrefcount(old)
        cache["k"] = old
        cache["k"] = object()
        assert sys.getrefcount(old) == before


# ---------------------------------------------------------------------- hostile keys and values


class Colliding:
    """A key whose hash always collides, and whose __eq__ can run a callback (Python code)."""

    on_eq: Any = None

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return 42

    def __eq__(self, other: object) -> bool:
        if Colliding.on_eq is not None:
            callback, Colliding.on_eq = Colliding.on_eq, None
            callback()
        return isinstance(other, Colliding) and other.n == self.n


class TestHostile:
    """Python code running inside the cache's operations cannot corrupt it."""

    def test_colliding_keys(self, lru):
        """Keys that all collide still map correctly and evict in LRU order."""
        cache = lru(5, getsizeof=lambda v: 1)
        keys = [Colliding(i) for i in range(8)]
        for i, key in enumerate(keys):
            cache[key] = i
        assert [k.n for k in cache] == [3, 4, 5, 6, 7]
        assert cache[Colliding(4)] == 4

    def test_eq_that_mutates_the_cache(self, lru):
        """An __eq__ that deletes and inserts during a lookup leaves a consistent cache."""
        cache = lru(getsizeof=lambda v: 1)
        keys = [Colliding(i) for i in range(6)]
        for i, key in enumerate(keys):
            cache[key] = i

        def meddle() -> None:
            del cache[keys[0]]
            cache[Colliding(99)] = 99
            cache.popitem()

        Colliding.on_eq = meddle
        cache[Colliding(3)] = "three"
        Colliding.on_eq = None
        assert cache.currsize == len(cache) == len(list(cache))
        assert cache[Colliding(3)] == "three"
        while cache:
            cache.popitem()
        assert cache.currsize == 0

    def test_value_del_that_uses_the_cache(self, lru, ctl):
        """A value whose __del__ writes to the cache is released safely on eviction."""
        cache = lru(3, getsizeof=lambda v: 1, chunk_size=1)

        class Noisy:
            def __del__(self) -> None:
                cache["deleted"] = "yes"

        cache["a"] = Noisy()
        for i in range(3):
            cache[i] = i
        assert cache.get("deleted") == "yes"
        cache["b"] = Noisy()
        cache.flush()
        request(ctl, cache, cache.chunks)
        cache.flush()
        assert count(ctl, cache) == cache.chunks
        assert cache.currsize == len(cache)


# ---------------------------------------------------------------------- threads


class TestThreads:
    """Several threads reading and writing while requests arrive keep the books exact."""

    def test_concurrent_use_and_requests(self, lru, ctl):
        """After the threads stop and a flush, the controller counts what the cache holds."""
        cache = lru(200_000, getsizeof=len, memsize=len, chunk_size=512, batch_bytes=4096)
        errors: list[BaseException] = []
        stop = threading.Event()

        def work(seed: int) -> None:
            import random

            rng = random.Random(seed)
            try:
                while not stop.is_set():
                    key = rng.randrange(300)
                    op = rng.random()
                    if op < 0.5:
                        cache[key] = bytes(rng.randrange(1, 3000))
                    elif op < 0.8:
                        cache.get(key)
                    elif op < 0.95:
                        cache.pop(key, None)
                    else:
                        cache.setdefault(key, b"d" * 700)
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(200):
                cache.flush()
                ctl[0].request(cache.shrinker.efd, max(1, cache.chunks // 3))
                assert settle()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert errors == []
        assert cache.stats().evicted_on_request > 0
        assert cache.currsize == sum(len(v) for v in cache.values())
        cache.flush()
        assert count(ctl, cache) == cache.chunks
