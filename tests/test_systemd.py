"""systemd's memory pressure protocol against a real FIFO, socket, PSI file and kernfs file."""

from __future__ import annotations

import base64
import os
import select
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest

from pyshrinker import Controller, Level, subscribe_levels
from pyshrinker.cgroup import v2_group_of
from pyshrinker.client import settle
from pyshrinker.controller import _level_of
from pyshrinker.errors import UnsupportedError
from pyshrinker.signals.psi import StallKind, psi_available
from pyshrinker.signals.systemd import (
    PressureWatchOff,
    SystemdPressureWatch,
    WatchKind,
    read_environment,
)
from pyshrinker.transport import EmbeddedTransport

from .conftest import need

PSI_TRIGGER = b"some 150000 2000000\0"


def b64(data: bytes) -> str:
    """Base64 text, as systemd puts it in $MEMORY_PRESSURE_WRITE."""
    return base64.b64encode(data).decode("ascii")


def woke(watch: SystemdPressureWatch, timeout: float = 2.0) -> bool:
    """Whether the watch's fd polls ready for its events within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(watch.fileno(), watch.events)
    return bool(poller.poll(int(timeout * 1000)))


@pytest.fixture
def fifo(tmp_path) -> str:
    """A FIFO in a temporary directory."""
    path = str(tmp_path / "pressure.fifo")
    os.mkfifo(path)
    return path


class UnixServer:
    """An AF_UNIX listener accepting up to two clients on a thread."""

    def __init__(self, path: str, kind: int = socket.SOCK_STREAM) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, kind)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(5.0)
        self.conns: list[socket.socket] = []
        self.accepted = threading.Semaphore(0)
        self.thread = threading.Thread(target=self._serve, args=(2,), daemon=True)
        self.thread.start()

    def _serve(self, count: int) -> None:
        for _ in range(count):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(5.0)
            self.conns.append(conn)
            self.accepted.release()

    def wait_accepted(self) -> socket.socket:
        """The next connection accepted."""
        assert self.accepted.acquire(timeout=5.0), "no client connected"
        return self.conns[-1]

    def close(self) -> None:
        """Close every socket and join the thread."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        except OSError:
            pass
        self.listener.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(5.0)
        assert not self.thread.is_alive()


@pytest.fixture
def unix_server(tmp_path) -> Iterator[UnixServer]:
    """A stream socket server on a thread, closed afterwards."""
    server = UnixServer(str(tmp_path / "pressure.sock"))
    yield server
    server.close()


class TestEnvironment:
    """Reading $MEMORY_PRESSURE_WATCH and $MEMORY_PRESSURE_WRITE."""

    @pytest.mark.parametrize("value", [None, "", "/dev/null"])
    def test_unset_empty_or_dev_null_means_off(self, value):
        """No variable, an empty one or /dev/null: no watch, with the reason."""
        env = {} if value is None else {"MEMORY_PRESSURE_WATCH": value}
        with pytest.raises(PressureWatchOff, match="MEMORY_PRESSURE_WATCH"):
            read_environment(env)
        with pytest.raises(PressureWatchOff):
            SystemdPressureWatch.from_environment(env)

    def test_payload_decoded(self):
        """The base64 bytes are decoded, NUL included."""
        env = {"MEMORY_PRESSURE_WATCH": "/x", "MEMORY_PRESSURE_WRITE": b64(PSI_TRIGGER)}
        setting = read_environment(env)
        assert setting.path == "/x"
        assert setting.payload == PSI_TRIGGER

    def test_bad_base64_and_relative_path(self):
        """Garbage in $MEMORY_PRESSURE_WRITE or a relative path is a ValueError."""
        with pytest.raises(ValueError, match="base64"):
            read_environment({"MEMORY_PRESSURE_WATCH": "/x", "MEMORY_PRESSURE_WRITE": "%%%"})
        with pytest.raises(ValueError, match="absolute"):
            read_environment({"MEMORY_PRESSURE_WATCH": "memory.pressure"})


class TestFifo:
    """A FIFO: POLLIN, read and discard."""

    def test_write_wakes_and_consume_drains(self, fifo):
        """Bytes written by another opener wake the watch once; consume() drains them."""
        env = {"MEMORY_PRESSURE_WATCH": fifo, "MEMORY_PRESSURE_WRITE": b64(b"hello")}
        with SystemdPressureWatch.from_environment(env) as watch:
            assert watch.kind is WatchKind.FIFO
            assert watch.events == select.POLLIN
            assert not woke(watch, 0.05)  # our own payload is no event
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(writer, b"pressure!" * 100)
                assert woke(watch)
                assert watch.consume() is True
                assert not woke(watch, 0.05)
                assert watch.consume() is False
            finally:
                os.close(writer)
            # A writer that left does not leave the FIFO polling hang-up forever.
            assert not woke(watch, 0.1)
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.write(writer, b"again")
            os.close(writer)
            assert woke(watch)
            assert watch.consume() is True

    def test_close_closes_fd(self, fifo):
        """close() closes the fd and may be called twice."""
        before = len(os.listdir("/proc/self/fd"))
        watch = SystemdPressureWatch.open(fifo)
        assert len(os.listdir("/proc/self/fd")) == before + 1
        watch.close()
        watch.close()
        assert len(os.listdir("/proc/self/fd")) == before
        assert watch.consume() is False


