"""cgroup v2 on a real kernel: limits, memory.events, PSI windows, and what a controller picks.

These run in scripts/vm-test.sh's guest, where /sys/fs/cgroup is cgroup2 with the memory
controller enabled for the root's children; elsewhere they skip (and fail in CI, which runs
the guest). Children allocate in small groups (at most 256 MiB) and every wait has a timeout.
"""

from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from pyshrinker.cgroup import (
    CgroupV2,
    HostMemory,
    Limit,
    ManagedCgroupV2,
    memory_source_of,
    v2_group_of,
    v2_mount,
)
from pyshrinker.errors import CgroupNotFound
from pyshrinker.policy import Watermarks
from pyshrinker.signals.psi import PsiTrigger, StallKind, read_psi
from pyshrinker.signals.v2 import MemoryEventsWatcher

from .conftest import need
from .test_signals import has_cap_sys_resource, wait_for
from .v2_helpers import CONTAINER_UID, PROBE, probe, run_in_container

MiB = 1 << 20
GroupFactory = Callable[..., ManagedCgroupV2]

pytestmark = pytest.mark.v2

#: Allocates argv[1] MiB (every page touched), says "ready", then for each line on stdin
#: allocates one more MiB and says "more"; exits at end of input.
ALLOCATE_AND_WAIT = (
    "import sys\n"
    "held = [bytearray(int(sys.argv[1]) << 20)]\n"
    "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
    "for _ in sys.stdin:\n"
    "    held.append(bytearray(1 << 20)); sys.stdout.write('more\\n'); sys.stdout.flush()\n"
)

