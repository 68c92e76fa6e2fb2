"""What the Django and Flask example services share: their settings and the backend's values.

Both services answer ``GET /item/<key>`` with the key's value, from the framework's cache when
it is there (header ``X-Cache: hit``) and else from a simulated backend that generates
``VALUE_SIZE`` bytes (the same every time), then cached (``X-Cache: miss``). ``GET /stats``
answers with the serving worker's cache figures as JSON.

They read their settings from the environment, so one gunicorn command line runs any variant:

* ``PYSHRINKER_EXAMPLE_CACHE``: ``shrinkable`` (pyshrinker.contrib's backend, the default) or
  ``builtin`` (Django's ``LocMemCache``, cachelib's ``SimpleCache``);
* ``PYSHRINKER_EXAMPLE_MAX_ENTRIES``: ``MAX_ENTRIES`` (Django) or ``threshold`` (cachelib);
  unset, the shrinkable backends have none, and the built-in ones their default;
* ``PYSHRINKER_EXAMPLE_VALUE_SIZE``: bytes per value (64 KiB by default).
"""

from __future__ import annotations

import hashlib
import os

VALUE_SIZE = int(os.environ.get("PYSHRINKER_EXAMPLE_VALUE_SIZE", str(64 * 1024)))
CACHE_KIND = os.environ.get("PYSHRINKER_EXAMPLE_CACHE", "shrinkable")
_max = os.environ.get("PYSHRINKER_EXAMPLE_MAX_ENTRIES", "")
MAX_ENTRIES: int | None = int(_max) if _max else None

if CACHE_KIND not in ("shrinkable", "builtin"):
    raise SystemExit(f"PYSHRINKER_EXAMPLE_CACHE must be shrinkable or builtin, not {CACHE_KIND!r}")


def value_for(key: str, size: int = VALUE_SIZE) -> bytes:
    """The backend's value for ``key``: ``size`` bytes, the same every time, fresh each call."""
    seed = hashlib.blake2b(key.encode("utf-8"), digest_size=64).digest()
    return (seed * (size // len(seed) + 1))[:size]


def cache_figures(store: object) -> dict[str, object]:
    """Entries held, and for a ShrinkableLRU its counters (evictions on request...)."""
    figures: dict[str, object] = {"pid": os.getpid(), "cache": CACHE_KIND}
    try:
        figures["entries"] = len(store)  # type: ignore[arg-type]
    except TypeError:
        pass
    stats = getattr(store, "stats", None)
    if callable(stats):
        s = stats()
        figures.update(
            currsize=s.currsize,
            evicted_by_maxsize=s.evicted_by_maxsize,
            evicted_on_request=s.evicted_on_request,
        )
    return figures
