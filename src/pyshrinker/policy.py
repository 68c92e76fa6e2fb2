"""The reclaim policy: how much memory must go, and how much to ask of each shrinker.

Pure functions of numbers, so they are tested directly. The controller feeds them readings.

*How much*: watermarks under the limit, as kswapd uses them. When the working set reaches the
high watermark, ask for enough to bring it down to the low watermark; the gap between the two is
the hysteresis. The headroom above the high watermark is what the application may allocate while
a request travels (user space reacts in milliseconds, not synchronously like in-kernel
shrinkers). Under a limit both follow what the controller measured (:func:`adaptive_watermarks`):
how fast memory grows and how late reclaim shows, so a slowly growing cache runs close to the
limit and is asked for a little, often, and a racing allocator keeps a wide margin.

*From whom*: Linux's own shrinkers (mm/shrinker.c, ``do_shrink_slab``) ask each cache in
proportion to what it holds, divided by ``seeks``, its cost to rebuild an object. pyshrinker
does the same: a shrinker's share of the bytes to free is proportional to held bytes / cost,
capped at what it holds, with what a capped shrinker cannot give shared among the others. The
2013 proposal asked shrinkers in registration order, which starved nobody but the first.

*Lying and useless shrinkers*: a count is only a claim. A claim weighs at most the memory there
is (the working set), and a shrinker asked the most in a round of asks that did not lower usage
weighs a sixteenth for the rest of the episode, so the others are asked instead.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import attrs

from pyshrinker.abi import MAX_COST, MIN_COST

K = TypeVar("K", bound=Hashable)

MiB = 1 << 20

#: Default headroom above the high watermark, as a fraction of the limit.
DEFAULT_HEADROOM_FRACTION = 0.125
#: The headroom is at least this many bytes: a Python thread allocates up to ~2.4 GB/s, and a
#: request takes milliseconds to travel, so small limits need room to react in.
MIN_HEADROOM = 32 * MiB
#: On a machine with no cgroup limit, the headroom is this fraction of its memory, within
#: MACHINE_HEADROOM_RANGE: other processes share that memory and grow without telling us, so
#: a cache keeps out of their way only when MemAvailable runs low, and then frees a little.
MACHINE_HEADROOM_FRACTION = 1 / 32
MACHINE_HEADROOM_RANGE = (64 * MiB, 1024 * MiB)


@attrs.frozen
class Watermarks:
    """Reclaim starts when the working set reaches ``high`` and aims for ``low``.

    ``limit`` is the wall the working set must stay under: on cgroup v2 the lower of
    ``memory.max`` and ``memory.high``. The kernel throttles a group over ``memory.high``
    (it reclaims and makes allocating tasks sleep, never OOM-kills), and throttling is what a
    service's users feel, so where ``memory.high`` is set the watermarks sit below it.
    """

    limit: int
    high: int
    low: int

    @classmethod
    def for_limit(cls, limit: int, headroom: int | float | None = None) -> Watermarks:
        """Watermarks for ``limit`` bytes.

        ``headroom`` is bytes (int) or a fraction of the limit (float < 1); by default 12.5 % of
        the limit, at least 32 MiB and at most a quarter of it. ``high = limit - headroom`` and
        ``low = high - headroom``.
        """
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        if headroom is None:
            room = max(MIN_HEADROOM, int(limit * DEFAULT_HEADROOM_FRACTION))
            room = min(room, limit // 4)
        elif isinstance(headroom, float):
            if not 0 < headroom < 0.5:
                raise ValueError(f"headroom fraction must be in (0, 0.5), got {headroom}")
            room = int(limit * headroom)
        else:
            if not 0 < headroom < limit // 2:
                raise ValueError(f"headroom must be 1..{limit // 2 - 1} bytes, got {headroom}")
            room = headroom
        room = max(1, room)
        return cls(limit=limit, high=limit - room, low=max(0, limit - 2 * room))

    @classmethod
    def for_machine(cls, total: int, headroom: int | float | None = None) -> Watermarks:
        """Watermarks for a machine of ``total`` bytes with no cgroup limit (by MemAvailable).

        Reclaim starts when MemAvailable falls under the headroom and aims for twice that: by
        default 1/32 of the memory, between 64 MiB and 1 GiB (96 MiB of 3 GiB, 768 MiB of
        24 GiB). An explicit ``headroom`` means what it means for :meth:`for_limit`.
        """
        if headroom is None and total > 0:
            low, high = MACHINE_HEADROOM_RANGE
            headroom = min(max(int(total * MACHINE_HEADROOM_FRACTION), low), high, total // 4)
            if headroom <= 0:
                headroom = None
        return cls.for_limit(total, headroom)


#: The adaptive rule (:func:`adaptive_watermarks`, the default under a limit). Its headroom is at
#: least this many bytes, or this fraction of the limit if more: what a request may take to show
#: while memory nobody reports grows (other processes, a server's buffers), and the noise of
#: readings, and what a heap keeps of what a cache freed until it is trimmed (a threaded server's
#: other malloc arenas grow meanwhile). 8 MiB at 256 MiB, 16 MiB at 1 GiB: measured, an HTTP
#: service caching 100 KiB values at 160 MB/s was OOM-killed under 256 MiB with 4 MiB.
ADAPTIVE_MIN_HEADROOM = 8 * MiB
ADAPTIVE_MIN_HEADROOM_FRACTION = 1 / 64
#: The hysteresis band (high - low) is at least this, or this fraction of the limit if more.
MIN_BAND = 1 * MiB
MIN_BAND_FRACTION = 1 / 256
#: The band is what memory grows by in this many seconds (at most the headroom): a slowly
#: growing cache is asked for a little, often; a racing allocator for a lot, seldom.
BAND_SECONDS = 0.02
#: Growth rates and boosts are peaks that halve every this many seconds, as the kernel's
#: watermark boost is undone once kswapd has balanced: a burst widens the margin at once, and
#: it narrows again only while memory grows slowly.
GROWTH_HALF_LIFE = 10.0
#: A growth rate is measured over at least this many seconds (a single large report must not
#: read as a rate of gigabytes per second, nor a burst of a few milliseconds as sustained).
RATE_WINDOW = 0.02
#: The adaptive rule applies once growth was measured for this many seconds (and a round of
#: requests has shown): a rate seen over less, by a controller that just started or took over
#: from another process, may be a pause in a burst.
TRUST_AFTER = 1.0
#: The reaction time the headroom assumes at least (seconds). Measured on a loaded machine (load
#: average 15-20 on 2 CPUs), a caching HTTP service's requests went unserved for up to ~100 ms
#: while its other threads allocated on: the median reclaim time (10-40 ms) does not see that.
MIN_REACTION = 0.1


def least_reaction(processes: int, cpus: int) -> float:
    """The reaction the headroom assumes at least when ``processes`` share ``cpus``.

    A round of requests to several processes has shown only when the last of them was
    scheduled to free, while the others allocate on: with more processes than CPUs, that is
    about one :data:`MIN_REACTION` for each CPU's worth of processes. Measured: 8 gunicorn
    workers of one 512 MiB group on 2 CPUs, growing at 100-200 MB/s, had a worker OOM-killed in
    each of 4 runs with the 0.1 s a single process is given (issue 12).
    """
    cpus = max(1, cpus)
    if processes <= cpus:
        return MIN_REACTION
    return MIN_REACTION * math.ceil(processes / cpus)


#: Headroom and band are whole multiples of this (at most): watermarks that move by less stay
#: put, so usage thresholds are not re-registered on every reading.
WATERMARK_STEP = 1 * MiB


def _bound(limit: int, value: int | float) -> int:
    # A bound of the adaptive rule: bytes (int) or a fraction of the limit (float).
    if isinstance(value, float):
        if not 0 < value < 0.5:
            raise ValueError(f"headroom fraction must be in (0, 0.5), got {value}")
        return max(1, int(limit * value))
    if value <= 0:
        raise ValueError(f"headroom bound must be positive, got {value}")
    return value


def headroom_bounds(
    limit: int, min_headroom: int | float | None = None, max_headroom: int | float | None = None
) -> tuple[int, int]:
    """The adaptive headroom's bounds for ``limit``: (least, most) bytes.

    By default the most is the fixed rule's headroom (12.5 % of the limit, at least 32 MiB, at
    most a quarter: what a thread allocating at 2.4 GB/s needs) and the least is
    :data:`ADAPTIVE_MIN_HEADROOM` or :data:`ADAPTIVE_MIN_HEADROOM_FRACTION` of the limit. Either
    may be given in bytes (int) or as a fraction of the limit (float); the least never exceeds
    the most, and the most stays under half the limit.
    """
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if max_headroom is None:
        most = min(max(MIN_HEADROOM, int(limit * DEFAULT_HEADROOM_FRACTION)), limit // 4)
    else:
        most = min(_bound(limit, max_headroom), max(1, (limit - 1) // 2))
    most = max(1, most)
    if min_headroom is None:
        least = max(ADAPTIVE_MIN_HEADROOM, int(limit * ADAPTIVE_MIN_HEADROOM_FRACTION))
    else:
        least = _bound(limit, min_headroom)
    return min(least, most), most


def _stepped(nbytes: float, least: int, most: int) -> int:
    # Up to a whole step (never past ``most``), then within the bounds.
    step = min(WATERMARK_STEP, max(1, least))
    if not nbytes < most:  # NaN or infinite too
        return most
    return int(min(most, max(least, math.ceil(nbytes / step) * step)))


def adaptive_watermarks(
    limit: int,
    growth_rate: float,
    reaction: float,
    rise: float = 0.0,
    boost: float = 0.0,
    *,
    band_seconds: float = BAND_SECONDS,
    band_rate: float | None = None,
    min_headroom: int | float | None = None,
    max_headroom: int | float | None = None,
) -> Watermarks:
    """Watermarks from what was measured: how fast memory grows, and how late reclaim shows.

    The headroom is what memory grows by while a request travels, ``growth_rate`` (bytes/s)
    times ``reaction`` (seconds: the grace in force, twice the median time requests took to
    show), at least twice the ``rise`` (bytes the working set was read to rise by after a
    request, before the request showed: memory that grew while it travelled, reported or not),
    and at least ``boost`` (bytes: the controller boosts the headroom to its most when the
    kernel signals OOM-level pressure), within
    :func:`headroom_bounds`. The
    band (high - low) is what grows in ``band_seconds`` (:data:`BAND_SECONDS`), at least
    :data:`MIN_BAND` or :data:`MIN_BAND_FRACTION` of the limit, at most the most headroom.
    Both are rounded up to :data:`WATERMARK_STEP`. The band follows ``band_rate`` instead where
    it is given: the controller's first episode keeps the most headroom (how late reclaim shows
    is not known yet) but asks for no more than the growth measured needs.

    The reaction is taken as :data:`MIN_REACTION` at least. So a cache filling at 70 MB/s runs
    8 MiB under a 256 MiB limit with a band of 2 MiB; a thread allocating at 2.4 GB/s gets the
    fixed rule's watermarks (:meth:`Watermarks.for_limit`), the most the bounds allow. Linux
    sizes the gaps between its zone watermarks the same way, as a scale of memory
    (``watermark_scale_factor``, 0.1 %), and widens them at once after an event that shows them
    too narrow (watermark boost, decayed as kswapd catches up); here the measurements are the
    event.
    """
    least, most = headroom_bounds(limit, min_headroom, max_headroom)
    rate = max(0.0, growth_rate) if growth_rate == growth_rate else math.inf
    wanted = max(
        rate * max(MIN_REACTION, reaction),
        2 * rise if rise == rise else math.inf,
        boost if boost == boost else math.inf,
    )
    room = _stepped(wanted, least, most)
    band_least = min(most, max(MIN_BAND, int(limit * MIN_BAND_FRACTION)))
    if band_rate is not None:
        rate = max(0.0, band_rate) if band_rate == band_rate else math.inf
    band = _stepped(rate * max(0.0, band_seconds), band_least, most)
    return Watermarks(limit=limit, high=max(0, limit - room), low=max(0, limit - room - band))


def decayed_peak(previous: float, sample: float, elapsed: float, half_life: float) -> float:
    """The larger of ``sample`` and ``previous`` halved every ``half_life`` over ``elapsed``."""
    if half_life <= 0:
        return max(0.0, sample)
    kept = previous * math.pow(0.5, max(0.0, elapsed) / half_life)
    return max(kept, sample, 0.0)


class DecayingPeak:
    """A measurement kept as its peak, halving every :data:`GROWTH_HALF_LIFE` since it was last
    raised (:func:`decayed_peak`): the growth rate, the rise, the boost, the lateness..."""

    __slots__ = ("_at", "_peak")

    def __init__(self) -> None:
        self._peak = 0.0
        self._at = 0.0

    def raise_to(self, sample: float, now: float) -> None:
        """Take ``sample`` at time ``now`` (seconds), if it is above the decayed peak."""
        self._peak = decayed_peak(self._peak, sample, now - self._at, GROWTH_HALF_LIFE)
        self._at = now

    def set(self, value: float, now: float) -> None:
        """Make ``value`` the peak at time ``now``, whatever it was."""
        self._peak = value
        self._at = now

    def at(self, now: float) -> float:
        """The peak, decayed to time ``now``."""
        return decayed_peak(self._peak, 0.0, now - self._at, GROWTH_HALF_LIFE)


def watermarks(limit: int, machine: bool, headroom: int | float | None = None) -> Watermarks:
    """The watermarks for a reading: a cgroup's (or budget's) limit, or a whole machine's."""
    if machine:
        return Watermarks.for_machine(limit, headroom)
    return Watermarks.for_limit(limit, headroom)


