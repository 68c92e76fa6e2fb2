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
import json
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
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

#: pyshrinkerd's status file (JSON lines), which :meth:`FilesTransport.count` reads.
STATUS_FILE = "mempressure.status"

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

    def count(self, efd: int) -> int:
        """The controller's count of shrinker ``efd`` now (not part of the 2013 ABI)."""

    def watch(self, member: Member) -> None:
        """Call ``member.rejoin()`` whenever the controller behind this transport changes."""


class Member(Protocol):
    """A registration that can be made again, exactly, with a new controller."""

    def rejoin(self) -> None:
        """Register again through the same transport, with what is held now."""


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

    def count(self, efd: int) -> int:
        return self.controller.count(efd)

    def watch(self, member: Member) -> None:
        """The controller never changes: nothing to do."""


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

    def count(self, efd: int) -> int:
        """The count the status file (pyshrinkerd's) shows for this process's ``efd``."""
        path = os.path.join(self.directory, STATUS_FILE)
        try:
            with open(path, encoding="ascii") as f:
                text = f.read()
        except OSError as err:
            raise _translate(err, path, b"(read)") from err
        pid = os.getpid()
        for raw in text.splitlines():
            item = json.loads(raw)
            if item.get("kind") == "shrinker" and item["pid"] == pid and item["efd"] == efd:
                return int(item["count"])
        raise AbiError(f"{path} lists no shrinker {efd} of process {pid}")

    def watch(self, member: Member) -> None:
        """A directory's controller does not move (see :class:`DirectoryTransport`)."""

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


# ---------------------------------------------------------------------- transports that move


