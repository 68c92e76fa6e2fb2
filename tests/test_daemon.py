"""pyshrinkerd on real FUSE: every rule of the file ABI, access control, exits, the C client."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import threading

import pytest

from pyshrinker import AbiError, ChunkCache, Level, Shrinker, settle, subscribe_levels
from pyshrinker._syscalls import eventfd_read
from pyshrinker.daemon import (
    AccessPolicy,
    LevelCommand,
    RequestCommand,
    ShrinkCommand,
    add_arguments,
    mounted,
    parse_proc_status,
    parse_status,
    parse_test_control,
)
from pyshrinker.errors import (
    ClosedError,
    ControllerGone,
    ControllerNotFound,
    PyshrinkerError,
    TransportPermissionError,
    UnsupportedError,
)
from pyshrinker.registry import eventfd_id, parse_eventfd_id
from pyshrinker.transport import CONTROLLER_DIR_ENV, FilesTransport

from .daemon_helpers import (
    NOBODY,
    Raw,
    compile_c_client,
    eventfds_of,
    fork_and,
    json_lines,
    shrinker_count,
    wait_for,
)
from .helpers import reap

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def c_client(tmp_path_factory):
    """examples/c/mempressure_client.c, compiled."""
    return compile_c_client(str(tmp_path_factory.mktemp("c")))


# ---------------------------------------------------------------------- pure parts


class TestParsers:
    """The daemon's pure parsers: /proc status, the test control lines, the status file."""

    def test_proc_status(self):
        """Tgid and Groups come out of /proc/<tid>/status text."""
        text = "Name:\tx\nUmask:\t0022\nState:\tS\nTgid:\t41\nNgid:\t0\nPid:\t43\nGroups:\t4 27 \n"
        parsed = parse_proc_status(text)
        assert parsed.tgid == 41
        assert parsed.groups == frozenset({4, 27})

    @pytest.mark.parametrize(
        "text", ["Pid:\t3\n", "Tgid:\tx\n", "Tgid:\t0\n", "Tgid:\t1\nGroups: a\n"]
    )
    def test_proc_status_malformed(self, text):
        """A status without a sane Tgid line is refused."""
        with pytest.raises(ValueError):
            parse_proc_status(text)

    def test_eventfd_id(self):
        """The eventfd-id line of fdinfo: the same for a dup, different for another eventfd."""
        text = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1039\neventfd-count: 5\neventfd-id: 12\n"
        assert parse_eventfd_id(text) == 12
        assert parse_eventfd_id("pos:\t0\n") is None
        with pytest.raises(ValueError):
            parse_eventfd_id("eventfd-id: x\n")
        a, b = os.eventfd(0), os.eventfd(0)
        c = os.dup(a)
        try:
            assert eventfd_id(a) == eventfd_id(c) != eventfd_id(b)
            assert eventfd_id(a) is not None
        finally:
            for fd in (a, b, c):
                os.close(fd)

    def test_own_proc_status(self):
        """This thread's status gives this process's pid."""
        with open(f"/proc/{threading.get_native_id()}/status") as f:
            assert parse_proc_status(f.read()).tgid == os.getpid()

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"12 5 3\n", RequestCommand(12, 5, 3)),
            (b"shrink 4096\n", ShrinkCommand(4096)),
            (b"level medium\n", LevelCommand(Level.MEDIUM)),
            (b"level critical", LevelCommand(Level.OOM)),
        ],
    )
    def test_test_control(self, line, expected):
        """The three test-control commands parse."""
        assert parse_test_control(line) == expected

    @pytest.mark.parametrize(
        "line", [b"", b"1 2\n", b"1 2 -3\n", b"shrink\n", b"level hot\n", b"1 2 3\n4\n", b"x" * 300]
    )
    def test_test_control_malformed(self, line):
        """Malformed test-control lines are AbiErrors."""
        with pytest.raises(AbiError):
            parse_test_control(line)

    def test_status_round_trip(self):
        """Status lines of each kind parse into their values."""
        text = "\n".join(
            json.dumps(x)
            for x in [
                {"kind": "daemon", "pid": 1},
                {"kind": "shrinker", "pid": 2, "efd": 3, "chunk_size": 4096, "cost": 2.0,
                 "count": 5, "requests": 1, "chunks_requested": 7},
                {"kind": "level", "pid": 2, "efd": 4, "level": "oom"},
                {"kind": "request", "t": 1.5, "pid": 2, "efd": 3, "chunks": 7, "reason": "x y"},
                {"kind": "episode", "t": 1.5, "need": 9, "reason": "r",
                 "holdings": [[2, 3, 12, 4096, 2.0]], "asked": [[2, 3, 7]]},
            ]
        )  # fmt: skip
        status = parse_status(text)
        assert status.daemon == {"pid": 1}
        assert status.shrinkers_of(2)[0].chunks_requested == 7
        assert status.levels[0].level is Level.OOM
        assert status.requests[0].reason == "x y"
        assert status.episodes[0].holdings[0].count == 12
        assert status.episodes[0].asked == ((2, 3, 7),)

    def test_access_policy(self):
        """Root and the owner always pass; others by uid, primary or supplementary group."""
        policy = AccessPolicy(frozenset({1000}), frozenset({50}), owner=123)
        assert policy.allows(0, 0)
        assert policy.allows(123, 9)
        assert policy.allows(1000, 9)
        assert policy.allows(7, 50)
        assert policy.allows(7, 9, [3, 50])
        assert not policy.allows(7, 9, [3])
        assert not AccessPolicy(owner=123).allows(7, 50, [50])

    def test_arguments(self):
        """add_arguments gives the CLI its options, names resolved to ids."""
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--mount", "/m", "--allow-uid", "nobody", "--allow-gid", "0"])
        assert args.allow_uid == [NOBODY]
        assert args.allow_gid == [0]
        assert not args.allow_other and not args.test_control
        with pytest.raises(SystemExit):
            parser.parse_args(["--mount", "/m", "--max-total", "0"])


