"""pyshrinkerd against hostile and broken clients (issue 9): real FUSE, real kernel, bounded.

Every action that could hang on the mount runs in a child process with a deadline, so a daemon
that hangs fails the test instead of hanging it. At the end the daemon is stopped first (SIGTERM,
then SIGKILL after 10 s, which aborts the FUSE connection and so frees every writer stuck on it),
and only then are the children killed and reaped.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pyshrinker._syscalls import eventfd_read
from pyshrinker.daemon import REQUEST_FILE, read_status
from pyshrinker.transport import CONTROLLER_DIR_ENV, FilesTransport

from .daemon_helpers import (
    NOBODY,
    Daemons,
    Raw,
    eventfds_of,
    fork_and,
    shrinker_count,
    wait_for,
)
from .helpers import reap

pytestmark = pytest.mark.kernel

MiB = 1 << 20
WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "daemon_workers.py")

#: The largest value an eventfd counter holds: any write to a counter this full blocks.
EVENTFD_FULL = 2**64 - 2

#: Child programs; each gets the mount as argv[1] (and a line as argv[2]) and exits 0 if done.
REGISTER_AND_REPORT = """
import os, sys
mount = sys.argv[1]
control = os.open(os.path.join(mount, "cgroup.event_control"), os.O_WRONLY)
shrinker = os.open(os.path.join(mount, "mempressure.shrinker"), os.O_WRONLY)
efd = os.eventfd(0, os.EFD_NONBLOCK)
os.write(control, f"{efd} {shrinker} 4096\\n".encode())
os.write(shrinker, f"{efd} 10\\n".encode())
"""
WRITE_REQUEST = """
import os, sys
fd = os.open(os.path.join(sys.argv[1], "mempressure.request"), os.O_WRONLY)
os.write(fd, sys.argv[2].encode())
"""
READ_STATUS = """
import os, sys
with open(os.path.join(sys.argv[1], "mempressure.status")) as f:
    assert f.read().startswith('{"kind": "daemon"')
"""


class Children:
    """Child processes that use the mount, each given a deadline; reaped by the fixture."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def run(self, code: str, *args: str, timeout: float = 5.0) -> int | None:
        """Run ``code`` with ``args``; its exit status, or None if it is still running."""
        child = subprocess.Popen([sys.executable, "-c", code, *args])
        self.running.append(child)
        try:
            return child.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def reap(self) -> None:
        """Kill and reap every child (call once no daemon can hold them any more)."""
        for child in self.running:
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.fixture
def children(daemons: Daemons) -> Iterator[Children]:
    """Children with deadlines; the daemons are stopped before the children are reaped."""
    made = Children()
    try:
        yield made
    finally:
        daemons.stop_all()
        made.reap()


def full_blocking_eventfd(raw: Raw) -> int:
    """A blocking eventfd (as the proposal's example makes them) whose counter is full."""
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    raw.eventfds.append(efd)
    os.eventfd_write(efd, EVENTFD_FULL)
    return efd


class TestBlockingClient:
    """Item 9: a client that fills its own blocking eventfd cannot hang the daemon."""

    def test_request_to_a_full_eventfd(self, daemon, raw, children):
        """The request returns, the client is dropped, others register, SIGTERM works."""
        efd = full_blocking_eventfd(raw)
        raw.write_control(f"{efd} {raw.shrinker} 4096\n")
        raw.write_report(f"{efd} 100\n")
        line = f"{os.getpid()} {efd} 10\n"
        assert children.run(WRITE_REQUEST, daemon.mount, line) == 0, "request hung"
        assert children.run(REGISTER_AND_REPORT, daemon.mount) == 0, "other clients hang"
        assert children.run(READ_STATUS, daemon.mount) == 0, "status hangs"
        status = daemon.status()
        assert shrinker_count(status, os.getpid(), efd) is None
        assert status.daemon["unanswerable"] == [os.getpid()]
        with pytest.raises(OSError) as info:  # refused until it exits
            raw.register()
        assert info.value.errno == errno.EPERM
        daemon.popen.send_signal(signal.SIGTERM)
        assert daemon.popen.wait(10) == 0

    def test_shrink_reaches_the_others(self, daemon, raw, children):
        """A proportional shrink skips the stuck client and still asks the honest one."""
        stuck = full_blocking_eventfd(raw)
        raw.write_control(f"{stuck} {raw.shrinker} 4096\n")
        raw.write_report(f"{stuck} 100\n")
        honest = raw.register()
        raw.write_report(f"{honest} 100\n")
        assert children.run(WRITE_REQUEST, daemon.mount, "shrink 409600\n") == 0
        assert eventfd_read(honest) > 0
        assert children.run(WRITE_REQUEST, daemon.mount, "shrink 409600\n") == 0
        assert eventfd_read(honest) > 0

    def test_level_listener_with_a_full_eventfd(self, daemon, raw, children):
        """A level event skips a listener whose counter is full and reaches the next one."""
        stuck = full_blocking_eventfd(raw)
        raw.write_control(f"{stuck} {raw.level} oom\n")
        honest = raw.eventfd()
        raw.write_control(f"{honest} {raw.level} low\n")
        assert children.run(WRITE_REQUEST, daemon.mount, "level oom\n") == 0, "level hung"
        assert eventfd_read(honest) == 1
        assert children.run(READ_STATUS, daemon.mount) == 0


