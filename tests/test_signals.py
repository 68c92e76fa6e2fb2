"""Pressure signals: v1 eventfd notifications, PSI triggers, process budgets, memory.events.

The real-kernel tests run children inside small v1 groups (at most 256 MiB) and wait for the
kernel's notification with a timeout, so a broken notifier fails instead of hanging.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyshrinker.cgroup import ManagedCgroupV1, v2_mount
from pyshrinker.errors import CgroupNotFound, MalformedFile
from pyshrinker.signals.budget import PAGE_SIZE, ProcessBudget, parse_statm
from pyshrinker.signals.psi import (
    MAX_WINDOW_US,
    MIN_WINDOW_US,
    SYSTEM_MEMORY_PRESSURE,
    PsiLine,
    PsiStats,
    PsiTrigger,
    StallKind,
    parse_psi,
    psi_available,
    read_psi,
    unprivileged_window,
)
from pyshrinker.signals.v1 import (
    OomNotifier,
    PressureLevel,
    UsageThreshold,
    V1Level,
    V1Mode,
)
from pyshrinker.signals.v2 import MemoryEventsWatcher

from .conftest import need
from .helpers import reap

MiB = 1 << 20
CAP_SYS_RESOURCE = 24

GroupFactory = Callable[[int], ManagedCgroupV1]


def wait_for(fd: int, events: int, timeout: float = 5.0) -> int:
    """Poll ``fd`` for ``events``; return the revents seen (0 on timeout)."""
    poller = select.poll()
    poller.register(fd, events)
    for _, revents in poller.poll(int(timeout * 1000)):
        return revents
    return 0


def open_fds() -> set[str]:
    """This process's open file descriptors."""
    return set(os.listdir("/proc/self/fd"))


def has_cap_sys_resource() -> bool:
    """Whether this process has CAP_SYS_RESOURCE in its effective set."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each still running is killed (by its Popen) and reaped."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        reap(proc)


def spawn(
    group: ManagedCgroupV1,
    children: list[subprocess.Popen[bytes]],
    code: str,
    *args: str,
    shell_prefix: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -c code args`` inside ``group`` (stdin and stdout piped)."""
    argv = [sys.executable, "-c", code, *args]
    if shell_prefix is not None:
        argv = ["/bin/sh", "-c", f'{shell_prefix} && exec "$@"', "sh", *argv]
    proc = group.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    children.append(proc)
    return proc


#: Waits for a line on stdin, allocates (and touches) argv[1] MiB, says so, sleeps until killed.
ALLOCATE_ON_CUE = (
    "import sys, time\n"
    "sys.stdin.readline()\n"
    "b = bytearray(int(sys.argv[1]) << 20)\n"
    "for i in range(0, len(b), 4096): b[i] = 1\n"
    "sys.stdout.write('allocated\\n'); sys.stdout.flush()\n"
    "while True: time.sleep(60)\n"
)

#: Allocates argv[1] MiB at once (touching every page) and exits.
ALLOCATE_AND_EXIT = (
    "import sys\nb = bytearray(int(sys.argv[1]) << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
)

#: Reads the file argv[1] once, sequentially: page cache the group must reclaim as it goes.
READ_FILE = "import sys\nf = open(sys.argv[1], 'rb')\nwhile f.read(1 << 20): pass\n"

