"""Drop-in cache backends for web frameworks, built on :class:`~pyshrinker.ShrinkableLRU`.

* :mod:`pyshrinker.contrib.django`: ``ShrinkableCache``, a Django cache backend with the
  semantics of ``LocMemCache`` (``pip install 'pyshrinker[django]'``);
* :mod:`pyshrinker.contrib.cachelib`: ``ShrinkableSimpleCache``, a ``cachelib.BaseCache`` with
  the semantics of ``cachelib.SimpleCache``, usable as a Flask-Caching backend
  (``pip install 'pyshrinker[flask]'``).

The frameworks are optional: each module imports its framework, and refuses (with
:class:`~pyshrinker.errors.FrameworkVersionError`) a version older than it supports.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import sys
from importlib import metadata

from pyshrinker.errors import FrameworkVersionError

#: Bytes counted per entry on top of its serialized value: the key, the LRU's node, the
#: expiry and the tuple or dict slot holding it (about what CPython spends on them).
ENTRY_OVERHEAD = 200


def require_version(distribution: str, minimum: tuple[int, ...], module: str) -> None:
    """Raise :class:`FrameworkVersionError` unless ``distribution`` is at least ``minimum``."""
    try:
        found = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        # Imported from a source tree, without metadata: its own import worked, trust it.
        return
    parts: list[int] = []
    for part in found.split(".")[: len(minimum)]:
        digits = "".join(ch for ch in part if ch.isdigit()) or "0"
        parts.append(int(digits))
    if tuple(parts) < minimum:
        needed = ".".join(map(str, minimum))
        raise FrameworkVersionError(
            f"{module} needs {distribution} >= {needed}, but {distribution} {found} is installed"
            f" (pip install '{distribution}>={needed}')"
        )


def serialized_size(data: object) -> int:
    """Bytes a serialized value holds: ``len`` of bytes or str, else its ``sys.getsizeof``."""
    if isinstance(data, (bytes, bytearray, str)):
        return len(data)
    if data is None:
        return 0
    return sys.getsizeof(data)


__all__ = ["ENTRY_OVERHEAD", "require_version", "serialized_size"]
