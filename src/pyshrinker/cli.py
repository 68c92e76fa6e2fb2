"""The ``pyshrinker`` command: status, watch, run, demo and daemon.

``pyshrinker status [--json]``
    The memory cgroup this process is in, its limit, usage and working set, PSI averages, and
    which signal sources an embedded controller would use (and why not the others).
``pyshrinker watch [--interval S] [--count N]``
    A live view: a line per interval with usage against the limit, and pressure levels and
    shrink requests as they happen, from a controller embedded in the command.
``pyshrinker run --memory SIZE [--json] [-o FILE] -- CMD ...``
    Runs CMD in a fresh memory group limited to SIZE (cgroup v1 where the memory controller is
    bound to v1, else cgroup v2's ``memory.max``; created and removed by the command), forwards
    SIGINT, SIGTERM, SIGHUP and SIGQUIT to it, and reports its peak memory, OOM kills and exit
    status on stderr. Exits with CMD's status (128 + signal if killed).
``pyshrinker demo [--memory 256M] [--total 8G] [--plot FILE.png] [--json]``
    The two-thread allocator in a limited cgroup, with pyshrinker and then without.
``pyshrinker daemon ...``
    The pyshrinkerd controller daemon (:mod:`pyshrinker.daemon`), loaded only when used.

Exit status: 0 success, 1 failure, 2 usage error, 130 interrupted (Ctrl-C); ``run`` exits
with its command's status. Errors are one line on stderr.

``status --json`` prints one JSON object (schema 1; sizes in bytes, ``null`` where none)::

    {
      "schema": 1,
      "pid": 1234,
      "memory": {"version": "v1" | "v2" | "host" | "budget", "path": "/sys/fs/cgroup/...",
                 "cgroup": "/sys/fs/cgroup/..." | null,
                 "limit_from": "268435456 bytes, memory.max of /sys/fs/cgroup/app ..."},
      "limit": 268435456 | null,
      "usage": 12345678,
      "working_set": 12000000,
      "headroom": 256435456 | null,
      "watermarks": {"high": 234881024, "low": 201326592} | null,
      "psi": {
        "system": {"path": "/proc/pressure/memory",
                   "some": {"avg10": 0.0, "avg60": 0.0, "avg300": 0.0, "total_us": 12},
                   "full": {...} | null} | null,
        "cgroup": {...same shape, the process's cgroup v2 memory.pressure...} | null
      },
      "signals": ["memory: v1 /sys/fs/cgroup/memory/...", "..."],
      "unavailable": {"psi": "cgroup v1 usage thresholds and levels are used instead"},
      "controller": {"state": "running", "pid": 4321, "followers": 3, "shrinkers": 5}
                    | {"state": "none" | "off" | "refused" | "unknown", "why": "..."}
    }

``memory.cgroup`` is the memory cgroup the process is in (null where there is none);
``memory.limit_from`` says where the limit comes from, or why the machine's memory is used;
``controller`` says which process runs the cgroup's elected controller (pyshrinker.shared).

``run --json`` reports one JSON object (schema 1) instead of the human line::

    {
      "schema": 1,
      "command": ["python", "-c", "..."],
      "cgroup": "/sys/fs/cgroup/memory/pyshrinker-run-...",
      "limit": 67108864,
      "peak_usage": 67108864,
      "oom_kill": 1,
      "signal": "SIGKILL" | null,
      "exit_status": 137,
      "seconds": 0.42,
      "leftovers_killed": 0
    }

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import queue
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from pyshrinker import __version__, demo, shared
from pyshrinker._argtypes import positive_int
from pyshrinker.abi import Level
from pyshrinker.cgroup import (
    V1_MOUNT,
    CgroupVersion,
    HostMemory,
    ManagedCgroup,
    MemorySource,
    UnlimitedGroup,
    managed_cgroup_class,
    steering_source_of,
    v2_group_of,
    v2_mount,
)
from pyshrinker.client import subscribe_levels
from pyshrinker.controller import Controller, ShrinkRequest, parse_size
from pyshrinker.errors import PyshrinkerError, TransportPermissionError, UnsupportedError
from pyshrinker.policy import Watermarks, usage_thresholds, watermarks
from pyshrinker.signals.psi import SYSTEM_MEMORY_PRESSURE, PsiLine, PsiStats, read_psi
from pyshrinker.transport import EmbeddedTransport

#: Version of the ``status --json`` and ``run --json`` objects; bumped on incompatible change.
JSON_SCHEMA = 1

#: Prefix of the groups ``pyshrinker run`` creates under the v1 memory mount (or cgroup2's).
RUN_GROUP_PREFIX = "pyshrinker-run-"

#: Signals ``pyshrinker run`` passes on to its command.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

#: ``si_code`` of a signal the kernel sent, e.g. the terminal's Ctrl-C to its foreground group.
_SI_KERNEL = 0x80

Handler = Callable[[argparse.Namespace], int]


class UsageError(PyshrinkerError):
    """Bad arguments found after parsing; exit status 2."""


def _size(text: str) -> int:
    """An argparse type: a positive size such as ``64M``."""
    try:
        value = parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


fmt = demo.format_bytes


# ---------------------------------------------------------------------- status


def _psi_json(line: PsiLine | None) -> dict[str, Any] | None:
    if line is None:
        return None
    return {
        "avg10": line.avg10,
        "avg60": line.avg60,
        "avg300": line.avg300,
        "total_us": line.total_us,
    }


def _psi_entry(path: str) -> dict[str, Any] | None:
    try:
        stats: PsiStats = read_psi(path)
    except (PyshrinkerError, OSError):
        return None
    return {"path": path, "some": _psi_json(stats.some), "full": _psi_json(stats.full)}


def _planned_signals(controller: Controller, limit: int | None) -> list[str]:
    """``describe_signals()`` as it will read once started.

    Before :meth:`Controller.start` a v1 controller has no usage thresholds yet (they follow
    the limit), so it reads as polling; show the two thresholds ``start()`` registers instead.
    """
    lines = controller.describe_signals()
    memory = controller.memory
    if memory is None or memory.version is not CgroupVersion.V1 or limit is None:
        return lines
    if any("usage threshold" in line for line in lines):
        return lines
    marks = Watermarks.for_limit(limit, controller.config.headroom)
    planned = [
        f"cgroup v1 usage threshold at {each} bytes ({memory.path})"
        for each in usage_thresholds(marks)
    ]
    kept = [line for line in lines if line != "adaptive polling of usage"]
    return kept[:1] + planned + kept[1:]


def _cgroup_of(memory: MemorySource) -> str | None:
    if isinstance(memory, UnlimitedGroup):
        return memory.group.path
    if isinstance(memory, HostMemory) or memory.version is CgroupVersion.BUDGET:
        return None
    return memory.path


def collect_status() -> dict[str, Any]:
    """The ``status --json`` object for this process."""
    controller = Controller.for_current_process()
    try:
        memory = controller.memory
        if memory is None:  # pragma: no cover - for_current_process always finds one
            raise PyshrinkerError("no memory source found")
        state = memory.read()
        signals = _planned_signals(controller, state.limit)
        unavailable = dict(controller.unavailable)
        version, path = memory.version.value, memory.path
        limit_from = memory.describe_limit()
        cgroup = _cgroup_of(memory)
        marks = None
        if state.limit is not None:
            marks = watermarks(state.limit, state.machine, controller.config.headroom)
    finally:
        controller.close()
    group = v2_group_of()
    cgroup_psi = _psi_entry(os.path.join(group, "memory.pressure")) if group else None
    return {
        "controller": _controller_status(),
        "schema": JSON_SCHEMA,
        "pid": os.getpid(),
        "memory": {"version": version, "path": path, "cgroup": cgroup, "limit_from": limit_from},
        "limit": state.limit,
        "usage": state.usage,
        "working_set": state.working_set,
        "headroom": state.headroom,
        "watermarks": {"high": marks.high, "low": marks.low} if marks is not None else None,
        "psi": {"system": _psi_entry(SYSTEM_MEMORY_PRESSURE), "cgroup": cgroup_psi},
        "signals": signals,
        "unavailable": unavailable,
    }


def _controller_status() -> dict[str, Any]:
    """Who runs this cgroup's controller (see pyshrinker.shared), as ``status`` reports it."""
    if not shared.election_enabled():
        return {"state": "off", "why": f"${shared.ELECTION_ENV} is off: one per process"}
    try:
        found = shared.probe()
    except TransportPermissionError as err:
        return {"state": "refused", "why": str(err)}
    except (PyshrinkerError, OSError) as err:
        return {"state": "unknown", "why": str(err)}
    if found is None:
        return {"state": "none", "why": "no process runs one now: the first cache will"}
    return {
        "state": "running",
        "pid": found["pid"],
        "followers": len(found["followers"]),
        "shrinkers": len(found["shrinkers"]),
    }