#: Maps the file argv[1] and touches every page argv[2] times: mapped pages, referenced again
#: and again, are rotated rather than reclaimed, so most scanned pages are not reclaimed.
THRASH_MAPPED_FILE = (
    "import mmap, sys\n"
    "f = open(sys.argv[1], 'rb')\n"
    "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    for i in range(0, len(m), 4096): m[i]\n"
)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 200 MiB file on disk, not in the page cache; deleted after the module."""
    path = tmp_path_factory.mktemp("pressure") / "big"
    block = b"\xa5" * MiB
    with open(path, "wb") as f:
        for _ in range(200):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        # Written by this process, the pages were charged here: drop them, so the child's reads
        # bring them in again and charge its own group.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        yield str(path)
    finally:
        path.unlink()


@pytest.fixture
def unified_group() -> Iterator[str]:
    """A fresh directory on the cgroup2 mount (memory controller or not), removed afterwards.

    Here that is /sys/fs/cgroup/unified, where v1 holds the memory controller but every group
    still has memory.pressure.
    """
    mount = v2_mount()
    need(
        mount is not None and os.access(mount, os.W_OK),
        "needs root and a cgroup2 mount",
    )
    assert mount is not None
    path = os.path.join(mount, f"pyshrinker-test-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        deadline = time.monotonic() + 5.0
        while os.path.exists(path):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                break
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


@pytest.mark.v1
class TestUsageThreshold:
    """UsageThreshold on real v1 groups."""

    def test_fires_up_and_down(self, v1_group: GroupFactory, children: list) -> None:
        """Signalled when a child's allocation crosses the threshold, and again when it exits."""
        group = v1_group(128 * MiB)
        threshold = UsageThreshold.register(group.path, 40 * MiB)
        try:
            assert threshold.events == select.POLLIN
            proc = spawn(group, children, ALLOCATE_ON_CUE, "64")
            assert proc.stdin is not None and proc.stdout is not None
            # The interpreter starting up stays under 40 MiB: no crossing yet.
            assert wait_for(threshold.fileno(), select.POLLIN, timeout=0.3) == 0
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == b"allocated\n"
            assert wait_for(threshold.fileno(), select.POLLIN) & select.POLLIN
            assert threshold.consume() is True
            assert group.read_int("memory.usage_in_bytes") > 40 * MiB
            # Drained: nothing more until the next crossing.
            assert threshold.consume() is False
            assert wait_for(threshold.fileno(), select.POLLIN, timeout=0.2) == 0
            reap(proc)
            assert wait_for(threshold.fileno(), select.POLLIN) & select.POLLIN
            assert threshold.consume() is True
            assert group.read_int("memory.usage_in_bytes") < 40 * MiB
        finally:
            threshold.close()

    def test_quiet_below_threshold(self, v1_group: GroupFactory, children: list) -> None:
        """A child that stays under the threshold never signals it."""
        group = v1_group(128 * MiB)
        threshold = UsageThreshold.register(group.path, 96 * MiB)
        try:
            proc = spawn(group, children, ALLOCATE_ON_CUE, "16")
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == b"allocated\n"
            assert wait_for(threshold.fileno(), select.POLLIN, timeout=0.5) == 0
            assert threshold.consume() is False
        finally:
            threshold.close()

    def test_describe_and_close(self, v1_group: GroupFactory) -> None:
        """describe() names the threshold and group; close() releases both fds, twice is fine."""
        group = v1_group(64 * MiB)
        before = open_fds()
        threshold = UsageThreshold.register(group.path, 8 * MiB)
        assert str(8 * MiB) in threshold.describe()
        assert group.path in threshold.describe()
        assert threshold.fileno() == threshold.efd >= 0
        assert len(open_fds() - before) == 2
        threshold.close()
        threshold.close()
        assert threshold.fileno() == -1
        assert open_fds() == before

    def test_bad_threshold(self, v1_group: GroupFactory) -> None:
        """A zero or negative threshold is a ValueError."""
        group = v1_group(64 * MiB)
        for bad in (0, -1):
            with pytest.raises(ValueError):
                UsageThreshold.register(group.path, bad)

    def test_missing_group_leaks_nothing(self, tmp_path: Path) -> None:
        """Registering on a directory that is no group raises CgroupNotFound and leaks no fd."""
        before = open_fds()
        with pytest.raises(CgroupNotFound):
            UsageThreshold.register(str(tmp_path / "absent"), MiB)
        with pytest.raises(CgroupNotFound):
            OomNotifier.register(str(tmp_path))
        assert open_fds() == before


