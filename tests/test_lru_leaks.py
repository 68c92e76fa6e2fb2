"""No operation of the LRU caches leaks, error paths included: references and memory blocks.

Each operation runs many times after a warm-up (three rounds of ``PYSHRINKER_LEAK_ITERATIONS``,
300 by default); the interpreter's count of allocated blocks (:func:`sys.getallocatedblocks`:
pymalloc, which also holds the C core's nodes and index) and, on a debug CPython, its total
reference count (``sys.gettotalrefcount``) must not grow with the iterations. scripts/lru_ci.sh
runs this under python3.11-dbg with many more iterations and ``PYSHRINKER_REQUIRE_REFCOUNTS=1``,
which makes a missing reference count a failure.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyshrinker import ClosedError, ShrinkableLRU, shrinkable_cache

from .helpers import private_controller
from .hostile import Boom, HKey, HValue, hsize, quietly, raiser, trap

ITERATIONS = int(os.environ.get("PYSHRINKER_LEAK_ITERATIONS", "300"))
REQUIRE_REFCOUNTS = os.environ.get("PYSHRINKER_REQUIRE_REFCOUNTS") == "1"
#: Growth allowed over all the iterations: caches warming up, not one object per iteration.
SLACK = 40


def measure() -> tuple[int, int]:
    gc.collect()
    refs = sys.gettotalrefcount() if hasattr(sys, "gettotalrefcount") else 0  # type: ignore[attr-defined]
    return refs, sys.getallocatedblocks()


def growth(operation: Callable[[], object]) -> tuple[int, int]:
    """(references, blocks) gained over ITERATIONS runs of operation, after a warm-up.

    The least of three rounds: the counts are the whole interpreter's, and another thread (a
    listener, a controller) may allocate meanwhile; a leak gains in every round.
    """
    for _ in range(max(50, ITERATIONS // 10)):
        operation()
    rounds = []
    for _ in range(3):
        before = measure()
        for _ in range(ITERATIONS):
            operation()
        after = measure()
        rounds.append((after[0] - before[0], after[1] - before[1]))
    return min(r for r, _ in rounds), min(b for _, b in rounds)


def expect(error: type[BaseException], operation: Callable[[], object]) -> Callable[[], None]:
    """operation, which must raise error."""

    def run() -> None:
        try:
            operation()
        except error:
            return
        raise AssertionError(f"{operation} did not raise {error.__name__}")

    return run


@pytest.fixture(scope="module")
def transport() -> Iterator[Any]:
    """A private controller's transport for all the caches here."""
    with private_controller() as (_controller, embedded):
        yield embedded


