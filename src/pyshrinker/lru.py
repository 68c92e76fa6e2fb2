"""ShrinkableLRU and @shrinkable_cache: caches as fast as the usual ones, that give memory back.

:class:`ShrinkableLRU` is a mutable mapping that behaves like ``cachetools.LRUCache`` (``maxsize``,
``currsize``, ``getsizeof``, ``popitem``, ``__missing__``...) and :func:`shrinkable_cache` a
decorator that behaves like ``functools.lru_cache`` (``maxsize``, ``typed``, ``cache_info()``...).
In addition, each is registered with the controller as a shrinker: the sizes of its entries are
reported as chunks, and a shrink request evicts least recently used entries until the requested
chunks are freed.

How the accounting works:

* Sizes are bytes. An entry's size is ``getsizeof(value)``, by default :func:`sys.getsizeof` of the
  value: cheap (no walk of the object graph) and right for the values caches usually hold
  (``bytes``, ``str``, arrays); for containers it counts only the container, so pass your own
  ``getsizeof`` for those. Keys and the ~100 bytes of bookkeeping per entry are not counted.
* The cache holds ``ceil(currsize / chunk_size)`` chunks: sizes are summed first, so entries
  smaller than a chunk are not each rounded up to one. The default chunk size is a page, 4096
  bytes, the unit the kernel reclaims in.
* Reports are batched locally: the chunk count is reported when ``currsize`` has moved by more
  than ``batch_bytes`` (1 MiB by default) since the last report, so an ordinary ``get`` or set
  costs no report at all. ``flush()`` reports now; after it (and after a request has been
  handled) the controller's count equals ``chunks`` exactly.
* A request for ``n`` chunks evicts least recently used entries until the chunk count has
  dropped by ``n`` (whole entries, so perhaps a little more). Then the heap is trimmed, as after
  every cache's reclaim (:mod:`pyshrinker.trim`), because values below glibc's mmap threshold
  live in the heap, and freeing them returns nothing to the kernel until it is trimmed.

Speed: the hot paths (``get``, ``[]``, ``[]=``, ``del``, ``in``, ``len``, and a cached function's
call) are C (:mod:`pyshrinker._lru`); see ``benchmarks/lru.py`` for the figures. Thread safety:
every operation is atomic under the GIL, and shrink requests (which arrive on the listener
thread) evict under the same rules; iteration works on a snapshot.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import weakref
from collections.abc import Callable, ItemsView, Iterator, MutableMapping, ValuesView
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar, overload

import attrs

from pyshrinker._lru import LRUCore, LRUFunction, _Base
from pyshrinker.client import DEFAULT_BATCH_BYTES, Shrinker
from pyshrinker.errors import PyshrinkerError
from pyshrinker.transport import Transport
from pyshrinker.trim import TRIM_AFTER_BYTES

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")
R = TypeVar("R")
_T = TypeVar("_T")
_Self = TypeVar("_Self", bound="_Registered")

#: Bytes per chunk unless told otherwise: a page, the unit the kernel reclaims in.
DEFAULT_CHUNK_SIZE = 4096

_MISSING: Any = object()
#: The smallest C ``Py_ssize_t``.
_SSIZE_MIN = -sys.maxsize - 1


@attrs.frozen
class LRUStats:
    """A shrinkable cache's counters.

    .. versionadded:: 0.1.0
    """

    #: Entries held.
    entries: int
    #: Sum of the entries' sizes, in bytes.
    currsize: int
    #: Chunks held: ``ceil(currsize / chunk_size)``.
    chunks: int
    #: Lookups (``get``, ``[]``, or calls) that found their key.
    hits: int
    #: Lookups that did not.
    misses: int
    #: Entries evicted to respect ``maxsize``.
    evicted_by_maxsize: int
    #: Entries evicted because the controller asked for memory.
    evicted_on_request: int


def _weak_reclaim(ref: weakref.ref[_Registered]) -> Callable[[int], int]:
    # The shrinker must not keep the cache alive: a cache nobody holds is collected, and its
    # finalizer unregisters the shrinker.
    def reclaim(asked: int) -> int:
        cache = ref()
        if cache is None:
            return 0
        return cache._reclaim(asked)

    return reclaim


class _Registered(_Base):
    """What both front ends share: the shrinker, batched chunk reports, and reclaim.

    The C core calls :meth:`_sync` when ``currsize`` leaves ``[_sync_lo, _sync_hi]`` and
    :meth:`_evicted` after evicting entries for ``maxsize`` when there is an ``on_evict``.

    .. versionadded:: 0.1.0
    """

    _chunk_size: int
    _batch_bytes: int
    _report_lock: threading.RLock
    _reported: int
    _detached: bool
    _on_evict: Callable[[Any, Any], object] | None
    _evicted_on_request: int
    _shrinker: Shrinker
    _finalizer: weakref.finalize[[], Any]

    def _register(
        self,
        *,
        chunk_size: int,
        cost: float,
        name: str,
        transport: Transport | None,
        batch_bytes: int,
        on_evict: Callable[[Any, Any], object] | None,
    ) -> None:
        if isinstance(batch_bytes, bool) or not isinstance(batch_bytes, int) or batch_bytes < 0:
            raise ValueError(f"batch_bytes must be an int >= 0, got {batch_bytes!r}")
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict must be callable, got {on_evict!r}")
        self._chunk_size = chunk_size
        self._batch_bytes = batch_bytes
        self._report_lock = threading.RLock()
        self._reported = 0
        self._detached = False
        self._on_evict = on_evict
        self._evicted_on_request = 0
        # Our own batching is the only one: the shrinker sends every report it is given.
        self._shrinker = Shrinker.register(
            chunk_size,
            _weak_reclaim(weakref.ref(self)),
            cost=cost,
            name=name,
            transport=transport,
            batch_bytes=0,
        )
        self._finalizer = weakref.finalize(self, self._shrinker.close)
        self._finalizer.atexit = False
        self._set_sync_window(0)

    # ---------------------------------------------------------------- public

    @property
    def chunk_size(self) -> int:
        """Bytes per chunk."""
        return self._chunk_size

    @property
    def chunks(self) -> int:
        """Chunks held now: ``ceil(currsize / chunk_size)``."""
        return -(-self._total // self._chunk_size)

    @property
    def shrinker(self) -> Shrinker:
        """The shrinker this cache registered (its ``efd`` names it to the controller)."""
        return self._shrinker

    def flush(self) -> None:
        """Report the chunks held now, whatever the batching; afterwards the counts agree."""
        self._sync()

    def close(self) -> None:
        """Unregister from the controller and drop every entry; idempotent.

        A closed :class:`ShrinkableLRU` refuses new entries (:class:`~pyshrinker.ClosedError`);
        a closed cached function still works, calling the function every time.
        """
        with self._report_lock:
            if self._closed:
                return
            self._closed = 1
        self._finalizer()
        self._clear()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stats(self, entries: int) -> LRUStats:
        return LRUStats(
            entries=entries,
            currsize=self._total,
            chunks=self.chunks,
            hits=self._hits,
            misses=self._misses,
            evicted_by_maxsize=self._evictions,
            evicted_on_request=self._evicted_on_request,
        )

    # ---------------------------------------------------------------- hooks and reclaim

    def _set_sync_window(self, total: int) -> None:
        # The C core calls _sync() once currsize leaves [lo, hi]. The bounds are C integers:
        # clamped, a currsize near sys.maxsize still has a window (and never overflows it).
        self._sync_lo = max(total - self._batch_bytes, _SSIZE_MIN)
        self._sync_hi = min(total + self._batch_bytes, sys.maxsize)

    def _sync(self) -> None:
        """Report the chunk count (the C core calls this once currsize left its window)."""
        with self._report_lock:
            total = self._total
            self._set_sync_window(total)
            if self._closed or self._detached:
                return
            chunks = -(-total // self._chunk_size)
            if chunks != self._reported:
                self._tell(chunks - self._reported)
                self._reported = chunks

    def _tell(self, delta: int) -> None:
        # Called with the report lock held, so reports reach the controller in order.
        if self._detached:
            return
        try:
            self._shrinker.report(delta)
        except PyshrinkerError as err:
            # The controller is gone or refuses us: a cache must go on serving regardless.
            self._detached = True
            log.error(
                "%s: cannot report to the controller (%s); the cache goes on unregistered",
                self._shrinker.name,
                err,
            )

    def _reclaim(self, asked: int) -> int:
        """Free ``asked`` chunks, least recently used first (runs on the listener thread)."""
        with self._report_lock:
            if self._closed:
                return 0
            entries, _freed_bytes, pairs = self._evict_chunks(
                asked, self._chunk_size, self._on_evict is not None
            )
            self._evicted_on_request += entries
            total = self._total
            self._set_sync_window(total)
            chunks = -(-total // self._chunk_size)
            # The shrinker ends at (what we had reported) - freed: make that what we hold.
            freed = self._reported - chunks
            if freed < 0:
                # Unreported growth outweighs what was evicted: report it, count none freed.
                self._tell(-freed)
                freed = 0
            self._reported = chunks
        if pairs:
            self._evicted(pairs)
        # The entries die here; the shrinker trims the heap after the request (pyshrinker.trim).
        del pairs
        return freed

    def _evicted(self, pairs: list[tuple[Any, Any]]) -> None:
        """Call ``on_evict(key, value)`` for each evicted entry; errors are logged."""
        on_evict = self._on_evict
        if on_evict is None:
            return
        for key, value in pairs:
            try:
                on_evict(key, value)
            except Exception:
                log.exception(
                    "%s: on_evict(%r) raised; the entry stays evicted", self._shrinker.name, key
                )


class _SnapshotItems(ItemsView[K, V]):
    """Items of a ShrinkableLRU: a snapshot, least recently used first, recency untouched."""

    _mapping: ShrinkableLRU[K, V]

    def __iter__(self) -> Iterator[tuple[K, V]]:
        return iter(self._mapping._items())

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, value = item
        found = self._mapping._peek(key, _MISSING)
        return found is not _MISSING and (found is value or found == value)


class _SnapshotValues(ValuesView[V]):
    """Values of a ShrinkableLRU: a snapshot, least recently used first, recency untouched."""

    _mapping: ShrinkableLRU[Any, V]

    def __iter__(self) -> Iterator[V]:
        return iter([value for _key, value in self._mapping._items()])


class ShrinkableLRU(_Registered, LRUCore, MutableMapping[K, V]):
    """An LRU cache mapping that gives memory back when the controller asks for it.

    It behaves like ``cachetools.LRUCache``: ``maxsize`` caps ``currsize``, the sum of
    ``getsizeof(value)`` over the entries; a set evicts least recently used entries to fit
    (``ValueError("value too large")`` if one value alone exceeds ``maxsize``); ``get`` and
    ``self[key]`` mark the entry most recently used, ``in`` does not; ``popitem()`` removes the
    least recently used entry (``KeyError`` when empty); ``self[key]`` on a missing key calls
    :meth:`__missing__`, which subclasses may override to compute values.

    Differences: ``maxsize`` is optional (None, the default, leaves the size to memory
    pressure); sizes are bytes, ``sys.getsizeof(value)`` by default, and ``maxsize`` is in bytes
    too (to cap the number of entries, give each the same size in bytes:
    ``getsizeof=lambda v: 4096, maxsize=1000 * 4096`` holds 1000 entries, each reported as a
    page; sizes that are not bytes would tell the controller nonsense); evictions do not go
    through :meth:`popitem` (use ``on_evict``); iteration (``iter``, ``keys()``, ``items()``,
    ``values()``) works on a snapshot, least recently used first, without changing recency; it
    cannot be copied or pickled (it is a registration).

    Failures: an operation that raises (``getsizeof`` raising or returning a negative or non-int
    size, an unhashable key, a key's ``__eq__`` raising, ``OverflowError`` for a size that would
    take ``currsize`` past ``sys.maxsize``) leaves the cache exactly as it was; ``currsize`` never
    exceeds ``maxsize``, as evictions happen before the store. Keys' ``__hash__``/``__eq__``,
    ``getsizeof``, ``on_evict`` and values' finalizers may use the cache themselves.

    In addition: the entries' sizes are reported to the controller as chunks of ``chunk_size``
    bytes, and a shrink request evicts least recently used entries until the requested chunks
    are freed. ``on_evict(key, value)`` is called for every entry evicted for ``maxsize`` or by
    a request (not for ``del``, ``pop``, ``popitem`` or ``clear``), after the entry is gone and
    outside any lock, on the thread that evicted it (the listener thread, for requests); an
    exception from it is logged. ``cost`` is the relative cost to rebuild a chunk (2 = asked
    half as much per byte held as a cost-1 cache); ``transport`` defaults to the embedded
    controller; ``batch_bytes`` is how far ``currsize`` may move before the chunk count is
    reported.

    Besides the mapping: ``chunks`` (held now), ``chunk_size``, ``shrinker`` (its ``efd`` names
    it to the controller), :meth:`stats`, ``flush()`` (report now), ``close()`` (unregister and
    drop everything; also on leaving a ``with`` block, or when the cache is garbage collected).

    .. versionadded:: 0.1.0
    """

    getsizeof: Callable[[Any], int] = staticmethod(sys.getsizeof)

    def __init__(
        self,
        maxsize: int | None = None,
        getsizeof: Callable[[V], int] | None = None,
        *,
        on_evict: Callable[[K, V], object] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        cost: float = 1.0,
        name: str | None = None,
        transport: Transport | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        if maxsize is not None:
            if isinstance(maxsize, bool) or not isinstance(maxsize, int):
                raise TypeError(f"maxsize must be an int or None, got {maxsize!r}")
            if maxsize < 0:
                raise ValueError("maxsize must be non-negative")
        if getsizeof is not None:
            if not callable(getsizeof):
                raise TypeError(f"getsizeof must be callable, got {getsizeof!r}")
            self.getsizeof = getsizeof
        sizer = self.getsizeof
        self._configure(
            -1 if maxsize is None else maxsize,
            -1,
            None if sizer is sys.getsizeof else sizer,
            on_evict is not None,
        )
        self._register(
            chunk_size=chunk_size,
            cost=cost,
            name=name or f"{type(self).__name__}-{id(self):x}",
            transport=transport,
            batch_bytes=batch_bytes,
            on_evict=on_evict,
        )

    @property
    def maxsize(self) -> int | None:
        """The cap on ``currsize``, or None."""
        return None if self._max_total < 0 else self._max_total

    def stats(self) -> LRUStats:
        """Entries, bytes, chunks, hits and misses (of ``get`` and ``[]``), evictions."""
        return self._stats(len(self))

    def items(self) -> ItemsView[K, V]:
        """A view of the items; iterating it takes a snapshot, least recently used first."""
        return _SnapshotItems(self)

    def values(self) -> ValuesView[V]:
        """A view of the values; iterating it takes a snapshot, least recently used first."""
        return _SnapshotValues(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({dict(self._items())!r}, "
            f"maxsize={self.maxsize!r}, currsize={self.currsize!r})"
        )

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError(f"cannot pickle or copy a {type(self).__name__}: it is a registration")

    if TYPE_CHECKING:  # the C core's methods, typed for checkers; at run time they are C

        def __getitem__(self, key: K) -> V: ...
        def __setitem__(self, key: K, value: V) -> None: ...
        def __delitem__(self, key: K) -> None: ...
        def __iter__(self) -> Iterator[K]: ...
        def __len__(self) -> int: ...
        def __contains__(self, key: object) -> bool: ...
        def __missing__(self, key: K) -> V: ...
        @overload
        def get(self, key: K, /) -> V | None: ...
        @overload
        def get(self, key: K, /, default: V | _T) -> V | _T: ...
        def get(self, key: K, /, default: object = None) -> object: ...
        @overload
        def pop(self, key: K, /) -> V: ...
        @overload
        def pop(self, key: K, /, default: V | _T) -> V | _T: ...
        def pop(self, key: K, /, default: object = ...) -> object: ...
        def popitem(self) -> tuple[K, V]: ...
        def setdefault(self, key: K, default: V = ..., /) -> V: ...
        def clear(self) -> None: ...


class CacheInfo(NamedTuple):
    """What ``cache_info()`` returns, as ``functools.lru_cache``'s does.

    .. versionadded:: 0.1.0
    """

    hits: int
    misses: int
    maxsize: int | None
    currsize: int


class ShrinkableCachedFunction(_Registered, LRUFunction, Generic[R]):
    """A function wrapped by :func:`shrinkable_cache`; behaves like ``functools.lru_cache``'s.

    Besides ``cache_info()``, ``cache_clear()`` and ``cache_parameters()``: ``chunks``,
    ``chunk_size``, ``shrinker``, :meth:`stats`, ``flush()`` and ``close()``, as
    :class:`ShrinkableLRU` has them. After ``close()`` the function is called every time.

    .. versionadded:: 0.1.0
    """

    __wrapped__: Callable[..., R]

    def __init__(
        self,
        user_function: Callable[..., R],
        maxsize: int | None,
        typed: bool,
        *,
        getsizeof: Callable[[R], int] | None,
        chunk_size: int,
        cost: float,
        name: str | None,
        transport: Transport | None,
        batch_bytes: int,
    ) -> None:
        if getsizeof is not None and not callable(getsizeof):
            raise TypeError(f"getsizeof must be callable, got {getsizeof!r}")
        # update_wrapper copies the wrapped function's __dict__ into ours: for a cached function
        # wrapped again, that is its own settings. Copy first, then set ours over them.
        functools.update_wrapper(self, user_function)
        self._maxsize = maxsize
        self._typed = bool(typed)
        self._configure(-1, -1 if maxsize is None else maxsize, getsizeof, False)
        self._set_function(user_function, self._typed)
        qualname = getattr(user_function, "__qualname__", repr(user_function))
        self._qualname = qualname
        self._register(
            chunk_size=chunk_size,
            cost=cost,
            name=name or f"shrinkable_cache({qualname})",
            transport=transport,
            batch_bytes=batch_bytes,
            on_evict=None,
        )

    if TYPE_CHECKING:

        def __call__(self, *args: Any, **kwargs: Any) -> R: ...

    def cache_info(self) -> CacheInfo:
        """Hits, misses, maxsize and the number of entries, as ``functools.lru_cache`` reports."""
        return CacheInfo(self._hits, self._misses, self._maxsize, self._len())

    def cache_clear(self) -> None:
        """Remove every entry and zero the statistics."""
        # Statistics first, as functools does: the release of the entries runs finalizers,
        # and calls they make count after the clear.
        self._reset_stats()
        self._clear()

    def cache_parameters(self) -> dict[str, Any]:
        """``{"maxsize": ..., "typed": ...}``, as ``functools.lru_cache`` reports."""
        return {"maxsize": self._maxsize, "typed": self._typed}

    def stats(self) -> LRUStats:
        """Entries, bytes, chunks, hits and misses, evictions."""
        return self._stats(self._len())

    def __reduce__(self) -> str:
        # Pickled by reference, as functools does: the function is found again by name.
        return self._qualname

    def __copy__(self) -> ShrinkableCachedFunction[R]:
        return self

    def __deepcopy__(self, memo: object) -> ShrinkableCachedFunction[R]:
        return self

    def __repr__(self) -> str:
        return f"<shrinkable_cache {self.__wrapped__!r}>"


@overload
def shrinkable_cache(
    maxsize: Callable[..., R],
    typed: bool = ...,
) -> ShrinkableCachedFunction[R]: ...
@overload
def shrinkable_cache(
    maxsize: int | None = ...,
    typed: bool = ...,
    *,
    getsizeof: Callable[[Any], int] | None = ...,
    chunk_size: int = ...,
    cost: float = ...,
    name: str | None = ...,
    transport: Transport | None = ...,
    batch_bytes: int = ...,
) -> Callable[[Callable[..., R]], ShrinkableCachedFunction[R]]: ...
def shrinkable_cache(
    maxsize: int | Callable[..., Any] | None = 128,
    typed: bool = False,
    *,
    getsizeof: Callable[[Any], int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cost: float = 1.0,
    name: str | None = None,
    transport: Transport | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> Any:
    """Memoize a function like ``functools.lru_cache``, in a cache that shrinks under pressure.

    ``maxsize`` (128 by default, as functools) caps the number of entries; None leaves the size
    to memory pressure alone; 0 caches nothing. ``typed=True`` caches ``f(3)`` and ``f(3.0)``
    apart. The wrapper has ``cache_info()``, ``cache_clear()``, ``cache_parameters()`` and
    ``__wrapped__``, works on methods (one cache for all instances, as functools), and keys
    calls exactly as ``functools.lru_cache`` does; it is thread-safe, and may call the function
    more than once for the same arguments when threads race, as functools does.

    In addition it is registered with the controller: results are sized with ``getsizeof``
    (:func:`sys.getsizeof` by default) and reported as chunks of ``chunk_size`` bytes, and a
    shrink request evicts least recently used results. ``@shrinkable_cache`` without parentheses
    works too. The other arguments are :class:`ShrinkableLRU`'s.

    .. versionadded:: 0.1.0
    """
    if isinstance(maxsize, int) and not isinstance(maxsize, bool):
        maxsize = max(0, maxsize)
    elif callable(maxsize) and isinstance(typed, bool):
        # Used as @shrinkable_cache: maxsize is the function.
        user_function, maxsize = maxsize, 128
        return ShrinkableCachedFunction(
            user_function,
            maxsize,
            typed,
            getsizeof=getsizeof,
            chunk_size=chunk_size,
            cost=cost,
            name=name,
            transport=transport,
            batch_bytes=batch_bytes,
        )
    elif maxsize is not None:
        raise TypeError("Expected first argument to be an integer, a callable, or None")
    size = maxsize

    def decorating(user_function: Callable[..., R]) -> ShrinkableCachedFunction[R]:
        return ShrinkableCachedFunction(
            user_function,
            size,
            typed,
            getsizeof=getsizeof,
            chunk_size=chunk_size,
            cost=cost,
            name=name,
            transport=transport,
            batch_bytes=batch_bytes,
        )

    return decorating


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "TRIM_AFTER_BYTES",
    "CacheInfo",
    "LRUStats",
    "ShrinkableCachedFunction",
    "ShrinkableLRU",
    "shrinkable_cache",
]
