"""The client: shrinkers that report what they hold and free what they are asked.

A :class:`Shrinker` owns an eventfd registered with a controller (through a transport that
follows the mempressure ABI) with a chunk size. It batches its ``+N``/``-N`` reports so that the
hot path costs no syscall per chunk. Requests arrive as a number on its eventfd; the process's
listener threads wait on all of them with epoll, call the application's ``reclaim(n)``, and
give back (re-add) the chunks it did not free.

Reaction time. A Python thread woken by its fd runs only when it gets the GIL: about 4 us when
the other threads are idle, but after the interpreter's switch interval (5 ms by default, often
twice that) when another thread is busy in Python. A thread that reports new chunks serves the
requests its report causes itself (:meth:`Shrinker.reclaim_pending`, direct reclaim), with no
hand-over at all; the listener serves the rest at the interpreter's pace. pyshrinker leaves the
switch interval alone unless the application opts in with :func:`set_reaction_switch_interval`.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

import attrs

from pyshrinker import _fork, _switch, shared, trim
from pyshrinker._switch import REACTION_SWITCH_INTERVAL, set_reaction_switch_interval
from pyshrinker._syscalls import (
    EVENTFD_MAX,
    EventfdFlag,
    eventfd,
    eventfd_drain,
    eventfd_read,
    eventfd_write,
)
from pyshrinker.abi import Level, validate_chunk_size, validate_cost
from pyshrinker.controller import BUDGET_ENV
from pyshrinker.errors import ClosedError, PyshrinkerError
from pyshrinker.transport import (
    CONTROLLER_DIR_ENV,
    DirectoryTransport,
    EmbeddedTransport,
    Transport,
)

log = logging.getLogger(__name__)

#: Reports are sent once this many bytes' worth of chunks are pending (at least one chunk).
DEFAULT_BATCH_BYTES = 1 << 20

#: Seconds after a level delivery during which lower levels alone belong to the same event.
SAME_EVENT_WINDOW = 0.05

#: Seconds the listener leaves a request to the thread that just sent new chunks (it serves the
#: requests its report caused itself, see Shrinker.reclaim_pending) before handling it itself.
INLINE_WINDOW = 0.002

#: Bumped in a forked child: objects from before the fork re-attach on next use.
_generation = 0


# ---------------------------------------------------------------------- the listener threads

#: Listener threads at most: one per callback blocked at once, plus a spare. Past it, requests
#: wait for a callback to return (and a warning is logged).
MAX_LISTENER_THREADS = 32

#: Idle listener threads kept: the one waiting, plus one so that a short handler does not make
#: the pool start and stop a thread per request.
_SPARE_THREADS = 2


@attrs.define(eq=False)
class Listener:
    """The threads that wait on every shrinker's eventfd and call its handler.

    Each fd is armed ``EPOLLONESHOT``: an event wakes one thread (each takes one event at a
    time) and the fd is re-armed only when its handler has returned, so one shrinker's
    requests are handled one at a time, in order. A handler that blocks holds only its own
    fd: before a thread runs a handler it makes sure another thread is waiting, starting one
    if none is, so every other shrinker is still served however many callbacks are stuck (up
    to :data:`MAX_LISTENER_THREADS`). There is one thread more than handlers running at once, and
    at most two once idle.

    Threads block in epoll with no timeout; ``close()`` writes the wake-up eventfd, which is
    never read, so every thread sees it and stops.

    .. versionadded:: 0.1.0
    """

    _epoll: select.epoll = attrs.field(alias="epoll")
    _wake_fd: int = attrs.field(alias="wake_fd")
    _handlers: dict[int, Callable[[], None]] = attrs.field(factory=dict, alias="handlers")
    _cond: threading.Condition = attrs.field(factory=threading.Condition, alias="cond")
    _threads: set[threading.Thread] = attrs.field(factory=set, alias="threads")
    _idle: int = attrs.field(default=0, alias="idle")
    _running: dict[int, int] = attrs.field(factory=dict, alias="running")
    _stopping: bool = attrs.field(default=False, alias="stopping")
    _warned_full: bool = attrs.field(default=False, alias="warned_full")

    @classmethod
    def start(cls) -> Listener:
        """Create the epoll set and wake-up fd and start the first thread."""
        wake = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
        ep = select.epoll()
        ep.register(wake, select.EPOLLIN)
        listener = cls(epoll=ep, wake_fd=wake)
        _switch.listener_started()  # the application's opt-in, if any
        with listener._cond:
            listener._spawn()
        return listener

    def _spawn(self) -> None:
        # Called with self._cond held.
        thread = threading.Thread(target=self._run, name="pyshrinker-listener", daemon=True)
        self._threads.add(thread)
        self._idle += 1
        thread.start()

    @property
    def alive(self) -> bool:
        """Whether the listener runs (it has threads and was not closed)."""
        with self._cond:
            return not self._stopping and any(t.is_alive() for t in self._threads)

    @property
    def threads(self) -> int:
        """Threads running now."""
        with self._cond:
            return len(self._threads)

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        """Call ``handler()`` on a listener thread whenever ``fd`` is readable."""
        with self._cond:
            self._handlers[fd] = handler
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (a handler already running finishes)."""
        with self._cond:
            self._handlers.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
            self._cond.notify_all()

    def barrier(self, timeout: float = 5.0) -> bool:
        """Wait until no handler runs and no watched fd is readable; False on timeout.

        Called from a handler, it returns at once (waiting would wait for itself).
        """
        if threading.current_thread() in self._threads:
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._stopping:
                if not self._running and not self._readable():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Woken at every handler's end; re-checked every 10 ms for fds signalled and
                # not yet taken by a thread.
                self._cond.wait(min(remaining, 0.01))
        return True

    def _readable(self) -> bool:
        # Called with self._cond held.
        if not self._handlers:
            return False
        poller = select.poll()
        for fd in self._handlers:
            poller.register(fd, select.POLLIN)
        return any(mask & select.POLLIN for _fd, mask in poller.poll(0))

    def _run(self) -> None:
        me = threading.current_thread()
        try:
            while self._serve_one():
                pass
        finally:
            with self._cond:
                self._threads.discard(me)
                self._cond.notify_all()

    def _serve_one(self) -> bool:
        """Wait for one event and handle it; False when this thread should end."""
        try:
            events = self._epoll.poll(-1, 1)
        except InterruptedError:
            return True
        except (OSError, ValueError):
            return False  # epoll closed under us at shutdown
        if self._stopping:
            return False
        if not events:
            return True
        fd = events[0][0]
        if fd == self._wake_fd:
            return False  # only close() writes it
        with self._cond:
            handler = self._handlers.get(fd)
            if handler is None:
                return True  # removed meanwhile: stays disarmed
            self._idle -= 1
            self._running[fd] = self._running.get(fd, 0) + 1
            if self._idle == 0:
                if len(self._threads) < MAX_LISTENER_THREADS:
                    self._spawn()
                elif not self._warned_full:
                    self._warned_full = True
                    log.warning(
                        "%d pyshrinker listener threads are all busy in reclaim callbacks: "
                        "other requests wait until one returns",
                        len(self._threads),
                    )
        try:
            handler()
        except Exception:
            log.exception("pyshrinker listener handler failed; listener continues")
        finally:
            keep_going = self._handled(fd, handler)
        return keep_going

    def _handled(self, fd: int, handler: Callable[[], None]) -> bool:
        """Book a handler's end and re-arm its fd; False when this thread is one too many."""
        with self._cond:
            left = self._running[fd] - 1
            if left:
                self._running[fd] = left
            else:
                del self._running[fd]
            if self._handlers.get(fd) is handler:
                try:
                    self._epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
                except (OSError, ValueError):
                    pass
            self._cond.notify_all()
            if self._idle >= _SPARE_THREADS:
                return False
            self._idle += 1
            return True

    def _forget_after_fork(self) -> None:
        # In a forked child (no thread of ours runs here): close this copy's fds.
        self._stopping = True
        self._epoll.close()
        os.close(self._wake_fd)

    def close(self) -> None:
        """Stop and join the threads, close the fds; idempotent."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            threads = set(self._threads)
            self._cond.notify_all()
        eventfd_write(self._wake_fd, 1)
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                # A thread stuck in a user callback is not waited for: it is a daemon thread
                # and finds the listener closed when the callback returns.
                thread.join(timeout=1.0)
        with self._cond:
            self._epoll.close()
            os.close(self._wake_fd)
            self._handlers.clear()
        _switch.listener_stopped()


_listener: Listener | None = None
_listener_lock = threading.Lock()


def get_listener() -> Listener:
    """The process's listener, started on first use (and again in a forked child)."""
    global _listener
    with _listener_lock:
        if _listener is None or not _listener.alive:
            _listener = Listener.start()
        return _listener


