"""Finding and reading the memory cgroup a process lives in.

How the kernel lays this out:

* ``/proc/<pid>/cgroup`` has one line per hierarchy, ``id:controllers:path``. A cgroup v1
  hierarchy names its controllers (``4:memory:/a/b``); the v2 line is ``0::/a/b``.
* ``/proc/<pid>/mountinfo`` says where each hierarchy is mounted (field 5) and which part of it
  (field 4, the mount's root, not "/" inside a container); the fs type comes after ``-``.
* Reading a kept-open cgroup file with ``pread`` costs about 1 us; opening it again each time,
  about 11 us. When the cgroup is removed, its open files fail with ENODEV.
* A v1 group's effective limit, counting its ancestors, is ``hierarchical_memory_limit`` in
  ``memory.stat``. "No limit" reads as a huge number (PAGE_COUNTER_MAX pages), in v2 as ``max``.
* ``usage`` includes page cache, which the kernel can drop. The working set (usage minus inactive
  file pages) is what container tools report and what a shrinker should steer by.
* cgroup v2 (Documentation/admin-guide/cgroup-v2.rst): every non-root group has ``memory.max``
  (hard limit: reclaim, then the OOM killer) and ``memory.high`` (throttle and reclaim, never
  the OOM killer), each ``max`` when unset; a limit on any ancestor binds its descendants too.
  The root group has neither, nor ``memory.current``. Inside a cgroup namespace the mount shows
  the container's group as its root (``/proc/self/cgroup`` reads ``0::/``) and nothing above it.
* Neither v1's ``memory.stat`` nor v2 says "no limit" loudly: a group with no limit anywhere up
  its hierarchy (most processes on a host) is bounded only by the machine, so it is steered by
  ``/proc/meminfo``'s MemAvailable (:class:`UnlimitedGroup`).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import enum
import errno
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import attrs

if TYPE_CHECKING:
    import subprocess

from pyshrinker.errors import (
    CgroupError,
    CgroupNotFound,
    CgroupPermissionError,
    MalformedFile,
    UnsupportedError,
)

#: v1 reports "no limit" as PAGE_COUNTER_MAX pages; anything at or above this is unlimited.
UNLIMITED_THRESHOLD = 2**62

V1_MOUNT = "/sys/fs/cgroup/memory"
#: Where the unified hierarchy is mounted on a machine that has only cgroup v2.
V2_MOUNT = "/sys/fs/cgroup"
MEMINFO = "/proc/meminfo"


class CgroupVersion(enum.Enum):
    """Which kind of memory accounting a :class:`MemorySource` reads."""

    #: cgroup v1 memory controller (``memory.usage_in_bytes``...).
    V1 = "v1"
    #: cgroup v2 unified hierarchy (``memory.current``...).
    V2 = "v2"
    #: The whole machine (``/proc/meminfo``): no cgroup limit applies.
    HOST = "host"
    #: This process's resident memory against a budget the user set.
    BUDGET = "budget"


@attrs.frozen
class ProcCgroupLine:
    """One line of ``/proc/<pid>/cgroup``."""

    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str


@attrs.frozen
class Mount:
    """One cgroup mount from ``/proc/<pid>/mountinfo``."""

    root: str
    mount_point: str
    fs_type: str
    super_options: tuple[str, ...]


@attrs.frozen
class MemoryState:
    """One reading of a memory source, in bytes; ``limit`` is None when there is none."""

    usage: int
    working_set: int
    limit: int | None
    #: True when the limit is the whole machine's memory (no cgroup limit applies).
    machine: bool = False

    @property
    def headroom(self) -> int | None:
        """Bytes left before the limit (by working set), or None without a limit."""
        return None if self.limit is None else self.limit - self.working_set


@attrs.frozen
class Limit:
    """A memory limit and where it is set: ``file`` of the group at ``group``.

    .. versionadded:: 0.1.0
    """

    bytes: int
    file: str
    group: str

    def describe(self) -> str:
        """``"268435456 bytes, memory.max of /sys/fs/cgroup/app"``."""
        return f"{self.bytes} bytes, {self.file} of {self.group}"


def parse_proc_cgroup(text: str) -> list[ProcCgroupLine]:
    """Parse ``/proc/<pid>/cgroup``."""
    lines = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        parts = raw.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            raise MalformedFile(f"bad /proc/<pid>/cgroup line: {raw!r}")
        controllers = tuple(c for c in parts[1].split(",") if c)
        lines.append(ProcCgroupLine(int(parts[0]), controllers, parts[2]))
    return lines


def _unescape_mount_field(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse the cgroup and cgroup2 mounts out of ``/proc/<pid>/mountinfo``."""
    mounts = []
    for raw in text.splitlines():
        fields = raw.split()
        if not fields:
            continue
        try:
            sep = fields.index("-")
            if sep < 6:  # id, parent, dev, root, mount point, options come first
                raise ValueError(raw)
            root, mount_point = fields[3], fields[4]
            fs_type, super_options = fields[sep + 1], fields[sep + 3]
        except (ValueError, IndexError):
            raise MalformedFile(f"bad mountinfo line: {raw!r}") from None
        if fs_type not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            Mount(
                root=_unescape_mount_field(root),
                mount_point=_unescape_mount_field(mount_point),
                fs_type=fs_type,
                super_options=tuple(super_options.split(",")),
            )
        )
    return mounts


