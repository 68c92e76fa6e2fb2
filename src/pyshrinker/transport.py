"""How a client's registrations and reports reach a controller.

Every transport carries the same four things the mempressure ABI carries: register an eventfd
with a chunk size (and cost), report ``+N``/``-N`` chunks, register an eventfd for a level, and
unregister. Requests always come back the same way: a number on the client's eventfd.

* :class:`EmbeddedTransport` (the default) hands them to a
  :class:`~pyshrinker.controller.Controller` in this process: no files, no daemon, no setup.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from typing import Protocol

import attrs

from pyshrinker.abi import Level
from pyshrinker.controller import Controller, default_controller


class Transport(Protocol):
    """The client's side of the mempressure ABI."""

    def register(self, efd: int, chunk_size: int, cost: float) -> None:
        """``"<efd> <shrinker fd> <chunk size> [cost]"`` to ``cgroup.event_control``."""

    def report(self, efd: int, chunks: int) -> None:
        """``"<efd> <N>"`` to ``mempressure.shrinker``."""

    def register_level(self, efd: int, level: Level) -> None:
        """``"<efd> <level fd> <level>"`` to ``cgroup.event_control``."""

    def unregister(self, efd: int) -> None:
        """Stop requests or level events to ``efd`` (the file ABI does it on close)."""


@attrs.define(eq=False)
class EmbeddedTransport:
    """Talks to a controller in this process; keys registrations by eventfd number."""

    controller: Controller

    @classmethod
    def default(cls) -> EmbeddedTransport:
        """The transport to the process's embedded controller (started on first use)."""
        return cls(default_controller())

    def register(self, efd: int, chunk_size: int, cost: float) -> None:
        self.controller.register(efd, efd, chunk_size, cost)

    def report(self, efd: int, chunks: int) -> None:
        self.controller.report(efd, chunks)

    def register_level(self, efd: int, level: Level) -> None:
        self.controller.register_level(efd, efd, level)

    def unregister(self, efd: int) -> None:
        self.controller.unregister(efd)