# ---------------------------------------------------------------------- the files


class TestFiles:
    """The mount: which files, which modes, what may be opened how."""

    def test_listing_and_modes(self, daemon):
        """The three ABI files, the status file and the test control file are there."""
        names = set(os.listdir(daemon.mount))
        assert names == {
            "cgroup.event_control",
            "mempressure.shrinker",
            "mempressure.level",
            "mempressure.status",
            "mempressure.request",
        }
        assert os.stat(os.path.join(daemon.mount, "mempressure.status")).st_mode & 0o777 == 0o444
        assert os.stat(os.path.join(daemon.mount, "cgroup.event_control")).st_mode & 0o777 == 0o222

    def test_no_request_file_without_test_control(self, daemons):
        """Without --test-control there is no way to request by hand."""
        plain = daemons.start(test_control=False)
        assert "mempressure.request" not in os.listdir(plain.mount)
        with pytest.raises(FileNotFoundError):
            os.open(os.path.join(plain.mount, "mempressure.request"), os.O_WRONLY)

    @pytest.mark.parametrize(
        ("name", "flags"),
        [
            ("mempressure.status", os.O_WRONLY),
            ("mempressure.level", os.O_RDWR),
            ("cgroup.event_control", os.O_RDONLY),
            ("mempressure.shrinker", os.O_RDONLY),
        ],
    )
    def test_wrong_open_mode(self, daemon, name, flags):
        """Read-only files cannot be opened for writing, nor write-only ones for reading."""
        with pytest.raises(PermissionError):
            os.open(os.path.join(daemon.mount, name), flags)

    def test_shell_redirect_truncates(self, daemon, raw):
        """A shell's '>' (O_TRUNC) works: the truncation is accepted."""
        efd = raw.eventfd()
        with open(os.path.join(daemon.mount, "cgroup.event_control"), "w") as f:
            f.write(f"{efd} {raw.shrinker} 4096\n")
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 0

    def test_status_opens_bounded(self, daemon):
        """At most 64 status files open at once: the 65th is EMFILE."""
        path = os.path.join(daemon.mount, "mempressure.status")
        held = [os.open(path, os.O_RDONLY) for _ in range(64)]
        try:
            with pytest.raises(OSError) as info:
                os.open(path, os.O_RDONLY)
            assert info.value.errno == errno.EMFILE
        finally:
            for fd in held:
                os.close(fd)
        assert daemon.status().daemon["pid"] == daemon.pid

    def test_sigterm_unmounts(self, daemons):
        """SIGTERM: the daemon unmounts and exits 0."""
        doomed = daemons.start()
        assert mounted(doomed.mount)
        assert doomed.stop() == 0
        assert not mounted(doomed.mount)

    def test_bad_cgroup(self, daemons, tmp_path):
        """--cgroup naming no memory cgroup: the daemon exits 1 before mounting."""
        with pytest.raises(UnsupportedError):
            daemons.start("--cgroup", str(tmp_path))

    def test_status_lists_daemon(self, daemon):
        """The status file starts with the daemon's own line."""
        status = daemon.status()
        assert status.daemon["pid"] == daemon.pid
        assert status.daemon["registrations"] == 0
        assert status.shrinkers == ()


