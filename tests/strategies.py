"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

import sys

from hypothesis import strategies as st

from pyshrinker.policy import Holding

from .hostile import SITES

chunk_sizes = st.sampled_from([1, 512, 4096, 65536, 1 << 20, 3 << 20])
costs = st.sampled_from([0.5, 1.0, 2.0, 4.0])
holdings = st.builds(Holding, count=st.integers(0, 10_000), chunk_size=chunk_sizes, cost=costs)

#: Byte counts as the controller sees them: anything from nothing to tens of GiB.
byte_counts = st.integers(0, 64 << 30)
#: Memory limits from one page to 64 GiB.
limits = st.integers(4096, 64 << 30)


@st.composite
def share_cases(draw: st.DrawFn, max_shrinkers: int = 8) -> tuple[int, list[Holding]]:
    """``(need, holdings)`` for :func:`~pyshrinker.policy.share`, need 0 to twice the holdings."""
    held = draw(st.lists(holdings, max_size=max_shrinkers))
    total = sum(h.count * h.chunk_size for h in held)
    need = draw(st.integers(0, 2 * total + 1) | st.just(total))
    return need, held


# ---------------------------------------------------------------------- the LRU fuzz
# (tests/test_lru_fuzz.py: hostile keys and values, traps that fire inside operations)

#: Labels of the fuzz's keys: few, so that operations meet the same keys again.
key_labels = st.integers(0, 7)
#: Sizes of the fuzz's values: mostly small; now and then half of sys.maxsize, all of it,
#: more than it, or negative (which the caches must refuse).
value_sizes = st.integers(0, 4) | st.sampled_from(
    [0, 1, sys.maxsize // 2 + 1, sys.maxsize, sys.maxsize + 1, -1]
)
#: ShrinkableLRU maxsize (bytes), None for none.
lru_maxsizes = st.sampled_from([None, None, 0, 1, 3, 6, sys.maxsize])
#: @shrinkable_cache maxsize (entries), None for none.
function_maxsizes = st.sampled_from([None, 0, 1, 2, 4])
fuzz_chunk_sizes = st.sampled_from([1, 3, 4096])
#: Where a trap fires (see tests/hostile.py), and at which visit of it.
trap_sites = st.sampled_from(SITES)
trap_countdowns = st.integers(0, 3)
#: Shrink requests, in chunks.
request_chunks = st.integers(0, 8) | st.just(1 << 62)

_raise = st.just(("raise",))
_request = st.tuples(st.just("request"), request_chunks)
_clear = st.just(("clear",))

#: What a trap does inside a ShrinkableLRU operation: raise, or use the cache.
lru_trap_actions = st.one_of(
    _raise,
    st.tuples(st.just("set"), key_labels, st.integers(0, 4)),
    st.tuples(st.sampled_from(["delete", "pop", "get"]), key_labels),
    st.just(("popitem",)),
    _clear,
    _request,
)
#: What a trap does inside a cached function's call: raise, or use the function.
function_trap_actions = st.one_of(
    _raise,
    st.tuples(st.just("call"), key_labels),
    _clear,
    _request,
)
#: A trap for one operation of each (site, countdown, action), or none: half the operations.
lru_traps = st.none() | st.tuples(trap_sites, trap_countdowns, lru_trap_actions)
function_traps = st.none() | st.tuples(trap_sites, trap_countdowns, function_trap_actions)


#: ``key value`` files as the kernel writes them (memory.stat, memory.events): distinct keys,
#: some the suffix of another (``inactive_file`` and ``total_inactive_file``).
_stat_keys = st.sampled_from(
    ["cache", "rss", "inactive_file", "total_inactive_file", "hierarchical_memory_limit", "low"]
)
flat_keyed_files = st.dictionaries(_stat_keys, st.integers(0, 2**63 - 1), max_size=6)
