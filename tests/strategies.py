"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

from pyshrinker.policy import Holding

chunk_sizes = st.sampled_from([1, 512, 4096, 65536, 1 << 20, 3 << 20])
costs = st.sampled_from([0.5, 1.0, 2.0, 4.0])
holdings = st.builds(Holding, count=st.integers(0, 10_000), chunk_size=chunk_sizes, cost=costs)
