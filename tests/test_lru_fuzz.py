"""Stateful fuzz: ShrinkableLRU and @shrinkable_cache against pure-Python reference models.

Hypothesis drives a real cache and its model (tests/lru_model.py) through the same operations,
with hostile keys, values and sizer (tests/hostile.py): colliding keys, huge and negative sizes,
and a trap that fires inside the next operation, at a chosen visit of ``__hash__``, ``__eq__``,
the sizer, the cached function, ``on_evict`` or a value's ``__del__``, to raise or to use the
cache (store, delete, clear, a shrink request served by the listener thread). The model applies
the trap's action where the C core lets Python code run: before the operation changes anything,
between the two lookups of a miss, or after the change. After every step the two must agree on
the contents and their order, ``len``, iteration, ``currsize``, ``maxsize``, the statistics, the
evictions ``on_evict`` heard of, and the controller's count; and the core's own invariants hold.

Here each test runs a few examples. ``scripts/ci_lru.sh`` runs it for minutes under
AddressSanitizer: ``python -m tests.test_lru_fuzz --seconds N`` (prints the examples run).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pyshrinker import Controller, EmbeddedTransport, ShrinkableLRU, settle, shrinkable_cache

from . import strategies as s
from .helpers import private_controller
from .hostile import Boom, HKey, HValue, hsize, trap
from .lru_model import ModelError, ModelFunction, ModelLRU

#: Examples per test in the suite (the CI fuzz stage runs many more).
EXAMPLES = int(os.environ.get("PYSHRINKER_FUZZ_EXAMPLES", "50"))


def key(label: int) -> HKey:
    """A fresh key object: even labels all collide, odd ones hash apart."""
    return HKey(label, collide=label % 2 == 0)


def label(value: Any) -> Any:
    return None if value is None else value.label


#: A trap for one operation: (site, countdown, action); see tests/strategies.py.
Trap = tuple[str, int, tuple[Any, ...]]


class Counters:
    """What the fuzz did, for the CI stage's report."""

    examples = 0
    steps = 0
    fired: ClassVar[dict[str, int]] = {}


