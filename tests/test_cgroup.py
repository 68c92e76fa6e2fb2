"""Finding and reading memory cgroups: pure parsers, fixture directories, the real v1 kernel."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyshrinker.cgroup import (
    UNLIMITED_THRESHOLD,
    V1_MOUNT,
    CgroupV1,
    CgroupV2,
    CgroupVersion,
    HostMemory,
    KernelFile,
    Limit,
    ManagedCgroupV1,
    ManagedCgroupV2,
    MemoryState,
    Mount,
    ProcCgroupLine,
    UnlimitedGroup,
    locate_memory_cgroup,
    memory_source_of,
    open_group,
    parse_flat_keyed,
    parse_limit,
    parse_meminfo,
    parse_mountinfo,
    parse_proc_cgroup,
    pick_keyed,
    v1_memory_available,
    v2_group_of,
    with_host_fallback,
)
from pyshrinker.errors import CgroupError, CgroupNotFound, MalformedFile, UnsupportedError

from . import strategies
from .conftest import need
from .helpers import reap

MiB = 1 << 20
#: What v1 reads for "no limit" on 4 KiB pages (PAGE_COUNTER_MAX pages).
V1_UNLIMITED = 9223372036854771712

HOST_PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/app/worker
3:cpuset:/
0::/app/worker
"""