@pytest.mark.v1
class TestPressureLevel:
    """PressureLevel (vmpressure) on real v1 groups."""

    def test_low_on_page_cache_reclaim(
        self, v1_group: GroupFactory, children: list, big_file: str
    ) -> None:
        """Reading a 200 MiB file in a 64 MiB group makes the kernel reclaim: 'low' fires."""
        group = v1_group(64 * MiB)
        low = PressureLevel.register(group.path, V1Level.LOW)
        try:
            assert wait_for(low.fileno(), select.POLLIN, timeout=0.1) == 0
            proc = spawn(group, children, READ_FILE, big_file)
            assert proc.wait(timeout=60) == 0
            assert wait_for(low.fileno(), select.POLLIN) & select.POLLIN
            assert low.consume() is True
            # The group really did cap its page cache.
            assert group.read_int("memory.max_usage_in_bytes") <= 64 * MiB
        finally:
            low.close()

    def test_quiet_without_reclaim(self, v1_group: GroupFactory, children: list) -> None:
        """A child far under the limit causes no reclaim: no 'low' event."""
        group = v1_group(128 * MiB)
        low = PressureLevel.register(group.path, V1Level.LOW, V1Mode.LOCAL)
        try:
            proc = spawn(group, children, ALLOCATE_AND_EXIT, "16")
            assert proc.wait(timeout=60) == 0
            assert wait_for(low.fileno(), select.POLLIN, timeout=0.5) == 0
            assert low.consume() is False
        finally:
            low.close()

    def test_medium_on_thrashing(
        self, v1_group: GroupFactory, children: list, big_file: str
    ) -> None:
        """Touching a mapped 200 MiB file over and over in a 64 MiB group: 'medium' fires.

        Mapped, referenced pages are scanned and rotated instead of reclaimed, so the share
        of scanned pages not reclaimed passes vmpressure's 60 % (medium) threshold.
        """
        group = v1_group(64 * MiB)
        notifiers = [
            PressureLevel.register(group.path, level, V1Mode.HIERARCHY)
            for level in (V1Level.LOW, V1Level.MEDIUM)
        ]
        low, medium = notifiers
        try:
            proc = spawn(group, children, THRASH_MAPPED_FILE, big_file, "3")
            assert proc.wait(timeout=120) == 0
            assert wait_for(low.fileno(), select.POLLIN) & select.POLLIN
            assert wait_for(medium.fileno(), select.POLLIN) & select.POLLIN
            assert low.consume() is True
            assert medium.consume() is True
            assert medium.level is V1Level.MEDIUM and medium.mode is V1Mode.HIERARCHY
            assert "medium" in medium.describe() and "hierarchy" in medium.describe()
            # No OOM: this is file-backed pressure only.
            assert group.read_keyed("memory.oom_control")["oom_kill"] == 0
        finally:
            for notifier in notifiers:
                notifier.close()

    def test_every_level_and_mode_registers(self, v1_group: GroupFactory) -> None:
        """The kernel accepts every level with every mode."""
        group = v1_group(64 * MiB)
        for level in V1Level:
            for mode in V1Mode:
                notifier = PressureLevel.register(group.path, level, mode)
                try:
                    assert notifier.level is level and notifier.mode is mode
                    assert notifier.consume() is False
                finally:
                    notifier.close()


@pytest.mark.v1
class TestOomNotifier:
    """OomNotifier on a real v1 group."""

    def test_fires_on_oom_kill(self, v1_group: GroupFactory, children: list) -> None:
        """A child allocating 64 MiB in a 32 MiB group is OOM-killed, and the eventfd fires."""
        group = v1_group(32 * MiB)
        oom = OomNotifier.register(group.path)
        try:
            assert "OOM" in oom.describe()
            assert wait_for(oom.fileno(), select.POLLIN, timeout=0.1) == 0
            proc = spawn(group, children, ALLOCATE_AND_EXIT, "64")
            assert proc.wait(timeout=60) == -signal.SIGKILL
            assert wait_for(oom.fileno(), select.POLLIN) & select.POLLIN
            assert oom.consume() is True
            assert group.read_keyed("memory.oom_control")["oom_kill"] >= 1
        finally:
            oom.close()

    def test_quiet_without_oom(self, v1_group: GroupFactory, children: list) -> None:
        """A child that fits in the group exits normally, and no OOM is signalled."""
        group = v1_group(64 * MiB)
        oom = OomNotifier.register(group.path)
        try:
            proc = spawn(group, children, ALLOCATE_AND_EXIT, "16")
            assert proc.wait(timeout=60) == 0
            assert wait_for(oom.fileno(), select.POLLIN, timeout=0.3) == 0
        finally:
            oom.close()


