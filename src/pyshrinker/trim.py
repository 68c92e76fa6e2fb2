"""Heap trimming: memory that caches free on request goes back to the kernel.

Why it is needed. glibc serves allocations below its mmap threshold (128 KiB at first, raised
up to 32 MiB the first time an mmap-served block is freed) from its heaps, and keeps what is freed
there for reuse. Cache entries of a few KiB, and 1 MiB chunks once the threshold has moved, are
such allocations: evicting them lowers neither the process's RSS nor its cgroup's usage, so the
controller sees no effect of what it asked, and another process in the group cannot use the memory.
``malloc_trim(0)`` returns every free page of every arena to the kernel, in the middle of a heap
too (glibc madvises them away), not only at its top.

What pyshrinker does not do. Earlier versions had the controller pin glibc's mmap threshold
(``mallopt(M_MMAP_THRESHOLD)``) so that freed large blocks went back by themselves. That setting
is process-wide: every allocation of 128 KiB or more anywhere in the application became an mmap,
page faults and a munmap instead of reused heap memory (building 256 KiB buffers ran 2.4 times
slower; see ``benchmarks/overhead.py``). pyshrinker now changes no allocator setting.

What it does. Every shrink request a :class:`~pyshrinker.client.Shrinker` settles (so every
ChunkCache, ShrinkableLRU, @shrinkable_cache, the allocator and any callback of yours) reports the
bytes its callback freed (chunks x chunk size) to :func:`after_reclaim`, on the thread that
handled the request, which trims when it is worth it:

* once at least :data:`TRIM_AFTER_BYTES` were freed since the last trim (less is not worth a
  system call; glibc returns the top of the heap by itself anyway);
* and not before the bytes freed since the last trim are worth what that trim cost, at
  :data:`TRIM_BYTES_PER_SECOND`, or reach :data:`TRIM_ALWAYS_AFTER_BYTES`: a trim walks every
  free chunk of every arena, whatever was freed, holding each arena's lock meanwhile. Measured
  here: about 1.5 ms per 20 MiB returned from a heap of 8-32 KiB values (15 MiB per ms, mostly the
  kernel dropping the pages), but 4-30 ms for a walk that returns almost nothing on a fragmented
  500 MiB heap. On an ordinary heap every reclaim that freed 1 MiB trims; on a badly fragmented
  one trims come at most one per so many MiB freed, and cost at most about 1 ms per MiB that
  caches freed on request. The cost is the CPU time the trimming thread spent
  (``time.thread_time``), not the wall time: on a loaded machine a trim preempted halfway would
  otherwise put off the next one, and freed memory that is not returned keeps usage above the
  watermark.

A trim that is put off is not lost: the bytes stay counted, and the next request (which comes if
usage stays high) trims. One trim runs at a time; a thread that finds one running leaves its
bytes to the next. Nothing happens unless the controller asks for memory: a process under no
pressure never trims.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import attrs

from pyshrinker._syscalls import malloc_trim

#: Bytes freed on request (since the last trim) below which no trim is tried.
TRIM_AFTER_BYTES = 1 << 20
#: A trim must be paid for: bytes freed since the last one, per second that one took (1 MiB/ms).
TRIM_BYTES_PER_SECOND = 1000.0 * (1 << 20)
#: Bytes freed since the last trim after which the next one runs whatever the last one cost.
TRIM_ALWAYS_AFTER_BYTES = 32 << 20


@attrs.frozen
class TrimStats:
    """What a :class:`HeapTrimmer` has done.

    .. versionadded:: 0.1.0
    """

    #: Trims run.
    trims: int
    #: CPU seconds the trimming threads spent in them.
    seconds: float
    #: Trims that returned memory (``malloc_trim`` said so).
    released: int
    #: Bytes reported freed on request, in all.
    freed_bytes: int
    #: Bytes reported freed and not yet followed by a trim.
    untrimmed_bytes: int
    #: Times a trim was due by size but put off until the freed bytes pay for the last one.
    deferred: int


def _trim_heap() -> bool:
    return malloc_trim(0)


@attrs.define(eq=False)
class HeapTrimmer:
    """Decides when freed memory is worth a ``malloc_trim(0)``, and runs it (see the module).

    ``trim`` and ``clock`` (the trimming thread's CPU time) are there for tests.

    .. versionadded:: 0.1.0
    """

    after_bytes: int = TRIM_AFTER_BYTES
    bytes_per_second: float = TRIM_BYTES_PER_SECOND
    always_after_bytes: int = TRIM_ALWAYS_AFTER_BYTES
    _trim: Callable[[], bool] = attrs.field(default=_trim_heap, alias="trim")
    _clock: Callable[[], float] = attrs.field(default=time.thread_time, alias="clock")
    _lock: threading.Lock = attrs.field(factory=threading.Lock, alias="lock")
    _trimming: bool = attrs.field(default=False, alias="trimming")
    _untrimmed: int = attrs.field(default=0, alias="untrimmed")
    _last_cost: float = attrs.field(default=0.0, alias="last_cost")
    _trims: int = attrs.field(default=0, alias="trims")
    _seconds: float = attrs.field(default=0.0, alias="seconds")
    _released: int = attrs.field(default=0, alias="released")
    _freed: int = attrs.field(default=0, alias="freed")
    _deferred: int = attrs.field(default=0, alias="deferred")

    def freed(self, nbytes: int) -> bool:
        """Note ``nbytes`` freed on request and trim if it is worth it; True if it trimmed."""
        if nbytes <= 0:
            return False
        with self._lock:
            self._freed += nbytes
            self._untrimmed += nbytes
            if self._trimming or self._untrimmed < self.after_bytes:
                return False
            worth = min(self._last_cost * self.bytes_per_second, self.always_after_bytes)
            if self._untrimmed < worth:
                self._deferred += 1
                return False
            self._trimming = True
            self._untrimmed = 0
        # Outside the lock: a trim takes milliseconds, and bytes others free meanwhile count
        # for the next one (this one may have walked past them already).
        start = self._clock()
        released = False
        try:
            released = self._trim()
        finally:
            cost = self._clock() - start
            with self._lock:
                self._trimming = False
                self._last_cost = cost
                self._trims += 1
                self._seconds += cost
                self._released += bool(released)
        return True

    def stats(self) -> TrimStats:
        """Counters so far."""
        with self._lock:
            return TrimStats(
                trims=self._trims,
                seconds=self._seconds,
                released=self._released,
                freed_bytes=self._freed,
                untrimmed_bytes=self._untrimmed,
                deferred=self._deferred,
            )

    def _reset_after_fork(self) -> None:
        # Another thread may have held the lock, or been trimming, at fork: it does not exist
        # in the child.
        self._lock = threading.Lock()
        self._trimming = False


_trimmer = HeapTrimmer()


def after_reclaim(nbytes: int) -> bool:
    """Tell the process's trimmer ``nbytes`` were freed on request; True if it trimmed.

    :class:`~pyshrinker.client.Shrinker` calls this after every request it settles: call it
    yourself only for memory freed on request by other means.

    .. versionadded:: 0.1.0
    """
    return _trimmer.freed(nbytes)


def trim_stats() -> TrimStats:
    """What the process's trimmer has done so far.

    .. versionadded:: 0.1.0
    """
    return _trimmer.stats()


os.register_at_fork(after_in_child=lambda: _trimmer._reset_after_fork())

__all__ = [
    "TRIM_AFTER_BYTES",
    "TRIM_ALWAYS_AFTER_BYTES",
    "TRIM_BYTES_PER_SECOND",
    "HeapTrimmer",
    "TrimStats",
    "after_reclaim",
    "trim_stats",
]