HOST_MOUNTINFO = r"""22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""

V2_ONLY_MOUNTINFO = """\
24 1 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw
"""

NO_CGROUP_MOUNTINFO = """\
22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
"""


class TestParseProcCgroup:
    """parse_proc_cgroup."""

    def test_v1_and_v2_lines(self) -> None:
        """Each line is id, controllers and path; the v2 line has no controllers."""
        lines = parse_proc_cgroup(HOST_PROC_CGROUP)
        assert lines[0] == ProcCgroupLine(9, ("name=systemd",), "/")
        assert lines[2] == ProcCgroupLine(4, ("memory",), "/app/worker")
        assert lines[-1] == ProcCgroupLine(0, (), "/app/worker")
        assert len(lines) == 5

    def test_several_controllers_and_colon_in_path(self) -> None:
        """Comma-separated controllers split; a ':' in the path stays in the path."""
        lines = parse_proc_cgroup("5:cpu,cpuacct:/a:b\n\n")
        assert lines == [ProcCgroupLine(5, ("cpu", "cpuacct"), "/a:b")]

    def test_empty(self) -> None:
        """An empty file has no lines."""
        assert parse_proc_cgroup("") == []

    @pytest.mark.parametrize(
        "text", ["memory:/a", "x:memory:/a", "4", "-1:memory:/", "4 memory /a", ":memory:/"]
    )
    def test_malformed(self, text: str) -> None:
        """A line without three fields or a numeric id is MalformedFile (a ValueError)."""
        with pytest.raises(MalformedFile) as info:
            parse_proc_cgroup(text)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, CgroupError)


class TestParseMountinfo:
    """parse_mountinfo."""

    def test_only_cgroup_mounts(self) -> None:
        """proc and tmpfs are skipped; cgroup and cgroup2 mounts come back."""
        mounts = parse_mountinfo(HOST_MOUNTINFO)
        assert [m.mount_point for m in mounts] == [
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/systemd",
            "/sys/fs/cgroup/unified",
        ]
        assert mounts[0] == Mount("/", "/sys/fs/cgroup/memory", "cgroup", ("rw", "memory"))
        assert mounts[3].fs_type == "cgroup2"
        assert mounts[3].super_options == ("rw", "nsdelegate")

    def test_optional_fields(self) -> None:
        """Any number of optional fields before '-' is fine."""
        text = "35 31 0:32 / /mem rw shared:9 master:3 propagate_from:2 - cgroup cg rw,memory\n"
        assert parse_mountinfo(text) == [Mount("/", "/mem", "cgroup", ("rw", "memory"))]

    def test_octal_escapes(self) -> None:
        """Space, tab, newline and backslash come escaped as \\ooo and are unescaped."""
        text = r"35 31 0:32 /my\040root /mnt/cg\011x\012y\134z rw - cgroup cgroup rw,memory" + "\n"
        (mount,) = parse_mountinfo(text)
        assert mount.root == "/my root"
        assert mount.mount_point == "/mnt/cg\tx\ny\\z"

    def test_escape_at_end(self) -> None:
        """An escape as the last characters of a field is unescaped too."""
        (mount,) = parse_mountinfo(r"1 2 0:3 / /mnt/a\040 rw - cgroup2 cgroup2 rw" + "\n")
        assert mount.mount_point == "/mnt/a "

    def test_namespace_root(self) -> None:
        """Inside a cgroup namespace the mount's root is the group's path, not '/'."""
        text = "35 31 0:32 /app/worker /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        (mount,) = parse_mountinfo(text)
        assert mount.root == "/app/worker"

    @pytest.mark.parametrize(
        "text",
        [
            "35 31 0:32 / /sys/fs/cgroup/memory rw cgroup cgroup rw,memory",  # no '-'
            "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup",  # no super options
            "35 31 0:32 - cgroup cgroup rw",  # '-' too early: no mount point
            "35 31 0:32 /",
        ],
    )
    def test_malformed(self, text: str) -> None:
        """A line lacking the separator or fields is MalformedFile."""
        with pytest.raises(MalformedFile):
            parse_mountinfo(text)

    def test_blank_lines_skipped(self) -> None:
        """Blank lines are ignored."""
        assert parse_mountinfo("\n\n") == []


class TestLocateMemoryCgroup:
    """locate_memory_cgroup: v1 first, then v2, else None."""

    def test_v1(self) -> None:
        """With the memory controller on v1, the v1 group's directory."""
        found = locate_memory_cgroup(HOST_PROC_CGROUP, HOST_MOUNTINFO)
        assert found == (CgroupVersion.V1, "/sys/fs/cgroup/memory/app/worker")

    def test_v2(self) -> None:
        """A pure v2 machine: the v2 group under the cgroup2 mount."""
        found = locate_memory_cgroup("0::/system.slice/app.service\n", V2_ONLY_MOUNTINFO)
        assert found == (CgroupVersion.V2, "/sys/fs/cgroup/system.slice/app.service")

    def test_v1_memory_not_mounted_falls_back_to_v2(self) -> None:
        """A memory line with no v1 memory mount falls through to v2."""
        text = "4:memory:/a\n0::/b\n"
        assert locate_memory_cgroup(text, V2_ONLY_MOUNTINFO) == (
            CgroupVersion.V2,
            "/sys/fs/cgroup/b",
        )

    def test_none(self) -> None:
        """No cgroup mount at all: None."""
        assert locate_memory_cgroup(HOST_PROC_CGROUP, NO_CGROUP_MOUNTINFO) is None

    def test_v1_without_memory_line(self) -> None:
        """Only non-memory v1 hierarchies and no v2 line: None."""
        assert locate_memory_cgroup("3:cpuset:/\n", HOST_MOUNTINFO) is None

    def test_namespace_root_v1(self) -> None:
        """In a cgroup namespace the mount root is stripped from the process's path."""
        mountinfo = "35 31 0:32 /app /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        found = locate_memory_cgroup("4:memory:/app/worker\n", mountinfo)
        assert found == (CgroupVersion.V1, "/sys/fs/cgroup/memory/worker")

    def test_namespace_root_is_the_group(self) -> None:
        """A process at the namespace root lives in the mount point itself."""
        mountinfo = "24 1 0:22 /app /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
        found = locate_memory_cgroup("0::/app\n", mountinfo)
        assert found == (CgroupVersion.V2, "/sys/fs/cgroup")

    def test_root_group(self) -> None:
        """The root group is the mount point, without a trailing slash."""
        assert locate_memory_cgroup("0::/\n", V2_ONLY_MOUNTINFO) == (
            CgroupVersion.V2,
            "/sys/fs/cgroup",
        )

    def test_root_prefix_is_a_whole_component(self) -> None:
        """A mount root '/app' is no prefix of '/apple'."""
        mountinfo = "35 31 0:32 /app /mnt/mem rw - cgroup cgroup rw,memory\n"
        found = locate_memory_cgroup("4:memory:/apple\n", mountinfo)
        assert found == (CgroupVersion.V1, "/mnt/mem/apple")

    def test_escaped_mount_point(self) -> None:
        """The mount point is unescaped before joining."""
        mountinfo = r"35 31 0:32 / /mnt/my\040cg rw - cgroup cgroup rw,memory" + "\n"
        found = locate_memory_cgroup("4:memory:/a\n", mountinfo)
        assert found == (CgroupVersion.V1, "/mnt/my cg/a")

    def test_malformed_propagates(self) -> None:
        """Malformed /proc text is MalformedFile, not a silent None."""
        with pytest.raises(MalformedFile):
            locate_memory_cgroup("garbage\n", HOST_MOUNTINFO)


class TestParseFlatKeyed:
    """parse_flat_keyed."""

    def test_parse(self) -> None:
        """'key value' lines become a dict of ints; blank lines are skipped."""
        text = "low 0\nhigh 12\n\nmax 3\noom_kill 1\nbig 9223372036854771712\n"
        assert parse_flat_keyed(text) == {
            "low": 0,
            "high": 12,
            "max": 3,
            "oom_kill": 1,
            "big": V1_UNLIMITED,
        }

    @pytest.mark.parametrize("text", ["cache", "cache 1 2", "cache one", "cache 1.5", "1 2 3"])
    def test_malformed(self, text: str) -> None:
        """Wrong field counts and non-numbers are MalformedFile naming the file."""
        with pytest.raises(MalformedFile, match=r"memory\.stat"):
            parse_flat_keyed(f"rss 4096\n{text}\n", "memory.stat")


