"""ShrinkableTTLCache and ShrinkableTLRUCache: cachetools' TTLCache and TLRUCache, shrinkable.

Each is a :class:`~pyshrinker.lru.ShrinkableLRU` (the entries, their LRU order, ``maxsize``,
``getsizeof``, the memory reckoning and the controller's requests are its C core's) plus each
entry's expiry time, kept here in Python: an ordered dict in the order the entries expire (for a
TTL cache, the order they were set; for a TLRU cache, a heap orders them). Every operation is
cachetools' own, step for step (``with self.timer as time`` freezes the time for one operation,
a set first drops what has expired, an expired entry is missing), so cachetools' test suite runs
against them (tests/upstream/).

What memory pressure adds: a shrink request drops the expired entries first, then the least
recently used ones, until the requested chunks are freed.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import collections
import copy
import heapq
import itertools
import threading
import time as _time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from pyshrinker._lru import LRUCore
from pyshrinker.client import DEFAULT_BATCH_BYTES
from pyshrinker.lru import DEFAULT_CHUNK_SIZE, ShrinkableLRU
from pyshrinker.transport import Transport

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

_MARKER: Any = object()


class _Timer(Generic[T]):
    """cachetools' timer wrapper: ``with timer as now`` freezes ``timer()`` for one operation.

    The frozen time is each thread's own: the caches are shared between threads (and a shrink
    request runs on the listener's), and one thread's operation must neither freeze the clock
    for another nor lose a nesting count to an interleaved ``+= 1``.
    """

    def __init__(self, timer: Callable[[], T]) -> None:
        self._timer = timer
        self._local = threading.local()

    def __call__(self) -> T:
        local = self._local
        return local.time if getattr(local, "nesting", 0) else self._timer()

    def __enter__(self) -> T:
        local = self._local
        nesting = getattr(local, "nesting", 0)
        if nesting == 0:
            local.time = self._timer()
        local.nesting = nesting + 1
        return local.time  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        self._local.nesting -= 1

    def __copy__(self) -> _Timer[T]:
        return _Timer(self._timer)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Timer[T]:
        return _Timer(copy.deepcopy(self._timer, memo))

    def __reduce__(self) -> tuple[Any, ...]:
        return _Timer, (self._timer,)

    def __getattr__(self, name: str) -> Any:
        # The user's timer's own attributes (a test timer's tick(), say).
        if name.startswith("__") or name in ("_timer", "_local"):
            raise AttributeError(name)
        return getattr(self._timer, name)


class _Timed(ShrinkableLRU[K, V]):
    """What the TTL and TLRU caches share: expiry times beside the C core's entries.

    ``_expires`` maps each key to its expiry time; the subclass keeps the order they expire in.
    Every entry of the core has one, and only they: entries the core drops on its own (for
    ``maxsize``, or a request) come back through :meth:`_evicted`, which drops their times.
    The operations that change both hold the report lock, which a shrink request (on the
    listener thread) holds too: a request never sees an entry without its time, or the reverse.
    """

    _timer: _Timer[Any]
    _expires: dict[Any, Any]

    def _setup_timed(self, timer: Callable[[], Any], settings: dict[str, Any]) -> None:
        self._timer = _Timer(timer)
        super()._setup(notify=True, **settings)
        self._settings["timer"] = timer

    # ------------------------------------------------------------- what the C core drops

    @property
    def _collect_evicted(self) -> bool:
        return True

    def _evicted(self, pairs: list[tuple[Any, Any]]) -> None:
        for key, _value in pairs:
            # Unless it was set again meanwhile (a finalizer, another thread): then its time is
            # the new entry's.
            if not LRUCore.__contains__(self, key):
                self._forget(key)
        super()._evicted(pairs)

    def _reclaim_first(self) -> list[tuple[Any, Any]]:
        return self.expire()

    def _forget(self, key: Any) -> None:
        self._expires.pop(key, None)

    # ------------------------------------------------------------- the mapping

    @property
    def timer(self) -> _Timer[Any]:
        """The timer function used by the cache."""
        return self._timer

    @property
    def currsize(self) -> int:
        """The current size of the cache, once the expired entries are dropped."""
        with self._timer as now:
            self.expire(now)
            return super().currsize

    def __len__(self) -> int:
        with self._timer as now:
            self.expire(now)
            return LRUCore.__len__(self)

    def __repr__(self) -> str:
        with self._timer as now:
            self.expire(now)
            return super().__repr__()

    def __contains__(self, key: object) -> bool:
        expires = self._expires.get(key, _MARKER)
        return expires is not _MARKER and self._timer() < expires

    def __getitem__(self, key: K) -> V:
        expires = self._expires.get(key, _MARKER)
        if expires is _MARKER or self._timer() < expires:
            return LRUCore.__getitem__(self, key)  # type: ignore[no-any-return]
        # Expired, not yet dropped: missing. (cachetools also marks it used; here that would
        # count a hit, and changes nothing: every set, popitem and request drops it first.)
        return self.__missing__(key)

    def __delitem__(self, key: K) -> None:
        with self._report_lock:
            LRUCore.__delitem__(self, key)
            expires = self._expires.pop(key, _MARKER)
            self._forgotten(key)
        if expires is not _MARKER and not (self._timer() < expires):
            # As cachetools: an expired entry is removed, and was missing.
            raise KeyError(key)

    def _forgotten(self, key: Any) -> None:
        """Hook: ``key``'s time was just dropped from ``_expires``."""

    def _view_items(self) -> list[tuple[K, V]]:
        with self._timer as now:
            expires = self._expires
            return [(k, v) for k, v in self._items() if now < expires.get(k, now)]

    def _live(self, key: object) -> bool:
        return key in self

    def __iter__(self) -> Iterator[K]:
        for key in list(LRUCore.__iter__(self)):
            with self._timer as now:
                expires = self._expires.get(key, _MARKER)
                if expires is not _MARKER and now < expires:
                    yield key

    def get(self, key: K, default: Any = None) -> Any:
        if type(self).__getitem__ is not _Timed.__getitem__:
            # As cachetools' Cache.get: a subclass's own [] is what get() asks.
            with self._timer:
                return self[key] if key in self else default  # noqa: SIM401
        expires = self._expires.get(key, _MARKER)
        if expires is _MARKER or not (self._timer() < expires):
            return default
        # One lookup in the core, not 'in' and then []: another thread (or the listener, for a
        # request) may drop the entry in between, before its time goes, and then it is missing.
        # (Nor is __missing__ called, as in cachetools.)
        return LRUCore.get(self, key, default)

    def pop(self, key: K, default: Any = _MARKER) -> Any:
        with self._report_lock, self._timer:
            if key in self:
                value = self[key]
                del self[key]
                return value
            if default is _MARKER:
                raise KeyError(key)
            return default

    def setdefault(self, key: K, default: Any = None) -> Any:
        with self._report_lock, self._timer:
            if key in self:
                return self[key]
            self[key] = default
            return default

    def popitem(self) -> tuple[K, V]:
        """Remove and return the least recently used pair that has not expired."""
        with self._report_lock, self._timer as now:
            self.expire(now)
            key, value = LRUCore.popitem(self)
            self._expires.pop(key, None)
            self._forgotten(key)
            return key, value

    def clear(self) -> None:
        with self._report_lock:
            LRUCore.clear(self)
            self._expires.clear()
            self._forgotten(_MARKER)

    def _store(self, key: K, value: V, expires: Any) -> None:
        """Set, with the expiry time computed (the caller has dropped the expired entries)."""
        LRUCore.__setitem__(self, key, value)
        self._expires.pop(key, None)
        self._expires[key] = expires

    def _pop_expired(self, key: Any, expired: list[tuple[Any, Any]]) -> None:
        value = LRUCore.pop(self, key, _MARKER)
        if value is not _MARKER:
            expired.append((key, value))

    # ------------------------------------------------------------- copies and pickles

    def _deep_settings(self, memo: dict[int, Any]) -> dict[str, Any]:
        # A deep copy has a timer of its own.
        return dict(self._settings, timer=copy.deepcopy(self._settings["timer"], memo))

    def _state(self, extra: dict[str, Any]) -> dict[str, Any]:
        return dict(super()._state(extra), expires=list(self._expires.items()))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._load_expires(state["expires"])
        self.expire(self._timer())

    def _copy_state(self, new: ShrinkableLRU[K, V]) -> None:
        assert isinstance(new, _Timed)
        new._load_expires(list(self._expires.items()))

    def _load_expires(self, items: list[tuple[Any, Any]]) -> None:
        self._expires.clear()
        self._expires.update(items)

    def expire(self, time: Any = None) -> list[tuple[K, V]]:  # pragma: no cover - abstract
        raise NotImplementedError


