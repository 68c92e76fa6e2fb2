"""cgroup v2 ``memory.events``: a file the kernel marks modified when a counter moves.

The kernel side (Documentation/admin-guide/cgroup-v2.rst, mm/memcontrol.c):

* ``memory.events`` counts ``low``, ``high`` (tasks throttled over memory.high), ``max`` (usage
  hit memory.max), ``oom`` (reclaim at memory.max failed) and ``oom_kill`` (processes the OOM
  killer ended). Each change raises a "file modified" event that poll reports as POLLPRI (with
  POLLERR), and the file stays ready until read again.
* An event is counted in the group whose limit was hit, and in every ancestor: the counters of
  ``memory.events`` are hierarchical. ``oom_kill`` is counted in the victim's group.
  ``memory.events.local`` (Linux 5.2+) counts only the group's own: the file to watch on an
  ancestor whose limit binds us, since its ``memory.events`` also moves for our siblings.
* v2 has no usage threshold notification: between events, ``memory.current`` is read (about
  1 us with pread on a kept-open fd), adaptively (see :mod:`pyshrinker.policy`).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import os
import select

import attrs

from pyshrinker.cgroup import KernelFile

#: The counters that mean pressure, mildest first.
COUNTERS = ("high", "max", "oom", "oom_kill")


@attrs.define(eq=False)
class MemoryEventsWatcher:
    """Wakes when ``memory.events`` changes; ``consume`` says whether a pressure counter moved."""

    file: KernelFile
    last: dict[str, int]
    events: int = select.POLLPRI
    #: The counters that moved at the last :meth:`consume`.
    moved: frozenset[str] = frozenset()

    @classmethod
    def open(cls, cgroup_dir: str, local: bool = False) -> MemoryEventsWatcher:
        """Watch the v2 group at ``cgroup_dir``; ``local``: its own events only, where known."""
        name = "memory.events"
        if local and os.path.exists(os.path.join(cgroup_dir, "memory.events.local")):
            name = "memory.events.local"
        kept = KernelFile.open(os.path.join(cgroup_dir, name))
        return cls(kept, kept.read_keyed())

    def fileno(self) -> int:
        return self.file.fd

    def consume(self) -> bool:
        now = self.file.read_keyed()
        self.moved = frozenset(key for key in COUNTERS if now.get(key, 0) > self.last.get(key, 0))
        self.last = now
        return bool(self.moved)

    def describe(self) -> str:
        return f"cgroup v2 {os.path.basename(self.file.path)} ({os.path.dirname(self.file.path)})"

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> MemoryEventsWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
