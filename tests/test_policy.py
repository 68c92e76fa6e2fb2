"""The reclaim policy: watermarks, how much to free, how often to look, and who gives what."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pyshrinker import policy
from pyshrinker.policy import (
    DISTRUSTED_WEIGHT,
    MIN_HEADROOM,
    Holding,
    MiB,
    Watermarks,
    adaptive_watermarks,
    bytes_to_free,
    credit_drop,
    decayed_peak,
    dominant,
    grace,
    headroom_bounds,
    poll_interval,
    share,
    weight,
    weights,
)

from .strategies import byte_counts, holdings, limits, share_cases

GiB = 1 << 30


class TestWatermarks:
    """Watermarks.for_limit."""

    def test_default_is_an_eighth_of_the_limit(self) -> None:
        """By default the headroom is 12.5 % of a large limit."""
        marks = Watermarks.for_limit(1 * GiB)
        assert marks == Watermarks(limit=GiB, high=GiB - 128 * MiB, low=GiB - 256 * MiB)

    def test_default_at_least_min_headroom(self) -> None:
        """A 200 MiB limit gets the 32 MiB minimum, not 25 MiB."""
        marks = Watermarks.for_limit(200 * MiB)
        assert marks.high == 168 * MiB
        assert marks.low == 136 * MiB
        assert 32 * MiB == MIN_HEADROOM

    def test_default_at_most_a_quarter(self) -> None:
        """A 64 MiB limit gets a quarter (16 MiB), since 32 MiB would leave nothing."""
        marks = Watermarks.for_limit(64 * MiB)
        assert marks.high == 48 * MiB
        assert marks.low == 32 * MiB

    def test_tiny_limit(self) -> None:
        """Even a 1-byte limit gives ordered, non-negative marks."""
        marks = Watermarks.for_limit(1)
        assert marks == Watermarks(limit=1, high=0, low=0)

    def test_int_headroom_is_bytes(self) -> None:
        """An int headroom is a number of bytes."""
        marks = Watermarks.for_limit(100 * MiB, 10 * MiB)
        assert marks.high == 90 * MiB
        assert marks.low == 80 * MiB

    def test_float_headroom_is_a_fraction(self) -> None:
        """A float headroom is a fraction of the limit."""
        marks = Watermarks.for_limit(100 * MiB, 0.25)
        assert marks.high == 75 * MiB
        assert marks.low == 50 * MiB

    def test_largest_int_headroom(self) -> None:
        """Headroom just under half the limit is accepted, low stays >= 0."""
        marks = Watermarks.for_limit(100, 49)
        assert marks == Watermarks(limit=100, high=51, low=2)

    @pytest.mark.parametrize("limit", [0, -1, -GiB])
    def test_limit_must_be_positive(self, limit: int) -> None:
        """A zero or negative limit is a ValueError."""
        with pytest.raises(ValueError, match="limit"):
            Watermarks.for_limit(limit)

    @pytest.mark.parametrize("headroom", [0.0, 0.5, 0.75, 1.0, -0.1, float("nan")])
    def test_bad_fraction(self, headroom: float) -> None:
        """A fraction outside (0, 0.5) is a ValueError."""
        with pytest.raises(ValueError, match="fraction"):
            Watermarks.for_limit(GiB, headroom)

    @pytest.mark.parametrize("headroom", [0, -1, 50 * MiB, 100 * MiB, 200 * MiB])
    def test_bad_bytes(self, headroom: int) -> None:
        """A byte headroom outside 1..limit/2-1 is a ValueError."""
        with pytest.raises(ValueError, match="headroom"):
            Watermarks.for_limit(100 * MiB, headroom)

    @given(limit=st.integers(1, 1 << 46))
    def test_default_order(self, limit: int) -> None:
        """Default marks are ordered: 0 <= low <= high < limit, same gap on both sides."""
        marks = Watermarks.for_limit(limit)
        assert 0 <= marks.low <= marks.high < marks.limit == limit
        room = limit - marks.high
        assert room <= max(1, limit // 4)
        if marks.low > 0:
            assert marks.high - marks.low == room

    @given(limit=limits, fraction=st.floats(0.001, 0.499))
    def test_fraction_order(self, limit: int, fraction: float) -> None:
        """Fractional headroom gives ordered marks about fraction * limit apart."""
        marks = Watermarks.for_limit(limit, fraction)
        assert 0 <= marks.low <= marks.high < limit
        assert abs((limit - marks.high) - limit * fraction) <= 1


class TestAdaptiveWatermarks:
    """adaptive_watermarks: headroom and band from the growth and reaction measured (issue 13)."""

    def test_slow_cache_runs_close_to_the_limit(self) -> None:
        """A cache filling at 70 MB/s whose requests show within 20 ms: 8 MiB under 256 MiB,
        a 2 MiB band (the fixed rule: 32 MiB under it, a 32 MiB band)."""
        marks = adaptive_watermarks(256 * MiB, 70e6, 0.02)
        assert marks == Watermarks(256 * MiB, 248 * MiB, 246 * MiB)
        fixed = Watermarks.for_limit(256 * MiB)
        assert marks.high - fixed.high == 24 * MiB
        assert (marks.high + marks.low) / 2 >= 0.92 * 256 * MiB

    def test_racing_allocator_keeps_the_fixed_margin(self) -> None:
        """2.4 GB/s for at least 0.1 s is 240 MB: the most the bounds allow, the fixed rule's
        headroom; the band is what grows in 20 ms, 48 MB, at most the same bound."""
        for limit in (48 * MiB, 64 * MiB, 256 * MiB):
            assert adaptive_watermarks(limit, 2.4e9, 0.022) == Watermarks.for_limit(limit)
        big = adaptive_watermarks(GiB, 2.4e9, 0.022)
        assert big.high == Watermarks.for_limit(GiB).high
        assert big.low == big.high - 46 * MiB

    def test_nothing_measured_is_the_least_headroom(self) -> None:
        """No growth: the least headroom (8 MiB, or 1/64 of a large limit), the least band."""
        assert adaptive_watermarks(256 * MiB, 0.0, 0.005) == Watermarks(
            256 * MiB, 248 * MiB, 247 * MiB
        )
        assert adaptive_watermarks(GiB, 0.0, 0.005) == Watermarks(
            GiB, GiB - 16 * MiB, GiB - 20 * MiB
        )

    def test_headroom_grows_with_rate_and_reaction(self) -> None:
        """Twice the rate or twice the reaction time: twice the headroom (past the least)."""
        assert GiB - adaptive_watermarks(GiB, 2e8, 0.2).high == 39 * MiB
        assert GiB - adaptive_watermarks(GiB, 4e8, 0.2).high == 77 * MiB
        assert GiB - adaptive_watermarks(GiB, 2e8, 0.4).high == 77 * MiB

    def test_reaction_is_at_least_min_reaction(self) -> None:
        """A measured reaction of 1 ms still assumes 0.1 s: 200 MB/s needs 20 MB."""
        assert GiB - adaptive_watermarks(GiB, 2e8, 0.001).high == 20 * MiB

    def test_boost_is_the_most(self) -> None:
        """A boost of the limit (OOM-level pressure) gives the most headroom at any rate."""
        marks = adaptive_watermarks(256 * MiB, 0.0, 0.005, 256 * MiB)
        assert marks.high == Watermarks.for_limit(256 * MiB).high
        assert marks.low == marks.high - MiB  # the band still follows the growth: little

    def test_bounds_configurable(self) -> None:
        """Bounds in bytes or as fractions of the limit; the least never above the most."""
        marks = adaptive_watermarks(GiB, 0.0, 0.005, min_headroom=64 * MiB)
        assert marks.high == GiB - 64 * MiB
        marks = adaptive_watermarks(GiB, 1e12, 0.25, max_headroom=0.05)
        assert marks.high == GiB - int(GiB * 0.05) // MiB * MiB or marks.high == GiB - int(
            GiB * 0.05
        )
        assert headroom_bounds(GiB, min_headroom=0.2, max_headroom=0.1) == (
            int(GiB * 0.1),
            int(GiB * 0.1),
        )
        with pytest.raises(ValueError, match="headroom"):
            headroom_bounds(GiB, min_headroom=0.7)
        with pytest.raises(ValueError, match="headroom"):
            headroom_bounds(GiB, max_headroom=0)

    def test_nan_and_infinite_rates_are_the_most(self) -> None:
        """A rate that is not a number is no reason to run close to the limit."""
        for rate in (float("nan"), float("inf")):
            assert adaptive_watermarks(256 * MiB, rate, 0.01) == Watermarks.for_limit(256 * MiB)

    @given(
        limit=limits,
        rate=st.floats(0.0, 1e13),
        reaction=st.floats(0.0, 1.0),
        boost=st.floats(0.0, 1e12),
    )
    def test_properties(self, limit: int, rate: float, reaction: float, boost: float) -> None:
        """Ordered marks under the limit, the headroom within its bounds, and never nearer the
        limit than the fixed rule allows at most."""
        marks = adaptive_watermarks(limit, rate, reaction, boost)
        least, most = headroom_bounds(limit)
        assert 0 <= marks.low <= marks.high < limit or limit == 1
        assert least <= limit - marks.high <= most
        assert marks.high - marks.low <= most
        fixed = Watermarks.for_limit(limit)
        assert marks.high >= fixed.high and marks.low >= fixed.low

    @given(limit=limits, a=st.floats(0.0, 1e12), b=st.floats(0.0, 1e12))
    def test_monotonic_in_rate(self, limit: int, a: float, b: float) -> None:
        """Faster growth never moves the watermarks up."""
        slow, fast = min(a, b), max(a, b)
        assert (
            adaptive_watermarks(limit, fast, 0.01).high
            <= adaptive_watermarks(limit, slow, 0.01).high
        )


class TestDecayedPeak:
    """decayed_peak: raised at once, halved every half-life."""

    def test_raised_at_once(self) -> None:
        """A larger sample replaces the peak."""
        assert decayed_peak(10.0, 50.0, 0.0, 10.0) == 50.0

    def test_halves(self) -> None:
        """One half-life halves it, two quarter it."""
        assert decayed_peak(100.0, 0.0, 10.0, 10.0) == pytest.approx(50.0)
        assert decayed_peak(100.0, 0.0, 20.0, 10.0) == pytest.approx(25.0)
        assert decayed_peak(100.0, 30.0, 20.0, 10.0) == pytest.approx(30.0)


class TestBytesToFree:
    """bytes_to_free: down to the low watermark once the high one is reached."""

    marks = Watermarks(limit=100 * MiB, high=80 * MiB, low=60 * MiB)

    def test_below_high(self) -> None:
        """Under the high watermark nothing is asked, even above low."""
        assert bytes_to_free(80 * MiB - 1, self.marks) == 0
        assert bytes_to_free(70 * MiB, self.marks) == 0
        assert bytes_to_free(0, self.marks) == 0

    def test_at_high(self) -> None:
        """At the high watermark, ask for the whole hysteresis gap."""
        assert bytes_to_free(80 * MiB, self.marks) == 20 * MiB

    def test_over_limit(self) -> None:
        """Past the limit, ask for everything above low."""
        assert bytes_to_free(120 * MiB, self.marks) == 60 * MiB

    def test_in_flight_subtracted(self) -> None:
        """What was asked and not yet freed is not asked again."""
        assert bytes_to_free(90 * MiB, self.marks, in_flight=10 * MiB) == 20 * MiB

    def test_in_flight_covers_all(self) -> None:
        """Never negative when more is in flight than needed."""
        assert bytes_to_free(90 * MiB, self.marks, in_flight=100 * MiB) == 0

    @given(working_set=byte_counts, in_flight=byte_counts, limit=limits)
    def test_properties(self, working_set: int, in_flight: int, limit: int) -> None:
        """Never negative; freeing the answer plus in-flight reaches the low watermark."""
        marks = Watermarks.for_limit(limit)
        need = bytes_to_free(working_set, marks, in_flight)
        assert need >= 0
        if working_set < marks.high:
            assert need == 0
        else:
            assert working_set - need - in_flight <= marks.low
            assert need <= working_set - marks.low


class TestPollInterval:
    """poll_interval: often near the high watermark, rarely far from it."""

    marks = Watermarks.for_limit(1 * GiB)

    def test_at_or_over_high(self) -> None:
        """At or over the high watermark, read as often as allowed."""
        assert poll_interval(self.marks.high, self.marks) == 0.002
        assert poll_interval(self.marks.limit * 2, self.marks, shortest=0.01) == 0.01

    def test_far_is_longest(self) -> None:
        """With nothing used and a slow growth rate, wait the longest interval."""
        assert poll_interval(0, self.marks, growth_rate=1.0, longest=0.5) == 0.5

    def test_half_the_distance(self) -> None:
        """In between, half the time needed to reach the high watermark at growth_rate."""
        ws = self.marks.high - 200 * MiB
        assert poll_interval(ws, self.marks, growth_rate=1024 * MiB) == pytest.approx(
            200 / 1024 / 2
        )

    @given(
        a=byte_counts,
        b=byte_counts,
        limit=limits,
        rate=st.floats(1.0, 1e12),
    )
    def test_monotonic_and_bounded(self, a: int, b: int, limit: int, rate: float) -> None:
        """Closer to the high watermark never means waiting longer; always within bounds."""
        marks = Watermarks.for_limit(limit)
        near, far = max(a, b), min(a, b)
        t_near = poll_interval(near, marks, growth_rate=rate)
        t_far = poll_interval(far, marks, growth_rate=rate)
        assert 0.002 <= t_near <= t_far <= 1.0


def _bytes(asked: list[int], held: list[Holding]) -> int:
    return sum(n * h.chunk_size for n, h in zip(asked, held, strict=True))


class TestShareExamples:
    """share() on hand-worked cases."""

    def test_nothing_needed(self) -> None:
        """need <= 0 asks nothing of anyone."""
        held = [Holding(10, 4096), Holding(5, 4096)]
        assert share(0, held) == [0, 0]
        assert share(-4096, held) == [0, 0]

    def test_no_shrinkers(self) -> None:
        """No shrinkers: an empty answer."""
        assert share(MiB, []) == []

    def test_equal_split(self) -> None:
        """Two equal shrinkers share a request equally."""
        held = [Holding(100, MiB), Holding(100, MiB)]
        assert share(10 * MiB, held) == [5, 5]

    def test_proportional_to_bytes_held(self) -> None:
        """Bytes asked follow bytes held, whatever the chunk size."""
        held = [Holding(300, MiB), Holding(100 * 256, 4096)]  # 300 MiB and 100 MiB
        assert share(40 * MiB, held) == [30, 10 * 256]

    def test_cost_divides(self) -> None:
        """A shrinker twice as costly to rebuild gives half as much."""
        held = [Holding(100, MiB, cost=1.0), Holding(100, MiB, cost=2.0)]
        assert share(30 * MiB, held) == [20, 10]

    def test_rounds_up_to_a_chunk(self) -> None:
        """A request smaller than a chunk still asks one chunk."""
        assert share(1, [Holding(10, MiB)]) == [1]

    def test_small_need_asks_one_chunk_in_all(self) -> None:
        """Issue 9: a 4 KiB need of 4096 shrinkers asked one chunk of each (16 MiB); now one."""
        asked = share(4096, [Holding(10, 4096)] * 4096)
        assert sum(asked) == 1

    def test_largest_remainders_get_the_extra_chunks(self) -> None:
        """Shares 1.5, 1.3 and 0.2 chunks (need 3 chunks): floors 1, 1, 0, then the 0.5 share."""
        held = [Holding(150, 4096), Holding(130, 4096), Holding(20, 4096)]
        assert share(3 * 4096, held) == [2, 1, 0]

    def test_capped_shrinker_rest_goes_to_others(self) -> None:
        """A small shrinker gives all it has; the others cover the rest."""
        # Weights 200, 100, 100: the first's share (26 MiB) exceeds its 2 MiB.
        held = [Holding(2, MiB, cost=0.01), Holding(100, MiB), Holding(100, MiB)]
        assert share(52 * MiB, held) == [2, 25, 25]

    def test_zero_count_asked_nothing(self) -> None:
        """An empty shrinker is asked nothing, even when nothing else suffices."""
        held = [Holding(0, MiB), Holding(4, MiB)]
        assert share(100 * MiB, held) == [0, 4]

    def test_everything_when_short(self) -> None:
        """When need exceeds all holdings, everything is asked."""
        held = [Holding(3, 4096, 4.0), Holding(7, MiB, 0.5)]
        assert share(GiB, held) == [3, 7]


class TestShareProperties:
    """share() properties over random holdings (tests/strategies.py)."""

    @given(share_cases())
    def test_shape_and_bounds(self, case: tuple[int, list[Holding]]) -> None:
        """One answer per shrinker, each between 0 and its count."""
        need, held = case
        asked = share(need, held)
        assert len(asked) == len(held)
        for n, h in zip(asked, held, strict=True):
            assert isinstance(n, int)
            assert 0 <= n <= h.count

    @given(share_cases())
    def test_zero_count_asked_nothing(self, case: tuple[int, list[Holding]]) -> None:
        """Shrinkers holding nothing are asked nothing."""
        need, held = case
        for n, h in zip(share(need, held), held, strict=True):
            if h.count == 0:
                assert n == 0

    @given(share_cases())
    def test_covers_need(self, case: tuple[int, list[Holding]]) -> None:
        """Enough is asked when enough is held; everything when not."""
        need, held = case
        asked = share(need, held)
        total = _bytes([h.count for h in held], held)
        if need <= 0:
            assert asked == [0] * len(held)
        elif total >= need:
            assert _bytes(asked, held) >= need
        else:
            assert asked == [h.count for h in held]

    @given(share_cases())
    def test_not_much_more_than_need(self, case: tuple[int, list[Holding]]) -> None:
        """Rounding adds less than one chunk to the need, not one chunk per shrinker (issue 9)."""
        need, held = case
        assume(need > 0)
        asked = share(need, held)
        largest = max((h.chunk_size for n, h in zip(asked, held, strict=True) if n > 0), default=0)
        assert _bytes(asked, held) < need + largest

    @given(share_cases())
    def test_proportional_to_count_over_cost(self, case: tuple[int, list[Holding]]) -> None:
        """Uncapped shrinkers are asked floor(k * count / cost) chunks, or one more, for one k."""
        need, held = case
        asked = share(need, held)
        # For every shrinker asked part of what it holds, k must lie in
        # [(asked - 1) * cost / count, (asked + 1) * cost / count); the intervals must meet.
        lower, upper = 0.0, float("inf")
        for n, h in zip(asked, held, strict=True):
            if 0 < n < h.count:
                x = h.count / h.cost
                lower = max(lower, (n - 1) / x)
                upper = min(upper, (n + 1) / x)
        assert lower <= upper * (1 + 1e-9)
        # Shrinkers asked everything had a share of at least count - 1 chunks at that k
        # (capped, or rounded up to everything).
        for n, h in zip(asked, held, strict=True):
            if h.count > 0 and n == h.count and upper != float("inf"):
                assert upper * h.count / h.cost > (h.count - 1) * (1 - 1e-9)

    @given(share_cases())
    def test_cheaper_gives_no_smaller_fraction(self, case: tuple[int, list[Holding]]) -> None:
        """A cheaper shrinker never gives a smaller fraction of its count (up to a chunk each)."""
        need, held = case
        asked = share(need, held)
        for i, hi in enumerate(held):
            for j, hj in enumerate(held):
                if hi.count and hj.count and hi.cost <= hj.cost:
                    slack = 1 / hj.count + 1 / hi.count + 1e-9
                    assert asked[j] / hj.count <= asked[i] / hi.count + slack

    @given(st.lists(holdings, min_size=1, max_size=6), st.integers(1, 1 << 40))
    def test_adding_an_empty_shrinker_changes_nothing(self, held: list[Holding], need: int) -> None:
        """An empty shrinker anywhere in the list leaves the others' answers alone."""
        with_empty = [*held, Holding(0, 4096)]
        assert share(need, with_empty) == [*share(need, held), 0]

    @given(st.lists(holdings, min_size=1, max_size=6), st.integers(1, 1 << 40))
    def test_order_does_not_matter(self, held: list[Holding], need: int) -> None:
        """Unlike the 2013 proposal, registration order gives no one an advantage."""
        forward = share(need, held)
        backward = share(need, held[::-1])[::-1]
        for a, b in zip(forward, backward, strict=True):
            assert abs(a - b) <= 1


