"""cgroup v2 ``memory.events``: a file the kernel marks modified when a counter moves.

The kernel side (Documentation/admin-guide/cgroup-v2.rst): ``memory.events`` counts ``low``,
``high`` (throttled over memory.high), ``max`` (hit memory.max), ``oom`` and ``oom_kill``. Each
change raises a "file modified" event that poll reports as POLLPRI (with POLLERR). v2 has no
usage threshold notification: between events, ``memory.current`` is read (about 1 us with pread
on a kept-open fd), adaptively (see :mod:`pyshrinker.policy`).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import os
import select

import attrs

from pyshrinker.cgroup import KernelFile


@attrs.define(eq=False)
class MemoryEventsWatcher:
    """Wakes when ``memory.events`` changes; ``consume`` says whether high/max/oom moved."""

    file: KernelFile
    last: dict[str, int]
    events: int = select.POLLPRI

    @classmethod
    def open(cls, cgroup_dir: str) -> MemoryEventsWatcher:
        """Watch the v2 group at ``cgroup_dir``."""
        kept = KernelFile.open(os.path.join(cgroup_dir, "memory.events"))
        return cls(kept, kept.read_keyed())

    def fileno(self) -> int:
        return self.file.fd

    def consume(self) -> bool:
        now = self.file.read_keyed()
        moved = any(now.get(key, 0) > self.last.get(key, 0) for key in ("high", "max", "oom"))
        self.last = now
        return moved

    def describe(self) -> str:
        return f"cgroup v2 memory.events ({os.path.dirname(self.file.path)})"

    def close(self) -> None:
        self.file.close()
