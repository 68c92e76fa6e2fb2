"""pyshrinkerd: the mempressure controller files, served over FUSE to many processes.

The daemon mounts a directory holding the proposal's three files (``cgroup.event_control``,
``mempressure.shrinker``, ``mempressure.level``) plus a read-only ``mempressure.status``, and
drives them with the same :class:`~pyshrinker.controller.Controller` as the embedded mode, over
one memory cgroup (its own by default, or ``--cgroup PATH``). Any process that may use the mount
registers through it exactly as it would with a kernel carrying the patch; the C program in
``examples/c`` does, unmodified.

How the kernel and libfuse behave, and what follows:

* Every request carries the caller's credentials (``fuse_get_context()``: uid, gid, pid). The
  pid is the *thread* id of the writing thread, translated into the daemon's pid namespace (0 if
  the writer is not visible there: refused). ``pidfd_open`` wants a thread-group leader, so the
  process is found through ``/proc/<tid>/status`` (``Tgid:``; ``Groups:`` gives the supplementary
  groups for ``--allow-gid``). The writer is blocked in ``write(2)`` until we answer, so that
  thread, and with it its process id, cannot be reused while we look.
* The eventfd named in a line is a number in the *writer's* fd table. Its ``/proc/<pid>/fd/<n>``
  link must read ``anon_inode:[eventfd]`` (reading a link opens nothing); then ``pidfd_getfd``
  on the writer's own pidfd duplicates it into the daemon (it needs ptrace rights over the
  writer: root has them), and the duplicate is checked again, in case the writer swapped the fd.
  The daemon never calls ``pidfd_getfd`` on any process but the writer's, nor on fds other than
  those a line names as eventfds; the shrinker/level fd field is checked by its link only.
* A duplicate keeps the eventfd alive, so the daemon cannot see a client close its copy. A
  registration ends on ``"<efd> -"`` (pyshrinker's unregistration line) or when the process
  exits: its pidfd polls readable once the whole thread group is gone (one watcher thread in
  epoll on all pidfds plus a wake-up eventfd), and all its duplicates are closed.
* A write to an eventfd waits while the counter cannot take the value, and a client can fill
  its own. The duplicate shares the client's file status flags (one open file description), so
  setting O_NONBLOCK on it would make the client's own reads fail with EAGAIN: the daemon bounds
  each write with a timer signal instead (:func:`~pyshrinker._syscalls.eventfd_write_within`)
  and drops a client it could not signal in :data:`SIGNAL_TIMEOUT`.
* The daemon must never block on its own mount: a FUSE request it made to itself would wait for
  a thread that is busy making it. So it reads ``/proc/.../fd`` links (no FUSE call) rather than
  ``fstat`` on duplicated files, and resolves the mount path before mounting.
* ``direct_io`` (per open and in the mount's config) and zero attribute/entry timeouts: every
  ``write(2)`` reaches the daemon as one request, nothing is cached, and a read of the status file
  returns what the daemon generated at open time, whatever the size ``getattr`` said (0).
* libfuse runs requests on several threads; the registry is guarded by one lock, taken before the
  controller's own (never the other way round).

Who may use it: without ``--allow-other`` the kernel lets only the mounting user in. With it,
every open and every write is checked: root, the daemon's own uid, ``--allow-uid`` users and
members of ``--allow-gid`` groups pass, others get EACCES. Root is always allowed because it can
take any process's fds anyway; refusing it would protect nothing. Only root and the daemon's
uid see every process in the status file and may use ``mempressure.request``; another allowed
user sees the daemon's totals and its own processes only.

Bounds: lines longer than :data:`~pyshrinker.abi.MAX_LINE` bytes are refused (EINVAL), as are
registrations past ``--max-per-process`` or ``--max-total`` (ENOSPC); at most
:data:`MAX_STATUS_OPEN` status files, holding :data:`MAX_STATUS_BYTES`, may be open at once
(EMFILE); the episodes remembered for the status hold :data:`MAX_EPISODE_ENTRIES` at most.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import argparse
import errno
import grp
import importlib
import json
import logging
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import attrs

from pyshrinker._argtypes import positive_int
from pyshrinker._syscalls import (
    EventfdFlag,
    eventfd,
    eventfd_drain,
    eventfd_write,
    eventfd_write_within,
    is_eventfd,
    pidfd_getfd,
    pidfd_open,
)
from pyshrinker.abi import (
    EVENT_CONTROL,
    LEVEL_FILE,
    MAX_LINE,
    SHRINKER_FILE,
    Level,
    RegisterShrinker,
    parse_event_control,
    parse_report,
)
from pyshrinker.cgroup import MemorySource, open_group, with_host_fallback
from pyshrinker.controller import Controller, ControllerConfig
from pyshrinker.errors import (
    AbiError,
    CgroupError,
    CgroupNotFound,
    PyshrinkerError,
    UnsupportedError,
)
from pyshrinker.registry import (
    DEFAULT_MAX_PER_PROCESS,
    DEFAULT_MAX_TOTAL,
    Client,
    ClientRegistry,
    pid_efd,
    refuse,
)

# STATUS_FILE: read-only, the registrations, the requests sent and the memory readings.
from pyshrinker.transport import STATUS_FILE, UNREGISTER_FIELD

# Named explicitly: under ``python -m`` this module is __main__.
log = logging.getLogger("pyshrinker.daemon")

#: Write-only, present only with ``--test-control``: ask for chunks or raise a level by hand.
REQUEST_FILE = "mempressure.request"

#: Requests and episodes the status file lists (the latest).
DEFAULT_STATUS_HISTORY = 1000
#: Status files open at once (each holds the snapshot taken at open).
MAX_STATUS_OPEN = 64
#: Bytes all open status snapshots may hold together; past it, an open is EMFILE.
MAX_STATUS_BYTES = 32 << 20
#: Entries (holdings and asks) all remembered episodes may hold together. With 4096 shrinkers an
#: episode is up to 8192 of them: without this bound 1000 episodes took more than a GB.
MAX_EPISODE_ENTRIES = 16384
#: What ``/proc/<pid>/fd/<n>`` reads for an eventfd.
EVENTFD_LINK = "anon_inode:[eventfd]"
#: Seconds a write to a client's eventfd may wait (its counter full) before the client is dropped.
#: Longer than a scheduler tick on purpose: a timer due sooner than the tick must reprogram the
#: clock event device when armed and disarmed, which costs a VM exit (measured here: 7.6 us a
#: write on average at 1 ms, 2.3 us at 5 ms and up; 0.9 us unbounded).
SIGNAL_TIMEOUT = 0.01


# ---------------------------------------------------------------------- who is writing


@attrs.frozen
class ProcStatus:
    """What the daemon needs from ``/proc/<tid>/status``."""

    tgid: int
    groups: frozenset[int]


def parse_proc_status(text: str) -> ProcStatus:
    """Parse the ``Tgid:`` and ``Groups:`` lines of ``/proc/<tid>/status``."""
    tgid: int | None = None
    groups: frozenset[int] = frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Tgid":
            try:
                tgid = int(value)
            except ValueError:
                raise ValueError(f"bad Tgid line: {line!r}") from None
        elif key == "Groups":
            try:
                groups = frozenset(int(g) for g in value.split())
            except ValueError:
                raise ValueError(f"bad Groups line: {line!r}") from None
    if tgid is None or tgid <= 0:
        raise ValueError("no Tgid line")
    return ProcStatus(tgid, groups)


def read_proc_status(tid: int, proc: str = "/proc") -> ProcStatus:
    """Read the thread-group id and groups of thread ``tid``; ESRCH if it is gone."""
    try:
        fd = os.open(f"{proc}/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise refuse(errno.ESRCH, f"thread {tid} is gone") from None
    try:
        # Tgid is the fourth line and Groups the tenth or so: the first 2 KiB hold both.
        data = os.read(fd, 2048)
    finally:
        os.close(fd)
    return parse_proc_status(data.decode("ascii", "replace"))


@attrs.frozen
class Caller:
    """The writer of one FUSE request: its thread, process and credentials."""

    tid: int
    tgid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@attrs.frozen
class AccessPolicy:
    """Who may open and write the controller files (besides root and the daemon's own uid)."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    owner: int = attrs.field(factory=os.geteuid)

    def allows(self, uid: int, gid: int, groups: Iterable[int] = ()) -> bool:
        """Whether a caller with these credentials may use the files."""
        if uid in (0, self.owner) or uid in self.uids:
            return True
        return bool(self.gids) and (gid in self.gids or not self.gids.isdisjoint(groups))

    def privileged(self, uid: int) -> bool:
        """Root or the daemon's own user: sees every process in the status, may test-control."""
        return uid in (0, self.owner)

    def needs_groups(self, uid: int, gid: int) -> bool:
        """Whether the answer for (uid, gid) depends on the supplementary groups."""
        return bool(self.gids) and not self.allows(uid, gid)


# ---------------------------------------------------------------------- the test-only control


@attrs.frozen
class RequestCommand:
    """``"<pid> <efd> <chunks>"``: ask that shrinker for up to ``chunks`` now."""

    pid: int
    efd: int
    chunks: int


@attrs.frozen
class ShrinkCommand:
    """``"shrink <bytes>"``: ask all shrinkers for ``nbytes`` in proportion, as pressure would."""

    nbytes: int


@attrs.frozen
class LevelCommand:
    """``"level <low|medium|oom>"``: signal that level's listeners (and those below)."""

    level: Level


def parse_test_control(line: bytes) -> RequestCommand | ShrinkCommand | LevelCommand:
    """Parse a line written to ``mempressure.request`` (only served with ``--test-control``)."""
    if len(line) > MAX_LINE:
        raise AbiError(f"line longer than {MAX_LINE} bytes")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise AbiError("line is not ASCII") from None
    tokens = text.rstrip("\n").split()
    if "\n" in text.rstrip("\n"):
        raise AbiError("one line per write")
    if len(tokens) == 2 and tokens[0] == "level":
        return LevelCommand(Level.parse(tokens[1]))
    numbers: list[int] = []
    for token in tokens[1:] if tokens[:1] == ["shrink"] else tokens:
        if not token.isdigit() or not token.isascii():
            raise AbiError(f"expected a non-negative decimal integer, got {token!r}")
        numbers.append(int(token))
    if tokens[:1] == ["shrink"] and len(numbers) == 1:
        return ShrinkCommand(numbers[0])
    if len(numbers) == 3:
        return RequestCommand(*numbers)
    raise AbiError("expected '<pid> <efd> <chunks>', 'shrink <bytes>' or 'level <level>'")


# ---------------------------------------------------------------------- the controller


@attrs.frozen
class Holding:
    """One shrinker's count as it stood when an episode began."""

    key: Hashable
    count: int
    chunk_size: int
    cost: float
    #: Its process let a round of asks down this episode: it weighed a sixteenth
    #: (:data:`pyshrinker.policy.DISTRUSTED_WEIGHT`).
    distrusted: bool = False


@attrs.frozen
class Episode:
    """One proportional shrink: what was needed, what each shrinker held, what each was asked."""

    monotonic: float
    need: int
    reason: str
    holdings: tuple[Holding, ...]
    asked: tuple[tuple[Hashable, int], ...]


@attrs.define(eq=False)
class DaemonController(Controller):
    """A :class:`Controller` that also remembers each shrink's inputs (for the status file).

    .. versionadded:: 0.1.0
    """

    _episodes: deque[Episode] = attrs.field(factory=deque, alias="episodes")
    _episodes_kept: int = attrs.field(default=DEFAULT_STATUS_HISTORY, alias="episodes_kept")
    _episode_entries: int = attrs.field(default=0, alias="episode_entries")
    _episode_lock: threading.Lock = attrs.field(factory=threading.Lock, alias="episode_lock")
    #: Processes an eventfd of which could not be signalled (see :meth:`_write_eventfd`).
    unanswerable: set[int] = attrs.field(factory=set)

    def _write_eventfd(self, key: Hashable, fd: int, value: int) -> None:
        # The eventfd is a client's: it may have filled the counter of a blocking one, and a
        # plain write would then wait, holding the controller's lock, until the client reads.
        # Bounded, the write gives up (the controller drops that registration) and the process
        # may not register again until it exits.
        try:
            eventfd_write_within(fd, value, SIGNAL_TIMEOUT)
        except BlockingIOError:
            self.unanswerable.add(pid_efd(key)[0])
            raise

    def forget_owner(self, owner: Hashable) -> None:
        """Process ``owner`` is gone: it is no longer distrusted, nor refused."""
        super().forget_owner(owner)
        self.unanswerable.discard(owner)

    def shrink(self, nbytes: int, reason: str = "explicit") -> dict[Hashable, int]:
        # Counts are read just before the shrink takes the lock; a report landing in between
        # moves them by a batch at most. Shrinkers holding nothing weigh nothing: not kept.
        before = self.shrinkers()
        distrusted = set(self.distrusted())
        asked = super().shrink(nbytes, reason)
        if asked:
            holdings = tuple(
                Holding(i.key, i.count, i.chunk_size, i.cost, self._owner(i.key) in distrusted)
                for i in before
                if i.count > 0
            )
            episode = Episode(time.monotonic(), nbytes, reason, holdings, tuple(asked.items()))
            self._remember(episode)
        return asked

    def _remember(self, episode: Episode) -> None:
        # The latest episodes, as many as the status lists and MAX_EPISODE_ENTRIES allow
        # (the latest one always).
        with self._episode_lock:
            self._episodes.append(episode)
            self._episode_entries += _entries(episode)
            while len(self._episodes) > 1 and (
                len(self._episodes) > self._episodes_kept
                or self._episode_entries > MAX_EPISODE_ENTRIES
            ):
                self._episode_entries -= _entries(self._episodes.popleft())

    def episodes(self) -> list[Episode]:
        """The latest proportional shrinks, oldest first."""
        with self._episode_lock:
            return list(self._episodes)

    def keep_history(self, entries: int) -> None:
        """Keep the latest ``entries`` episodes (and no more than MAX_EPISODE_ENTRIES hold)."""
        with self._episode_lock:
            self._episodes_kept = max(1, entries)
            while len(self._episodes) > self._episodes_kept:
                self._episode_entries -= _entries(self._episodes.popleft())


def _entries(episode: Episode) -> int:
    return len(episode.holdings) + len(episode.asked)


def open_memory(path: str) -> MemorySource:
    """Open the cgroup at ``path``, v1 or v2; where no limit applies, the machine's memory."""
    try:
        group = open_group(path)
    except CgroupNotFound as err:
        raise UnsupportedError(errno.ENOENT, str(err)) from err
    return with_host_fallback(group)


def controller_for(cgroup: str | None, config: ControllerConfig | None = None) -> DaemonController:
    """The daemon's controller: over its own memory cgroup, or over the group at ``cgroup``."""
    if cgroup is None:
        return DaemonController.for_current_process(config=config)
    return DaemonController.for_memory(open_memory(cgroup), config=config)


# ---------------------------------------------------------------------- exit watcher


@attrs.define(eq=False)
class ExitWatcher:
    """One thread in epoll on pidfds and a wake-up eventfd; calls ``on_exit(pidfd)`` on exit.

    A pidfd polls readable once its process has exited (all threads). ``on_exit`` runs on the
    watcher thread and must :meth:`remove` the pidfd before closing it.
    """

    _on_exit: Callable[[int], None] = attrs.field(alias="on_exit")
    _epoll: select.epoll = attrs.field(factory=select.epoll, alias="epoll")
    _wake_fd: int = attrs.field(default=-1, alias="wake_fd")
    _thread: threading.Thread | None = attrs.field(default=None, alias="thread")
    _stopping: bool = attrs.field(default=False, alias="stopping")

    @classmethod
    def start(cls, on_exit: Callable[[int], None]) -> ExitWatcher:
        """Create the epoll set and wake-up fd and start the thread."""
        watcher = cls(on_exit=on_exit)
        watcher._wake_fd = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
        watcher._epoll.register(watcher._wake_fd, select.EPOLLIN)
        watcher._thread = threading.Thread(
            target=watcher._run, name="pyshrinkerd-exit-watcher", daemon=True
        )
        watcher._thread.start()
        return watcher

    def add(self, pidfd: int) -> None:
        """Watch ``pidfd`` (level-triggered: an exited process stays readable until removed)."""
        self._epoll.register(pidfd, select.EPOLLIN)

    def remove(self, pidfd: int) -> None:
        """Stop watching ``pidfd``."""
        try:
            self._epoll.unregister(pidfd)
        except (OSError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stopping:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                break  # closed under us at shutdown
            for fd, _mask in events:
                if fd == self._wake_fd:
                    eventfd_drain(self._wake_fd)
                    continue
                try:
                    self._on_exit(fd)
                except Exception:
                    log.exception("dropping an exited process failed; watcher continues")
                    self.remove(fd)

    def close(self) -> None:
        """Stop and join the thread, close the fds; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._wake_fd >= 0:
            eventfd_write(self._wake_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._epoll.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1


# ---------------------------------------------------------------------- the registry


def _exited(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


@attrs.define(eq=False)
class Registry(ClientRegistry):
    """The FUSE door: the file ABI's writers, identified and checked, into the shared registry.

    Independent of FUSE itself: each method takes the :class:`Caller` and the bytes written, and
    raises :class:`Refused` (an OSError with the errno to answer) or :class:`AbiError` (EINVAL).
    A client is a writer's process, watched through its pidfd.

    .. versionadded:: 0.1.0
    """

    controller: DaemonController = attrs.field(kw_only=True)
    #: The mount point's real path: the shrinker/level fd of a line must name a file under it.
    mount: str = attrs.field(kw_only=True)
    policy: AccessPolicy = attrs.field(factory=AccessPolicy, kw_only=True)
    status_history: int = attrs.field(default=DEFAULT_STATUS_HISTORY, kw_only=True)
    _pidfds: dict[int, int] = attrs.field(factory=dict, alias="pidfds")
    _by_pidfd: dict[int, int] = attrs.field(factory=dict, alias="by_pidfd")
    _watcher: ExitWatcher | None = attrs.field(default=None, alias="watcher")
    _closed: bool = attrs.field(default=False, alias="closed")
    _started: float = attrs.field(factory=time.monotonic, alias="started")

    @classmethod
    def start(cls, controller: DaemonController, mount: str, **options: Any) -> Registry:
        """A registry over ``controller`` for files under ``mount``, its exit watcher running."""
        registry = cls(controller=controller, mount=os.path.realpath(mount), **options)
        controller.keep_history(registry.status_history)
        registry._watcher = ExitWatcher.start(registry._process_exited)
        return registry

    def _bump(self, name: str) -> None:
        self.bump(name)

    # ------------------------------------------------------------------ callers

    def caller(self, tid: int, uid: int, gid: int) -> Caller:
        """Identify the writer of a request from its FUSE context (pid = thread id)."""
        if tid <= 0:
            # The writer lives in a pid namespace the daemon cannot see into.
            raise refuse(errno.EPERM, "writer not visible in the daemon's pid namespace")
        if not self.policy.needs_groups(uid, gid):
            with self.lock:
                pidfd = self._pidfds.get(tid)
                if pidfd is not None and not _exited(pidfd):
                    # The thread id is the pid of a registered process that is alive: it is that
                    # process's main thread (a leader's pid stays taken until its whole thread
                    # group is gone). Skips /proc/<tid>/status, about 20 us of a ~45 us write.
                    return Caller(tid, tid, uid, gid)
        status = read_proc_status(tid, self.proc)
        return Caller(tid, status.tgid, uid, gid, status.groups)

    def check_access(self, caller: Caller) -> None:
        """EACCES unless the policy lets ``caller`` in."""
        if not self.policy.allows(caller.uid, caller.gid, caller.groups):
            raise refuse(errno.EACCES, f"uid {caller.uid} gid {caller.gid} not allowed")

    # ------------------------------------------------------------------ processes

    def _process_for(self, caller: Caller, create: bool) -> Client | None:
        # Called with the lock held.
        client = self.client_locked(caller.tgid)
        if client is not None and _exited(self._pidfds[client.pid]):
            # An exit the watcher has not handled yet, and the pid already reused.
            self.drop_locked(client)
            client = None
        if client is None and create:
            try:
                pidfd = pidfd_open(caller.tgid)
            except OSError as err:
                raise refuse(err.errno or errno.ESRCH, f"pidfd_open({caller.tgid})") from err
            client = self.join_locked(caller.tgid, caller.uid, lambda: self._release(pidfd))
            self._pidfds[caller.tgid] = pidfd
            self._by_pidfd[pidfd] = caller.tgid
            if self._watcher is not None:
                self._watcher.add(pidfd)
        return client

    def _release(self, pidfd: int) -> None:
        # Called with the lock held, when the client is dropped.
        pid = self._by_pidfd.pop(pidfd, None)
        if pid is not None and self._pidfds.get(pid) == pidfd:
            del self._pidfds[pid]
        if self._watcher is not None:
            self._watcher.remove(pidfd)
        os.close(pidfd)

    def _forget_if_empty(self, client: Client) -> None:
        if not client.regs and self.client_locked(client.pid) is client:
            self.drop_locked(client)

    def _process_exited(self, pidfd: int) -> None:
        with self.lock:
            pid = self._by_pidfd.get(pidfd)
            client = self.client_locked(pid) if pid is not None else None
            if client is None:
                if self._watcher is not None:
                    self._watcher.remove(pidfd)
                return
            dropped = self.drop_locked(client)
            self._bump("processes_exited")
        log.info("process %d exited: %d registrations dropped", client.pid, dropped)

    # ------------------------------------------------------------------ the ABI

    def _check_target(self, caller: Caller, fd: int, name: str) -> None:
        # The kernel checks that the second fd of a registration is the control file it names.
        # Its /proc link says which file it is without opening it (and without a FUSE call).
        try:
            target = os.readlink(f"{self.proc}/{caller.tgid}/fd/{fd}")
        except FileNotFoundError:
            raise refuse(errno.EBADF, f"fd {fd} is not open in process {caller.tgid}") from None
        if target != os.path.join(self.mount, name):
            raise refuse(errno.EINVAL, f"fd {fd} is {target!r}, not this directory's {name}")

    def _duplicate_eventfd(self, client: Client, efd: int) -> int:
        # Look before taking: closing a duplicate of some other file would run its flush, and
        # a FUSE file's flush waits for its server (this daemon, or a hung one).
        try:
            link = os.readlink(f"{self.proc}/{client.pid}/fd/{efd}")
        except FileNotFoundError:
            raise refuse(errno.EBADF, f"fd {efd} is not open in process {client.pid}") from None
        if link != EVENTFD_LINK:
            raise refuse(errno.EINVAL, f"fd {efd} of process {client.pid} is {link!r}")
        # pidfd_getfd only ever on the writer's own pidfd: a line cannot reach anyone else's fds.
        # The writer may have swapped the fd since: check the duplicate itself too.
        try:
            dup = pidfd_getfd(self._pidfds[client.pid], efd)
        except OSError as err:
            code = err.errno or errno.EBADF
            raise refuse(code, f"eventfd {efd} of process {client.pid}") from err
        if not is_eventfd(dup):
            os.close(dup)
            raise refuse(errno.EINVAL, f"fd {efd} of process {client.pid} is not an eventfd")
        return dup

    def event_control(self, caller: Caller, line: bytes) -> None:
        """A write to ``cgroup.event_control``: register a shrinker or a level, or unregister."""
        self.check_access(caller)
        tokens = line.split()
        if len(line) <= MAX_LINE and len(tokens) == 2 and tokens[1] == UNREGISTER_FIELD.encode():
            self._unregister(caller, line)
            return
        parsed = parse_event_control(line)
        with self.lock:
            client = self._process_for(caller, create=True)
            assert client is not None
            try:
                if client.pid in self.controller.unanswerable:
                    raise refuse(errno.EPERM, f"process {client.pid} left an eventfd unanswerable")
                if isinstance(parsed, RegisterShrinker):
                    self._check_target(caller, parsed.shrinker_fd, SHRINKER_FILE)
                else:
                    self._check_target(caller, parsed.level_fd, LEVEL_FILE)
                if parsed.efd in client.regs:
                    raise refuse(errno.EINVAL, f"eventfd {parsed.efd} is already registered")
                self.register_locked(client, parsed, self._duplicate_eventfd(client, parsed.efd))
            finally:
                self._forget_if_empty(client)
        self._bump("registrations")

    def _unregister(self, caller: Caller, line: bytes) -> None:
        efd_token = line.split()[0].decode("ascii", "replace")
        if not efd_token.isdigit():
            raise AbiError(f"eventfd must be a decimal integer, got {efd_token!r}")
        efd = int(efd_token)
        with self.lock:
            client = self._process_for(caller, create=False)
            if client is None:
                raise refuse(errno.EINVAL, f"eventfd {efd} is not registered")
            self.unregister_locked(client, efd)
            self._forget_if_empty(client)
        self._bump("unregistrations")

    def report(self, caller: Caller, line: bytes) -> None:
        """A write to ``mempressure.shrinker``: ``"<efd> <N>"``."""
        self.check_access(caller)
        parsed = parse_report(line)
        with self.lock:
            client = self._process_for(caller, create=False)
            if client is None:
                raise refuse(errno.EINVAL, f"eventfd {parsed.efd} is not a registered shrinker")
            self.report_locked(client, parsed.efd, parsed.chunks)
        self._bump("reports")

    def check_test_control(self, caller: Caller) -> None:
        """EACCES unless ``caller`` may use ``mempressure.request``: root or the daemon's user.

        It asks any process for chunks and raises levels for all: an allowed user may register
        and report, not make the daemon ask other users' processes.
        """
        if not self.policy.privileged(caller.uid):
            raise refuse(errno.EACCES, f"uid {caller.uid} may not use {REQUEST_FILE}")

    def test_control(self, caller: Caller, line: bytes) -> None:
        """A write to ``mempressure.request`` (``--test-control`` only)."""
        self.check_access(caller)
        self.check_test_control(caller)
        command = parse_test_control(line)
        if isinstance(command, LevelCommand):
            self.controller.notify_level(command.level)
        elif isinstance(command, ShrinkCommand):
            self.controller.shrink(command.nbytes, reason="test-control")
        else:
            key = (command.pid, command.efd)
            try:
                self.controller.request(key, command.chunks, reason="test-control")
            except AbiError:
                raise refuse(errno.EINVAL, f"no shrinker {key}") from None
        self._bump("test_control")

    # ------------------------------------------------------------------ status

    def status(self, viewer: Caller | None = None) -> bytes:
        """The status file's content: JSON lines (see :func:`parse_status`).

        For root and the daemon's user (and ``viewer=None``) every process; for another allowed
        user only the processes that user registered, plus the daemon's totals: pids, counts
        and requests are not shown across users.
        """
        lines: list[dict[str, Any]] = []
        controller = self.controller
        memory: dict[str, Any] = {"kind": "daemon", "pid": os.getpid(), "mount": self.mount}
        memory["uptime_s"] = round(time.monotonic() - self._started, 3)
        if controller.memory is not None:
            memory["source"] = controller.memory.version.value
            memory["path"] = controller.memory.path
            try:
                state = controller.memory.read()
                memory.update(usage=state.usage, working_set=state.working_set, limit=state.limit)
            except (CgroupError, OSError) as err:
                memory["error"] = str(err)
        marks = controller.watermarks
        if marks is not None:
            memory.update(high=marks.high, low=marks.low)
        memory["signals"] = controller.describe_signals()
        with self.lock:
            memory.update(processes=len(self.clients_locked()), registrations=self.total)
            # Root and the daemon's user see everything, gone processes' requests included;
            # another user only the processes of theirs registered now.
            shown: set[int] | None = None
            if viewer is not None and not self.policy.privileged(viewer.uid):
                shown = {c.pid for c in self.clients_locked() if c.uid == viewer.uid}

        def shows(pid: int) -> bool:
            return shown is None or pid in shown

        def visible(key: Hashable) -> bool:
            return shows(pid_efd(key)[0])

        memory["distrusted"] = sorted(
            pid for pid in controller.distrusted() if isinstance(pid, int) and shows(pid)
        )
        memory["unanswerable"] = sorted(pid for pid in controller.unanswerable if shows(pid))
        memory.update(
            requests_sent=self.requests_sent,
            chunks_sent=self.chunks_sent,
            counters=dict(self.counters),
        )
        lines.append(memory)
        lines.extend(self.status_lines(lambda client: shows(client.pid)))
        for request in controller.history()[-self.status_history :]:
            if not visible(request.key):
                continue
            pid, efd = pid_efd(request.key)
            lines.append(
                {
                    "kind": "request",
                    "t": round(request.monotonic, 6),
                    "pid": pid,
                    "efd": efd,
                    "chunks": request.chunks,
                    "reason": request.reason,
                }
            )
        for episode in controller.episodes():
            lines.append(
                {
                    "kind": "episode",
                    "t": round(episode.monotonic, 6),
                    "need": episode.need,
                    "reason": episode.reason,
                    "holdings": [
                        [*pid_efd(h.key), h.count, h.chunk_size, h.cost, h.distrusted]
                        for h in episode.holdings
                        if visible(h.key)
                    ],
                    "asked": [
                        [*pid_efd(key), chunks] for key, chunks in episode.asked if visible(key)
                    ],
                }
            )
        return "".join(json.dumps(line) + "\n" for line in lines).encode("ascii")

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the watcher, forget every process, close every duplicate; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.close()
        with self.lock:
            self._watcher = None
            for client in self.clients_locked():
                self.drop_locked(client)


# ---------------------------------------------------------------------- reading the status


@attrs.frozen
class StatusShrinker:
    """A shrinker line of the status file."""

    pid: int
    efd: int
    chunk_size: int
    cost: float
    count: int
    requests: int
    chunks_requested: int


@attrs.frozen
class StatusLevel:
    """A level listener line of the status file."""

    pid: int
    efd: int
    level: Level


@attrs.frozen
class StatusRequest:
    """A request line: ``chunks`` asked of (pid, efd) at ``t`` (CLOCK_MONOTONIC seconds)."""

    t: float
    pid: int
    efd: int
    chunks: int
    reason: str


@attrs.frozen
class StatusHolding:
    """One shrinker's count when an episode began."""

    pid: int
    efd: int
    count: int
    chunk_size: int
    cost: float
    distrusted: bool = False


@attrs.frozen
class StatusEpisode:
    """An episode line: a proportional shrink of ``need`` bytes, the counts it saw, the asks."""

    t: float
    need: int
    reason: str
    holdings: tuple[StatusHolding, ...]
    asked: tuple[tuple[int, int, int], ...]


@attrs.frozen
class Status:
    """The status file, parsed."""

    daemon: dict[str, Any]
    shrinkers: tuple[StatusShrinker, ...]
    levels: tuple[StatusLevel, ...]
    requests: tuple[StatusRequest, ...]
    episodes: tuple[StatusEpisode, ...]

    def shrinkers_of(self, pid: int) -> list[StatusShrinker]:
        """The shrinkers process ``pid`` registered."""
        return [s for s in self.shrinkers if s.pid == pid]


def parse_status(text: str) -> Status:
    """Parse ``mempressure.status``: one JSON object a line, ``kind`` says which."""
    daemon: dict[str, Any] = {}
    shrinkers, levels, requests, episodes = [], [], [], []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        item = json.loads(raw)
        kind = item.pop("kind")
        if kind == "daemon":
            daemon = item
        elif kind == "shrinker":
            shrinkers.append(StatusShrinker(**item))
        elif kind == "level":
            levels.append(StatusLevel(item["pid"], item["efd"], Level.parse(item["level"])))
        elif kind == "request":
            requests.append(StatusRequest(**item))
        elif kind == "episode":
            holdings = tuple(StatusHolding(*h) for h in item["holdings"])
            asked = tuple((int(a[0]), int(a[1]), int(a[2])) for a in item["asked"])
            episodes.append(StatusEpisode(item["t"], item["need"], item["reason"], holdings, asked))
    return Status(daemon, tuple(shrinkers), tuple(levels), tuple(requests), tuple(episodes))


def read_status(mount: str) -> Status:
    """Read and parse ``<mount>/mempressure.status``."""
    with open(os.path.join(mount, STATUS_FILE), encoding="ascii") as f:
        return parse_status(f.read())


# ---------------------------------------------------------------------- FUSE


@attrs.frozen
class _File:
    mode: int
    writer: Callable[[Caller, bytes], None] | None = None


class Operations:
    """The FUSE operations (mfusepy's high-level API) over a :class:`Registry`.

    Handlers raise ``FuseOSError(errno)``; mfusepy turns that into the reply's error.
    """

    #: mfusepy: times in nanoseconds.
    use_ns = True

    def __init__(
        self,
        registry: Registry,
        fuse: Any,
        *,
        test_control: bool = False,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._registry = registry
        self._fuse = fuse
        self._on_ready = on_ready
        self._files: dict[str, _File] = {
            "/" + EVENT_CONTROL: _File(0o222, registry.event_control),
            "/" + SHRINKER_FILE: _File(0o222, registry.report),
            "/" + LEVEL_FILE: _File(0o444),
            "/" + STATUS_FILE: _File(0o444),
        }
        if test_control:
            self._files["/" + REQUEST_FILE] = _File(0o200, registry.test_control)
        self._lock = threading.Lock()
        self._snapshots: dict[int, bytes] = {}
        self._next_fh = 1
        self._time_ns = time.time_ns()
        self._uid, self._gid = os.geteuid(), os.getegid()

    def _error(self, code: int) -> OSError:
        error: OSError = self._fuse.FuseOSError(code)
        return error

    def _caller(self) -> Caller:
        uid, gid, tid = self._fuse.fuse_get_context()
        return self._registry.caller(tid, uid, gid)

    def init(self, path: str) -> None:
        """The kernel answered INIT: the mount is in place."""
        log.info("serving %s", self._registry.mount)
        if self._on_ready is not None:
            self._on_ready()

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        """Attributes: a directory of fixed files, owned by the daemon's user."""
        common = {"st_uid": self._uid, "st_gid": self._gid}
        common.update(st_atime=self._time_ns, st_mtime=self._time_ns, st_ctime=self._time_ns)
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **common}
        file = self._files.get(path)
        if file is None:
            raise self._error(errno.ENOENT)
        return {"st_mode": stat.S_IFREG | file.mode, "st_nlink": 1, "st_size": 0, **common}

    def readdir(self, path: str, fh: Any) -> list[str]:
        """The directory's entries."""
        if path != "/":
            raise self._error(errno.ENOTDIR)
        return [".", "..", *(name.lstrip("/") for name in self._files)]

    def open(self, path: str, fi: Any) -> int:
        """Check the mode against the file and the caller against the policy."""
        file = self._files.get(path)
        if file is None:
            raise self._error(errno.ENOENT)
        try:
            caller = self._caller()
            self._registry.check_access(caller)
            if path == "/" + REQUEST_FILE:
                self._registry.check_test_control(caller)
        except OSError as err:
            raise self._error(err.errno or errno.EACCES) from err
        accmode = fi.flags & os.O_ACCMODE
        wants_write = accmode in (os.O_WRONLY, os.O_RDWR)
        wants_read = accmode in (os.O_RDONLY, os.O_RDWR)
        if (wants_write and not file.mode & 0o222) or (wants_read and not file.mode & 0o444):
            raise self._error(errno.EACCES)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            if path == "/" + STATUS_FILE:
                if len(self._snapshots) >= MAX_STATUS_OPEN:
                    raise self._error(errno.EMFILE)
                self._snapshots[fh] = b""
        if path == "/" + STATUS_FILE:
            snapshot = self._registry.status(caller)
            with self._lock:
                held = sum(len(each) for each in self._snapshots.values())
                if held + len(snapshot) > MAX_STATUS_BYTES:
                    del self._snapshots[fh]
                    raise self._error(errno.EMFILE)
                self._snapshots[fh] = snapshot
        fi.fh = fh
        # No page cache: every write(2) is one request, every read sees our snapshot.
        fi.direct_io = 1
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        """The status snapshot taken at open; other files cannot be read (EINVAL, as cgroup)."""
        with self._lock:
            snapshot = self._snapshots.get(fi.fh)
        if snapshot is None:
            raise self._error(errno.EINVAL)
        return snapshot[offset : offset + size]

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        """One write is one line of the ABI; the file offset is ignored, as cgroup files do."""
        file = self._files.get(path)
        if file is None or file.writer is None:
            raise self._error(errno.EINVAL)
        if len(data) > MAX_LINE:
            raise self._error(errno.EINVAL)
        try:
            file.writer(self._caller(), data)
        except AbiError as err:
            log.debug("%s: %r refused: %s", path, data, err)
            self._registry._bump("EINVAL")
            raise self._error(errno.EINVAL) from err
        except OSError as err:
            code = err.errno or errno.EIO
            log.debug("%s: %r refused: %s", path, data, err)
            self._registry._bump(errno.errorcode.get(code, str(code)))
            raise self._error(code) from err
        return len(data)

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        """``open(..., O_TRUNC)`` (a shell's ``>``) truncates first: accepted, nothing to do."""
        if path not in self._files:
            raise self._error(errno.ENOENT)
        return 0

    def release(self, path: str, fi: Any) -> int:
        """Forget a status snapshot."""
        with self._lock:
            self._snapshots.pop(fi.fh, None)
        return 0


def _import_fuse() -> Any:
    try:
        return importlib.import_module("mfusepy")
    except ImportError as err:
        raise UnsupportedError(
            errno.ENOSYS, f"pyshrinkerd needs mfusepy: pip install 'pyshrinker[daemon]' ({err})"
        ) from err
    except OSError as err:  # mfusepy found no libfuse
        raise UnsupportedError(
            errno.ENOSYS, f"pyshrinkerd needs libfuse (apt-get install fuse3): {err}"
        ) from err


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) when $NOTIFY_SOCKET is set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("ascii"), address)
    except OSError as err:
        log.warning("sd_notify(%s) failed: %s", message, err)


