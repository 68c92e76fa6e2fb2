"""Helpers for the tests on a real cgroup v2 kernel (scripts/vm-test.sh's guest).

A container's shape, as Kubernetes and Docker give it to a service: its own cgroup namespace
(``/proc/self/cgroup`` reads ``0::/``), a fresh cgroup2 mounted read-only at /sys/fs/cgroup
showing the container's group as the root, and a non-root user with no capabilities.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from pyshrinker.cgroup import ManagedCgroup

#: Builds the controller this process would get and prints what it chose, as JSON.
PROBE = """
import json, sys
from pyshrinker.controller import Controller
budget = int(sys.argv[1]) if len(sys.argv) > 1 else None
controller = Controller.for_current_process(budget=budget).start()
marks = controller.watermarks
print(json.dumps({
    "version": controller.memory.version.value,
    "path": controller.memory.path,
    "limit_from": controller.memory.describe_limit(),
    "signals": controller.describe_signals(),
    "unavailable": controller.unavailable,
    "marks": None if marks is None else [marks.limit, marks.high, marks.low],
}))
controller.close()
"""

#: The unprivileged user the container runs as.
CONTAINER_UID = 65534

# $1: the group; the rest: the command. unshare makes the namespaces after the shell joined the
# group (so the namespace's root is that group); the inner shell replaces the cgroup mount with
# a fresh read-only one, seen from inside the namespace, then drops to the user ({user}: the
# setpriv command, or nothing to stay root).
_CONTAINER_SHELL = (
    'echo $$ > "$1/cgroup.procs" && shift && '
    "exec unshare --cgroup --mount /bin/sh -c '"
    "umount -l /sys/fs/cgroup && "
    "mount -t cgroup2 -o ro,nosuid,nodev,noexec cgroup2 /sys/fs/cgroup && "
    'exec {user} "$@"'
    '\' sh "$@"'
)
_SETPRIV = f"setpriv --reuid={CONTAINER_UID} --regid={CONTAINER_UID} --clear-groups --"


def spawn_in_container(
    group: ManagedCgroup, argv: list[str], *, root: bool = False, **popen_kwargs: Any
) -> subprocess.Popen[Any]:
    """Start ``argv`` in ``group``, shaped as a container (namespace, read-only, non-root).

    ``root`` keeps the user root, with its capabilities, as many container images run.
    """
    shell = _CONTAINER_SHELL.format(user="" if root else _SETPRIV)
    return subprocess.Popen(["/bin/sh", "-c", shell, "sh", group.path, *argv], **popen_kwargs)


def run_in_container(
    group: ManagedCgroup, argv: list[str], timeout: float, *, root: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``group`` shaped as a container; capture its output as text."""
    proc = spawn_in_container(
        group, argv, root=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return communicate(proc, timeout)


def run_in_group(
    group: ManagedCgroup, argv: list[str], timeout: float, **popen_kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``group`` (from its first instruction); capture its output as text."""
    proc = group.spawn(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs
    )
    return communicate(proc, timeout)


def probe(group: ManagedCgroup, *args: str, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """What Controller.for_current_process() picks in a process inside ``group``.

    ``args``: the budget, if any; ``prefix``: a command that runs the probe (``unshare ...``).
    """
    done = run_in_group(group, [*prefix, sys.executable, "-c", PROBE, *args], timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def communicate(proc: subprocess.Popen[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Wait for ``proc``'s output and exit (killing it after ``timeout`` seconds)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