# ---------------------------------------------------------------------- the ABI


class TestRegistration:
    """'<efd> <shrinker fd> <chunk size> [cost]' written to cgroup.event_control."""

    def test_register(self, daemon, raw):
        """A registration appears in the status with this pid, the efd, size and cost 1."""
        efd = raw.register(65536)
        (line,) = daemon.status().shrinkers
        assert (line.pid, line.efd, line.chunk_size, line.cost, line.count) == (
            os.getpid(),
            efd,
            65536,
            1.0,
            0,
        )

    def test_register_with_cost(self, daemon, raw):
        """The optional fourth field is the cost."""
        efd = raw.register(4096, cost="2.5")
        assert daemon.status().shrinkers_of(os.getpid())[0].cost == 2.5
        assert daemon.status().shrinkers_of(os.getpid())[0].efd == efd

    def test_several_shrinkers(self, daemon, raw):
        """One process may register several shrinkers, each with its own eventfd and size."""
        efds = [raw.register(size) for size in (4096, 1 << 20, 3 << 20)]
        lines = daemon.status().shrinkers_of(os.getpid())
        assert sorted((s.efd, s.chunk_size) for s in lines) == sorted(
            zip(efds, [4096, 1 << 20, 3 << 20], strict=True)
        )

    def test_same_eventfd_twice(self, raw):
        """Registering an eventfd that is already registered is EINVAL."""
        efd = raw.register()
        with pytest.raises(OSError) as info:
            raw.write_control(f"{efd} {raw.shrinker} 8192\n")
        assert info.value.errno == errno.EINVAL

    def test_from_a_thread(self, daemon, raw):
        """A write from a non-main thread is attributed to the process, not the thread id."""
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(raw.register()))
        thread.start()
        thread.join()
        assert shrinker_count(daemon.status(), os.getpid(), result[0]) == 0

    def test_report_from_another_thread(self, daemon, raw):
        """Registered by the main thread, reported by another: the same process's count."""
        efd = raw.register()
        raw.write_report(f"{efd} 2\n")
        thread = threading.Thread(target=raw.write_report, args=(f"{efd} 3\n",))
        thread.start()
        thread.join()
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 5

    def test_files_transport(self, daemon):
        """FilesTransport writes the same lines; the cost field only when it is not 1."""
        with FilesTransport.open(daemon.mount) as transport:
            a, b = os.eventfd(0), os.eventfd(0)
            try:
                transport.register(a, 4096, 1.0)
                transport.register(b, 8192, 3.0)
                costs = {s.efd: s.cost for s in daemon.status().shrinkers}
                assert costs == {a: 1.0, b: 3.0}
            finally:
                os.close(a)
                os.close(b)


class TestMalformed:
    """Lines the proposed kernel would refuse are refused with EINVAL."""

    @pytest.mark.parametrize(
        "line",
        [
            "\n",
            "1\n",
            "1 2\n",
            "{efd} {shrinker}\n",
            "{efd} {shrinker} 0\n",
            "{efd} {shrinker} -4096\n",
            "{efd} {shrinker} 4k\n",
            "{efd} {shrinker} 4096 0\n",
            "{efd} {shrinker} 4096 -1\n",
            "{efd} {shrinker} 4096 nan\n",
            "{efd} {shrinker} 4096 1 2\n",
            "{efd} {shrinker} 4096\n{efd} {shrinker} 4096\n",
            "x{efd} {shrinker} 4096\n",
            "-{efd} {shrinker} 4096\n",
            "{efd} {shrinker} 1099511627777\n",
            "{efd} {level} hot\n",
            "{efd} {level} low 1\n",
            "{efd} {shrinker} 4096 " + "1" * 300 + "\n",
            "{efd} \u00e9 4096\n",
        ],
    )
    def test_event_control(self, daemon, raw, line):
        """Malformed registrations: EINVAL, and nothing registered."""
        efd = raw.eventfd()
        text = line.format(efd=efd, shrinker=raw.shrinker, level=raw.level)
        with pytest.raises(OSError) as info:
            raw.write_control(text.encode("utf-8"))
        assert info.value.errno == errno.EINVAL
        assert daemon.status().shrinkers == ()

    @pytest.mark.parametrize(
        "line", ["\n", "{efd}\n", "{efd} 1 2\n", "{efd} x\n", "{efd} 1.5\n", "{efd} 1\n{efd} 1\n"]
    )
    def test_report(self, daemon, raw, line):
        """Malformed reports: EINVAL, and the count unchanged."""
        efd = raw.register()
        raw.write_report(f"{efd} 5\n")
        with pytest.raises(OSError) as info:
            raw.write_report(line.format(efd=efd))
        assert info.value.errno == errno.EINVAL
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 5

    def test_absurd_report(self, raw):
        """A count beyond 2**48 is refused as absurd."""
        efd = raw.register()
        with pytest.raises(OSError) as info:
            raw.write_report(f"{efd} {2**49}\n")
        assert info.value.errno == errno.EINVAL

    def test_report_unknown_eventfd(self, raw):
        """A report for an eventfd that is not registered is EINVAL."""
        efd = raw.eventfd()
        with pytest.raises(OSError) as info:
            raw.write_report(f"{efd} 1\n")
        assert info.value.errno == errno.EINVAL

    def test_report_to_level_listener(self, raw):
        """A level listener has no count: reporting to it is EINVAL."""
        efd = raw.eventfd()
        raw.write_control(f"{efd} {raw.level} low\n")
        with pytest.raises(OSError) as info:
            raw.write_report(f"{efd} 1\n")
        assert info.value.errno == errno.EINVAL

    def test_long_write(self, raw):
        """A write longer than a line may be (256 bytes) is EINVAL before parsing."""
        with pytest.raises(OSError) as info:
            raw.write_control(b" " * 4096)
        assert info.value.errno == errno.EINVAL

    def test_files_transport_maps_to_abi_error(self, daemon):
        """Through FilesTransport, EINVAL is an AbiError (a ValueError)."""
        with FilesTransport.open(daemon.mount) as transport:
            with pytest.raises(AbiError):
                transport.report(12345, 1)
            with pytest.raises(ValueError):
                transport.unregister(12345)