class TestPickKeyed:
    """pick_keyed: the values of some keys only, as parse_flat_keyed would read them."""

    def test_line_anchored(self) -> None:
        """A key is never found as the tail of another (v1 has both of these)."""
        text = "total_inactive_file 7\ninactive_file 3\n"
        assert pick_keyed(text, ["inactive_file"]) == {"inactive_file": 3}
        assert pick_keyed("total_inactive_file 7\n", ["inactive_file"]) == {}

    def test_first_and_last_lines(self) -> None:
        """Keys on the first line and on a last line without a newline are found."""
        assert pick_keyed("cache 1\nrss 2", ["cache", "rss", "absent"]) == {"cache": 1, "rss": 2}

    @pytest.mark.parametrize("line", ["cache one", "cache 1 2", "cache 1.5", "cache "])
    def test_malformed(self, line: str) -> None:
        """A bad value of a key asked for is MalformedFile naming the file."""
        with pytest.raises(MalformedFile, match=r"memory\.stat"):
            pick_keyed(f"rss 4096\n{line}\n", ["cache"], "memory.stat")

    @given(
        values=strategies.flat_keyed_files,
        asked=st.lists(st.sampled_from(["cache", "inactive_file", "total_inactive_file", "x"])),
    )
    def test_agrees_with_parse_flat_keyed(self, values: dict[str, int], asked: list[str]) -> None:
        """On well-formed text it gives what the full parse gives for the keys asked."""
        text = "".join(f"{key} {value}\n" for key, value in values.items())
        whole = parse_flat_keyed(text)
        assert pick_keyed(text, asked) == {key: whole[key] for key in asked if key in whole}


class TestParseLimit:
    """parse_limit."""

    @pytest.mark.parametrize(
        ("text", "value"),
        [
            ("max\n", None),
            ("max", None),
            (f"{V1_UNLIMITED}\n", None),
            (f"{UNLIMITED_THRESHOLD}", None),
            (f"{UNLIMITED_THRESHOLD - 1}", UNLIMITED_THRESHOLD - 1),
            ("268435456\n", 256 * MiB),
            ("0\n", 0),
        ],
    )
    def test_parse(self, text: str, value: int | None) -> None:
        """'max' and v1's huge value mean no limit; numbers are bytes."""
        assert parse_limit(text) == value

    @pytest.mark.parametrize("text", ["", "\n", "-1", "MAX", "max max", "12k", "1.5", "0x10"])
    def test_malformed(self, text: str) -> None:
        """Anything else is MalformedFile."""
        with pytest.raises(MalformedFile):
            parse_limit(text, "memory.max")


MEMINFO = """\
MemTotal:        2048000 kB
MemFree:          512000 kB
MemAvailable:    1024000 kB
Buffers:           10000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""


class TestParseMeminfo:
    """parse_meminfo."""

    def test_parse(self) -> None:
        """kB values become bytes; unit-less values stay as they are."""
        info = parse_meminfo(MEMINFO)
        assert info["MemTotal"] == 2048000 * 1024
        assert info["MemAvailable"] == 1024000 * 1024
        assert info["HugePages_Total"] == 0
        assert info["Hugepagesize"] == 2048 * 1024

    @pytest.mark.parametrize("line", ["MemTotal: lots kB", "MemFree: 1.5 kB", "MemFree: -"])
    def test_malformed(self, line: str) -> None:
        """A non-numeric value is MalformedFile."""
        with pytest.raises(MalformedFile):
            parse_meminfo(MEMINFO + line + "\n")


class TestHostMemory:
    """HostMemory on a fixture meminfo."""

    def test_read(self, tmp_path: Path) -> None:
        """usage = total - free, working set = total - available, limit = total."""
        path = tmp_path / "meminfo"
        path.write_text(MEMINFO)
        with HostMemory.open(str(path)) as host:
            assert host.version is CgroupVersion.HOST
            state = host.read()
            assert state == MemoryState(
                usage=(2048000 - 512000) * 1024,
                working_set=(2048000 - 1024000) * 1024,
                limit=2048000 * 1024,
                machine=True,
            )
            assert state.headroom == 1024000 * 1024
            # The file is kept open and re-read: a change shows on the next read.
            path.write_text(MEMINFO.replace("1024000", "2000000"))
            assert host.read().working_set == 48000 * 1024

    def test_available_below_free(self, tmp_path: Path) -> None:
        """MemAvailable under MemFree (little cache, reserves subtracted): usage >= working set."""
        path = tmp_path / "meminfo"
        path.write_text("MemTotal: 1000 kB\nMemFree: 600 kB\nMemAvailable: 500 kB\n")
        with HostMemory.open(str(path)) as host:
            state = host.read()
        assert state.working_set == 500 * 1024
        assert state.usage == state.working_set
        assert "MemTotal" in HostMemory.open(str(path)).describe_limit()

    def test_missing_key(self, tmp_path: Path) -> None:
        """A meminfo without MemAvailable is MalformedFile."""
        path = tmp_path / "meminfo"
        path.write_text("MemTotal: 100 kB\nMemFree: 50 kB\n")
        with HostMemory.open(str(path)) as host, pytest.raises(MalformedFile, match="MemAvail"):
            host.read()

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is CgroupNotFound, also a FileNotFoundError."""
        with pytest.raises(FileNotFoundError):
            HostMemory.open(str(tmp_path / "nope"))

    def test_real_meminfo(self) -> None:
        """The real /proc/meminfo reads with ordered figures."""
        with HostMemory.open() as host:
            state = host.read()
        assert state.limit is not None
        assert 0 < state.working_set <= state.limit
        assert 0 < state.usage <= state.limit


