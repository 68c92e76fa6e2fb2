"""How a client's registrations and reports reach a controller.

Every transport carries the same four things the mempressure ABI carries: register an eventfd
with a chunk size (and cost), report ``+N``/``-N`` chunks, register an eventfd for a level, and
unregister. Requests always come back the same way: a number on the client's eventfd.

* :class:`EmbeddedTransport` (the default) hands them to a
  :class:`~pyshrinker.controller.Controller` in this process: no files, no daemon, no setup.
* :class:`FilesTransport` writes the ABI's lines to a controller directory: a kernel carrying
  the proposal, or ``pyshrinkerd`` (:mod:`pyshrinker.daemon`) serving the same files over FUSE.
  Chosen with ``transport=FilesTransport.open(directory)``, or for every shrinker of the process
  by naming the directory in :envvar:`PYSHRINKER_CONTROLLER_DIR`.

The file ABI has no unregistration: the proposed kernel forgot an eventfd when its last copy
was closed. A daemon cannot see that (it holds a duplicate of the eventfd, so the eventfd never
closes while registered), so pyshrinker adds one line, ``"<efd> -"`` written to
``cgroup.event_control``, and pyshrinkerd also forgets all of a process's registrations when it
exits.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Protocol

import attrs

from pyshrinker.abi import (
    EVENT_CONTROL,
    LEVEL_FILE,
    SHRINKER_FILE,
    Level,
    format_register,
    format_register_level,
    format_report,
)
from pyshrinker.controller import Controller, default_controller
from pyshrinker.errors import (
    AbiError,
    ClosedError,
    ControllerFull,
    ControllerGone,
    ControllerNotFound,
    PyshrinkerError,
    TransportError,
    TransportPermissionError,
)

log = logging.getLogger(__name__)

#: The environment variable naming a controller directory for every shrinker of the process.
CONTROLLER_DIR_ENV = "PYSHRINKER_CONTROLLER_DIR"

#: The second field of pyshrinker's unregistration line, ``"<efd> -"`` (not in the 2013 ABI).
UNREGISTER_FIELD = "-"


def format_unregister(efd: int) -> bytes:
    """The unregistration line, a pyshrinker extension: ``"<efd> -\\n"``."""
    return f"{efd} {UNREGISTER_FIELD}\n".encode("ascii")


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


def _translate(err: OSError, path: str, line: bytes) -> PyshrinkerError:
    """Turn the errno a controller file answered with into pyshrinker's exception."""
    what = f"{path}: {line.decode('ascii', 'replace').strip()!r}: {os.strerror(err.errno or 0)}"
    code = err.errno
    if code in (errno.EINVAL, errno.EBADF):
        # EINVAL: malformed, unknown eventfd, not an eventfd; EBADF: a named fd is not open.
        return AbiError(what)
    if code in (errno.EACCES, errno.EPERM):
        return TransportPermissionError(code, what)
    if code in (errno.ENOTCONN, errno.ENODEV, errno.ECONNABORTED):
        # ENOTCONN is what a FUSE mount answers once its daemon is gone.
        return ControllerGone(code, what)
    if code == errno.ENOENT:
        return ControllerNotFound(code, what)
    if code == errno.ENOSPC:
        # A full registration table (pyshrinkerd's --max-total or --max-per-process).
        return ControllerFull(code, what)
    return TransportError(code, what)


@attrs.define(eq=False)
class FilesTransport:
    """Writes the ABI's lines to a controller directory, one ``os.write`` per line.

    The three files stay open (one fd each) for the transport's life. Errors the controller
    answers with become pyshrinker exceptions: EINVAL and EBADF :class:`AbiError`, EACCES and
    EPERM :class:`TransportPermissionError`, ENOTCONN (the daemon died)
    :class:`ControllerGone`, ENOSPC (no room for a registration) :class:`ControllerFull`,
    anything else :class:`TransportError` with its errno.

    .. versionadded:: 0.1.0
    """

    directory: str
    _control_fd: int = attrs.field(alias="control_fd")
    _shrinker_fd: int = attrs.field(alias="shrinker_fd")
    _level_fd: int = attrs.field(alias="level_fd")
    _closed: bool = attrs.field(default=False, alias="closed")

    @classmethod
    def open(cls, directory: str) -> FilesTransport:
        """Open ``directory``'s ``cgroup.event_control``, ``mempressure.shrinker``, level file."""
        opened: list[int] = []
        try:
            for name, flags in (
                (EVENT_CONTROL, os.O_WRONLY),
                (SHRINKER_FILE, os.O_WRONLY),
                (LEVEL_FILE, os.O_RDONLY),
            ):
                path = os.path.join(directory, name)
                try:
                    opened.append(os.open(path, flags | os.O_CLOEXEC))
                except OSError as err:
                    raise _translate(err, path, b"(open)") from err
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        return cls(directory, control_fd=opened[0], shrinker_fd=opened[1], level_fd=opened[2])

    @classmethod
    def shared(cls, directory: str) -> FilesTransport:
        """The process's transport to ``directory``, opened on first use and kept open.

        A forked child keeps using the inherited files: the controller tells processes apart
        by the writer's pid, so the child's lines are its own.
        """
        key = os.path.realpath(directory)
        with _shared_lock:
            transport = _shared.get(key)
            if transport is None or transport._closed:
                transport = _shared[key] = cls.open(directory)
            return transport

    def _write(self, fd: int, name: str, line: bytes) -> None:
        if self._closed:
            raise ClosedError(f"transport to {self.directory} is closed")
        try:
            # One write is one line: a controller file parses each write on its own.
            written = os.write(fd, line)
        except OSError as err:
            raise _translate(err, os.path.join(self.directory, name), line) from err
        if written != len(line):
            raise TransportError(errno.EIO, f"short write of {line!r} to {name}")

    def register(self, efd: int, chunk_size: int, cost: float) -> None:
        line = format_register(efd, self._shrinker_fd, chunk_size, cost)
        self._write(self._control_fd, EVENT_CONTROL, line)

    def report(self, efd: int, chunks: int) -> None:
        self._write(self._shrinker_fd, SHRINKER_FILE, format_report(efd, chunks))

    def register_level(self, efd: int, level: Level) -> None:
        line = format_register_level(efd, self._level_fd, level)
        self._write(self._control_fd, EVENT_CONTROL, line)

    def unregister(self, efd: int) -> None:
        self._write(self._control_fd, EVENT_CONTROL, format_unregister(efd))

    def close(self) -> None:
        """Close the three files; idempotent. The controller keeps registrations until the
        eventfds are unregistered or the process exits."""
        if self._closed:
            return
        self._closed = True
        for fd in (self._control_fd, self._shrinker_fd, self._level_fd):
            try:
                os.close(fd)
            except OSError:
                # A dead FUSE mount answers the flush on close with ENOTCONN; Linux has
                # released the fd all the same.
                pass

    def __enter__(self) -> FilesTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared: dict[str, FilesTransport] = {}
_shared_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _shared_lock
    # Another thread may have held the lock at fork; the transports themselves stay usable.
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
