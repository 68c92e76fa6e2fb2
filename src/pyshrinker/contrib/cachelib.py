"""A ``cachelib.BaseCache`` with the semantics of ``cachelib.SimpleCache`` that gives memory back.

Use it where ``SimpleCache`` is used::

    from pyshrinker.contrib.cachelib import ShrinkableSimpleCache
    cache = ShrinkableSimpleCache()                  # no threshold: memory alone bounds it
    cache = ShrinkableSimpleCache(threshold=10_000)  # ...and never more than ~10,000 entries

or as a Flask-Caching backend::

    app.config["CACHE_TYPE"] = "pyshrinker.contrib.cachelib.ShrinkableSimpleCache"
    app.config["CACHE_OPTIONS"] = {"threshold": 10_000}   # optional

Entries are ``(expires, serialized value)``, as ``SimpleCache`` holds them, in a
:class:`~pyshrinker.ShrinkableLRU` whose entry sizes are the serialized values' lengths (plus
:data:`~pyshrinker.contrib.ENTRY_OVERHEAD`): the controller asks the cache for memory back and
it evicts least recently used entries. docs/howto/flask.md lists every difference from
``SimpleCache`` and why.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from time import time
from typing import Any

from pyshrinker.contrib import ENTRY_OVERHEAD, require_version, serialized_size

#: The oldest cachelib whose ``BaseCache`` (``ignore_delete_many_errors``) this class builds on.
MIN_CACHELIB = (0, 16)

require_version("cachelib", MIN_CACHELIB, __name__)

from cachelib.base import BaseCache  # noqa: E402
from cachelib.serializers import SimpleSerializer  # noqa: E402

from pyshrinker.lru import ShrinkableLRU  # noqa: E402

#: The threshold ``SimpleCache`` uses when given 0.
ZERO_THRESHOLD = 500

_Entry = tuple[int, Any]


def _entry_size(entry: _Entry) -> int:
    return serialized_size(entry[1]) + ENTRY_OVERHEAD


class ShrinkableSimpleCache(BaseCache):
    """cachelib's ``SimpleCache``, held in a :class:`~pyshrinker.ShrinkableLRU`.

    ``threshold`` caps the number of entries as ``SimpleCache``'s does (0 means 500, as
    there), but is optional: None, the default, leaves the size to memory pressure. Past the
    threshold, expired entries go first, then the least recently used. All operations are
    protected by a :class:`threading.RLock`, as ``SimpleCache``'s are. The cache unregisters
    from the controller when it is garbage collected, or on :meth:`close`.

    .. versionadded:: 0.1.0
    """

    serializer = SimpleSerializer()

    def __init__(
        self,
        threshold: int | None = None,
        default_timeout: int | dt.timedelta = 300,
        ignore_delete_many_errors: bool = True,
        *,
        name: str | None = None,
    ) -> None:
        BaseCache.__init__(
            self, default_timeout, ignore_delete_many_errors=ignore_delete_many_errors
        )
        self._cache: ShrinkableLRU[str, _Entry] = ShrinkableLRU(
            memsize=_entry_size, name=name or f"cachelib-{id(self):x}"
        )
        self._threshold: int | None = None if threshold is None else threshold or ZERO_THRESHOLD
        self._lock = threading.RLock()
        # No entry expires before this time (a lower bound: entries deleted or overwritten
        # since only make it earlier than need be), so pruning skips the scan for expired
        # entries until it has passed.
        self._earliest_expiry = math.inf

    def close(self) -> None:
        """Drop every entry and unregister from the controller; idempotent."""
        self._cache.close()

    def _over_threshold(self) -> bool:
        return self._threshold is not None and len(self._cache) > self._threshold

    def _remove_expired(self, now: float) -> None:
        earliest = math.inf
        for key, (expires, _value) in list(self._cache.items()):
            if expires == 0:  # never expires
                continue
            if expires < now:
                self._cache.pop(key, None)
            else:
                earliest = min(earliest, expires)
        self._earliest_expiry = earliest

    def _prune(self) -> None:
        if not self._over_threshold():
            return
        now = time()
        if now > self._earliest_expiry:
            self._remove_expired(now)
        while self._over_threshold():
            try:
                self._cache.popitem()  # the least recently used
            except KeyError:  # the controller emptied the cache meanwhile
                break

    def _normalize_timeout(self, timeout: int | dt.timedelta | None) -> int:
        normalized: int = BaseCache._normalize_timeout(self, timeout)
        if normalized > 0:
            normalized = int(time()) + normalized
        return normalized

    def _store(self, key: str, expires: int, serialized: Any) -> None:
        if expires != 0:
            self._earliest_expiry = min(self._earliest_expiry, expires)
        self._cache[key] = (expires, serialized)

    def get(self, key: str) -> Any:
        with self._lock:
            entry = self._cache.get(key)  # marks it most recently used
            if entry is None:
                return None
            expires, value = entry
            if expires == 0 or expires > time():
                return self.serializer.loads(value)
            return None

    def set(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        with self._lock:
            expires = self._normalize_timeout(timeout)
            self._prune()
            self._store(key, expires, self.serializer.dumps(value))
            return True

    def add(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        with self._lock:
            expires = self._normalize_timeout(timeout)
            self._prune()
            serialized = self.serializer.dumps(value)
            if self.has(key):
                return False
            self._store(key, expires, serialized)
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._cache.pop(key, None) is not None

    def has(self, key: str) -> bool:
        with self._lock:
            if key not in self._cache:
                return False
            entry = self._cache.get(key)
            if entry is None:  # evicted by the controller meanwhile
                return False
            expires = entry[0]
            return bool(expires == 0 or expires > time())

    def clear(self) -> bool:
        with self._lock:
            self._cache.clear()
            self._earliest_expiry = math.inf
            return not bool(self._cache)

    def inc(self, key: str, delta: int = 1) -> int | None:
        with self._lock:
            result: int | None = super().inc(key, delta)
            return result

    def dec(self, key: str, delta: int = 1) -> int | None:
        with self._lock:
            result: int | None = super().dec(key, delta)
            return result


__all__ = ["MIN_CACHELIB", "ShrinkableSimpleCache"]