class TestHostileHoldings:
    """Issue 9: costs and claims a client chose cannot break or capture the policy."""

    @pytest.mark.parametrize("cost", [1e-320, 0.0, -1.0, float("nan"), float("inf"), 1e300])
    def test_any_cost_gives_a_finite_weight(self, cost: float) -> None:
        """A cost outside 0.001..1000 is taken at the nearest bound (NaN at the largest)."""
        w = weight(Holding(2**48, 2**40, cost))
        assert 0 < w < float("inf")

    @pytest.mark.parametrize("cost", [1e-320, float("nan"), float("inf"), 0.0])
    def test_share_survives_hostile_costs(self, cost: float) -> None:
        """Before: 1e-320 made the weight infinite, then NaN, and share() raised."""
        held = [Holding(2**48, 4096, cost), Holding(1000, 4096), Holding(1000, 4096)]
        asked = share(MiB, held)
        assert all(isinstance(n, int) for n in asked)
        assert MiB <= _bytes(asked, held) < MiB + 4096

    def test_absurd_counts(self) -> None:
        """Counts far past any memory (2**300 chunks) still give finite, bounded answers."""
        held = [Holding(2**300, 2**40), Holding(10, 4096)]
        asked = share(MiB, held)
        assert asked[0] >= 1 and 0 <= asked[1] <= 10

    def test_claim_weighs_at_most_max_claim(self) -> None:
        """A 2**48-chunk claim capped at the working set no longer takes (nearly) all asks."""
        liar, honest = Holding(2**48, 4096), Holding(100 * 256, 4096)  # honest: 100 MiB
        need = 30 * MiB
        uncapped = share(need, [liar, honest])
        assert uncapped[1] <= 1  # before: the honest cache was asked one chunk
        capped = share(need, [liar, honest], max_claim=200 * MiB)
        # Weights 200 MiB and 100 MiB: the honest cache is asked a third.
        assert capped[1] * 4096 == pytest.approx(need / 3, abs=4096)

    def test_distrusted_weighs_a_sixteenth(self) -> None:
        """A distrusted shrinker counts 1/16 of its weight; the others are asked instead."""
        a = Holding(1000, 4096, distrusted=True)
        assert weight(a) == weight(Holding(1000, 4096)) * DISTRUSTED_WEIGHT
        asked = share(170 * 4096, [a, Holding(1000, 4096)])
        assert asked == [10, 160]

    def test_claims_of_one_owner_add_up(self) -> None:
        """64 shrinkers of one process claiming 2**48 chunks each weigh max_claim together."""
        liar = [Holding(2**48, 4096, owner="liar") for _ in range(64)]
        honest = Holding(100 * 256, 4096, owner="honest")
        w = weights([*liar, honest], max_claim=100 * MiB)
        assert sum(w[:64]) == pytest.approx(100 * MiB)
        assert w[64] == 100 * MiB
        asked = share(30 * MiB, [*liar, honest], max_claim=100 * MiB)
        assert asked[64] * 4096 == pytest.approx(15 * MiB, abs=64 * 4096)

    def test_dominant_owner(self) -> None:
        """The owner asked at least half of a round, if any."""
        assert dominant({"liar": 90, "a": 6, "b": 4}) == "liar"
        assert dominant({"a": 50, "b": 50}) == "a"
        assert dominant({"a": 40, "b": 35, "c": 25}) is None
        assert dominant({}) is None

    @given(st.dictionaries(st.integers(), st.integers(0, 1 << 40)))
    def test_dominant_is_asked_half(self, asked: dict[int, int]) -> None:
        """The dominant owner was asked at least half; with none, everyone less than half."""
        owner = dominant(asked)
        total = sum(asked.values())
        if owner is not None:
            assert asked[owner] * 2 >= total > 0
        else:
            assert all(v * 2 < total for v in asked.values()) or total == 0


