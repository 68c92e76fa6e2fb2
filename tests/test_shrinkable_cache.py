"""@shrinkable_cache: functools.lru_cache's behaviour, plus giving memory back.

The tests in the classes named ``...Like...`` run against ``functools.lru_cache`` as well: they
describe what functools does, and shrinkable_cache must do the same.
"""

from __future__ import annotations

import copy
import functools
import gc
import pickle
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyshrinker import (
    CacheInfo,
    Controller,
    EmbeddedTransport,
    ShrinkableCachedFunction,
    settle,
    shrinkable_cache,
)

from .helpers import private_controller


@pytest.fixture
def ctl() -> Iterator[tuple[Controller, EmbeddedTransport]]:
    """A private controller and its embedded transport."""
    with private_controller() as pair:
        yield pair


@pytest.fixture(params=["functools", "shrinkable"])
def lru_cache(request, ctl) -> Iterator[Callable[..., Any]]:
    """functools.lru_cache, or shrinkable_cache on the private controller (closed afterwards)."""
    if request.param == "functools":
        yield functools.lru_cache
        return
    made: list[ShrinkableCachedFunction[Any]] = []

    def decorator(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("transport", ctl[1])
        result = shrinkable_cache(*args, **kwargs)
        if isinstance(result, ShrinkableCachedFunction):
            made.append(result)
            return result

        def wrap(function: Callable[..., Any]) -> Any:
            wrapped = result(function)
            made.append(wrapped)
            return wrapped

        return wrap

    yield decorator
    for each in made:
        each.close()


class TestBasicsLikeFunctools:
    """Hits, misses, eviction and cache_info, as functools.lru_cache does them."""

    def test_counts_and_eviction(self, lru_cache):
        """A maxsize-3 cache of a pure function: hits, misses, currsize, LRU order."""
        calls: list[int] = []

        @lru_cache(maxsize=3)
        def square(x: int) -> int:
            calls.append(x)
            return x * x

        for x in [1, 2, 3, 1, 2, 4, 1, 3]:
            assert square(x) == x * x
        assert calls == [1, 2, 3, 4, 3]
        assert square.cache_info() == (3, 5, 3, 3)
        assert isinstance(square.cache_info(), tuple)
        assert square.cache_info()._fields == ("hits", "misses", "maxsize", "currsize")

    def test_default_maxsize_128(self, lru_cache):
        """@lru_cache without arguments holds 128 entries."""

        @lru_cache
        def ident(x: int) -> int:
            return x

        for x in range(200):
            ident(x)
        assert ident.cache_info().currsize == 128
        assert ident.cache_parameters() == {"maxsize": 128, "typed": False}

    def test_maxsize_none_unbounded(self, lru_cache):
        """maxsize=None never evicts for size."""

        @lru_cache(maxsize=None)
        def ident(x: int) -> int:
            return x

        for x in range(1000):
            ident(x)
        ident(5)
        assert ident.cache_info() == (1, 1000, None, 1000)

    @pytest.mark.parametrize("maxsize", [0, -1, -10])
    def test_maxsize_zero_or_negative_caches_nothing(self, lru_cache, maxsize):
        """maxsize <= 0 is 0: every call is a miss and nothing is stored."""
        calls: list[int] = []

        @lru_cache(maxsize=maxsize)
        def ident(x: int) -> int:
            calls.append(x)
            return x

        for _ in range(3):
            ident(1)
        assert calls == [1, 1, 1]
        assert ident.cache_info() == (0, 3, 0, 0)

    def test_bad_maxsize(self, lru_cache):
        """A maxsize that is not an int, a callable or None is a TypeError."""
        with pytest.raises(TypeError):
            lru_cache("10")

    def test_cache_clear(self, lru_cache):
        """cache_clear empties the cache and zeroes the statistics."""

        @lru_cache(maxsize=10)
        def ident(x: int) -> int:
            return x

        ident(1)
        ident(1)
        ident.cache_clear()
        assert ident.cache_info() == (0, 0, 10, 0)
        ident(1)
        assert ident.cache_info() == (0, 1, 10, 1)

    def test_exceptions_not_cached(self, lru_cache):
        """A call that raises stores nothing and is retried next time."""
        attempts: list[int] = []

        @lru_cache(maxsize=4)
        def flaky(x: int) -> int:
            attempts.append(x)
            if len(attempts) == 1:
                raise ValueError("first time fails")
            return x

        with pytest.raises(ValueError):
            flaky(1)
        assert flaky(1) == 1
        assert flaky(1) == 1
        assert attempts == [1, 1]
        assert flaky.cache_info() == (1, 2, 4, 1)

    def test_unhashable_arguments(self, lru_cache):
        """Unhashable arguments raise TypeError, as functools does."""

        @lru_cache(maxsize=4)
        def length(x: Any) -> int:
            return len(x)

        with pytest.raises(TypeError):
            length([1, 2])

    def test_recursion(self, lru_cache):
        """A recursive function fills its own cache while it runs."""

        @lru_cache(maxsize=None)
        def fib(n: int) -> int:
            return n if n < 2 else fib(n - 1) + fib(n - 2)

        assert fib(80) == 23416728348467685
        assert fib.cache_info() == (78, 81, None, 81)

    def test_reentrant_store_of_the_same_key(self, lru_cache):
        """If the call stores its own key (recursion), that entry stays; the result returns."""
        depth = [0]

        @lru_cache(maxsize=4)
        def outer(x: int) -> object:
            depth[0] += 1
            if depth[0] == 1:
                inner_result = outer(x)
                assert outer(x) is inner_result
            return object()

        first = outer(1)
        assert outer(1) is not first
        assert outer.cache_info().currsize == 1


class TestKeysLikeFunctools:
    """Which calls share an entry: keywords, order, types."""

    def test_keywords_are_distinct_calls(self, lru_cache):
        """f(1, 2), f(1, y=2) and f(x=1, y=2) are three entries; f(y=2, x=1) a fourth."""
        calls: list[tuple[int, int]] = []

        @lru_cache(maxsize=None)
        def add(x: int, y: int) -> int:
            calls.append((x, y))
            return x + y

        add(1, 2)
        add(1, y=2)
        add(x=1, y=2)
        add(y=2, x=1)
        add(1, 2)
        add(x=1, y=2)
        assert len(calls) == 4
        assert add.cache_info() == (2, 4, None, 4)

    def test_typed(self, lru_cache):
        """typed=True keeps f(3, 0) and f(3.0, 0) apart; untyped, they share an entry."""

        @lru_cache(maxsize=None, typed=True)
        def typed(x: Any, y: int) -> str:
            return type(x).__name__

        @lru_cache(maxsize=None)
        def untyped(x: Any, y: int) -> str:
            return type(x).__name__

        assert (typed(3, 0), typed(3.0, 0)) == ("int", "float")
        assert typed.cache_info().currsize == 2
        assert typed.cache_parameters() == {"maxsize": None, "typed": True}
        assert untyped(3, 0) == "int"
        assert untyped(3.0, 0) == "int"
        assert untyped.cache_info().currsize == 1

    def test_single_int_or_str_is_its_own_key(self, lru_cache):
        """A lone int or str argument is keyed by itself, so f(3) and f(3.0) differ."""

        @lru_cache(maxsize=None)
        def kind(x: Any) -> str:
            return type(x).__name__

        assert (kind(3), kind(3.0), kind(3)) == ("int", "float", "int")
        assert kind.cache_info() == (1, 2, None, 2)

    def test_typed_keywords(self, lru_cache):
        """typed=True also tells keyword argument types apart."""

        @lru_cache(maxsize=None, typed=True)
        def kind(*, x: Any) -> str:
            return type(x).__name__

        assert kind(x=1) == "int"
        assert kind(x=1.0) == "float"
        assert kind.cache_info().currsize == 2

    def test_no_arguments(self, lru_cache):
        """A function of no arguments caches its one result."""
        calls: list[int] = []

        @lru_cache(maxsize=2)
        def answer() -> int:
            calls.append(1)
            return 42

        assert answer() == answer() == 42
        assert calls == [1]


class TestWrapperLikeFunctools:
    """The wrapper: metadata, methods, pickling, copying, weak references."""

    def test_metadata(self, lru_cache):
        """__wrapped__, __name__, __qualname__, __doc__, __module__ and __dict__ are copied."""

        def original(x: int) -> int:
            """The docstring."""
            return x

        original.custom = "attribute"  # type: ignore[attr-defined]
        wrapped = lru_cache(maxsize=3)(original)
        assert wrapped.__wrapped__ is original
        assert wrapped.__name__ == "original"
        assert wrapped.__qualname__ == original.__qualname__
        assert wrapped.__doc__ == "The docstring."
        assert wrapped.__module__ == __name__
        assert wrapped.custom == "attribute"

    def test_stacked(self, lru_cache):
        """A cached function cached again reports its own settings, not the inner one's.

        update_wrapper copies the inner wrapper's __dict__ into the outer: it must not carry
        the inner's settings with it (issue 8: the outer said maxsize=2 with currsize=3).
        """

        def ident(x: int) -> int:
            return x

        inner = lru_cache(maxsize=2)(ident)
        outer = lru_cache(maxsize=3, typed=True)(inner)
        for i in range(3):
            assert outer(i) == i
        assert outer(2) == 2
        assert outer.cache_info() == (1, 3, 3, 3)
        assert inner.cache_info() == (0, 3, 2, 2)
        assert inner.cache_parameters() == {"maxsize": 2, "typed": False}
        assert outer.__wrapped__ is inner
        if isinstance(outer, ShrinkableCachedFunction):
            # functools itself gets this one wrong: its cache_parameters is a function in the
            # wrapper's __dict__, which update_wrapper overwrites with the inner one's.
            assert outer.cache_parameters() == {"maxsize": 3, "typed": True}
            assert outer.shrinker is not inner.shrinker
            assert outer.stats().entries == 3
            assert inner.stats().entries == 2

    def test_methods(self, lru_cache):
        """On a method, one cache serves all instances; self is part of the key."""

        class Point:
            def __init__(self, x: int) -> None:
                self.x = x

            @lru_cache(maxsize=None)
            def scaled(self, factor: int) -> int:
                return self.x * factor

        a, b = Point(2), Point(3)
        assert (a.scaled(10), b.scaled(10), a.scaled(10)) == (20, 30, 20)
        assert Point.scaled.cache_info() == (1, 2, None, 2)
        assert Point.scaled(a, 10) == 20
        assert Point.scaled.cache_info().hits == 2

    def test_classmethod_and_staticmethod(self, lru_cache):
        """Stacked under classmethod or staticmethod it works as on a function."""

        class Maker:
            @classmethod
            @lru_cache(maxsize=None)
            def build(cls, n: int) -> tuple[str, int]:
                return (cls.__name__, n)

            @staticmethod
            @lru_cache(maxsize=None)
            def twice(n: int) -> int:
                return 2 * n

        assert Maker.build(1) == ("Maker", 1)
        assert Maker().build(1) == ("Maker", 1)
        assert Maker.twice(4) == Maker().twice(4) == 8

    def test_pickle_by_reference(self, lru_cache, monkeypatch):
        """A module-level cached function pickles as a reference to itself."""

        def pickled_function(x: int) -> int:
            return x

        pickled_function.__qualname__ = "pickled_function"
        wrapped = lru_cache(maxsize=2)(pickled_function)
        monkeypatch.setattr(sys.modules[__name__], "pickled_function", wrapped, raising=False)
        assert pickle.loads(pickle.dumps(wrapped)) is wrapped

    def test_copy_is_identity(self, lru_cache):
        """copy and deepcopy return the wrapper itself."""

        @lru_cache(maxsize=2)
        def ident(x: int) -> int:
            return x

        assert copy.copy(ident) is ident
        assert copy.deepcopy(ident) is ident

    def test_weakref(self, lru_cache):
        """The wrapper can be weakly referenced."""

        @lru_cache(maxsize=2)
        def ident(x: int) -> int:
            return x

        assert weakref.ref(ident)() is ident

    def test_threads(self, lru_cache):
        """Many threads calling concurrently get right answers and consistent counts."""

        @lru_cache(maxsize=50)
        def square(x: int) -> int:
            return x * x

        errors: list[int] = []

        def work(offset: int) -> None:
            for i in range(3000):
                x = (i * 7 + offset) % 120
                if square(x) != x * x:
                    errors.append(x)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        info = square.cache_info()
        assert errors == []
        assert info.hits + info.misses == 12000
        assert info.currsize == 50


class TestShrinking:
    """What shrinkable_cache adds: sizes, chunks, requests."""

    def test_registered_and_accounted(self, ctl):
        """Results are sized with sys.getsizeof and reported as chunks after flush."""

        @shrinkable_cache(maxsize=None, transport=ctl[1])
        def blob(n: int) -> bytes:
            return bytes(n)

        try:
            for n in range(0, 50_000, 1000):
                blob(n)
            total = sum(sys.getsizeof(bytes(n)) for n in range(0, 50_000, 1000))
            assert blob.stats().nbytes == total
            assert blob.stats().currsize == 50
            blob.flush()
            assert ctl[0].count(blob.shrinker.efd) == blob.chunks == -(-total // 4096)
            assert blob.shrinker.name == f"shrinkable_cache({blob.__qualname__})"
        finally:
            blob.close()

    def test_request_evicts_least_recently_used_results(self, ctl):
        """A shrink request drops the least recently used results; they are computed again."""
        calls: list[int] = []

        @shrinkable_cache(
            maxsize=None, memsize=lambda result: 100, chunk_size=100, transport=ctl[1]
        )
        def compute(n: int) -> int:
            calls.append(n)
            return n

        try:
            for n in range(10):
                compute(n)
            compute(0)
            compute.flush()
            ctl[0].request(compute.shrinker.efd, 4)
            assert settle()
            assert compute.cache_info().currsize == 6
            assert compute.stats().evicted_on_request == 4
            assert ctl[0].count(compute.shrinker.efd) == 6
            calls.clear()
            for n in [0, 5, 1, 4]:
                compute(n)
            assert calls == [1, 4]
        finally:
            compute.close()

    def test_memsize_errors_propagate(self, ctl):
        """A memsize that fails makes the call fail, and nothing is stored."""

        def bad_size(result: Any) -> int:
            raise RuntimeError("cannot size")

        @shrinkable_cache(memsize=bad_size, transport=ctl[1])
        def ident(x: int) -> int:
            return x

        try:
            with pytest.raises(RuntimeError):
                ident(1)
            assert ident.cache_info().currsize == 0
        finally:
            ident.close()

    def test_closed_function_still_works(self, ctl):
        """After close() the function is called every time, uncached and unregistered."""
        calls: list[int] = []

        @shrinkable_cache(transport=ctl[1])
        def ident(x: int) -> int:
            calls.append(x)
            return x

        ident(1)
        efd = ident.shrinker.efd
        ident.close()
        assert efd not in [s.key for s in ctl[0].shrinkers()]
        assert (ident(1), ident(1)) == (1, 1)
        assert calls == [1, 1, 1]
        assert ident.cache_info().currsize == 0

    def test_collected_function_unregisters(self, ctl):
        """A cached function nobody holds is collected and unregistered."""

        def make() -> tuple[weakref.ref[Any], int]:
            @shrinkable_cache(transport=ctl[1])
            def ident(x: int) -> int:
                return x

            ident(1)
            return weakref.ref(ident), ident.shrinker.efd

        ref, efd = make()
        gc.collect()
        assert ref() is None
        assert efd not in [s.key for s in ctl[0].shrinkers()]

    def test_cache_info_type(self, ctl):
        """cache_info() is a CacheInfo named tuple."""

        @shrinkable_cache(maxsize=5, transport=ctl[1])
        def ident(x: int) -> int:
            return x

        try:
            assert ident.cache_info() == CacheInfo(0, 0, 5, 0)
            assert repr(ident).startswith("<shrinkable_cache <function")
        finally:
            ident.close()