class TestFds:
    """The fds a line names: the eventfd must be one, the second fd must be the right file."""

    def test_not_an_eventfd(self, daemon, raw):
        """A pipe named as the eventfd: EINVAL, and the daemon keeps no copy of it."""
        before = eventfds_of(daemon.pid)
        r, w = os.pipe()
        try:
            ours = _link(os.getpid(), str(r))
            with pytest.raises(OSError) as info:
                raw.write_control(f"{r} {raw.shrinker} 4096\n")
            assert info.value.errno == errno.EINVAL
            fds = os.listdir(f"/proc/{daemon.pid}/fd")
            assert ours.startswith("pipe:")
            assert all(_link(daemon.pid, fd) != ours for fd in fds)
        finally:
            os.close(r)
            os.close(w)
        assert eventfds_of(daemon.pid) == before

    def test_eventfd_is_a_controller_file(self, daemon, raw):
        """The control file itself named as the eventfd: EINVAL, and the daemon still serves."""
        for fd in (raw.control, raw.shrinker):
            with pytest.raises(OSError) as info:
                raw.write_control(f"{fd} {raw.shrinker} 4096\n")
            assert info.value.errno == errno.EINVAL
        efd = raw.register()
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 0

    def test_eventfd_not_open(self, raw):
        """An eventfd number that is not open in the writer: EBADF."""
        with pytest.raises(OSError) as info:
            raw.write_control(f"999 {raw.shrinker} 4096\n")
        assert info.value.errno == errno.EBADF

    def test_shrinker_fd_not_open(self, raw):
        """A shrinker fd that is not open: EBADF."""
        efd = raw.eventfd()
        with pytest.raises(OSError) as info:
            raw.write_control(f"{efd} 999 4096\n")
        assert info.value.errno == errno.EBADF

    def test_shrinker_fd_wrong_file(self, raw):
        """A shrinker fd that is some other file (the level file, /dev/null): EINVAL."""
        efd = raw.eventfd()
        with open("/dev/null", "rb") as other:
            for fd in (raw.level, other.fileno(), raw.control):
                with pytest.raises(OSError) as info:
                    raw.write_control(f"{efd} {fd} 4096\n")
                assert info.value.errno == errno.EINVAL

    def test_level_fd_wrong_file(self, raw):
        """A level registration must name the level file."""
        efd = raw.eventfd()
        with pytest.raises(OSError) as info:
            raw.write_control(f"{efd} {raw.shrinker} low\n")
        assert info.value.errno == errno.EINVAL

    def test_daemon_holds_one_duplicate_per_registration(self, daemon, raw):
        """Registering duplicates the eventfd into the daemon; unregistering closes it."""
        before = eventfds_of(daemon.pid)
        efds = [raw.register() for _ in range(3)]
        assert eventfds_of(daemon.pid) == before + 3
        for efd in efds:
            raw.write_control(f"{efd} -\n")
        assert eventfds_of(daemon.pid) == before