class TestCosts:
    """Item 10: a cost of 1e-320 made a share infinite, then NaN: nobody was asked again."""

    @pytest.mark.parametrize("cost", ["1e-320", "0.0009", "1001", "1e300"])
    def test_out_of_range_cost_refused(self, raw, cost):
        """Costs outside 0.001..1000 are EINVAL (before: 1e-320 and 1e300 were taken)."""
        efd = raw.eventfd()
        with pytest.raises(OSError) as info:
            raw.write_control(f"{efd} {raw.shrinker} 4096 {cost}\n")
        assert info.value.errno == errno.EINVAL

    def test_extreme_costs_still_share(self, daemon, raw):
        """At the bounds, with a 2**48-chunk claim, a shrink still asks everyone something."""
        cheap = raw.register(4096, cost="0.001")
        dear = raw.register(4096, cost="1000")
        raw.write_report(f"{cheap} {2**48}\n")
        raw.write_report(f"{dear} 1000\n")
        raw.request(f"shrink {1000 * 4096 * 1000}\n")
        assert eventfd_read(cheap) > 0
        (episode,) = daemon.status().episodes
        assert sum(chunks for *_, chunks in episode.asked) >= 1000 * 1000


class TestLyingClient:
    """Item 11: a client claiming 2**48 chunks does not take the asks an honest one needs."""

    def test_honest_cache_survives_beside_a_liar(self, v1_group, daemons):
        """A cache filling past a 256 MiB limit at 100 MiB/s lives, asked most of the memory."""
        group = v1_group(256 * MiB)
        daemon = daemons.start("--cgroup", group.path)
        files = Raw(daemon.mount)
        chunk = 256 * 1024  # served by mmap: freeing it lowers usage at once
        argv = [sys.executable, WORKERS, "cache", "--name", "honest", "--chunk-size", str(chunk)]
        argv += ["--target-mib", "400", "--rate-mib", "100", "--seconds", "6"]
        env = dict(os.environ, **{CONTROLLER_DIR_ENV: daemon.mount})
        honest = None
        try:
            liar = files.register(4096)
            files.write_report(f"{liar} {2**48}\n")  # and it never frees anything
            honest = group.spawn(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert honest.stdout is not None and honest.stdin is not None
            line = honest.stdout.readline()  # its figures after 6 s; nothing if OOM-killed
            status = daemon.status()
            honest.stdin.close()
            code = honest.wait(30)
        finally:
            files.close()
            if honest is not None:
                reap(honest)
        oom_kills = group.read_keyed("memory.oom_control").get("oom_kill", 0)
        assert (code, oom_kills) == (0, 0), line
        figures = json.loads(line)
        asked = {(s.pid, s.efd): s.chunks_requested * s.chunk_size for s in status.shrinkers}
        mine = asked[(figures["pid"], figures["efd"])]
        lied_to = asked[(os.getpid(), liar)]
        print(json.dumps({"honest_asked_mib": mine / MiB, "liar_asked_mib": lied_to / MiB}))
        # Before: the liar was asked nearly everything and the cache one chunk per round. Now
        # the liar is distrusted at its first round, and the cache (asked as much as it gave:
        # it refills at once) is not.
        assert status.daemon["distrusted"] == [os.getpid()]
        assert mine > 2 * lied_to

        # The episode lines say whom each ask weighed a sixteenth: the liar, after its round.
        def distrusted(pid: int, efd: int) -> list[bool]:
            return [
                h.distrusted
                for e in status.episodes
                for h in e.holdings
                if (h.pid, h.efd) == (pid, efd)
            ]

        liar_marks = distrusted(os.getpid(), liar)
        assert liar_marks[-1] and not liar_marks[0], liar_marks
        assert not any(distrusted(figures["pid"], figures["efd"]))


def rss(pid: int) -> int:
    """The resident set of process ``pid``, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class TestBoundedMemory:
    """Item 12: daemon memory does not grow with registrations x episodes; shares round well."""

    def test_4096_shrinkers(self, daemons):
        """A 4 KiB need asks one chunk in all; 80 episodes of 4096 asks leave the RSS flat."""
        daemon = daemons.start("--max-per-process", "4096")
        files = Raw(daemon.mount)
        try:
            efds = [files.register() for _ in range(4096)]
            for efd in efds:
                files.write_report(f"{efd} 1000\n")
            files.request("shrink 4096\n")
            (episode,) = daemon.status().episodes
            # Before: one chunk of each of the 4096 shrinkers, 16 MiB for a 4 KiB need.
            assert sum(chunks for *_, chunks in episode.asked) == 1
            for _ in range(20):
                files.request(f"shrink {4096 * 4096}\n")  # one chunk of each
            early = rss(daemon.pid)
            for _ in range(60):
                files.request(f"shrink {4096 * 4096}\n")
            late = rss(daemon.pid)
            status = daemon.status()
        finally:
            files.close()
        print(json.dumps({"rss_after_20_mib": early / MiB, "rss_after_80_mib": late / MiB}))
        # Before: about 1.3 MiB more per episode (every holding of every episode kept).
        assert late - early < 8 * MiB
        assert status.daemon["requests_sent"] == 1 + 80 * 4096


class TestSmaller:
    """Item 14: one eventfd, one registration; a full table; who sees and who shrinks whom."""

    def test_same_eventfd_under_another_number(self, daemon, raw):
        """A dup of a registered eventfd is EINVAL (before: a second shrinker, asked twice)."""
        efd = raw.register()
        again = os.dup(efd)
        raw.eventfds.append(again)
        for line in (f"{again} {raw.shrinker} 4096\n", f"{again} {raw.level} low\n"):
            with pytest.raises(OSError) as info:
                raw.write_control(line)
            assert info.value.errno == errno.EINVAL
        # A child that inherited it cannot register it either: it is one eventfd.
        line = f"{efd} {raw.shrinker} 4096\n"
        assert fork_and(lambda: raw.write_control(line)) == errno.EINVAL
        assert [(s.pid, s.efd) for s in daemon.status().shrinkers] == [(os.getpid(), efd)]
        raw.write_control(f"{efd} -\n")  # unregistered: the other number may have it now
        raw.write_control(f"{again} {raw.shrinker} 4096\n")
        assert [(s.pid, s.efd) for s in daemon.status().shrinkers] == [(os.getpid(), again)]

    def test_full_table_is_controller_full(self, daemons):
        """ENOSPC reaches a client as ControllerFull (a TransportError), not a bare errno."""
        from pyshrinker.errors import ControllerFull, TransportError

        full = daemons.start("--max-total", "1")
        a, b = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        try:
            with FilesTransport.open(full.mount) as transport:
                transport.register(a, 4096, 1.0)
                with pytest.raises(ControllerFull) as info:
                    transport.register(b, 4096, 1.0)
            assert info.value.errno == errno.ENOSPC
            assert isinstance(info.value, TransportError)
        finally:
            os.close(a)
            os.close(b)

    def test_status_shows_other_users_nothing(self, daemons):
        """An allowed user sees its own processes and the totals, not root's pids and counts."""
        shared = daemons.start("--allow-other", "--allow-uid", str(NOBODY), world=True)
        files = Raw(shared.mount)
        root_pid = os.getpid()

        def as_nobody() -> None:
            mine = Raw(shared.mount)
            efd = mine.register()
            mine.write_report(f"{efd} 3\n")
            status = read_status(shared.mount)
            seen = {s.pid for s in status.shrinkers} | {r.pid for r in status.requests}
            seen |= {h.pid for e in status.episodes for h in e.holdings}
            if seen != {os.getpid()} or status.daemon["processes"] != 2:
                raise OSError(errno.EEXIST, f"nobody sees {seen}")

        try:
            efd = files.register()
            files.write_report(f"{efd} 5\n")
            files.request("shrink 4096\n")
            # Root sees its own (this also imports what the child needs: as nobody it could not
            # read this interpreter's files under /root).
            assert {s.pid for s in shared.status().shrinkers} == {root_pid}
            assert fork_and(as_nobody, uid=NOBODY) == 0
        finally:
            files.close()

    def test_test_control_for_root_and_the_daemon_user_only(self, daemons):
        """Another allowed user may not open mempressure.request, nor write through root's fd."""
        shared = daemons.start("--allow-other", "--allow-uid", str(NOBODY), world=True)
        files = Raw(shared.mount)
        path = os.path.join(shared.mount, REQUEST_FILE)
        try:
            efd = files.register()
            files.write_report(f"{efd} 10\n")
            assert fork_and(lambda: os.open(path, os.O_WRONLY), uid=NOBODY) == errno.EACCES
            files.request("level low\n")  # root may; the fd stays open
            line = f"{os.getpid()} {efd} 5\n"
            assert fork_and(lambda: files.request(line), uid=NOBODY) == errno.EACCES
            assert shrinker_count(shared.status(), os.getpid(), efd) == 10
        finally:
            files.close()


#: A client in a loop: register a blocking eventfd (and a level), report, until killed.
REPORT_FOREVER = """
import os, sys
mount = sys.argv[1]
control = os.open(os.path.join(mount, "cgroup.event_control"), os.O_WRONLY)
shrinker = os.open(os.path.join(mount, "mempressure.shrinker"), os.O_WRONLY)
level = os.open(os.path.join(mount, "mempressure.level"), os.O_RDONLY)
efd, lefd = os.eventfd(0), os.eventfd(0)
os.write(control, f"{efd} {shrinker} 4096\\n".encode())
os.write(control, f"{lefd} {level} low\\n".encode())
print("ready", flush=True)
while True:
    os.write(shrinker, f"{efd} 1\\n".encode())
"""


def fuzz_line(rng: random.Random, fds: list[int]) -> bytes:
    """A line that is usually malformed: wrong fields, fds, numbers, words, bytes, lengths."""
    pieces = [
        lambda: str(rng.choice(fds)),
        lambda: str(rng.randrange(-3, 1 << 20)),
        lambda: str(rng.choice([0, -1, 2**31, 2**48, 2**48 + 1, 2**64, 10**400])),
        lambda: rng.choice(["low", "medium", "oom", "critical", "-", "+", "shrink", "level"]),
        lambda: rng.choice(["1e-320", "nan", "inf", "0.001", "1000", "1_0", "0x10", "4k"]),
        lambda: rng.randbytes(rng.randrange(1, 8)).decode("latin-1"),
    ]
    body = " ".join(rng.choice(pieces)() for _ in range(rng.randrange(0, 6)))
    line = body.encode("latin-1") + rng.choice([b"\n", b"", b"\n\n", b"\x00", b"\n1 2\n"])
    return line if rng.random() > 0.01 else line * 40  # and now and then too long


class TestWhatHeldUp:
    """What the issue found robust stays so: malformed input, churn, killed clients."""

    def test_malformed_lines(self, daemon, raw):
        """6000 mostly malformed lines: each answered with a kernel errno, nothing leaks."""
        rng = random.Random(9)
        before = eventfds_of(daemon.pid)
        efds = [raw.register() for _ in range(2)]
        other = raw.eventfd()
        fds = [*efds, other, raw.control, raw.shrinker, raw.level, 0, 999]
        allowed = {errno.EINVAL, errno.EBADF, errno.ENOSPC, errno.EPERM}
        answers: dict[str, int] = {}
        for i in range(6000):
            line = fuzz_line(rng, fds)
            target = (raw.control, raw.shrinker)[i % 2]
            try:
                os.write(target, line)
                answers["ok"] = answers.get("ok", 0) + 1
            except OSError as err:
                assert err.errno in allowed, (line, err)
                answers[errno.errorcode[err.errno]] = answers.get(errno.errorcode[err.errno], 0) + 1
            if i % 3 == 0:
                try:
                    raw.request(fuzz_line(rng, fds).decode("latin-1"))
                except OSError as err:
                    assert err.errno in allowed, err
        print(json.dumps(answers))
        status = daemon.status()
        registered = status.daemon["registrations"]
        assert eventfds_of(daemon.pid) == before + registered
        assert daemon.popen.poll() is None

    def test_churn_leaves_rss_flat(self, daemon, raw):
        """Register, report, unregister 12,000 times: the daemon's RSS stays where it was."""
        efd = raw.eventfd()

        def cycles(n: int) -> None:
            for _ in range(n):
                raw.write_control(f"{efd} {raw.shrinker} 4096\n")
                raw.write_report(f"{efd} 5\n")
                raw.write_control(f"{efd} -\n")

        cycles(2000)
        early = rss(daemon.pid)
        cycles(10000)
        late = rss(daemon.pid)
        print(json.dumps({"rss_after_2000_mib": early / MiB, "rss_after_12000_mib": late / MiB}))
        assert late - early < 2 * MiB
        assert daemon.status().shrinkers == ()

    def test_clients_killed_mid_report(self, daemon):
        """24 clients SIGKILLed while reporting: every registration and duplicate goes."""
        before = eventfds_of(daemon.pid)
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", REPORT_FOREVER, daemon.mount], stdout=subprocess.PIPE
            )
            for _ in range(24)
        ]
        try:
            for client in clients:
                assert client.stdout is not None and client.stdout.readline() == b"ready\n"
            assert len(daemon.status().shrinkers) == 24
        finally:
            for client in clients:
                client.kill()  # all at once, then reaped
            for client in clients:
                reap(client)
        assert wait_for(lambda: daemon.status().daemon["registrations"] == 0, timeout=10)
        assert eventfds_of(daemon.pid) == before