class TestInFlight:
    """Requests in flight: the drop credited once, the grace from measured reclaim times."""

    def test_small_dip_settles_that_much(self) -> None:
        """A 1 MiB dip settles 1 MiB of the oldest round, nothing of the next."""
        assert credit_drop([32 << 20, 8 << 20], 1 << 20) == [31 << 20, 8 << 20]

    def test_drop_spills_to_the_next_round(self) -> None:
        """Past the oldest round's outstanding, the drop goes to the next."""
        assert credit_drop([4, 10], 7) == [0, 7]

    @given(st.lists(st.integers(0, 1 << 40), max_size=8), st.integers(-(1 << 40), 1 << 41))
    def test_credited_once_never_negative(self, outstanding: list[int], drop: int) -> None:
        """What is credited in all is min(drop, outstanding in all); nothing goes negative."""
        after = credit_drop(outstanding, drop)
        assert all(0 <= a <= o for a, o in zip(after, outstanding, strict=True))
        assert sum(outstanding) - sum(after) == min(max(0, drop), sum(outstanding))

    def test_grace_is_twice_the_median_within_bounds(self) -> None:
        """No measurement: the shortest; 11 ms median: 22 ms; a slow client: the longest."""
        assert grace([], 0.005, 0.25) == 0.005
        assert grace([0.009, 0.011, 0.013], 0.005, 0.25) == pytest.approx(0.022)
        assert grace([0.001, 0.002], 0.005, 0.25) == 0.005
        assert grace([0.5, 0.6, 0.7], 0.005, 0.25) == 0.25