def _link(pid: int, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


class TestReports:
    """'<efd> <N>' to mempressure.shrinker: +N adds, -N removes, the count never below 0."""

    def test_plus_and_minus(self, daemon, raw):
        """Reports add and remove chunks."""
        efd = raw.register()
        for line in ("10", "+5", "-3", "0"):
            raw.write_report(f"{efd} {line}\n")
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 12

    def test_floor_at_zero(self, daemon, raw):
        """Removing more than the count leaves 0, not a negative count."""
        efd = raw.register()
        raw.write_report(f"{efd} 4\n")
        raw.write_report(f"{efd} -100\n")
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 0
        raw.write_report(f"{efd} 2\n")
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 2

    def test_counts_are_per_eventfd(self, daemon, raw):
        """Two shrinkers of one process keep separate counts."""
        a, b = raw.register(), raw.register(8192)
        raw.write_report(f"{a} 7\n")
        raw.write_report(f"{b} 70\n")
        status = daemon.status()
        assert shrinker_count(status, os.getpid(), a) == 7
        assert shrinker_count(status, os.getpid(), b) == 70

    def test_counts_are_per_process(self, daemon, raw):
        """A child's shrinker with the same eventfd number is another registration."""
        efd = raw.register()
        raw.write_report(f"{efd} 3\n")
        child = fork_and(lambda: raw.write_report(f"{efd} 1\n"))
        # The child inherited the fds but did not register: its report is EINVAL.
        assert child == errno.EINVAL
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 3


class TestRequests:
    """The controller's requests: a number on the eventfd, already subtracted from the count."""

    def test_request_subtracts_and_signals(self, daemon, raw):
        """A request for 4 of 10 chunks: the eventfd reads 4, the count is 6."""
        efd = raw.register()
        raw.write_report(f"{efd} 10\n")
        raw.request(f"{os.getpid()} {efd} 4\n")
        assert eventfd_read(efd) == 4
        status = daemon.status()
        assert shrinker_count(status, os.getpid(), efd) == 6
        (request,) = status.requests
        assert (request.pid, request.efd, request.chunks) == (os.getpid(), efd, 4)

    def test_request_capped_at_count(self, daemon, raw):
        """Nobody is asked for more than its count."""
        efd = raw.register()
        raw.write_report(f"{efd} 3\n")
        raw.request(f"{os.getpid()} {efd} 50\n")
        assert eventfd_read(efd) == 3
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 0

    def test_re_add(self, daemon, raw):
        """Chunks that could not be freed are given back with '<efd> <unfreed>'."""
        efd = raw.register()
        raw.write_report(f"{efd} 10\n")
        raw.request(f"{os.getpid()} {efd} 6\n")
        asked = eventfd_read(efd)
        raw.write_report(f"{efd} {asked - 2}\n")  # freed 2, re-add the other 4
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 8

    def test_shrink_is_proportional(self, daemon, raw):
        """A shrink asks each shrinker in proportion to held bytes / cost."""
        a = raw.register(4096)
        b = raw.register(4096, cost="3")
        raw.write_report(f"{a} 300\n")
        raw.write_report(f"{b} 300\n")
        raw.request(f"shrink {4096 * 40}\n")
        assert (eventfd_read(a), eventfd_read(b)) == (30, 10)
        (episode,) = daemon.status().episodes
        assert {(h.efd, h.count) for h in episode.holdings} == {(a, 300), (b, 300)}

    def test_unknown_shrinker(self, raw):
        """A test request for a shrinker that does not exist is EINVAL."""
        with pytest.raises(OSError) as info:
            raw.request("1 2 3\n")
        assert info.value.errno == errno.EINVAL

    def test_shrinker_frees_and_re_adds(self, daemon):
        """A Shrinker through the daemon: reclaim(n) runs, the unfreed part is re-added."""
        asked: list[int] = []

        def reclaim(n: int) -> int:
            asked.append(n)
            return n // 2

        with FilesTransport.open(daemon.mount) as transport:
            shrinker = Shrinker.register(4096, reclaim, transport=transport, batch_bytes=0)
            try:
                shrinker.report(20)
                with open(os.path.join(daemon.mount, "mempressure.request"), "w") as f:
                    f.write(f"{os.getpid()} {shrinker.efd} 10\n")
                assert wait_for(lambda: len(asked) == 1)
                assert settle()
                assert asked == [10]
                assert shrinker.stats().chunks_readded == 5
                assert shrinker_count(daemon.status(), os.getpid(), shrinker.efd) == 15
            finally:
                shrinker.close()


class TestLevels:
    """'<efd> <level fd> <level>': a listener hears its level and those above."""

    def test_register_level(self, daemon, raw):
        """A level registration appears in the status."""
        efd = raw.eventfd()
        raw.write_control(f"{efd} {raw.level} medium\n")
        (line,) = daemon.status().levels
        assert (line.pid, line.efd, line.level) == (os.getpid(), efd, Level.MEDIUM)

    def test_levels_at_and_above(self, raw):
        """'level medium' signals low and medium listeners, not oom ones."""
        fds = {}
        for level in ("low", "medium", "oom"):
            fds[level] = raw.eventfd()
            raw.write_control(f"{fds[level]} {raw.level} {level}\n")
        raw.request("level medium\n")
        assert eventfd_read(fds["low"]) == 1
        assert eventfd_read(fds["medium"]) == 1
        with pytest.raises(BlockingIOError):
            eventfd_read(fds["oom"])

    def test_subscribe_levels(self, daemon):
        """subscribe_levels through the daemon calls back with the level that happened."""
        heard: list[Level] = []
        with FilesTransport.open(daemon.mount) as transport:
            with subscribe_levels(heard.append, "low", transport=transport):
                with open(os.path.join(daemon.mount, "mempressure.request"), "w") as f:
                    f.write("level oom\n")
                assert wait_for(lambda: bool(heard))
            assert daemon.status().levels == ()
        # The three eventfds are signalled one after another (highest first): the listener may
        # wake between two writes and hear a lower level after the first callback, never first.
        assert heard[0] is Level.OOM


class TestUnregister:
    """'<efd> -' (pyshrinker's extension) and process exit end registrations."""

    def test_unregister_line(self, daemon, raw):
        """'<efd> -' removes the registration; again is EINVAL."""
        efd = raw.register()
        raw.write_control(f"{efd} -\n")
        assert daemon.status().shrinkers == ()
        with pytest.raises(OSError) as info:
            raw.write_control(f"{efd} -\n")
        assert info.value.errno == errno.EINVAL

    def test_reregister_after_unregister(self, daemon, raw):
        """After unregistering, the same eventfd number may be registered anew, count 0."""
        efd = raw.register()
        raw.write_report(f"{efd} 5\n")
        raw.write_control(f"{efd} -\n")
        raw.write_control(f"{efd} {raw.shrinker} 4096\n")
        assert shrinker_count(daemon.status(), os.getpid(), efd) == 0

    def test_shrinker_close_unregisters(self, daemon):
        """Shrinker.close() unregisters through the transport."""
        with FilesTransport.open(daemon.mount) as transport:
            shrinker = Shrinker.register(4096, lambda n: n, transport=transport)
            assert len(daemon.status().shrinkers) == 1
            shrinker.close()
            assert daemon.status().shrinkers == ()

    def test_exit_drops_registrations(self, daemon):
        """A process that exits without unregistering loses its registrations and duplicates."""
        before = eventfds_of(daemon.pid)
        code = (
            "import os, sys\n"
            "from pyshrinker.transport import FilesTransport\n"
            "t = FilesTransport.open(sys.argv[1])\n"
            "for level in range(3):\n"
            "    e = os.eventfd(0)\n"
            "    t.register(e, 4096, 1.0)\n"
            "    t.report(e, 10)\n"
            "l = os.eventfd(0)\n"
            "t.register_level(l, __import__('pyshrinker').Level.LOW)\n"
            "print(os.getpid(), flush=True)\n"
            "sys.stdin.read()\n"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code, daemon.mount],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            pid = int(child.stdout.readline())
            status = daemon.status()
            assert len(status.shrinkers_of(pid)) == 3
            assert eventfds_of(daemon.pid) == before + 4
            child.stdin.close()
            assert child.wait(10) == 0
        finally:
            reap(child)
        assert wait_for(lambda: daemon.status().shrinkers == ())
        status = daemon.status()
        assert status.levels == ()
        assert status.daemon["counters"]["processes_exited"] == 1
        assert eventfds_of(daemon.pid) == before

    def test_killed_process_dropped(self, daemon):
        """SIGKILL: the registrations go too."""
        code = (
            "import os, sys, time\n"
            "from pyshrinker.transport import FilesTransport\n"
            "t = FilesTransport.open(sys.argv[1])\n"
            "e = os.eventfd(0)\n"
            "t.register(e, 4096, 1.0)\n"
            "print(os.getpid(), flush=True)\n"
            "time.sleep(60)\n"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code, daemon.mount], stdout=subprocess.PIPE, text=True
        )
        try:
            pid = int(child.stdout.readline())
            assert len(daemon.status().shrinkers_of(pid)) == 1
        finally:
            reap(child)
        assert wait_for(lambda: daemon.status().shrinkers == ())