def _write_v2_group(
    directory: Path,
    *,
    current: int = 50 * MiB,
    max_: str = "max",
    high: str = "max",
    inactive_file: int = 10 * MiB,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.current").write_text(f"{current}\n")
    (directory / "memory.max").write_text(f"{max_}\n")
    (directory / "memory.high").write_text(f"{high}\n")
    (directory / "memory.stat").write_text(
        f"anon {current - inactive_file}\nfile {inactive_file}\n"
        f"active_file 0\ninactive_file {inactive_file}\n"
    )
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    return directory


class TestCgroupV2Fixture:
    """CgroupV2 on fixture directories written by the test."""

    def test_no_limit(self, tmp_path: Path) -> None:
        """max everywhere: no limit; working set = current - inactive_file."""
        group = _write_v2_group(tmp_path / "g")
        with CgroupV2.open(str(group)) as source:
            assert source.version is CgroupVersion.V2
            assert source.read() == MemoryState(50 * MiB, 40 * MiB, None)

    def test_own_max(self, tmp_path: Path) -> None:
        """memory.max is the limit."""
        group = _write_v2_group(tmp_path / "g", max_=str(100 * MiB))
        with CgroupV2.open(str(group)) as source:
            assert source.read().limit == 100 * MiB

    def test_high_below_max(self, tmp_path: Path) -> None:
        """memory.high under memory.max is the wall to stay under."""
        group = _write_v2_group(tmp_path / "g", max_=str(100 * MiB), high=str(80 * MiB))
        with CgroupV2.open(str(group)) as source:
            assert source.read().limit == 80 * MiB

    def test_ancestor_limit(self, tmp_path: Path) -> None:
        """An ancestor's lower limit applies to the group."""
        parent = _write_v2_group(tmp_path / "p", max_=str(64 * MiB))
        middle = _write_v2_group(parent / "m", high=str(96 * MiB))
        child = _write_v2_group(middle / "c", max_=str(128 * MiB))
        with CgroupV2.open(str(child)) as source:
            assert source.read().limit == 64 * MiB
        with CgroupV2.open(str(middle)) as source:
            assert source.read().limit == 64 * MiB

    def test_own_limit_lower_than_ancestor(self, tmp_path: Path) -> None:
        """The group's own lower limit wins over an ancestor's."""
        parent = _write_v2_group(tmp_path / "p", max_=str(256 * MiB))
        child = _write_v2_group(parent / "c", high=str(32 * MiB))
        with CgroupV2.open(str(child)) as source:
            assert source.read().limit == 32 * MiB

    def test_parent_binds_when_siblings_fill_it(self, tmp_path: Path) -> None:
        """A parent's limit binds before the group's own lower one when siblings use the parent.

        The reading is then the parent's: its usage and working set against its limit.
        """
        parent = _write_v2_group(tmp_path / "p", max_=str(256 * MiB), current=230 * MiB)
        child = _write_v2_group(parent / "c", max_=str(128 * MiB))  # 50 MiB, 40 working set
        with CgroupV2.open(str(child)) as source:
            limit, state = source.binding()
            assert limit == Limit(256 * MiB, "memory.max", str(parent))
            assert state == MemoryState(230 * MiB, 220 * MiB, 256 * MiB)
            assert source.read() == state
            assert [each.group for each in source.limits()] == [str(child), str(parent)]
            text = source.describe_limit()
            assert f"memory.max of {parent}" in text and f"also {128 * MiB} bytes" in text

    def test_own_high_named(self, tmp_path: Path) -> None:
        """describe_limit names the file and group that bind; unlimited says so."""
        group = _write_v2_group(tmp_path / "g", max_=str(100 * MiB), high=str(80 * MiB))
        with CgroupV2.open(str(group)) as source:
            assert source.binding()[0] == Limit(80 * MiB, "memory.high", str(group))
            assert f"memory.high of {group}" in source.describe_limit()
        free = _write_v2_group(tmp_path / "free")
        with CgroupV2.open(str(free)) as source:
            assert source.binding() == (None, MemoryState(50 * MiB, 40 * MiB, None))
            assert "no memory.max or memory.high" in source.describe_limit()

    def test_ancestor_files_kept_open(self, tmp_path: Path) -> None:
        """An ancestor's files are kept open too: a changed limit shows on the next read."""
        parent = _write_v2_group(tmp_path / "p", max_=str(64 * MiB))
        child = _write_v2_group(parent / "c")
        with CgroupV2.open(str(child)) as source:
            assert source.read().limit == 64 * MiB
            kept = len(source._files)
            (parent / "memory.max").write_text(f"{96 * MiB}\n")
            assert source.read().limit == 96 * MiB
            assert len(source._files) == kept

    def test_walk_stops_at_the_root(self, tmp_path: Path) -> None:
        """Ancestors without memory.max (the root group, or outside the tree) are not read."""
        (tmp_path / "memory.high").write_text("1\n")  # a stray file above the tree
        child = _write_v2_group(tmp_path / "g", max_=str(100 * MiB))
        with CgroupV2.open(str(child)) as source:
            assert source.read().limit == 100 * MiB

    def test_rereads_kept_files(self, tmp_path: Path) -> None:
        """Changed files show on the next read."""
        group = _write_v2_group(tmp_path / "g", max_=str(100 * MiB))
        with CgroupV2.open(str(group)) as source:
            assert source.read().usage == 50 * MiB
            (group / "memory.current").write_text(f"{70 * MiB}\n")
            (group / "memory.max").write_text("max\n")
            state = source.read()
            assert state.usage == 70 * MiB
            assert state.limit is None

    def test_working_set_never_negative(self, tmp_path: Path) -> None:
        """inactive_file larger than current (racy reads) clamps to 0."""
        group = _write_v2_group(tmp_path / "g", current=MiB, inactive_file=2 * MiB)
        with CgroupV2.open(str(group)) as source:
            assert source.read().working_set == 0

    def test_events(self, tmp_path: Path) -> None:
        """events() reads memory.events counters."""
        group = _write_v2_group(tmp_path / "g")
        (group / "memory.events").write_text("low 1\nhigh 2\nmax 3\noom 4\noom_kill 5\n")
        with CgroupV2.open(str(group)) as source:
            assert source.events() == {"low": 1, "high": 2, "max": 3, "oom": 4, "oom_kill": 5}

    def test_not_a_group(self, tmp_path: Path) -> None:
        """A directory without memory.current is CgroupNotFound."""
        with pytest.raises(CgroupNotFound):
            CgroupV2.open(str(tmp_path))

    def test_malformed_limit(self, tmp_path: Path) -> None:
        """A garbled memory.max is MalformedFile."""
        group = _write_v2_group(tmp_path / "g", max_="lots")
        with CgroupV2.open(str(group)) as source, pytest.raises(MalformedFile):
            source.read()

    def test_malformed_current(self, tmp_path: Path) -> None:
        """A garbled memory.current is MalformedFile."""
        group = _write_v2_group(tmp_path / "g")
        (group / "memory.current").write_text("many\n")
        with CgroupV2.open(str(group)) as source, pytest.raises(MalformedFile):
            source.read()

    def test_close_twice(self, tmp_path: Path) -> None:
        """close() closes the kept files and can be called again."""
        group = _write_v2_group(tmp_path / "g")
        source = CgroupV2.open(str(group))
        source.read()
        fds = [kept.fd for kept in source._files.values()]
        assert fds
        source.close()
        source.close()
        for fd in fds:
            with pytest.raises(OSError) as info:
                os.fstat(fd)
            assert info.value.errno == errno.EBADF


class TestHostFallback:
    """No limit anywhere up the hierarchy: the machine's memory steers."""

    def _meminfo(self, tmp_path: Path) -> str:
        path = tmp_path / "meminfo"
        path.write_text(MEMINFO)
        return str(path)

    def test_unlimited_v2_group_reads_the_host(self, tmp_path: Path) -> None:
        """An unlimited group is wrapped; readings are the host's, marked as the machine's."""
        group = _write_v2_group(tmp_path / "g")
        source = with_host_fallback(CgroupV2.open(str(group)), self._meminfo(tmp_path))
        with source:
            assert isinstance(source, UnlimitedGroup)
            assert source.version is CgroupVersion.HOST
            assert source.group.path == str(group)
            state = source.read()
            assert state.machine
            assert state.limit == 2048000 * 1024
            assert state.working_set == (2048000 - 1024000) * 1024
            text = source.describe_limit()
            assert "no memory.max or memory.high" in text and "MemAvailable" in text

    def test_limit_set_later_is_the_groups(self, tmp_path: Path) -> None:
        """Once a limit appears on the group, readings are the group's again."""
        group = _write_v2_group(tmp_path / "g")
        with with_host_fallback(CgroupV2.open(str(group)), self._meminfo(tmp_path)) as source:
            (group / "memory.max").write_text(f"{100 * MiB}\n")
            state = source.read()
            assert state == MemoryState(50 * MiB, 40 * MiB, 100 * MiB)
            assert f"memory.max of {group}" in source.describe_limit()

    def test_limited_group_is_kept(self, tmp_path: Path) -> None:
        """A group with a limit is returned as it is."""
        group = _write_v2_group(tmp_path / "g", max_=str(100 * MiB))
        source = with_host_fallback(CgroupV2.open(str(group)), self._meminfo(tmp_path))
        with source:
            assert isinstance(source, CgroupV2)

    def test_host_is_kept(self, tmp_path: Path) -> None:
        """The host source is returned as it is."""
        host = HostMemory.open(self._meminfo(tmp_path))
        assert with_host_fallback(host) is host
        host.close()

    def test_close_closes_both(self, tmp_path: Path) -> None:
        """Closing the wrapper closes the group's and the host's files; twice is fine."""
        group = _write_v2_group(tmp_path / "g")
        source = with_host_fallback(CgroupV2.open(str(group)), self._meminfo(tmp_path))
        assert isinstance(source, UnlimitedGroup)
        source.read()
        fds = [kept.fd for each in (source.group, source.host) for kept in each._files.values()]
        source.close()
        source.close()
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)

    def test_open_group(self, tmp_path: Path) -> None:
        """open_group tells v2 from v1 by their files; neither is CgroupNotFound."""
        group = _write_v2_group(tmp_path / "g")
        with open_group(str(group)) as source:
            assert isinstance(source, CgroupV2)
        (tmp_path / "v1").mkdir()
        (tmp_path / "v1" / "memory.usage_in_bytes").write_text("1\n")
        with open_group(str(tmp_path / "v1")) as source:
            assert isinstance(source, CgroupV1)
        with pytest.raises(CgroupNotFound):
            open_group(str(tmp_path))