# ---------------------------------------------------------------------- running it as a child


def fuse_unavailable() -> str | None:
    """Why pyshrinkerd cannot mount here (no /dev/fuse, fusermount3, libfuse, mfusepy) or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (apt-get install fuse3)"
    try:
        _import_fuse()
    except UnsupportedError as err:
        return str(err)
    return None


def mounted(path: str) -> bool:
    """Whether ``path`` is a mount point now (from mountinfo: a dead FUSE mount's stat fails)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            # mountinfo escapes space, tab, newline and backslash as a backslash and 3 octal digits.
            if len(fields) > 4 and _OCTAL.sub(_unoctal, fields[4]) == real:
                return True
    return False


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unoctal(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 8))


def unmount(path: str) -> None:
    """``fusermount3 -u`` (lazily if busy); nothing if ``path`` is not mounted."""
    if not mounted(path):
        return
    done = subprocess.run(["fusermount3", "-u", path], capture_output=True, check=False)
    if done.returncode != 0 and mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, check=False)


def prepare_mount_point(path: str) -> str | None:
    """Make ``path`` ready to mount on; why it cannot be, or None.

    A mount left by a daemon that died (SIGKILL, a crash) answers every call with ENOTCONN: it
    is unmounted (lazily, if busy) so that a new daemon can take its place and its clients find
    it again. A mount whose daemon answers is refused: two daemons would each believe they
    serve the directory.
    """
    if mounted(path):
        try:
            os.stat(path)
        except OSError as err:
            if err.errno != errno.ENOTCONN:
                return f"mount point {path}: {err}"
            log.warning("%s: a dead daemon's mount (ENOTCONN): unmounting it", path)
            unmount(path)
        else:
            if os.path.exists(os.path.join(path, EVENT_CONTROL)):
                return f"{path} is served already (another pyshrinkerd answers there)"
            return f"{path} is a mount point of something else"
        if mounted(path):
            return f"{path}: could not unmount the dead daemon's mount"
    if not os.path.isdir(path):
        return f"mount point {path} is not a directory"
    return None


