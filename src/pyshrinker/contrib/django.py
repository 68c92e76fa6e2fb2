"""A Django cache backend with the semantics of ``LocMemCache`` that gives memory back.

Use it as ``LocMemCache`` is used::

    CACHES = {
        "default": {
            "BACKEND": "pyshrinker.contrib.django.ShrinkableCache",
            "LOCATION": "pages",                  # caches of one LOCATION share a store
            "OPTIONS": {"MAX_ENTRIES": 10_000},   # optional: without it, memory alone bounds it
        }
    }

Entries are pickled, as ``LocMemCache`` stores them, and held in a
:class:`~pyshrinker.ShrinkableLRU` whose entry sizes are the pickles' lengths (plus
:data:`~pyshrinker.contrib.ENTRY_OVERHEAD`): the controller asks the store for memory back and
it evicts least recently used entries. Timeouts, versions, key prefixes and key functions,
``incr``/``decr``, ``touch``, ``get_many``/``set_many``, ``MAX_ENTRIES`` and ``CULL_FREQUENCY``
behave as ``LocMemCache``'s; docs/howto/django.md lists every difference and why.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any

import attrs

from pyshrinker.contrib import ENTRY_OVERHEAD, require_version

#: The oldest Django whose cache API (``make_and_validate_key``) this backend builds on.
MIN_DJANGO = (4, 2)

require_version("Django", MIN_DJANGO, __name__)

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache  # noqa: E402

from pyshrinker.lru import ShrinkableLRU  # noqa: E402


def _entry_size(pickled: bytes) -> int:
    # What the controller is told an entry holds: the pickle, and the key, node and expiry.
    return len(pickled) + ENTRY_OVERHEAD


@attrs.frozen(eq=False)
class _Store:
    """One LOCATION's entries, shared by every backend instance that names it.

    Django makes a backend instance per thread (and per ``caches[...]`` after a settings
    change); like ``LocMemCache``'s module-level dicts, the store is kept per LOCATION for
    the life of the process, so all of them see the same entries.
    """

    #: cache key -> pickled value, least recently used first.
    entries: ShrinkableLRU[str, bytes]
    #: cache key -> absolute expiry time (``time.time()``), or None for never.
    expire_info: dict[str, float | None]
    #: Serializes the backend's compound operations (look-up, then expiry check, then store).
    lock: threading.Lock


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


def _store(name: str) -> _Store:
    with _stores_lock:
        store = _stores.get(name)
        if store is None:
            expire_info: dict[str, float | None] = {}

            def forget_expiry(key: str, _pickled: bytes) -> None:
                # The controller evicted the entry: its expiry goes too. A plain dict pop is
                # atomic, so this takes no lock (it may run on a thread inside the backend's).
                expire_info.pop(key, None)

            entries: ShrinkableLRU[str, bytes] = ShrinkableLRU(
                memsize=_entry_size,
                on_evict=forget_expiry,
                name=f"django-cache:{name or 'default'}",
            )
            store = _Store(entries, expire_info, threading.Lock())
            _stores[name] = store
        return store


class ShrinkableCache(BaseCache):
    """Django's ``LocMemCache``, held in a :class:`~pyshrinker.ShrinkableLRU`.

    ``MAX_ENTRIES`` (with ``CULL_FREQUENCY``) caps the number of entries as in
    ``LocMemCache``, but is optional: unset, the store grows while memory is free and the
    controller's requests bound it. The store behind a LOCATION is shared by every instance
    naming it, for the life of the process (``close()``, which Django calls after each
    request, keeps it, as ``LocMemCache``'s).

    .. versionadded:: 0.1.0
    """

    pickle_protocol = pickle.HIGHEST_PROTOCOL

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        super().__init__(params)
        options = params.get("OPTIONS", {})
        self._max_entries: int | None
        if "max_entries" not in params and "MAX_ENTRIES" not in options:
            self._max_entries = None
        store = _store(name)
        # Attributes named as LocMemCache's, which Django's own tests share between instances.
        self._cache = store.entries
        self._expire_info = store.expire_info
        self._lock = store.lock

    # The entries' truth is self._cache: the controller may evict any entry at any moment
    # (its on_evict then drops the expiry), so every look-up tolerates a key found in one of
    # the two maps and not the other. An expiry is written before its entry, so an eviction
    # that follows the store always finds the expiry to drop.

    def _expired(self, key: str) -> bool:
        expiry = self._expire_info.get(key, -1)
        return expiry is not None and expiry <= time.time()

    def _live(self, key: str) -> bool:
        return key in self._cache and not self._expired(key)

    def _set(self, key: str, pickled: bytes, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        if self._max_entries is not None and len(self._cache) >= self._max_entries:
            self._cull()
        self._expire_info[key] = self.get_backend_timeout(timeout)
        self._cache[key] = pickled

    def _cull(self) -> None:
        if self._cull_frequency == 0:
            self._cache.clear()
            self._expire_info.clear()
            return
        for _ in range(len(self._cache) // self._cull_frequency):
            try:
                key, _pickled = self._cache.popitem()
            except KeyError:  # the controller emptied the store meanwhile
                break
            self._expire_info.pop(key, None)

    def _delete(self, key: str) -> bool:
        found = self._cache.pop(key, None) is not None
        self._expire_info.pop(key, None)
        return found

    def add(
        self, key: str, value: Any, timeout: float | None = DEFAULT_TIMEOUT, version: Any = None
    ) -> bool:
        key = self.make_and_validate_key(key, version=version)
        pickled = pickle.dumps(value, self.pickle_protocol)
        with self._lock:
            if self._live(key):
                return False
            self._set(key, pickled, timeout)
            return True

    def get(self, key: str, default: Any = None, version: Any = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        with self._lock:
            pickled = self._cache.get(key)  # marks it most recently used
            if pickled is None or self._expired(key):
                self._delete(key)
                return default
        return pickle.loads(pickled)

    def set(
        self, key: str, value: Any, timeout: float | None = DEFAULT_TIMEOUT, version: Any = None
    ) -> None:
        key = self.make_and_validate_key(key, version=version)
        pickled = pickle.dumps(value, self.pickle_protocol)
        with self._lock:
            self._set(key, pickled, timeout)

    def touch(self, key: str, timeout: float | None = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        with self._lock:
            if not self._live(key):
                return False
            self._expire_info[key] = self.get_backend_timeout(timeout)
            if key not in self._cache:  # evicted meanwhile: do not leave its expiry behind
                self._expire_info.pop(key, None)
                return False
            return True

    def incr(self, key: str, delta: int = 1, version: Any = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        with self._lock:
            pickled = self._cache.get(key)
            if pickled is None or self._expired(key):
                self._delete(key)
                raise ValueError(f"Key '{key}' not found")
            new_value = pickle.loads(pickled) + delta
            # The expiry stays as it was (as memcached, and LocMemCache, do).
            self._cache[key] = pickle.dumps(new_value, self.pickle_protocol)
        return new_value

    def has_key(self, key: str, version: Any = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        with self._lock:
            if self._live(key):
                return True
            self._delete(key)
            return False

    def delete(self, key: str, version: Any = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        with self._lock:
            return self._delete(key)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._expire_info.clear()


__all__ = ["MIN_DJANGO", "ShrinkableCache"]
