"""The eventfd calls of pyshrinker._syscalls: semantics, errors, and when they keep the GIL."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pyshrinker import _eventfd_fast
from pyshrinker._syscalls import (
    EVENTFD_MAX,
    EventfdFlag,
    eventfd,
    eventfd_drain,
    eventfd_read,
    eventfd_write,
)


@pytest.fixture
def efd() -> Iterator[int]:
    fd = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
    try:
        yield fd
    finally:
        os.close(fd)


class TestSemantics:
    def test_read_resets_and_empty_is_eagain(self, efd: int) -> None:
        with pytest.raises(BlockingIOError):
            eventfd_read(efd)
        eventfd_write(efd, 3)
        eventfd_write(efd, 4)
        assert eventfd_read(efd) == 7
        assert eventfd_drain(efd) == 0

    def test_full_counter_refuses_without_waiting(self, efd: int) -> None:
        eventfd_write(efd, EVENTFD_MAX)
        with pytest.raises(BlockingIOError):
            eventfd_write(efd, 1)
        assert eventfd_read(efd) == EVENTFD_MAX

    @pytest.mark.parametrize("value", [0, -1, EVENTFD_MAX + 1, 2**64, 2**100])
    def test_values_out_of_range(self, efd: int, value: int) -> None:
        with pytest.raises(ValueError):
            eventfd_write(efd, value)
        with pytest.raises((ValueError, OverflowError)):
            _eventfd_fast.write(efd, value)
        assert eventfd_drain(efd) == 0

    def test_not_an_int(self, efd: int) -> None:
        with pytest.raises(TypeError):
            _eventfd_fast.write(efd, 1.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            _eventfd_fast.read("3")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            _eventfd_fast.write(efd)  # type: ignore[call-arg]

    def test_closed_fd(self) -> None:
        fd = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
        os.close(fd)
        with pytest.raises(OSError) as err:
            eventfd_read(fd)
        assert err.value.errno == errno.EBADF
        with pytest.raises(OSError) as err:
            eventfd_write(fd, 1)
        assert err.value.errno == errno.EBADF

    def test_not_an_eventfd(self) -> None:
        # A pipe takes 8 bytes, but a read of a pipe holding fewer is not an eventfd's.
        r, w = os.pipe()
        try:
            os.set_blocking(r, False)
            os.write(w, b"abc")
            with pytest.raises(OSError) as err:
                eventfd_read(r)
            assert err.value.errno == errno.EINVAL
        finally:
            os.close(r)
            os.close(w)


class TestGIL:
    """A non-blocking call keeps the GIL; a blocking one releases it while it waits."""

    @staticmethod
    def _others_ran_during(call: Callable[[], object]) -> int:
        # Another thread, woken while this one holds the GIL, waits for it. With a switch
        # interval of 2 s it does not ask for it before 2 s have passed, so it runs (and
        # counts) within the 50 ms below only if `call` released the GIL. The first 5 ms give
        # it time to be scheduled and start waiting.
        count = [0]
        go = threading.Event()
        stop = [False]

        def spin() -> None:
            go.wait()
            while not stop[0]:
                count[0] += 1

        old = sys.getswitchinterval()
        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
        sys.setswitchinterval(2.0)
        try:
            go.set()  # wakes it; it now waits for the GIL this thread holds
            settle = time.perf_counter() + 0.005
            while time.perf_counter() < settle:
                pass
            end = time.perf_counter() + 0.05
            while time.perf_counter() < end:
                call()
            ran = count[0]
        finally:
            stop[0] = True
            sys.setswitchinterval(old)
            thread.join()
        return ran

    def test_non_blocking_keeps_it(self, efd: int) -> None:
        def call() -> None:
            eventfd_write(efd, 1)
            eventfd_read(efd)

        assert self._others_ran_during(call) == 0

    def test_the_check_can_fail(self, efd: int) -> None:
        # os.read and os.write release the GIL: the same check sees the other thread run.
        def call() -> None:
            os.write(efd, (1).to_bytes(8, sys.byteorder))
            os.read(efd, 8)

        assert self._others_ran_during(call) > 0

    def test_blocking_releases_it(self) -> None:
        # A blocking read waits for a write from another thread: if it kept the GIL, the
        # writer could never run. SIGALRM ends the wait then (EINTR, then the handler raises).
        fd = eventfd(0, EventfdFlag.CLOEXEC)

        def expired(signum: int, frame: object) -> None:
            raise TimeoutError("the blocking read kept the GIL")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(10)
        try:
            writer = threading.Timer(0.05, eventfd_write, (fd, 9))
            writer.start()
            assert eventfd_read(fd) == 9
            writer.join()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            os.close(fd)

    def test_a_signal_handler_runs_and_its_error_propagates(self) -> None:
        # EINTR: the handler runs while the read waits; what it raises ends the read.
        fd = eventfd(0, EventfdFlag.CLOEXEC)

        def expired(signum: int, frame: object) -> None:
            raise TimeoutError("handler ran")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        try:
            with pytest.raises(TimeoutError, match="handler ran"):
                eventfd_read(fd)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            os.close(fd)
