"""asyncio: shrink requests and level events delivered on the running event loop.

An :class:`AsyncShrinker` is a :class:`~pyshrinker.client.Shrinker` whose eventfd is watched by
the event loop (``loop.add_reader``) instead of the process's listener thread, so its reclaim
callback runs on the loop, next to the data it frees, with no lock between them. The callback
may be a plain function (called on the loop; it blocks the loop while it runs) or a coroutine
function (run as a task).

The loop's selector is level-triggered: an eventfd with a non-zero counter wakes it on every
iteration until read. While an asynchronous callback runs, the reader is removed, so requests
that arrive meanwhile stay summed in the eventfd's counter (nothing is lost, nothing spins) and
are read, as one request, as soon as the callback is done and the reader is back.

The books are kept exactly as :class:`~pyshrinker.client.Shrinker` keeps them (the same code):
pending reports are flushed before a request is handled, a count larger than was ever reported
is refused whole, chunks not freed are re-added, chunks freed beyond the request are reported as
our own frees, and a callback that raises (synchronously or from its coroutine) is logged and
everything it was asked is re-added.

:func:`levels` is an async iterator over level events, read from eventfds on the loop::

    async with pyshrinker.aio.levels("medium") as events:
        async for level in events:
            cache.clear()

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
from collections.abc import Awaitable, Callable

import attrs

from pyshrinker.abi import Level
from pyshrinker.client import (
    DEFAULT_BATCH_BYTES,
    SameEventFilter,
    Shrinker,
    _default_transport,
    _highest_signalled,
    register_level_eventfds,
)
from pyshrinker.errors import ClosedError, PyshrinkerError
from pyshrinker.transport import Transport

log = logging.getLogger(__name__)

#: A reclaim callback for :class:`AsyncShrinker`: returns (or its coroutine returns) chunks freed.
AsyncReclaim = Callable[[int], "int | Awaitable[int]"]


def _current_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


@attrs.define(eq=False)
class AsyncShrinker(Shrinker):
    """A shrinker whose requests are handled on the asyncio event loop it was registered on.

    ``reclaim(n)`` frees up to ``n`` chunks and returns how many it freed; it may be a
    coroutine function, awaited as a task while further requests wait on the eventfd.
    :meth:`report`, :meth:`flush`, :meth:`stats` and the accounting are those of
    :class:`~pyshrinker.client.Shrinker`. Create one with :meth:`register` inside a running loop
    and close it on that loop's thread (``async with`` does both ends). It does not survive
    ``fork``: in a child, register a new one.

    .. versionadded:: 0.1.0
    """

    _loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, alias="loop")
    _task: asyncio.Task[None] | None = attrs.field(default=None, alias="task")
    _reading: bool = attrs.field(default=False, alias="reading")

    @classmethod
    def register(
        cls,
        chunk_size: int,
        reclaim: AsyncReclaim,
        *,
        cost: float = 1.0,
        name: str | None = None,
        transport: Transport | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> AsyncShrinker:
        """Register a shrinker of ``chunk_size`` bytes per chunk, served by the running loop.

        Raises RuntimeError when no event loop is running in this thread. The other
        arguments are those of :meth:`pyshrinker.client.Shrinker.register`.
        """
        asyncio.get_running_loop()  # fail before anything is registered
        return cls._create(
            chunk_size,
            reclaim,
            cost=cost,
            name=name,
            transport=transport,
            batch_bytes=batch_bytes,
        )

    @property
    def busy(self) -> bool:
        """Whether an asynchronous reclaim callback is running now."""
        return self._task is not None

    def reclaim_pending(self) -> None:
        """Nothing to do here: requests are handled by the event loop, never inline."""
        self._grew = False

    # ------------------------------------------------------------------ the loop's side

    def _listen(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._resume()

    def _resume(self) -> None:
        if self._closed or self._reading or self._loop is None:
            return
        self._loop.add_reader(self._efd, self._on_readable)
        self._reading = True

    def _pause(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._efd)
        self._reading = False

    def _stop_listening(self) -> None:
        self._pause()
        task = self._task
        if task is not None and task is not _current_task():
            task.cancel()

    def _on_readable(self) -> None:
        # Called by the loop; whatever goes wrong is logged and the loop goes on.
        try:
            with self._request_lock:
                taken = self._take_request()
                if taken is None:
                    return
                asked, start = taken
                try:
                    result = self._reclaim(asked)
                except Exception:
                    self._reclaim_raised(asked)
                    self._settle_request(asked, None, start)
                    return
                if not inspect.isawaitable(result):
                    self._settle_request(asked, self._count_freed(asked, result), start)
                    return
                assert self._loop is not None
                self._pause()
                self._task = self._loop.create_task(
                    self._finish(asked, result, start), name=f"pyshrinker reclaim: {self.name}"
                )
        except Exception:
            log.exception("%s: handling a request failed; the loop continues", self.name)

    async def _finish(self, asked: int, pending: Awaitable[object], start: float) -> None:
        freed: int | None = None
        try:
            try:
                result = await pending
            except Exception:
                self._reclaim_raised(asked)
            else:
                freed = self._count_freed(asked, result)
        finally:
            # Also when cancelled (closed, or the loop is shutting down): nothing is counted as
            # freed, so all of it goes back to the controller if we are still registered.
            try:
                with self._request_lock:
                    self._settle_request(asked, freed, start)
            except Exception:
                log.exception("%s: settling a request failed", self.name)
            self._task = None
            self._resume()

    def _handle_stale(self, asked: int) -> int | None:
        # A request of a controller that went away, found when rejoining the new one (on the
        # transport's thread, not the loop's): the callback belongs to the loop, so nothing is
        # freed here; the chunks go back, and the new controller asks again if it must.
        return None

    def _reattach_after_fork(self) -> None:
        # The loop's epoll set is shared with the parent: touching it would remove the parent's
        # registrations. Close this copy (only its eventfd) and refuse.
        self.close()
        raise ClosedError(
            f"{self.name}: an AsyncShrinker does not survive fork; register a new one in the child"
        )

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Close, then wait until a reclaim callback that was running has been cancelled."""
        task = self._task
        self.close()
        if task is not None and task is not _current_task():
            await asyncio.wait([task])

    def __enter__(self) -> AsyncShrinker:
        return self

    async def __aenter__(self) -> AsyncShrinker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------- levels

