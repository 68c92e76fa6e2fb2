"""Small helpers the tests share: a scripted memory source, a private controller, reaping."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from pyshrinker.cgroup import CgroupVersion, MemorySource, MemoryState
from pyshrinker.controller import Controller, ControllerConfig
from pyshrinker.transport import EmbeddedTransport


@attrs.define(eq=False)
class ScriptedMemory(MemorySource):
    """A memory source whose readings the test sets."""

    state: MemoryState = attrs.field(factory=lambda: MemoryState(0, 0, None))
    reads: int = 0

    @classmethod
    def with_limit(cls, limit: int, working_set: int = 0) -> ScriptedMemory:
        """A source at ``working_set`` bytes under ``limit``."""
        return cls(
            CgroupVersion.BUDGET,
            "scripted",
            state=MemoryState(usage=working_set, working_set=working_set, limit=limit),
        )

    def set(self, working_set: int) -> None:
        """Move the working set (usage follows)."""
        self.state = attrs.evolve(self.state, usage=working_set, working_set=working_set)

    def read(self) -> MemoryState:
        self.reads += 1
        return self.state


@contextmanager
def private_controller(
    memory: MemorySource | None = None, **config: object
) -> Iterator[tuple[Controller, EmbeddedTransport]]:
    """A started controller of the test's own, closed afterwards."""
    controller = Controller.create(memory, config=ControllerConfig(**config))  # type: ignore[arg-type]
    controller.start()
    try:
        yield controller, EmbeddedTransport(controller)
    finally:
        controller.close()


def reap(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """End a child the test started (SIGKILL, by its Popen, if it still runs), wait for it and
    close its pipes (left open, they are ResourceWarnings under a debug CPython)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