@pytest.mark.v1
class TestGroupRemoval:
    """Removing a v1 group signals every eventfd registered on it."""

    def test_removal_signals_eventfds(self, v1_group: GroupFactory) -> None:
        """Threshold, level and OOM eventfds all become readable when the group goes away."""
        group = v1_group(64 * MiB)
        notifiers = [
            UsageThreshold.register(group.path, 16 * MiB),
            PressureLevel.register(group.path, V1Level.LOW),
            OomNotifier.register(group.path),
        ]
        try:
            for notifier in notifiers:
                assert wait_for(notifier.fileno(), select.POLLIN, timeout=0.05) == 0
            group.remove()
            assert not os.path.exists(group.path)
            for notifier in notifiers:
                assert wait_for(notifier.fileno(), select.POLLIN) & select.POLLIN
                assert notifier.consume() is True
        finally:
            for notifier in notifiers:
                notifier.close()


SAMPLE_PSI = """\
some avg10=1.50 avg60=0.25 avg300=0.00 total=123456
full avg10=0.75 avg60=0.10 avg300=0.00 total=65432
"""


class TestParsePsi:
    """parse_psi on sample and malformed text."""

    def test_some_and_full(self) -> None:
        """Both lines parse into averages (percent) and totals (us)."""
        assert parse_psi(SAMPLE_PSI) == PsiStats(
            some=PsiLine(1.5, 0.25, 0.0, 123456), full=PsiLine(0.75, 0.1, 0.0, 65432)
        )

    def test_some_only(self) -> None:
        """Old kernels' CPU file has no 'full' line: full is None."""
        stats = parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
        assert stats.full is None
        assert stats.some.total_us == 0

    def test_field_order_free(self) -> None:
        """Fields are read by name."""
        stats = parse_psi("some total=9 avg300=3 avg60=2 avg10=1\n")
        assert stats.some == PsiLine(1.0, 2.0, 3.0, 9)

    @pytest.mark.parametrize(
        "text",
        [
            pytest.param("", id="empty"),
            pytest.param("full avg10=0 avg60=0 avg300=0 total=0\n", id="no-some"),
            pytest.param("some avg10=0 avg60=0 avg300=0\n", id="no-total"),
            pytest.param("some avg10=x avg60=0 avg300=0 total=0\n", id="bad-avg"),
            pytest.param("some avg10=0 avg60=0 avg300=0 total=1.5\n", id="float-total"),
            pytest.param("some avg10 avg60=0 avg300=0 total=0\n", id="no-equals"),
            pytest.param("some avg10=0 avg60=0 avg300=0 total=0\nfull total\n", id="bad-full"),
            pytest.param("garbage\n", id="garbage"),
        ],
    )
    def test_malformed(self, text: str) -> None:
        """Malformed pressure text is MalformedFile (a ValueError)."""
        with pytest.raises(MalformedFile):
            parse_psi(text)

    def test_read_and_available_on_fixture(self, tmp_path: Path) -> None:
        """read_psi reads a file; psi_available says False for garbage or a missing file."""
        good, bad = tmp_path / "good", tmp_path / "bad"
        good.write_text(SAMPLE_PSI)
        bad.write_text("nonsense\n")
        assert read_psi(str(good)).some.total_us == 123456
        assert psi_available(str(good))
        assert not psi_available(str(bad))
        assert not psi_available(str(tmp_path / "absent"))
        with pytest.raises(CgroupNotFound):
            read_psi(str(tmp_path / "absent"))

    @pytest.mark.parametrize(
        ("asked", "window"),
        [
            (500_000, 2_000_000),
            (1_000_000, 2_000_000),
            (2_000_000, 2_000_000),
            (2_000_001, 4_000_000),
            (9_000_000, 10_000_000),
            (10_000_000, 10_000_000),
        ],
    )
    def test_unprivileged_window(self, asked: int, window: int) -> None:
        """Windows round up to a multiple of 2 s, at most 10 s."""
        assert unprivileged_window(asked) == window


