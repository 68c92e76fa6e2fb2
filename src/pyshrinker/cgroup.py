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

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import enum
import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from pyshrinker.errors import (
    CgroupError,
    CgroupNotFound,
    CgroupPermissionError,
    MalformedFile,
)

#: v1 reports "no limit" as PAGE_COUNTER_MAX pages; anything at or above this is unlimited.
UNLIMITED_THRESHOLD = 2**62

V1_MOUNT = "/sys/fs/cgroup/memory"


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

    @property
    def headroom(self) -> int | None:
        """Bytes left before the limit (by working set), or None without a limit."""
        return None if self.limit is None else self.limit - self.working_set


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

    def close(self) -> None:
        """Close every kept-open file; safe to call twice."""
        for kept in self._files.values():
            kept.close()
        self._files.clear()

    def __enter__(self) -> MemorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        stat = self.stat()
        try:
            inactive = stat["total_inactive_file"]
            limit_raw = stat["hierarchical_memory_limit"]
        except KeyError as missing:
            raise MalformedFile(f"{self.path}/memory.stat lacks {missing}") from None
        limit = None if limit_raw >= UNLIMITED_THRESHOLD else limit_raw
        return MemoryState(usage=usage, working_set=max(0, usage - inactive), limit=limit)

    def max_usage(self) -> int:
        """``memory.max_usage_in_bytes``: the peak usage since creation or reset."""
        return self._file("memory.max_usage_in_bytes").read_int()

    def oom_control(self) -> dict[str, int]:
        """``memory.oom_control``: ``oom_kill_disable``, ``under_oom``, ``oom_kill``."""
        return self._file("memory.oom_control").read_keyed()


@attrs.define(eq=False)
class CgroupV2(MemorySource):
    """A cgroup v2 group with the memory controller enabled."""

    @classmethod
    def open(cls, path: str) -> CgroupV2:
        """Open the v2 group at ``path``; raises CgroupNotFound without ``memory.current``."""
        source = cls(CgroupVersion.V2, path)
        source._file("memory.current")
        return source

    def _limit_of(self, directory: str) -> int | None:
        limits = []
        for name in ("memory.max", "memory.high"):
            path = os.path.join(directory, name)
            if directory == self.path:
                text = self._file(name).read_text()
            else:
                try:
                    with open(path, encoding="ascii") as f:
                        text = f.read()
                except FileNotFoundError:
                    continue
                except OSError as err:
                    raise _translate(err, path) from err
            value = parse_limit(text, path)
            if value is not None:
                limits.append(value)
        return min(limits) if limits else None

    def read(self) -> MemoryState:
        usage = self._file("memory.current").read_int()
        stat = self._file("memory.stat").read_keyed()
        inactive = stat.get("inactive_file", 0)
        # memory.high throttles and memory.max kills; either is a wall to stay under, and an
        # ancestor's wall counts too.
        limits = []
        directory = self.path
        while True:
            own = self._limit_of(directory)
            if own is not None:
                limits.append(own)
            parent = os.path.dirname(directory)
            if parent == directory or not os.path.exists(os.path.join(parent, "memory.max")):
                break
            directory = parent
        limit = min(limits) if limits else None
        return MemoryState(usage=usage, working_set=max(0, usage - inactive), limit=limit)

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
    """The whole machine, from ``/proc/meminfo``: the limit is the RAM there is."""

    @classmethod
    def open(cls, path: str = "/proc/meminfo") -> HostMemory:
        """Open ``/proc/meminfo`` (or a fixture file)."""
        source = cls(CgroupVersion.HOST, os.path.dirname(path))
        source._files["meminfo"] = KernelFile.open(path)
        return source

    def read(self) -> MemoryState:
        info = parse_meminfo(self._files["meminfo"].read_text())
        try:
            total, free, available = info["MemTotal"], info["MemFree"], info["MemAvailable"]
        except KeyError as missing:
            raise MalformedFile(f"/proc/meminfo lacks {missing}") from None
        return MemoryState(usage=total - free, working_set=total - available, limit=total)


def memory_source_of(
    pid: int | str = "self", proc: str = "/proc"
) -> CgroupV1 | CgroupV2 | HostMemory:
    """Open the memory accounting that limits process ``pid``.

    The v1 memory group if the memory controller is bound to v1, else the v2 group if it has
    the memory controller, else the host. Raises :class:`CgroupError` subclasses when the
    /proc files are missing or malformed.
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
    found = locate_memory_cgroup(texts[0], texts[1])
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
class ManagedCgroupV1:
    """A v1 memory group this process created, with a limit; removed by :meth:`remove`.

    For tests, the demo and ``pyshrinker run``: it never touches groups it did not create.
    """

    path: str
    limit: int
    _removed: bool = attrs.field(default=False, alias="removed")

    @classmethod
    def create(cls, name: str, limit: int, parent: str = V1_MOUNT) -> ManagedCgroupV1:
        """Create ``parent/name`` with ``memory.limit_in_bytes = limit``."""
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        path = os.path.join(parent, name)
        with translated_errors(path):
            os.mkdir(path)
        group = cls(path, limit)
        try:
            group.write("memory.limit_in_bytes", str(limit))
        except BaseException:
            group.remove()
            raise
        return group

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

    def add_process(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group."""
        self.write("cgroup.procs", str(pid))

    def spawn(self, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the group from its first instruction.

        A small shell joins the group and then execs the command, so nothing is charged
        elsewhere and no ``preexec_fn`` runs in a threaded parent.
        """
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

    def __enter__(self) -> ManagedCgroupV1:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


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
    "ManagedCgroupV1",
    "MemorySource",
    "MemoryState",
    "locate_memory_cgroup",
    "memory_source_of",
    "parse_flat_keyed",
    "parse_limit",
    "parse_meminfo",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "v1_memory_available",
    "v2_group_of",
]
