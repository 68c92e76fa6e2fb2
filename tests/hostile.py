"""Hostile keys, values and sizers: Python code that runs inside the caches' operations.

A key's ``__hash__`` and ``__eq__``, a value's ``__del__``, the sizer, a cached function's body and
``on_evict`` each *visit* the one :data:`trap`. Armed, the trap runs an action (raise, or use the
cache: store, delete, clear, a shrink request...) at the n-th visit of the sites it watches, once,
and records where it fired, so that a test (or the fuzz's reference model) knows at which point
of the operation the action ran.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Any

#: Where Python code runs inside a cache operation.
SITES = ("hash", "eq", "sizeof", "call", "on_evict", "del")


class Boom(Exception):
    """What a trap that raises raises."""


class Trap:
    """One-shot Python code run at the ``countdown``-th visit of one of ``sites``."""

    def __init__(self) -> None:
        self._main = threading.get_ident()
        self.sites: frozenset[str] = frozenset()
        self.countdown = 0
        self.action: Callable[[], object] | None = None
        #: The sites visited since arming.
        self.visits: list[str] = []
        #: The site it fired at, and how many sites had been visited before it.
        self.fired: tuple[str, int] | None = None

    def arm(self, sites: Collection[str], countdown: int, action: Callable[[], object]) -> None:
        """Run ``action`` at the visit ``countdown`` (0: the first) of any of ``sites``."""
        self.sites = frozenset(sites)
        self.countdown = countdown
        self.action = action
        self.visits = []
        self.fired = None

    def disarm(self) -> None:
        """Stop watching; what fired stays recorded."""
        self.action = None

    def visit(self, site: str) -> None:
        """Called by the hostile objects: fire if armed for this site and its turn has come."""
        action = self.action
        if action is None or threading.get_ident() != self._main:
            return
        self.visits.append(site)
        if site not in self.sites:
            return
        if self.countdown > 0:
            self.countdown -= 1
            return
        self.action = None
        self.fired = (site, len(self.visits) - 1)
        action()


#: The trap every hostile object visits.
trap = Trap()


class HKey:
    """A key equal to another HKey of the same label; hashed by label, or all alike (colliding)."""

    __slots__ = ("collide", "label")

    def __init__(self, label: int, collide: bool = False) -> None:
        self.label = label
        self.collide = collide

    def __hash__(self) -> int:
        trap.visit("hash")
        return 42 if self.collide else hash(self.label)

    def __eq__(self, other: object) -> bool:
        trap.visit("eq")
        return isinstance(other, HKey) and other.label == self.label

    def __repr__(self) -> str:
        return f"HKey({self.label}{', collide=True' if self.collide else ''})"


class HValue:
    """A value with a label and a size (see :func:`hsize`); its ``__del__`` visits the trap."""

    __slots__ = ("__weakref__", "label", "size")

    def __init__(self, label: int, size: int = 1) -> None:
        self.label = label
        self.size = size

    def __del__(self) -> None:
        trap.visit("del")

    def __repr__(self) -> str:
        return f"HValue({self.label}, size={self.size})"


def hsize(value: Any) -> int:
    """A getsizeof: the value's ``size`` (1 for other values); visits the trap."""
    trap.visit("sizeof")
    return getattr(value, "size", 1)


def raiser(message: str = "trap") -> Callable[[], object]:
    """An action that raises :class:`Boom`."""

    def boom() -> None:
        raise Boom(message)

    return boom


def quietly(action: Callable[[], object]) -> Callable[[], object]:
    """An action whose own errors (a KeyError from a reentrant delete...) are swallowed."""

    def run() -> None:
        try:
            action()
        except Exception:
            pass

    return run
