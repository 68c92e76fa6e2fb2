"""The demo: the two-thread allocator in a memory-limited cgroup, with pyshrinker and without.

Each run creates a memory group with the limit (256 MiB by default; cgroup v1 where the memory
controller is bound to v1, else cgroup v2), starts ``python -m pyshrinker.allocator --total 8G``
in it, samples the group's usage every 10 ms from this process while it runs, reads the allocator's
trace (its shrink requests and progress), and removes the group. With pyshrinker the allocator
must finish, never OOM-killed, its peak usage under the limit; with ``--no-shrinker`` the
kernel's OOM killer ends it. ``--plot FILE.png`` draws both runs side by side (matplotlib,
the ``plot`` extra).

Where no group can be created (not root, no memory controller to use) it runs the allocator once,
under a process budget of the same size (``PYSHRINKER_BUDGET``), and says so.

Used by ``pyshrinker demo`` and ``examples/demo.py``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import argparse
import bisect
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from typing import Any, TextIO

import attrs

from pyshrinker.cgroup import CgroupVersion, ManagedCgroup, managed_cgroup_class
from pyshrinker.controller import parse_size
from pyshrinker.errors import PyshrinkerError, UnsupportedError
from pyshrinker.policy import Watermarks
from pyshrinker.signals.budget import ProcessBudget
from pyshrinker.signals.v1 import OomNotifier
from pyshrinker.signals.v2 import MemoryEventsWatcher

MiB = 1 << 20
GiB = 1 << 30

#: Seconds between two samples of the group's usage.
SAMPLE_INTERVAL = 0.01
#: Seconds between two progress updates.
PROGRESS_INTERVAL = 0.25

#: What to install for ``--plot``.
PLOT_EXTRA = "pip install 'pyshrinker[plot]'"


class PlotUnavailable(PyshrinkerError, ImportError):
    """``--plot`` was asked for but matplotlib is not installed."""


@attrs.frozen
class Progress:
    """Where a run is, for a progress line."""

    label: str
    seconds: float
    usage: int
    limit: int
    allocated: int
    requests: int


@attrs.define(eq=False)
class DemoRun:
    """One allocator run: its outcome, the group's figures and what was sampled."""

    label: str
    shrinker: bool
    limit: int
    total: int
    #: The cgroup the run had (removed since), or "" under a process budget.
    cgroup: str
    returncode: int
    #: ``oom_kill`` of the group's ``memory.oom_control`` (None under a process budget).
    oom_kill: int | None
    #: ``memory.max_usage_in_bytes`` (peak RSS under a process budget).
    max_usage: int
    seconds: float
    #: Seconds from start to the group's OOM notification, if one came.
    oom_at: float | None
    #: The allocator's JSON line (empty if it was killed before printing it).
    figures: dict[str, Any]
    #: ``(seconds since start, usage bytes)`` every :data:`SAMPLE_INTERVAL`.
    samples: list[tuple[float, int]]
    #: ``(seconds since start, chunks)`` for each shrink request.
    requests: list[tuple[float, int]]
    #: ``(seconds since start, bytes allocated so far)`` from the allocator's trace.
    allocated: list[tuple[float, int]]
    #: The controller's signals, as the allocator printed them (``; `` between them).
    signals: str
    stderr: str

    @property
    def oom_killed(self) -> bool:
        """Whether the run ended in an OOM kill."""
        return self.returncode == -signal.SIGKILL and bool(self.oom_kill)

    @property
    def outcome(self) -> str:
        """``exit status N`` or ``killed by SIG...``."""
        return describe_returncode(self.returncode)

    def to_json(self) -> dict[str, Any]:
        """The run's figures as a JSON object."""
        allocated = int(self.figures.get("allocated_bytes", 0))
        if not allocated and self.allocated:
            allocated = self.allocated[-1][1]
        return {
            "run": self.label,
            "outcome": self.outcome,
            "returncode": self.returncode,
            "oom_kill": self.oom_kill,
            "max_usage_bytes": self.max_usage,
            "max_usage_mib": round(self.max_usage / MiB, 1),
            "limit_bytes": self.limit,
            "limit_mib": self.limit // MiB,
            "allocated_bytes": allocated,
            "allocated_mib": allocated // MiB,
            "alloc_mib_per_s": self.figures.get("alloc_mib_per_s"),
            "requests": self.figures.get("requests", len(self.requests)),
            "seconds": round(self.seconds, 3),
            "controller_signals": self.signals,
        }


