"""Other processes' registrations with one controller: what every door into it shares.

A door finds out, its own way, who is writing and gets its own copy of the eventfd a line names:
pyshrinkerd's FUSE files (the writer's credentials from FUSE, the eventfd through
``pidfd_getfd``) or the elected controller's socket (``SO_PEERCRED``, the eventfd passed with
``SCM_RIGHTS``). It then hands both here. This registry keeps each client process's
registrations keyed ``(pid, efd)``, enforces the bounds, refuses a second registration of one
eventfd, and forgets everything of a client that is gone. Behind it is the same
:class:`~pyshrinker.controller.Controller` that serves a process's own shrinkers: one registry of
counts and one policy, whichever door a registration came in by.

How the kernel behaves, and what follows:

* A duplicate keeps the eventfd alive, so a door cannot see a client close its copy. A
  registration ends on ``"<efd> -"`` (pyshrinker's unregistration line) or when the client goes
  (its process exits, its connection closes): :meth:`ClientRegistry.drop`.
* Every eventfd shares one anonymous inode, so ``st_ino`` cannot tell two apart; the
  ``eventfd-id`` of ``/proc/self/fdinfo/<fd>`` (Linux 5.10+) can, and it stays unique while the
  registration holds its duplicate.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Hashable
from typing import Any

import attrs

from pyshrinker.abi import Level, RegisterLevel, RegisterShrinker
from pyshrinker.controller import Controller, ShrinkerInfo, ShrinkRequest
from pyshrinker.errors import AbiError, PyshrinkerError

log = logging.getLogger(__name__)

#: Registrations one process may hold (shrinkers and level listeners).
DEFAULT_MAX_PER_PROCESS = 64
#: Registrations all processes together may hold.
DEFAULT_MAX_TOTAL = 4096


class Refused(PyshrinkerError, OSError):
    """A line a door refused; ``errno`` is what the writer gets.

    .. versionadded:: 0.1.0
    """


def refuse(code: int, why: str) -> Refused:
    """A :class:`Refused` with ``code`` and a message saying ``why``."""
    return Refused(code, f"{os.strerror(code)}: {why}")


def parse_eventfd_id(fdinfo: str) -> int | None:
    """The ``eventfd-id:`` of ``/proc/<pid>/fdinfo/<fd>`` text (Linux 5.10+), or None."""
    for line in fdinfo.splitlines():
        key, _, value = line.partition(":")
        if key == "eventfd-id":
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"bad eventfd-id line: {line!r}") from None
    return None


def eventfd_id(fd: int, proc: str = "/proc") -> int | None:
    """The kernel's id of the eventfd behind this process's ``fd``, None if it does not say."""
    info = os.open(f"{proc}/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # pos, flags, mnt_id, ino, eventfd-count, eventfd-id, eventfd-semaphore: ~120 bytes.
        data = os.read(info, 1024)
    finally:
        os.close(info)
    return parse_eventfd_id(data.decode("ascii", "replace"))


def pid_efd(key: Hashable) -> tuple[int, int]:
    """The ``(pid, efd)`` of a client's registration key; ``(-1, -1)`` for a local one."""
    if isinstance(key, tuple) and len(key) == 2:
        return int(key[0]), int(key[1])
    return -1, -1


@attrs.define(eq=False)
class Registration:
    """One eventfd a client registered: its number there, our duplicate, what for."""

    efd: int
    dup: int
    level: Level | None = None
    #: The eventfd's kernel id (see :func:`eventfd_id`), None if the kernel does not show it.
    ident: int | None = None


@attrs.define(eq=False)
class Client:
    """A client process and its registrations.

    ``release`` is what its door lets go of when it is dropped (a pidfd, a connection).
    """

    pid: int
    uid: int
    regs: dict[int, Registration] = attrs.field(factory=dict)
    release: Callable[[], None] | None = None


