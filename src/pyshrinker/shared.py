"""One controller per memory cgroup, elected among the processes whose caches live there.

The 2013 proposal had one controller per cgroup, the kernel. If every process ran its own, each
would see the same watermark crossing and ask its own caches for the whole amount (measured: 1.8
to 2.1 times what had to go, with 4 or 8 worker processes of one group). So the processes of a
memory cgroup elect one of them to run the controller; the others register their shrinkers with
it over a local socket, in the proposal's own lines, their eventfds passed along. No setup, no
root, no daemon: the first process to need a controller runs it.

How, and what the kernel guarantees:

* The meeting point is an abstract unix socket: a name, not a file (nothing to clean up), freed
  by the kernel when its last fd closes, however the process ended. The name comes from the
  memory cgroup's identity, the device and inode of its directory: two containers of one pod
  share the network namespace (where abstract names live) and both see their group as ``/``,
  but their groups are different directories. A successful ``bind`` wins the election;
  EADDRINUSE means another process runs the controller: connect to it.
* ``SOCK_SEQPACKET`` keeps each message whole (one ABI line, as one write(2) to a cgroup file
  is), passes eventfds as ``SCM_RIGHTS`` (a duplicate, no ptrace rights needed), and reads end
  of file when the peer is gone, even SIGKILLed.
* ``SO_PEERCRED`` gives each side the other's pid and uid. Only the same user is let in, both
  ways: a process of another user (or one squatting the name) is not joined, and the process
  then runs a controller of its own.
* When the process running the controller goes, every follower reads end of file at once. Each
  tries to bind: one wins and starts the controller, the others connect to it, and every
  shrinker and level subscription registers again with exactly what it holds
  (:meth:`pyshrinker.client.Shrinker.rejoin`). A forked child connects afresh: the parent's
  socket and, if it ran the controller, its registrations stay the parent's.

Messages, follower to controller: ``"cgroup.event_control <line>"`` (a registration, the
eventfd in SCM_RIGHTS; the line's second field, the file's fd in the ABI, is not checked) and
``"query count <efd>"`` / ``"query status"`` are answered ``"0 <payload>"`` or
``"<errno> <why>"``; ``"mempressure.shrinker <efd> <N>"`` is not answered (reports must be
cheap; one the controller refuses is counted in its status). On connecting, the controller
greets with ``"0 hello <pid>"`` or refuses with ``"<errno> <why>"``.

Environment: :envvar:`PYSHRINKER_ELECTION` ``off`` gives every process its own controller (the
behaviour before elections); :envvar:`PYSHRINKER_ELECTION_SCOPE` names a scope, so that groups
of processes in one cgroup elect apart (test runs side by side, say).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import array
import collections
import errno
import fcntl
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Any

import attrs

from pyshrinker._syscalls import EventfdFlag, eventfd, eventfd_write, is_eventfd
from pyshrinker.abi import (
    EVENT_CONTROL,
    MAX_LINE,
    SHRINKER_FILE,
    Level,
    format_register,
    format_register_level,
    format_report,
    parse_event_control,
    parse_report,
)
from pyshrinker.cgroup import memory_cgroup_of
from pyshrinker.controller import Controller, default_controller
from pyshrinker.errors import (
    AbiError,
    ControllerFull,
    ControllerGone,
    PyshrinkerError,
    TransportError,
    TransportPermissionError,
)
from pyshrinker.registry import Client, ClientRegistry, Refused, pid_efd, refuse
from pyshrinker.transport import (
    EmbeddedTransport,
    SwitchingTransport,
    Transport,
    format_unregister,
)

log = logging.getLogger(__name__)

#: ``off``: every process runs its own controller; anything else (``cgroup``, the default):
#: one controller per memory cgroup, elected.
ELECTION_ENV = "PYSHRINKER_ELECTION"
#: A scope within the cgroup: processes elect among those of the same scope.
SCOPE_ENV = "PYSHRINKER_ELECTION_SCOPE"
#: Version of the messages below, part of the meeting point's name.
PROTOCOL = 1
QUERY = b"query"
#: The largest message a follower sends (an ABI line and the file's name).
MAX_MESSAGE = MAX_LINE + 64
#: The largest reply (a status of thousands of shrinkers).
MAX_REPLY = 4 << 20
#: Seconds a follower waits for the controller to greet or answer.
ANSWER_TIMEOUT = 5.0
#: Seconds an election may take (a winner binding but not yet listening) before the process
#: gives up and runs a controller of its own.
ELECTION_TIMEOUT = 2.0
#: Seconds a report may wait for room in the socket before the controller is taken for stuck.
SEND_TIMEOUT = 0.05

_CREDS = struct.Struct("3i")


def election_enabled() -> bool:
    """Whether processes elect one controller per memory cgroup (``$PYSHRINKER_ELECTION``)."""
    return os.environ.get(ELECTION_ENV, "cgroup").strip().lower() != "off"


def meeting_point(scope: str | None = None) -> bytes:
    """The abstract socket name of this process's memory cgroup (and ``scope``).

    From the cgroup directory's device and inode; the mount namespace's root when no memory
    cgroup is mounted (then every process of the namespace meets there).
    """
    if scope is None:
        scope = os.environ.get(SCOPE_ENV, "")
    found = memory_cgroup_of()
    where = os.stat(found[1] if found is not None else "/")
    name = f"\0pyshrinker/{PROTOCOL}/{where.st_dev:x}:{where.st_ino:x}/{scope}"
    return name.encode("utf-8", "surrogateescape")[:107]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
    pid, uid, gid = _CREDS.unpack(raw)
    return pid, uid, gid


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def _errno_reply(err: BaseException) -> bytes:
    code = err.errno if isinstance(err, OSError) and err.errno else errno.EINVAL
    return f"{code} {err}".encode("ascii", "replace")


# ---------------------------------------------------------------------- the controller's side


@attrs.define(eq=False)
class _Connection:
    sock: socket.socket
    client: Client | None = None


@attrs.define(eq=False)
class Door:
    """The elected controller's socket: followers' lines into this process's registry.

    One thread blocks in epoll on the listening socket, every follower's connection and a
    wake-up eventfd. A follower is a client of the shared
    :class:`~pyshrinker.registry.ClientRegistry`, keyed by its pid; its registrations go to the
    same :class:`~pyshrinker.controller.Controller` as this process's own shrinkers.

    .. versionadded:: 0.1.0
    """

    controller: Controller
    registry: ClientRegistry
    _listening: socket.socket = attrs.field(alias="listening")
    _epoll: select.epoll = attrs.field(factory=select.epoll, alias="epoll")
    _wake_fd: int = attrs.field(default=-1, alias="wake_fd")
    _connections: dict[int, _Connection] = attrs.field(factory=dict, alias="connections")
    _thread: threading.Thread | None = attrs.field(default=None, alias="thread")
    _stopping: bool = attrs.field(default=False, alias="stopping")
    uid: int = attrs.field(factory=os.geteuid)

    @staticmethod
    def bind(name: bytes) -> socket.socket | None:
        """Bind and listen on ``name``: the election. None if another process holds it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(name)
            sock.listen(128)
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                return None
            raise
        return sock

    @classmethod
    def start(cls, listening: socket.socket, controller: Controller) -> Door:
        """Serve followers on ``listening`` (from :meth:`bind`) with ``controller``."""
        door = cls(controller, ClientRegistry(controller), listening=listening)
        listening.setblocking(False)
        door._wake_fd = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
        door._epoll.register(door._wake_fd, select.EPOLLIN)
        door._epoll.register(listening.fileno(), select.EPOLLIN)
        door._thread = threading.Thread(target=door._run, name="pyshrinker-door", daemon=True)
        door._thread.start()
        return door

    def followers(self) -> list[int]:
        """The pids of the processes registered through this door now."""
        with self.registry.lock:
            return sorted(c.pid for c in self.registry.clients_locked())

    def _run(self) -> None:
        while not self._stopping:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            for fd, _mask in events:
                if self._stopping:
                    return
                try:
                    if fd == self._wake_fd:
                        return
                    if fd == self._listening.fileno():
                        self._accept()
                    else:
                        self._serve(fd)
                except Exception:
                    log.exception("pyshrinker door: a follower's message failed; door continues")

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listening.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            conn = _Connection(sock)
            pid, uid, _gid = peer_credentials(sock)
            why = None
            if uid != self.uid:
                why = refuse(errno.EACCES, f"uid {uid} may not join a controller of uid {self.uid}")
            elif pid <= 0:
                why = refuse(errno.EPERM, "follower not visible in this pid namespace")
            else:
                try:
                    with self.registry.lock:
                        conn.client = self.registry.join_locked(pid, uid, None)
                except Refused as err:
                    why = err
            if why is not None:
                log.warning("pyshrinker door: refused process %d: %s", pid, why)
                self._reply(conn, _errno_reply(why))
                sock.close()
                continue
            self._connections[sock.fileno()] = conn
            self._epoll.register(sock.fileno(), select.EPOLLIN)
            self._reply(conn, f"0 hello {os.getpid()}".encode("ascii"))

    def _serve(self, fd: int) -> None:
        conn = self._connections.get(fd)
        if conn is None:
            return
        try:
            data, ancdata, _flags, _ = conn.sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
        except BlockingIOError:
            return
        except OSError:
            data, ancdata = b"", []
        fds = _received_fds(ancdata)
        try:
            if not data:
                self._gone(fd, conn)
                return
            reply = self._message(conn, data, fds)
            if reply is not None:
                self._reply(conn, reply)
        finally:
            for unused in fds:
                if unused >= 0:
                    os.close(unused)

    def _message(self, conn: _Connection, data: bytes, fds: list[int]) -> bytes | None:
        """One follower message; the reply, or None (a report). Takes over the fds it uses."""
        client = conn.client
        assert client is not None
        kind, _, line = data.partition(b" ")
        try:
            if kind == SHRINKER_FILE.encode():
                parsed = parse_report(line)
                with self.registry.lock:
                    self.registry.report_locked(client, parsed.efd, parsed.chunks)
                return None
            if kind == EVENT_CONTROL.encode():
                self._event_control(client, line, fds)
                return b"0"
            if kind == QUERY:
                return b"0 " + self._query(client, line)
            raise AbiError(f"unknown message {kind!r}")
        except (Refused, AbiError, PyshrinkerError) as err:
            self.registry.bump(errno.errorcode.get(getattr(err, "errno", 0) or errno.EINVAL, "?"))
            if kind == SHRINKER_FILE.encode():
                log.debug("pyshrinker door: report from %d refused: %s", client.pid, err)
                return None
            return _errno_reply(err)

    def _event_control(self, client: Client, line: bytes, fds: list[int]) -> None:
        tokens = line.split()
        with self.registry.lock:
            if len(tokens) == 2 and tokens[1] == b"-":
                if not tokens[0].isdigit():
                    raise AbiError(f"eventfd must be a decimal integer, got {tokens[0]!r}")
                self.registry.unregister_locked(client, int(tokens[0]))
                return
            parsed = parse_event_control(line)
            if len(fds) != 1:
                raise refuse(errno.EBADF, f"a registration passes one eventfd, got {len(fds)}")
            dup = fds[0]
            if not is_eventfd(dup):
                raise refuse(errno.EINVAL, "the fd passed is not an eventfd")
            if not fcntl.fcntl(dup, fcntl.F_GETFL) & os.O_NONBLOCK:
                # Writing a blocking one whose counter is full would wait holding our lock.
                raise refuse(errno.EINVAL, "the eventfd passed must be non-blocking")
            fds[0] = -1  # the registry owns (or closes) it now
            self.registry.register_locked(client, parsed, dup)

    def _query(self, client: Client, line: bytes) -> bytes:
        tokens = line.split()
        if len(tokens) == 2 and tokens[0] == b"count" and tokens[1].isdigit():
            with self.registry.lock:
                return str(self.registry.count_locked(client, int(tokens[1]))).encode()
        if tokens == [b"status"]:
            return json.dumps(self.status()).encode("ascii")
        raise AbiError(f"unknown query {line!r}")

    def status(self) -> dict[str, Any]:
        """What the controller serves: its process, signals, watermarks and every shrinker."""
        me = os.getpid()
        marks = self.controller.watermarks
        shrinkers = []
        for info in self.controller.shrinkers():
            pid, efd = pid_efd(info.key)
            if pid < 0 and isinstance(info.key, int):
                pid, efd = me, info.key
            shrinkers.append([pid, efd, info.count, info.chunk_size, info.cost, info.requests])
        return {
            "pid": me,
            "followers": self.followers(),
            "signals": self.controller.describe_signals(),
            "watermarks": None if marks is None else [marks.limit, marks.high, marks.low],
            "shrinkers": shrinkers,
            "requests_sent": self.registry.requests_sent,
            "counters": dict(self.registry.counters),
        }

    def _reply(self, conn: _Connection, reply: bytes) -> None:
        try:
            conn.sock.send(reply)
        except OSError as err:
            # A follower that does not read its answers (its socket buffer full) is dropped.
            log.warning("pyshrinker door: cannot answer a follower (%s): dropping it", err)
            conn.sock.shutdown(socket.SHUT_RDWR)

    def _gone(self, fd: int, conn: _Connection) -> None:
        self._connections.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        if conn.client is not None:
            with self.registry.lock:
                dropped = self.registry.drop_locked(conn.client)
            self.registry.bump("followers_gone")
            log.info(
                "pyshrinker follower %d gone: %d registrations dropped", conn.client.pid, dropped
            )
        conn.sock.close()

    def close(self) -> None:
        """Stop serving: followers see end of file and elect another; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        eventfd_write(self._wake_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._listening.close()
        for fd, conn in list(self._connections.items()):
            self._gone(fd, conn)
        self._epoll.close()
        os.close(self._wake_fd)

    def forget_after_fork(self) -> None:
        """In a forked child: close this copy's fds; the parent goes on serving."""
        self._stopping = True
        self._listening.close()
        for conn in self._connections.values():
            conn.sock.close()
            if conn.client is not None:
                for reg in conn.client.regs.values():
                    os.close(reg.dup)
        self._connections.clear()
        self._epoll.close()
        os.close(self._wake_fd)


