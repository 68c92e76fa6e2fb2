"""Where memory pressure comes from: one small module per kernel facility.

Each notifier owns a file descriptor that a controller polls (``fileno()`` and ``events``, a
poll/epoll mask) and a ``consume()`` that reads what happened. None of them decides anything:
that is :mod:`pyshrinker.policy`'s and :mod:`pyshrinker.controller`'s job.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from typing import Protocol


class Notifier(Protocol):
    """A pollable source of memory events."""

    #: The poll/epoll mask to wait for (POLLIN or POLLPRI).
    events: int

    def fileno(self) -> int:
        """The fd to poll."""

    def consume(self) -> bool:
        """Read the event; False when it turned out to be nothing (spurious wake-up)."""

    def describe(self) -> str:
        """One line saying what this notifier watches."""

    def close(self) -> None:
        """Stop watching; safe to call twice."""