def parse_flat_keyed(text: str, what: str = "file") -> dict[str, int]:
    """Parse ``key value`` lines (``memory.stat``, ``memory.events``, ``memory.oom_control``)."""
    values = {}
    for raw in text.splitlines():
        parts = raw.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise MalformedFile(f"bad line in {what}: {raw!r}")
        try:
            values[parts[0]] = int(parts[1])
        except ValueError:
            raise MalformedFile(f"bad number in {what}: {raw!r}") from None
    return values


def pick_keyed(text: str, keys: Iterable[str], what: str = "file") -> dict[str, int]:
    """The values of ``keys`` among ``key value`` lines; keys absent are left out.

    For the controller's hot reads: v1's ``memory.stat`` has some 40 lines, and parsing them all
    (:func:`parse_flat_keyed`) was about a quarter of each reading (24 us, 19 us without), which
    a fast allocator makes every 4 MiB. Only the lines asked for are checked.
    """
    values = {}
    for key in keys:
        head = key + " "
        if text.startswith(head):
            at = 0
        else:
            at = text.find("\n" + head) + 1  # the line's start, 0 if there is none
            if at == 0:
                continue
        end = text.find("\n", at)
        line = text[at:] if end < 0 else text[at:end]
        try:
            values[key] = int(line[len(head) :])
        except ValueError:
            raise MalformedFile(f"bad number in {what}: {line!r}") from None
    return values


def parse_limit(text: str, what: str = "limit") -> int | None:
    """Parse a limit file: ``max`` or a huge v1 value mean no limit (None)."""
    value = text.strip()
    if value == "max":
        return None
    try:
        number = int(value)
    except ValueError:
        raise MalformedFile(f"bad {what}: {value!r}") from None
    if number < 0:
        raise MalformedFile(f"negative {what}: {number}")
    return None if number >= UNLIMITED_THRESHOLD else number


def _relative_to_mount(mount: Mount, cgroup_path: str) -> str:
    # Inside a cgroup namespace or a bind mount, the mount's root is a prefix of the path.
    root = mount.root.rstrip("/")
    if root and (cgroup_path == root or cgroup_path.startswith(root + "/")):
        cgroup_path = cgroup_path[len(root) :]
    rest = cgroup_path.lstrip("/")
    # The group at the mount's root is the mount point itself (no trailing slash).
    return os.path.join(mount.mount_point, rest) if rest else mount.mount_point