class TestManagedCgroupV2Pure:
    """ManagedCgroupV2 checks that need no kernel."""

    @pytest.mark.parametrize(("limit", "high"), [(0, None), (-1, None), (MiB, 0)])
    def test_limits_must_be_positive(self, tmp_path: Path, limit: int, high: int | None) -> None:
        """A non-positive limit is refused before anything is created."""
        with pytest.raises(ValueError):
            ManagedCgroupV2.create("g", limit, parent=str(tmp_path), high=high)
        assert not (tmp_path / "g").exists()

    def test_no_memory_controller(self, tmp_path: Path) -> None:
        """A parent whose children get no memory files: UnsupportedError naming the fix."""
        with pytest.raises(UnsupportedError, match=r"\+memory"):
            ManagedCgroupV2.create("g", None, parent=str(tmp_path))
        assert not (tmp_path / "g").exists()


class TestKernelFile:
    """KernelFile on regular files."""

    def test_read_int_and_text(self, tmp_path: Path) -> None:
        """read_int strips whitespace; read_text reads from the start each time."""
        path = tmp_path / "n"
        path.write_text("42\n")
        kept = KernelFile.open(str(path))
        try:
            assert kept.read_int() == 42
            assert kept.read_text() == "42\n"
        finally:
            kept.close()
            kept.close()
        assert kept.fd == -1

    @pytest.mark.parametrize("content", [b"forty\n", b"", b"4 2\n"])
    def test_not_a_number(self, tmp_path: Path, content: bytes) -> None:
        """A non-number is MalformedFile naming the path."""
        path = tmp_path / "n"
        path.write_bytes(content)
        kept = KernelFile.open(str(path))
        try:
            with pytest.raises(MalformedFile, match="/n"):
                kept.read_int()
        finally:
            kept.close()

    def test_not_ascii(self, tmp_path: Path) -> None:
        """Non-ASCII content is MalformedFile."""
        path = tmp_path / "n"
        path.write_bytes(b"\xff\n")
        kept = KernelFile.open(str(path))
        try:
            with pytest.raises(MalformedFile):
                kept.read_text()
        finally:
            kept.close()

    def test_missing(self, tmp_path: Path) -> None:
        """A missing file is CgroupNotFound (a FileNotFoundError) carrying ENOENT."""
        with pytest.raises(CgroupNotFound) as info:
            KernelFile.open(str(tmp_path / "missing"))
        assert isinstance(info.value, FileNotFoundError)
        assert info.value.errno == errno.ENOENT