def _default_transport() -> Transport:
    """Where a shrinker registers unless told: the controller of the process's memory cgroup.

    ``$PYSHRINKER_CONTROLLER_DIR`` names a controller directory (pyshrinkerd's mount, or a
    kernel's cgroup with the proposal), with the cgroup's controller as the fallback while it is
    gone. Otherwise the controller elected among the processes of the memory cgroup
    (:mod:`pyshrinker.shared`), unless ``$PYSHRINKER_ELECTION`` is ``off`` or a process budget
    (``$PYSHRINKER_BUDGET``, this process's own memory) is set: then this process's own.
    """
    directory = os.environ.get(CONTROLLER_DIR_ENV)
    if directory:
        return DirectoryTransport.shared(directory)
    if shared.election_enabled() and not os.environ.get(BUDGET_ENV):
        try:
            return shared.default_shared()
        except (PyshrinkerError, OSError) as err:
            log.warning("pyshrinker: no election (%s): this process runs its own controller", err)
    return EmbeddedTransport.default()


def _after_fork_in_child() -> None:
    # The parent's listener threads do not exist here. Closing our copies of its epoll and
    # wake-up fds leaves the parent's (the epoll set lives while any fd refers to it). Locks
    # other threads may have held at fork are renewed.
    global _listener, _listener_lock, _generation, _live_lock, _observers_lock
    if _listener is not None:
        _listener._forget_after_fork()
    _listener = None
    _listener_lock = threading.Lock()
    _live_lock = threading.Lock()
    _observers_lock = threading.Lock()
    _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------- shrinker