class _Machine(RuleBasedStateMachine):
    """What both machines share: the trap, the run of one operation, the shared checks."""

    #: The private controller the caches register with, set by the test or the runner.
    ctl: ClassVar[tuple[Controller, EmbeddedTransport] | None] = None
    #: Exceptions reported by sys.unraisablehook meanwhile (Boom from a __del__ trap only).
    unraisable: ClassVar[list[BaseException | None]] = []

    #: Sites that mark the middle of an operation (after its first lookup missed).
    BOUNDARY: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        assert self.ctl is not None, "set _Machine.ctl first"
        Counters.examples += 1
        self.record: dict[str, Any] = {}

    def teardown(self) -> None:
        trap.disarm()
        cache = getattr(self, "cache", None)
        if cache is not None:
            cache.close()

    # ------------------------------------------------------------- the trap

    def _request(self, chunks: int) -> None:
        assert self.ctl is not None
        self.record["asked"] = self.ctl[0].request(self.cache.shrinker.efd, chunks)
        assert settle()

    def _phase(self, boundary: frozenset[str]) -> str | None:
        """Where the trap fired: pre (before any change), mid (between lookups), post, None."""
        if trap.fired is None:
            return None
        site, index = trap.fired
        Counters.fired[site] = Counters.fired.get(site, 0) + 1
        if site in ("on_evict", "del"):
            return "post"
        if site in boundary or boundary & set(trap.visits[:index]):
            return "mid"
        return "pre"

    def run(
        self,
        spec: Trap | None,
        impl: Callable[[], Any],
        model: Callable[..., Any],
        boundary: frozenset[str] = frozenset(),
    ) -> None:
        """Run one operation on the cache and on the model, with trap ``spec``; compare."""
        Counters.steps += 1
        self.record = {}
        told_before = len(self.told)
        if spec is not None:
            site, countdown, action = spec
            trap.arm({site}, countdown, self._impl_action(action))
        try:
            got: tuple[str, Any] = ("ok", impl())
        except Exception as err:  # the model says which
            got = ("raise", type(err))
        trap.disarm()
        phase = self._phase(boundary) if spec is not None else None
        raising = spec is not None and spec[2][0] == "raise"
        replay = None if spec is None else self._model_action(spec[2])
        first = trap.fired is not None and trap.fired[0] == "call"

        def boom() -> None:
            raise ModelError(Boom)

        try:
            if phase == "pre" and raising:
                raise ModelError(Boom)
            if phase == "pre":
                assert replay is not None
                replay()
                expected: tuple[str, Any] = ("ok", model())
            elif phase == "mid":
                meanwhile = boom if raising else replay
                expected = ("ok", model(meanwhile=meanwhile, first=first))
            else:
                expected = ("ok", model())
        except ModelError as err:
            expected = ("raise", err.kind)
        if phase == "post" and not raising:
            # After the operation, whether it succeeded or not (a value released on its way out).
            assert replay is not None
            replay()
            if trap.fired is not None and trap.fired[0] == "on_evict":
                # The action ran inside an on_evict call, on this thread or (a request) the
                # listener's, so what it evicts is heard of before the operation's later
                # evictions, where the model hears of it after them. The same evictions, each
                # once: the order across the two is not part of the contract.
                heard, modelled = self.told[told_before:], self.model.told[told_before:]
                assert sorted(heard) == sorted(modelled), (heard, modelled)
                self.model.told[told_before:] = heard
        assert got == expected, f"trap {spec} fired {trap.fired} ({phase}): {got} != {expected}"

    def _impl_action(self, action: tuple[Any, ...]) -> Callable[[], object]:
        raise NotImplementedError

    def _model_action(self, action: tuple[Any, ...]) -> Callable[[], object]:
        raise NotImplementedError

    # ------------------------------------------------------------- shared checks

    @rule(chunks=s.request_chunks)
    def request(self, chunks: int) -> None:
        """A shrink request through the controller, served by the listener thread."""
        self._request(chunks)
        assert self.record["asked"] == min(chunks, self.model.chunks)
        self.model.reclaim(self.record["asked"], self.tells)

    @invariant()
    def agree(self) -> None:
        """The cache and the model agree; the core's invariants hold; books are exact."""
        if not hasattr(self, "cache"):
            return
        cache, model = self.cache, self.model
        cache._check()
        items = [
            (k.label if isinstance(k, HKey) else k[0].label, v.label) for k, v in cache._items()
        ]
        assert items == model.items()
        stats = cache.stats()
        assert stats.entries == len(model.entries)
        # The model's sizes are the bytes (memsize); the mapping's getsizeof is the same sizer,
        # the function's sizes count entries.
        assert stats.nbytes == model.currsize
        function = isinstance(self, FunctionMachine)
        assert stats.currsize == (len(model.entries) if function else model.currsize)
        assert stats.chunks == model.chunks
        assert (stats.hits, stats.misses) == (model.hits, model.misses)
        assert stats.evicted_by_maxsize == model.evicted_by_maxsize
        assert stats.evicted_on_request == model.evicted_on_request
        assert self.told == model.told
        assert self.ctl is not None
        assert self.ctl[0].count(cache.shrinker.efd) == model.chunks
        assert all(isinstance(err, Boom) for err in self.unraisable), self.unraisable