#: Allocates argv[1] MiB at once and exits.
ALLOCATE_AND_EXIT = "import sys\nb = bytearray(int(sys.argv[1]) << 20)\n"


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; each still running is killed and reaped afterwards."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def allocate(
    group: ManagedCgroupV2, mib: int, children: list[subprocess.Popen[str]]
) -> subprocess.Popen[str]:
    """A child in ``group`` holding ``mib`` MiB, ready for more on each line written to it."""
    proc = group.spawn(
        [sys.executable, "-c", ALLOCATE_AND_WAIT, str(mib)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    children.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


class TestReading:
    """CgroupV2 on groups of the test's own."""

    def test_memory_max_and_usage(self, v2_group: GroupFactory, children: list) -> None:
        """A child's 40 MiB shows in usage; working set <= usage; memory.max is the limit."""
        group = v2_group(128 * MiB)
        with CgroupV2.open(group.path) as source:
            allocate(group, 40, children)
            state = source.read()
            assert 40 * MiB <= state.working_set <= state.usage < 128 * MiB
            assert state.limit == 128 * MiB and not state.machine
            assert source.binding()[0] == Limit(128 * MiB, "memory.max", group.path)
            assert f"memory.max of {group.path}" in source.describe_limit()
            assert abs(state.usage - group.read_int("memory.current")) < 4 * MiB

    def test_memory_high_below_max(self, v2_group: GroupFactory) -> None:
        """memory.high under memory.max is the wall, and the watermarks sit under it."""
        group = v2_group(256 * MiB, high=192 * MiB)
        with CgroupV2.open(group.path) as source:
            limit, state = source.binding()
        assert limit == Limit(192 * MiB, "memory.high", group.path)
        assert state.limit == 192 * MiB
        assert Watermarks.for_limit(state.limit).high < 192 * MiB

    def test_limit_on_the_parent_only(self, v2_group: GroupFactory, children: list) -> None:
        """A group with no limit of its own under a limited parent reads the parent's."""
        parent = v2_group(96 * MiB)
        child = v2_group(None, parent=parent.path)
        assert child.read_keyed("memory.events")["oom_kill"] == 0
        with open(os.path.join(child.path, "memory.max"), encoding="ascii") as f:
            assert f.read().strip() == "max"
        with CgroupV2.open(child.path) as source:
            assert source.ancestry == (child.path, parent.path)
            allocate(child, 20, children)
            limit, state = source.binding()
        assert limit == Limit(96 * MiB, "memory.max", parent.path)
        assert state.limit == 96 * MiB and state.usage >= 20 * MiB

    def test_a_sibling_filling_the_parent(self, v2_group: GroupFactory, children: list) -> None:
        """Our own limit is lower, but a sibling fills the parent: the parent's limit binds."""
        parent = v2_group(256 * MiB)
        ours = v2_group(200 * MiB, parent=parent.path)
        sibling = v2_group(None, parent=parent.path)
        with CgroupV2.open(ours.path) as source:
            assert source.binding()[0] == Limit(200 * MiB, "memory.max", ours.path)
            allocate(sibling, 150, children)
            limit, state = source.binding()
        assert limit == Limit(256 * MiB, "memory.max", parent.path)
        assert state.working_set >= 150 * MiB  # the parent's, sibling included
        assert state.headroom is not None and state.headroom < 200 * MiB

    def test_removed_while_open(self, v2_group: GroupFactory) -> None:
        """A kept-open file of a removed group reads as CgroupNotFound (ENODEV)."""
        group = v2_group(64 * MiB)
        source = CgroupV2.open(group.path)
        try:
            source.read()
            group.remove()
            with pytest.raises(CgroupNotFound) as info:
                source.read()
            assert info.value.errno == errno.ENODEV
        finally:
            source.close()

    def test_memory_source_of_a_child(self, v2_group: GroupFactory, children: list) -> None:
        """memory_source_of(pid) finds the v2 group a child was started in."""
        group = v2_group(64 * MiB)
        proc = allocate(group, 1, children)
        with memory_source_of(proc.pid) as source:
            assert isinstance(source, CgroupV2)
            assert source.path == group.path
            assert source.read().limit == 64 * MiB

    def test_the_root_reads_as_the_machine(self) -> None:
        """At the v2 root (no memory.current) the host is the source, working set <= usage."""
        need(v2_group_of() == v2_mount(), "needs this process in the v2 root group")
        with memory_source_of() as source:
            assert isinstance(source, HostMemory)
            state = source.read()
        assert 0 < state.working_set <= state.usage <= (state.limit or 0)
        assert state.machine


class TestMemoryEvents:
    """MemoryEventsWatcher on real groups: high, max, oom, oom_kill."""

    def test_max_oom_and_oom_kill(self, v2_group: GroupFactory) -> None:
        """A child allocating 64 MiB in a 32 MiB group is OOM-killed: POLLPRI, counters moved."""
        group = v2_group(32 * MiB)
        with MemoryEventsWatcher.open(group.path) as watcher:
            assert wait_for(watcher.fileno(), select.POLLPRI, timeout=0.1) == 0
            proc = group.spawn([sys.executable, "-c", ALLOCATE_AND_EXIT, "64"])
            assert proc.wait(timeout=120) == -9
            assert wait_for(watcher.fileno(), select.POLLPRI) & select.POLLPRI
            assert watcher.consume() is True
            assert {"max", "oom", "oom_kill"} <= watcher.moved
            assert watcher.consume() is False  # read: nothing new
        assert group.oom_kills() >= 1

    def test_high(self, v2_group: GroupFactory, children: list) -> None:
        """memory.high lowered under a child's usage: its next allocation moves 'high' alone."""
        group = v2_group(256 * MiB)
        proc = allocate(group, 40, children)
        with MemoryEventsWatcher.open(group.path) as watcher:
            # Just over: the kernel's throttling penalty grows with the square of the overage.
            group.write("memory.high", str(group.read_int("memory.current") - MiB))
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "more\n"
            assert wait_for(watcher.fileno(), select.POLLPRI) & select.POLLPRI
            assert watcher.consume() is True
            assert watcher.moved == {"high"}

    def test_local_events_of_a_limiting_parent(self, v2_group: GroupFactory) -> None:
        """The parent's limit is hit: its memory.events.local moves; the victim's oom_kill too."""
        parent = v2_group(32 * MiB)
        child = v2_group(None, parent=parent.path)
        with (
            MemoryEventsWatcher.open(parent.path, local=True) as local,
            MemoryEventsWatcher.open(child.path) as own,
        ):
            assert local.file.path.endswith("memory.events.local")
            proc = child.spawn([sys.executable, "-c", ALLOCATE_AND_EXIT, "64"])
            assert proc.wait(timeout=120) == -9
            assert wait_for(local.fileno(), select.POLLPRI) & select.POLLPRI
            assert local.consume() and {"max", "oom"} <= local.moved
            assert wait_for(own.fileno(), select.POLLPRI) & select.POLLPRI
            assert own.consume() and "oom_kill" in own.moved


@pytest.mark.psi
class TestPsiWindows:
    """PSI triggers: 500 ms windows where privileged, 2 s steps otherwise."""

    def test_privileged_window_on_a_group(self, v2_group: GroupFactory) -> None:
        """Root with CAP_SYS_RESOURCE arms a 500 ms trigger on a group as asked."""
        need(has_cap_sys_resource(), "needs CAP_SYS_RESOURCE (root in the guest has it)")
        group = v2_group(64 * MiB)
        path = os.path.join(group.path, "memory.pressure")
        with PsiTrigger.arm(path, StallKind.SOME, 50_000, 500_000) as trigger:
            assert not trigger.widened
            assert (trigger.stall_us, trigger.window_us) == (50_000, 500_000)

    def test_unprivileged_window_is_widened(self) -> None:
        """A user without CAP_SYS_RESOURCE asking 500 ms gets 2 s (system file, mode 0666)."""
        code = (
            "from pyshrinker.signals.psi import PsiTrigger\n"
            "t = PsiTrigger.arm('/proc/pressure/memory', stall_us=50_000, window_us=500_000)\n"
            "print(t.widened, t.stall_us, t.window_us)\n"
        )
        setpriv = ["setpriv", f"--reuid={CONTAINER_UID}", f"--regid={CONTAINER_UID}"]
        done = subprocess.run(
            [*setpriv, "--clear-groups", "--", sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["True", "200000", "2000000"]

    def test_throttling_over_high_fires_the_trigger(
        self, v2_group: GroupFactory, children: list
    ) -> None:
        """Tasks throttled over memory.high stall on memory: the group's 500 ms trigger fires."""
        need(has_cap_sys_resource(), "needs CAP_SYS_RESOURCE (root in the guest has it)")
        group = v2_group(256 * MiB)
        proc = allocate(group, 40, children)
        path = os.path.join(group.path, "memory.pressure")
        with PsiTrigger.arm(path, StallKind.SOME, 10_000, 500_000) as trigger:
            group.write("memory.high", str(group.read_int("memory.current") - MiB))
            assert proc.stdin is not None and proc.stdout is not None
            for _ in range(2):
                proc.stdin.write("\n")
                proc.stdin.flush()
                assert proc.stdout.readline() == "more\n"
            assert wait_for(trigger.fileno(), select.POLLPRI, timeout=20) & select.POLLPRI
            assert trigger.consume() is True
            assert read_psi(path).some.total_us > 0


class TestWhatTheControllerPicks:
    """Controller.for_current_process() in processes placed in v2 groups."""

    def test_own_memory_max(self, v2_group: GroupFactory) -> None:
        """memory.max: the v2 group, memory.events, and the 500 ms PSI trigger on the group."""
        group = v2_group(256 * MiB)
        chosen = probe(group)
        assert (chosen["version"], chosen["path"]) == ("v2", group.path)
        # Before a first round of requests has shown: the fixed rule's watermarks.
        assert chosen["marks"] == list(astuple(Watermarks.for_limit(256 * MiB)))
        signals = "\n".join(chosen["signals"])
        assert f"cgroup v2 memory.events ({group.path})" in signals
        assert f"PSI trigger 'some 50000 500000' on {group.path}/memory.pressure" in signals
        assert "widened" not in signals
        assert "adaptive polling of usage" in signals

    def test_limit_on_the_parent_only(self, v2_group: GroupFactory) -> None:
        """Only the parent is limited: its limit steers, and its local events are watched."""
        parent = v2_group(256 * MiB)
        child = v2_group(None, parent=parent.path)
        chosen = probe(child)
        assert (chosen["version"], chosen["path"]) == ("v2", child.path)
        assert chosen["marks"][0] == 256 * MiB
        assert f"memory.max of {parent.path}" in chosen["limit_from"]
        assert f"cgroup v2 memory.events.local ({parent.path})" in chosen["signals"]

    def test_watermarks_under_memory_high(self, v2_group: GroupFactory) -> None:
        """memory.high 256 MiB under memory.max 512 MiB: the watermarks sit under memory.high."""
        group = v2_group(512 * MiB, high=256 * MiB)
        chosen = probe(group)
        limit, high, _low = chosen["marks"]
        assert limit == 256 * MiB and high < 256 * MiB
        assert "memory.high of" in chosen["limit_from"]

    def test_no_limit_means_the_machine(self, v2_group: GroupFactory) -> None:
        """No limit up the hierarchy: MemAvailable steers, with the machine's watermarks."""
        group = v2_group(None)
        chosen = probe(group)
        assert (chosen["version"], chosen["path"]) == ("host", "/proc/meminfo")
        with HostMemory.open() as host:
            total = host.read().limit
        assert total is not None
        assert chosen["marks"] == list(astuple(Watermarks.for_machine(total)))
        assert f"no limit on v2 group {group.path}" in chosen["signals"][0]
        assert "no memory.max or memory.high" in chosen["unavailable"]["cgroup limit"]

    def test_budget_wins_over_the_machine(self, v2_group: GroupFactory) -> None:
        """In a group with no limit, a budget steers (PYSHRINKER_BUDGET's path)."""
        group = v2_group(None)
        chosen = probe(group, str(192 * MiB))
        assert chosen["version"] == "budget"
        assert chosen["marks"][0] == 192 * MiB

    def test_a_cgroup_limit_wins_over_a_budget(self, v2_group: GroupFactory) -> None:
        """In a limited group the group's limit steers and the budget is said to be unused."""
        group = v2_group(256 * MiB)
        chosen = probe(group, str(192 * MiB))
        assert chosen["version"] == "v2"
        assert "takes precedence" in chosen["unavailable"]["budget"]

    def test_container_shape(self, v2_group: GroupFactory) -> None:
        """Namespace, read-only cgroupfs, non-root: the container's limit; PSI falls back."""
        group = v2_group(256 * MiB)
        done = run_in_container(group, [sys.executable, "-c", PROBE], timeout=120)
        assert done.returncode == 0, done.stderr
        chosen = json.loads(done.stdout)
        assert (chosen["version"], chosen["path"]) == ("v2", "/sys/fs/cgroup")
        assert chosen["marks"][0] == 256 * MiB
        assert "memory.max of /sys/fs/cgroup" in chosen["limit_from"]
        assert "cgroup v2 memory.events (/sys/fs/cgroup)" in chosen["signals"]
        why = chosen["unavailable"]["psi trigger on /sys/fs/cgroup/memory.pressure"]
        assert why.startswith("needs a write, refused")
        assert "using /proc/pressure/memory instead" in why
        assert any(
            "(window widened: unprivileged) on /proc/pressure/memory" in line
            for line in chosen["signals"]
        )

    def test_container_shape_as_root(self, v2_group: GroupFactory) -> None:
        """The same as root (many images run so): read-only refuses the write; 500 ms windows."""
        group = v2_group(256 * MiB)
        done = run_in_container(group, [sys.executable, "-c", PROBE], timeout=120, root=True)
        assert done.returncode == 0, done.stderr
        chosen = json.loads(done.stdout)
        assert (chosen["version"], chosen["path"]) == ("v2", "/sys/fs/cgroup")
        why = chosen["unavailable"]["psi trigger on /sys/fs/cgroup/memory.pressure"]
        assert why.startswith("needs a write, refused") and "Read-only file system" in why
        assert "PSI trigger 'some 50000 500000' on /proc/pressure/memory" in chosen["signals"]

    def test_group_removed_while_running(self, v2_group: GroupFactory) -> None:
        """Moved out and its group removed: the controller finds the group it is in now."""
        first, second = v2_group(128 * MiB), v2_group(192 * MiB)
        code = (
            "import json, sys, time\n"
            "from pyshrinker.controller import Controller\n"
            "c = Controller.for_current_process().start()\n"
            "print('started', flush=True)\n"
            "sys.stdin.readline()\n"
            "deadline = time.monotonic() + 30\n"
            "while c.memory is None or c.memory.path != sys.argv[1]:\n"
            "    assert time.monotonic() < deadline, c.describe_signals()\n"
            "    time.sleep(0.05)\n"
            "print(json.dumps(c.describe_signals()), flush=True)\n"
            "c.close()\n"
        )
        proc = first.spawn(
            [sys.executable, "-c", code, second.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline() == "started\n"
            second.add_process(proc.pid)
            first.remove()
            proc.stdin.write("\n")
            proc.stdin.flush()
            signals = json.loads(proc.stdout.readline())
            assert signals[0] == f"memory: v2 {second.path}"
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def astuple(marks: Watermarks) -> tuple[int, int, int]:
    """(limit, high, low)."""
    return marks.limit, marks.high, marks.low


@pytest.mark.fuse
class TestDaemonOnV2:
    """pyshrinkerd watching a v2 group (--cgroup) keeps a cache in it alive."""

    def test_cache_in_a_v2_group(self, v2_group: GroupFactory, tmp_path) -> None:
        """A ChunkCache filling to 320 MiB in a 192 MiB group, through the daemon: no OOM."""
        from pyshrinker.transport import CONTROLLER_DIR_ENV

        from .daemon_helpers import running_daemons

        workers = os.path.join(os.path.dirname(os.path.abspath(__file__)), "daemon_workers.py")
        group = v2_group(192 * MiB)
        with running_daemons(str(tmp_path)) as daemons:
            daemon = daemons.start("--cgroup", group.path, test_control=False)
            env = dict(os.environ, **{CONTROLLER_DIR_ENV: daemon.mount})
            argv = ["cache", "--name", "v2", "--chunk-size", str(MiB), "--cost", "1"]
            # 400 MiB put in all, whatever the time it takes (the guest is emulated, and slow
            # when the host is loaded): at least 208 MiB of it must have been asked back.
            argv += ["--target-mib", "320", "--rate-mib", "60", "--seconds", "8"]
            argv += ["--put-mib", "400"]
            proc = group.spawn(
                [sys.executable, workers, *argv],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert proc.stdout is not None and proc.stdin is not None
                line = proc.stdout.readline()
                figures = json.loads(line)
                status = daemon.status()
                proc.stdin.close()
                assert proc.wait(timeout=60) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        # PYSHRINKER_CONTROLLER_DIR means a DirectoryTransport, and the daemon's files served it.
        assert figures["transport"] == "DirectoryTransport"
        assert figures["in_force"] == "FilesTransport"
        assert figures["inserted"] >= 400
        assert figures["requests"] > 0 and figures["chunks_freed"] >= 400 - 192
        assert group.oom_kills() == 0
        assert group.peak() <= 192 * MiB
        assert any(each.pid == figures["pid"] for each in status.shrinkers)