@attrs.define(eq=False)
class DaemonProcess:
    """pyshrinkerd started as a child process (tests, benchmarks): :meth:`stop` unmounts it.

    .. versionadded:: 0.1.0
    """

    mount: str
    popen: subprocess.Popen[bytes]
    #: Whether it mounted (and so whether :meth:`stop` may unmount: a daemon that refused to
    #: start must not unmount the directory another daemon serves).
    served: bool = False

    @classmethod
    def start(
        cls,
        mount: str,
        args: Iterable[str] = (),
        *,
        timeout: float = 15.0,
        python: str = sys.executable,
        **popen_kwargs: Any,
    ) -> DaemonProcess:
        """Start ``python -m pyshrinker.daemon --mount mount *args`` and wait until it serves.

        Readiness comes through a pipe (``--ready-fd``): the daemon writes to it from FUSE's
        INIT, when the mount is in place. Raises :class:`UnsupportedError` if it exits first.
        """
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            argv = [python, "-m", "pyshrinker.daemon", "--mount", mount]
            argv += ["--ready-fd", str(write_fd), *args]
            popen = subprocess.Popen(argv, pass_fds=(write_fd,), **popen_kwargs)
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        os.close(write_fd)
        daemon = cls(mount, popen)
        try:
            ready, _, _ = select.select([read_fd], [], [], timeout)
            answer = os.read(read_fd, 64) if ready else b""
        except BaseException:
            daemon.stop()
            raise
        finally:
            os.close(read_fd)
        daemon.served = answer == b"ready\n"
        if not daemon.served:
            code = daemon.stop()
            why = "did not get ready in time" if not ready else f"exited with status {code}"
            raise UnsupportedError(errno.EIO, f"pyshrinkerd on {mount} {why}")
        return daemon

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.popen.pid

    def status(self) -> Status:
        """Read and parse its status file."""
        return read_status(self.mount)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (libfuse unmounts and returns), SIGKILL if that hangs; then make sure the
        mount is gone. Returns the exit status; idempotent."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.served:
            unmount(self.mount)
        return self.popen.returncode

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- command line


