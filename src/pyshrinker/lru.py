"""ShrinkableLRU and @shrinkable_cache: caches as fast as the usual ones, that give memory back.

:class:`ShrinkableLRU` is a mutable mapping that behaves like ``cachetools.LRUCache`` (``maxsize``,
``currsize``, ``getsizeof``, ``popitem``, ``__missing__``...) and :func:`shrinkable_cache` a
decorator that behaves like ``functools.lru_cache`` (``maxsize``, ``typed``, ``cache_info()``...).
In addition, each is registered with the controller as a shrinker: the sizes of its entries are
reported as chunks, and a shrink request evicts least recently used entries until the requested
chunks are freed.

How the accounting works:

* ``maxsize``, ``currsize`` and ``getsizeof`` mean what they mean in cachetools and functools
  (1 per entry by default). Memory is a separate reckoning: an entry's bytes are
  ``memsize(value)``, by default :func:`sys.getsizeof` of the value: cheap (no walk of the object
  graph) and right for the values caches usually hold (``bytes``, ``str``, arrays); for
  containers it counts only the container, so pass your own ``memsize`` for those. Keys and the
  ~100 bytes of bookkeeping per entry are not counted.
* The cache holds ``ceil(nbytes / chunk_size)`` chunks: bytes are summed first, so entries
  smaller than a chunk are not each rounded up to one. The default chunk size is a page, 4096
  bytes, the unit the kernel reclaims in.
* Reports are batched locally: the chunk count is reported when the bytes have moved by more
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

import copy
import functools
import inspect
import logging
import math
import re
import sys
import threading
import weakref
from collections.abc import Callable, ItemsView, Iterator, MutableMapping, ValuesView
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar, overload

import attrs

from pyshrinker._lru import LRUCore, LRUFunction, _Base
from pyshrinker.client import DEFAULT_BATCH_BYTES, Shrinker
from pyshrinker.errors import DependencyVersionError, PyshrinkerError
from pyshrinker.transport import Transport
from pyshrinker.trim import TRIM_AFTER_BYTES

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")
R = TypeVar("R")
_T = TypeVar("_T")
_Self = TypeVar("_Self", bound="_Registered")
_Self_LRU = TypeVar("_Self_LRU", bound="ShrinkableLRU[Any, Any]")

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
    #: Sum of the entries' sizes (``getsizeof``: 1 per entry by default): what ``maxsize`` caps.
    currsize: int
    #: Sum of the entries' bytes (``memsize``): what the chunks count.
    nbytes: int
    #: Chunks held: ``ceil(nbytes / chunk_size)``.
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

    The C core calls :meth:`_sync` when the bytes held leave ``[_sync_lo, _sync_hi]`` and
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
        """Chunks held now: ``ceil(nbytes / chunk_size)``, the entries' bytes in chunks."""
        return -(-self._mem_total // self._chunk_size)

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
            nbytes=self._mem_total,
            chunks=self.chunks,
            hits=self._hits,
            misses=self._misses,
            evicted_by_maxsize=self._evictions,
            evicted_on_request=self._evicted_on_request,
        )

    # ---------------------------------------------------------------- hooks and reclaim

    def _set_sync_window(self, total: int) -> None:
        # The C core calls _sync() once the bytes held leave [lo, hi]. The bounds are C integers:
        # clamped, a total near sys.maxsize still has a window (and never overflows it).
        self._sync_lo = max(total - self._batch_bytes, _SSIZE_MIN)
        self._sync_hi = min(total + self._batch_bytes, sys.maxsize)

    def _sync(self) -> None:
        """Report the chunk count (the C core calls this once the bytes left their window)."""
        with self._report_lock:
            total = self._mem_total
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
            # No report in the middle of a request: what it frees is its answer.
            self._sync_lo, self._sync_hi = _SSIZE_MIN, sys.maxsize
            held = self.chunks
            try:
                first = self._reclaim_first()
            except Exception:
                # A key's __eq__ or a timer raised: the request goes on with the LRU entries.
                log.exception("%s: dropping expired entries failed", self._shrinker.name)
                first = []
            asked = max(0, asked - (held - self.chunks))
            entries, _freed_bytes, pairs = self._evict_chunks(
                asked, self._chunk_size, self._collect_evicted
            )
            pairs = first + pairs if pairs else first
            self._evicted_on_request += entries + len(first)
            total = self._mem_total
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

    @property
    def _collect_evicted(self) -> bool:
        """Whether a request's evictions are listed (for :meth:`_evicted`)."""
        return self._on_evict is not None

    def _reclaim_first(self) -> list[tuple[Any, Any]]:
        """Hook: drop what goes before the least recently used (expired entries); the pairs."""
        return []

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
        return iter(self._mapping._view_items())

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, value = item
        found = self._mapping._peek(key, _MISSING)
        if found is _MISSING or not self._mapping._live(key):
            return False
        return found is value or found == value


