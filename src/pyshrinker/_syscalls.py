"""Thin Python face of the compiled ``_native`` module.

The one place where C results become Python values and :class:`OSError`. Only eventfd reads
and writes can see ``EINTR`` from a signal: ``_eventfd_fast`` retries them, after running the
signal handlers.
Public modules import these functions, never ``ffi``/``lib``.

Reading and writing an eventfd go through ``_eventfd_fast`` instead of cffi: cffi releases the
GIL around every call, and on a non-blocking eventfd (which never waits) that only lets a busy
thread take the GIL for a switch interval (5 ms) before the caller gets it back.
"""

from __future__ import annotations

import enum
import os

from pyshrinker import _eventfd_fast
from pyshrinker._native import lib

#: The largest value an eventfd counter can hold (the kernel refuses 2**64 - 1).
EVENTFD_MAX = 2**64 - 2


class EventfdFlag(enum.IntFlag):
    """Flags of ``eventfd(2)``."""

    #: Close the fd on exec, so children never hold our eventfds.
    CLOEXEC = lib.PYS_EFD_CLOEXEC
    #: ``read`` on a zero counter fails with EAGAIN instead of blocking.
    NONBLOCK = lib.PYS_EFD_NONBLOCK
    #: Each ``read`` returns 1 and decrements, instead of returning and zeroing.
    SEMAPHORE = lib.PYS_EFD_SEMAPHORE


def _check(result: int, what: str) -> int:
    if result < 0:
        code = -result
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def eventfd(initval: int = 0, flags: int = EventfdFlag.CLOEXEC) -> int:
    """Create an eventfd and return its file descriptor."""
    return _check(lib.pys_eventfd(initval, flags), "eventfd")


def eventfd_read(fd: int) -> int:
    """Read (and reset) an eventfd's counter; raises BlockingIOError if non-blocking and zero.

    On a non-blocking fd the GIL is kept (the read cannot wait); on a blocking one it is
    released while the read waits.
    """
    return _eventfd_fast.read(fd)


def eventfd_drain(fd: int) -> int:
    """Read (and reset) a non-blocking eventfd's counter; 0 if nothing was signalled."""
    try:
        return eventfd_read(fd)
    except BlockingIOError:
        return 0


def eventfd_write(fd: int, value: int) -> None:
    """Add ``value`` (1 .. 2**64-2) to an eventfd's counter."""
    if not 0 < value <= EVENTFD_MAX:
        raise ValueError(f"eventfd value must be in 1..{EVENTFD_MAX}, got {value}")
    _eventfd_fast.write(fd, value)


#: The signal :func:`eventfd_write_within` interrupts its own wait with (handler: do nothing).
DEADLINE_SIGNAL: int = lib.pys_deadline_signal()


def eventfd_write_within(fd: int, value: int, timeout: float) -> None:
    """Add ``value`` like :func:`eventfd_write`, waiting at most ``timeout`` seconds (< 1).

    A write waits while the counter cannot take ``value``. This one gives up with
    :class:`BlockingIOError` after ``timeout``, without touching the fd's flags, which a
    duplicated fd shares with its owner. On first use it installs a do-nothing handler for
    :data:`DEADLINE_SIGNAL`, delivered to the writing thread only while it writes.
    """
    if not 0 < value <= EVENTFD_MAX:
        raise ValueError(f"eventfd value must be in 1..{EVENTFD_MAX}, got {value}")
    if not 0 < timeout < 1:
        raise ValueError(f"timeout must be in (0, 1) seconds, got {timeout}")
    _check(lib.pys_eventfd_write_within(fd, value, int(timeout * 1e9)), "eventfd write")


def pidfd_open(pid: int) -> int:
    """Return a pidfd for ``pid``: it polls readable when the process exits."""
    return _check(lib.pys_pidfd_open(pid, 0), f"pidfd_open({pid})")


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Duplicate file descriptor ``targetfd`` of the process behind ``pidfd`` into this one."""
    return _check(lib.pys_pidfd_getfd(pidfd, targetfd, 0), f"pidfd_getfd({targetfd})")


def malloc_trim(pad: int = 0) -> bool:
    """Return free heap memory to the kernel; True if any was released."""
    return bool(lib.pys_malloc_trim(pad))


def is_eventfd(fd: int) -> bool:
    """Tell whether ``fd`` is an eventfd (its /proc link names ``anon_inode:[eventfd]``)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False