class TestLimits:
    """Nothing a client writes grows the daemon without bound."""

    def test_per_process_cap(self, daemons):
        """Past --max-per-process, registrations are ENOSPC."""
        capped = daemons.start("--max-per-process", "3")
        files = Raw(capped.mount)
        try:
            for _ in range(3):
                files.register()
            with pytest.raises(OSError) as info:
                files.register()
            assert info.value.errno == errno.ENOSPC
            with pytest.raises(OSError) as info:
                files.write_control(f"{files.eventfd()} {files.level} low\n")
            assert info.value.errno == errno.ENOSPC
        finally:
            files.close()

    def test_total_cap(self, daemons):
        """Past --max-total (all processes together), registrations are ENOSPC."""
        capped = daemons.start("--max-total", "2")
        files = Raw(capped.mount)
        try:
            files.register()
            files.register()
            child = fork_and(lambda: files.register())
            assert child == errno.ENOSPC
        finally:
            files.close()

    def test_status_history_bounded(self, daemons):
        """--status-history limits the requests the status file lists."""
        small = daemons.start("--status-history", "5")
        files = Raw(small.mount)
        try:
            efd = files.register()
            files.write_report(f"{efd} 100\n")
            for _ in range(12):
                files.request(f"{os.getpid()} {efd} 1\n")
            status = small.status()
            assert len(status.requests) == 5
            assert status.daemon["requests_sent"] == 12
        finally:
            files.close()