class _SnapshotValues(ValuesView[V]):
    """Values of a ShrinkableLRU: a snapshot, least recently used first, recency untouched."""

    _mapping: ShrinkableLRU[Any, V]

    def __iter__(self) -> Iterator[V]:
        return iter([value for _key, value in self._mapping._view_items()])


def _count_one(value: object) -> int:
    """The size of every entry: 1, as cachetools' default ``getsizeof``."""
    return 1


def _cap(maxsize: float | None) -> int:
    """The C core's cap for a cachetools ``maxsize``: -1 for none (None, ``math.inf``)."""
    if maxsize is None:
        return -1
    if isinstance(maxsize, bool) or not isinstance(maxsize, (int, float)):
        raise TypeError(f"maxsize must be a number or None, got {maxsize!r}")
    if maxsize != maxsize:
        raise ValueError("maxsize must not be NaN")
    if maxsize < 0:
        raise ValueError("maxsize must be non-negative")
    if maxsize == math.inf:
        return -1
    # Sizes are ints: a cap of 2.5 holds what a cap of 2 holds. currsize cannot pass sys.maxsize.
    return min(math.floor(maxsize), sys.maxsize)


#: The oldest cachetools whose contract (``TTLCache.expire()`` returning the expired pairs,
#: ``cached(..., info=True)``) these caches follow.
CACHETOOLS_MIN_VERSION = (5, 5)


def _join_cachetools() -> str | None:
    """Make our caches ``cachetools.Cache`` instances if cachetools is there; or say why not.

    ``cachetools.Cache`` is an abstract base class (a ``MutableMapping``), so registering ours as
    a virtual subclass is what ``isinstance(cache, cachetools.Cache)`` (``cached(info=True)``'s
    check) sees, without importing cachetools for users who do not have it.
    """
    try:
        import cachetools
    except ImportError:
        return None
    found = getattr(cachetools, "__version__", "0")
    parts = tuple(int(part) for part in re.findall(r"\d+", found)[:2])
    if parts < CACHETOOLS_MIN_VERSION:
        need = ".".join(map(str, CACHETOOLS_MIN_VERSION))
        return (
            f"pyshrinker's caches follow cachetools >= {need}, and cachetools {found} is "
            f"installed: upgrade it (pip install 'cachetools>={need}') or uninstall it"
        )
    cachetools.Cache.register(ShrinkableLRU)
    return None


