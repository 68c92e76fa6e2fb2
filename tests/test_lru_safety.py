"""The C core never crashes and never lies: pending exceptions, reentrancy, failed stores, sizes.

Each class is a defect found in the core (issue 8), kept as a regression test: each failed before
the fix. Hostile objects come from :mod:`tests.hostile`; the stateful fuzz is in test_lru_fuzz.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyshrinker import Controller, EmbeddedTransport, ShrinkableLRU, settle, shrinkable_cache

from .helpers import private_controller
from .hostile import Boom, HKey, HValue, hsize, quietly, raiser, trap


@pytest.fixture
def ctl() -> Iterator[tuple[Controller, EmbeddedTransport]]:
    """A private controller and its embedded transport."""
    with private_controller() as pair:
        yield pair


@pytest.fixture
def lru(ctl: tuple[Controller, EmbeddedTransport]) -> Iterator[Callable[..., Any]]:
    """Make ShrinkableLRUs on the private controller (closed afterwards)."""
    made: list[ShrinkableLRU[Any, Any]] = []

    def make(*args: Any, **kwargs: Any) -> ShrinkableLRU[Any, Any]:
        kwargs.setdefault("transport", ctl[1])
        cache: ShrinkableLRU[Any, Any] = ShrinkableLRU(*args, **kwargs)
        made.append(cache)
        return cache

    yield make
    trap.disarm()
    for cache in made:
        cache.close()


def assert_consistent(cache: ShrinkableLRU[Any, Any]) -> list[tuple[Any, Any]]:
    """len, iteration, items, membership and currsize agree; returns the items."""
    items = list(cache.items())
    keys = list(cache)
    assert len(cache) == len(keys) == len(items)
    assert [k for k, _ in items] == keys
    for key, value in items:
        assert key in cache
        assert cache._peek(key) is value
    assert cache.currsize == sum(cache.getsizeof(v) for _, v in items)
    if cache.maxsize is not None:
        assert cache.currsize <= cache.maxsize
    check = getattr(cache, "_check", None)
    if check is not None:
        check()
    return items


def drain(cache: ShrinkableLRU[Any, Any], expected: int) -> None:
    """popitem() gives exactly ``expected`` items, then KeyError; currsize ends at 0."""
    for _ in range(expected):
        cache.popitem()
    with pytest.raises(KeyError):
        cache.popitem()
    assert cache.currsize == 0
    assert len(cache) == 0


# ---------------------------------------------------------------------- defect 1


class TestPendingExceptions:
    """A cache freed while an exception propagates keeps that exception (and the process)."""

    def test_temporary_cache_errors(self, ctl):
        """The error of a call on a temporary cache is the one raised, not SystemError."""
        transport = ctl[1]
        with pytest.raises(KeyError):
            ShrinkableLRU(2, transport=transport).popitem()
        with pytest.raises(KeyError):
            ShrinkableLRU(transport=transport)["x"]
        with pytest.raises(TypeError, match="unhashable"):
            shrinkable_cache(transport=transport)(lambda x: x)([1])

    @pytest.mark.parametrize(
        "expression",
        [
            "[ShrinkableLRU(), 1 / 0]",
            "[shrinkable_cache()(len), 1 / 0]",
            "[filled_cache(), 1 / 0]",
            "[filled_function(), 1 / 0]",
        ],
    )
    def test_freed_while_raising(self, expression):
        """A cache freed while an exception propagates keeps it; its values' finalizers run.

        The issue's SIGSEGV: a cache in a list display whose next element raises is freed with
        the ZeroDivisionError pending. Run in a child, which is what crashed.
        """
        code = textwrap.dedent(
            f"""
            import sys
            from pyshrinker import ShrinkableLRU, shrinkable_cache

            ran = []

            class Finalized:
                def __del__(self):
                    # Python code that raises and handles its own exception, as finalizers do:
                    # it must run with no exception set, and leave the pending one alone.
                    try:
                        {{}}["missing"]
                    except KeyError:
                        ran.append(sys.exc_info()[0].__name__)

            def filled_cache():
                cache = ShrinkableLRU()
                cache["a"] = Finalized()
                cache["b"] = Finalized()
                return cache

            def filled_function():
                cached = shrinkable_cache()(lambda x: Finalized())
                cached(1)
                cached(2)
                return cached

            for _ in range(3):
                try:
                    {expression}
                except ZeroDivisionError as err:
                    assert str(err) == "division by zero", err
            print("survived", ran)
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        finalized = 0 if "filled" not in expression else 6
        assert done.stdout.strip() == f"survived {['KeyError'] * finalized}"
        assert "Exception ignored" not in done.stderr


# ---------------------------------------------------------------------- defect 2


