"""What creating a cache does to the process, tested.

Each check that concerns process-wide state (the allocator, threads, fds, signal handlers) runs in
a fresh interpreter (tests/footprint_worker.py): the test runner's own process has changed all of
them already.
"""

from __future__ import annotations

import pytest

from .footprint_worker import run_in_fresh_process as run_worker


class TestAllocatorSettings:
    """No allocator setting changes: glibc's dynamic mmap threshold still moves."""

    def test_control_pinned_threshold_is_seen(self) -> None:
        """The check works: with the threshold pinned (as 0.1 did), a 512 KiB block is mmapped."""
        assert run_worker("threshold", "pinned")["mmapped_512k"] is True

    @pytest.mark.parametrize("mode", ["none", "embedded", "files"])
    def test_threshold_still_dynamic(self, mode: str) -> None:
        """After caches and the embedded controller, or a FilesTransport, 512 KiB is heap memory."""
        assert run_worker("threshold", mode)["mmapped_512k"] is False

    def test_no_mallopt_binding(self) -> None:
        """pyshrinker has no way to change malloc's settings: no mallopt in the compiled module."""
        from pyshrinker import _syscalls

        assert not hasattr(_syscalls, "mallopt")
        assert not hasattr(_syscalls.lib, "pys_mallopt")