@attrs.frozen
class ShrinkerStats:
    """What a shrinker has been through."""

    #: Chunks held as the controller is told (reported plus pending).
    held: int
    requests: int
    chunks_requested: int
    chunks_freed: int
    chunks_readded: int
    callback_errors: int
    #: Seconds the last reclaim callback took, from reading the eventfd to its return.
    last_reaction_s: float


Reclaim = Callable[[int], int]

_S = TypeVar("_S", bound="Shrinker")


@attrs.frozen
class RequestOutcome:
    """One request a shrinker handled: what was asked, freed and given back, and how fast.

    Passed to the functions added with :func:`add_request_observer`.

    .. versionadded:: 0.1.0
    """

    #: The shrinker that handled the request.
    shrinker: Shrinker
    #: Chunks the controller asked for.
    asked: int
    #: Chunks the callback said it freed (0 when it failed).
    freed: int
    #: Chunks given back to the controller because they were not freed.
    readded: int
    #: Seconds from reading the eventfd to the callback's return.
    reaction_s: float
    #: Whether the callback raised or returned something other than a count of chunks.
    failed: bool


_observers: tuple[Callable[[RequestOutcome], object], ...] = ()
_observers_lock = threading.Lock()


def add_request_observer(observer: Callable[[RequestOutcome], object]) -> None:
    """Call ``observer(outcome)`` after every request any shrinker of this process handles.

    It runs where the request was handled (the listener thread, or the event loop of an
    :class:`~pyshrinker.aio.AsyncShrinker`), so it must be quick; an observer that raises is
    logged. With no observer added, handling a request costs nothing more.

    .. versionadded:: 0.1.0
    """
    global _observers
    with _observers_lock:
        _observers = (*_observers, observer)


def remove_request_observer(observer: Callable[[RequestOutcome], object]) -> None:
    """Stop calling ``observer``; nothing happens if it was not added.

    .. versionadded:: 0.1.0
    """
    global _observers
    with _observers_lock:
        # Equality, not identity: each ``obj.method`` access makes a new bound method.
        _observers = tuple(each for each in _observers if each != observer)


def _tell_observers(outcome: RequestOutcome) -> None:
    for observer in _observers:
        try:
            observer(outcome)
        except Exception:
            log.exception("request observer %r raised", observer)


_live: weakref.WeakSet[Shrinker] = weakref.WeakSet()
_live_lock = threading.Lock()


