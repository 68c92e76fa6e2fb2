"""asyncio: AsyncShrinker requests handled on the event loop, and ``async for`` over levels."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from pyshrinker import AbiError, ClosedError, Level
from pyshrinker._syscalls import eventfd_write
from pyshrinker.aio import AsyncShrinker, levels

from .helpers import private_controller

MiB = 1 << 20


@pytest.fixture
def ctl():
    """A private controller and its embedded transport."""
    with private_controller() as pair:
        yield pair


def run(coro: Coroutine[Any, Any, object]) -> object:
    """Run a test coroutine on a fresh event loop, failing it after 10 s."""
    return asyncio.run(asyncio.wait_for(coro, 10))


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``predicate()`` holds (fail after ``timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


class Freer:
    """A reclaim callback (plain or coroutine) that frees from ``held`` and records its calls."""

    def __init__(self, held: int, mode: str = "all") -> None:
        self.held = held
        self.mode = mode
        self.asked: list[int] = []
        self.threads: list[str] = []
        self.gate: asyncio.Event | None = None

    def free(self, n: int) -> int:
        """Free by ``mode``: all asked, half, two more than asked, or raise."""
        self.asked.append(n)
        self.threads.append(threading.current_thread().name)
        if self.mode == "raise":
            raise RuntimeError("async reclaim exploded")
        if self.mode == "half":
            freed = min(self.held, n // 2)
        elif self.mode == "extra":
            freed = min(self.held, n + 2)
        else:
            freed = min(self.held, n)
        self.held -= freed
        return freed

    def __call__(self, n: int) -> int:
        return self.free(n)

    async def coroutine(self, n: int) -> int:
        """The same, as a coroutine that yields to the loop (and waits for ``gate`` if set)."""
        await asyncio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()
        return self.free(n)


class TestAsyncShrinker:
    """Requests reach AsyncShrinker on the running loop, with Shrinker's accounting."""

    def test_register_needs_running_loop(self, ctl):
        """Outside a running loop registration fails before anything is registered."""
        controller, transport = ctl
        before = open_fds()
        with pytest.raises(RuntimeError):
            AsyncShrinker.register(MiB, Freer(0), transport=transport)
        assert controller.shrinkers() == []
        assert open_fds() == before

    def test_sync_callback_runs_on_loop(self, ctl):
        """A plain callback runs on the loop's thread, not the listener thread."""
        controller, transport = ctl
        freer = Freer(held=10)
        seen_loop: list[asyncio.AbstractEventLoop] = []

        def reclaim(n: int) -> int:
            seen_loop.append(asyncio.get_running_loop())
            return freer(n)

        async def main() -> None:
            async with AsyncShrinker.register(MiB, reclaim, transport=transport) as s:
                s.report(10)
                s.flush()
                assert controller.request(s.efd, 4) == 4
                await until(lambda: s.stats().requests == 1)
                assert seen_loop == [asyncio.get_running_loop()]
                assert freer.threads == [threading.current_thread().name]
                assert "pyshrinker-listener" not in freer.threads
                assert controller.count(s.efd) == 6
                assert s.stats().chunks_freed == 4
                assert s.stats().chunks_readded == 0

        run(main())

    def test_coroutine_callback_awaited(self, ctl):
        """A coroutine callback is awaited; what it frees leaves the books."""
        controller, transport = ctl
        freer = Freer(held=10)

        async def main() -> None:
            async with AsyncShrinker.register(MiB, freer.coroutine, transport=transport) as s:
                s.report(10)
                s.flush()
                controller.request(s.efd, 3)
                await until(lambda: s.stats().chunks_freed == 3)
                assert freer.asked == [3]
                assert controller.count(s.efd) == 7
                assert s.held == 7
                assert not s.busy

        run(main())

    def test_requests_accumulate_while_coroutine_runs(self, ctl):
        """Requests arriving while the coroutine runs are summed and handled after it."""
        controller, transport = ctl
        freer = Freer(held=20)

        async def main() -> None:
            freer.gate = asyncio.Event()
            async with AsyncShrinker.register(MiB, freer.coroutine, transport=transport) as s:
                s.report(20)
                s.flush()
                controller.request(s.efd, 2)
                await until(lambda: s.busy)
                controller.request(s.efd, 3)
                controller.request(s.efd, 4)
                await asyncio.sleep(0.05)
                assert freer.asked == []  # still waiting at the gate, nothing else started
                assert s.stats().requests == 1
                freer.gate.set()
                await until(lambda: s.stats().requests == 2 and not s.busy)
                assert freer.asked == [2, 7]
                assert controller.count(s.efd) == 11
                assert s.held == 11

        run(main())

    def test_raising_coroutine_readds_all_and_loop_lives(self, ctl, caplog):
        """A coroutine that raises is logged, all is re-added, and the next request works."""
        controller, transport = ctl
        freer = Freer(held=10, mode="raise")

        async def main() -> None:
            async with AsyncShrinker.register(MiB, freer.coroutine, transport=transport) as s:
                s.report(10)
                s.flush()
                with caplog.at_level(logging.ERROR, logger="pyshrinker"):
                    controller.request(s.efd, 4)
                    await until(lambda: s.stats().callback_errors == 1 and not s.busy)
                assert "async reclaim exploded" in caplog.text
                assert controller.count(s.efd) == 10
                assert s.stats().chunks_readded == 4
                freer.mode = "all"
                controller.request(s.efd, 4)
                await until(lambda: s.stats().chunks_freed == 4)
                assert freer.asked == [4, 4]
                assert controller.count(s.efd) == 6

        run(main())

    def test_raising_sync_callback_readds_all(self, ctl, caplog):
        """A plain callback that raises is logged and everything asked is re-added."""
        controller, transport = ctl
        freer = Freer(held=10, mode="raise")

        async def main() -> None:
            async with AsyncShrinker.register(MiB, freer, transport=transport) as s:
                s.report(10)
                s.flush()
                with caplog.at_level(logging.ERROR, logger="pyshrinker"):
                    controller.request(s.efd, 5)
                    await until(lambda: s.stats().callback_errors == 1)
                assert "async reclaim exploded" in caplog.text
                assert controller.count(s.efd) == 10
                freer.mode = "all"
                controller.request(s.efd, 1)
                await until(lambda: s.stats().chunks_freed == 1)
                assert controller.count(s.efd) == 9

        run(main())

    @pytest.mark.parametrize(("mode", "count", "readded"), [("half", 7, 3), ("extra", 5, 0)])
    def test_partial_and_extra_frees(self, ctl, mode, count, readded):
        """Unfreed chunks are re-added; chunks freed beyond the request are reported."""
        controller, transport = ctl
        freer = Freer(held=10, mode=mode)

        async def main() -> None:
            async with AsyncShrinker.register(MiB, freer.coroutine, transport=transport) as s:
                s.report(10)
                s.flush()
                controller.request(s.efd, 6 if mode == "half" else 3)
                await until(lambda: s.stats().requests == 1 and not s.busy)
                assert controller.count(s.efd) == count == freer.held
                assert s.stats().chunks_readded == readded

        run(main())

    def test_pending_reports_sent_when_handling(self, ctl):
        """Unsent reports go out when a request is settled, so the books agree after it."""
        controller, transport = ctl
        freer = Freer(held=13)

        async def main() -> None:
            async with AsyncShrinker.register(4096, freer, transport=transport) as s:
                s.report(10)
                s.flush()
                s.report(3)  # below the batch (256 chunks of 4 KiB): not sent yet
                assert controller.count(s.efd) == 10
                controller.request(s.efd, 10)
                await until(lambda: s.stats().requests == 1)
                assert controller.count(s.efd) == 3 == s.held

        run(main())

    def test_absurd_count_refused(self, ctl, caplog):
        """A count larger than ever reported is refused whole; real requests still work."""
        controller, transport = ctl
        freer = Freer(held=10)

        async def main() -> None:
            async with AsyncShrinker.register(MiB, freer.coroutine, transport=transport) as s:
                s.report(10)
                s.flush()
                with caplog.at_level(logging.ERROR, logger="pyshrinker"):
                    eventfd_write(s.efd, 2**40)
                    await asyncio.sleep(0.05)
                assert "absurd" in caplog.text
                assert freer.asked == []
                assert controller.count(s.efd) == 10
                controller.request(s.efd, 2)
                await until(lambda: s.stats().chunks_freed == 2)
                assert controller.count(s.efd) == 8

        run(main())

    def test_close_while_coroutine_runs(self, ctl):
        """Closing cancels a running coroutine, unregisters, and closes the eventfd."""
        controller, transport = ctl
        freer = Freer(held=10)

        async def main() -> None:
            freer.gate = asyncio.Event()  # never set
            before = open_fds()
            s = AsyncShrinker.register(MiB, freer.coroutine, transport=transport)
            s.report(10)
            s.flush()
            controller.request(s.efd, 4)
            await until(lambda: s.busy)
            await s.aclose()
            assert not s.busy
            assert controller.shrinkers() == []
            assert open_fds() == before
            assert freer.asked == []

        run(main())

    def test_close_idempotent_and_report_after_close(self, ctl):
        """close() may be called again after ``async with``; reporting then is ClosedError."""
        _, transport = ctl

        async def main() -> None:
            async with AsyncShrinker.register(4096, Freer(0), transport=transport) as s:
                pass
            s.close()
            await s.aclose()
            with pytest.raises(ClosedError):
                s.report(1)

        run(main())


