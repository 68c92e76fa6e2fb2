"""Locks held across ``fork()``, so that a child never inherits one locked by a thread it lacks.

``fork()`` copies only the calling thread. A lock another thread held at that moment stays
locked in the child forever, and the state it guarded may be half-updated. CPython renews its
own locks in the child (``os.register_at_fork``); pyshrinker does the same for its objects:

* before the fork, the forking thread acquires each tracked object's locks (they guard a few
  assignments or a dict operation, never a wait on the forking thread, so this takes
  microseconds), so the child copies the state whole;
* after it, the parent releases them, and the child gives each object fresh locks and lets it
  renew what belongs to the parent (threads, eventfd registrations).

A lock that cannot be had within :data:`ACQUIRE_TIMEOUT` (its holder is stuck in user code) is
renewed in the child all the same, and a warning says which object it was.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Protocol

log = logging.getLogger(__name__)

#: Seconds the forking thread waits for one lock before giving up on holding it.
ACQUIRE_TIMEOUT = 2.0


class ForkAware(Protocol):
    """An object whose locks are held across fork and renewed in the child."""

    def _fork_locks(self) -> list[threading.Lock | threading.RLock]:
        """The locks to hold across fork, in the order to take them."""

    def _after_fork_in_child(self) -> None:
        """In the child: take fresh locks (the old ones may be held) and renew the rest."""


#: Ranks: locks are taken in rank order, the order in which a thread nests them (a cache's lock
#: is held while its shrinker's is taken, never the other way round).
CACHE = 0
SHRINKER = 1

_tracked: weakref.WeakKeyDictionary[ForkAware, int] = weakref.WeakKeyDictionary()
_tracked_lock = threading.Lock()
_held: list[threading.Lock | threading.RLock] = []


def track(obj: ForkAware, rank: int) -> None:
    """Hold ``obj``'s locks across every fork from now on (for as long as it lives)."""
    with _tracked_lock:
        _tracked[obj] = rank


def untrack(obj: ForkAware) -> None:
    """Stop holding ``obj``'s locks across fork (it was closed)."""
    with _tracked_lock:
        _tracked.pop(obj, None)


def _in_rank_order() -> list[ForkAware]:
    return [obj for obj, _rank in sorted(_tracked.items(), key=lambda pair: pair[1])]


def _before() -> None:
    _tracked_lock.acquire()
    for obj in _in_rank_order():
        for lock in obj._fork_locks():
            if lock.acquire(timeout=ACQUIRE_TIMEOUT):
                _held.append(lock)
            else:
                log.warning("fork: a lock of %r is held too long; the child renews it", obj)


def _after_in_parent() -> None:
    while _held:
        _held.pop().release()
    _tracked_lock.release()


def _after_in_child() -> None:
    global _tracked_lock
    _held.clear()
    _tracked_lock = threading.Lock()
    for obj in _in_rank_order():
        try:
            obj._after_fork_in_child()
        except Exception:
            log.exception("fork: renewing %r in the child failed", obj)


os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