# ---------------------------------------------------------------------- a follower's side


@attrs.define(eq=False)
class _Answer:
    done: threading.Event = attrs.field(factory=threading.Event)
    reply: bytes | None = None


@attrs.define(eq=False)
class Link:
    """A follower's connection to the elected controller.

    One thread blocks in poll on the socket and a wake-up eventfd: it hands each reply to the
    call waiting for it, in order, and on end of file (the controller's process is gone) calls
    ``on_gone(link)``.

    .. versionadded:: 0.1.0
    """

    sock: socket.socket
    leader_pid: int
    _on_gone: Any = attrs.field(alias="on_gone")
    _send_lock: threading.Lock = attrs.field(factory=threading.Lock, alias="send_lock")
    _waiting: collections.deque[_Answer] = attrs.field(factory=collections.deque, alias="waiting")
    _wake_fd: int = attrs.field(default=-1, alias="wake_fd")
    _thread: threading.Thread | None = attrs.field(default=None, alias="thread")
    _dead: bool = attrs.field(default=False, alias="dead")
    _closing: bool = attrs.field(default=False, alias="closing")

    @classmethod
    def connect(cls, name: bytes, on_gone: Any) -> Link | None:
        """Connect to the controller at ``name``; None if nobody listens there (yet).

        Raises :class:`~pyshrinker.errors.TransportPermissionError` if the controller runs as
        another user or refuses this process.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            try:
                sock.connect(name)
            except (ConnectionRefusedError, FileNotFoundError):
                sock.close()
                return None
            _pid, uid, _gid = peer_credentials(sock)
            if uid != os.geteuid():
                raise TransportPermissionError(
                    errno.EACCES, f"the controller of this cgroup runs as uid {uid}"
                )
            sock.settimeout(ANSWER_TIMEOUT)
            try:
                greeting = sock.recv(MAX_MESSAGE)
            except ConnectionResetError:
                # Connected into the backlog of a controller that is exiting: not there.
                greeting = b""
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        words = greeting.split()
        if len(words) == 3 and words[:2] == [b"0", b"hello"] and words[2].isdigit():
            link = cls(sock, int(words[2]), on_gone=on_gone)
            link._wake_fd = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
            link._thread = threading.Thread(target=link._run, name="pyshrinker-link", daemon=True)
            link._thread.start()
            return link
        sock.close()
        if not greeting:
            return None  # the controller went away as we came
        code, _, why = greeting.partition(b" ")
        raise TransportPermissionError(
            int(code) if code.isdigit() else errno.EACCES, why.decode("ascii", "replace")
        )

    @property
    def dead(self) -> bool:
        """Whether the controller went away (or the link was closed)."""
        return self._dead

    def _send(self, message: bytes, fds: tuple[int, ...] = ()) -> None:
        # Called with the send lock held. Non-blocking: a controller that does not read is
        # taken for gone after SEND_TIMEOUT rather than stalling the application's thread.
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        for attempt in range(2):
            try:
                self.sock.sendmsg([message], ancdata)
                return
            except BlockingIOError:
                if attempt == 0:
                    select.select([], [self.sock], [], SEND_TIMEOUT)
            except OSError as err:
                raise ControllerGone(err.errno or errno.EPIPE, f"controller gone: {err}") from err
        self.abort()
        raise ControllerGone(errno.ETIMEDOUT, "the controller does not read its socket")

    def send(self, message: bytes) -> None:
        """Send a message that is not answered (a report)."""
        if self._dead:
            raise ControllerGone(errno.ENOTCONN, "controller gone")
        with self._send_lock:
            self._send(message)

    def call(self, message: bytes, fds: tuple[int, ...] = ()) -> bytes:
        """Send ``message`` (with ``fds``) and return the controller's answer's payload.

        Raises the errno the controller answered with as a pyshrinker exception, or
        :class:`~pyshrinker.errors.ControllerGone`.
        """
        answer = _Answer()
        with self._send_lock:
            if self._dead:
                raise ControllerGone(errno.ENOTCONN, "controller gone")
            self._waiting.append(answer)
            try:
                self._send(message, fds)
            except BaseException:
                self._waiting.remove(answer)
                raise
        if not answer.done.wait(ANSWER_TIMEOUT) or answer.reply is None:
            if not answer.done.is_set():
                self.abort()
            raise ControllerGone(errno.ETIMEDOUT, "the controller did not answer")
        code, _, payload = answer.reply.partition(b" ")
        if code == b"0":
            return payload
        number = int(code) if code.isdigit() else errno.EINVAL
        why = payload.decode("ascii", "replace")
        if number == errno.EINVAL:
            raise AbiError(why)
        if number == errno.ENOSPC:
            raise ControllerFull(number, why)
        if number in (errno.EACCES, errno.EPERM):
            raise TransportPermissionError(number, why)
        raise TransportError(number, why)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        while True:
            try:
                events = dict(poller.poll())
            except InterruptedError:
                continue
            if self._wake_fd in events:
                break
            try:
                reply = self.sock.recv(MAX_REPLY)
            except BlockingIOError:
                continue
            except OSError:
                reply = b""
            if not reply:
                break
            with self._send_lock:
                answer = self._waiting.popleft() if self._waiting else None
            if answer is None:
                log.warning("pyshrinker link: an answer nobody asked for: %r", reply[:80])
                continue
            answer.reply = reply
            answer.done.set()
        with self._send_lock:
            self._dead = True
            waiting, self._waiting = list(self._waiting), collections.deque()
        for answer in waiting:
            answer.done.set()
        if not self._closing:
            try:
                self._on_gone(self)
            except Exception:
                log.exception("pyshrinker link: failing over failed")

    def abort(self) -> None:
        """Cut the connection: the controller drops us, and we fail over."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Close without failing over (the process is done with it); idempotent."""
        if self._closing:
            return
        self._closing = True
        eventfd_write(self._wake_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.sock.close()
        os.close(self._wake_fd)

    def forget_after_fork(self) -> None:
        """In a forked child: close this copy's fds (the connection is the parent's)."""
        self._closing = self._dead = True
        self.sock.close()
        os.close(self._wake_fd)


@attrs.define(eq=False)
class LinkTransport:
    """The ABI over a :class:`Link`: what a follower's shrinkers use."""

    link: Link

    def register(self, efd: int, chunk_size: int, cost: float) -> None:
        line = format_register(efd, self.link.sock.fileno(), chunk_size, cost)
        self.link.call(EVENT_CONTROL.encode() + b" " + line, (efd,))

    def register_level(self, efd: int, level: Level) -> None:
        line = format_register_level(efd, self.link.sock.fileno(), level)
        self.link.call(EVENT_CONTROL.encode() + b" " + line, (efd,))

    def report(self, efd: int, chunks: int) -> None:
        self.link.send(SHRINKER_FILE.encode() + b" " + format_report(efd, chunks))

    def unregister(self, efd: int) -> None:
        self.link.call(EVENT_CONTROL.encode() + b" " + format_unregister(efd))

    def count(self, efd: int) -> int:
        return int(self.link.call(QUERY + f" count {efd}".encode()))

    def watch(self, member: object) -> None:
        """The link does not move; the :class:`SharedTransport` above it does."""


# ---------------------------------------------------------------------- the process's transport


@attrs.define(eq=False)
class SharedTransport(SwitchingTransport):
    """The default transport: the controller of this process's memory cgroup, wherever it runs.

    :attr:`role` says where: ``"leader"`` (this process won the election and runs the
    controller; its own shrinkers use it directly and other processes join through a
    :class:`Door`), ``"follower"`` (another process runs it; registrations and reports go over
    a :class:`Link`) or ``"local"`` (this process could not join the controller, which runs as
    another user or refused it: it runs one of its own).

    .. versionadded:: 0.1.0
    """

    name: bytes = attrs.field(default=b"", kw_only=True)
    role: str = attrs.field(default="none", kw_only=True)
    _door: Door | None = attrs.field(default=None, alias="door")
    _link: Link | None = attrs.field(default=None, alias="link")
    _closed: bool = attrs.field(default=False, alias="closed")
    #: Seconds the last election took.
    last_election_s: float = 0.0

    @classmethod
    def join(cls, name: bytes | None = None) -> SharedTransport:
        """Meet the processes of this memory cgroup at ``name`` (default :func:`meeting_point`)."""
        transport = cls(name=meeting_point() if name is None else name)
        transport._set(transport._elect())
        return transport

    @property
    def door(self) -> Door | None:
        """The door followers come in by, when this process leads."""
        return self._door

    @property
    def leader_pid(self) -> int:
        """The pid of the process running the controller."""
        if self._link is not None:
            return self._link.leader_pid
        return os.getpid()

    def _set(self, transport: Transport) -> None:
        with self._lock:
            self._current = transport

    def _elect(self) -> Transport:
        """Lead, or follow whoever leads; alone if neither can be done in time."""
        start = time.monotonic()
        try:
            while not self._closed:
                listening = Door.bind(self.name)
                if listening is not None:
                    controller = default_controller()
                    self._door = Door.start(listening, controller)
                    self._link, self.role = None, "leader"
                    log.info("pyshrinker: this process runs the controller of its cgroup")
                    return EmbeddedTransport(controller)
                try:
                    link = Link.connect(self.name, self._leader_gone)
                except TransportPermissionError as err:
                    return self._alone(f"the cgroup's controller refused us: {err}")
                if link is not None:
                    self._link, self.role = link, "follower"
                    log.info("pyshrinker: following the controller in process %d", link.leader_pid)
                    return LinkTransport(link)
                if time.monotonic() - start > ELECTION_TIMEOUT:
                    return self._alone("no controller answered in time")
                time.sleep(0.002)  # the winner binds, then listens: a moment
            raise ControllerGone(errno.ENOTCONN, "closed")
        finally:
            self.last_election_s = time.monotonic() - start

    def _alone(self, why: str) -> Transport:
        log.warning("pyshrinker: %s; this process runs a controller of its own", why)
        self._link, self.role = None, "local"
        return EmbeddedTransport(default_controller())

    def _leader_gone(self, link: Link) -> None:
        # On the dead link's thread: elect again and have every member rejoin.
        if self._closed or link is not self._link:
            return
        log.warning("pyshrinker: the controller's process %d is gone: electing", link.leader_pid)
        with self._lock:
            self._current = None
        link.close()
        try:
            elected = self._elect()
        except Exception as err:
            elected = self._alone(f"the election failed ({err})")
        self.switch(elected, old_alive=False)

    def register(self, efd: int, chunk_size: int, cost: float) -> None:
        try:
            super().register(efd, chunk_size, cost)
        except (ControllerFull, TransportPermissionError) as err:
            self._go_alone(err)
            super().register(efd, chunk_size, cost)

    def _go_alone(self, why: BaseException) -> None:
        # The controller will not take this process's registrations: every member moves to a
        # controller of this process's own, unregistering from the elected one first.
        if self.role != "follower":
            raise why
        link = self._link
        self.switch(
            self._alone(f"the cgroup's controller refused a registration: {why}"), old_alive=True
        )
        if link is not None:
            link.close()

    def lost(self, transport: Transport, why: BaseException) -> None:
        """A report found the controller gone: cut the link; its thread fails over."""
        if isinstance(transport, LinkTransport):
            transport.link.abort()

    def status(self) -> dict[str, Any]:
        """The controller's status: its pid, followers, signals and every shrinker."""
        if self._door is not None:
            return self._door.status()
        if self._link is not None:
            reply: dict[str, Any] = json.loads(self._link.call(QUERY + b" status"))
            return reply
        controller = default_controller()
        return {"pid": os.getpid(), "followers": [], "signals": controller.describe_signals()}

    def close(self) -> None:
        """Leave: stop serving followers or close the link; idempotent (tests, shutdown)."""
        if self._closed:
            return
        self._closed = True
        if self._door is not None:
            self._door.close()
        if self._link is not None:
            self._link.close()

    def forget_after_fork(self) -> None:
        """In a forked child: close this copy's fds; the parent's election is not ours."""
        self._closed = True
        if self._door is not None:
            self._door.forget_after_fork()
        if self._link is not None:
            self._link.forget_after_fork()


def probe(name: bytes | None = None) -> dict[str, Any] | None:
    """The status of the controller elected at ``name`` (default: this process's cgroup), or
    None if no process runs one now. Registers nothing (``pyshrinker status`` uses it)."""
    link = Link.connect(meeting_point() if name is None else name, lambda gone: None)
    if link is None:
        return None
    try:
        status: dict[str, Any] = json.loads(link.call(QUERY + b" status"))
    finally:
        link.close()
    status["followers"] = [pid for pid in status["followers"] if pid != os.getpid()]
    return status


_default: SharedTransport | None = None
_default_lock = threading.Lock()


def default_shared() -> SharedTransport:
    """The process's :class:`SharedTransport`, joined on first use (and again in a child)."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = SharedTransport.join()
        return _default


def _after_fork_in_child() -> None:
    global _default, _default_lock
    _default_lock = threading.Lock()
    if _default is not None:
        _default.forget_after_fork()
        _default = None


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = [
    "ELECTION_ENV",
    "SCOPE_ENV",
    "Door",
    "Link",
    "LinkTransport",
    "SharedTransport",
    "default_shared",
    "election_enabled",
    "meeting_point",
    "peer_credentials",
    "probe",
]
