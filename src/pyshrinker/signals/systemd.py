"""systemd's memory pressure protocol: ``$MEMORY_PRESSURE_WATCH`` and ``$MEMORY_PRESSURE_WRITE``.

The service manager's side (systemd's docs/PRESSURE.md): a unit with ``MemoryPressureWatch=``
starts its processes with

* ``$MEMORY_PRESSURE_WATCH``: an absolute path to watch, usually the ``memory.pressure`` PSI file
  of the service's cgroup; it may also be a FIFO or an ``AF_UNIX`` stream socket. The literal
  ``/dev/null`` means "turned off": the service must not watch memory pressure;
* ``$MEMORY_PRESSURE_WRITE`` (optional): base64 of bytes (NULs allowed) to write right after
  opening or connecting, normally a PSI trigger such as ``"some 200000 2000000\\0"``.

Then: a regular file is polled for POLLPRI and never read (PSI); a FIFO is polled for POLLIN and
whatever arrives is read and discarded; a socket is connected and polled for POLLIN, data read
and discarded. Each wake-up means "under pressure: release caches, malloc_trim".

What the kernel does with each, measured on Linux 6.x (and why the code below looks as it does):

* A PSI file with no trigger written polls POLLPRI | POLLERR at once and forever, so a PSI file
  without ``$MEMORY_PRESSURE_WRITE`` is refused instead of spinning. With a trigger, POLLPRI is
  cleared by the poll that reports it; an unprivileged trigger may fire once right after arming,
  so (as :class:`~pyshrinker.signals.psi.PsiTrigger` does) the first event counts only if the
  stall ``total`` moved since arming.
* Other kernfs files (cgroup ``cgroup.events``, ``memory.events``) raise POLLPRI | POLLERR when
  they change and stay ready until read: they are read (and the content ignored) on arming and
  after each event. A regular file on a disk filesystem cannot be polled at all (epoll refuses it
  with EPERM): refused when arming.
* A FIFO opened read-only polls POLLHUP for good once a writer has come and gone. It is opened
  read-write instead (Linux allows it, and then we count as a writer, so no hang-up ever comes).
  The ``$MEMORY_PRESSURE_WRITE`` bytes written into it are read back at once so that they are
  not taken for an event.
* A socket's peer may go away; its end then polls readable with EOF for good. The socket is
  watched through an epoll set of our own whose fd is what the controller polls, so that on EOF
  we can reconnect (or, if that fails, go quiet) without the controller's fd changing.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import base64
import binascii
import enum
import errno
import logging
import os
import select
import socket
import stat
from collections.abc import Mapping

import attrs

from pyshrinker.errors import MalformedFile, PyshrinkerError, UnsupportedError
from pyshrinker.signals.psi import PsiStats, StallKind, parse_psi, stall_total_moved

log = logging.getLogger(__name__)

#: The variable naming what to watch.
WATCH_ENV = "MEMORY_PRESSURE_WATCH"
#: The variable holding base64 bytes to write after opening.
WRITE_ENV = "MEMORY_PRESSURE_WRITE"
#: The value of :data:`WATCH_ENV` that means "turned off".
OFF = "/dev/null"
#: Seconds a connect (and the first write) to a socket may take.
CONNECT_TIMEOUT = 2.0
_READ_SIZE = 4096


class WatchKind(enum.Enum):
    """What ``$MEMORY_PRESSURE_WATCH`` names."""

    #: A regular file: a PSI file (or another kernel file that raises POLLPRI).
    FILE = "file"
    #: A FIFO: any bytes written to it are an event.
    FIFO = "fifo"
    #: An ``AF_UNIX`` socket to connect to: any bytes received are an event.
    SOCKET = "socket"


class PressureWatchOff(PyshrinkerError):
    """The environment asks for no watch: ``$MEMORY_PRESSURE_WATCH`` unset, empty or /dev/null.

    .. versionadded:: 0.1.0
    """


@attrs.frozen
class WatchSetting:
    """What the service manager asked for: a path to watch and bytes to write to it.

    .. versionadded:: 0.1.0
    """

    path: str
    #: The decoded ``$MEMORY_PRESSURE_WRITE``, or None when unset or empty.
    payload: bytes | None = None


def read_environment(environ: Mapping[str, str] | None = None) -> WatchSetting:
    """Read ``$MEMORY_PRESSURE_WATCH`` and ``$MEMORY_PRESSURE_WRITE`` (default: ``os.environ``).

    Raises :class:`PressureWatchOff` when there is nothing to watch, ValueError when the path is
    not absolute or the bytes are not base64.

    .. versionadded:: 0.1.0
    """
    env = os.environ if environ is None else environ
    path = env.get(WATCH_ENV)
    if path is None:
        raise PressureWatchOff(f"${WATCH_ENV} is not set (not started by systemd with it)")
    if path in ("", OFF):
        raise PressureWatchOff(f"${WATCH_ENV}={path or '(empty)'}: memory pressure watch is off")
    if not os.path.isabs(path):
        raise ValueError(f"${WATCH_ENV} must be an absolute path, got {path!r}")
    encoded = env.get(WRITE_ENV, "")
    try:
        payload = base64.b64decode(encoded, validate=True) if encoded else b""
    except (binascii.Error, ValueError):
        raise ValueError(f"${WRITE_ENV} is not base64: {encoded!r}") from None
    return WatchSetting(path, payload or None)


def _connect(path: str, payload: bytes | None) -> socket.socket:
    """Connect to the socket at ``path`` (stream, else seqpacket) and send ``payload``."""
    last: OSError | None = None
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(path)
            if payload:
                sock.sendall(payload)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            if err.errno == errno.EPROTOTYPE:  # the listener is of the other type
                last = err
                continue
            raise
        return sock
    assert last is not None
    raise last


def _describe_payload(payload: bytes | None) -> str:
    if not payload:
        return ""
    text = payload.rstrip(b"\0").decode("ascii", "backslashreplace")
    return f" (wrote '{text}')"


@attrs.define(eq=False)
class SystemdPressureWatch:
    """A notifier following systemd's memory pressure protocol on one path.

    Build it with :meth:`from_environment` (what the service manager set) or :meth:`open`.
    Its :meth:`fileno` is polled for :attr:`events`; :meth:`consume` says whether the wake-up
    was pressure. The controller treats an event as level ``medium``, like PSI.

    .. versionadded:: 0.1.0
    """

    path: str
    kind: WatchKind
    payload: bytes | None
    #: The poll mask to wait for on :meth:`fileno`.
    events: int
    #: The fd polled: the file or FIFO itself, or (socket) our epoll set holding the socket.
    fd: int
    _sock: socket.socket | None = attrs.field(default=None, alias="sock")
    _epoll: select.epoll | None = attrs.field(default=None, alias="epoll")
    _stall_kind: StallKind | None = attrs.field(default=None, alias="stall_kind")
    _armed_total: int | None = attrs.field(default=None, alias="armed_total")
    #: Times the socket was connected again after its peer closed it.
    reconnects: int = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdPressureWatch:
        """Watch what ``$MEMORY_PRESSURE_WATCH`` names, writing ``$MEMORY_PRESSURE_WRITE``.

        Raises :class:`PressureWatchOff` when the environment asks for no watch.
        """
        setting = read_environment(environ)
        return cls.open(setting.path, setting.payload)

    @classmethod
    def open(cls, path: str, payload: bytes | None = None) -> SystemdPressureWatch:
        """Open (or connect to) ``path``, write ``payload`` if given, and be ready to poll."""
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            return cls._open_file(path, payload)
        if stat.S_ISFIFO(mode):
            return cls._open_fifo(path, payload)
        if stat.S_ISSOCK(mode):
            return cls._open_socket(path, payload)
        raise UnsupportedError(
            errno.EBADF, f"{path}: not a regular file, FIFO or socket: cannot watch it"
        )

    @classmethod
    def _open_file(cls, path: str, payload: bytes | None) -> SystemdPressureWatch:
        access = os.O_RDWR if payload else os.O_RDONLY
        fd = os.open(path, access | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            # Read once (at most a page): tells a PSI file, and resets a kernfs file's event.
            psi = _parse_psi_or_none(fd)
            if psi is not None and not payload:
                raise UnsupportedError(
                    errno.EINVAL,
                    f"{path} is a PSI file but ${WRITE_ENV} gives no trigger: "
                    "without one it polls ready forever",
                )
            if payload:
                try:
                    os.write(fd, payload)
                except OSError as err:
                    raise UnsupportedError(
                        err.errno, f"{path} refused ${WRITE_ENV} {payload!r}: {err.strerror}"
                    ) from err
            with select.epoll() as probe:
                try:
                    probe.register(fd, select.EPOLLPRI)
                except PermissionError:
                    raise UnsupportedError(
                        errno.EPERM, f"{path}: a regular file that cannot be polled"
                    ) from None
            stall_kind: StallKind | None = None
            armed_total: int | None = None
            words = payload.split(maxsplit=1) if payload else []
            if psi is not None and words and words[0] in (b"some", b"full"):
                stall_kind = StallKind(words[0].decode("ascii"))
                line = psi.some if stall_kind is StallKind.SOME else psi.full
                armed_total = line.total_us if line is not None else None
        except BaseException:
            os.close(fd)
            raise
        return cls(
            path,
            WatchKind.FILE,
            payload,
            select.POLLPRI,
            fd,
            stall_kind=stall_kind,
            armed_total=armed_total,
        )

    @classmethod
    def _open_fifo(cls, path: str, payload: bytes | None) -> SystemdPressureWatch:
        # Read-write, not read-only: see the module's notes (no POLLHUP once a writer left).
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            if payload:
                os.write(fd, payload)
                _drain_fd(fd)  # our own bytes are no event
        except BaseException:
            os.close(fd)
            raise
        return cls(path, WatchKind.FIFO, payload, select.POLLIN, fd)

    @classmethod
    def _open_socket(cls, path: str, payload: bytes | None) -> SystemdPressureWatch:
        sock = _connect(path, payload)
        try:
            ep = select.epoll()
        except BaseException:
            sock.close()
            raise
        ep.register(sock.fileno(), select.EPOLLIN)
        return cls(path, WatchKind.SOCKET, payload, select.POLLIN, ep.fileno(), sock=sock, epoll=ep)

    def fileno(self) -> int:
        return self.fd

    @property
    def connected(self) -> bool:
        """For a socket: whether it is connected (False once the peer left for good)."""
        return self._sock is not None

    def consume(self) -> bool:
        """Read what woke us; True when it is a pressure event."""
        if self.fd < 0:
            return False
        if self.kind is WatchKind.FIFO:
            return _drain_fd(self.fd)[0]
        if self.kind is WatchKind.SOCKET:
            return self._consume_socket()
        if self._stall_kind is None:
            _reset_kernfs(self.fd)
            return True
        return self._first_psi_event_is_real()

    def _first_psi_event_is_real(self) -> bool:
        armed, self._armed_total = self._armed_total, None
        if armed is None or self._stall_kind is None:
            return True
        return stall_total_moved(self.path, self._stall_kind, armed)

    def _consume_socket(self) -> bool:
        sock = self._sock
        if sock is None:
            return False
        got = False
        eof = False
        while True:
            try:
                data = sock.recv(_READ_SIZE)
            except BlockingIOError:
                break
            except OSError:  # ECONNRESET and the like: gone as well
                eof = True
                break
            if not data:
                eof = True
                break
            got = True
        if eof:
            self._reconnect()
        return got

    def _reconnect(self) -> None:
        assert self._epoll is not None
        old = self._sock
        self._sock = None
        if old is not None:
            self._epoll.unregister(old.fileno())
            old.close()
        try:
            sock = _connect(self.path, self.payload)
        except OSError as err:
            log.warning(
                "%s: the pressure socket was closed and reconnecting failed (%s): not watching",
                self.path,
                err,
            )
            return
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._sock = sock
        self.reconnects += 1
        log.info("%s: the pressure socket was closed; connected again", self.path)

    def describe(self) -> str:
        what = {
            WatchKind.FILE: "PSI file" if self._stall_kind is not None else "file",
            WatchKind.FIFO: "FIFO",
            WatchKind.SOCKET: "socket",
        }[self.kind]
        return f"systemd ${WATCH_ENV}: {what} {self.path}{_describe_payload(self.payload)}"

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._epoll is not None:
            self._epoll.close()  # this is self.fd
            self._epoll = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> SystemdPressureWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain_fd(fd: int) -> tuple[bool, bool]:
    """Read everything queued on a non-blocking fd: (whether any bytes came, whether EOF)."""
    got = False
    while True:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return got, False
        if not data:
            return got, True
        got = True


def _parse_psi_or_none(fd: int) -> PsiStats | None:
    try:
        return parse_psi(os.pread(fd, _READ_SIZE, 0).decode("ascii"))
    except (OSError, UnicodeDecodeError, MalformedFile):
        return None


def _reset_kernfs(fd: int) -> None:
    # A kernfs file stays POLLPRI-ready after a change until it is read again.
    try:
        os.pread(fd, _READ_SIZE, 0)
    except OSError as err:
        log.debug("re-reading a watched file failed: %s", err)


__all__ = [
    "OFF",
    "WATCH_ENV",
    "WRITE_ENV",
    "PressureWatchOff",
    "SystemdPressureWatch",
    "WatchKind",
    "WatchSetting",
    "read_environment",
]
