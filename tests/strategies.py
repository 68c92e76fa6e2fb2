"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

from pyshrinker.policy import Holding

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
