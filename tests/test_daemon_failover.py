"""A dead pyshrinkerd does not take its clients with it (issue 9, item 13): clients fall back to
their cgroup's elected controller and rejoin a restarted daemon; a dead daemon's mount is taken
over by the next daemon; a live one is not mounted over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from pyshrinker.daemon import DaemonProcess, mounted, read_status, unmount
from pyshrinker.errors import UnsupportedError
from pyshrinker.transport import CONTROLLER_DIR_ENV

from .daemon_helpers import need_fuse

MiB = 1 << 20
WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "daemon_workers.py")


@pytest.fixture
def mount_point() -> Iterator[str]:
    """An empty directory to mount on, unmounted and removed afterwards."""
    need_fuse()
    path = tempfile.mkdtemp(prefix="pyshrinkerd-failover-")
    try:
        yield path
    finally:
        unmount(path)  # if a test left a dead daemon's mount
        os.rmdir(path)


def sigkill(daemon: DaemonProcess) -> None:
    """SIGKILL the daemon (our own child, by pid): its mount stays, answering ENOTCONN."""
    daemon.popen.send_signal(signal.SIGKILL)
    daemon.popen.wait()


@pytest.mark.fuse
class TestMountPoint:
    """What a new daemon finds on its mount point."""

    def test_dead_daemons_mount_is_taken_over(self, mount_point: str) -> None:
        """After a SIGKILL the mount answers ENOTCONN; the next daemon unmounts it and serves."""
        first = DaemonProcess.start(mount_point, ["--log-level", "WARNING"])
        sigkill(first)
        assert mounted(mount_point)
        with pytest.raises(OSError):
            os.stat(mount_point)
        second = DaemonProcess.start(mount_point, ["--log-level", "WARNING"])
        try:
            assert second.status().daemon["pid"] == second.pid
        finally:
            second.stop()

    def test_live_daemon_is_not_mounted_over(self, mount_point: str) -> None:
        """A second daemon on a served directory refuses (exit status 2), the first serves on."""
        first = DaemonProcess.start(mount_point, ["--log-level", "WARNING"])
        try:
            with pytest.raises(UnsupportedError, match="exited with status 2"):
                DaemonProcess.start(mount_point, ["--log-level", "WARNING"])
            assert first.status().daemon["pid"] == first.pid
        finally:
            first.stop()


@pytest.mark.fuse
@pytest.mark.v1
class TestClientSurvives:
    """A client allocating at 100 MiB/s through the daemon of its 256 MiB group."""

    def test_daemon_killed_and_restarted(self, v1_group, mount_point: str, report_figure) -> None:
        """SIGKILL the daemon mid-run: the client is not OOM-killed (its cgroup's own controller
        takes over), and it is registered with the restarted daemon within a second."""
        group = v1_group(256 * MiB)
        args = ["--cgroup", group.path, "--log-level", "WARNING"]
        daemon = DaemonProcess.start(mount_point, args)
        env = dict(os.environ, **{CONTROLLER_DIR_ENV: mount_point})
        argv = [sys.executable, WORKERS, "cache", "--target-mib", "1000", "--rate-mib", "100"]
        client = group.spawn(
            [*argv, "--seconds", "9"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        restarted: DaemonProcess | None = None
        try:
            deadline = time.monotonic() + 10
            while not read_status(mount_point).shrinkers_of(client.pid):
                assert time.monotonic() < deadline, "the client never registered"
                time.sleep(0.05)
            time.sleep(2)
            sigkill(daemon)
            time.sleep(2)  # the client runs on, steered by its cgroup's controller
            assert client.poll() is None, client.stderr.read() if client.stderr else ""
            restarted = DaemonProcess.start(mount_point, args)
            up = time.monotonic()
            while not restarted.status().shrinkers_of(client.pid):
                assert time.monotonic() - up < 10, "the client never rejoined the new daemon"
                time.sleep(0.02)
            rejoined_s = time.monotonic() - up
            out, err = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
            if restarted is not None:
                restarted.stop()
            daemon.stop()
        oom = group.read_keyed("memory.oom_control")["oom_kill"]
        report_figure("daemon restart", rejoined_s=round(rejoined_s, 3), oom_kill=oom)
        assert oom == 0 and client.returncode == 0, err[-2000:]
        figures = json.loads(out.strip().splitlines()[-1])
        assert figures["requests"] > 0
        assert rejoined_s < 1.0