def describe_returncode(returncode: int) -> str:
    """A Popen return code in words: ``exit status 0``, ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"


def _last_json(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if not lines:
        return {}
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


@attrs.define(eq=False)
class _TraceReader:
    """Reads the allocator's trace file as it grows."""

    path: str
    start: float
    requests: list[tuple[float, int]] = attrs.field(factory=list)
    allocated: list[tuple[float, int]] = attrs.field(factory=list)
    _offset: int = attrs.field(default=0, alias="offset")
    _partial: str = attrs.field(default="", alias="partial")

    def poll(self) -> None:
        """Read the lines written since the last call."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        text = self._partial + data.decode("ascii", "replace")
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            parts = line.split(maxsplit=3)
            if len(parts) < 3:
                continue
            try:
                when = float(parts[1]) - self.start
                if parts[0] == "request":
                    self.requests.append((when, int(parts[2])))
                elif parts[0] == "progress":
                    self.allocated.append((when, int(parts[2])))
            except ValueError:
                continue


@attrs.define(eq=False)
class _OomWatch:
    """Tells, without blocking, whether the OOM killer acted in a group since the last look."""

    notifier: OomNotifier | MemoryEventsWatcher

    def happened(self) -> bool:
        if isinstance(self.notifier, OomNotifier):
            return self.notifier.consume()
        return self.notifier.consume() and "oom_kill" in self.notifier.moved

    def close(self) -> None:
        self.notifier.close()


def _oom_watch(group: ManagedCgroup) -> _OomWatch:
    if group.version is CgroupVersion.V1:
        return _OomWatch(OomNotifier.register(group.path))
    return _OomWatch(MemoryEventsWatcher.open(group.path))


def _allocator_argv(total: str, shrinker: bool, trace: str) -> list[str]:
    argv = [sys.executable, "-m", "pyshrinker.allocator", "--total", total, "--trace", trace]
    if not shrinker:
        argv.append("--no-shrinker")
    return argv


@attrs.frozen
class _Supervised:
    samples: list[tuple[float, int]]
    seconds: float
    oom_at: float | None


def _supervise(
    proc: subprocess.Popen[Any],
    read_usage: Callable[[], int],
    trace: _TraceReader,
    label: str,
    limit: int,
    progress: Callable[[Progress], None] | None,
    oom: Callable[[], bool] | None = None,
) -> _Supervised:
    """Sample usage every 10 ms until ``proc`` exits; note when ``oom`` fires."""
    samples: list[tuple[float, int]] = []
    start = trace.start
    next_progress = start
    next_sample = start
    oom_at = None
    while True:
        now = time.monotonic()
        try:
            samples.append((now - start, read_usage()))
        except (PyshrinkerError, OSError):
            pass  # the process or group is going away; the exit check below tells
        if oom is not None and oom_at is None and oom():
            oom_at = now - start
        if proc.poll() is not None:
            return _Supervised(samples, now - start, oom_at)
        if progress is not None and now >= next_progress:
            trace.poll()
            progress(
                Progress(
                    label=label,
                    seconds=now - start,
                    usage=samples[-1][1] if samples else 0,
                    limit=limit,
                    allocated=trace.allocated[-1][1] if trace.allocated else 0,
                    requests=len(trace.requests),
                )
            )
            next_progress = now + PROGRESS_INTERVAL
        next_sample = max(next_sample + SAMPLE_INTERVAL, now)
        time.sleep(max(0.0, next_sample - time.monotonic()))


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def run_in_cgroup(
    limit: int,
    total: str,
    shrinker: bool,
    progress: Callable[[Progress], None] | None = None,
) -> DemoRun:
    """Run the allocator once in a fresh group of ``limit`` bytes, sampling its usage.

    The group is cgroup v1's where the memory controller is bound to v1, else cgroup v2's.
    """
    label = "with pyshrinker" if shrinker else "without pyshrinker"
    name = f"pyshrinker-demo-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    kind = managed_cgroup_class()
    if kind is None:
        raise UnsupportedError(errno.EPERM, "no memory cgroup can be created here")
    with (
        tempfile.TemporaryDirectory(prefix="pyshrinker-demo-") as tmp,
        open(os.path.join(tmp, "stdout"), "w+", encoding="utf-8") as out,
        open(os.path.join(tmp, "stderr"), "w+", encoding="utf-8") as err,
        kind.create(name, limit) as group,
        closing(group.open_source()) as source,
        closing(_oom_watch(group)) as oom,
    ):
        trace_path = os.path.join(tmp, "trace")
        start = time.monotonic()
        proc = group.spawn(_allocator_argv(total, shrinker, trace_path), stdout=out, stderr=err)
        try:
            trace = _TraceReader(trace_path, start)
            seen = _supervise(
                proc, lambda: source.read().usage, trace, label, limit, progress, oom.happened
            )
        finally:
            _stop(proc)
        trace.poll()
        oom_kill = group.oom_kills()
        max_usage = group.peak()
        return DemoRun(
            label=label,
            shrinker=shrinker,
            limit=limit,
            total=parse_size(total),
            cgroup=group.path,
            returncode=proc.returncode,
            oom_kill=oom_kill,
            max_usage=max_usage,
            seconds=seen.seconds,
            oom_at=seen.oom_at,
            figures=_last_json(_read_all(out)),
            samples=seen.samples,
            requests=trace.requests,
            allocated=trace.allocated,
            signals=_signals_line(_read_all(err)),
            stderr=_read_all(err),
        )


def run_with_budget(
    limit: int, total: str, progress: Callable[[Progress], None] | None = None
) -> DemoRun:
    """No cgroup available: the same allocator steered by a process budget, RSS sampled."""
    label = "with pyshrinker, process budget"
    env = dict(os.environ, PYSHRINKER_BUDGET=str(limit))
    with (
        tempfile.TemporaryDirectory(prefix="pyshrinker-demo-") as tmp,
        open(os.path.join(tmp, "stdout"), "w+", encoding="utf-8") as out,
        open(os.path.join(tmp, "stderr"), "w+", encoding="utf-8") as err,
    ):
        trace_path = os.path.join(tmp, "trace")
        start = time.monotonic()
        proc = subprocess.Popen(
            _allocator_argv(total, True, trace_path), env=env, stdout=out, stderr=err
        )
        try:
            trace = _TraceReader(trace_path, start)
            with ProcessBudget.open(limit, proc.pid) as rss:
                seen = _supervise(proc, lambda: rss.read().usage, trace, label, limit, progress)
        finally:
            _stop(proc)
        trace.poll()
        figures = _last_json(_read_all(out))
        return DemoRun(
            label=label,
            shrinker=True,
            limit=limit,
            total=parse_size(total),
            cgroup="",
            returncode=proc.returncode,
            oom_kill=None,
            max_usage=int(figures.get("peak_rss_bytes", 0)),
            seconds=seen.seconds,
            oom_at=None,
            figures=figures,
            samples=seen.samples,
            requests=trace.requests,
            allocated=trace.allocated,
            signals=_signals_line(_read_all(err)),
            stderr=_read_all(err),
        )


def _read_all(f: TextIO) -> str:
    f.flush()
    f.seek(0)
    return f.read()


def _signals_line(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.startswith("controller signals:"):
            return line.partition(":")[2].strip()
    return ""


# ---------------------------------------------------------------------- output


def compact_signals(run: DemoRun) -> str:
    """The run's controller signals without the group's path repeated in each."""
    text = run.signals
    if run.cgroup:
        first, _, rest = text.partition("; ")
        rest = rest.replace(f" ({run.cgroup})", "").replace(f", {run.cgroup})", ")")
        text = f"{first}; {rest}" if rest else first
    return text


def format_bytes(n: int | float) -> str:
    """``268435456`` -> ``256.0 MiB`` (binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop always returns


def summary(run: DemoRun) -> str:
    """One line telling how a run went."""
    head = f"{run.label + ':':<19} {run.outcome}"
    if run.oom_killed:
        head += " (the OOM killer)"
    figures = run.to_json()
    parts = [head]
    if run.oom_kill is not None:
        parts.append(f"oom_kill {run.oom_kill}")
    parts.append(f"peak {format_bytes(run.max_usage)} of {format_bytes(run.limit)}")
    if run.figures:
        parts.append(
            f"{format_bytes(figures['allocated_bytes'])} allocated in {run.seconds:.1f} s"
            f" ({figures['alloc_mib_per_s']} MiB/s)"
        )
        parts.append(f"{figures['requests']} shrink requests")
    else:
        parts.append(f"after {format_bytes(figures['allocated_bytes'])} in {run.seconds:.2f} s")
    return ", ".join(parts)


class ProgressLine:
    """Prints progress to ``stream``: one rewritten line on a terminal, else a line a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.next_line = 1.0
        self.shown = False

    def __call__(self, p: Progress) -> None:
        """Show ``p``."""
        text = (
            f"  {p.label + ':':<20}{p.seconds:5.1f} s, allocated {format_bytes(p.allocated)}, "
            f"usage {format_bytes(p.usage)} of {format_bytes(p.limit)}, {p.requests} requests"
        )
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self.shown = True
        elif p.seconds >= self.next_line:
            self.stream.write(text + "\n")
            self.next_line = int(p.seconds) + 1.0
        self.stream.flush()

    def clear(self) -> None:
        """Erase the rewritten line before the summary is printed."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
        self.next_line = 1.0


# ---------------------------------------------------------------------- the plot


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailable` (with what to install) unless matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise PlotUnavailable(
            f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}"
        ) from err


def _usage_at(samples: list[tuple[float, int]], when: float) -> int:
    times = [t for t, _ in samples]
    i = min(max(bisect.bisect_left(times, when), 0), len(samples) - 1)
    return samples[i][1]


def _kill_point(run: DemoRun) -> tuple[float, int]:
    """Where to mark the OOM kill: the OOM notification's time, else the last peak sample."""
    if run.oom_at is not None:
        return run.oom_at, max(_usage_at(run.samples, run.oom_at), run.max_usage)
    alive = [s for s in run.samples if s[0] <= run.seconds]
    return max(reversed(alive[-5:]), key=lambda s: s[1])


def plot_runs(runs: list[DemoRun], path: str, title: str) -> None:
    """Draw usage, limit, shrink requests and OOM kills of ``runs`` side by side into ``path``."""
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(runs), 5.2), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    top = max(max(run.limit for run in runs), max(run.max_usage for run in runs)) / MiB * 1.5
    most_allocated = max((a for run in runs for _, a in run.allocated), default=0) / GiB
    for ax, run in zip(axes, runs, strict=True):
        mib = run.limit / MiB
        ax.plot(
            [t for t, _ in run.samples],
            [u / MiB for _, u in run.samples],
            color="tab:blue",
            linewidth=1.4,
            label="usage (memory.usage_in_bytes)" if run.cgroup else "resident memory (RSS)",
        )
        wall = "limit" if run.cgroup else "budget"
        ax.axhline(
            mib, color="tab:red", linestyle="--", linewidth=1.2, label=f"{wall} {mib:.0f} MiB"
        )
        if run.shrinker:
            high = Watermarks.for_limit(run.limit).high / MiB
            ax.axhline(
                high, color="tab:green", linestyle=":", linewidth=1.2, label="high watermark"
            )
        if run.requests and run.samples:
            ax.scatter(
                [t for t, _ in run.requests],
                [_usage_at(run.samples, t) / MiB for t, _ in run.requests],
                s=12,
                color="tab:orange",
                zorder=3,
                label=f"shrink request sent ({len(run.requests)})",
            )
        if run.oom_killed and run.samples:
            when, usage = _kill_point(run)
            ax.scatter(
                [when], [usage / MiB], s=160, marker="X", color="black", zorder=4, label="OOM kill"
            )
            ax.annotate(
                f"OOM kill at {when:.2f} s",
                (when, usage / MiB),
                xytext=(0, -30),
                textcoords="offset points",
                ha="center",
                fontweight="bold",
            )
        handles, labels = ax.get_legend_handles_labels()
        if run.allocated:
            twin = ax.twinx()
            (line,) = twin.plot(
                [t for t, _ in run.allocated],
                [a / GiB for _, a in run.allocated],
                color="grey",
                linewidth=1.0,
                alpha=0.7,
                label="allocated so far (GiB, right axis)",
            )
            twin.set_ylabel("allocated so far (GiB)", color="grey")
            twin.set_ylim(0, most_allocated * 1.5 or 1)
            twin.tick_params(axis="y", colors="grey")
            handles.append(line)
            labels.append(line.get_label())
        verdict = "OOM-killed (SIGKILL)" if run.oom_killed else run.outcome
        ax.set_title(f"{run.label}: {verdict}\npeak usage {format_bytes(run.max_usage)}")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("MiB")
        ax.set_ylim(0, top)
        ax.set_xlim(left=0)
        ax.legend(handles, labels, loc="upper left", ncol=2, fontsize=8.5)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument(
        "--memory",
        "--limit",
        dest="memory",
        default="256M",
        metavar="SIZE",
        help="memory limit of the cgroup (default 256M)",
    )
    parser.add_argument(
        "--total", default="8G", metavar="SIZE", help="bytes the allocator allocates (default 8G)"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw usage, limit and shrink requests of both runs into FILE.png "
        f"(needs matplotlib: {PLOT_EXTRA})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the runs' figures as one JSON object"
    )


def _sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        limit = parse_size(args.memory)
        total = parse_size(args.total)
    except ValueError as err:
        parser.error(str(err))
    if limit <= 0 or total <= 0:
        parser.error("--memory and --total must be positive")
    return limit


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run the demo with parsed ``args``; 0 when pyshrinker kept the allocator alive."""
    limit = _sizes(parser or argparse.ArgumentParser(prog="pyshrinker demo"), args)
    if args.plot:
        require_matplotlib()
    out = sys.stdout
    progress = ProgressLine(sys.stderr)
    kind = managed_cgroup_class()
    if kind is None:
        print(
            "No memory cgroup can be created here (not root, or no memory controller to use): "
            "running under a process budget of "
            f"{format_bytes(limit)} instead (no hard limit, so nothing can be OOM-killed).",
            file=sys.stderr,
            flush=True,
        )
        runs = [run_with_budget(limit, args.total, progress)]
        progress.clear()
        if not args.json:
            print("  " + summary(runs[0]), file=out, flush=True)
        ok = runs[0].returncode == 0
    else:
        print(
            f"Allocating {args.total} in 1 MiB chunks inside a {format_bytes(limit)} "
            f"cgroup {kind.version.value} memory group, with pyshrinker and without:",
            file=sys.stderr,
            flush=True,
        )
        runs = []
        for shrinker in (True, False):
            runs.append(run_in_cgroup(limit, args.total, shrinker, progress))
            progress.clear()
            if not args.json:
                print("  " + summary(runs[-1]), file=out, flush=True)
        with_, without = runs
        ok = with_.returncode == 0 and with_.oom_kill == 0 and without.oom_killed
    if runs[0].signals and not args.json:
        print(f"  controller signals: {compact_signals(runs[0])}", file=out)
    for each in runs:
        if each.returncode not in (0, -signal.SIGKILL) and each.stderr.strip():
            tail = each.stderr.strip().splitlines()[-1]
            print(f"pyshrinker demo: {each.label}: {tail}", file=sys.stderr)
    if args.plot:
        where = "memory cgroup" if runs[0].cgroup else "process budget"
        title = f"two-thread allocator, --total {args.total}, in a {format_bytes(limit)} {where}"
        plot_runs(runs, args.plot, title)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.json:
        keys = ["with_shrinker", "without_shrinker"]
        print(json.dumps({key: each.to_json() for key, each in zip(keys, runs, strict=False)}))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """``examples/demo.py``: the demo as a script."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args, parser)
    except PyshrinkerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