class TestPsiTriggerConsume:
    """PsiTrigger.consume: the first event is believed only if the stall total moved."""

    def _trigger(self, path: Path, kind: StallKind, armed_total: int | None) -> PsiTrigger:
        return PsiTrigger(str(path), kind, 300_000, 2_000_000, True, -1, armed_total=armed_total)

    def test_first_event_without_stall_is_spurious(self, tmp_path: Path) -> None:
        """Total unchanged since arming: not real; later events are believed."""
        path = tmp_path / "memory.pressure"
        path.write_text(SAMPLE_PSI)
        trigger = self._trigger(path, StallKind.SOME, armed_total=123456)
        assert trigger.consume() is False
        assert trigger.consume() is True

    def test_first_event_with_stall_is_real(self, tmp_path: Path) -> None:
        """Total moved since arming: real."""
        path = tmp_path / "memory.pressure"
        path.write_text(SAMPLE_PSI)
        assert self._trigger(path, StallKind.SOME, armed_total=100).consume() is True

    def test_full_kind_compares_full_total(self, tmp_path: Path) -> None:
        """A 'full' trigger compares the full line's total, not some's."""
        path = tmp_path / "memory.pressure"
        path.write_text(SAMPLE_PSI)
        assert self._trigger(path, StallKind.FULL, armed_total=65432).consume() is False
        assert self._trigger(path, StallKind.FULL, armed_total=123456).consume() is True

    def test_not_armed_with_a_total(self, tmp_path: Path) -> None:
        """Without a total at arming, every event is believed (the file is not read)."""
        trigger = self._trigger(tmp_path / "absent", StallKind.SOME, armed_total=None)
        assert trigger.consume() is True


class TestPsiTriggerArgs:
    """PsiTrigger.arm argument checks (before touching any file)."""

    @pytest.mark.parametrize(
        ("stall", "window"),
        [
            (150_000, MIN_WINDOW_US - 1),
            (150_000, MAX_WINDOW_US + 1),
            (150_000, 0),
            (0, 2_000_000),
            (-1, 2_000_000),
            (2_000_001, 2_000_000),
        ],
    )
    def test_bad_windows(self, tmp_path: Path, stall: int, window: int) -> None:
        """Windows outside 0.5-10 s and stalls outside 1..window are ValueError."""
        before = open_fds()
        with pytest.raises(ValueError):
            PsiTrigger.arm(str(tmp_path / "absent"), stall_us=stall, window_us=window)
        assert open_fds() == before

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing pressure file is CgroupNotFound."""
        with pytest.raises(CgroupNotFound):
            PsiTrigger.arm(str(tmp_path / "absent"))


@pytest.mark.psi
class TestPsiTriggerKernel:
    """PsiTrigger.arm on real pressure files."""

    def _check_window(self, trigger: PsiTrigger, stall: int, window: int) -> None:
        if has_cap_sys_resource():
            assert not trigger.widened
            assert (trigger.stall_us, trigger.window_us) == (stall, window)
        else:
            # Unprivileged: the kernel refuses windows that are not a multiple of 2 s.
            assert trigger.widened == (window % 2_000_000 != 0)
            assert trigger.window_us == unprivileged_window(window)
            assert trigger.stall_us == stall * trigger.window_us // window

    def test_arm_system(self, require_psi: str) -> None:
        """Arming /proc/pressure/memory at 1 s works, widened to 2 s when unprivileged."""
        before = open_fds()
        trigger = PsiTrigger.arm(require_psi, StallKind.SOME, 150_000, 1_000_000)
        try:
            self._check_window(trigger, 150_000, 1_000_000)
            assert trigger.fileno() == trigger.fd >= 0
            assert trigger.events == select.POLLPRI
            assert os.readlink(f"/proc/self/fd/{trigger.fd}") == SYSTEM_MEMORY_PRESSURE
            text = trigger.describe()
            assert f"some {trigger.stall_us} {trigger.window_us}" in text
            assert require_psi in text
            assert ("widened" in text) == trigger.widened
            # One trigger per fd: the kernel refuses a second one on the same fd.
            with pytest.raises(OSError) as info:
                os.write(trigger.fd, b"some 150000 2000000\0")
            assert info.value.errno == errno.EBUSY
        finally:
            trigger.close()
        trigger.close()
        assert trigger.fd == -1
        assert open_fds() == before

    def test_arm_full_two_seconds(self, require_psi: str) -> None:
        """A 2 s 'full' trigger is armed as asked, never widened."""
        with PsiTrigger.arm(require_psi, StallKind.FULL, 100_000, 2_000_000) as trigger:
            assert not trigger.widened
            assert (trigger.kind, trigger.stall_us, trigger.window_us) == (
                StallKind.FULL,
                100_000,
                2_000_000,
            )
            assert "full 100000 2000000" in trigger.describe()
        assert trigger.fd == -1

    def test_closing_removes_the_trigger(self, require_psi: str) -> None:
        """Many triggers armed and closed in turn: each close removes its trigger, no error."""
        before = open_fds()
        for _ in range(50):
            trigger = PsiTrigger.arm(require_psi, window_us=2_000_000)
            trigger.close()
        assert open_fds() == before

    def test_arm_unified_group(self, unified_group: str) -> None:
        """A v2 group's memory.pressure takes a trigger too; removing the group gives POLLERR."""
        path = os.path.join(unified_group, "memory.pressure")
        need(psi_available(path), "needs PSI in cgroup v2 groups")
        trigger = PsiTrigger.arm(path, StallKind.SOME, 150_000, 1_000_000)
        try:
            self._check_window(trigger, 150_000, 1_000_000)
            assert path in trigger.describe()
            assert wait_for(trigger.fileno(), select.POLLPRI, timeout=0.1) == 0
            os.rmdir(unified_group)
            assert wait_for(trigger.fileno(), select.POLLPRI) & select.POLLERR
        finally:
            trigger.close()
        trigger.close()

    def test_fires_on_stalls_in_unified_group(
        self, v1_group: GroupFactory, unified_group: str, children: list, big_file: str
    ) -> None:
        """A child thrashing a mapped file in a 64 MiB v1 group stalls its v2 group: POLLPRI."""
        path = os.path.join(unified_group, "memory.pressure")
        need(psi_available(path), "needs PSI in cgroup v2 groups")
        group = v1_group(64 * MiB)
        trigger = PsiTrigger.arm(path, StallKind.SOME, 10_000, 2_000_000)
        try:
            join_v2 = f'echo $$ > "{unified_group}/cgroup.procs"'
            proc = spawn(group, children, THRASH_MAPPED_FILE, big_file, "10", shell_prefix=join_v2)
            assert wait_for(trigger.fileno(), select.POLLPRI, timeout=20) & select.POLLPRI
            assert trigger.consume() is True
            assert read_psi(path).some.total_us > 0
            reap(proc)
        finally:
            trigger.close()