class MappingMachine(_Machine):
    """ShrinkableLRU against ModelLRU."""

    @initialize(maxsize=s.lru_maxsizes, chunk_size=s.fuzz_chunk_sizes, tells=st.booleans())
    def make(self, maxsize: int | None, chunk_size: int, tells: bool) -> None:
        assert self.ctl is not None
        self.told: list[tuple[int, int]] = []
        self.tells = tells
        self.values = 0
        self.cache: ShrinkableLRU[HKey, HValue] = ShrinkableLRU(
            maxsize,
            getsizeof=hsize,
            memsize=hsize,
            on_evict=self._on_evict if tells else None,
            chunk_size=chunk_size,
            batch_bytes=0,
            transport=self.ctl[1],
        )
        self.model = ModelLRU(maxsize, chunk_size, tells)

    def _on_evict(self, key: HKey, value: HValue) -> None:
        self.told.append((key.label, value.label))
        trap.visit("on_evict")

    def _value(self, size: int) -> HValue:
        self.values += 1
        return HValue(self.values, size)

    # ------------------------------------------------------------- trap actions

    def _impl_action(self, action: tuple[Any, ...]) -> Callable[[], object]:
        kind = action[0]
        cache = self.cache

        def act() -> None:
            if kind == "raise":
                raise Boom("trap")
            try:
                if kind == "set":
                    value = self._value(action[2])
                    self.record["value"] = value.label
                    cache[key(action[1])] = value
                    del value
                elif kind == "delete":
                    del cache[key(action[1])]
                elif kind == "pop":
                    cache.pop(key(action[1]), None)
                elif kind == "get":
                    cache.get(key(action[1]))
                elif kind == "popitem":
                    cache.popitem()
                elif kind == "clear":
                    cache.clear()
                else:
                    self._request(action[1])
            except (KeyError, ValueError, OverflowError):
                pass

        return act

    def _model_action(self, action: tuple[Any, ...]) -> Callable[[], object]:
        kind = action[0]
        model = self.model

        def replay() -> None:
            try:
                if kind == "set":
                    model.set(action[1], self.record["value"], action[2])
                elif kind == "delete":
                    model.delete(action[1])
                elif kind == "pop":
                    model.pop(action[1])
                elif kind == "get":
                    model.get(action[1])
                elif kind == "popitem":
                    model.popitem()
                elif kind == "clear":
                    model.clear()
                elif kind == "request":
                    model.reclaim(self.record["asked"], self.tells)
            except ModelError:
                pass

        return replay

    # ------------------------------------------------------------- operations

    def _handing(self, size: int, use: Callable[[HValue], Any]) -> tuple[int, Callable[[], Any]]:
        """A new value's label, and an operation that hands it to ``use``, keeping no reference
        (so that the cache's release of it runs its __del__ inside the operation)."""
        held = [self._value(size)]
        number = held[0].label
        return number, lambda: use(held.pop())

    @rule(k=s.key_labels, size=s.value_sizes, t=s.lru_traps)
    def set(self, k: int, size: int, t: Trap | None) -> None:
        number, impl = self._handing(size, lambda value: self.cache.__setitem__(key(k), value))
        self.run(t, impl, lambda **_: self.model.set(k, number, size))

    @rule(k=s.key_labels, t=s.lru_traps)
    def get(self, k: int, t: Trap | None) -> None:
        self.run(t, lambda: label(self.cache.get(key(k))), lambda **_: self.model.get(k))

    @rule(k=s.key_labels, t=s.lru_traps)
    def getitem(self, k: int, t: Trap | None) -> None:
        self.run(t, lambda: self.cache[key(k)].label, lambda **_: self.model.getitem(k))

    @rule(k=s.key_labels, t=s.lru_traps)
    def contains(self, k: int, t: Trap | None) -> None:
        self.run(t, lambda: key(k) in self.cache, lambda **_: self.model.contains(k))

    @rule(k=s.key_labels, t=s.lru_traps)
    def delete(self, k: int, t: Trap | None) -> None:
        def impl() -> None:
            del self.cache[key(k)]

        self.run(t, impl, lambda **_: self.model.delete(k))

    @rule(k=s.key_labels, t=s.lru_traps)
    def pop(self, k: int, t: Trap | None) -> None:
        self.run(t, lambda: label(self.cache.pop(key(k), None)), lambda **_: self.model.pop(k))

    @rule(t=s.lru_traps)
    def popitem(self, t: Trap | None) -> None:
        def impl() -> tuple[int, int]:
            k, v = self.cache.popitem()
            return k.label, v.label

        self.run(t, impl, lambda **_: self.model.popitem())

    @rule(k=s.key_labels, size=s.value_sizes, t=s.lru_traps)
    def setdefault(self, k: int, size: int, t: Trap | None) -> None:
        number, impl = self._handing(size, lambda value: self.cache.setdefault(key(k), value).label)

        def model(meanwhile: Callable[[], object] | None = None, first: bool = False) -> int:
            return self.model.setdefault(k, number, size, meanwhile)

        self.run(t, impl, model, frozenset({"sizeof"}))

    @rule(t=s.lru_traps)
    def clear(self, t: Trap | None) -> None:
        self.run(t, self.cache.clear, lambda **_: self.model.clear())

    @rule()
    def iterate(self) -> None:
        """Iteration and values agree with the model (and so with items)."""
        keys = [k.label for k in self.cache]
        assert [v.label for v in self.cache.values()] == [v for _, v in self.model.items()]
        assert keys == list(self.model.entries)
        assert len(self.cache) == len(keys)