def _mapping_operations(transport: Any) -> dict[str, Callable[[], object]]:
    """Operations on ShrinkableLRUs, each leaving its cache as it found it."""
    evicted: list[object] = []
    c: ShrinkableLRU[Any, Any] = ShrinkableLRU(
        100,
        getsizeof=len,
        on_evict=lambda k, v: evicted.clear(),
        transport=transport,
        batch_bytes=1 << 40,
    )
    c["a"] = b"xx"
    c["b"] = b"yyy"
    empty: ShrinkableLRU[Any, Any] = ShrinkableLRU(transport=transport)
    sized: dict[str, Any] = {}

    def odd_size(value: object) -> Any:
        size = sized["size"]
        if isinstance(size, type):
            raise size("size")  # a new one each time: one raised again keeps its tracebacks
        return size

    odd: ShrinkableLRU[Any, Any] = ShrinkableLRU(getsizeof=odd_size, transport=transport)
    huge: ShrinkableLRU[Any, Any] = ShrinkableLRU(getsizeof=lambda v: v, transport=transport)
    huge["big"] = sys.maxsize - 10
    odd_bytes: ShrinkableLRU[Any, Any] = ShrinkableLRU(memsize=odd_size, transport=transport)
    huge_bytes: ShrinkableLRU[Any, Any] = ShrinkableLRU(memsize=lambda v: v, transport=transport)
    huge_bytes["big"] = sys.maxsize - 10
    plain: ShrinkableLRU[Any, Any] = ShrinkableLRU(10, transport=transport)
    plain.update({"a": b"a", "b": (1, 2)})
    hostile: ShrinkableLRU[Any, Any] = ShrinkableLRU(getsizeof=hsize, transport=transport)
    for label in range(4):
        hostile[HKey(label, collide=True)] = HValue(label)
    closed: ShrinkableLRU[Any, Any] = ShrinkableLRU(transport=transport)
    closed.close()

    class Computing(ShrinkableLRU[Any, Any]):
        def __missing__(self, key: Any) -> Any:
            value = self[key] = key * 2
            return value

    computing = Computing(transport=transport)

    class Finalized:
        def __del__(self) -> None:
            pass

    def unpickled() -> None:
        # What pickle.loads(pickle.dumps(plain)) does, but registered with our private
        # controller, not the default one (whose own thread allocates meanwhile).
        rebuild, (cls, settings), state = plain.__reduce__()
        state = pickle.loads(pickle.dumps(state))
        new = rebuild(cls, dict(settings, transport=transport))
        new.__setstate__(state)
        new.close()

    def bytes_of(size: object) -> Callable[[], None]:
        def run() -> None:
            sized["size"] = size
            odd_bytes["k"] = 1

        return run

    def sizes(size: object) -> Callable[[], None]:
        def run() -> None:
            sized["size"] = size
            odd["k"] = 1

        return run

    def trapped(
        action: Callable[[], object], operation: Callable[[], object]
    ) -> Callable[[], None]:
        def run() -> None:
            trap.arm({"eq"}, 0, action)
            try:
                operation()
            finally:
                trap.disarm()

        return run

    def store_and(after: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            c["n"] = b"n"
            after()

        return run

    def fill_and(after: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for i in range(5):
                c[i] = b"v" * 30  # evicts for maxsize, tells on_evict
            after()
            c["a"] = b"xx"
            c["b"] = b"yyy"

        return run

    def free_while_raising() -> None:
        try:
            [ShrinkableLRU(transport=transport), 1 / 0]
        except ZeroDivisionError:
            pass

    def create_and_free() -> None:
        made: ShrinkableLRU[Any, Any] = ShrinkableLRU(transport=transport)
        made["x"] = Finalized()
        made["y"] = [1, 2]
        del made

    hostile_key = HKey(2, collide=True)
    return {
        "set and delete": store_and(lambda: c.__delitem__("n")),
        "replace": lambda: c.__setitem__("a", b"xx"),
        "get hit": lambda: c.get("a"),
        "get miss": lambda: c.get("zz", 0),
        "getitem hit": lambda: c["a"],
        "getitem miss": expect(KeyError, lambda: c["zz"]),
        "missing override": lambda: (computing[3], computing.clear()),
        "contains": lambda: ("a" in c, "zz" in c),
        "delete miss": expect(KeyError, lambda: c.__delitem__("zz")),
        "pop hit": store_and(lambda: c.pop("n")),
        "pop miss": lambda: c.pop("zz", None),
        "pop miss raises": expect(KeyError, lambda: c.pop("zz")),
        "popitem": lambda: (empty.__setitem__(1, 1), empty.popitem()),
        "popitem empty": expect(KeyError, empty.popitem),
        "setdefault hit": lambda: c.setdefault("a", b"xx"),
        "setdefault miss": lambda: (c.setdefault("n", b"n"), c.pop("n")),
        "clear": fill_and(c.clear),
        "evict for maxsize": fill_and(lambda: None),
        "iterate and views": lambda: (list(c), list(c.items()), list(c.values()), list(c.keys())),
        "len stats repr": lambda: (len(c), c.stats(), repr(c), c.currsize, c.chunks),
        "evict chunks": fill_and(lambda: c._evict_chunks(1, 1, True)),
        "reclaim": fill_and(lambda: c._reclaim(1)),
        "value too large": expect(ValueError, lambda: c.__setitem__("t", b"t" * 200)),
        "getsizeof raises": expect(Boom, sizes(Boom)),
        "getsizeof negative": expect(ValueError, sizes(-1)),
        "getsizeof float": expect(TypeError, sizes(1.5)),
        "getsizeof huge": expect(OverflowError, sizes(1 << 70)),
        "sum overflows": expect(OverflowError, lambda: huge.__setitem__("more", 100)),
        "memsize raises": expect(Boom, bytes_of(Boom)),
        "memsize negative": expect(ValueError, bytes_of(-1)),
        "bytes overflow": expect(OverflowError, lambda: huge_bytes.__setitem__("more", 100)),
        "copy": lambda: (copy.copy(c).close(), copy.deepcopy(c).close()),
        "pickle": unpickled,
        "unhashable key": expect(TypeError, lambda: c.__setitem__([1], b"x")),
        "closed": expect(ClosedError, lambda: closed.__setitem__("x", 1)),
        "eq raises": expect(Boom, trapped(raiser(), lambda: hostile.get(hostile_key))),
        "eq stores": trapped(
            quietly(lambda: hostile.__setitem__(HKey(9, collide=True), HValue(9))),
            lambda: (hostile.get(hostile_key), hostile.pop(HKey(9, collide=True), None)),
        ),
        "eq deletes": trapped(
            quietly(lambda: hostile.__delitem__(HKey(1, collide=True))),
            lambda: (
                hostile.get(hostile_key),
                hostile.__setitem__(HKey(1, collide=True), HValue(1)),
            ),
        ),
        "finalized values": lambda: (empty.__setitem__("f", Finalized()), empty.__delitem__("f")),
        "free while raising": free_while_raising,
        "create and free": create_and_free,
    }


def _function_operations(transport: Any) -> dict[str, Callable[[], object]]:
    """Operations on @shrinkable_cache functions."""

    def body(*args: Any, **kwargs: Any) -> list[Any]:
        return [args, kwargs]

    cached = shrinkable_cache(2, transport=transport, batch_bytes=1 << 40)(body)
    typed = shrinkable_cache(2, typed=True, transport=transport, batch_bytes=1 << 40)(body)
    uncached = shrinkable_cache(0, transport=transport)(body)
    cached(1)

    @shrinkable_cache(None, transport=transport)
    def fails(x: int) -> int:
        raise Boom("body")

    sizes = shrinkable_cache(None, memsize=lambda r: 1 / 0, transport=transport)(body)

    class Point:
        @shrinkable_cache(None, transport=transport)
        def method(self, n: int) -> int:
            return n

    point = Point()

    def cycle() -> None:
        for i in range(4):
            cached(i)  # misses, evictions for maxsize

    def create_and_free() -> None:
        made = shrinkable_cache(None, transport=transport)(body)
        made(1)
        made("two", three=3)
        del made

    def free_while_raising() -> None:
        try:
            [shrinkable_cache(transport=transport)(len), 1 / 0]
        except ZeroDivisionError:
            pass

    return {
        "call hit": lambda: cached(3) and cached(3),
        "calls that evict": cycle,
        "keywords": lambda: cached(1, key="word"),
        "typed": lambda: (typed(1), typed(1.0)),
        "uncached": lambda: uncached(5),
        "unhashable argument": expect(TypeError, lambda: cached([1])),
        "function raises": expect(Boom, lambda: fails(1)),
        "getsizeof raises": expect(ZeroDivisionError, lambda: sizes(object())),
        "cache_clear and info": lambda: (cached.cache_clear(), cached.cache_info(), cached(1)),
        "method": lambda: (point.method(1), Point.method(point, 2)),
        "free while raising": free_while_raising,
        "create and free": create_and_free,
    }


def _cases() -> list[tuple[str, str]]:
    with private_controller() as (_controller, embedded):
        mapping = sorted(_mapping_operations(embedded))
        function = sorted(_function_operations(embedded))
    return [("mapping", name) for name in mapping] + [("function", name) for name in function]


@pytest.fixture(scope="module")
def operations(transport: Any) -> dict[tuple[str, str], Callable[[], object]]:
    """Every operation, by (front end, name)."""
    ops = {("mapping", name): op for name, op in _mapping_operations(transport).items()}
    ops.update({("function", name): op for name, op in _function_operations(transport).items()})
    return ops


class TestNoLeaks:
    """Each operation, repeated, gains no references and no memory blocks."""

    def test_refcounts_available(self):
        """Reference counts are measured: on a debug CPython (required by the CI stage)."""
        if not hasattr(sys, "gettotalrefcount"):
            if REQUIRE_REFCOUNTS:
                pytest.fail("PYSHRINKER_REQUIRE_REFCOUNTS=1 needs a debug CPython")
            pytest.skip("reference counts need a debug CPython; blocks are checked here")
        assert measure()[0] > 0

    @pytest.mark.parametrize("case", _cases(), ids=lambda case: f"{case[0]}: {case[1]}")
    def test_operation(self, operations, case):
        """References and blocks do not grow with the iterations."""
        refs, blocks = growth(operations[case])
        assert refs < SLACK, f"{refs} references gained in {ITERATIONS} runs"
        assert blocks < SLACK, f"{blocks} blocks gained in {ITERATIONS} runs"
