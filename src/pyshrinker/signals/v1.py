"""cgroup v1 memory notifications, registered through ``cgroup.event_control``.

The kernel side (Documentation/admin-guide/cgroup-v1/memory.rst, mm/memcontrol-v1.c):

* Writing ``"<efd> <fd of memory.usage_in_bytes> <bytes>"`` signals the eventfd each time usage
  crosses that value, up or down. The check runs every 128 page events per CPU, so it fires
  within about half a MiB of the crossing (measured: well under a millisecond).
* ``"<efd> <fd of memory.pressure_level> <low|medium|critical>[,<default|hierarchy|local>]"``:
  vmpressure levels over 512-page windows (medium at 60 % of scanned pages not reclaimed,
  critical at 95 %). Without swap they come late for anonymous memory, so they only add to
  usage thresholds.
* ``"<efd> <fd of memory.oom_control>"`` signals on OOM in the group.
* Closing the eventfd unregisters; removing the group signals every registered eventfd once,
  after which reads of the group's files fail with ENODEV.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import enum
import os
import select

import attrs

from pyshrinker._syscalls import EventfdFlag, eventfd, eventfd_read
from pyshrinker.cgroup import translated_errors


class V1Level(enum.Enum):
    """The levels ``memory.pressure_level`` knows."""

    LOW = "low"
    MEDIUM = "medium"
    CRITICAL = "critical"


class V1Mode(enum.Enum):
    """How a v1 pressure event propagates through the hierarchy."""

    #: Hear this group's events and its descendants' unless a descendant handled them.
    DEFAULT = "default"
    #: Hear this group's and all descendants' events.
    HIERARCHY = "hierarchy"
    #: Hear only this group's own events.
    LOCAL = "local"


def register_event(cgroup_dir: str, target: str, args: str = "") -> tuple[int, int]:
    """Register a new non-blocking eventfd for ``target``; return (eventfd, target fd)."""
    efd = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
    target_fd = control_fd = -1
    target_path = os.path.join(cgroup_dir, target)
    control_path = os.path.join(cgroup_dir, "cgroup.event_control")
    try:
        with translated_errors(target_path):
            target_fd = os.open(target_path, os.O_RDONLY | os.O_CLOEXEC)
        with translated_errors(control_path):
            control_fd = os.open(control_path, os.O_WRONLY | os.O_CLOEXEC)
            os.write(control_fd, f"{efd} {target_fd} {args}".strip().encode("ascii"))
    except BaseException:
        os.close(efd)
        if target_fd >= 0:
            os.close(target_fd)
        raise
    finally:
        if control_fd >= 0:
            os.close(control_fd)
    return efd, target_fd


@attrs.define(eq=False)
class _EventfdNotifier:
    """An eventfd registered with a v1 group; ``consume`` drains it."""

    cgroup_dir: str
    efd: int
    target_fd: int
    events: int = select.POLLIN

    def fileno(self) -> int:
        return self.efd

    def consume(self) -> bool:
        try:
            return eventfd_read(self.efd) > 0
        except BlockingIOError:
            return False

    def close(self) -> None:
        if self.efd >= 0:
            os.close(self.efd)
            os.close(self.target_fd)
            self.efd = self.target_fd = -1

    def __enter__(self) -> _EventfdNotifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@attrs.define(eq=False)
class UsageThreshold(_EventfdNotifier):
    """Signalled each time the group's usage crosses ``threshold`` bytes, either way."""

    threshold: int = 0

    @classmethod
    def register(cls, cgroup_dir: str, threshold: int) -> UsageThreshold:
        """Register a usage threshold on the v1 group at ``cgroup_dir``."""
        if threshold <= 0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        efd, target = register_event(cgroup_dir, "memory.usage_in_bytes", str(threshold))
        return cls(cgroup_dir, efd, target, threshold=threshold)

    def describe(self) -> str:
        return f"cgroup v1 usage threshold at {self.threshold} bytes ({self.cgroup_dir})"


@attrs.define(eq=False)
class PressureLevel(_EventfdNotifier):
    """Signalled on the group's vmpressure ``level`` (heard with the chosen ``mode``)."""

    level: V1Level = V1Level.LOW
    mode: V1Mode = V1Mode.DEFAULT

    @classmethod
    def register(
        cls, cgroup_dir: str, level: V1Level, mode: V1Mode = V1Mode.DEFAULT
    ) -> PressureLevel:
        """Register for ``level`` on the v1 group at ``cgroup_dir``."""
        efd, target = register_event(
            cgroup_dir, "memory.pressure_level", f"{level.value},{mode.value}"
        )
        return cls(cgroup_dir, efd, target, level=level, mode=mode)

    def describe(self) -> str:
        return f"cgroup v1 pressure level {self.level.value} ({self.mode.value}, {self.cgroup_dir})"


@attrs.define(eq=False)
class OomNotifier(_EventfdNotifier):
    """Signalled when the group hits OOM."""

    @classmethod
    def register(cls, cgroup_dir: str) -> OomNotifier:
        """Register for OOM notifications on the v1 group at ``cgroup_dir``."""
        efd, target = register_event(cgroup_dir, "memory.oom_control")
        return cls(cgroup_dir, efd, target)

    def describe(self) -> str:
        return f"cgroup v1 OOM notification ({self.cgroup_dir})"