def usage_thresholds(marks: Watermarks) -> tuple[int, int]:
    """Where usage notifications go: the high watermark, and halfway from it to the limit.

    The first starts a reclaim episode; the second wakes the controller at once if memory keeps
    growing while a request is in flight.
    """
    return marks.high, (marks.high + marks.limit) // 2


def bytes_to_free(working_set: int, marks: Watermarks, in_flight: int = 0) -> int:
    """Bytes to ask for now: down to the low watermark, less what was asked and not yet freed."""
    if working_set < marks.high:
        return 0
    return max(0, working_set - marks.low - in_flight)


def credit_drop(outstanding: Sequence[int], drop: int) -> list[int]:
    """What is still outstanding of each round of requests, oldest first, after ``drop`` bytes
    of working set went away since the oldest was sent.

    The drop is credited once, oldest round first (the order clients work through them), each
    round taking at most what it still has outstanding: a dip of 1 MiB settles 1 MiB of
    requests, not every request in flight.
    """
    left = max(0, drop)
    after = []
    for each in outstanding:
        credited = min(max(0, each), left)
        left -= credited
        after.append(max(0, each) - credited)
    return after


def grace(reclaim_times: Sequence[float], shortest: float, longest: float) -> float:
    """Seconds a request counts as in flight: twice the median time requests took to show in
    the working set (the latest measured), within ``[shortest, longest]``.

    A request that has not shown by then is asked again (if memory is still above the high
    watermark); too short a grace asks twice for the same memory, too long a one waits while
    a client that cannot free more holds the episode up.
    """
    if not reclaim_times:
        return shortest
    ordered = sorted(reclaim_times)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return min(longest, max(shortest, 2 * median))