#: Events kept for a consumer that falls behind; older ones are dropped (and counted).
DEFAULT_MAX_PENDING = 64


@attrs.define(eq=False)
class LevelEvents:
    """An async iterator over the level events at ``level`` or above, read on the event loop.

    Made by :func:`levels`; each item is the :class:`~pyshrinker.abi.Level` that happened.
    :meth:`close` (or :meth:`aclose`, or leaving ``async with``) unregisters and ends the
    iteration. One coroutine at a time may wait for the next event.

    .. versionadded:: 0.1.0
    """

    level: Level
    _transport: Transport = attrs.field(alias="transport")
    _loop: asyncio.AbstractEventLoop = attrs.field(alias="loop")
    _pending: collections.deque[Level] = attrs.field(alias="pending")
    _efds: dict[Level, int] = attrs.field(factory=dict, alias="efds")
    _waiter: asyncio.Future[None] | None = attrs.field(default=None, alias="waiter")
    _closed: bool = attrs.field(default=False, alias="closed")
    #: Events read from the eventfds so far.
    delivered: int = 0
    #: Events dropped because more than ``max_pending`` were waiting to be consumed.
    dropped: int = 0
    _same_event: SameEventFilter = attrs.field(factory=SameEventFilter, alias="same_event")

    def _on_event(self) -> None:
        if self._closed:
            return
        heard = _highest_signalled(self._efds)
        if heard is None or not self._same_event.accept(heard):
            return
        self.delivered += 1
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(heard)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> LevelEvents:
        return self

    async def __anext__(self) -> Level:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            if self._waiter is not None:
                raise RuntimeError("another coroutine is already waiting for the next level event")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._closed:
            raise StopAsyncIteration
        return self._pending.popleft()

    def close(self) -> None:
        """Unregister and close the eventfds; a waiting ``async for`` ends. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for efd in self._efds.values():
            if not self._loop.is_closed():
                self._loop.remove_reader(efd)
            try:
                self._transport.unregister(efd)
            except PyshrinkerError as err:
                log.debug("level listener %d: unregister: %s", efd, err)
            os.close(efd)
        self._efds.clear()
        self._pending.clear()
        self._wake()

    async def aclose(self) -> None:
        """Same as :meth:`close`, for ``async`` code and :func:`contextlib.aclosing`."""
        self.close()

    async def __aenter__(self) -> LevelEvents:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def levels(
    level: Level | str = Level.LOW,
    *,
    transport: Transport | None = None,
    max_pending: int = DEFAULT_MAX_PENDING,
) -> LevelEvents:
    """Subscribe to level events at ``level`` (low, medium or oom) or above, on the running loop.

    Registration happens now (events from this moment on are kept); iterate the result with
    ``async for`` and close it (``async with`` does) to unregister. ``transport`` defaults to
    the embedded controller. Raises RuntimeError when no event loop is running in this thread.

    .. versionadded:: 0.1.0
    """
    if isinstance(level, str):
        level = Level.parse(level)
    if max_pending < 1:
        raise ValueError(f"max_pending must be >= 1, got {max_pending}")
    loop = asyncio.get_running_loop()
    transport = transport if transport is not None else _default_transport()
    events = LevelEvents(
        level=level,
        transport=transport,
        loop=loop,
        pending=collections.deque(maxlen=max_pending),
    )
    try:
        register_level_eventfds(
            level, transport, events._efds, lambda efd: loop.add_reader(efd, events._on_event)
        )
    except BaseException:
        events.close()
        raise
    return events


__all__ = ["DEFAULT_MAX_PENDING", "AsyncReclaim", "AsyncShrinker", "LevelEvents", "levels"]