class ShrinkableLRU(_Registered, LRUCore, MutableMapping[K, V]):
    """An LRU cache mapping that gives memory back when the controller asks for it.

    It is a ``cachetools.LRUCache``, exactly: ``maxsize`` caps ``currsize``, the sum of
    ``getsizeof(value)`` over the entries, and ``getsizeof`` is 1 per entry unless given (as an
    argument, or overridden in a subclass), so ``ShrinkableLRU(10_000)`` holds 10,000 entries;
    ``getsizeof=len`` or ``sys.getsizeof`` bounds it in bytes. A set evicts least recently used
    entries to fit (``ValueError("value too large")`` if one value alone exceeds ``maxsize``);
    ``get`` and ``self[key]`` mark the entry most recently used, ``in`` does not;
    ``popitem()`` removes the least recently used entry (``KeyError`` when empty);
    ``self[key]`` on a missing key calls :meth:`__missing__`. ``maxsize=math.inf`` (or None,
    the default) sets no cap. When cachetools (>= 5.5) is installed, the cache is a
    ``cachetools.Cache`` (``isinstance``), so ``cachetools.cached(cache, info=True)`` reports its
    ``maxsize`` and ``currsize``. ``copy.copy``, ``copy.deepcopy`` and pickling give a new cache,
    registered on its own, with the same entries, order and settings (a pickled one uses the
    default transport).

    Intended differences (docs/howto/cachetools.md): evictions do not go through
    :meth:`popitem` (use ``on_evict``); iteration (``iter``, ``keys()``, ``items()``,
    ``values()``) works on a snapshot, least recently used first, without changing recency.

    Memory, apart from ``maxsize``: each entry is reckoned to take ``memsize(value)`` bytes, by
    default :func:`sys.getsizeof` of the value (the value object alone: right for ``bytes``,
    ``str`` and arrays; for containers pass your own). Keys and the ~100 bytes of bookkeeping
    per entry are not counted. Those bytes are what the controller is told (as chunks of
    ``chunk_size`` bytes), and a shrink request evicts least recently used entries until the
    requested chunks are freed: a count-bounded cache gives memory back too. ``memsize`` may be
    the same callable as ``getsizeof`` (it is then called once per set).

    Failures: an operation that raises (a sizer raising or returning a negative or non-int
    size, an unhashable key, a key's ``__eq__`` raising, ``OverflowError`` for a size that would
    take ``currsize`` or the bytes past ``sys.maxsize``) leaves the cache exactly as it was;
    ``currsize`` never exceeds ``maxsize``, as evictions happen before the store. Keys'
    ``__hash__``/``__eq__``, the sizers, ``on_evict`` and values' finalizers may use the cache
    themselves.

    In addition: ``on_evict(key, value)`` is called for every entry evicted for ``maxsize`` or
    by a request (not for ``del``, ``pop``, ``popitem`` or ``clear``), after the entry is gone
    and outside any lock, on the thread that evicted it (the listener thread, for requests); an
    exception from it is logged. ``cost`` is the relative cost to rebuild a chunk (2 = asked
    half as much per byte held as a cost-1 cache); ``transport`` defaults to the embedded
    controller; ``batch_bytes`` is how far the bytes may move before the chunk count is
    reported.

    Besides the mapping: ``chunks`` (held now), ``chunk_size``, ``shrinker`` (its ``efd`` names
    it to the controller), :meth:`stats`, ``flush()`` (report now), ``close()`` (unregister and
    drop everything; also on leaving a ``with`` block, or when the cache is garbage collected).

    .. versionadded:: 0.1.0
    """

    getsizeof: Callable[[Any], int] = staticmethod(_count_one)
    _settings: dict[str, Any]
    _maxsize: float | None
    _setup_names: frozenset[str]

    def __init__(
        self,
        maxsize: float | None = None,
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
            getsizeof=getsizeof,
            memsize=memsize,
            on_evict=on_evict,
            chunk_size=chunk_size,
            cost=cost,
            name=name,
            transport=transport,
            batch_bytes=batch_bytes,
        )

    def _setup(
        self,
        *,
        maxsize: float | None,
        getsizeof: Callable[[Any], int] | None,
        memsize: Callable[[Any], int] | None,
        on_evict: Callable[[Any, Any], object] | None,
        chunk_size: int,
        cost: float,
        name: str | None,
        transport: Transport | None,
        batch_bytes: int,
        notify: bool = False,
    ) -> None:
        """What ``__init__`` does; a copy or an unpickled cache is set up with it alone."""
        if _CACHETOOLS_PROBLEM is not None:
            raise DependencyVersionError(_CACHETOOLS_PROBLEM)
        cap = _cap(maxsize)
        if getsizeof is not None and not callable(getsizeof):
            raise TypeError(f"getsizeof must be callable, got {getsizeof!r}")
        if memsize is not None and not callable(memsize):
            raise TypeError(f"memsize must be callable, got {memsize!r}")
        self._settings = {
            "maxsize": maxsize,
            "getsizeof": getsizeof,
            "memsize": memsize,
            "on_evict": on_evict,
            "chunk_size": chunk_size,
            "cost": cost,
            "name": name,
            "transport": transport,
            "batch_bytes": batch_bytes,
        }
        self._maxsize = maxsize
        if getsizeof is not None:
            # As cachetools: an instance attribute, over the class's (or a subclass's) method.
            self.getsizeof = getsizeof
        # A subclass's own getsizeof is called as a method, each time (no cycle through a bound
        # method); the default, 1 per entry, is not called at all.
        method = getsizeof is None and type(self).getsizeof is not _count_one
        self._configure(cap, -1, getsizeof, method, memsize, notify or on_evict is not None)
        self._register(
            chunk_size=chunk_size,
            cost=cost,
            name=name or f"{type(self).__name__}-{id(self):x}",
            transport=transport,
            batch_bytes=batch_bytes,
            on_evict=on_evict,
        )
        # What a new cache makes for itself: copies and pickles carry only the other attributes.
        self._setup_names = frozenset(self.__dict__) | {"_setup_names"}

    # ---------------------------------------------------------------- copies and pickles

    def _blank(self: _Self_LRU, settings: dict[str, Any]) -> _Self_LRU:
        """A new, empty, separately registered cache of this type with these settings."""
        cls = type(self)
        new = cls.__new__(cls)
        new._setup(**settings)
        return new

    def _copy_state(self, new: ShrinkableLRU[K, V]) -> None:
        """Hook for subclasses: copy what they keep beside the entries (after the entries)."""

    def __copy__(self: _Self_LRU) -> _Self_LRU:
        # As cachetools: the attributes a subclass added are shared with the copy; the entries
        # (with their sizes, in their order) and the registration are its own.
        new = self._blank(self._settings)
        for key, value in self.__dict__.items():
            new.__dict__.setdefault(key, value)
        for key, value, size, nbytes in self._entries():
            new._put(key, value, size, nbytes)
        self._copy_state(new)
        return new

    def __deepcopy__(self: _Self_LRU, memo: dict[int, Any]) -> _Self_LRU:
        # The settings (sizers, on_evict, transport) are shared; the rest is copied deep.
        new = self._blank(self._deep_settings(memo))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in new.__dict__:
                new.__dict__[key] = copy.deepcopy(value, memo)
        entries = copy.deepcopy(self._entries(), memo)
        for key, value, size, nbytes in entries:
            new._put(key, value, size, nbytes)
        self._copy_state(new)
        return new

    def _deep_settings(self, memo: dict[int, Any]) -> dict[str, Any]:
        """The settings of a deep copy (hook: a TTL cache's timer is copied)."""
        return self._settings

    def __reduce__(self) -> tuple[Any, ...]:
        # A new registration where it is unpickled: the transport is that process's default.
        settings = dict(self._settings, transport=None)
        own = self._setup_names
        extra = {key: value for key, value in self.__dict__.items() if key not in own}
        return (_unpickle, (type(self), settings), self._state(extra))

    def _state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """What is pickled besides the settings (hook: a TTL cache adds its expiry times)."""
        return {"attrs": extra, "entries": self._entries()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state["attrs"])
        for key, value, size, nbytes in state["entries"]:
            self._put(key, value, size, nbytes)

    @property
    def maxsize(self) -> float | None:
        """The cap on ``currsize``, as given (None or ``math.inf``: none)."""
        return self._maxsize

    def stats(self) -> LRUStats:
        """Entries, bytes, chunks, hits and misses (of ``get`` and ``[]``), evictions."""
        return self._stats(len(self))

    def _view_items(self) -> list[tuple[K, V]]:
        """The pairs the views show (hook: a TTL cache leaves out the expired ones)."""
        return self._items()

    def _live(self, key: object) -> bool:
        """Whether an entry under key counts (hook: a TTL cache's expired ones do not)."""
        return True

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

    if TYPE_CHECKING:  # the C core's methods, typed for checkers; at run time they are C

        def __getitem__(self, key: K) -> V: ...
        def __setitem__(self, key: K, value: V) -> None: ...
        def __delitem__(self, key: K) -> None: ...
        def __iter__(self) -> Iterator[K]: ...
        def __len__(self) -> int: ...
        def __contains__(self, key: object) -> bool: ...
        def __missing__(self, key: K) -> V: ...
        def _entries(self) -> list[tuple[K, V, int, int]]: ...
        def _put(self, key: K, value: V, size: int, nbytes: int, /) -> None: ...
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