def locate_memory_cgroup(proc_cgroup: str, mountinfo: str) -> tuple[CgroupVersion, str] | None:
    """Find the directory of the memory cgroup from the two /proc files' text.

    Prefers the v1 memory controller when it is bound (as on this project's machines), else
    the v2 group when it has ``memory.current`` by the caller's check. Returns None if neither
    hierarchy is mounted.
    """
    lines = parse_proc_cgroup(proc_cgroup)
    mounts = parse_mountinfo(mountinfo)
    for line in lines:
        if "memory" in line.controllers:
            for mount in mounts:
                if mount.fs_type == "cgroup" and "memory" in mount.super_options:
                    return CgroupVersion.V1, _relative_to_mount(mount, line.path)
    for line in lines:
        if line.hierarchy_id == 0 and not line.controllers:
            for mount in mounts:
                if mount.fs_type == "cgroup2":
                    return CgroupVersion.V2, _relative_to_mount(mount, line.path)
    return None


def _translate(err: OSError, path: str) -> CgroupError:
    if err.errno in (errno.ENOENT, errno.ENODEV, errno.ENOTDIR):
        return CgroupNotFound(err.errno, f"cgroup file gone (cgroup removed?): {path}")
    if err.errno in (errno.EACCES, errno.EPERM):
        return CgroupPermissionError(err.errno, f"permission denied: {path}")
    return CgroupError(f"{path}: {err}")


@contextmanager
def translated_errors(path: str) -> Iterator[None]:
    """Turn OSErrors from cgroup file access into pyshrinker's cgroup errors."""
    try:
        yield
    except OSError as err:
        if isinstance(err, CgroupError):
            raise
        raise _translate(err, path) from err


@attrs.define(eq=False)
class KernelFile:
    """A kernel file kept open and re-read with ``pread`` (about 1 us a read)."""

    path: str
    fd: int

    @classmethod
    def open(cls, path: str, flags: int = os.O_RDONLY) -> KernelFile:
        """Open ``path``, raising :class:`CgroupNotFound` etc. on failure."""
        with translated_errors(path):
            return cls(path, os.open(path, flags | os.O_CLOEXEC))

    def read_text(self) -> str:
        """The file's whole content, read from offset 0."""
        with translated_errors(self.path):
            data = os.pread(self.fd, 65536, 0)
        try:
            return data.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedFile(f"{self.path} is not ASCII text") from None

    def read_int(self) -> int:
        """The file's content as one integer."""
        text = self.read_text().strip()
        try:
            return int(text)
        except ValueError:
            raise MalformedFile(f"{self.path}: expected a number, read {text!r}") from None

    def read_keyed(self) -> dict[str, int]:
        """The file's ``key value`` lines."""
        return parse_flat_keyed(self.read_text(), self.path)

    def read_values(self, keys: Iterable[str]) -> dict[str, int]:
        """The values of ``keys`` among the file's ``key value`` lines (see :func:`pick_keyed`)."""
        return pick_keyed(self.read_text(), keys, self.path)

    def close(self) -> None:
        """Close the fd; safe to call twice."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@attrs.define(eq=False)
class MemorySource:
    """Something with a memory usage and maybe a limit: a cgroup, the host, a budget."""

    version: CgroupVersion
    path: str
    _files: dict[str, KernelFile] = attrs.field(factory=dict, alias="files")
    _opening: threading.Lock = attrs.field(factory=threading.Lock, alias="opening")

    def _file(self, name: str) -> KernelFile:
        kept = self._files.get(name)
        if kept is None:
            # Opened on first use, once: readers on two threads must not both open (and leak).
            with self._opening:
                kept = self._files.get(name)
                if kept is None:
                    kept = self._files[name] = KernelFile.open(os.path.join(self.path, name))
        return kept

    def has_file(self, name: str) -> bool:
        """Whether this source's directory has ``name``."""
        return os.path.exists(os.path.join(self.path, name))

    def read(self) -> MemoryState:
        """Read usage, working set and limit now."""
        raise NotImplementedError

    def describe_limit(self) -> str:
        """One line saying where the limit comes from (read now), for ``pyshrinker status``."""
        raise NotImplementedError

    def close(self) -> None:
        """Close every kept-open file; safe to call twice."""
        for kept in self._files.values():
            kept.close()
        self._files.clear()

    def __enter__(self) -> MemorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: What a v1 reading needs of ``memory.stat``.
_V1_STAT_KEYS = ("total_inactive_file", "hierarchical_memory_limit")