def _uid(text: str) -> int:
    try:
        return int(text) if text.isdigit() else pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user: {text!r}") from None


def _gid(text: str) -> int:
    try:
        return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group: {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add pyshrinkerd's options to ``parser`` (``pyshrinker daemon`` and ``-m`` share them)."""
    parser.add_argument("--mount", required=True, metavar="DIR", help="directory to mount on")
    parser.add_argument(
        "--cgroup",
        metavar="PATH",
        help="memory cgroup directory to watch (default: the daemon's own)",
    )
    parser.add_argument(
        "--allow-other",
        action="store_true",
        help="let users other than the daemon's in (FUSE allow_other); see --allow-uid/--allow-gid",
    )
    parser.add_argument(
        "--allow-uid",
        type=_uid,
        action="append",
        default=[],
        metavar="USER",
        help="user (name or uid) who may register; repeatable (root and the daemon's user may)",
    )
    parser.add_argument(
        "--allow-gid",
        type=_gid,
        action="append",
        default=[],
        metavar="GROUP",
        help="group (name or gid) whose members may register; repeatable",
    )
    parser.add_argument(
        "--max-per-process",
        type=positive_int,
        default=DEFAULT_MAX_PER_PROCESS,
        metavar="N",
        help=f"registrations one process may hold (default {DEFAULT_MAX_PER_PROCESS})",
    )
    parser.add_argument(
        "--max-total",
        type=positive_int,
        default=DEFAULT_MAX_TOTAL,
        metavar="N",
        help=f"registrations in all (default {DEFAULT_MAX_TOTAL})",
    )
    parser.add_argument(
        "--status-history",
        type=positive_int,
        default=DEFAULT_STATUS_HISTORY,
        metavar="N",
        help=f"requests and episodes the status file lists (default {DEFAULT_STATUS_HISTORY})",
    )
    parser.add_argument(
        "--test-control",
        action="store_true",
        help=f"serve a writable {REQUEST_FILE} to request chunks or levels by hand (tests only;"
        " root and the daemon's user only)",
    )
    parser.add_argument(
        "--ready-fd",
        type=int,
        metavar="FD",
        help="write 'ready' to this fd (then close it) once the mount is up",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO)",
    )