@attrs.define(eq=False)
class SwitchingTransport:
    """A transport whose controller may change under its members (a base class).

    It hands each line to the transport in force (:attr:`current`). When that changes
    (:meth:`switch`), registrations made through the old one are unregistered there if it is
    still alive, and every member (a :class:`~pyshrinker.client.Shrinker`, a level subscription)
    is asked to :meth:`~Member.rejoin`: it registers again with exactly what it holds. Between
    the switch and a member's rejoin, its reports are dropped (its rejoin carries them), and a
    transport found dead drops reports until the switch away from it: the application's threads
    never see the controller go.

    .. versionadded:: 0.1.0
    """

    _current: Transport | None = attrs.field(default=None, alias="current")
    _members: weakref.WeakSet[Member] = attrs.field(factory=weakref.WeakSet, alias="members")
    _registered: set[int] = attrs.field(factory=set, alias="registered")
    # A condition, so that a registration may wait for a switch under way (see wait_switch).
    _lock: threading.Condition = attrs.field(factory=threading.Condition, alias="lock")
    _switching: threading.Lock = attrs.field(factory=threading.Lock, alias="switching")
    #: Times the controller changed under the members.
    switches: int = 0
    #: When the last switch was done, every member rejoined (``time.monotonic()``), or None.
    switched_at: float | None = None

    @property
    def current(self) -> Transport | None:
        """The transport lines go to now (None while there is none)."""
        return self._current

    def _in_force(self) -> Transport:
        current = self._current
        if current is None:
            raise ControllerGone(errno.ENOTCONN, "no controller reachable now")
        return current

    def register(self, efd: int, chunk_size: int, cost: float) -> None:
        self._in_force().register(efd, chunk_size, cost)
        with self._lock:
            self._registered.add(efd)

    def register_level(self, efd: int, level: Level) -> None:
        self._in_force().register_level(efd, level)
        with self._lock:
            self._registered.add(efd)

    def report(self, efd: int, chunks: int) -> None:
        current = self._current
        if current is None or efd not in self._registered:
            return  # the rejoin that comes carries it
        try:
            current.report(efd, chunks)
        except (ControllerGone, ControllerNotFound, ClosedError) as err:
            self.lost(current, err)

    def unregister(self, efd: int) -> None:
        with self._lock:
            if efd not in self._registered:
                return
            self._registered.discard(efd)
        current = self._current
        if current is not None:
            try:
                current.unregister(efd)
            except (ControllerGone, ControllerNotFound):
                pass

    def count(self, efd: int) -> int:
        return self._in_force().count(efd)

    def watch(self, member: Member) -> None:
        with self._lock:
            self._members.add(member)

    def lost(self, transport: Transport, why: BaseException) -> None:
        """``transport`` stopped answering: what to do is the subclass's (here, nothing).

        Called on whichever thread noticed, possibly holding a member's locks: a subclass must
        switch on a thread of its own, never here.
        """
        log.debug("transport %r lost: %s", transport, why)

    def wait_switch(self, away_from: Transport | None, timeout: float) -> bool:
        """Wait until the transport in force is not ``away_from``; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._current is not away_from, timeout)

    def switch(self, new: Transport | None, *, old_alive: bool) -> None:
        """Make ``new`` the transport in force and have every member rejoin through it.

        ``old_alive``: unregister from the old one first (else its controller is gone, and with
        it every registration). Switches are serialized; members rejoin on the calling thread.
        """
        with self._switching:
            with self._lock:
                old, self._current = self._current, new
                efds, self._registered = self._registered, set()
                members = list(self._members)
                self.switches += 1
                self._lock.notify_all()
            if old_alive and old is not None:
                for efd in efds:
                    try:
                        old.unregister(efd)
                    except PyshrinkerError as err:
                        log.debug("unregistering %d from the old controller: %s", efd, err)
            if new is None:
                return
            for member in members:
                try:
                    member.rejoin()
                except PyshrinkerError as err:
                    log.warning("%r could not rejoin the controller: %s", member, err)
            self.switched_at = time.monotonic()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Condition()
        self._switching = threading.Lock()
        self._registered = set()

    def rejoin(self) -> None:
        """As a member of another switching transport: everything registered here rejoins."""
        with self._lock:
            self._registered = set()
            members = list(self._members)
        for member in members:
            member.rejoin()


@attrs.define(eq=False)
class DirectoryTransport(SwitchingTransport):
    """A controller directory (pyshrinkerd's mount) with a fallback while its daemon is gone.

    While the directory answers, lines go there (:class:`FilesTransport`). When its daemon dies
    (a FUSE mount whose daemon is gone answers ENOTCONN), the members rejoin the fallback (by
    default the process's :func:`~pyshrinker.shared.default_shared`, the controller of its memory
    cgroup); a thread then waits for the mount table to change (``/proc/self/mountinfo`` polls
    POLLPRI on every mount and unmount) and, once the directory answers again, the members
    rejoin the new daemon. The application's reports never fail meanwhile.

    .. versionadded:: 0.1.0
    """

    directory: str = attrs.field(default="", kw_only=True)
    _fallback: SwitchingTransport | EmbeddedTransport | None = attrs.field(
        default=None, alias="fallback", kw_only=True
    )
    _files: FilesTransport | None = attrs.field(default=None, alias="files")
    _watcher: threading.Thread | None = attrs.field(default=None, alias="watcher")
    _wake_fd: int = attrs.field(default=-1, alias="wake_fd")
    _closed: bool = attrs.field(default=False, alias="closed")

    @classmethod
    def shared(cls, directory: str) -> DirectoryTransport:
        """The process's transport to ``directory``, opened on first use and kept open."""
        key = os.path.realpath(directory)
        with _shared_lock:
            transport = _shared_directories.get(key)
            if transport is None or transport._closed:
                transport = _shared_directories[key] = cls.open(directory)
            return transport

    @classmethod
    def open(
        cls,
        directory: str,
        fallback: SwitchingTransport | EmbeddedTransport | None = None,
    ) -> DirectoryTransport:
        """Use ``directory``; fail over to ``fallback`` (None: the process's shared one)."""
        files = FilesTransport.open(directory)
        transport = cls(directory=directory, fallback=fallback, current=files)
        transport._files = files
        return transport

    def register(self, efd: int, chunk_size: int, cost: float) -> None:
        self._retrying(lambda: SwitchingTransport.register(self, efd, chunk_size, cost))

    def register_level(self, efd: int, level: Level) -> None:
        self._retrying(lambda: SwitchingTransport.register_level(self, efd, level))

    def _retrying(self, call: Callable[[], None]) -> None:
        # A registration that meets a dead daemon waits for the fallback, then goes there.
        current = self._current
        try:
            call()
        except (ControllerGone, ControllerNotFound) as err:
            if current is None:
                raise
            self.lost(current, err)
            if not self.wait_switch(current, 5.0):
                raise
            call()

    def _fallback_transport(self) -> SwitchingTransport | EmbeddedTransport:
        if self._fallback is None:
            from pyshrinker.shared import default_shared

            self._fallback = default_shared()
        if isinstance(self._fallback, SwitchingTransport):
            self._fallback.watch(self)
        return self._fallback

    def lost(self, transport: Transport, why: BaseException) -> None:
        """The daemon is gone: fall back (on a thread of ours), and watch for it to return."""
        with self._lock:
            if transport is not self._files or self._closed:
                return
            self._files = None
            if self._wake_fd < 0:
                self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._watcher = threading.Thread(
                target=self._fail_over, args=(transport,), name="pyshrinker-directory", daemon=True
            )
            self._watcher.start()
        log.warning(
            "controller directory %s: %s; using the fallback until it answers again",
            self.directory,
            why,
        )

    def rejoin(self) -> None:
        """The fallback's controller changed: rejoin it, if it is the one in force."""
        if self._current is not None and self._current is self._fallback:
            super().rejoin()

    def _fail_over(self, dead: Transport) -> None:
        self.switch(self._fallback_transport(), old_alive=False)
        if isinstance(dead, FilesTransport):
            dead.close()  # after the switch: no report is on its way there now
        # The mount table polls POLLPRI (and POLLERR) on every change: a restarted daemon's
        # mount is one. Tried once at the start too, in case it came back before we looked.
        mounts = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            poller = select.poll()
            poller.register(mounts, select.POLLPRI | select.POLLERR)
            poller.register(self._wake_fd, select.POLLIN)
            while not self._closed:
                try:
                    files = FilesTransport.open(self.directory)
                except PyshrinkerError:
                    files = None
                if files is not None and self._answers(files):
                    with self._lock:
                        self._files = files
                    log.warning("controller directory %s answers again", self.directory)
                    self.switch(files, old_alive=True)
                    return
                if files is not None:
                    files.close()
                events = dict(poller.poll())
                os.pread(mounts, 65536, 0)  # rearms the mount table's change flag
                if self._wake_fd in events:
                    return
        finally:
            os.close(mounts)

    @staticmethod
    def _answers(files: FilesTransport) -> bool:
        # A stale mount opens (the kernel answers open from the dentry) but every write fails
        # with ENOTCONN; an unregistration of an eventfd never registered is answered EINVAL.
        try:
            files.unregister(-1)
        except AbiError:
            return True
        except PyshrinkerError:
            return False
        return True

    def close(self) -> None:
        """Stop watching for the daemon, close the directory's files; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            files, self._files = self._files, None
        if self._wake_fd >= 0:
            os.eventfd_write(self._wake_fd, 1)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
        if files is not None:
            files.close()


_shared: dict[str, FilesTransport] = {}
_shared_directories: dict[str, DirectoryTransport] = {}
_shared_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _shared_lock
    # Another thread may have held the locks at fork; the transports themselves stay usable
    # (a controller directory tells processes apart by the writer's pid).
    _shared_lock = threading.Lock()
    for transport in _shared_directories.values():
        transport._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