@attrs.define(eq=False)
class ClientRegistry:
    """Who registered which eventfd with :attr:`controller`, keyed ``(pid, efd)``.

    Methods ending in ``_locked`` expect :attr:`lock` held (a door holding it across its own
    checks); the others take it. Errors: :class:`Refused` (an errno for the writer) or
    :class:`~pyshrinker.errors.AbiError` (EINVAL).

    .. versionadded:: 0.1.0
    """

    controller: Controller
    max_per_process: int = DEFAULT_MAX_PER_PROCESS
    max_total: int = DEFAULT_MAX_TOTAL
    proc: str = "/proc"
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    _clients: dict[int, Client] = attrs.field(factory=dict, alias="clients")
    #: Registered eventfds by kernel id: (pid, efd) of the registration.
    _by_ident: dict[int, tuple[int, int]] = attrs.field(factory=dict, alias="by_ident")
    _total: int = attrs.field(default=0, alias="total")
    #: Counters for a status: lines taken, refusals by errno name, clients dropped.
    counters: dict[str, int] = attrs.field(factory=dict)
    _counter_lock: threading.Lock = attrs.field(factory=threading.Lock, alias="counter_lock")
    requests_sent: int = 0
    chunks_sent: int = 0

    def __attrs_post_init__(self) -> None:
        self.controller.add_request_hook(self._count_request)

    def _count_request(self, request: ShrinkRequest) -> None:
        with self._counter_lock:
            self.requests_sent += 1
            self.chunks_sent += request.chunks

    def bump(self, name: str) -> None:
        """Count one more ``name`` (its own lock: called with and without :attr:`lock`)."""
        with self._counter_lock:
            self.counters[name] = self.counters.get(name, 0) + 1

    @property
    def total(self) -> int:
        """Registrations held in all."""
        return self._total

    # ------------------------------------------------------------------ clients

    def client_locked(self, pid: int) -> Client | None:
        """The client ``pid``, if it has joined."""
        return self._clients.get(pid)

    def clients_locked(self) -> list[Client]:
        """Every client now."""
        return list(self._clients.values())

    def join_locked(self, pid: int, uid: int, release: Callable[[], None] | None) -> Client:
        """Add client ``pid`` (of user ``uid``); its door lets go of ``release`` when dropped."""
        if pid in self._clients:
            raise refuse(errno.EEXIST, f"process {pid} has joined already")
        client = Client(pid, uid, release=release)
        self._clients[pid] = client
        return client

    def drop_locked(self, client: Client) -> int:
        """Forget ``client``: unregister everything, close its duplicates; returns how many."""
        # Unregistering takes the controller's lock, which it holds while signalling: once
        # unregister returns, the duplicate is never written again and may be closed.
        dropped = len(client.regs)
        for reg in client.regs.values():
            self.controller.unregister((client.pid, reg.efd))
            self._forget_ident(reg)
            os.close(reg.dup)
        self._total -= dropped
        client.regs.clear()
        if self._clients.get(client.pid) is client:
            del self._clients[client.pid]
        self.controller.forget_owner(client.pid)
        if client.release is not None:
            release, client.release = client.release, None
            release()
        return dropped

    def drop(self, pid: int) -> int:
        """Forget client ``pid`` (gone); returns how many registrations it had."""
        with self.lock:
            client = self._clients.get(pid)
            return 0 if client is None else self.drop_locked(client)

    def _forget_ident(self, reg: Registration) -> None:
        # Called with the lock held, before the duplicate is closed (its id may then be reused).
        if reg.ident is not None:
            self._by_ident.pop(reg.ident, None)

    # ------------------------------------------------------------------ the ABI

    def register_locked(
        self, client: Client, parsed: RegisterShrinker | RegisterLevel, dup: int
    ) -> None:
        """Register ``client``'s eventfd ``parsed.efd``, of which ``dup`` is our copy.

        Takes ``dup`` over: on success the registration owns it, on failure it is closed.
        """
        key = (client.pid, parsed.efd)
        try:
            if parsed.efd in client.regs:
                raise refuse(errno.EINVAL, f"eventfd {parsed.efd} is already registered")
            if len(client.regs) >= self.max_per_process:
                raise refuse(
                    errno.ENOSPC, f"process {client.pid} has {len(client.regs)} registrations"
                )
            if self._total >= self.max_total:
                raise refuse(errno.ENOSPC, f"{self._total} registrations in all")
            # One eventfd, one registration, as the proposed kernel keyed them: the same
            # eventfd under a second fd number (dup, or inherited by a child) would be asked
            # twice for the same chunks.
            ident = eventfd_id(dup, self.proc)
            if ident is not None and ident in self._by_ident:
                pid, efd = self._by_ident[ident]
                why = f"eventfd {parsed.efd} is the one process {pid} registered as {efd}"
                raise refuse(errno.EINVAL, why)
            level = None if isinstance(parsed, RegisterShrinker) else parsed.level
            if isinstance(parsed, RegisterShrinker):
                self.controller.register(key, dup, parsed.chunk_size, parsed.cost)
            else:
                self.controller.register_level(key, dup, parsed.level)
        except BaseException:
            os.close(dup)
            raise
        client.regs[parsed.efd] = Registration(parsed.efd, dup, level, ident)
        if ident is not None:
            self._by_ident[ident] = key
        self._total += 1

    def unregister_locked(self, client: Client, efd: int) -> None:
        """``"<efd> -"``: forget one registration of ``client``."""
        reg = client.regs.pop(efd, None)
        if reg is None:
            raise refuse(errno.EINVAL, f"eventfd {efd} is not registered")
        self.controller.unregister((client.pid, efd))
        self._forget_ident(reg)
        os.close(reg.dup)
        self._total -= 1

    def report_locked(self, client: Client, efd: int, chunks: int) -> None:
        """``"<efd> <N>"`` from ``client``."""
        reg = client.regs.get(efd)
        if reg is None or reg.level is not None:
            raise refuse(errno.EINVAL, f"eventfd {efd} is not a registered shrinker")
        self.controller.report((client.pid, efd), chunks)

    def count_locked(self, client: Client, efd: int) -> int:
        """The controller's count of ``client``'s shrinker ``efd``."""
        reg = client.regs.get(efd)
        if reg is None or reg.level is not None:
            raise refuse(errno.EINVAL, f"eventfd {efd} is not a registered shrinker")
        try:
            return self.controller.count((client.pid, efd))
        except AbiError as err:  # dropped by the controller (its eventfd failed)
            raise refuse(errno.EINVAL, str(err)) from None

    # ------------------------------------------------------------------ status

    def status_lines(self, shown: Callable[[Client], bool] | None = None) -> list[dict[str, Any]]:
        """JSON-ready lines for every registration of the clients ``shown`` lets through.

        Shrinkers (with the controller's counts) and level listeners, each with its pid and efd.
        """
        with self.lock:
            visible = {c.pid for c in self._clients.values() if shown is None or shown(c)}
            levels = [
                {"kind": "level", "pid": c.pid, "efd": r.efd, "level": r.level.label}
                for c in self._clients.values()
                for r in c.regs.values()
                if r.level is not None and c.pid in visible
            ]
        lines = [
            shrinker_line(info)
            for info in self.controller.shrinkers()
            if pid_efd(info.key)[0] in visible
        ]
        return lines + levels


def shrinker_line(info: ShrinkerInfo) -> dict[str, Any]:
    """A status line for one shrinker."""
    pid, efd = pid_efd(info.key)
    return {
        "kind": "shrinker",
        "pid": pid,
        "efd": efd,
        "chunk_size": info.chunk_size,
        "cost": info.cost,
        "count": info.count,
        "requests": info.requests,
        "chunks_requested": info.chunks_requested,
    }


__all__ = [
    "Client",
    "ClientRegistry",
    "Refused",
    "Registration",
    "eventfd_id",
    "parse_eventfd_id",
    "pid_efd",
    "refuse",
    "shrinker_line",
]