@attrs.define(eq=False)
class CgroupV1(MemorySource):
    """A cgroup v1 memory group, read through kept-open files."""

    @classmethod
    def open(cls, path: str) -> CgroupV1:
        """Open the v1 memory group at ``path``; raises CgroupNotFound if it is not one."""
        source = cls(CgroupVersion.V1, path)
        source._file("memory.usage_in_bytes")
        return source

    def usage(self) -> int:
        """``memory.usage_in_bytes``: everything charged, page cache included."""
        return self._file("memory.usage_in_bytes").read_int()

    def stat(self) -> dict[str, int]:
        """``memory.stat`` as a dict."""
        return self._file("memory.stat").read_keyed()

    def read(self) -> MemoryState:
        usage = self.usage()
        stat = self._file("memory.stat").read_values(_V1_STAT_KEYS)
        try:
            inactive = stat["total_inactive_file"]
            limit_raw = stat["hierarchical_memory_limit"]
        except KeyError as missing:
            raise MalformedFile(f"{self.path}/memory.stat lacks {missing}") from None
        limit = None if limit_raw >= UNLIMITED_THRESHOLD else limit_raw
        return MemoryState(usage=usage, working_set=max(0, usage - inactive), limit=limit)

    def describe_limit(self) -> str:
        limit = self.read().limit
        if limit is None:
            return f"no limit on v1 group {self.path} or any ancestor"
        return f"{limit} bytes, hierarchical_memory_limit of {self.path} (its own or an ancestor's)"

    def max_usage(self) -> int:
        """``memory.max_usage_in_bytes``: the peak usage since creation or reset."""
        return self._file("memory.max_usage_in_bytes").read_int()

    def oom_control(self) -> dict[str, int]:
        """``memory.oom_control``: ``oom_kill_disable``, ``under_oom``, ``oom_kill``."""
        return self._file("memory.oom_control").read_keyed()