class ShrinkableTTLCache(_Timed[K, V]):
    """``cachetools.TTLCache`` that gives memory back: an LRU cache whose entries expire.

    Each entry expires ``ttl`` after it was set (``timer()``, :func:`time.monotonic` by default,
    plus ``ttl``); an expired entry is missing (``in``, ``[]``, ``get``, iteration, ``len``) and
    is dropped by the next set, by :meth:`expire` and, first of all, when the controller asks
    for memory. ``maxsize``, ``getsizeof`` and every other argument are
    :class:`~pyshrinker.ShrinkableLRU`'s; the intended differences from cachetools are its
    too (docs/howto/cachetools.md).

    .. versionadded:: 0.1.0
    """

    _expires: collections.OrderedDict[Any, Any]

    def __init__(
        self,
        maxsize: float | None,
        ttl: Any,
        timer: Callable[[], Any] = _time.monotonic,
        getsizeof: Callable[[V], int] | None = None,
        *,
        memsize: Callable[[V], int] | None = None,
        on_evict: Callable[[K, V], object] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        cost: float = 1.0,
        name: str | None = None,
        transport: Transport | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        self._setup(
            maxsize=maxsize,
            ttl=ttl,
            timer=timer,
            getsizeof=getsizeof,
            memsize=memsize,
            on_evict=on_evict,
            chunk_size=chunk_size,
            cost=cost,
            name=name,
            transport=transport,
            batch_bytes=batch_bytes,
        )

    def _setup(self, *, ttl: Any, timer: Callable[[], Any], **settings: Any) -> None:  # type: ignore[override]
        self._ttl = ttl
        # Keys in the order they expire: the order they were last set (ttl is the same for all).
        self._expires = collections.OrderedDict()
        self._setup_timed(timer, settings)
        self._settings["ttl"] = ttl

    @property
    def ttl(self) -> Any:
        """The time-to-live value of the cache's items."""
        return self._ttl

    def __setitem__(self, key: K, value: V) -> None:
        with self._report_lock, self._timer as now:
            expires = now + self._ttl
            self.expire(now)
            self._store(key, value, expires)

    def expire(self, time: Any = None) -> list[tuple[K, V]]:
        """Remove expired items from the cache and return the expired ``(key, value)`` pairs."""
        if time is None:
            time = self._timer()
        expires = self._expires
        expired: list[tuple[K, V]] = []
        with self._report_lock:
            while expires:
                key, when = next(iter(expires.items()))
                if time < when:
                    break
                del expires[key]
                self._pop_expired(key, expired)
        return expired


class ShrinkableTLRUCache(_Timed[K, V]):
    """``cachetools.TLRUCache`` that gives memory back: each entry's own time to use.

    An entry set at ``now`` expires at ``ttu(key, value, now)``; otherwise as
    :class:`ShrinkableTTLCache` (expired entries go first when memory is asked for).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        maxsize: float | None,
        ttu: Callable[[K, V, Any], Any],
        timer: Callable[[], Any] = _time.monotonic,
        getsizeof: Callable[[V], int] | None = None,
        *,
        memsize: Callable[[V], int] | None = None,
        on_evict: Callable[[K, V], object] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        cost: float = 1.0,
        name: str | None = None,
        transport: Transport | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        self._setup(
            maxsize=maxsize,
            ttu=ttu,
            timer=timer,
            getsizeof=getsizeof,
            memsize=memsize,
            on_evict=on_evict,
            chunk_size=chunk_size,
            cost=cost,
            name=name,
            transport=transport,
            batch_bytes=batch_bytes,
        )

    def _setup(  # type: ignore[override]
        self, *, ttu: Callable[[Any, Any, Any], Any], timer: Callable[[], Any], **settings: Any
    ) -> None:
        self._ttu = ttu
        self._expires = {}
        # (expires, order, key): the earliest first; entries no longer current are skipped
        # (their key's time is another, or gone), and the heap is rebuilt when they are many.
        self._heap: list[tuple[Any, int, Any]] = []
        self._order = itertools.count()
        self._setup_timed(timer, settings)
        self._settings["ttu"] = ttu

    @property
    def ttu(self) -> Callable[[K, V, Any], Any]:
        """The local time-to-use function used by the cache."""
        return self._ttu

    def __setitem__(self, key: K, value: V) -> None:
        with self._report_lock, self._timer as now:
            self.expire(now)
            expires = self._ttu(key, value, now)
            if not (now < expires):
                # Already expired: not stored, and an entry under key goes, as in cachetools.
                if self._expires.pop(key, _MARKER) is not _MARKER:
                    LRUCore.pop(self, key, None)
                    self._forgotten(key)
                return
            self._store(key, value, expires)
            self._push(key, expires)

    def _push(self, key: Any, expires: Any) -> None:
        heapq.heappush(self._heap, (expires, next(self._order), key))
        if len(self._heap) > 2 * len(self._expires) + 8:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        order = self._order
        self._heap = [(when, next(order), key) for key, when in self._expires.items()]
        heapq.heapify(self._heap)

    def _forgotten(self, key: Any) -> None:
        if len(self._heap) > 2 * len(self._expires) + 8:
            self._rebuild_heap()

    def _load_expires(self, items: list[tuple[Any, Any]]) -> None:
        super()._load_expires(items)
        self._rebuild_heap()

    def expire(self, time: Any = None) -> list[tuple[K, V]]:
        """Remove expired items from the cache and return the expired ``(key, value)`` pairs."""
        if time is None:
            time = self._timer()
        expires = self._expires
        expired: list[tuple[K, V]] = []
        with self._report_lock:
            heap = self._heap
            while heap and not (time < heap[0][0]):
                when, _order, key = heapq.heappop(heap)
                current = expires.get(key, _MARKER)
                if current is _MARKER or (current is not when and current != when):
                    continue  # set again since, or gone
                del expires[key]
                self._pop_expired(key, expired)
        return expired


__all__ = ["ShrinkableTLRUCache", "ShrinkableTTLCache"]
