"""ChunkCache: keyed entries accounted in chunks, given back least recently used first.

Every insert and removal is reported to the controller by the cache itself (batched by the
:class:`~pyshrinker.client.Shrinker`), and a shrink request evicts least recently used entries
that are not pinned until enough chunks are freed. Pinned entries are in use: they are never
freed, and count as not freed, so the controller gets them back as a re-add.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import attrs

from pyshrinker import _fork
from pyshrinker.client import Shrinker
from pyshrinker.transport import Transport

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING: Any = object()


@attrs.define(eq=False, slots=True)
class _Entry(Generic[V]):
    value: V
    chunks: int
    pins: int = 0


@attrs.frozen
class CacheStats:
    """A ChunkCache's counters."""

    entries: int
    chunks: int
    pinned_entries: int
    hits: int
    misses: int
    evicted_on_request: int


class ChunkCache(Generic[K, V]):
    """A thread-safe LRU mapping whose entries are accounted in chunks of ``chunk_size`` bytes.

    ``put(key, value, chunks=n)`` or ``put(key, value, nbytes=b)`` stores an entry of ``n``
    chunks (or ``ceil(b / chunk_size)``, at least 1). ``on_evict(key, value)`` is called for each
    entry evicted by a shrink request or by ``max_chunks``, outside the cache lock; if it raises,
    the error is logged and the entry stays evicted.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        chunk_size: int,
        *,
        cost: float = 1.0,
        max_chunks: int | None = None,
        on_evict: Callable[[K, V], object] | None = None,
        name: str | None = None,
        transport: Transport | None = None,
    ) -> None:
        if max_chunks is not None and max_chunks <= 0:
            raise ValueError(f"max_chunks must be positive or None, got {max_chunks}")
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._lock = threading.Lock()
        self._chunks = 0
        self._max_chunks = max_chunks
        self._on_evict = on_evict
        self._hits = self._misses = self._evicted_on_request = 0
        self._shrinker = Shrinker.register(
            chunk_size,
            self._reclaim,
            cost=cost,
            name=name or f"ChunkCache-{chunk_size}",
            transport=transport,
        )
        _fork.track(self, _fork.CACHE)

    def _fork_locks(self) -> list[threading.Lock | threading.RLock]:
        # Held for dict operations and a report, never across a callback: a forked child
        # copies the entries and their chunk count whole.
        return [self._lock]

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- properties

    @property
    def chunk_size(self) -> int:
        """Bytes per chunk."""
        return self._shrinker.chunk_size

    @property
    def chunks(self) -> int:
        """Chunks held now."""
        return self._chunks

    @property
    def shrinker(self) -> Shrinker:
        """The shrinker this cache registered."""
        return self._shrinker

    def stats(self) -> CacheStats:
        """Counters: entries, chunks, pins, hits, misses, evictions on request."""
        with self._lock:
            pinned = sum(1 for e in self._entries.values() if e.pins)
            return CacheStats(
                len(self._entries),
                self._chunks,
                pinned,
                self._hits,
                self._misses,
                self._evicted_on_request,
            )

    # ---------------------------------------------------------------- mapping

    def chunks_for(self, nbytes: int) -> int:
        """Chunks an entry of ``nbytes`` takes (at least one)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        return max(1, math.ceil(nbytes / self._shrinker.chunk_size))

    def put(
        self, key: K, value: V, *, chunks: int | None = None, nbytes: int | None = None
    ) -> None:
        """Store ``value`` under ``key`` as the most recently used entry."""
        if chunks is not None and nbytes is not None:
            raise TypeError("give chunks or nbytes, not both")
        size = self.chunks_for(nbytes) if nbytes is not None else (1 if chunks is None else chunks)
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"chunks must be a positive int, got {size!r}")
        if self._max_chunks is not None and size > self._max_chunks:
            raise ValueError(f"entry of {size} chunks exceeds max_chunks={self._max_chunks}")
        evicted: list[tuple[K, V]] = []
        with self._lock:
            old = self._entries.pop(key, None)
            self._entries[key] = _Entry(value, size)
            delta = size - (old.chunks if old is not None else 0)
            self._chunks += delta
            if self._max_chunks is not None:
                delta -= self._evict_lru(self._chunks - self._max_chunks, evicted)
            # Reported under the lock so reports reach the controller in the order the
            # entries changed: a free overtaking its allocation would meet the count's floor.
            if delta:
                self._shrinker.report(delta, serve_here=delta > 0)
        if delta > 0:
            # Outside the lock: a request the controller made at once is served here.
            self._shrinker.reclaim_pending()
        self._notify_evicted(evicted)

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value under ``key`` (marking it recently used), or ``default``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return default
            self._entries.move_to_end(key)
            self._hits += 1
            return entry.value

    def __getitem__(self, key: K) -> V:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value  # type: ignore[return-value]

    def __setitem__(self, key: K, value: V) -> None:
        self.put(key, value)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._entries))

    def pop(self, key: K, default: V = _MISSING) -> V:
        """Remove and return the value under ``key`` (reported as freed)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._chunks -= entry.chunks
                self._shrinker.report(-entry.chunks)
        if entry is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return entry.value

    def __delitem__(self, key: K) -> None:
        self.pop(key)

    def clear(self) -> None:
        """Remove every entry (reported as freed); pinned ones too."""
        with self._lock:
            freed, self._chunks = self._chunks, 0
            self._entries.clear()
            if freed:
                self._shrinker.report(-freed)

    @contextmanager
    def pinned(self, key: K) -> Iterator[V]:
        """Hold ``key``'s entry in use: shrink requests skip it until the block ends."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise KeyError(key)
            entry.pins += 1
            self._entries.move_to_end(key)
        try:
            yield entry.value
        finally:
            with self._lock:
                entry.pins -= 1

    # ---------------------------------------------------------------- reclaim

    def _evict_lru(self, need: int, evicted: list[tuple[K, V]]) -> int:
        # Called with the lock held. Evicts unpinned entries, oldest first, until ``need``
        # chunks are gone; returns the chunks freed (whole entries, so maybe more).
        freed = 0
        if need <= 0:
            return 0
        for key in list(self._entries):
            entry = self._entries[key]
            if entry.pins:
                continue
            del self._entries[key]
            freed += entry.chunks
            evicted.append((key, entry.value))
            if freed >= need:
                break
        self._chunks -= freed
        return freed

    def _reclaim(self, asked: int) -> int:
        evicted: list[tuple[K, V]] = []
        with self._lock:
            freed = self._evict_lru(asked, evicted)
            self._evicted_on_request += len(evicted)
        self._notify_evicted(evicted)
        return freed

    def _notify_evicted(self, evicted: list[tuple[K, V]]) -> None:
        if self._on_evict is None:
            return
        for key, value in evicted:
            try:
                self._on_evict(key, value)
            except Exception:
                log.exception("on_evict(%r) raised; the entry stays evicted", key)

    def flush(self) -> None:
        """Send pending chunk reports to the controller now."""
        self._shrinker.flush()

    def close(self) -> None:
        """Unregister from the controller and drop every entry; idempotent."""
        _fork.untrack(self)
        self._shrinker.close()
        with self._lock:
            self._entries.clear()
            self._chunks = 0

    def __enter__(self) -> ChunkCache[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
