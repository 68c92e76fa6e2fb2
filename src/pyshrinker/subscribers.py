"""Ready-made level subscribers: what most services want to do on pressure, in one line.

* :func:`trim_on_pressure`: on ``medium`` pressure (or the level given) run a full garbage
  collection, then hand free heap memory back to the kernel with ``malloc_trim(0)``. glibc keeps
  freed memory in its heap until trimmed (see :mod:`pyshrinker.controller`), and pymalloc frees
  an arena only when it is empty, so collecting first gives the trim more to return.
* :func:`drop_on_oom`: on ``oom`` call ``.clear()`` on each cache given: when an OOM kill is
  near, a cold cache beats a dead process.

Both return the :class:`~pyshrinker.client.LevelSubscription`; ``close()`` it to stop. The
callbacks run on the listener thread and log what they did (at INFO and WARNING).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import gc
import logging
from typing import Protocol

from pyshrinker import _syscalls
from pyshrinker.abi import Level
from pyshrinker.client import LevelSubscription, subscribe_levels
from pyshrinker.transport import Transport

log = logging.getLogger(__name__)


class Clearable(Protocol):
    """Anything with a ``clear()`` method: a dict, a cache, a ChunkCache..."""

    def clear(self) -> object:
        """Drop every entry."""


def trim_on_pressure(
    level: Level | str = Level.MEDIUM, *, transport: Transport | None = None
) -> LevelSubscription:
    """On pressure at ``level`` or above: ``gc.collect()``, then ``malloc_trim(0)``.

    .. versionadded:: 0.1.0
    """

    def trim(heard: Level) -> None:
        collected = gc.collect()
        released = _syscalls.malloc_trim(0)
        log.info(
            "%s pressure: gc collected %d objects, malloc_trim %s",
            heard.label,
            collected,
            "returned memory to the kernel" if released else "had nothing to return",
        )

    return subscribe_levels(trim, level, transport=transport)


def drop_on_oom(*caches: Clearable, transport: Transport | None = None) -> LevelSubscription:
    """On ``oom`` pressure: ``cache.clear()`` for each of ``caches`` (held until closed).

    A cache whose ``clear()`` raises is logged and the others are still cleared.

    .. versionadded:: 0.1.0
    """
    held = tuple(caches)
    for cache in held:
        if not callable(getattr(cache, "clear", None)):
            raise TypeError(f"{cache!r} has no clear() method")

    def drop(heard: Level) -> None:
        cleared = 0
        for cache in held:
            try:
                cache.clear()
            except Exception:
                log.exception("%s pressure: clearing %r failed", heard.label, cache)
            else:
                cleared += 1
        log.warning("%s pressure: cleared %d of %d caches", heard.label, cleared, len(held))

    return subscribe_levels(drop, Level.OOM, transport=transport)


__all__ = ["Clearable", "drop_on_oom", "trim_on_pressure"]