class FunctionMachine(_Machine):
    """@shrinkable_cache against ModelFunction."""

    BOUNDARY = frozenset({"call", "sizeof"})

    @initialize(
        maxsize=s.function_maxsizes,
        chunk_size=s.fuzz_chunk_sizes,
        typed=st.booleans(),
        sizes=st.lists(s.value_sizes, min_size=8, max_size=8),
    )
    def make(self, maxsize: int | None, chunk_size: int, typed: bool, sizes: list[int]) -> None:
        assert self.ctl is not None
        self.told: list[tuple[int, int]] = []
        self.tells = False
        self.results = 0
        self.sizes = sizes

        def body(k: HKey) -> HValue:
            trap.visit("call")
            self.results += 1
            return HValue(self.results, self.sizes[k.label])

        self.cache = shrinkable_cache(
            maxsize,
            typed,
            memsize=hsize,
            chunk_size=chunk_size,
            batch_bytes=0,
            transport=self.ctl[1],
        )(body)
        self.model = ModelFunction(maxsize, chunk_size, lambda k: self.sizes[k])

    def _impl_action(self, action: tuple[Any, ...]) -> Callable[[], object]:
        kind = action[0]

        def act() -> None:
            if kind == "raise":
                raise Boom("trap")
            try:
                if kind == "call":
                    self.cache(key(action[1]))
                elif kind == "clear":
                    self.cache.cache_clear()
                else:
                    self._request(action[1])
            except (ValueError, OverflowError):
                pass

        return act

    def _model_action(self, action: tuple[Any, ...]) -> Callable[[], object]:
        kind = action[0]

        def replay() -> None:
            try:
                if kind == "call":
                    self.model.call(action[1])
                elif kind == "clear":
                    self.model.clear()
                else:
                    self.model.reclaim(self.record["asked"], False)
            except ModelError:
                pass

        return replay

    @rule(k=s.key_labels, t=s.function_traps)
    def call(self, k: int, t: Trap | None) -> None:
        def model(meanwhile: Callable[[], object] | None = None, first: bool = False) -> int:
            return self.model.call(k, meanwhile, first)

        self.run(t, lambda: self.cache(key(k)).label, model, self.BOUNDARY)

    @rule(t=s.function_traps)
    def cache_clear(self, t: Trap | None) -> None:
        self.run(t, self.cache.cache_clear, lambda **_: self.model.clear())

    @precondition(lambda self: hasattr(self, "cache"))
    @invariant()
    def info(self) -> None:
        """cache_info() says what the model holds."""
        info = self.cache.cache_info()
        assert info == (
            self.model.hits,
            self.model.misses,
            self.model.maxsize,
            len(self.model.entries),
        )


# ---------------------------------------------------------------------- running it


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.fixture
def fuzz_controller() -> Iterator[None]:
    """A private controller for the machines, and a record of unraisable exceptions."""
    hook = sys.unraisablehook
    with private_controller() as pair:
        _Machine.ctl = pair
        _Machine.unraisable.clear()
        sys.unraisablehook = lambda info: _Machine.unraisable.append(info.exc_value)
        try:
            yield
        finally:
            sys.unraisablehook = hook
            _Machine.ctl = None


@pytest.mark.parametrize("machine", [MappingMachine, FunctionMachine], ids=lambda m: m.__name__)
def test_fuzz(fuzz_controller, machine):
    """The cache agrees with its model, step after step, under hostile objects and traps."""
    run_state_machine_as_test(machine, settings=fuzz_settings(EXAMPLES))


def test_request_inside_on_evict(fuzz_controller):
    """Found by the CI fuzz: a request from inside the first of a set's on_evict calls evicts
    the new entry, heard of before the set's second eviction. The machine accepts the order."""
    machine = MappingMachine()
    try:
        machine.make(maxsize=1, chunk_size=1, tells=True)
        machine.set(k=0, size=0, t=None)
        machine.set(k=2, size=1, t=None)
        machine.agree()
        machine.set(k=1, size=1, t=("on_evict", 0, ("request", 2**62)))
        machine.agree()
        assert sorted(label for label, _value in machine.told) == [0, 1, 2]
        assert len(machine.cache) == 0
    finally:
        machine.teardown()


def main(argv: list[str] | None = None) -> int:
    """Run both machines in turns until ``--seconds`` have passed; print what was run."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=50, help="examples per machine per turn")
    args = parser.parse_args(argv)
    # on_evict traps raise on purpose: lru logs each; keep the output to the summary.
    logging.getLogger("pyshrinker").setLevel(logging.CRITICAL)
    deadline = time.monotonic() + args.seconds
    start = time.monotonic()
    turns = 0
    hook = sys.unraisablehook
    with private_controller() as pair:
        _Machine.ctl = pair
        sys.unraisablehook = lambda info: _Machine.unraisable.append(info.exc_value)
        try:
            while time.monotonic() < deadline:
                for machine in (MappingMachine, FunctionMachine):
                    run_state_machine_as_test(
                        machine, settings=settings(fuzz_settings(args.batch), database=None)
                    )
                turns += 1
        finally:
            sys.unraisablehook = hook
            _Machine.ctl = None
    fired = ", ".join(f"{site} {n}" for site, n in sorted(Counters.fired.items()))
    print(
        f"lru fuzz: {Counters.examples} examples, {Counters.steps} operations in "
        f"{time.monotonic() - start:.0f} s ({turns} turns of {args.batch} per machine); "
        f"traps fired: {fired}; no failure"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
