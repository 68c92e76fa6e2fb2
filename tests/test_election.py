"""One controller per memory cgroup: the election, the socket door's ABI, failover, fork, and a
state machine over processes joining, leaving, dying and forking."""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pyshrinker._syscalls import EventfdFlag, eventfd, eventfd_read
from pyshrinker.abi import Level
from pyshrinker.cgroup import ManagedCgroupV1
from pyshrinker.controller import Controller
from pyshrinker.errors import TransportPermissionError
from pyshrinker.shared import SCOPE_ENV, Door, Link, meeting_point

from .helpers import reap

MiB = 1 << 20
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "election_worker.py")
NOBODY = 65534


class Worker:
    """A tests/election_worker.py process; :meth:`ask` sends a command, returns its answer."""

    def __init__(self, scope: str, group: ManagedCgroupV1 | None = None, value_size: int = 64):
        argv = [sys.executable, WORKER, "--value-size", str(value_size)]
        self.scope = scope
        env = dict(os.environ, **{SCOPE_ENV: scope})
        kwargs: dict[str, Any] = dict(
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.proc = (
            group.spawn(argv, env=env, **kwargs)
            if group is not None
            else subprocess.Popen(argv, env=env, **kwargs)
        )
        self.pid = self.proc.pid

    def ask(self, command: str, timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        ready = threading.Event()
        box: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            box.append(self.proc.stdout.readline())
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or not box[0]:
            err = self.proc.stderr.read() if self.proc.poll() is not None else "(still running)"
            raise AssertionError(f"worker {self.pid} gave no answer to {command!r}: {err}")
        answer: dict[str, Any] = json.loads(box[0])
        return answer

    def kill(self) -> None:
        reap(self.proc)  # SIGKILL, our own child, by its Popen

    def exit(self) -> None:
        if self.proc.poll() is None:
            self.ask("exit")
        reap(self.proc)


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    """Factory for worker processes in one fresh election scope; all ended afterwards."""
    scope = f"test-{uuid.uuid4().hex[:12]}"
    made: list[Worker] = []

    def make(group: ManagedCgroupV1 | None = None, **kwargs: Any) -> Worker:
        worker = Worker(kwargs.pop("scope", scope), group, **kwargs)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.kill()


def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class TestElection:
    """The first process of a cgroup (and scope) to need a controller runs it."""

    def test_first_leads_others_follow(self, workers) -> None:
        """Three processes: one leads, two follow it; every count is exact, in one controller."""
        first = workers()
        first.ask("alloc 10")
        others = [workers(), workers()]
        for n, worker in enumerate(others, 2):
            worker.ask(f"alloc {10 * n}")
        books = [w.ask("books") for w in (first, *others)]
        assert [b["role"] for b in books] == ["leader", "follower", "follower"]
        assert {b["leader"] for b in books} == {first.pid}
        assert [(b["chunks"], b["count"]) for b in books] == [(10, 10), (20, 20), (30, 30)]
        status = others[0].ask("status")
        assert status["pid"] == first.pid
        assert sorted(status["followers"]) == sorted(w.pid for w in others)
        counts = {pid: count for pid, _efd, count, *_ in status["shrinkers"]}
        assert counts == {first.pid: 10, others[0].pid: 20, others[1].pid: 30}

    def test_scopes_elect_apart(self, workers) -> None:
        """Two scopes in one cgroup: two controllers."""
        a = workers(scope=f"a-{uuid.uuid4().hex}")
        b = workers(scope=f"b-{uuid.uuid4().hex}")
        assert a.ask("books")["role"] == b.ask("books")["role"] == "leader"

    @pytest.mark.v1
    def test_cgroups_elect_apart(self, v1_group, workers) -> None:
        """Two memory cgroups, two controllers; the name tells them apart by inode, so two
        groups that both call themselves "/" (containers of one pod) would too."""
        one, two = v1_group(256 * MiB), v1_group(256 * MiB)
        a1, a2, b1 = workers(one), workers(one), workers(two)
        roles = [w.ask("books") for w in (a1, a2, b1)]
        assert sorted(r["role"] for r in roles[:2]) == ["follower", "leader"]
        assert roles[0]["leader"] == roles[1]["leader"] in (a1.pid, a2.pid)
        assert roles[2]["role"] == "leader"


class TestFailover:
    """The process running the controller goes; another takes over; the books stay exact."""

    def test_leader_sigkilled(self, workers) -> None:
        """SIGKILL the leader: one survivor leads, the other follows it, counts exact."""
        leader = workers()
        assert leader.ask("books")["role"] == "leader"
        rest = [workers(), workers()]
        for n, worker in enumerate((leader, *rest), 1):
            worker.ask(f"alloc {100 * n}")
        killed_at = time.monotonic()
        leader.kill()
        wait_for(
            lambda: {w.ask("books")["switches"] for w in rest} == {1}, what="both survivors rejoin"
        )
        books = [w.ask("books") for w in rest]
        assert sorted(b["role"] for b in books) == ["follower", "leader"]
        (new_leader,) = [b["pid"] for b in books if b["role"] == "leader"]
        assert {b["leader"] for b in books} == {new_leader}
        assert [(b["chunks"], b["count"]) for b in books] == [(200, 200), (300, 300)]
        assert time.monotonic() - killed_at < 10

    def test_leader_exits(self, workers) -> None:
        """A leader that exits normally hands over the same way."""
        leader, follower = workers(), workers()
        leader.ask("alloc 5")
        follower.ask("alloc 7")
        leader.exit()
        wait_for(lambda: follower.ask("books")["role"] == "leader", what="the follower to lead")
        books = follower.ask("books")
        assert (books["chunks"], books["count"]) == (7, 7)

    @pytest.mark.v1
    def test_sigkill_mid_episode_in_a_limited_group(self, v1_group, workers, report_figure) -> None:
        """256 MiB group, three processes growing by 200 MiB each (1 MiB/ms); the leader is
        SIGKILLed while they grow and the two others grow 200 MiB more: no OOM kill, requests
        go on, the books end exact."""
        group = v1_group(256 * MiB)
        leader = workers(group, value_size=4096)
        assert leader.ask("books")["role"] == "leader"
        rest = [workers(group, value_size=4096) for _ in range(2)]
        for worker in (leader, *rest):
            worker.ask("grow 200")
        wait_for(lambda: sum(w.ask("books")["requests"] for w in rest) > 0, what="a request")
        asked_before = sum(w.ask("books")["requests"] for w in rest)
        killed_at = time.monotonic()
        leader.kill()
        # The survivors go on growing through the failover, by more than the group holds: their
        # first 200 MiB may be nearly all there by now (a slow interpreter), and the killed
        # leader's memory, freed, would leave them room without a request.
        for worker in rest:
            worker.ask("grow 200")
        time.sleep(1.5)
        books = [w.ask("books") for w in rest]
        # CLOCK_MONOTONIC is the machine's: comparable across processes.
        rejoined_s = max(b["switched_at"] for b in books) - killed_at
        report_figure("failover", rejoined_ms=round(rejoined_s * 1000, 1))
        assert 0 < rejoined_s < 1.0
        assert sum(b["requests"] for b in books) > asked_before, "no request after the failover"
        assert group.read_keyed("memory.oom_control")["oom_kill"] == 0
        assert all(w.proc.poll() is None for w in rest)
        assert sorted(b["role"] for b in books) == ["follower", "leader"]
        assert all(b["chunks"] == b["count"] for b in books), books
        assert all(b["evicted"] > 0 for b in books), books


@pytest.mark.v2
class TestOnCgroupV2:
    """The same on a real cgroup v2 kernel (the guest stage): three processes of one group with
    memory.max elect one controller, and a SIGKILLed leader is replaced without an OOM kill."""

    def test_failover_under_memory_max(self, v2_group, workers, report_figure) -> None:
        """memory.max 256 MiB, three processes growing by 150 MiB each; the leader SIGKILLed
        mid-way: oom_kill 0 in memory.events, the survivors' books exact."""
        group = v2_group(256 * MiB)
        leader = workers(group, value_size=4096)
        assert leader.ask("books")["role"] == "leader"
        rest = [workers(group, value_size=4096) for _ in range(2)]
        assert {w.ask("books")["leader"] for w in rest} == {leader.pid}
        for worker in (leader, *rest):
            worker.ask("grow 150")
        wait_for(lambda: sum(w.ask("books")["requests"] for w in rest) > 0, 60, "a request")
        killed_at = time.monotonic()
        leader.kill()
        wait_for(lambda: all(w.ask("books")["switches"] == 1 for w in rest), 30, "the rejoin")
        books = [w.ask("books") for w in rest]
        report_figure(
            "v2 failover",
            rejoined_ms=round(1000 * (max(b["switched_at"] for b in books) - killed_at)),
        )
        time.sleep(3)  # they go on growing under the new controller
        books = [w.ask("books") for w in rest]
        assert group.oom_kills() == 0
        assert sorted(b["role"] for b in books) == ["follower", "leader"]
        assert all(b["chunks"] == b["count"] for b in books), books


class TestFork:
    """A pre-fork server forks after its caches exist: the child registers as itself."""

    def test_child_of_a_follower(self, workers) -> None:
        """A follower forks; its child follows the same leader with exact books."""
        workers().ask("alloc 1")
        follower = workers()
        follower.ask("alloc 4")
        assert follower.ask("fork")["child_ok"]
        books = follower.ask("books")
        assert (books["chunks"], books["count"]) == (4, 4)

    def test_child_of_the_leader(self, workers) -> None:
        """The leader forks; its child follows its parent; the parent still leads."""
        leader = workers()
        leader.ask("alloc 3")
        assert leader.ask("fork")["child_ok"]
        books = leader.ask("books")
        assert books["role"] == "leader" and (books["chunks"], books["count"]) == (3, 3)


# ---------------------------------------------------------------------- the ABI over the socket


class RawClient:
    """A hand-made follower: the socket, the messages, nothing of pyshrinker's client."""

    def __init__(self, name: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(name)
        self.sock.settimeout(5)
        self.greeting = self.sock.recv(256)

    def call(self, message: bytes, fds: tuple[int, ...] = ()) -> bytes:
        self.send(message, fds)
        return self.sock.recv(1 << 20)

    def send(self, message: bytes, fds: tuple[int, ...] = ()) -> None:
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([message], ancdata)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def door() -> Iterator[tuple[Door, Controller, bytes]]:
    """A door on a fresh name, over a private controller with no memory source."""
    name = f"\0pyshrinker-test/{uuid.uuid4().hex}".encode()
    controller = Controller.create(None).start()
    listening = Door.bind(name)
    assert listening is not None
    served = Door.start(listening, controller)
    try:
        yield served, controller, name
    finally:
        served.close()
        controller.close()


def nonblocking_eventfd() -> int:
    return eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)


class TestAbiOverTheSocket:
    """Every rule pyshrinkerd's files keep, kept by the socket door too."""

    def test_greeting_names_the_controller(self, door) -> None:
        """A follower is greeted with the controller's pid."""
        _, _, name = door
        client = RawClient(name)
        assert client.greeting == f"0 hello {os.getpid()}".encode()
        client.close()

    def test_register_report_request_readd(self, door) -> None:
        """Register, +N/-N with the floor at 0, a request on the eventfd, a re-add."""
        _, controller, name = door
        client = RawClient(name)
        efd = nonblocking_eventfd()
        try:
            assert client.call(b"cgroup.event_control %d 3 4096 2.0\n" % efd, (efd,)) == b"0"
            key = (os.getpid(), efd)
            client.send(b"mempressure.shrinker %d 10\n" % efd)
            client.send(b"mempressure.shrinker %d -3\n" % efd)
            assert client.call(b"query count %d" % efd) == b"0 7"
            client.send(b"mempressure.shrinker %d -100\n" % efd)
            assert client.call(b"query count %d" % efd) == b"0 0"
            client.send(b"mempressure.shrinker %d 5\n" % efd)
            assert client.call(b"query count %d" % efd) == b"0 5"
            assert controller.request(key, 4) == 4
            assert eventfd_read(efd) == 4
            assert controller.count(key) == 1
            client.send(b"mempressure.shrinker %d 2\n" % efd)  # re-add of what was not freed
            assert client.call(b"query count %d" % efd) == b"0 3"
            assert controller.shrinkers()[0].cost == 2.0
        finally:
            client.close()
            os.close(efd)

    def test_several_shrinkers_and_a_level(self, door) -> None:
        """Two shrinkers of different chunk sizes and a level listener from one process."""
        _, controller, name = door
        client = RawClient(name)
        fds = [nonblocking_eventfd() for _ in range(3)]
        try:
            assert client.call(b"cgroup.event_control %d 3 4096\n" % fds[0], (fds[0],)) == b"0"
            assert client.call(b"cgroup.event_control %d 3 1048576\n" % fds[1], (fds[1],)) == b"0"
            assert client.call(b"cgroup.event_control %d 3 medium\n" % fds[2], (fds[2],)) == b"0"
            assert sorted(i.chunk_size for i in controller.shrinkers()) == [4096, 1048576]
            assert controller.notify_level(Level.OOM) == 1
            assert eventfd_read(fds[2]) == 1
        finally:
            client.close()
            for fd in fds:
                os.close(fd)

    @pytest.mark.parametrize(
        "line",
        [
            b"cgroup.event_control garbage\n",
            b"cgroup.event_control %d 3 0\n",
            b"cgroup.event_control %d 3 4096 1e-320\n",
            b"cgroup.event_control %d 3 severe\n",
            b"frobnicate %d\n",
            b"query what\n",
        ],
    )
    def test_malformed_is_einval(self, door, line) -> None:
        """Malformed lines, bad chunk sizes, costs out of bounds, unknown levels: EINVAL."""
        _, controller, name = door
        client = RawClient(name)
        efd = nonblocking_eventfd()
        try:
            text = line % efd if b"%d" in line else line
            reply = client.call(text, (efd,))
            assert reply.split()[0] == str(errno.EINVAL).encode(), reply
            assert controller.shrinkers() == []
        finally:
            client.close()
            os.close(efd)

    def test_fd_must_be_one_nonblocking_eventfd(self, door) -> None:
        """No fd: EBADF; a pipe: EINVAL; a blocking eventfd: EINVAL (its writes could hang us)."""
        _, controller, name = door
        client = RawClient(name)
        read_end, write_end = os.pipe()
        blocking = eventfd(0, EventfdFlag.CLOEXEC)
        try:
            assert client.call(b"cgroup.event_control 7 3 4096\n").startswith(b"%d " % errno.EBADF)
            reply = client.call(b"cgroup.event_control %d 3 4096\n" % read_end, (read_end,))
            assert reply.startswith(b"%d " % errno.EINVAL)
            reply = client.call(b"cgroup.event_control %d 3 4096\n" % blocking, (blocking,))
            assert reply.startswith(b"%d " % errno.EINVAL)
            assert controller.shrinkers() == []
        finally:
            client.close()
            for fd in (read_end, write_end, blocking):
                os.close(fd)

    def test_same_eventfd_twice_and_unregister(self, door) -> None:
        """The same eventfd under a second number is refused; ``<efd> -`` unregisters."""
        _, controller, name = door
        client = RawClient(name)
        efd = nonblocking_eventfd()
        dup = os.dup(efd)
        try:
            assert client.call(b"cgroup.event_control %d 3 4096\n" % efd, (efd,)) == b"0"
            reply = client.call(b"cgroup.event_control %d 3 4096\n" % dup, (dup,))
            assert reply.startswith(b"%d " % errno.EINVAL)
            assert client.call(b"cgroup.event_control %d -\n" % efd) == b"0"
            assert controller.shrinkers() == []
            reply = client.call(b"cgroup.event_control %d -\n" % efd)
            assert reply.startswith(b"%d " % errno.EINVAL)
        finally:
            client.close()
            os.close(efd)
            os.close(dup)

    def test_report_for_unknown_eventfd_is_counted_not_answered(self, door) -> None:
        """Reports are not answered; one the door refuses is counted in its status."""
        served, _, name = door
        client = RawClient(name)
        try:
            client.send(b"mempressure.shrinker 99 5\n")
            assert client.call(b"query status").startswith(b"0 {")
            assert served.status()["counters"].get("EINVAL") == 1
        finally:
            client.close()

    def test_follower_gone_drops_everything(self, door) -> None:
        """A follower that disconnects (exits, is SIGKILLed) leaves nothing registered."""
        served, controller, name = door
        code = (
            "import os, socket, array, sys, time\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            f"s.connect({name!r}); s.recv(64)\n"
            "e = os.eventfd(0, os.EFD_NONBLOCK)\n"
            "s.sendmsg([b'cgroup.event_control %d 3 4096\\n' % e],"
            " [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [e]))])\n"
            "assert s.recv(64) == b'0'\n"
            "s.sendmsg([b'mempressure.shrinker %d 9\\n' % e])\n"
            "print('registered', flush=True); time.sleep(60)\n"
        )
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == "registered\n"
            wait_for(lambda: [i.count for i in controller.shrinkers()] == [9], what="the report")
            assert served.followers() == [child.pid]
            child.kill()  # SIGKILL, our own child
            child.wait()
            wait_for(lambda: controller.shrinkers() == [], what="the registration to go")
            assert served.followers() == []
        finally:
            reap(child)

    def test_other_uid_refused_both_ways(self, door) -> None:
        """A process of another uid is refused at the door; and a follower refuses to join a
        controller running as another uid (Link.connect raises)."""
        _, controller, name = door
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.settimeout(5)
                sock.connect(name)
                greeting = sock.recv(256)
                code = 0 if greeting.startswith(b"%d " % errno.EACCES) else 2
                try:
                    Link.connect(name, lambda link: None)
                    code = 3
                except TransportPermissionError:
                    pass
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert controller.shrinkers() == []


class TestMeetingPoint:
    """The name comes from the memory cgroup's directory, and the scope."""

    def test_name_has_cgroup_identity_and_scope(self) -> None:
        """Two scopes, two names; the same scope, the same name; abstract (a NUL first)."""
        a, b = meeting_point("x"), meeting_point("y")
        assert a != b and a == meeting_point("x")
        assert a.startswith(b"\0pyshrinker/1/") and len(a) <= 107


# ---------------------------------------------------------------------- processes, at random


@settings(max_examples=12, stateful_step_count=12, deadline=None)
class ProcessesMachine(RuleBasedStateMachine):
    """Processes of one scope join, allocate, free, fork, leave and die; after every step the
    books of each are exact, exactly one of them leads and the others follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.scope = f"machine-{uuid.uuid4().hex[:12]}"
        self.live: list[Worker] = []

    def teardown(self) -> None:
        for worker in self.live:
            worker.kill()

    @precondition(lambda self: len(self.live) < 4)
    @rule(n=st.integers(0, 50))
    def join(self, n: int) -> None:
        worker = Worker(self.scope)
        self.live.append(worker)
        if n:
            worker.ask(f"alloc {n}")

    @precondition(lambda self: self.live)
    @rule(which=st.integers(0, 3), n=st.integers(1, 50))
    def allocate(self, which: int, n: int) -> None:
        self.live[which % len(self.live)].ask(f"alloc {n}")

    @precondition(lambda self: self.live)
    @rule(which=st.integers(0, 3), n=st.integers(1, 50))
    def free(self, which: int, n: int) -> None:
        self.live[which % len(self.live)].ask(f"free {n}")

    @precondition(lambda self: self.live)
    @rule(which=st.integers(0, 3))
    def fork(self, which: int) -> None:
        assert self.live[which % len(self.live)].ask("fork")["child_ok"]

    @precondition(lambda self: self.live)
    @rule(which=st.integers(0, 3))
    def leave(self, which: int) -> None:
        self.live.pop(which % len(self.live)).exit()

    @precondition(lambda self: self.live)
    @rule(which=st.integers(0, 3))
    def die(self, which: int) -> None:
        self.live.pop(which % len(self.live)).kill()

    @invariant()
    def one_leader_and_exact_books(self) -> None:
        if not self.live:
            return
        deadline = time.monotonic() + 10
        while True:
            books = [w.ask("books") for w in self.live]
            leaders = {b["leader"] for b in books}
            settled = len(leaders) == 1 and leaders <= {w.pid for w in self.live}
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert settled, books
        assert [b["role"] for b in books].count("leader") == 1, books
        assert all(b["chunks"] == b["count"] for b in books), books


TestProcesses = ProcessesMachine.TestCase
TestProcesses.__doc__ = "Hypothesis drives processes joining, leaving, dying and forking."


class TestStatusCommand:
    """``pyshrinker status`` says which process runs the cgroup's controller."""

    def test_status_names_the_leader(self, workers) -> None:
        """With a leader and a follower running: the leader's pid, one follower (the command
        itself, which asks, is not counted), two shrinkers."""
        leader = workers()
        leader.ask("alloc 1")
        follower = workers()
        follower.ask("alloc 1")
        env = dict(os.environ, **{SCOPE_ENV: leader.scope})
        done = subprocess.run(
            [sys.executable, "-m", "pyshrinker", "status", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        controller = json.loads(done.stdout)["controller"]
        assert controller == {"state": "running", "pid": leader.pid, "followers": 1, "shrinkers": 2}