class TestSocket:
    """An AF_UNIX socket: connect, write the payload, POLLIN, read and discard."""

    def test_connect_write_and_wake(self, unix_server):
        """The payload reaches the server; bytes it sends wake the watch."""
        env = {"MEMORY_PRESSURE_WATCH": unix_server.path, "MEMORY_PRESSURE_WRITE": b64(b"hi\0")}
        with SystemdPressureWatch.from_environment(env) as watch:
            assert watch.kind is WatchKind.SOCKET
            conn = unix_server.wait_accepted()
            assert conn.recv(100) == b"hi\0"
            assert not woke(watch, 0.05)
            conn.sendall(b"pressure")
            assert woke(watch)
            assert watch.consume() is True
            assert not woke(watch, 0.05)

    def test_peer_closing_reconnects(self, unix_server):
        """When the server hangs up, consume() says no event and connects again."""
        with SystemdPressureWatch.open(unix_server.path, b"hello") as watch:
            first = unix_server.wait_accepted()
            assert first.recv(100) == b"hello"
            fd = watch.fileno()
            first.close()
            assert woke(watch)
            assert watch.consume() is False
            second = unix_server.wait_accepted()
            assert second.recv(100) == b"hello"
            assert watch.reconnects == 1 and watch.connected
            assert watch.fileno() == fd
            assert not woke(watch, 0.05)
            second.sendall(b"x")
            assert woke(watch)
            assert watch.consume() is True

    def test_peer_gone_goes_quiet(self, tmp_path):
        """When the server is gone for good, the watch stops waking instead of spinning."""
        server = UnixServer(str(tmp_path / "once.sock"))
        try:
            watch = SystemdPressureWatch.open(server.path)
            conn = server.wait_accepted()
            server.listener.shutdown(socket.SHUT_RDWR)
            os.unlink(server.path)
            conn.close()
            assert woke(watch)
            assert watch.consume() is False
            assert not watch.connected
            assert not woke(watch, 0.1)
            watch.close()
        finally:
            server.close()

    def test_seqpacket_listener(self, tmp_path):
        """A SOCK_SEQPACKET listener is connected to as well."""
        server = UnixServer(str(tmp_path / "seq.sock"), socket.SOCK_SEQPACKET)
        try:
            with SystemdPressureWatch.open(server.path, b"trigger") as watch:
                conn = server.wait_accepted()
                assert conn.recv(100) == b"trigger"
                conn.send(b"event")
                assert woke(watch)
                assert watch.consume() is True
        finally:
            server.close()