def _controller_text(entry: dict[str, Any]) -> str:
    if entry["state"] == "running":
        return (
            f"process {entry['pid']} runs it for this cgroup "
            f"(followed by {entry['followers']} other processes; {entry['shrinkers']} shrinkers)"
        )
    return f"{entry['state']}: {entry['why']}"


def _psi_text(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "not available"
    parts = []
    for kind in ("some", "full"):
        line = entry[kind]
        if line is not None:
            parts.append(
                f"{kind} avg10={line['avg10']:.2f} avg60={line['avg60']:.2f} "
                f"avg300={line['avg300']:.2f}"
            )
    return f"{'  '.join(parts)}  ({entry['path']})"


_VERSION_WORDS = {
    "v1": "cgroup v1",
    "v2": "cgroup v2",
    "host": "the whole machine (MemAvailable)",
    "budget": "process budget",
}


def _marks_text(status: dict[str, Any]) -> str:
    marks = status["watermarks"]
    if marks is None:
        return "none (no limit: nothing to steer by)"
    text = f"reclaim from {fmt(marks['high'])} of working set down to {fmt(marks['low'])}"
    if status["memory"]["version"] == "host":
        limit = status["limit"]
        text += (
            f"  (MemAvailable under {fmt(limit - marks['high'])}, "
            f"up to {fmt(limit - marks['low'])})"
        )
    return text


def format_status(status: dict[str, Any]) -> str:
    """The ``status`` report as text."""
    limit = status["limit"]
    usage, working_set = status["usage"], status["working_set"]

    def share(n: int) -> str:
        return f"  ({100 * n / limit:.1f} % of the limit)" if limit else ""

    memory = status["memory"]
    rows = [
        ("memory source", f"{_VERSION_WORDS[memory['version']]}  {memory['path']}"),
        ("cgroup", memory["cgroup"] or "none"),
        ("limit", fmt(limit) if limit is not None else "none"),
        ("limit from", memory["limit_from"]),
        ("usage", fmt(usage) + share(usage)),
        ("working set", f"{fmt(working_set)}{share(working_set)}  (usage minus inactive files)"),
        ("headroom", fmt(status["headroom"]) if status["headroom"] is not None else "-"),
        ("watermarks", _marks_text(status)),
        ("controller", _controller_text(status["controller"])),
        ("PSI system", _psi_text(status["psi"]["system"])),
        ("PSI cgroup v2", _psi_text(status["psi"]["cgroup"])),
    ]
    lines = [f"{name:<15}{value}" for name, value in rows]
    lines.append("signals an embedded controller uses here:")
    lines.extend(f"  {line}" for line in status["signals"])
    if status["unavailable"]:
        lines.append("not used, and why:")
        lines.extend(f"  {name}: {why}" for name, why in status["unavailable"].items())
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    """``pyshrinker status``."""
    status = collect_status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


# ---------------------------------------------------------------------- watch


def usage_bar(used: int, limit: int | None, width: int = 30) -> str:
    """``[########..............]  27 %`` for ``used`` of ``limit``, or an empty string."""
    if not limit:
        return ""
    fraction = used / limit
    filled = min(width, round(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:3.0f} %"


#: Seconds events are gathered before they are printed (levels come in bursts).
EVENT_BATCH = 0.2

#: A shrink request and the chunk size of the shrinker asked (0 if unknown).
RequestEvent = tuple[ShrinkRequest, int]


def describe_events(batch: Sequence[Level | RequestEvent]) -> list[str]:
    """Lines for a burst of level events and shrink requests, counted rather than repeated."""
    lines = []
    levels = [event for event in batch if isinstance(event, Level)]
    if levels:
        line = f"level {max(levels).label}"
        if len(levels) > 1:
            counts = ", ".join(
                f"{level.label} {levels.count(level)}" for level in Level if level in levels
            )
            line += f" ({len(levels)} events: {counts})"
        lines.append(line)
    requests = [event for event in batch if not isinstance(event, Level)]
    if len(requests) <= 3:
        for request, size in requests:
            amount = f" ({fmt(request.chunks * size)})" if size else ""
            lines.append(
                f"request {request.chunks} chunks{amount} from shrinker {request.key!r}"
                f" ({request.reason})"
            )
    else:
        chunks = sum(request.chunks for request, _ in requests)
        nbytes = sum(request.chunks * size for request, size in requests)
        keys = ", ".join(sorted({repr(request.key) for request, _ in requests}))
        reasons = ", ".join(sorted({request.reason for request, _ in requests}))
        amount = f" ({fmt(nbytes)})" if nbytes else ""
        lines.append(
            f"{len(requests)} requests: {chunks} chunks{amount} from shrinkers {keys} ({reasons})"
        )
    return lines


def cmd_watch(args: argparse.Namespace) -> int:
    """``pyshrinker watch``."""
    events: queue.Queue[Level | RequestEvent] = queue.Queue()
    out: TextIO = sys.stdout

    def stamp() -> str:
        return time.strftime("%H:%M:%S")

    controller = Controller.for_current_process()
    subscription = None
    reader = None
    try:

        def on_request(request: ShrinkRequest) -> None:
            size = next((s.chunk_size for s in controller.shrinkers() if s.key == request.key), 0)
            events.put((request, size))

        controller.add_request_hook(on_request)
        controller.start()
        subscription = subscribe_levels(
            events.put, Level.LOW, transport=EmbeddedTransport(controller)
        )
        reader = steering_source_of()
        where = f"{_VERSION_WORDS[reader.version.value]} {reader.path}"
        print(f"watching {where}; Ctrl-C to stop", file=out, flush=True)
        updates = 0
        deadline = time.monotonic()
        while args.count is None or updates < args.count:
            now = time.monotonic()
            if now >= deadline:
                state = reader.read()
                limit = f" of {fmt(state.limit)}" if state.limit is not None else " (no limit)"
                bar = usage_bar(state.usage, state.limit)
                print(
                    f"{stamp()}  usage {fmt(state.usage)}{limit} {bar}"
                    f"  working set {fmt(state.working_set)}",
                    file=out,
                    flush=True,
                )
                updates += 1
                deadline = now + args.interval
                continue
            try:
                batch = [events.get(timeout=deadline - now)]
            except queue.Empty:
                continue
            # Gather the rest of the burst, without delaying the next usage line.
            until = min(deadline, time.monotonic() + EVENT_BATCH)
            while (left := until - time.monotonic()) > 0:
                try:
                    batch.append(events.get(timeout=left))
                except queue.Empty:
                    break
            for line in describe_events(batch):
                print(f"{stamp()}  {line}", file=out, flush=True)
    finally:
        if subscription is not None:
            subscription.close()
        controller.close()
        if reader is not None:
            reader.close()
    return 0


# ---------------------------------------------------------------------- run


def _resolve(command: str) -> str | None:
    """Why ``command`` cannot be executed (None if it can)."""
    if "/" in command:
        if not os.path.exists(command):
            return f"no such file: {command}"
        if os.path.isdir(command) or not os.access(command, os.X_OK):
            return f"not executable: {command}"
        return None
    if shutil.which(command) is None:
        return f"command not found: {command}"
    return None


def _wait_forwarding(group: ManagedCgroup, command: list[str]) -> tuple[int, float]:
    """Start ``command`` in ``group``; pass on signals until it exits; (returncode, seconds).

    Signals are blocked and taken with ``sigtimedwait``, which tells who sent them: one the
    terminal sent (Ctrl-C reaches the whole foreground process group, the command included)
    is not sent again; one sent to this process alone (``kill``) is passed on.
    """
    early: list[int] = []

    def remember(signum: int, _frame: object) -> None:
        early.append(signum)

    # Handlers first, so a signal arriving before the block below is not lost; dispositions
    # that are caught are reset to default in the command by exec.
    # A signal ignored here (a background job of a script ignores SIGINT) stays ignored, in
    # the command too, as it would without pyshrinker.
    forwarded = [sig for sig in FORWARDED_SIGNALS if signal.getsignal(sig) != signal.SIG_IGN]
    old_handlers = {sig: signal.signal(sig, remember) for sig in forwarded}
    wanted = {*forwarded, signal.SIGCHLD}
    try:
        start = time.monotonic()
        proc = group.spawn(command)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        try:
            while True:
                while early:
                    proc.send_signal(early.pop(0))
                if proc.poll() is not None:
                    break
                info = signal.sigtimedwait(wanted, 0.5)
                if info is None or info.si_signo == signal.SIGCHLD:
                    continue
                if info.si_code == _SI_KERNEL:
                    continue  # from the terminal: the command got it too
                proc.send_signal(info.si_signo)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if proc.poll() is None:  # only on an error above
                proc.kill()
                proc.wait()
        return proc.returncode, time.monotonic() - start
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _kill_leftovers(group: ManagedCgroup) -> int:
    """SIGKILL what the command left running in the group; wait until it is empty."""
    killed: set[int] = set()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        pids = group.pids()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    return len(killed)


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def format_run_report(report: dict[str, Any]) -> str:
    """The ``run`` report as one line."""
    if report["signal"] == "SIGKILL" and report["oom_kill"]:
        outcome = "killed by the OOM killer (SIGKILL)"
    elif report["signal"]:
        outcome = f"killed by {report['signal']}"
    else:
        outcome = f"exited with status {report['exit_status']}"
    parts = [
        outcome,
        f"peak memory {fmt(report['peak_usage'])} of {fmt(report['limit'])}",
        f"oom_kill {report['oom_kill']}",
        f"{report['seconds']:.2f} s",
    ]
    if report["leftovers_killed"]:
        parts.append(f"{report['leftovers_killed']} leftover processes killed")
    parts.append(f"exit status {report['exit_status']}")
    return "pyshrinker run: " + "; ".join(parts)


def cmd_run(args: argparse.Namespace) -> int:
    """``pyshrinker run``."""
    command = list(args.command)
    if command and command[0] == "--":
        command.pop(0)
    if not command:
        raise UsageError("no command given (pyshrinker run --memory SIZE -- CMD ...)")
    problem = _resolve(command[0])
    if problem is not None:
        print(f"pyshrinker run: error: {problem}", file=sys.stderr)
        return 127 if "not found" in problem or "no such" in problem else 126
    kind = managed_cgroup_class()
    if kind is None:
        v2 = v2_mount() or "/sys/fs/cgroup"
        raise UnsupportedError(
            f"cannot create a memory cgroup: needs root and either the cgroup v1 memory "
            f"controller mounted at {V1_MOUNT} or cgroup v2 with the memory controller enabled "
            f"for children of {v2} (+memory in {v2}/cgroup.subtree_control)"
        )
    name = f"{RUN_GROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    group = kind.create(name, args.memory)
    emptied = False
    try:
        returncode, seconds = _wait_forwarding(group, command)
        peak = group.peak()
        oom_kill = group.oom_kills()
        leftovers = _kill_leftovers(group)
        emptied = True
    finally:
        if not emptied:
            _kill_leftovers(group)
        group.remove()
    signame = None
    if returncode < 0:
        try:
            signame = signal.Signals(-returncode).name
        except ValueError:
            signame = f"signal {-returncode}"
    report = {
        "schema": JSON_SCHEMA,
        "command": command,
        "cgroup": group.path,
        "limit": args.memory,
        "peak_usage": peak,
        "oom_kill": oom_kill,
        "signal": signame,
        "exit_status": exit_status(returncode),
        "seconds": round(seconds, 3),
        "leftovers_killed": leftovers,
    }
    text = json.dumps(report) if args.json else format_run_report(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text, file=sys.stderr, flush=True)
    return int(report["exit_status"])


# ---------------------------------------------------------------------- demo and daemon


def cmd_demo(args: argparse.Namespace) -> int:
    """``pyshrinker demo``."""
    return demo.run(args, args.parser)


def _load_daemon() -> Any:
    """Import :mod:`pyshrinker.daemon`; None if this installation has none."""
    try:
        return importlib.import_module("pyshrinker.daemon")
    except ModuleNotFoundError as err:
        if err.name == "pyshrinker.daemon":
            return None
        raise


DAEMON_MISSING = "the daemon is not part of this installation (no module pyshrinker.daemon)"


def _setup_daemon(parser: argparse.ArgumentParser) -> None:
    """Give the ``daemon`` subcommand its arguments, from pyshrinker.daemon if it is there."""
    try:
        module = _load_daemon()
    except ImportError as err:
        message = f"the daemon cannot be loaded: {err}"
        parser.description = f"{parser.description} Not available here: {message}."
        parser.set_defaults(handler=_unavailable(message))
        return
    if module is None:
        parser.description = f"{parser.description} Not available here: {DAEMON_MISSING}."
        parser.set_defaults(handler=_unavailable(DAEMON_MISSING))
        return
    summary = (module.__doc__ or "").strip().split("\n\n")[0]
    if summary:
        parser.description = summary
    module.add_arguments(parser)
    parser.set_defaults(handler=lambda args: int(module.run(args)))


def _unavailable(message: str) -> Handler:
    def handler(_args: argparse.Namespace) -> int:
        raise UnsupportedError(message)

    return handler


def _daemon_requested(argv: Sequence[str]) -> bool:
    """Whether the subcommand in ``argv`` is ``daemon`` (the top level takes no values)."""
    for word in argv:
        if word == "--":
            return False
        if not word.startswith("-"):
            return word == "daemon"
    return False


def _daemon_not_loaded(_args: argparse.Namespace) -> int:  # pragma: no cover - never chosen
    raise UsageError("internal error: daemon arguments were not loaded")


# ---------------------------------------------------------------------- the parser


def build_parser(load_daemon: bool = False) -> argparse.ArgumentParser:
    """The ``pyshrinker`` parser; ``load_daemon`` imports pyshrinker.daemon for its options."""
    parser = argparse.ArgumentParser(
        prog="pyshrinker",
        description="Memory pressure tools: see a process's memory cgroup and signals, run a "
        "command under a memory limit, watch pressure, and the demo.",
        epilog="Run 'pyshrinker COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"pyshrinker {__version__}")
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)

    def add(name: str, summary: str, description: str, handler: Handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    status = add(
        "status",
        "show this process's memory cgroup, limit, usage, PSI and signal sources",
        "Show the memory cgroup this process is in (version, path), its limit, usage and "
        "working set, PSI averages (system, and the cgroup v2 group's), and which signal\n"
        "sources an embedded controller would use, and why not the others.",
        cmd_status,
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (keys: schema, pid, memory, limit, usage, working_set, "
        "headroom, watermarks, psi, signals, unavailable; sizes in bytes, null when none)",
    )

    watch = add(
        "watch",
        "live view of usage against the limit, pressure levels and shrink requests",
        "Print a line per interval with usage against the limit, and pressure levels and\n"
        "shrink requests as they happen, from a controller embedded in this command.\n"
        "Requests appear only for shrinkers registered in this process. Ctrl-C stops.",
        cmd_watch,
    )
    watch.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between usage lines (default 1)",
    )
    watch.add_argument(
        "--count", type=positive_int, metavar="N", help="stop after N usage lines (default: never)"
    )

    run = add(
        "run",
        "run a command in a fresh memory-limited cgroup and report its peak and OOM kills",
        "Run CMD in a new memory group limited to SIZE (created and removed by this command;\n"
        "needs root): a cgroup v1 group where the memory controller is bound to v1, else a\n"
        "cgroup v2 group with memory.max (the memory controller must be enabled in the\n"
        "cgroup2 root's cgroup.subtree_control). SIGINT, SIGTERM, SIGHUP and SIGQUIT are\n"
        "passed on to CMD; processes CMD leaves behind in the group are killed when it exits.\n"
        "At the end, the group's peak memory (v1 memory.max_usage_in_bytes, v2 memory.peak),\n"
        "OOM kills (oom_kill of v1 memory.oom_control, v2 memory.events) and CMD's exit\n"
        "status are reported on stderr.\n\n"
        "Exit status: CMD's, or 128 + N if a signal N killed it (137 for an OOM kill);\n"
        "127 if CMD is not found, 126 if it is not executable, 1 if no group can be created.",
        cmd_run,
    )
    run.add_argument(
        "--memory",
        "-m",
        type=_size,
        required=True,
        metavar="SIZE",
        help="memory limit, e.g. 64M, 1.5G (powers of 1024)",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="report one JSON object (schema, command, cgroup, limit, peak_usage, oom_kill, "
        "signal, exit_status, seconds, leftovers_killed)",
    )
    run.add_argument(
        "--output", "-o", metavar="FILE", help="write the report to FILE instead of stderr"
    )
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    demo_parser = add(
        "demo",
        "the two-thread allocator in a limited cgroup, with pyshrinker and without",
        "Run the mempressure proposal's two-thread allocator in a memory-limited cgroup (v1,\n"
        "or v2 where that is what the machine has), first with pyshrinker (it must finish,\n"
        "never OOM-killed, under the limit), then with --no-shrinker (the OOM killer ends\n"
        "it). A progress line while each runs, a summary at the end. Exit status 0 when both\n"
        "behave so. Where no group can be created (not root, no memory controller to use),\n"
        "one run under a process budget instead.",
        cmd_demo,
    )
    demo.add_arguments(demo_parser)

    daemon = add(
        "daemon",
        "run the pyshrinkerd controller daemon",
        "Run the pyshrinkerd controller daemon.",
        _daemon_not_loaded,
    )
    if load_daemon:
        _setup_daemon(daemon)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``pyshrinker`` command with ``argv`` (default: the process's arguments)."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(load_daemon=_daemon_requested(args_list))
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as err:
        args.parser.print_usage(sys.stderr)
        print(f"pyshrinker {args.subcommand}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (pyshrinker watch | head): quiet, like a killed-by-SIGPIPE tool.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (PyshrinkerError, OSError) as err:
        print(f"pyshrinker {args.subcommand}: error: {err}", file=sys.stderr)
        return 1


__all__ = [
    "JSON_SCHEMA",
    "RUN_GROUP_PREFIX",
    "build_parser",
    "collect_status",
    "exit_status",
    "main",
    "usage_bar",
]