def run(args: argparse.Namespace) -> int:
    """Mount and serve until unmounted or signalled (SIGINT, SIGTERM, SIGHUP); the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=getattr(logging, args.log_level, logging.INFO),
            format="pyshrinkerd[%(process)d] %(levelname)s %(name)s: %(message)s",
        )
    else:
        logging.getLogger("pyshrinker").setLevel(args.log_level)
    # mfusepy logs every refused request with a traceback at DEBUG: refusals are normal here.
    logging.getLogger("fuse").setLevel(max(logging.INFO, logging.getLogger().getEffectiveLevel()))
    mount = os.path.abspath(args.mount)
    problem = prepare_mount_point(mount)
    if problem is not None:
        log.error("%s", problem)
        return 2
    try:
        fuse = _import_fuse()
        controller = controller_for(args.cgroup)
    except (PyshrinkerError, OSError) as err:
        log.error("%s", err)
        return 1
    registry: Registry | None = None
    try:
        controller.start()
        registry = Registry.start(
            controller,
            mount,
            policy=AccessPolicy(frozenset(args.allow_uid), frozenset(args.allow_gid)),
            max_per_process=args.max_per_process,
            max_total=args.max_total,
            status_history=args.status_history,
        )
        ready_fd: int | None = args.ready_fd
        served = False

        def on_ready() -> None:
            nonlocal ready_fd, served
            served = True
            if ready_fd is not None:
                try:
                    os.write(ready_fd, b"ready\n")
                    os.close(ready_fd)
                except OSError as err:
                    log.warning("--ready-fd %d: %s", ready_fd, err)
                ready_fd = None
            _sd_notify("READY=1")

        ops = Operations(registry, fuse, test_control=args.test_control, on_ready=on_ready)
        options: dict[str, Any] = {
            "foreground": True,
            "fsname": "pyshrinkerd",
            "subtype": "pyshrinkerd",
            "direct_io": True,
            "attr_timeout": 0,
            "entry_timeout": 0,
            "negative_timeout": 0,
        }
        if args.allow_other:
            options["allow_other"] = True
        # Blocks until unmounted; libfuse handles SIGINT/SIGTERM/SIGHUP by leaving the loop and
        # unmounting.
        fuse.FUSE(ops, mount, raw_fi=True, **options)
    except RuntimeError as err:
        if served:
            # libfuse 3 reports a loop ended by a signal as an error (8); that is our way out.
            log.info("unmounted %s (%s)", mount, err)
            return 0
        log.error("FUSE mount on %s failed: %s", mount, err)
        return 1
    finally:
        if registry is not None:
            registry.close()
        controller.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pyshrinker.daemon --mount DIR``."""
    parser = argparse.ArgumentParser(
        prog="pyshrinkerd", description="Serve the mempressure controller files over FUSE."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