def live_shrinkers() -> list[Shrinker]:
    """The shrinkers of this process that are registered and not closed.

    .. versionadded:: 0.1.0
    """
    with _live_lock:
        return [each for each in _live if not each._closed]


def _as_chunks(value: object) -> int:
    """``value`` as a plain int of chunks, or TypeError (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"chunks must be an int, got {value!r}")
    return int(value)


@attrs.define(eq=False)
class Shrinker:
    """A chunk size registered with a controller, and the callback that frees chunks.

    ``reclaim(n)`` runs on the listener thread when the controller asks for ``n`` chunks; it
    frees what it can and returns how many it freed. Those chunks are not reported again (the
    controller already subtracted them); what it did not free is re-added. A callback that
    raises is logged and everything it was asked is re-added.

    Chunks allocated or freed on the application's own initiative are told with
    :meth:`report`. Use :meth:`register` to create one.

    .. versionadded:: 0.1.0
    """

    chunk_size: int
    cost: float
    name: str
    _reclaim: Callable[[int], object] = attrs.field(alias="reclaim")
    _transport: Transport = attrs.field(alias="transport")
    _transport_factory: Callable[[], Transport] | None = attrs.field(alias="transport_factory")
    _batch: int = attrs.field(alias="batch")
    _efd: int = attrs.field(default=-1, alias="efd")
    _listener: Listener | None = attrs.field(default=None, alias="listener")
    _lock: threading.Lock = attrs.field(factory=threading.Lock, alias="lock")
    _request_lock: threading.RLock = attrs.field(factory=threading.RLock, alias="request_lock")
    _send_lock: threading.Lock = attrs.field(factory=threading.Lock, alias="send_lock")
    _pending: int = attrs.field(default=0, alias="pending")
    _reported: int = attrs.field(default=0, alias="reported")
    # Chunks added (reports > 0, re-adds included) and chunks asked, since registration. The
    # controller's count only grows by what we add and it never asks more than its count, so
    # over any interleaving of its requests with our own frees, the chunks it asked in all are
    # at most the chunks we added in all. A request past that bound is not the controller's.
    _added: int = attrs.field(default=0, alias="added")
    _asked: int = attrs.field(default=0, alias="asked")
    _generation: int = attrs.field(default=0, alias="generation")
    _closed: bool = attrs.field(default=False, alias="closed")
    _requests: int = attrs.field(default=0, alias="requests")
    _chunks_requested: int = attrs.field(default=0, alias="chunks_requested")
    _chunks_freed: int = attrs.field(default=0, alias="chunks_freed")
    _chunks_readded: int = attrs.field(default=0, alias="chunks_readded")
    _callback_errors: int = attrs.field(default=0, alias="callback_errors")
    _absurd_requests: int = attrs.field(default=0, alias="absurd_requests")
    _grew: bool = attrs.field(default=False, alias="grew")
    # When chunks were last sent by a caller that serves its requests itself (report with
    # serve_here, perf_counter), and a condition reclaim_pending notifies: the listener, woken
    # by a request that thread is about to serve, waits for it (_on_listener_wakeup) instead
    # of taking the GIL from it.
    _grew_at: float = attrs.field(default=0.0, alias="grew_at")
    _inline: threading.Condition = attrs.field(factory=threading.Condition, alias="inline")
    _last_reaction_s: float = attrs.field(default=0.0, alias="last_reaction_s")

    @classmethod
    def register(
        cls,
        chunk_size: int,
        reclaim: Reclaim,
        *,
        cost: float = 1.0,
        name: str | None = None,
        transport: Transport | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> Shrinker:
        """Register a shrinker of ``chunk_size`` bytes per chunk.

        ``cost`` is the relative cost to rebuild a chunk (2 = asked half as much per byte held
        as a cost-1 shrinker). ``transport`` defaults to the embedded controller.
        """
        return cls._create(
            chunk_size,
            reclaim,
            cost=cost,
            name=name,
            transport=transport,
            batch_bytes=batch_bytes,
        )

    @classmethod
    def _create(
        cls: type[_S],
        chunk_size: int,
        reclaim: Callable[[int], object],
        *,
        cost: float,
        name: str | None,
        transport: Transport | None,
        batch_bytes: int,
    ) -> _S:
        validate_chunk_size(chunk_size)
        validate_cost(cost)
        if not callable(reclaim):
            raise TypeError(f"reclaim must be callable, got {reclaim!r}")
        if batch_bytes < 0:
            raise ValueError(f"batch_bytes must be >= 0, got {batch_bytes}")
        factory = None if transport is not None else _default_transport
        shrinker = cls(
            chunk_size=chunk_size,
            cost=float(cost),
            name=name or f"shrinker-{chunk_size}",
            reclaim=reclaim,
            transport=transport if transport is not None else _default_transport(),
            transport_factory=factory,
            batch=max(1, batch_bytes // chunk_size),
        )
        shrinker._attach()
        with _live_lock:
            _live.add(shrinker)
        _fork.track(shrinker, _fork.SHRINKER)
        return shrinker

    def _fork_locks(self) -> list[threading.Lock | threading.RLock]:
        # The books' lock: held for a few assignments, so the child copies the books whole.
        return [self._lock]

    def _after_fork_in_child(self) -> None:
        # Other threads may have held these at fork; the books were copied whole (above).
        self._lock = threading.Lock()
        self._request_lock = threading.RLock()
        self._send_lock = threading.Lock()
        self._inline = threading.Condition()

    def _attach(self) -> None:
        efd = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
        try:
            self._transport.register(efd, self.chunk_size, self.cost)
        except BaseException:
            os.close(efd)
            raise
        self._efd = efd
        self._generation = _generation
        self._listen()
        self._transport.watch(self)

    def rejoin(self) -> None:
        """Register again, with exactly what is held: the controller behind the transport changed.

        The transport calls it, on a thread of its own, once it reaches the new controller (a
        newly elected one, a restarted daemon, a fallback). A request the old controller sent
        and was not read yet is handled first and settled here (the old controller's books are
        gone); then the eventfd is registered anew and what is held reported in one line. Other
        threads' reports wait for the books meanwhile, so none is counted twice or lost.

        .. versionadded:: 0.1.0
        """
        with self._request_lock:
            if self._closed or self._generation != _generation:
                return
            taken = self._take_request()
            if taken is not None:
                asked, start = taken
                self._settle_request(asked, self._handle_stale(asked), start, send=False)
            with self._lock, self._send_lock:
                held = self._reported + self._pending
                # Unregistered until the register below succeeds: nothing was reported.
                self._reported = self._added = self._asked = 0
                self._pending = held
                self._transport.register(self._efd, self.chunk_size, self.cost)
                if held:
                    self._transport.report(self._efd, held)
                self._reported = held
                self._added = max(0, held)
                self._pending = 0

    def _handle_stale(self, asked: int) -> int | None:
        # A request of the controller that went away: freed as asked (the pressure that made
        # it is likely still there); AsyncShrinker gives it back instead.
        return self._call_reclaim(asked)

    def controller_count(self) -> int:
        """The controller's count of this shrinker now, wherever the controller runs.

        After :func:`settle` and :meth:`flush`, with no request in flight, it equals
        :attr:`held`.

        .. versionadded:: 0.1.0
        """
        return self._transport.count(self._efd)

    def _listen(self) -> None:
        """Have requests on our eventfd handled (here: by the process's listener thread)."""
        self._listener = get_listener()
        self._listener.add(self._efd, self._on_listener_wakeup)

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.remove(self._efd)

    def _reattach_after_fork(self) -> None:
        # In a forked child the eventfd is shared with the parent and the parent's controller
        # is not ours: register anew, with what this copy holds.
        with self._lock:
            held = self._reported + self._pending
            os.close(self._efd)
            if self._transport_factory is not None:
                self._transport = self._transport_factory()
            self._attach()
            self._reported = self._added = self._asked = 0
            self._pending = held
        self.flush()

    @property
    def efd(self) -> int:
        """The eventfd requests arrive on."""
        return self._efd

    @property
    def transport(self) -> Transport:
        """Where reports go."""
        return self._transport

    def report(self, chunks: int, *, serve_here: bool = False) -> None:
        """Tell the controller ``chunks`` were allocated (> 0) or freed on our initiative (< 0).

        ``chunks`` must be an ``int`` (not a bool) of magnitude at most :data:`EVENTFD_MAX`;
        anything else raises before the books change. ``serve_here``: the caller calls
        :meth:`reclaim_pending` next, so a request this report causes is left to it for a
        moment (:data:`INLINE_WINDOW`) rather than taken by the listener thread.
        """
        if type(chunks) is not int:
            chunks = _as_chunks(chunks)
        if not -EVENTFD_MAX <= chunks <= EVENTFD_MAX:
            raise ValueError(f"chunks must be within +/-{EVENTFD_MAX}, got {chunks}")
        if self._generation != _generation:
            self._reattach_after_fork()
        self._lock.acquire()
        if self._closed:
            self._lock.release()
            raise ClosedError(f"{self.name} is closed")
        self._pending += chunks
        if -self._batch < self._pending < self._batch:
            self._lock.release()
            return
        pending, self._pending = self._pending, 0
        self._send_and_unlock(pending, serve_here=serve_here)

    def flush(self) -> None:
        """Send pending reports now."""
        self._lock.acquire()
        if self._closed or self._pending == 0:
            self._lock.release()
            return
        pending, self._pending = self._pending, 0
        self._send_and_unlock(pending)

    def _send_and_unlock(
        self, chunks: int, *, settling: bool = False, serve_here: bool = False
    ) -> None:
        """Book ``chunks`` as reported and send them; called with self._lock held, releases it.

        The books change under self._lock, held only for that (never across a syscall or a
        controller call), so the listener thread taking a request is never starved of it by a
        thread reporting in a loop. The send happens under self._send_lock, taken before
        self._lock is released, so reports reach the controller in the order the books changed.
        """
        try:
            self._reported += chunks
            if chunks > 0:
                self._added += chunks
                if not settling:  # the application's own new chunks, not a re-add
                    self._grew = True
                if serve_here:
                    self._grew_at = time.perf_counter()
            self._send_lock.acquire()
        finally:
            self._lock.release()
        try:
            self._transport.report(self._efd, chunks)
        finally:
            self._send_lock.release()

    def reclaim_pending(self) -> None:
        """Handle a request already waiting, here on the calling thread (direct reclaim).

        After a report of new chunks the controller may ask for memory at once: it evaluates
        on the reporting thread when a watermark is near, as the kernel reclaims in the task
        that charges memory at its cgroup's limit. Calling this after reporting frees it here,
        without waiting for the listener thread to be scheduled and get the GIL, so a fast
        allocator cannot outrun the reclaim. It costs nothing unless new chunks were sent since
        the last call, then one non-blocking eventfd read. Call it without holding a lock that
        the reclaim callback takes.
        """
        if not self._grew:
            return
        try:
            self._on_request()
        finally:
            self._grew = False
            with self._inline:
                self._inline.notify_all()

    def _on_listener_wakeup(self) -> None:
        # The listener woke for a request. If chunks were sent a moment ago, the thread that
        # sent them is likely about to serve it (reclaim_pending): the listener got the GIL
        # while that thread was in the eventfd write, and running the request here would leave
        # it waiting for the GIL behind every busy thread (a switch interval or two). So wait
        # for it, the GIL released, a short while; whatever is left is handled here.
        if self._grew and time.perf_counter() - self._grew_at < INLINE_WINDOW:
            with self._inline:
                self._inline.wait_for(lambda: not self._grew, INLINE_WINDOW)
        self._on_request()

    @property
    def held(self) -> int:
        """Chunks we have told (or will tell) the controller we hold."""
        with self._lock:
            return self._reported + self._pending

    def stats(self) -> ShrinkerStats:
        """Counters of requests and chunks so far."""
        return ShrinkerStats(
            self.held,
            self._requests,
            self._chunks_requested,
            self._chunks_freed,
            self._chunks_readded,
            self._callback_errors,
            self._last_reaction_s,
        )

    def _on_request(self) -> None:
        with self._request_lock:
            taken = self._take_request()
            if taken is None:
                return
            asked, start = taken
            self._settle_request(asked, self._call_reclaim(asked), start)

    # The accounting of a request, shared with pyshrinker.aio.AsyncShrinker: take it off the
    # books (_take_request), run the callback however it runs, then settle (_settle_request).

    def _take_request(self) -> tuple[int, float] | None:
        """Read a request and take it off the books: ``(chunks asked, start time)``, or None.

        Pending (unsent) reports do not matter here: the controller asked out of what it was
        sent. A count larger than we ever sent is refused whole (logged) and so is None.
        """
        if self._closed:
            return None
        start = time.perf_counter()
        try:
            asked = eventfd_read(self._efd)
        except BlockingIOError:
            return None
        with self._lock:
            # The controller subtracted what it asked (our own frees may have lowered the books
            # since: it keeps that as a deficit which the re-add pays back). In all, it cannot
            # have asked more than we added in all; more than that is absurd (a stray writer on
            # our eventfd): refuse it whole rather than drop entries for garbage.
            if self._asked + asked > self._added:
                log.error(
                    "%s: absurd request for %d chunks (%d could be asked): ignored",
                    self.name,
                    asked,
                    self._added - self._asked,
                )
                self._absurd_requests += 1
                return None
            self._asked += asked
            self._reported -= asked
        if asked == 0:
            return None
        self._requests += 1
        self._chunks_requested += asked
        return asked, start

    def _settle_request(
        self, asked: int, freed: int | None, start: float, *, send: bool = True
    ) -> None:
        """Re-add what was not freed, report what was freed beyond the request.

        ``freed`` is None when the callback failed: everything asked is re-added. With
        ``send=False`` (a rejoin) the change is only booked, to go with the registration.
        """
        reaction = time.perf_counter() - start
        self._last_reaction_s = reaction
        counted = 0 if freed is None else freed
        self._chunks_freed += counted
        # What was not freed goes back (> 0); whole entries freed beyond the request are our
        # own frees (< 0).
        change = asked - counted
        readded = max(0, change)
        self._chunks_readded += readded
        self._lock.acquire()
        if not send:
            self._pending += change
            self._lock.release()
        else:
            # Unsent reports go with it, so that after a request the controller's count is exact.
            change, self._pending = change + self._pending, 0
            if change and not self._closed:
                self._send_and_unlock(change, settling=True)
            else:
                self._lock.release()
        # Freed memory must reach the kernel, not stay in malloc: the one place every cache's
        # reclaim goes through (see pyshrinker.trim).
        trim.after_reclaim(counted * self.chunk_size)
        if _observers:
            _tell_observers(RequestOutcome(self, asked, counted, readded, reaction, freed is None))

    def _call_reclaim(self, asked: int) -> int | None:
        try:
            result = self._reclaim(asked)
        except Exception:
            self._reclaim_raised(asked)
            return None
        return self._count_freed(asked, result)

    def _reclaim_raised(self, asked: int) -> None:
        """Log the exception being handled (call from ``except``); everything will be re-added."""
        self._callback_errors += 1
        log.exception("%s: reclaim(%d) raised; re-adding all %d chunks", self.name, asked, asked)

    def _count_freed(self, asked: int, result: object) -> int | None:
        """The callback's return value as a count of chunks freed; None if it is not one."""
        if isinstance(result, bool) or not isinstance(result, int) or result < 0:
            self._callback_errors += 1
            log.error(
                "%s: reclaim(%d) returned %r, not a count of chunks; counting 0 freed",
                self.name,
                asked,
                result,
            )
            return None
        return result

    def close(self) -> None:
        """Unregister and close the eventfd; idempotent."""
        with self._request_lock:
            with self._lock:
                if self._closed:
                    return
                self._closed = True
            with _live_lock:
                _live.discard(self)
            _fork.untrack(self)
            if self._generation != _generation:
                # A forked child's copy: the eventfd is the parent's registration.
                os.close(self._efd)
                return
            self._stop_listening()
            try:
                self._transport.unregister(self._efd)
            except PyshrinkerError as err:
                log.debug("%s: unregister: %s", self.name, err)
            os.close(self._efd)
            self._efd = -1

    def __enter__(self) -> Shrinker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def settle(timeout: float = 5.0) -> bool:
    """Wait until the listener has handled every request signalled before this call."""
    with _listener_lock:
        listener = _listener
    if listener is None:
        return True
    return listener.barrier(timeout)


# ---------------------------------------------------------------------- levels


@attrs.define(eq=False)
class LevelSubscription:
    """Calls ``callback(level)`` on the listener thread for each event at ``level`` or above.

    Created by :func:`subscribe_levels`; ``close()`` unsubscribes (idempotent).

    .. versionadded:: 0.1.0
    """

    level: Level
    _callback: Callable[[Level], object] = attrs.field(alias="callback")
    _transport: Transport = attrs.field(alias="transport")
    _efds: dict[Level, int] = attrs.field(factory=dict, alias="efds")
    _listener: Listener | None = attrs.field(default=None, alias="listener")
    _lock: threading.RLock = attrs.field(factory=threading.RLock, alias="lock")
    _closed: bool = attrs.field(default=False, alias="closed")
    _same_event: SameEventFilter = attrs.field(
        factory=lambda: SameEventFilter(), alias="same_event"
    )
    #: Events delivered so far.
    delivered: int = 0

    def _on_event(self) -> None:
        # A level event signals every eventfd registered at that level or below: the highest
        # one signalled is the level that happened.
        with self._lock:
            if self._closed:
                return
            heard = _highest_signalled(self._efds)
            if heard is None:
                return
            if not self._same_event.accept(heard):
                return
            self.delivered += 1
        try:
            self._callback(heard)
        except Exception:
            log.exception("level callback %r raised; listener continues", self._callback)

    def rejoin(self) -> None:
        """Register the level eventfds again: the controller behind the transport changed."""
        with self._lock:
            if self._closed:
                return
            for level, efd in self._efds.items():
                self._transport.register_level(efd, level)

    def close(self) -> None:
        """Unsubscribe; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for efd in self._efds.values():
                if self._listener is not None:
                    self._listener.remove(efd)
                try:
                    self._transport.unregister(efd)
                except PyshrinkerError:
                    pass
                os.close(efd)
            self._efds.clear()

    def __enter__(self) -> LevelSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@attrs.define
class SameEventFilter:
    """Drops the lower-level tail of a level event already delivered.

    The controller signals the highest level's eventfds first, then the lower ones; a wake-up
    that finds only lower levels within :data:`SAME_EVENT_WINDOW` of a delivery is that event's
    tail, not a new event.
    """

    last_level: Level | None = None
    last_at: float = 0.0

    def accept(self, heard: Level) -> bool:
        """Whether ``heard`` is a new event to deliver."""
        now = time.monotonic()
        if (
            self.last_level is not None
            and heard < self.last_level
            and now - self.last_at < SAME_EVENT_WINDOW
        ):
            return False
        self.last_level, self.last_at = heard, now
        return True


def _highest_signalled(efds: dict[Level, int]) -> Level | None:
    """Read (and reset) level eventfds; the highest level signalled, or None.

    A level event signals every eventfd registered at that level or below, so the highest one
    signalled is the level that happened.
    """
    heard: Level | None = None
    for level, efd in efds.items():
        if eventfd_drain(efd) > 0:
            heard = level if heard is None else max(heard, level)
    return heard


def subscribe_levels(
    callback: Callable[[Level], object],
    level: Level | str = Level.LOW,
    *,
    transport: Transport | None = None,
) -> LevelSubscription:
    """Call ``callback(level)`` whenever pressure reaches ``level`` (low, medium or oom) or more.

    .. versionadded:: 0.1.0
    """
    if isinstance(level, str):
        level = Level.parse(level)
    transport = transport if transport is not None else _default_transport()
    sub = LevelSubscription(level=level, callback=callback, transport=transport)
    listener = get_listener()
    sub._listener = listener
    try:
        register_level_eventfds(
            level, transport, sub._efds, lambda efd: listener.add(efd, sub._on_event)
        )
    except BaseException:
        sub.close()
        raise
    transport.watch(sub)
    return sub


def register_level_eventfds(
    level: Level, transport: Transport, efds: dict[Level, int], watch: Callable[[int], None]
) -> None:
    """Register one eventfd per level from ``level`` up, into ``efds``, each then ``watch``-ed.

    One per level because a level event signals every eventfd registered at that level or
    below: the highest one signalled tells which level happened. ``efds`` holds each eventfd as
    soon as it exists, so the caller's close() can release a half-made subscription.
    """
    for each in Level:
        if each < level:
            continue
        efd = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
        efds[each] = efd
        transport.register_level(efd, each)
        watch(efd)


__all__ = [
    "EVENTFD_MAX",
    "REACTION_SWITCH_INTERVAL",
    "LevelSubscription",
    "Listener",
    "RequestOutcome",
    "Shrinker",
    "ShrinkerStats",
    "add_request_observer",
    "live_shrinkers",
    "remove_request_observer",
    "set_reaction_switch_interval",
    "settle",
    "subscribe_levels",
]