def poll_interval(
    working_set: int,
    marks: Watermarks,
    *,
    growth_rate: float = 1024 * MiB,
    shortest: float = 0.002,
    longest: float = 1.0,
) -> float:
    """Seconds until the next reading when the kernel gives no notification.

    Assumes memory may grow at ``growth_rate`` bytes/s: read again before half the distance to
    the high watermark can be covered. Far from the limit that is rarely; near it, often.
    """
    distance = marks.high - working_set
    if distance <= 0:
        return shortest
    return min(longest, max(shortest, distance / growth_rate / 2))


#: Held bytes a weight can count at most whatever a count says: far beyond any machine, and it
#: keeps every weight a finite float (a count times a chunk size is an unbounded int).
MAX_WEIGHED_BYTES = 2**100
#: The factor on the weight of a distrusted shrinker (see :func:`dominant`).
DISTRUSTED_WEIGHT = 1 / 16


@attrs.frozen
class Holding:
    """What one shrinker holds, as the controller sees it."""

    count: int
    chunk_size: int
    cost: float = 1.0
    #: Its owner was let down a round of asks (see :func:`dominant`): it weighs less.
    distrusted: bool = False
    #: Who holds it (pyshrinkerd: the process); None: itself alone. Claims add up per owner.
    owner: Hashable | None = None