class TestRegularFile:
    """A regular file: a PSI trigger armed from $MEMORY_PRESSURE_WRITE, or a kernfs file."""

    @pytest.mark.kernel
    def test_psi_trigger_arms(self):
        """The base64 trigger is written to /proc/pressure/memory and the fd polls POLLPRI."""
        need(psi_available(), "needs PSI (/proc/pressure/memory)")
        env = {
            "MEMORY_PRESSURE_WATCH": "/proc/pressure/memory",
            "MEMORY_PRESSURE_WRITE": b64(PSI_TRIGGER),
        }
        with SystemdPressureWatch.from_environment(env) as watch:
            assert watch.kind is WatchKind.FILE
            assert watch.events == select.POLLPRI
            assert "PSI file /proc/pressure/memory" in watch.describe()
            assert "some 150000 2000000" in watch.describe()
            with select.epoll() as ep:
                ep.register(watch.fileno(), watch.events)

    @pytest.mark.kernel
    def test_psi_trigger_refused(self):
        """A trigger the kernel refuses (a 20 s window) fails clearly when arming."""
        need(psi_available(), "needs PSI (/proc/pressure/memory)")
        with pytest.raises(UnsupportedError, match="refused"):
            SystemdPressureWatch.open("/proc/pressure/memory", b"some 150000 20000000\0")

    @pytest.mark.kernel
    def test_psi_file_without_trigger_refused(self):
        """A PSI file with nothing to write would poll ready forever: refused."""
        need(psi_available(), "needs PSI (/proc/pressure/memory)")
        with pytest.raises(UnsupportedError, match="no trigger"):
            SystemdPressureWatch.open("/proc/pressure/memory")

    @pytest.mark.parametrize(("total_now", "first"), [(1000, False), (1500, True)])
    def test_first_psi_event_believed_only_if_total_moved(self, tmp_path, total_now, first):
        """The first PSI event counts only if the stall total moved since arming; later ones do."""
        path = tmp_path / "memory.pressure"
        line = "some avg10=0.00 avg60=0.00 avg300=0.00 total={}\n"
        path.write_text(line.format(total_now))
        fd = os.open(path, os.O_RDONLY)
        watch = SystemdPressureWatch(
            str(path),
            WatchKind.FILE,
            PSI_TRIGGER,
            select.POLLPRI,
            fd,
            stall_kind=StallKind.SOME,
            armed_total=1000,
        )
        with watch:
            assert watch.consume() is first
            assert watch.consume() is True

    def test_unpollable_file_refused(self, tmp_path):
        """A file on a disk filesystem cannot be polled: refused, fd closed."""
        path = tmp_path / "plain"
        path.write_text("nothing")
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(UnsupportedError, match="cannot be polled"):
            SystemdPressureWatch.open(str(path))
        assert len(os.listdir("/proc/self/fd")) == before

    def test_directory_refused(self, tmp_path):
        """A directory is neither file, FIFO nor socket."""
        with pytest.raises(UnsupportedError, match="not a regular file"):
            SystemdPressureWatch.open(str(tmp_path))

    @pytest.mark.kernel
    def test_kernfs_file_event(self):
        """A cgroup's cgroup.events changing (a process moved in) wakes the watch with POLLPRI."""
        root = v2_group_of()
        need(
            root is not None and os.access(root, os.W_OK),
            "needs a writable cgroup v2 hierarchy (root)",
        )
        assert root is not None
        group = os.path.join(root, f"pyshrinker-test-{uuid.uuid4().hex[:12]}")
        os.mkdir(group)
        child: subprocess.Popen[bytes] | None = None
        try:
            with SystemdPressureWatch.open(os.path.join(group, "cgroup.events")) as watch:
                assert watch.kind is WatchKind.FILE
                assert not woke(watch, 0.05)
                child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
                with open(os.path.join(group, "cgroup.procs"), "w") as procs:
                    procs.write(str(child.pid))
                assert woke(watch)
                assert watch.consume() is True
                assert not woke(watch, 0.05)
        finally:
            if child is not None:
                child.kill()
                child.wait()
            # The group empties once the child is reaped; rmdir may race the kernel briefly.
            for _ in range(100):
                try:
                    os.rmdir(group)
                    break
                except OSError:
                    threading.Event().wait(0.01)
            assert not os.path.exists(group)


class TestController:
    """Controller.for_current_process arms the watch the environment names."""

    def test_off_recorded(self, monkeypatch):
        """With $MEMORY_PRESSURE_WATCH=/dev/null, no watch and the reason in .unavailable."""
        monkeypatch.setenv("MEMORY_PRESSURE_WATCH", "/dev/null")
        controller = Controller.for_current_process()
        try:
            assert "/dev/null" in controller.unavailable["systemd"]
            assert not any("MEMORY_PRESSURE" in line for line in controller.describe_signals())
        finally:
            controller.close()

    def test_unset_recorded(self, monkeypatch):
        """Without the variable the reason says it is not set."""
        monkeypatch.delenv("MEMORY_PRESSURE_WATCH", raising=False)
        controller = Controller.for_current_process()
        try:
            assert "not set" in controller.unavailable["systemd"]
        finally:
            controller.close()

    def test_fifo_event_becomes_medium_level(self, monkeypatch, fifo):
        """A byte in the watched FIFO reaches medium-level subscribers through the controller."""
        monkeypatch.setenv("MEMORY_PRESSURE_WATCH", fifo)
        monkeypatch.delenv("MEMORY_PRESSURE_WRITE", raising=False)
        controller = Controller.for_current_process()
        try:
            assert "systemd" not in controller.unavailable
            assert any(f"FIFO {fifo}" in line for line in controller.describe_signals())
            watches = [n for n in controller._notifiers if isinstance(n, SystemdPressureWatch)]
            assert len(watches) == 1
            assert _level_of(watches[0]) is Level.MEDIUM
            heard: list[Level] = []
            got = threading.Event()

            def on_level(level: Level) -> None:
                heard.append(level)
                got.set()

            controller.start()
            with subscribe_levels(on_level, "medium", transport=EmbeddedTransport(controller)):
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.write(writer, b"1")
                finally:
                    os.close(writer)
                assert got.wait(5.0)
                assert settle()
            assert heard[0] is Level.MEDIUM
        finally:
            controller.close()