class TestDecayingPeak:
    """The peaks the adaptive watermarks follow: raised by samples, halving every half-life."""

    def test_raise_decay_and_set(self) -> None:
        peak = policy.DecayingPeak()
        assert peak.at(100.0) == 0.0
        peak.raise_to(8.0, 10.0)
        assert peak.at(10.0) == 8.0
        assert peak.at(10.0 + policy.GROWTH_HALF_LIFE) == pytest.approx(4.0)
        peak.raise_to(1.0, 10.0 + policy.GROWTH_HALF_LIFE)  # below the decayed peak: kept
        assert peak.at(10.0 + 2 * policy.GROWTH_HALF_LIFE) == pytest.approx(2.0)
        peak.set(0.5, 50.0)  # whatever it was
        assert peak.at(50.0) == 0.5


class TestLeastReaction:
    """Several processes asked at once on few CPUs: the reaction assumed grows with them."""

    @pytest.mark.parametrize(
        ("processes", "cpus", "expected"),
        [(1, 2, 0.1), (2, 2, 0.1), (3, 2, 0.2), (4, 2, 0.2), (8, 2, 0.4), (8, 8, 0.1), (9, 1, 0.9)],
    )
    def test_one_minimum_per_cpu_of_processes(self, processes, cpus, expected):
        assert policy.least_reaction(processes, cpus) == pytest.approx(expected)

    def test_no_cpus_is_one(self):
        assert policy.least_reaction(3, 0) == pytest.approx(0.3)