class TestAccess:
    """Who may register: the mount's owner and root; others only when allowed."""

    def _register_as_nobody(self, mount: str) -> int:
        def action() -> None:
            files = Raw(mount)
            files.register()
            files.write_report(f"{files.eventfds[0]} 1\n")

        return fork_and(action, uid=NOBODY)

    def test_other_user_without_allow_other(self, daemons):
        """Without --allow-other the kernel lets nobody else in: EACCES."""
        private = daemons.start(world=True)
        assert self._register_as_nobody(private.mount) == errno.EACCES

    def test_other_user_not_allowed(self, daemons):
        """With --allow-other but nobody not in --allow-uid: EACCES from the daemon."""
        shared = daemons.start("--allow-other", "--allow-uid", "1", world=True)
        assert self._register_as_nobody(shared.mount) == errno.EACCES
        assert shared.status().daemon["registrations"] == 0

    def test_other_user_allowed_by_uid(self, daemons):
        """--allow-uid nobody: nobody registers and reports."""
        shared = daemons.start("--allow-other", "--allow-uid", str(NOBODY), world=True)
        assert self._register_as_nobody(shared.mount) == 0
        assert shared.status().daemon["counters"]["reports"] == 1

    def test_other_user_allowed_by_gid(self, daemons):
        """--allow-gid of nobody's group lets nobody in."""
        shared = daemons.start("--allow-other", "--allow-gid", str(NOBODY), world=True)
        assert self._register_as_nobody(shared.mount) == 0

    def test_write_checked_too(self, daemons):
        """An fd opened by an allowed user and used after dropping to nobody: EACCES."""
        shared = daemons.start("--allow-other", world=True)
        files = Raw(shared.mount)
        try:
            efd = files.eventfd()
            line = f"{efd} {files.shrinker} 4096\n"
            assert fork_and(lambda: files.write_control(line), uid=NOBODY) == errno.EACCES
        finally:
            files.close()

    def test_files_transport_permission_error(self, daemons):
        """Through FilesTransport the refusal is a TransportPermissionError."""
        private = daemons.start(world=True)

        def action() -> None:
            try:
                FilesTransport.open(private.mount)
            except TransportPermissionError:
                os._exit(0)
            os._exit(1)

        assert fork_and(action, uid=NOBODY) == 0