class TestMemorySourceOfFixture:
    """memory_source_of on a fixture /proc directory."""

    def _proc(self, tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
        pid_dir = tmp_path / "proc" / "7"
        pid_dir.mkdir(parents=True)
        (pid_dir / "cgroup").write_text(cgroup)
        (pid_dir / "mountinfo").write_text(mountinfo)
        (tmp_path / "proc" / "meminfo").write_text(MEMINFO)
        return tmp_path / "proc"

    def test_no_cgroup_means_host(self, tmp_path: Path) -> None:
        """Without cgroup mounts the host's meminfo is the source."""
        proc = self._proc(tmp_path, "0::/\n", NO_CGROUP_MOUNTINFO)
        source = memory_source_of(7, proc=str(proc))
        try:
            assert isinstance(source, HostMemory)
            assert source.read().limit == 2048000 * 1024
        finally:
            source.close()

    def test_v2_without_memory_controller_means_host(self, tmp_path: Path) -> None:
        """A v2 group with no memory.current falls back to the host."""
        mountinfo = f"24 1 0:22 / {tmp_path / 'cg'} rw - cgroup2 cgroup2 rw\n"
        (tmp_path / "cg" / "app").mkdir(parents=True)
        proc = self._proc(tmp_path, "0::/app\n", mountinfo)
        source = memory_source_of(7, proc=str(proc))
        try:
            assert isinstance(source, HostMemory)
        finally:
            source.close()

    def test_v2_group(self, tmp_path: Path) -> None:
        """A v2 group with memory files is opened as CgroupV2."""
        mountinfo = f"24 1 0:22 / {tmp_path / 'cg'} rw - cgroup2 cgroup2 rw\n"
        _write_v2_group(tmp_path / "cg" / "app", max_=str(64 * MiB))
        proc = self._proc(tmp_path, "0::/app\n", mountinfo)
        source = memory_source_of(7, proc=str(proc))
        try:
            assert isinstance(source, CgroupV2)
            assert source.path == str(tmp_path / "cg" / "app")
            assert source.read().limit == 64 * MiB
        finally:
            source.close()

    def test_missing_pid(self, tmp_path: Path) -> None:
        """A missing /proc entry is CgroupNotFound."""
        with pytest.raises(CgroupNotFound):
            memory_source_of(1, proc=str(tmp_path))

    def test_malformed_proc(self, tmp_path: Path) -> None:
        """Garbled /proc/<pid>/cgroup is MalformedFile."""
        proc = self._proc(tmp_path, "nonsense\n", NO_CGROUP_MOUNTINFO)
        with pytest.raises(MalformedFile):
            memory_source_of(7, proc=str(proc))


class TestManagedCgroupV1Pure:
    """ManagedCgroupV1 argument checks that need no kernel."""

    @pytest.mark.parametrize("limit", [0, -1])
    def test_limit_must_be_positive(self, tmp_path: Path, limit: int) -> None:
        """A non-positive limit is refused before anything is created."""
        with pytest.raises(ValueError, match="limit"):
            ManagedCgroupV1.create("g", limit, parent=str(tmp_path))
        assert not (tmp_path / "g").exists()

    def test_missing_parent(self, tmp_path: Path) -> None:
        """A parent that does not exist is CgroupNotFound."""
        with pytest.raises(CgroupNotFound):
            ManagedCgroupV1.create("g", MiB, parent=str(tmp_path / "nope"))


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each is killed (by its Popen), its pipes closed, and reaped."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        reap(proc)


ALLOCATE_AND_WAIT = (
    "import sys\n"
    "b = bytearray(int(sys.argv[1]) << 20)\n"
    "for i in range(0, len(b), 4096): b[i] = 1\n"
    "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
    "sys.stdin.read()\n"
)


def _spawn_allocator(
    group: ManagedCgroupV1, mib: int, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    proc = group.spawn(
        [sys.executable, "-c", ALLOCATE_AND_WAIT, str(mib)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    started.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    return proc


@pytest.mark.v1
class TestCgroupV1Kernel:
    """CgroupV1 on real groups made by the v1_group fixture."""

    def test_empty_group(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """An empty group reads near-zero usage and its limit."""
        group = v1_group(64 * MiB)
        with CgroupV1.open(group.path) as source:
            assert source.version is CgroupVersion.V1
            state = source.read()
        assert state.limit == 64 * MiB
        assert 0 <= state.working_set <= state.usage < 4 * MiB

    def test_usage_of_a_child(
        self,
        v1_group: Callable[[int], ManagedCgroupV1],
        started: list[subprocess.Popen[bytes]],
    ) -> None:
        """A child allocating 40 MiB in the group shows in usage; working set <= usage."""
        group = v1_group(128 * MiB)
        with CgroupV1.open(group.path) as source:
            before = source.read()
            proc = _spawn_allocator(group, 40, started)
            during = source.read()
            assert during.usage >= before.usage + 40 * MiB
            assert during.usage < 128 * MiB
            assert 40 * MiB <= during.working_set <= during.usage
            assert during.limit == 128 * MiB
            assert during.headroom == 128 * MiB - during.working_set
            assert source.max_usage() >= during.usage
            assert source.oom_control()["oom_kill"] == 0
            # usage agrees with a fresh read of the same file (pread on the kept fd re-reads)
            assert abs(source.usage() - group.read_int("memory.usage_in_bytes")) < 4 * MiB
            proc.kill()
            proc.wait(timeout=10)
            assert _wait_until(lambda: source.usage() < 8 * MiB)

    def test_limit_from_ancestor(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """A child group with a higher own limit reads its parent's (hierarchical) limit."""
        parent = v1_group(48 * MiB)
        child = ManagedCgroupV1.create(f"child-{uuid.uuid4().hex[:8]}", 200 * MiB, parent.path)
        try:
            assert child.read_int("memory.limit_in_bytes") == 200 * MiB
            with CgroupV1.open(child.path) as source:
                assert source.read().limit == 48 * MiB
        finally:
            child.remove()

    def test_unlimited_group_reads_none(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """Writing -1 to the limit means no limit: limit None (unless an ancestor has one)."""
        group = v1_group(64 * MiB)
        group.write("memory.limit_in_bytes", "-1")
        assert group.read_int("memory.limit_in_bytes") >= UNLIMITED_THRESHOLD
        with CgroupV1.open(group.path) as source:
            # The fixture's groups sit right under the root, which has no limit.
            assert source.read().limit is None

    def test_missing_group(self, tmp_path: Path) -> None:
        """Opening a path that is no group is CgroupNotFound, also a FileNotFoundError."""
        need(v1_memory_available(), "needs a cgroup v1 memory hierarchy")
        missing = os.path.join(V1_MOUNT, f"pyshrinker-absent-{uuid.uuid4().hex[:12]}")
        with pytest.raises(CgroupNotFound) as info:
            CgroupV1.open(missing)
        assert isinstance(info.value, FileNotFoundError)
        with pytest.raises(FileNotFoundError):
            CgroupV1.open(str(tmp_path))

    def test_removed_while_open(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """Reading a kept-open file of a removed group is CgroupNotFound (ENODEV)."""
        group = v1_group(64 * MiB)
        source = CgroupV1.open(group.path)
        try:
            source.read()
            group.remove()
            assert not os.path.exists(group.path)
            with pytest.raises(CgroupNotFound) as info:
                source.usage()
            assert info.value.errno == errno.ENODEV
            assert isinstance(info.value, FileNotFoundError)
            with pytest.raises(CgroupNotFound):
                source.read()
        finally:
            source.close()

    def test_memory_source_of_self(self) -> None:
        """memory_source_of() finds the v1 group this process is in."""
        need(os.path.exists(os.path.join(V1_MOUNT, "memory.usage_in_bytes")), "needs cgroup v1")
        source = memory_source_of()
        try:
            assert isinstance(source, CgroupV1)
            with open(os.path.join(source.path, "cgroup.procs"), encoding="ascii") as f:
                assert str(os.getpid()) in f.read().split()
            state = source.read()
            assert state.usage > 0
        finally:
            source.close()

    def test_memory_source_of_child(
        self,
        v1_group: Callable[[int], ManagedCgroupV1],
        started: list[subprocess.Popen[bytes]],
    ) -> None:
        """memory_source_of(pid) finds the group a child was spawned into."""
        group = v1_group(64 * MiB)
        proc = _spawn_allocator(group, 1, started)
        source = memory_source_of(proc.pid)
        try:
            assert isinstance(source, CgroupV1)
            assert os.path.realpath(source.path) == os.path.realpath(group.path)
            assert source.read().limit == 64 * MiB
        finally:
            source.close()

    def test_v2_group_of_self(self) -> None:
        """v2_group_of() finds a directory of the cgroup2 mount holding this process."""
        v2 = v2_group_of()
        need(v2 is not None, "needs a cgroup2 mount")
        assert v2 is not None
        with open(os.path.join(v2, "cgroup.procs"), encoding="ascii") as f:
            assert str(os.getpid()) in f.read().split()


@pytest.mark.v1
class TestManagedCgroupV1Kernel:
    """ManagedCgroupV1: create, spawn inside, remove."""

    def test_create_sets_limit(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """The group exists with the asked limit."""
        group = v1_group(96 * MiB)
        assert os.path.isdir(group.path)
        assert group.read_int("memory.limit_in_bytes") == 96 * MiB
        assert group.pids() == []
        assert group.read_keyed("memory.oom_control")["oom_kill"] == 0

    def test_spawn_runs_inside(
        self,
        v1_group: Callable[[int], ManagedCgroupV1],
        started: list[subprocess.Popen[bytes]],
    ) -> None:
        """A spawned process is in the group from its start (its /proc/<pid>/cgroup says so)."""
        group = v1_group(64 * MiB)
        proc = _spawn_allocator(group, 1, started)
        assert group.pids() == [proc.pid]
        with open(f"/proc/{proc.pid}/cgroup", encoding="ascii") as f:
            lines = parse_proc_cgroup(f.read())
        (memory,) = [line for line in lines if "memory" in line.controllers]
        assert memory.path == "/" + os.path.relpath(group.path, V1_MOUNT)
        # The child ran python: its charge landed in the group, not elsewhere.
        assert group.read_int("memory.usage_in_bytes") > MiB

    def test_add_process(
        self,
        v1_group: Callable[[int], ManagedCgroupV1],
        started: list[subprocess.Popen[bytes]],
    ) -> None:
        """add_process moves a running child into the group."""
        first, second = v1_group(64 * MiB), v1_group(64 * MiB)
        proc = _spawn_allocator(first, 1, started)
        second.add_process(proc.pid)
        assert second.pids() == [proc.pid]
        assert first.pids() == []

    def test_remove_idempotent(self, v1_group: Callable[[int], ManagedCgroupV1]) -> None:
        """remove() removes the directory and may be called again."""
        group = v1_group(64 * MiB)
        group.remove()
        assert not os.path.exists(group.path)
        group.remove()
        assert not os.path.exists(group.path)

    def test_remove_already_gone(self) -> None:
        """remove() of a group someone else removed does not fail."""
        need(v1_memory_available(), "needs root and a cgroup v1 memory hierarchy")
        group = ManagedCgroupV1.create(f"pyshrinker-test-{uuid.uuid4().hex[:12]}", 32 * MiB)
        try:
            os.rmdir(group.path)
        finally:
            group.remove()
        group.remove()
        assert not os.path.exists(group.path)

    def test_context_manager(self) -> None:
        """Leaving the with block removes the group."""
        need(v1_memory_available(), "needs root and a cgroup v1 memory hierarchy")
        name = f"pyshrinker-test-{uuid.uuid4().hex[:12]}"
        group = ManagedCgroupV1.create(name, 32 * MiB)
        try:
            with group:
                assert os.path.isdir(group.path)
        finally:
            group.remove()
        assert not os.path.exists(os.path.join(V1_MOUNT, name))