def _unpickle(cls: type[_Self_LRU], settings: dict[str, Any]) -> _Self_LRU:
    """A pickled cache, new and empty: ``__setstate__`` then puts the entries back."""
    new = cls.__new__(cls)
    new._setup(**settings)
    return new


_CACHETOOLS_PROBLEM = _join_cachetools()


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
        memsize: Callable[[R], int] | None,
        chunk_size: int,
        cost: float,
        name: str | None,
        transport: Transport | None,
        batch_bytes: int,
    ) -> None:
        if memsize is not None and not callable(memsize):
            raise TypeError(f"memsize must be callable, got {memsize!r}")
        # update_wrapper copies the wrapped function's __dict__ into ours: for a cached function
        # wrapped again, that is its own settings. Copy first, then set ours over them.
        functools.update_wrapper(self, user_function)
        self._maxsize = maxsize
        self._typed = bool(typed)
        self._configure(-1, -1 if maxsize is None else maxsize, None, False, memsize, False)
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

    # inspect shows them as functools' (C methods without annotations): "()".
    cache_info.__signature__ = cache_clear.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    )

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
    memsize: Callable[[Any], int] | None = ...,
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
    memsize: Callable[[Any], int] | None = None,
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

    In addition it is registered with the controller: results are reckoned in bytes with
    ``memsize`` (:func:`sys.getsizeof` by default) and reported as chunks of ``chunk_size``
    bytes, and a shrink request evicts least recently used results. ``@shrinkable_cache``
    without parentheses works too. The other arguments are :class:`ShrinkableLRU`'s.

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
            memsize=memsize,
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
            memsize=memsize,
            chunk_size=chunk_size,
            cost=cost,
            name=name,
            transport=transport,
            batch_bytes=batch_bytes,
        )

    return decorating


__all__ = [
    "CACHETOOLS_MIN_VERSION",
    "DEFAULT_CHUNK_SIZE",
    "TRIM_AFTER_BYTES",
    "CacheInfo",
    "LRUStats",
    "ShrinkableCachedFunction",
    "ShrinkableLRU",
    "shrinkable_cache",
]