def weights(holdings: Sequence[Holding], max_claim: int | None = None) -> list[float]:
    """How much each holding is asked relative to the others: held bytes / cost, always finite.

    The held bytes of one owner count up to ``max_claim`` together (no one can give more than
    there is memory: a claim of 2**48 chunks weighs no more than the working set, nor do 64 such
    claims of one process). The cost is taken within :data:`~pyshrinker.abi.MIN_COST` ..
    :data:`~pyshrinker.abi.MAX_COST` (registration refuses others; NaN counts as the largest).
    So no weight is infinite, NaN, or zero for a shrinker holding something.
    """
    held = [min(h.count * h.chunk_size, MAX_WEIGHED_BYTES) for h in holdings]
    claimed: dict[Hashable, int] = {}
    owners = [h.owner if h.owner is not None else ("alone", i) for i, h in enumerate(holdings)]
    for owner, nbytes in zip(owners, held, strict=True):
        claimed[owner] = claimed.get(owner, 0) + nbytes
    cap = None if max_claim is None else max(1, max_claim)
    result = []
    for h, owner, nbytes in zip(holdings, owners, held, strict=True):
        counted = float(nbytes)
        if cap is not None and claimed[owner] > cap:
            counted = nbytes * (cap / claimed[owner])
        cost = MAX_COST if h.cost != h.cost else min(max(h.cost, MIN_COST), MAX_COST)
        result.append(counted / cost * (DISTRUSTED_WEIGHT if h.distrusted else 1.0))
    return result