class TestProcessBudget:
    """ProcessBudget reads this process's RSS from /proc/self/statm."""

    def test_rss_grows_and_shrinks(self) -> None:
        """Allocating 50 MiB shows in the reading; freeing it (mmap-backed) shows too."""
        with ProcessBudget.open(4096 * MiB) as budget:
            before = budget.read()
            assert before.limit == 4096 * MiB
            assert before.usage == before.working_set > 0
            block = bytearray(50 * MiB)
            for i in range(0, len(block), 4096):
                block[i] = 1
            during = budget.read()
            assert during.usage >= before.usage + 45 * MiB
            del block
            after = budget.read()
            assert after.usage <= during.usage - 40 * MiB

    def test_rss_matches_statm(self) -> None:
        """The reading is statm's second field in pages."""
        with ProcessBudget.open(MiB) as budget:
            with open("/proc/self/statm", encoding="ascii") as f:
                pages = int(f.read().split()[1])
            assert abs(budget.read().usage - pages * PAGE_SIZE) < 8 * MiB
            assert budget.read().limit == MiB

    def test_other_process(self, children: list) -> None:
        """A pid other than self is read from its own statm."""
        proc = subprocess.Popen(
            [sys.executable, "-c", ALLOCATE_ON_CUE, "30"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        children.append(proc)
        assert proc.stdin is not None and proc.stdout is not None
        with ProcessBudget.open(256 * MiB, pid=proc.pid) as budget:
            small = budget.read().usage
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == b"allocated\n"
            assert budget.read().usage >= small + 28 * MiB
        reap(proc)

    @pytest.mark.parametrize("bad", [0, -1, True, 1.5, "1024", None])
    def test_bad_budget(self, bad: object) -> None:
        """Only a positive int is a budget."""
        before = open_fds()
        with pytest.raises(ValueError):
            ProcessBudget.open(bad)  # type: ignore[arg-type]
        assert open_fds() == before

    def test_missing_pid(self) -> None:
        """A pid with no /proc entry is CgroupNotFound."""
        with pytest.raises(CgroupNotFound):
            ProcessBudget.open(MiB, pid=2**31 - 1)


class TestParseStatm:
    """parse_statm."""

    def test_parse(self) -> None:
        """The second field is resident pages."""
        assert parse_statm("1000 250 30 1 0 100 0\n") == 250 * PAGE_SIZE

    @pytest.mark.parametrize("text", ["", "1000", "1000 x 3", "1000 -5 3", "1000 2.5"])
    def test_malformed(self, text: str) -> None:
        """Fewer than two fields or a non-number is MalformedFile."""
        with pytest.raises(MalformedFile):
            parse_statm(text)


EVENTS = "low {low}\nhigh {high}\nmax {max}\noom {oom}\noom_kill {oom_kill}\n"


class TestMemoryEventsWatcher:
    """MemoryEventsWatcher.consume on a fixture memory.events file."""

    @pytest.fixture
    def events_dir(self, tmp_path: Path) -> Path:
        """A directory holding a memory.events with all counters at 0."""
        (tmp_path / "memory.events").write_text(
            EVENTS.format(low=0, high=0, max=0, oom=0, oom_kill=0)
        )
        return tmp_path

    def _set(self, directory: Path, **counters: int) -> None:
        values = dict.fromkeys(("low", "high", "max", "oom", "oom_kill"), 0)
        values.update(counters)
        (directory / "memory.events").write_text(EVENTS.format(**values))

    def test_consume(self, events_dir: Path) -> None:
        """True only when high, max or oom grew since the last look."""
        watcher = MemoryEventsWatcher.open(str(events_dir))
        try:
            assert watcher.consume() is False
            self._set(events_dir, low=5)
            assert watcher.consume() is False
            self._set(events_dir, low=5, high=1)
            assert watcher.consume() is True
            assert watcher.consume() is False
            self._set(events_dir, low=5, high=1, max=2)
            assert watcher.consume() is True
            self._set(events_dir, low=5, high=1, max=2, oom=1, oom_kill=1)
            assert watcher.consume() is True
            assert watcher.last["oom_kill"] == 1
            assert watcher.consume() is False
        finally:
            watcher.close()

    def test_baseline_taken_at_open(self, events_dir: Path) -> None:
        """Counters already non-zero at open are not news."""
        self._set(events_dir, high=7, max=3, oom=1)
        watcher = MemoryEventsWatcher.open(str(events_dir))
        try:
            assert watcher.last["high"] == 7
            assert watcher.consume() is False
        finally:
            watcher.close()

    def test_counters_going_down_are_not_news(self, events_dir: Path) -> None:
        """A counter that went down (a new group in its place) is no event, but resets."""
        self._set(events_dir, high=7)
        watcher = MemoryEventsWatcher.open(str(events_dir))
        try:
            self._set(events_dir, high=2)
            assert watcher.consume() is False
            self._set(events_dir, high=3)
            assert watcher.consume() is True
        finally:
            watcher.close()

    def test_pollable_face(self, events_dir: Path) -> None:
        """fileno, events mask, describe and close."""
        watcher = MemoryEventsWatcher.open(str(events_dir))
        fd = watcher.fileno()
        assert fd >= 0
        assert watcher.events == select.POLLPRI
        assert str(events_dir) in watcher.describe()
        watcher.close()
        watcher.close()
        with pytest.raises(OSError):
            os.fstat(fd)

    def test_malformed(self, events_dir: Path) -> None:
        """A garbled memory.events is MalformedFile on consume."""
        watcher = MemoryEventsWatcher.open(str(events_dir))
        try:
            (events_dir / "memory.events").write_text("high lots\n")
            with pytest.raises(MalformedFile):
                watcher.consume()
        finally:
            watcher.close()

    def test_missing(self, tmp_path: Path) -> None:
        """A directory without memory.events is CgroupNotFound."""
        with pytest.raises(CgroupNotFound):
            MemoryEventsWatcher.open(str(tmp_path))