def _colliding_cache(lru: Callable[..., Any], count: int = 4) -> tuple[Any, list[HKey]]:
    cache = lru(getsizeof=hsize)
    keys = [HKey(i, collide=True) for i in range(count)]
    for key in keys:
        cache[key] = HValue(key.label)
    return cache, keys


class TestReentrantKeys:
    """A key's __eq__ that uses the cache, at any point of an operation, leaves it consistent."""

    ACTIONS = ("store_same", "delete_same", "clear", "store_other", "popitem", "request")

    def _action(self, name: str, cache: Any, key: HKey, ctl: Any) -> Callable[[], object]:
        def act() -> None:
            if name == "store_same":
                cache[HKey(key.label, collide=True)] = HValue(-1)
            elif name == "delete_same":
                del cache[HKey(key.label, collide=True)]
            elif name == "clear":
                cache.clear()
            elif name == "store_other":
                cache[HKey(1000, collide=True)] = HValue(1000)
            elif name == "popitem":
                cache.popitem()
            else:
                cache.flush()
                ctl[0].request(cache.shrinker.efd, 2)
                assert settle()

        return quietly(act)

    @pytest.mark.parametrize("action", ACTIONS)
    @pytest.mark.parametrize("at", range(6))
    def test_store_new_key(self, lru, ctl, action, at):
        """Setting a new colliding key while __eq__ meddles: the store wins, nothing is lost."""
        cache, _keys = _colliding_cache(lru)
        new = HKey(99, collide=True)
        trap.arm({"eq"}, at, self._action(action, cache, new, ctl))
        cache[new] = HValue(99)
        trap.disarm()
        items = assert_consistent(cache)
        assert cache._peek(HKey(99, collide=True)).label == 99
        drain(cache, len(items))

    @pytest.mark.parametrize("action", ACTIONS)
    @pytest.mark.parametrize("at", range(4))
    @pytest.mark.parametrize("operation", ["replace", "delete", "pop", "get", "setdefault"])
    def test_operations_on_existing_key(self, lru, ctl, action, at, operation):
        """Other operations on a stored colliding key while __eq__ meddles."""
        cache, keys = _colliding_cache(lru)
        key = HKey(keys[2].label, collide=True)
        trap.arm({"eq"}, at, self._action(action, cache, key, ctl))
        try:
            if operation == "replace":
                cache[key] = HValue(77)
            elif operation == "delete":
                del cache[key]
            elif operation == "pop":
                cache.pop(key, None)
            elif operation == "get":
                cache.get(key)
            else:
                cache.setdefault(key, HValue(78))
        except KeyError:
            assert operation == "delete"  # a meddling delete or clear got there first
        trap.disarm()
        items = assert_consistent(cache)
        if operation == "replace":
            assert cache._peek(key).label == 77
        if operation in ("delete", "pop"):
            assert key not in cache
        drain(cache, len(items))

    def test_threads_with_colliding_keys(self, lru):
        """Threads storing and deleting colliding keys whose __eq__ switches threads."""
        cache = lru(getsizeof=hsize)

        class Slow(HKey):
            __slots__ = ()

            def __eq__(self, other: object) -> bool:
                time.sleep(0)  # let the other thread run in the middle of the lookup
                return super().__eq__(other)

            __hash__ = HKey.__hash__

        errors: list[BaseException] = []

        def work(offset: int) -> None:
            try:
                for i in range(400):
                    label = (i * 7 + offset) % 12
                    if i % 3 == 2:
                        cache.pop(Slow(label, collide=True), None)
                    else:
                        cache[Slow(label, collide=True)] = HValue(label)
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        assert errors == []
        items = assert_consistent(cache)
        labels = [k.label for k, _ in items]
        assert len(labels) == len(set(labels))
        drain(cache, len(items))


# ---------------------------------------------------------------------- defect 3