class TestTransport:
    """FilesTransport and PYSHRINKER_CONTROLLER_DIR."""

    def test_missing_directory(self, tmp_path):
        """A directory without the files: ControllerNotFound (a FileNotFoundError)."""
        with pytest.raises(ControllerNotFound):
            FilesTransport.open(str(tmp_path))
        with pytest.raises(FileNotFoundError):
            FilesTransport.open(str(tmp_path / "nope"))

    def test_closed(self, daemon):
        """A closed transport refuses lines; close is idempotent."""
        transport = FilesTransport.open(daemon.mount)
        transport.close()
        transport.close()
        with pytest.raises(ClosedError):
            transport.report(1, 1)

    def test_daemon_gone(self, daemons):
        """Once the daemon is killed, writes fail with ControllerGone (ENOTCONN)."""
        doomed = daemons.start()
        transport = FilesTransport.open(doomed.mount)
        efd = os.eventfd(0)
        try:
            transport.register(efd, 4096, 1.0)
            doomed.popen.kill()
            doomed.popen.wait()
            with pytest.raises(ControllerGone) as info:
                transport.report(efd, 1)
            assert isinstance(info.value, PyshrinkerError)
            assert info.value.errno == errno.ENOTCONN
        finally:
            transport.close()
            os.close(efd)

    def test_environment_variable(self, daemon):
        """PYSHRINKER_CONTROLLER_DIR sends a process's ChunkCache through the daemon."""
        code = (
            "import os, sys\n"
            "from pyshrinker import ChunkCache\n"
            "cache = ChunkCache(65536, cost=2.0)\n"
            "for i in range(40):\n"
            "    cache.put(i, b'x', chunks=1)\n"
            "cache.shrinker.flush()\n"
            "print(os.getpid(), type(cache.shrinker.transport).__name__, flush=True)\n"
            "sys.stdin.read()\n"
        )
        env = dict(os.environ, **{CONTROLLER_DIR_ENV: daemon.mount})
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            pid_text, transport_name = child.stdout.readline().split()
            assert transport_name == "DirectoryTransport"
            (line,) = daemon.status().shrinkers_of(int(pid_text))
            assert (line.chunk_size, line.cost, line.count) == (65536, 2.0, 40)
            child.stdin.close()
            assert child.wait(10) == 0
        finally:
            reap(child)

    def test_chunk_cache_evicts_on_request(self, daemon):
        """A ChunkCache over FilesTransport gives back LRU entries when the daemon asks."""
        with FilesTransport.open(daemon.mount) as transport:
            cache: ChunkCache[int, bytes] = ChunkCache(4096, transport=transport)
            try:
                for i in range(300):
                    cache.put(i, b"v", chunks=1)
                cache.shrinker.flush()
                with open(os.path.join(daemon.mount, "mempressure.request"), "w") as f:
                    f.write(f"{os.getpid()} {cache.shrinker.efd} 100\n")
                assert wait_for(lambda: cache.chunks == 200)
                assert settle()
                assert 0 not in cache and 299 in cache
                count = shrinker_count(daemon.status(), os.getpid(), cache.shrinker.efd)
                assert count == 200
            finally:
                cache.close()


class TestCClient:
    """examples/c/mempressure_client.c, compiled here, runs unmodified against the daemon."""

    def test_registers_reports_frees_and_re_adds(self, c_client, daemon):
        """Registration, reports, a request it frees in part (pinned chunks), the re-add."""
        proc = subprocess.Popen(
            [c_client, "-p", "6", "-b", "4", "-l", "low", daemon.mount, "10", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            first = json.loads(proc.stdout.readline())
            pid, efd = first["pid"], first["efd"]
            assert first["event"] == "registered"
            assert wait_for(lambda: shrinker_count(daemon.status(), pid, efd) == 10)
            (level,) = daemon.status().levels
            assert (level.pid, level.level) == (pid, Level.LOW)
            # 10 held, 6 pinned: asked for 8, it can free 4 and must re-add 4.
            with open(os.path.join(daemon.mount, "mempressure.request"), "w") as f:
                f.write(f"{pid} {efd} 8\n")
                f.flush()
                f.write("level medium\n")
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        final = json_lines(out)[-1]
        assert final["requests"] == 1
        assert final["chunks_requested"] == 8
        assert final["chunks_freed"] == 4
        assert final["chunks_readded"] == 4
        assert final["level_events"] == 1
        assert final["report_errors"] == 0
        # It refilled what it freed: 14 allocated in all, and the daemon saw all of it.
        assert final["allocated_mib"] == 14
        assert final["held_mib"] == 10
        assert wait_for(lambda: daemon.status().shrinkers == ())

    def test_counts_agree(self, c_client, daemon):
        """While it runs, the daemon's count equals what the client says it reported."""
        proc = subprocess.Popen(
            [c_client, "-b", "1", daemon.mount, "16", "1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            first = json.loads(proc.stdout.readline())
            assert wait_for(
                lambda: shrinker_count(daemon.status(), first["pid"], first["efd"]) == 16
            )
            out, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        final = json_lines(out)[-1]
        assert proc.returncode == 0
        assert final["reported"] == final["held_mib"] == 16

    def test_bad_directory(self, c_client, tmp_path):
        """Against a directory with no controller it fails cleanly (exit 1)."""
        done = subprocess.run(
            [c_client, str(tmp_path), "4", "0"], capture_output=True, text=True, timeout=10
        )
        assert done.returncode == 1
        assert "cgroup.event_control" in done.stderr
