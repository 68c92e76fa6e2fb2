"""The reclaim policy: how much memory must go, and how much to ask of each shrinker.

Pure functions of numbers, so they are tested directly. The controller feeds them readings.

*How much*: watermarks under the limit, as kswapd uses them. When the working set reaches the
high watermark, ask for enough to bring it down to the low watermark; the gap between the two is
the hysteresis that keeps requests few and large. The headroom above the high watermark is what
the application may allocate while a request travels (user space reacts in milliseconds, not
synchronously like in-kernel shrinkers), so it scales with the limit.

*From whom*: Linux's own shrinkers (mm/shrinker.c, ``do_shrink_slab``) ask each cache in
proportion to what it holds, divided by ``seeks``, its cost to rebuild an object. pyshrinker
does the same: a shrinker's share of the bytes to free is proportional to held bytes / cost,
capped at what it holds, with what a capped shrinker cannot give shared among the others. The
2013 proposal asked shrinkers in registration order, which starved nobody but the first.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

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


@attrs.frozen
class Holding:
    """What one shrinker holds, as the controller sees it."""

    count: int
    chunk_size: int
    cost: float = 1.0


def share(need: int, holdings: Sequence[Holding]) -> list[int]:
    """Chunks to ask of each shrinker to free about ``need`` bytes.

    Each gets bytes in proportion to ``count * chunk_size / cost``, never more than it holds;
    what a capped shrinker cannot give is shared among the others (water-filling). A share is
    rounded up to whole chunks, so a small request still frees something.
    """
    asked = [0] * len(holdings)
    if need <= 0:
        return asked
    open_ = [i for i, h in enumerate(holdings) if h.count > 0]
    remaining = float(need)
    while open_ and remaining > 0:
        weights = {i: holdings[i].count * holdings[i].chunk_size / holdings[i].cost for i in open_}
        total = sum(weights.values())
        capped = []
        for i in open_:
            h = holdings[i]
            if remaining * weights[i] / total >= h.count * h.chunk_size:
                capped.append(i)
        if not capped:
            for i in open_:
                h = holdings[i]
                want = remaining * weights[i] / total
                asked[i] = min(h.count, math.ceil(want / h.chunk_size - 1e-9))
            break
        for i in capped:
            asked[i] = holdings[i].count
            remaining -= holdings[i].count * holdings[i].chunk_size
            open_.remove(i)
    return asked
