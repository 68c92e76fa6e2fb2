"""The exceptions pyshrinker raises.

Everything derives from :class:`PyshrinkerError`. Where a builtin exception already says the
same thing, the subclass also derives from it, so ``except FileNotFoundError`` keeps working.

.. versionadded:: 0.1.0
"""

from __future__ import annotations


class PyshrinkerError(Exception):
    """Root of every exception pyshrinker raises."""


class CgroupError(PyshrinkerError):
    """A memory cgroup could not be found, read or used."""


class CgroupNotFound(CgroupError, FileNotFoundError):
    """The cgroup (or one of its files) does not exist, or was removed."""


class CgroupPermissionError(CgroupError, PermissionError):
    """The cgroup exists, but this process may not read or write it."""


class MalformedFile(CgroupError, ValueError):
    """A kernel file held something pyshrinker could not parse."""


class UnsupportedError(PyshrinkerError, OSError):
    """The kernel or machine lacks a feature (PSI, a cgroup controller, FUSE...)."""


class AbiError(PyshrinkerError, ValueError):
    """A line of the mempressure ABI was malformed, or named an unknown registration."""


class ClosedError(PyshrinkerError, RuntimeError):
    """The object was used after ``close()``."""


class DependencyVersionError(PyshrinkerError, ImportError):
    """An optional dependency is installed in a version older than pyshrinker supports."""


class TransportError(PyshrinkerError, OSError):
    """A controller directory refused a line or could not be used; ``errno`` says why.

    .. versionadded:: 0.1.0
    """


class TransportPermissionError(TransportError, PermissionError):
    """The controller refused this process (EACCES, EPERM): not in its allowed users.

    .. versionadded:: 0.1.0
    """


class ControllerNotFound(TransportError, FileNotFoundError):
    """The controller directory (or one of its files) does not exist.

    .. versionadded:: 0.1.0
    """


class ControllerGone(TransportError, ConnectionError):
    """The controller behind the directory went away (ENOTCONN: its daemon died).

    .. versionadded:: 0.1.0
    """


class ControllerFull(TransportError):
    """The controller has no room for another registration (ENOSPC: its table is full).

    Nothing is wrong with the caller: a client that can do without this controller (a cache
    whose controller was chosen for it) should fall back to the embedded controller, and may
    try again later.

    .. versionadded:: 0.1.0
    """


class FrameworkVersionError(PyshrinkerError, ImportError):
    """An optional framework (Django, cachelib) is installed, but older than pyshrinker supports.

    .. versionadded:: 0.1.0
    """