@attrs.define(eq=False)
class CgroupV2(MemorySource):
    """A cgroup v2 group with the memory controller enabled.

    Every ``memory.max`` and ``memory.high`` of the group and its ancestors (up to the root, or
    to the root a cgroup namespace shows) is a wall. An ancestor's usage counts its other
    children too, so the wall that binds is the one with the least room left: a reading gives
    that group's usage, working set and limit. Every file is kept open.
    """

    #: The group and the ancestors that have limit files, nearest first.
    ancestry: tuple[str, ...] = ()

    @classmethod
    def open(cls, path: str) -> CgroupV2:
        """Open the v2 group at ``path``; raises CgroupNotFound without ``memory.current``."""
        ancestry = [path]
        while True:
            parent = os.path.dirname(ancestry[-1])
            # The root group has no memory.max, nor has anything above the mount.
            if parent == ancestry[-1] or not os.path.exists(os.path.join(parent, "memory.max")):
                break
            ancestry.append(parent)
        source = cls(CgroupVersion.V2, path, ancestry=tuple(ancestry))
        source._file("memory.current")
        return source

    def _kept(self, directory: str, name: str) -> KernelFile:
        # An ancestor's file is kept under a name relative to the group ("../memory.max").
        return self._file(os.path.relpath(os.path.join(directory, name), self.path))

    def _own_limit(self, directory: str) -> Limit | None:
        found = None
        for name in ("memory.max", "memory.high"):
            kept = self._kept(directory, name)
            value = parse_limit(kept.read_text(), kept.path)
            if value is not None and (found is None or value < found.bytes):
                found = Limit(value, name, directory)
        return found

    def _usage_of(self, directory: str) -> tuple[int, int]:
        usage = self._kept(directory, "memory.current").read_int()
        stat = self._kept(directory, "memory.stat").read_values(("inactive_file",))
        inactive = stat.get("inactive_file", 0)
        return usage, max(0, usage - inactive)

    def limits(self) -> list[Limit]:
        """Each group's lower of memory.max and memory.high, where set, nearest group first."""
        found = (self._own_limit(directory) for directory in self.ancestry)
        return [limit for limit in found if limit is not None]

    def binding(self) -> tuple[Limit | None, MemoryState]:
        """The limit with the least room left now, and the reading of the group that sets it."""
        usage, working_set = self._usage_of(self.path)
        best: tuple[Limit | None, MemoryState] = (None, MemoryState(usage, working_set, None))
        for limit in self.limits():
            if limit.group == self.path:
                state = MemoryState(usage, working_set, limit.bytes)
            else:
                state = MemoryState(*self._usage_of(limit.group), limit.bytes)
            if best[0] is None or (state.headroom or 0) < (best[1].headroom or 0):
                best = (limit, state)
        return best

    def read(self) -> MemoryState:
        return self.binding()[1]

    def describe_limit(self) -> str:
        limit, state = self.binding()
        if limit is None:
            return f"no memory.max or memory.high on v2 group {self.path} or any ancestor"
        words = f"{limit.describe()} (working set there {state.working_set} bytes)"
        others = [each.describe() for each in self.limits() if each != limit]
        return words + (f"; also {', '.join(others)}" if others else "")

    def events(self) -> dict[str, int]:
        """``memory.events`` counters (low, high, max, oom, oom_kill)."""
        return self._file("memory.events").read_keyed()


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse ``/proc/meminfo`` into bytes."""
    values = {}
    for raw in text.splitlines():
        key, _, rest = raw.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            number = int(parts[0])
        except ValueError:
            raise MalformedFile(f"bad /proc/meminfo line: {raw!r}") from None
        values[key] = number * 1024 if len(parts) > 1 and parts[1] == "kB" else number
    return values


@attrs.define(eq=False)
class HostMemory(MemorySource):
    """The whole machine, from ``/proc/meminfo``: the limit is the RAM there is.

    The working set is what is not available (MemTotal - MemAvailable): MemAvailable counts free
    memory and the page cache and slab the kernel can reclaim, less its own reserves. With little
    page cache it can be below MemFree, so usage (MemTotal - MemFree) is never reported below
    the working set.
    """

    @classmethod
    def open(cls, path: str = MEMINFO) -> HostMemory:
        """Open ``/proc/meminfo`` (or a fixture file)."""
        source = cls(CgroupVersion.HOST, path)
        source._files["meminfo"] = KernelFile.open(path)
        return source

    def read(self) -> MemoryState:
        info = parse_meminfo(self._files["meminfo"].read_text())
        try:
            total, free, available = info["MemTotal"], info["MemFree"], info["MemAvailable"]
        except KeyError as missing:
            raise MalformedFile(f"/proc/meminfo lacks {missing}") from None
        working_set = max(0, total - available)
        return MemoryState(
            usage=max(total - free, working_set), working_set=working_set, limit=total, machine=True
        )

    def describe_limit(self) -> str:
        return f"{self.read().limit} bytes, MemTotal of {self.path} (steering by MemAvailable)"


@attrs.define(eq=False)
class UnlimitedGroup(MemorySource):
    """A memory cgroup with no limit on it or any ancestor: steered by the machine's memory.

    Most processes on a host are in such a group (the v1 root, a systemd slice without
    MemoryMax=), and nothing bounds them but the RAM there is. Readings are the host's until a
    limit appears on the group or an ancestor; from then on they are the group's.

    .. versionadded:: 0.1.0
    """

    group: CgroupV1 | CgroupV2 = attrs.field(kw_only=True)
    host: HostMemory = attrs.field(kw_only=True)

    @classmethod
    def wrap(cls, group: CgroupV1 | CgroupV2, meminfo: str = MEMINFO) -> UnlimitedGroup:
        """Steer ``group`` (which has no limit now) by ``meminfo``."""
        return cls(CgroupVersion.HOST, meminfo, group=group, host=HostMemory.open(meminfo))

    def read(self) -> MemoryState:
        own = self.group.read()
        return own if own.limit is not None else self.host.read()

    def describe_limit(self) -> str:
        if self.group.read().limit is not None:
            return self.group.describe_limit()
        return f"{self.group.describe_limit()}, so the machine's: {self.host.describe_limit()}"

    def close(self) -> None:
        self.group.close()
        self.host.close()


def memory_cgroup_of(
    pid: int | str = "self", proc: str = "/proc"
) -> tuple[CgroupVersion, str] | None:
    """The version and directory of the memory cgroup process ``pid`` is in, None if unmounted.

    Raises :class:`CgroupError` subclasses when the /proc files are missing or malformed.
    """
    base = os.path.join(proc, str(pid))
    texts = []
    for name in ("cgroup", "mountinfo"):
        path = os.path.join(base, name)
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except OSError as err:
            raise _translate(err, path) from err
    return locate_memory_cgroup(texts[0], texts[1])


def memory_source_of(
    pid: int | str = "self", proc: str = "/proc"
) -> CgroupV1 | CgroupV2 | HostMemory:
    """Open the memory cgroup process ``pid`` is in.

    The v1 memory group if the memory controller is bound to v1, else the v2 group if it has
    the memory controller, else the host (no memory cgroup, or the v2 root, which has no
    ``memory.current``). Raises :class:`CgroupError` subclasses when the /proc files are missing
    or malformed. :func:`steering_source_of` is what a controller steers by.
    """
    found = memory_cgroup_of(pid, proc)
    if found is not None:
        version, directory = found
        if version is CgroupVersion.V1:
            return CgroupV1.open(directory)
        if os.path.exists(os.path.join(directory, "memory.current")):
            return CgroupV2.open(directory)
    return HostMemory.open(os.path.join(proc, "meminfo"))


@attrs.define(eq=False)
class Membership:
    """The cgroups a process is in, re-read to see it moved (a pread, about 5 us).

    Moving a process (writing its pid to another group's ``cgroup.procs``) changes its
    ``/proc/<pid>/cgroup``; nothing notifies of it.
    """

    _kept: KernelFile = attrs.field(alias="kept")
    _seen: bytes = attrs.field(alias="seen")

    @classmethod
    def of(cls, pid: int | str = "self", proc: str = "/proc") -> Membership:
        """Start watching process ``pid``'s membership, as it is now."""
        kept = KernelFile.open(os.path.join(proc, str(pid), "cgroup"))
        membership = cls(kept=kept, seen=b"")
        membership.changed()
        return membership

    def changed(self) -> bool:
        """Whether the membership differs from the last call's (or the start's)."""
        with translated_errors(self._kept.path):
            now = os.pread(self._kept.fd, 65536, 0)
        if now == self._seen:
            return False
        self._seen = now
        return True

    def close(self) -> None:
        """Close the kept-open file; safe to call twice."""
        self._kept.close()


def with_host_fallback(
    source: CgroupV1 | CgroupV2 | HostMemory, meminfo: str = MEMINFO
) -> CgroupV1 | CgroupV2 | HostMemory | UnlimitedGroup:
    """``source``, or the machine's memory in its place when no cgroup limit applies to it."""
    if isinstance(source, HostMemory):
        return source
    try:
        unlimited = source.read().limit is None
        return UnlimitedGroup.wrap(source, meminfo) if unlimited else source
    except BaseException:
        source.close()
        raise


def steering_source_of(
    pid: int | str = "self", proc: str = "/proc"
) -> CgroupV1 | CgroupV2 | HostMemory | UnlimitedGroup:
    """The memory that bounds process ``pid``: its cgroup if a limit applies, else the machine."""
    return with_host_fallback(memory_source_of(pid, proc), os.path.join(proc, "meminfo"))


def open_group(path: str) -> CgroupV1 | CgroupV2:
    """Open the memory cgroup directory ``path``, v1 or v2 by the files it has."""
    if os.path.exists(os.path.join(path, "memory.usage_in_bytes")):
        return CgroupV1.open(path)
    if os.path.exists(os.path.join(path, "memory.current")):
        return CgroupV2.open(path)
    raise CgroupNotFound(errno.ENOENT, f"{path} is not a memory cgroup (v1 or v2)")


def v2_mount(proc: str = "/proc") -> str | None:
    """Where this process sees the cgroup v2 hierarchy mounted, if anywhere."""
    try:
        with open(os.path.join(proc, "self", "mountinfo"), encoding="utf-8") as f:
            mounts = parse_mountinfo(f.read())
    except OSError:
        return None
    return next((m.mount_point for m in mounts if m.fs_type == "cgroup2"), None)


def v2_memory_available(mount: str | None = None) -> bool:
    """Whether this process may create v2 groups with a memory limit under ``mount``.

    ``mount`` defaults to where cgroup2 is mounted; the memory controller must be enabled for
    its children (``+memory`` in its ``cgroup.subtree_control``).
    """
    mount = mount or v2_mount()
    if mount is None or not os.access(mount, os.W_OK):
        return False
    try:
        with open(os.path.join(mount, "cgroup.subtree_control"), encoding="ascii") as f:
            return "memory" in f.read().split()
    except OSError:
        return False


def v2_group_of(pid: int | str = "self", proc: str = "/proc") -> str | None:
    """The directory of the process's cgroup v2 group (for ``memory.pressure``), if mounted."""
    base = os.path.join(proc, str(pid))
    try:
        with open(os.path.join(base, "cgroup"), encoding="utf-8") as f:
            lines = parse_proc_cgroup(f.read())
        with open(os.path.join(base, "mountinfo"), encoding="utf-8") as f:
            mounts = parse_mountinfo(f.read())
    except OSError:
        return None
    for line in lines:
        if line.hierarchy_id == 0 and not line.controllers:
            for mount in mounts:
                if mount.fs_type == "cgroup2":
                    return _relative_to_mount(mount, line.path)
    return None


@attrs.define(eq=False)
class ManagedCgroup:
    """A memory group this process created; removed by :meth:`remove`.

    For tests, the demo and ``pyshrinker run``: it never touches groups it did not create.
    :class:`ManagedCgroupV1` and :class:`ManagedCgroupV2` say how a limit is set and read back.
    """

    path: str
    limit: int | None
    _removed: bool = attrs.field(default=False, alias="removed")

    #: Which hierarchy the group is in.
    version: ClassVar[CgroupVersion] = CgroupVersion.V1

    def write(self, name: str, value: str) -> None:
        """Write ``value`` to one of the group's files."""
        path = os.path.join(self.path, name)
        with translated_errors(path), open(path, "w", encoding="ascii") as f:
            f.write(value)

    def read_keyed(self, name: str) -> dict[str, int]:
        """Read one of the group's ``key value`` files."""
        path = os.path.join(self.path, name)
        with translated_errors(path), open(path, encoding="ascii") as f:
            return parse_flat_keyed(f.read(), path)

    def read_int(self, name: str) -> int:
        """Read one of the group's number files."""
        path = os.path.join(self.path, name)
        with translated_errors(path), open(path, encoding="ascii") as f:
            return int(f.read().strip())

    def peak(self) -> int:
        """The group's peak memory usage since it was created."""
        raise NotImplementedError

    def oom_kills(self) -> int:
        """How many processes the OOM killer ended in the group."""
        raise NotImplementedError

    def open_source(self) -> CgroupV1 | CgroupV2:
        """The group as a :class:`MemorySource` (kept-open files; close it)."""
        raise NotImplementedError

    def add_process(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group."""
        self.write("cgroup.procs", str(pid))

    def spawn(self, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the group from its first instruction.

        A small shell joins the group and then execs the command, so nothing is charged
        elsewhere and no ``preexec_fn`` runs in a threaded parent.
        """
        import subprocess  # here: a process that only reads its group need not import it

        procs = os.path.join(self.path, "cgroup.procs")
        shell = 'echo $$ > "$0" && exec "$@"'
        return subprocess.Popen(["/bin/sh", "-c", shell, procs, *argv], **popen_kwargs)

    def pids(self) -> list[int]:
        """The processes in the group now."""
        path = os.path.join(self.path, "cgroup.procs")
        with translated_errors(path), open(path, encoding="ascii") as f:
            return [int(line) for line in f if line.strip()]

    def remove(self) -> None:
        """Remove the group once it is empty; safe to call twice.

        A group whose last process just exited can be briefly busy (EBUSY); retried a while.
        """
        if self._removed:
            return
        import time

        deadline = time.monotonic() + 5.0
        while True:
            try:
                os.rmdir(self.path)
                break
            except FileNotFoundError:
                break
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise _translate(err, self.path) from err
                time.sleep(0.01)
        self._removed = True

    def __enter__(self: _M) -> _M:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


_M = TypeVar("_M", bound=ManagedCgroup)


def _make_group(cls: type[_M], path: str, limit: int | None, settings: dict[str, str]) -> _M:
    with translated_errors(path):
        os.mkdir(path)
    group = cls(path, limit)
    try:
        for name, value in settings.items():
            group.write(name, value)
    except BaseException:
        group.remove()
        raise
    return group


@attrs.define(eq=False)
class ManagedCgroupV1(ManagedCgroup):
    """A v1 memory group this process created, with ``memory.limit_in_bytes``."""

    @classmethod
    def create(cls, name: str, limit: int, parent: str = V1_MOUNT) -> ManagedCgroupV1:
        """Create ``parent/name`` with ``memory.limit_in_bytes = limit``."""
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        return _make_group(
            cls, os.path.join(parent, name), limit, {"memory.limit_in_bytes": str(limit)}
        )

    def peak(self) -> int:
        return self.read_int("memory.max_usage_in_bytes")

    def oom_kills(self) -> int:
        return self.read_keyed("memory.oom_control").get("oom_kill", 0)

    def open_source(self) -> CgroupV1:
        return CgroupV1.open(self.path)


@attrs.define(eq=False)
class ManagedCgroupV2(ManagedCgroup):
    """A cgroup v2 group this process created, with ``memory.max`` (and ``memory.high``).

    ``limit`` None leaves ``memory.max`` unset (``max``): the group is bounded by its parent.
    """

    version: ClassVar[CgroupVersion] = CgroupVersion.V2

    @classmethod
    def create(
        cls, name: str, limit: int | None, parent: str | None = None, high: int | None = None
    ) -> ManagedCgroupV2:
        """Create ``parent/name`` (parent: the cgroup2 mount) with ``memory.max = limit``."""
        for what, value in (("limit", limit), ("high", high)):
            if value is not None and value <= 0:
                raise ValueError(f"{what} must be positive, got {value}")
        parent = parent or v2_mount() or V2_MOUNT
        settings = {"memory.max": str(limit)} if limit is not None else {}
        if high is not None:
            settings["memory.high"] = str(high)
        path = os.path.join(parent, name)
        group = _make_group(cls, path, limit, settings)
        if not os.path.exists(os.path.join(path, "memory.current")):
            group.remove()
            raise UnsupportedError(
                errno.EOPNOTSUPP,
                f"the memory controller is not enabled for the children of {parent} "
                f"(echo +memory > {parent}/cgroup.subtree_control)",
            )
        return group

    def peak(self) -> int:
        return self.read_int("memory.peak")

    def oom_kills(self) -> int:
        return self.read_keyed("memory.events").get("oom_kill", 0)

    def open_source(self) -> CgroupV2:
        return CgroupV2.open(self.path)


def managed_cgroup_class() -> type[ManagedCgroupV1] | type[ManagedCgroupV2] | None:
    """Which kind of memory group this process may create here: v1 first, else v2, else None."""
    if v1_memory_available():
        return ManagedCgroupV1
    if v2_memory_available():
        return ManagedCgroupV2
    return None


def v1_memory_available(mount: str = V1_MOUNT) -> bool:
    """Whether a v1 memory hierarchy is mounted at ``mount`` and this process may create groups."""
    return os.path.exists(os.path.join(mount, "memory.limit_in_bytes")) and os.access(
        mount, os.W_OK
    )


__all__ = [
    "CgroupV1",
    "CgroupV2",
    "CgroupVersion",
    "HostMemory",
    "KernelFile",
    "Limit",
    "ManagedCgroup",
    "ManagedCgroupV1",
    "ManagedCgroupV2",
    "MemorySource",
    "MemoryState",
    "UnlimitedGroup",
    "locate_memory_cgroup",
    "managed_cgroup_class",
    "memory_cgroup_of",
    "memory_source_of",
    "open_group",
    "parse_flat_keyed",
    "parse_limit",
    "parse_meminfo",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "pick_keyed",
    "steering_source_of",
    "v1_memory_available",
    "v2_group_of",
    "v2_memory_available",
    "v2_mount",
    "with_host_fallback",
]