class TestLevels:
    """``async for`` over level events, read from eventfds on the loop."""

    def test_async_for_receives_levels_at_or_above(self, ctl):
        """A medium subscription hears medium and oom (as the level that happened), not low."""
        controller, transport = ctl

        async def main() -> list[Level]:
            heard: list[Level] = []
            async with levels("medium", transport=transport) as events:
                controller.notify_level(Level.LOW)
                controller.notify_level(Level.MEDIUM)
                async for level in events:
                    heard.append(level)
                    if len(heard) == 1:
                        controller.notify_level(Level.OOM)
                    else:
                        break
            return heard

        assert run(main()) == [Level.MEDIUM, Level.OOM]

    def test_close_unregisters_and_ends_iteration(self, ctl):
        """Closing ends a waiting ``async for`` and the controller forgets the listeners."""
        controller, transport = ctl

        async def main() -> None:
            before = open_fds()
            events = levels(Level.LOW, transport=transport)
            assert open_fds() == before + 3
            heard: list[Level] = []

            async def consume() -> None:
                async for level in events:
                    heard.append(level)

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.01)
            await events.aclose()
            await asyncio.wait_for(task, 2)
            assert heard == []
            assert controller.notify_level(Level.OOM) == 0
            assert open_fds() == before
            events.close()

        run(main())

    def test_slow_consumer_keeps_latest(self, ctl):
        """Past ``max_pending`` unread events the oldest are dropped and counted."""
        controller, transport = ctl

        async def main() -> None:
            async with levels("low", transport=transport, max_pending=2) as events:
                for level in (Level.LOW, Level.MEDIUM, Level.OOM):
                    controller.notify_level(level)
                    await until(lambda n=level: events.delivered == n + 1)
                assert events.dropped == 1
                assert [await anext(events), await anext(events)] == [Level.MEDIUM, Level.OOM]

        run(main())

    def test_bad_level_name(self, ctl):
        """Unknown level names are a clear error, with nothing left registered."""
        _, transport = ctl

        async def main() -> None:
            with pytest.raises(AbiError, match="unknown level"):
                levels("severe", transport=transport)

        run(main())
