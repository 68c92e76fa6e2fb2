"""Helpers for the pyshrinkerd tests: a daemon per test, raw controller files, the C client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pyshrinker.abi import EVENT_CONTROL, LEVEL_FILE, SHRINKER_FILE
from pyshrinker.daemon import REQUEST_FILE, DaemonProcess, Status, fuse_unavailable

from .conftest import need

#: The uid (and gid) tests drop to for "another user".
NOBODY = 65534

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C_CLIENT_SOURCE = os.path.join(ROOT, "examples", "c", "mempressure_client.c")


def need_fuse() -> None:
    """Skip (fail under PYSHRINKER_REQUIRE_KERNEL=1) unless pyshrinkerd can mount here."""
    reason = fuse_unavailable()
    need(reason is None and os.geteuid() == 0, reason or "FUSE tests run as root")


class Daemons:
    """Starts daemons on fresh mount points; :meth:`stop_all` unmounts and reaps them."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.running: list[DaemonProcess] = []
        self.made: list[str] = []

    def start(self, *args: str, test_control: bool = True, world: bool = False) -> DaemonProcess:
        """A daemon on a new directory; ``world`` puts it where any user can reach it."""
        mount = tempfile.mkdtemp(prefix="pyshrinkerd-", dir="/tmp" if world else self.base)
        self.made.append(mount)
        if world:
            os.chmod(mount, 0o755)
        argv = [*args, "--log-level", "WARNING"]
        if test_control:
            argv.append("--test-control")
        # In the emulated guest (scripts/vm-test.sh) Python runs about 10 times slower, more
        # when the host is loaded: the daemon's start-up gets longer there.
        timeout = 90.0 if os.environ.get("PYSHRINKER_VM") == "1" else 15.0
        daemon = DaemonProcess.start(mount, argv, timeout=timeout)
        self.running.append(daemon)
        return daemon

    def stop_all(self) -> None:
        """Stop every daemon (SIGTERM, then SIGKILL and fusermount3 -u if needed)."""
        for daemon in self.running:
            daemon.stop()
        for mount in self.made:
            try:
                os.rmdir(mount)
            except OSError:
                pass


@contextmanager
def running_daemons(base: str) -> Iterator[Daemons]:
    """A :class:`Daemons` factory whose daemons are all stopped and unmounted on exit."""
    need_fuse()
    made = Daemons(base)
    try:
        yield made
    finally:
        made.stop_all()


class Raw:
    """The controller files opened by hand, for line-level tests (closed by the test)."""

    def __init__(self, mount: str) -> None:
        self.mount = mount
        self.control = os.open(os.path.join(mount, EVENT_CONTROL), os.O_WRONLY | os.O_CLOEXEC)
        self.shrinker = os.open(os.path.join(mount, SHRINKER_FILE), os.O_WRONLY | os.O_CLOEXEC)
        self.level = os.open(os.path.join(mount, LEVEL_FILE), os.O_RDONLY | os.O_CLOEXEC)
        self._request: int | None = None
        self.eventfds: list[int] = []

    def eventfd(self) -> int:
        """A non-blocking eventfd closed with this object."""
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.eventfds.append(efd)
        return efd

    def write_control(self, line: str | bytes) -> None:
        """One write to cgroup.event_control."""
        os.write(self.control, line.encode() if isinstance(line, str) else line)

    def write_report(self, line: str | bytes) -> None:
        """One write to mempressure.shrinker."""
        os.write(self.shrinker, line.encode() if isinstance(line, str) else line)

    def register(self, chunk_size: int = 4096, cost: str = "") -> int:
        """Register a new eventfd as a shrinker; returns it."""
        efd = self.eventfd()
        self.write_control(f"{efd} {self.shrinker} {chunk_size}{' ' + cost if cost else ''}\n")
        return efd

    def request(self, line: str) -> None:
        """One write to the test-only mempressure.request."""
        if self._request is None:
            path = os.path.join(self.mount, REQUEST_FILE)
            self._request = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        os.write(self._request, line.encode())

    def close(self) -> None:
        """Close every fd opened here."""
        fds = [self.control, self.shrinker, self.level, *self.eventfds]
        if self._request is not None:
            fds.append(self._request)
        for fd in fds:
            os.close(fd)
        self.eventfds.clear()
        self._request = None


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` (the test waits on another process) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def shrinker_count(status: Status, pid: int, efd: int) -> int | None:
    """The count of shrinker (pid, efd), or None if not registered."""
    for line in status.shrinkers:
        if line.pid == pid and line.efd == efd:
            return line.count
    return None


def eventfds_of(pid: int) -> int:
    """How many eventfds process ``pid`` holds."""
    count = 0
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            if os.readlink(os.path.join(base, name)) == "anon_inode:[eventfd]":
                count += 1
        except OSError:
            pass
    return count


def compile_c_client(directory: str) -> str:
    """examples/c/mempressure_client.c compiled (as its README says, plus -Wall -Werror)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    need(compiler is not None, "needs a C compiler")
    assert compiler is not None
    out = os.path.join(directory, "mempressure_client")
    subprocess.run(
        [compiler, "-O2", "-Wall", "-Werror", "-pthread", "-o", out, C_CLIENT_SOURCE],
        check=True,
        capture_output=True,
    )
    return out


def json_lines(text: str) -> list[dict]:
    """The JSON objects among ``text``'s lines."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def fork_and(action: Callable[[], object], uid: int | None = None) -> int:
    """Run ``action`` in a forked child (as ``uid``); returns 0 or the errno it raised."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            action()
        except OSError as err:
            code = err.errno or 255
        except BaseException:
            code = 254
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