class TestFailedStores:
    """A store that raises stores nothing; one that succeeds respects maxsize."""

    def _full_cache(self, lru: Callable[..., Any]) -> tuple[Any, HKey, HKey]:
        cache = lru(2, getsizeof=hsize)
        first, second = HKey(1, collide=True), HKey(2, collide=True)
        cache[first] = HValue(1)
        cache[second] = HValue(2)
        cache.get(first)  # second is now the least recently used, behind first in the index
        return cache, first, second

    @pytest.mark.parametrize("site", ["eq", "hash", "sizeof"])
    @pytest.mark.parametrize("at", range(4))
    @pytest.mark.parametrize("key", ["plain", "colliding"])
    def test_store_into_full_cache(self, lru, site, at, key):
        """The issue's case: eviction's lookup raising left the new value and currsize > maxsize."""
        cache, _first, _second = self._full_cache(lru)
        before = [(k.label, v.label) for k, v in cache.items()]
        new = HKey(3, collide=key == "colliding") if key == "colliding" else "z"
        trap.arm({site}, at, raiser())
        try:
            cache[new] = HValue(3)
        except Boom:
            trap.disarm()
            assert trap.fired is not None
            assert new not in cache
            after = [(k.label, v.label) for k, v in cache.items()]
            assert after == before
        else:
            trap.disarm()
            assert new in cache
        assert_consistent(cache)
        assert cache.currsize <= 2

    def test_raising_eq_leaves_cache_as_it_was(self, lru):
        """A lookup that raises changes nothing: entries, order, sizes, statistics."""
        cache, _first, _second = self._full_cache(lru)
        before = ([(k.label, v.label) for k, v in cache.items()], cache.currsize, cache.stats())
        trap.arm({"eq"}, 0, raiser())
        with pytest.raises(Boom):
            cache[HKey(7, collide=True)] = HValue(7)
        trap.disarm()
        after = ([(k.label, v.label) for k, v in cache.items()], cache.currsize, cache.stats())
        assert after == before


# ---------------------------------------------------------------------- defect 4


class TestSizeOverflow:
    """Sizes that cannot be summed are refused before anything is stored."""

    def test_sum_past_maxsize_refused(self, lru):
        """Near sys.maxsize, the entry that would overflow currsize is refused, nothing else."""
        cache = lru(getsizeof=lambda v: v, batch_bytes=0)
        cache["a"] = sys.maxsize - 10
        with pytest.raises(OverflowError, match=r"sys\.maxsize"):
            cache["b"] = 100
        assert "b" not in cache
        assert cache.currsize == sys.maxsize - 10
        cache["c"] = 10
        assert cache.currsize == sys.maxsize
        assert_consistent(cache)

    def test_a_size_of_sys_maxsize(self, lru, ctl):
        """One entry of sys.maxsize is stored, reported, and a request frees it."""

        def itself(v):
            return v

        cache = lru(getsizeof=itself, memsize=itself, batch_bytes=0, chunk_size=1 << 20)
        cache["a"] = sys.maxsize
        cache.flush()
        assert cache.currsize == cache.stats().nbytes == sys.maxsize
        assert ctl[0].count(cache.shrinker.efd) == cache.chunks == -(-sys.maxsize // (1 << 20))
        with pytest.raises(OverflowError):
            cache["b"] = 1
        ctl[0].request(cache.shrinker.efd, 1)
        assert settle()
        assert len(cache) == 0
        assert cache.currsize == 0
        cache.flush()
        assert ctl[0].count(cache.shrinker.efd) == 0

    def test_maxsize_near_sys_maxsize_evicts(self, lru):
        """Two halves of sys.maxsize under maxsize=sys.maxsize: the second evicts the first."""
        half = sys.maxsize // 2 + 1
        cache = lru(sys.maxsize, getsizeof=lambda v: v)
        cache["a"] = half
        cache["b"] = half
        assert list(cache) == ["b"]
        assert cache.currsize == half
        assert_consistent(cache)

    @pytest.mark.parametrize("size", [sys.maxsize + 1, 2**64, -(2**64)])
    @pytest.mark.parametrize("sizer", ["getsizeof", "memsize"])
    def test_sizes_out_of_range(self, lru, size, sizer):
        """A getsizeof or memsize result beyond a C size is an OverflowError, storing nothing."""
        cache = lru(**{sizer: lambda v: size})
        with pytest.raises(OverflowError):
            cache["a"] = 1
        assert len(cache) == 0
        assert cache.currsize == cache.stats().nbytes == 0

    def test_bytes_past_sys_maxsize_refused(self, lru):
        """Bytes that cannot be summed are refused, even with maxsize room, evicting nothing."""
        cache = lru(10, memsize=lambda v: v, batch_bytes=0)
        cache["a"] = sys.maxsize - 10
        with pytest.raises(OverflowError, match=r"sys\.maxsize"):
            cache["b"] = 100
        assert list(cache) == ["a"]
        cache["a"] = 100
        cache["b"] = 100
        assert (cache.currsize, cache.stats().nbytes) == (2, 200)
        assert_consistent(cache)

    def test_cached_function_results(self, ctl):
        """The decorator refuses to cache a result that would overflow its size, and says so."""
        sizes = iter([sys.maxsize - 1, 5])
        cached = shrinkable_cache(None, memsize=lambda r: next(sizes), transport=ctl[1])(str)
        try:
            assert cached(1) == "1"
            with pytest.raises(OverflowError):
                cached(2)
            assert cached.cache_info().currsize == 1
            assert cached.stats().nbytes == sys.maxsize - 1
        finally:
            cached.close()