def weight(holding: Holding, max_claim: int | None = None) -> float:
    """The weight of one holding alone (see :func:`weights`)."""
    return weights([holding], max_claim)[0]


def share(need: int, holdings: Sequence[Holding], max_claim: int | None = None) -> list[int]:
    """Chunks to ask of each shrinker to free about ``need`` bytes.

    Each gets bytes in proportion to its weight (:func:`weights`), never more than it holds;
    what a capped shrinker cannot give is shared among the others (water-filling). Shares are
    then made whole chunks by largest remainder: each is rounded down, and single chunks go to
    the largest fractions until the total covers ``need``. So the total asked is at least
    ``need`` (when that much is held) and exceeds it by less than one chunk: a 4 KiB need asks
    one chunk of one shrinker, not one chunk of each.
    """
    asked = [0] * len(holdings)
    if need <= 0:
        return asked
    held = [h.count * h.chunk_size for h in holdings]
    weighed = weights(holdings, max_claim)
    open_ = [i for i, h in enumerate(holdings) if h.count > 0]
    remaining = need
    total = 0.0
    while open_ and remaining > 0:
        total = sum(weighed[i] for i in open_)
        capped = [i for i in open_ if remaining * weighed[i] / total >= held[i]]
        if not capped:
            break
        for i in capped:
            asked[i] = holdings[i].count
            remaining -= held[i]
            open_.remove(i)
    if remaining <= 0 or not open_:
        return asked
    # Uncapped: each share is under what it holds. Floors first, then the largest remainders.
    wants = {i: remaining * weighed[i] / total / holdings[i].chunk_size for i in open_}
    for i in open_:
        asked[i] = min(holdings[i].count, math.floor(wants[i]))
    short = remaining - sum(asked[i] * holdings[i].chunk_size for i in open_)
    by_fraction = sorted(open_, key=lambda i: (asked[i] - wants[i], i))
    grew = True
    while short > 0 and grew:
        # Float rounding can leave a shortfall after one pass: go round again.
        grew = False
        for i in by_fraction:
            if short <= 0:
                break
            if asked[i] < holdings[i].count:
                asked[i] += 1
                short -= holdings[i].chunk_size
                grew = True
    return asked


def dominant(asked: Mapping[K, int]) -> K | None:
    """The owner asked at least half of a round of asks (in bytes), if there is one.

    When such a round does not lower usage by half of what it asked, that owner let it down
    (the others together were asked less than half): the controller distrusts it for the rest
    of the episode, and the others are asked instead. A client claiming far more than it can
    free (2**48 chunks) is asked the most, so it is found at its first round. No owner is
    singled out in a round shared more evenly: usage alone cannot say who did not free there.
    """
    total = sum(asked.values())
    for owner, nbytes in asked.items():
        if total > 0 and nbytes * 2 >= total:
            return owner
    return None
