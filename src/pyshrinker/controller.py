"""The controller: the kernel's half of the mempressure proposal, in user space.

It keeps the registered shrinkers (an eventfd, a chunk size, a cost and a count of reclaimable
chunks), watches the memory signals the machine offers, decides how many bytes must go
(:mod:`pyshrinker.policy`), and asks each shrinker for its share by writing the number of chunks
to its eventfd, after subtracting them from its count, exactly as the proposal's kernel would.

One background thread blocks in epoll on the signal fds and a wake-up eventfd. Only when the
kernel gives no notification for usage (cgroup v2, the host, a process budget), or while a
reclaim episode is under way, does it wake on a timeout, chosen adaptively.

When memory does not come down after a request it escalates: it asks again (requests already
in flight are not counted twice), tells "medium" level listeners, then runs ``gc.collect()``
and ``malloc_trim(0)`` and tells "oom" level listeners.

Freed memory must reach the kernel: the client trims the heap after reclaim
(:mod:`pyshrinker.trim`). The controller changes no allocator setting.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import TypeVar

import attrs

from pyshrinker import policy
from pyshrinker._syscalls import (
    EventfdFlag,
    eventfd,
    eventfd_drain,
    eventfd_write,
    malloc_trim,
)
from pyshrinker.abi import Level, validate_chunk_size, validate_cost
from pyshrinker.cgroup import (
    CgroupV1,
    CgroupV2,
    HostMemory,
    Membership,
    MemorySource,
    MemoryState,
    UnlimitedGroup,
    steering_source_of,
    v2_group_of,
)
from pyshrinker.errors import AbiError, CgroupError, CgroupNotFound, ClosedError, PyshrinkerError
from pyshrinker.signals import Notifier
from pyshrinker.signals.budget import ProcessBudget
from pyshrinker.signals.psi import (
    PSI_STALL_US,
    PSI_WINDOW_US,
    SYSTEM_MEMORY_PRESSURE,
    PsiTrigger,
    StallKind,
)
from pyshrinker.signals.systemd import SystemdPressureWatch
from pyshrinker.signals.v1 import OomNotifier, PressureLevel, UsageThreshold, V1Level
from pyshrinker.signals.v2 import MemoryEventsWatcher

log = logging.getLogger(__name__)


def _cpus() -> int:
    """CPUs this process may run on (its affinity mask; a container's CPU quota aside)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return max(1, os.cpu_count() or 1)


_C = TypeVar("_C", bound="Controller")

#: Seconds :meth:`Controller.describe_signals` waits at most for the thread's first arming.
ARMING_WAIT = 5.0


@attrs.frozen
class ControllerConfig:
    """How the controller steers.

    .. versionadded:: 0.1.0
    """

    #: Bytes (int) or fraction of the limit (float) kept free above the high watermark, fixed
    #: (``policy.Watermarks.for_limit``). None (the default): the headroom and the hysteresis
    #: band follow the growth and reaction measured (``policy.adaptive_watermarks``).
    headroom: int | float | None = None
    #: Bounds of the adaptive headroom, bytes (int) or fractions of the limit (float); None:
    #: ``policy.headroom_bounds``' defaults (8 MiB or 1/64 of the limit; the fixed rule's).
    min_headroom: int | float | None = None
    max_headroom: int | float | None = None
    #: Shortest time (seconds) a request counts as in flight (not asked again) unless its
    #: effect shows sooner. The grace in force is twice the median time recent requests took
    #: to show in the working set, within [grace, escalate_after] (policy.grace).
    grace: float = 0.005
    #: Seconds the working set may stay above the high watermark before escalating a step.
    escalate_after: float = 0.25
    #: Escalation steps taken at most per reclaim episode.
    max_escalation: int = 3
    #: Growth rate (bytes/s) assumed when polling adaptively.
    growth_rate: float = 4096 * policy.MiB
    #: Bounds of the adaptive polling interval, in seconds.
    shortest_poll: float = 0.001
    #: Polling interval above the high watermark when usage thresholds also notify.
    episode_poll: float = 0.01
    longest_poll: float = 1.0
    #: Arm PSI triggers and v1 pressure levels (besides usage watermarks).
    use_pressure_signals: bool = True
    #: Seconds between readings when nothing else wakes the controller: the limit may be changed
    #: and the process moved to another cgroup, and neither is notified.
    recheck_interval: float = 1.0
    #: Bytes reported as new chunks since the last reading after which a reporting thread reads
    #: again even if no usage threshold fired: the limit may have been lowered under the armed
    #: thresholds, the process moved, or usage may stay above them (no new crossing fires).
    recheck_bytes: int = 4 * policy.MiB


@attrs.frozen
class ShrinkerInfo:
    """A registered shrinker as the controller sees it."""

    key: Hashable
    chunk_size: int
    cost: float
    count: int
    requests: int
    chunks_requested: int


@attrs.frozen
class ShrinkRequest:
    """One request sent: ``chunks`` asked of shrinker ``key`` for ``reason``."""

    monotonic: float
    key: Hashable
    chunks: int
    reason: str


@attrs.define(eq=False)
class _Registration:
    key: Hashable
    fd: int
    chunk_size: int
    cost: float
    count: int = 0
    # Frees reported while a request was in flight can meet the count at 0 (the ABI's floor);
    # the excess is kept here and paid back by the re-add that follows, so counts stay exact.
    deficit: int = 0
    requests: int = 0
    chunks_requested: int = 0

    def info(self) -> ShrinkerInfo:
        return ShrinkerInfo(
            self.key, self.chunk_size, self.cost, self.count, self.requests, self.chunks_requested
        )


@attrs.define(eq=False)
class _Round:
    """The requests one decision sent: in flight until they show or their grace ends."""

    sent_at: float
    deadline: float
    #: The working set of the reading they were decided on.
    base: int
    #: Bytes asked, and given back since (re-adds of what a shrinker could not free).
    asked: int = 0
    readded: int = 0
    #: Bytes asked of each shrinker and not given back yet.
    by_key: dict[Hashable, int] = attrs.field(factory=dict)

    @property
    def outstanding(self) -> int:
        return max(0, self.asked - self.readded)


@attrs.define(eq=False)
class _LevelListener:
    key: Hashable
    fd: int
    level: Level


@attrs.define(eq=False)
class Controller:
    """Registry of shrinkers plus the thread that asks them for memory.

    Build one with :meth:`for_current_process` (picks the best signals this machine offers) or
    :meth:`create` (explicit memory source and notifiers); :meth:`start` runs the thread.

    .. versionadded:: 0.1.0
    """

    memory: MemorySource | None
    config: ControllerConfig
    _notifiers: list[Notifier] = attrs.field(alias="notifiers")
    _lock: threading.Lock = attrs.field(factory=threading.Lock, alias="lock")
    _shrinkers: dict[Hashable, _Registration] = attrs.field(factory=dict, alias="shrinkers")
    _levels: dict[Hashable, _LevelListener] = attrs.field(factory=dict, alias="levels")
    _history: list[ShrinkRequest] = attrs.field(factory=list, alias="history")
    #: Rounds of requests in flight, oldest first (see _Round).
    _in_flight: list[_Round] = attrs.field(factory=list, alias="in_flight")
    #: Seconds recent rounds took to show in the working set (or expired unshown).
    _reclaim_times: deque[float] = attrs.field(
        factory=lambda: deque(maxlen=32), alias="reclaim_times"
    )
    # Rounds of asks one owner dominated, to judge (see _judge_rounds): (judge at, working set
    # when asked, bytes asked, owner); and the owners found to let a round down this episode.
    _rounds: deque[tuple[float, int, int, Hashable]] = attrs.field(
        factory=lambda: deque(maxlen=64), alias="rounds"
    )
    _distrusted: set[Hashable] = attrs.field(factory=set, alias="distrusted")
    _marks: policy.Watermarks | None = attrs.field(default=None, alias="marks")
    _thresholds: list[UsageThreshold] = attrs.field(factory=list, alias="thresholds")
    #: The watermarks moved since the thresholds were armed (v1): the thread moves them.
    _thresholds_stale: bool = attrs.field(default=False, alias="thresholds_stale")
    #: Set once the thread made its first attempt at arming the thresholds (see start).
    _armed: threading.Event = attrs.field(factory=threading.Event, alias="armed")
    #: When the controller thread last read memory (time.monotonic()).
    _thread_read_at: float = attrs.field(default=0.0, alias="thread_read_at")
    _wake_fd: int = attrs.field(default=-1, alias="wake_fd")
    _epoll: select.epoll | None = attrs.field(default=None, alias="epoll")
    _thread: threading.Thread | None = attrs.field(default=None, alias="thread")
    _stopping: bool = attrs.field(default=False, alias="stopping")
    _closed: bool = attrs.field(default=False, alias="closed")
    _episode_step: int = attrs.field(default=0, alias="episode_step")
    _episode: bool = attrs.field(default=False, alias="episode")
    _above_since: float | None = attrs.field(default=None, alias="above_since")
    _last_state: MemoryState | None = attrs.field(default=None, alias="last_state")
    _hooks: list[Callable[[ShrinkRequest], None]] = attrs.field(factory=list, alias="hooks")
    _eval_lock: threading.Lock = attrs.field(factory=threading.Lock, alias="eval_lock")
    # The usage thresholds' eventfds, for reporting threads to check (_direct_check); a tuple
    # replaced whole, so a reader never sees it half-changed.
    _threshold_fds: tuple[int, ...] = attrs.field(default=(), alias="threshold_fds")
    _grown_since_read: int = attrs.field(default=0, alias="grown_since_read")
    # What the adaptive watermarks follow (policy.adaptive_watermarks): peaks of the growth
    # rate (bytes/s), the rise after a request (bytes), the boost (bytes), the controller
    # thread's lateness (s) and the time an owner that does not free holds on (s), each decaying
    # from the time it was last raised; the window a growth rate is measured over (start,
    # working set then, and the bytes reported since: new chunks, not the re-adds of what a
    # request could not free).
    _growth_rate: policy.DecayingPeak = attrs.field(
        factory=policy.DecayingPeak, alias="growth_rate"
    )
    _rise: policy.DecayingPeak = attrs.field(factory=policy.DecayingPeak, alias="rise")
    _boost: policy.DecayingPeak = attrs.field(factory=policy.DecayingPeak, alias="boost")
    _late: policy.DecayingPeak = attrs.field(factory=policy.DecayingPeak, alias="late")
    #: A round of requests has shown in the working set, and since when growth is measured
    #: (before both, and policy.TRUST_AFTER: the fixed rule's watermarks).
    _shown: bool = attrs.field(default=False, alias="shown")
    _measuring_since: float | None = attrs.field(default=None, alias="measuring_since")
    _unshown: policy.DecayingPeak = attrs.field(factory=policy.DecayingPeak, alias="unshown")
    _window: tuple[float, int] | None = attrs.field(default=None, alias="window")
    _window_reported: int = attrs.field(default=0, alias="window_reported")
    _by_fd: dict[int, Notifier] = attrs.field(factory=dict, alias="by_fd")
    #: The process's cgroup membership, when the controller watches the process's own cgroup.
    _membership: Membership | None = attrs.field(default=None, alias="membership")
    #: Why each signal source the machine might offer was not used.
    unavailable: dict[str, str] = attrs.field(factory=dict)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls: type[_C],
        memory: MemorySource | None,
        notifiers: list[Notifier] | None = None,
        config: ControllerConfig | None = None,
    ) -> _C:
        """A controller over an explicit memory source (None: only explicit requests)."""
        return cls(memory, config or ControllerConfig(), notifiers=list(notifiers or []))

    @classmethod
    def for_memory(
        cls: type[_C], memory: MemorySource, config: ControllerConfig | None = None
    ) -> _C:
        """A controller over ``memory`` with the pressure signals that source offers.

        What :meth:`for_current_process` arms for the process's own cgroup, for any source:
        v1 pressure levels and OOM notification, or v2 ``memory.events`` and PSI.
        """
        controller = cls(memory, config or ControllerConfig(), notifiers=[])
        controller._arm_pressure_signals()
        return controller

    @property
    def watermarks(self) -> policy.Watermarks | None:
        """The watermarks in force (None without a limit, or before the first reading)."""
        return self._marks

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @classmethod
    def for_current_process(
        cls: type[_C], *, budget: int | None = None, config: ControllerConfig | None = None
    ) -> _C:
        """Pick the memory source and signals this process can use, best first.

        cgroup v1 with a limit: usage threshold at the high watermark (plus pressure levels and
        OOM notification). cgroup v2 with a limit (memory.max or memory.high, here or on an
        ancestor): adaptive reads of memory.current, memory.events and a PSI trigger on the
        group. No limit anywhere up the hierarchy: the process ``budget`` if given (RSS read
        adaptively), else the machine's MemAvailable with its own watermarks.
        """
        config = config or ControllerConfig()
        unavailable: dict[str, str] = {}
        memory: MemorySource
        try:
            memory = steering_source_of()
        except CgroupError as err:
            unavailable["cgroup"] = str(err)
            memory = HostMemory.open()
        if isinstance(memory, UnlimitedGroup):
            unavailable["cgroup limit"] = memory.group.describe_limit()
        if budget is not None:
            state = memory.read()
            if state.limit is None or state.machine:
                memory.close()
                memory = ProcessBudget.open(budget)
            else:
                unavailable["budget"] = f"the cgroup's limit ({state.limit} bytes) takes precedence"
        controller = cls(memory, config, notifiers=[], unavailable=unavailable)
        if budget is None:
            try:
                controller._membership = Membership.of()
            except CgroupError as err:
                unavailable["cgroup moves"] = str(err)
        controller._arm_pressure_signals()
        return controller

    def _arm_pressure_signals(self) -> None:
        """Arm the notifiers that tell of pressure (besides usage, armed in ``_rewatermark``)."""
        memory = self.memory
        if not self.config.use_pressure_signals or memory is None:
            return
        try:
            self._notifiers.append(SystemdPressureWatch.from_environment())
        except (PyshrinkerError, OSError, ValueError) as err:
            self.unavailable["systemd"] = str(err)
        if isinstance(memory, CgroupV1):
            for level in (V1Level.LOW, V1Level.MEDIUM, V1Level.CRITICAL):
                try:
                    self._notifiers.append(PressureLevel.register(memory.path, level))
                except (CgroupError, OSError) as err:
                    self.unavailable[f"v1 pressure level {level.value}"] = str(err)
            try:
                self._notifiers.append(OomNotifier.register(memory.path))
            except (CgroupError, OSError) as err:
                self.unavailable["v1 oom notification"] = str(err)
            self.unavailable["psi"] = "cgroup v1 usage thresholds and levels are used instead"
            return
        if isinstance(memory, CgroupV2):
            self._arm_memory_events(memory)
        watched = memory.group if isinstance(memory, UnlimitedGroup) else memory
        if isinstance(watched, CgroupV2):
            psi_path = os.path.join(watched.path, "memory.pressure")
        else:
            group = v2_group_of()
            own = os.path.join(group, "memory.pressure") if group else None
            psi_path = own if own and os.path.exists(own) else SYSTEM_MEMORY_PRESSURE
        self._arm_psi(psi_path)
        self.unavailable.setdefault(
            "usage thresholds", "no usage notification outside cgroup v1: read adaptively"
        )

    def _arm_memory_events(self, memory: CgroupV2) -> None:
        # The group's own memory.events, and the local events of each ancestor whose limit
        # binds it (an ancestor's hierarchical file also moves for our siblings).
        groups = [memory.path]
        try:
            groups += [limit.group for limit in memory.limits() if limit.group not in groups]
        except CgroupError as err:
            self.unavailable["v2 ancestors' memory.events"] = str(err)
        for group in groups:
            try:
                watcher = MemoryEventsWatcher.open(group, local=group != memory.path)
            except (CgroupError, OSError) as err:
                self.unavailable[f"v2 memory.events of {group}"] = str(err)
            else:
                self._notifiers.append(watcher)

    def _arm_psi(self, path: str) -> None:
        # Asked with the privileged 500 ms window; PsiTrigger widens it to 2 s steps where the
        # kernel refuses that (no CAP_SYS_RESOURCE). Arming writes to the file: in a container
        # with a read-only cgroupfs, or as a user who does not own the group, it cannot, and
        # the whole machine's trigger is the next best.
        for each in dict.fromkeys((path, SYSTEM_MEMORY_PRESSURE)):
            try:
                trigger = PsiTrigger.arm(each, StallKind.SOME, PSI_STALL_US, PSI_WINDOW_US)
            except (CgroupError, OSError, ValueError) as err:
                why = "needs a write, refused" if _is_write_refusal(err) else "failed"
                self.unavailable[f"psi trigger on {each}"] = f"{why}: {err}"
                continue
            self._notifiers.append(trigger)
            if each != path:
                self.unavailable[f"psi trigger on {path}"] += f"; using {each} instead"
            return
        self.unavailable["psi"] = "no PSI trigger could be armed: usage reads lead alone"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Controller:
        """Start the background thread (idempotent); returns self."""
        if self._closed:
            raise ClosedError("controller is closed")
        if self._thread is not None:
            return self
        self._wake_fd = eventfd(0, EventfdFlag.CLOEXEC | EventfdFlag.NONBLOCK)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        # The thread exists before the watermarks, so v1 usage thresholds are armed by it (see
        # _move_thresholds), not here: each registration waits for an RCU grace period in the
        # kernel, 7-50 ms, and start() runs when the application creates its first cache.
        # Until they are armed, reporting threads check by distance to the high watermark.
        self._thread = threading.Thread(target=self._run, name="pyshrinker-controller", daemon=True)
        self._rewatermark()
        self._watch_notifiers()
        if not self._thresholds_stale:
            self._armed.set()
            self._log_watching()
        self._thread.start()
        return self

    def _log_watching(self) -> None:
        log.info("pyshrinker controller watching: %s", "; ".join(self._signal_lines()))

    def describe_signals(self) -> list[str]:
        """One line per signal source in use, the memory source first.

        Right after :meth:`start` it waits (a few ms, up to :data:`ARMING_WAIT` seconds) until
        the controller thread has armed the v1 usage thresholds, so that they are listed.
        """
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and not self._closed:
            self._armed.wait(ARMING_WAIT)
        return self._signal_lines()

    def _signal_lines(self) -> list[str]:
        lines = []
        if isinstance(self.memory, UnlimitedGroup):
            lines.append(
                f"memory: host {self.memory.path} (MemAvailable: no limit on "
                f"{self.memory.group.version.value} group {self.memory.group.path})"
            )
        elif self.memory is not None:
            lines.append(f"memory: {self.memory.version.value} {self.memory.path}")
        lines.extend(t.describe() for t in self._thresholds)
        lines.extend(n.describe() for n in self._notifiers)
        if self._needs_polling():
            lines.append("adaptive polling of usage")
        return lines

    def close(self) -> None:
        """Stop the thread and close every fd; idempotent. Registrations are forgotten."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._armed.set()
        if self._thread is not None:
            eventfd_write(self._wake_fd, 1)
            if self._thread is not threading.current_thread():
                self._thread.join()
        # A reporting thread may be evaluating (see _direct_check): let it finish first.
        with self._eval_lock:
            self._close_fds()

    def _close_fds(self) -> None:
        for notifier in self._notifiers:
            notifier.close()
        self._notifiers.clear()
        self._by_fd.clear()
        self._threshold_fds = ()
        if self._membership is not None:
            self._membership.close()
        for threshold in self._thresholds:
            threshold.close()
        self._thresholds.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
        if self.memory is not None:
            self.memory.close()
        with self._lock:
            self._shrinkers.clear()
            self._levels.clear()

    def forget_after_fork(self) -> None:
        """In a forked child: close this copy's fds without touching the parent's thread."""
        # Threads that do not exist in the child may have held these at fork: renew them.
        self._lock = threading.Lock()
        self._eval_lock = threading.Lock()
        self._armed = threading.Event()
        self._armed.set()
        self._closed = True
        self._thread = None
        self._close_fds()

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ registry (the ABI)

    def register(self, key: Hashable, fd: int, chunk_size: int, cost: float = 1.0) -> None:
        """Register shrinker ``key``: requests go to eventfd ``fd``, in chunks of ``chunk_size``."""
        validate_chunk_size(chunk_size)
        validate_cost(cost)
        with self._lock:
            if self._closed:
                raise ClosedError("controller is closed")
            if key in self._shrinkers or key in self._levels:
                raise AbiError(f"{key!r} is already registered")
            self._shrinkers[key] = _Registration(key, fd, chunk_size, float(cost))

    def unregister(self, key: Hashable) -> None:
        """Forget shrinker or level listener ``key``; after this its fd is never written."""
        with self._lock:
            self._shrinkers.pop(key, None)
            self._levels.pop(key, None)
            self._distrusted.discard(key)

    def report(self, key: Hashable, chunks: int) -> None:
        """Apply ``"<efd> <N>"``: add (N > 0) or remove (N < 0) reclaimable chunks.

        The count never goes below 0. A removal past 0 is remembered (up to the chunks ever
        requested, which is the only way an honest client gets there: it freed chunks on its
        own while a request for them was in flight) and paid back by the re-add that follows.
        """
        with self._lock:
            reg = self._shrinkers.get(key)
            if reg is None:
                raise AbiError(f"no shrinker registered as {key!r}")
            if chunks >= 0:
                paid = min(reg.deficit, chunks)
                reg.deficit -= paid
                reg.count += chunks - paid
                back = self._given_back(key, chunks * reg.chunk_size) if self._in_flight else 0
                self._window_reported += chunks * reg.chunk_size - back
            else:
                taken = min(reg.count, -chunks)
                reg.count -= taken
                reg.deficit = min(reg.chunks_requested, reg.deficit + (-chunks - taken))
            grown = chunks * reg.chunk_size
        if grown > 0 and self._thread is not None and not self._closed:
            try:
                self._direct_check(grown)
            except Exception:
                # The report itself was applied: a failure to decide here must not make the
                # caller believe it was not (it would send it again). The thread decides.
                log.exception("direct evaluation failed; the controller thread will decide")

    def _direct_check(self, grown: int) -> None:
        """Evaluate on the reporting thread when memory may have crossed a watermark.

        The kernel's memory cgroup reclaims in the charging task itself when it reaches its
        limit (direct reclaim): an allocator cannot outrun it. The equivalent here: a report of
        new chunks checks, cheaply, whether a usage threshold fired (a poll with no timeout,
        about 1 us) or, without thresholds, whether the bytes reported since the last reading
        could have covered half the distance to the high watermark; if so, it evaluates now
        instead of waiting for the controller thread to be scheduled and get the GIL. It never
        escalates (no gc.collect on a thread that may hold the application's locks): that stays
        with the controller thread.
        """
        self._grown_since_read += grown
        fds = self._threshold_fds
        if fds:
            # select, not a shared poll object: reporting threads check concurrently. An fd
            # closed by a re-watermark meanwhile just makes us read now.
            try:
                due = bool(select.select(fds, (), (), 0)[0])
            except (OSError, ValueError):
                due = True
            due = due or self._grown_since_read >= self.config.recheck_bytes
        elif self._marks is not None:
            last = self._last_state  # no reading yet: read now
            distance = self._marks.high - last.working_set if last is not None else 0
            due = self._grown_since_read * 2 >= distance
        else:
            due = False
        if not due:
            return
        # Wait for an evaluation under way on another thread rather than skip: like a task
        # charging memory at its cgroup's limit, the reporter is throttled until reclaim decided.
        self._eval_lock.acquire()
        try:
            if self._closed:
                return
            for threshold in self._thresholds:
                threshold.consume()
            self._evaluate("direct", escalate=False)
        except CgroupError as err:
            log.debug("direct evaluation failed: %s", err)
        finally:
            self._eval_lock.release()

    def register_level(self, key: Hashable, fd: int, level: Level) -> None:
        """Signal eventfd ``fd`` whenever ``level`` or a higher one happens."""
        with self._lock:
            if self._closed:
                raise ClosedError("controller is closed")
            if key in self._shrinkers or key in self._levels:
                raise AbiError(f"{key!r} is already registered")
            self._levels[key] = _LevelListener(key, fd, Level(level))

    def shrinkers(self) -> list[ShrinkerInfo]:
        """The registered shrinkers now, in registration order."""
        with self._lock:
            return [reg.info() for reg in self._shrinkers.values()]

    def count(self, key: Hashable) -> int:
        """The count of shrinker ``key``."""
        with self._lock:
            reg = self._shrinkers.get(key)
            if reg is None:
                raise AbiError(f"no shrinker registered as {key!r}")
            return reg.count

    def history(self) -> list[ShrinkRequest]:
        """Every request sent so far (kept up to the last 10,000)."""
        with self._lock:
            return list(self._history)

    def add_request_hook(self, hook: Callable[[ShrinkRequest], None]) -> None:
        """Call ``hook(request)`` after each request is sent, on the thread that decided it.

        That is the controller's thread, or a thread whose report made the controller decide at
        once (see :meth:`report`): keep hooks quick, and never take an application lock in one.
        """
        self._hooks.append(hook)

    # ------------------------------------------------------------------ requests

    def request(self, key: Hashable, chunks: int, reason: str = "explicit") -> int:
        """Ask shrinker ``key`` for up to ``chunks`` chunks now; returns how many were asked."""
        if chunks < 0:
            raise ValueError(f"chunks must be >= 0, got {chunks}")
        with self._lock:
            reg = self._shrinkers.get(key)
            if reg is None:
                raise AbiError(f"no shrinker registered as {key!r}")
            round_ = self._new_round()
            sent = self._signal(reg, min(chunks, reg.count), reason, round_)
        self._run_hooks(sent)
        return sum(r.chunks for r in sent)

    def shrink(self, nbytes: int, reason: str = "explicit") -> dict[Hashable, int]:
        """Ask all shrinkers for about ``nbytes`` in proportion to held bytes / cost.

        A claim weighs at most the working set last read (per owner, see :meth:`_owner`); an
        owner that let a round of asks down this episode weighs less (see _judge_rounds).
        """
        with self._lock:
            regs = list(self._shrinkers.values())
            owners = [self._owner(r.key) for r in regs]
            holdings = [
                policy.Holding(r.count, r.chunk_size, r.cost, owner in self._distrusted, owner)
                for r, owner in zip(regs, owners, strict=True)
            ]
            max_claim = self._last_state.working_set if self._last_state is not None else None
            asked = policy.share(nbytes, holdings, max_claim)
            sent: list[ShrinkRequest] = []
            by_owner: dict[Hashable, int] = {}
            round_ = self._new_round()
            for reg, owner, chunks in zip(regs, owners, asked, strict=True):
                done = self._signal(reg, chunks, reason, round_)
                sent.extend(done)
                if done:
                    by_owner[owner] = by_owner.get(owner, 0) + chunks * reg.chunk_size
            suspect = policy.dominant(by_owner)
            if suspect is not None and max_claim is not None:
                judge_at = time.monotonic() + self.config.escalate_after
                self._rounds.append((judge_at, max_claim, sum(by_owner.values()), suspect))
        self._run_hooks(sent)
        return {r.key: r.chunks for r in sent}

    def _owner(self, key: Hashable) -> Hashable:
        # Whose claims add up and who is distrusted: another process's shrinkers (keyed
        # (pid, efd) by the door they came in by) together; each of this process's alone.
        if isinstance(key, tuple) and len(key) == 2:
            owner: Hashable = key[0]
            return owner
        return key

    def forget_owner(self, owner: Hashable) -> None:
        """A client process is gone: it is no longer distrusted."""
        with self._lock:
            self._distrusted.discard(owner)

    def distrusted(self) -> list[Hashable]:
        """Owners that let a round of asks down this episode (asked less now)."""
        with self._lock:
            return list(self._distrusted)

    def _judge_rounds(self, now: float, working_set: int) -> None:
        # Called with the lock held. A round one owner dominated helped if the working set fell
        # by half of what it asked; one that has not by its judging time (escalate_after) was
        # let down by that owner, who weighs less for the rest of the episode.
        pending: deque[tuple[float, int, int, Hashable]] = deque(maxlen=self._rounds.maxlen)
        for judge_at, working_set_then, asked, owner in self._rounds:
            if 2 * (working_set_then - working_set) >= asked:
                continue
            if judge_at <= now:
                if owner not in self._distrusted:
                    log.warning("asking %r did not lower usage: asking the others", owner)
                    # Such an owner holds an episode up for escalate_after at its first round,
                    # while the others grow: the headroom covers that long (it may not be the
                    # last such owner), decaying like the rest.
                    self._unshown.raise_to(self.config.escalate_after, now)
                self._distrusted.add(owner)
                continue
            pending.append((judge_at, working_set_then, asked, owner))
        self._rounds = pending

    def _new_round(self) -> _Round:
        # Called with the lock held; the round counts once something is asked in it.
        now = time.monotonic()
        if self._in_flight and self._in_flight[0].deadline <= now:
            # Expired rounds go here too, not only on evaluate (explicit shrinks, a daemon's
            # many shrinkers), so the list stays bounded.
            self._in_flight = [each for each in self._in_flight if each.deadline > now]
        wait = policy.grace(self._reclaim_times, self.config.grace, self.config.escalate_after)
        return _Round(now, now + wait, self._last_working_set())

    def _given_back(self, key: Hashable, nbytes: int) -> int:
        # Called with the lock held: a shrinker asked in a round re-added chunks it could not
        # free; that much of the round will not show. Returns the bytes counted as given back.
        total = 0
        for round_ in self._in_flight:
            asked = round_.by_key.get(key, 0)
            if asked <= 0 or nbytes <= 0:
                continue
            back = min(asked, nbytes)
            round_.by_key[key] = asked - back
            round_.readded += back
            nbytes -= back
            total += back
        return total

    def current_grace(self) -> float:
        """Seconds a request counts as in flight now (from the reclaim times measured)."""
        with self._lock:
            return policy.grace(self._reclaim_times, self.config.grace, self.config.escalate_after)

    def _signal(
        self, reg: _Registration, chunks: int, reason: str, round_: _Round
    ) -> list[ShrinkRequest]:
        # Called with the lock held: the registration cannot be dropped (and its fd closed
        # and reused) while we write to it.
        if chunks <= 0:
            return []
        reg.count -= chunks
        reg.requests += 1
        reg.chunks_requested += chunks
        try:
            self._write_eventfd(reg.key, reg.fd, chunks)
        except OSError as err:
            # EBADF or a full counter: the client is gone or stuck; stop asking it.
            log.warning("dropping shrinker %r: signalling its eventfd failed: %s", reg.key, err)
            self._shrinkers.pop(reg.key, None)
            return []
        now = time.monotonic()
        request = ShrinkRequest(now, reg.key, chunks, reason)
        self._history.append(request)
        if len(self._history) > 10_000:
            del self._history[:5_000]
        if round_.asked == 0:
            self._in_flight.append(round_)
        nbytes = chunks * reg.chunk_size
        round_.asked += nbytes
        round_.by_key[reg.key] = round_.by_key.get(reg.key, 0) + nbytes
        return [request]

    def _write_eventfd(self, key: Hashable, fd: int, value: int) -> None:
        # Called with the lock held. This process's own eventfds are non-blocking (Shrinker
        # makes them so). Another process's (a door's duplicate, keyed (pid, efd)) shares its
        # file status flags with the client's copy: a client that made it blocking, and filled
        # it, would make this write wait holding the lock. Refused instead (BlockingIOError:
        # the registration is dropped). pyshrinkerd, whose clients may be any C program with a
        # blocking eventfd, bounds the write with a timer instead.
        if isinstance(key, tuple) and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
            raise BlockingIOError(errno.EAGAIN, "a client's eventfd is blocking")
        eventfd_write(fd, value)

    def _run_hooks(self, sent: list[ShrinkRequest]) -> None:
        for request in sent:
            for hook in self._hooks:
                try:
                    hook(request)
                except Exception:
                    log.exception("request hook %r raised", hook)

    def notify_level(self, level: Level) -> int:
        """Signal every listener registered at ``level`` or below; returns how many."""
        told = 0
        with self._lock:
            # Highest registered level first: a subscriber holding eventfds for several levels
            # then finds the event's own level already signalled whichever fd wakes it.
            ordered = sorted(self._levels.values(), key=lambda each: each.level, reverse=True)
            for listener in ordered:
                if listener.level <= level:
                    try:
                        self._write_eventfd(listener.key, listener.fd, 1)
                        told += 1
                    except OSError as err:
                        log.warning("dropping level listener %r: %s", listener.key, err)
                        self._levels.pop(listener.key, None)
        return told

    # ------------------------------------------------------------------ the decision

    def _needs_polling(self) -> bool:
        return self.memory is not None and not self._thresholds

    def _rewatermark(self, state: MemoryState | None = None) -> None:
        """(Re)compute watermarks from the limit; on v1 have the usage thresholds follow them."""
        if self.memory is None:
            return
        if state is None:
            state = self.memory.read()
        if state.limit is None:
            self._marks = None
            return
        marks = self._marks_for(state)
        if marks == self._marks:
            return
        self._marks = marks
        if not isinstance(self.memory, CgroupV1):
            return
        if self._thread is None:
            # No thread (a controller never started): arm them here, nobody waits.
            self._install_thresholds(self._register_thresholds(self.memory, marks))
            return
        # The controller thread moves them (see _move_thresholds), after the evaluation under
        # way here; a reporting thread deciding at once wakes it for that.
        self._thresholds_stale = True
        if threading.current_thread() is not self._thread:
            eventfd_write(self._wake_fd, 1)

    def _register_thresholds(
        self, memory: CgroupV1, marks: policy.Watermarks
    ) -> list[UsageThreshold]:
        """New usage thresholds for ``marks`` (slow: see _move_thresholds); [] if refused.

        Thresholds compare usage (page cache included) while the policy steers by the working
        set; usage >= working set, so they fire no later than needed. One at the high watermark
        starts an episode; one halfway to the limit wakes us at once if memory keeps growing
        while a request is in flight.
        """
        new: list[UsageThreshold] = []
        try:
            for at in policy.usage_thresholds(marks):
                new.append(UsageThreshold.register(memory.path, at))
        except CgroupError as err:
            # Registering writes cgroup.event_control: refused on a read-only cgroupfs.
            for threshold in new:
                threshold.close()
            self.unavailable["v1 usage thresholds"] = f"{err}: reading usage adaptively"
            return []
        return new

    def _install_thresholds(self, new: list[UsageThreshold]) -> None:
        """Put ``new`` in place of the thresholds armed (called with the evaluation lock)."""
        # The controller thread waits on them in its epoll set; reporting threads check their
        # fds (_direct_check). New ones first, so there is no moment without.
        old = self._thresholds
        for threshold in new:
            if self._epoll is not None:
                self._epoll.register(threshold.fileno(), threshold.events)
        self._thresholds = new
        self._threshold_fds = tuple(t.fileno() for t in new)
        for threshold in old:
            if self._epoll is not None:
                self._epoll.unregister(threshold.fileno())
            threshold.close()

    def _move_thresholds(self) -> None:
        """Move the usage thresholds to the watermarks in force (on the controller thread).

        Registering a threshold writes cgroup.event_control, and the kernel waits there for an
        RCU grace period (mem_cgroup_usage_register_event calls synchronize_rcu, under the
        group's thresholds mutex): 7-50 ms each, measured here. Done under no lock, so a
        reporting thread deciding at once (_direct_check) never waits for it (the allocator
        did, 26 registrations in a 4 GiB run, holding the evaluation lock); the old thresholds
        stay armed meanwhile, and reporting threads read usage every ``recheck_bytes`` anyway.
        """
        try:
            with self._eval_lock:
                self._thresholds_stale = False
                memory, marks = self.memory, self._marks
                if not isinstance(memory, CgroupV1) or marks is None or self._closed:
                    return
                armed = tuple(t.threshold for t in self._thresholds)
                if armed == policy.usage_thresholds(marks):
                    return
            new = self._register_thresholds(memory, marks)
            with self._eval_lock:
                if self.memory is not memory or self._closed:
                    # Switched or closed meanwhile: a switch asked for a move of its own.
                    for threshold in new:
                        threshold.close()
                    return
                self._install_thresholds(new)
        finally:
            if not self._armed.is_set():  # the first arming, after start()
                self._armed.set()
                self._log_watching()

    def _marks_for(self, state: MemoryState) -> policy.Watermarks:
        assert state.limit is not None
        config = self.config
        if config.headroom is not None or state.machine:
            # A headroom the user chose; a machine's MemAvailable, which other processes move
            # without telling us: fixed.
            return policy.watermarks(state.limit, state.machine, config.headroom)
        rate, rise, boost = self.growth()
        with self._lock:
            since = self._measuring_since
            rate_known = since is not None and time.monotonic() - since >= policy.TRUST_AFTER
            measured = self._shown and rate_known
            # The longest of the recent reclaim times, at least the grace, and of the controller
            # thread's late wake-ups: the headroom must cover what grows while the slowest
            # request travels (a loaded machine delays the threads that decide and free, and
            # the ones that allocate run on).
            slowest = max(self._reclaim_times, default=0.0)
            now = time.monotonic()
            late = self._late.at(now)
            unshown = self._unshown.at(now)
        reaction = min(max(self.current_grace(), slowest, late, unshown), config.escalate_after)
        # Several processes asked at once free one after another on a few CPUs (a floor, not a
        # measurement: not capped by escalate_after).
        reaction = max(reaction, policy.least_reaction(self._processes(), _cpus()))
        band_rate = None
        if not measured:
            # No round has shown yet: how late reclaim shows here is unknown, and who frees
            # (a client that claims much and frees nothing takes the first asks): the first
            # episode keeps the fixed rule's headroom, as if memory raced. It asks only for the
            # band the growth measured needs, though: under 1 GiB a cache filling at 100 MB/s
            # was asked for the fixed rule's 128 MiB, took 20-30 ms to free it (the first grace
            # is 5 ms), was asked as much again 2-3 s later, and refilled for 5 s of a 20 s run.
            # Only while one process owns the shrinkers, though: who frees is not known yet, and
            # beside another process's client that frees nothing the drop a cache's small share
            # shows also clears the liar's (an owner is judged by the working set), so it was
            # never distrusted and took half of every ask (4 to 8x what it is asked with the
            # fixed band, whose first episode of 32 MiB distrusts it).
            band_rate = rate if rate_known and self._processes() <= 1 else math.inf
            rate = math.inf
        return policy.adaptive_watermarks(
            state.limit,
            rate,
            reaction,
            rise,
            boost,
            # After an owner was distrusted, episodes long enough to keep it so: trust comes
            # back when one ends (under the low watermark), and a narrow band ends them fast.
            band_seconds=max(policy.BAND_SECONDS, unshown),
            band_rate=band_rate,
            min_headroom=config.min_headroom,
            max_headroom=config.max_headroom,
        )

    def _processes(self) -> int:
        """Processes whose shrinkers are registered here (this one counts if it has any)."""
        with self._lock:
            keys = list(self._shrinkers)
        others = {self._owner(key) for key in keys if isinstance(key, tuple)}
        return len(others) + any(not isinstance(key, tuple) for key in keys)

    def growth(self) -> tuple[float, float, float]:
        """What the adaptive watermarks follow now: the growth rate (bytes/s), the rise after
        a request before it showed (bytes) and the boost (bytes)."""
        now = time.monotonic()
        return self._growth_rate.at(now), self._rise.at(now), self._boost.at(now)

    def _measure_growth(self, read_at: float, working_set: int) -> None:
        """Raise the growth rate's peak by a reading (called with the evaluation lock).

        Growth is the larger of the bytes reported as new chunks and the working set's own
        rise, over a window of at least ``policy.RATE_WINDOW``: reports tell of a cache's
        growth even while it is being shrunk, the working set of memory nobody reports.
        """
        with self._lock:
            reported = self._window_reported
            window = self._window
            if window is not None and read_at - window[0] < policy.RATE_WINDOW:
                return
            self._window_reported = 0
        self._window = (read_at, working_set)
        if window is None:
            if self._measuring_since is None:
                self._measuring_since = read_at
            return
        started, working_set_then = window
        sample = max(reported, working_set - working_set_then, 0) / (read_at - started)
        self._growth_rate.raise_to(sample, read_at)

    def _measure_lateness(self, late: float) -> None:
        # A timed wake-up that came late: the machine kept this thread off its CPU (or the GIL
        # from it) that long, and a request decided on it waits as long while memory grows.
        if late <= 0:
            return
        now = time.monotonic()
        with self._lock:  # read by whichever thread evaluates
            self._late.raise_to(late, now)

    def _boost_headroom(self) -> None:
        # OOM-level pressure: the margin was too narrow, whatever was measured. Like the
        # kernel's watermark boost: at its most now, decaying as memory grows slowly again.
        if self._last_state is None or self._last_state.limit is None:
            return
        self._boost.set(float(self._last_state.limit), time.monotonic())

    def _last_working_set(self) -> int:
        # The reading a request is decided on (evaluate reads first); 0 before any reading.
        return self._last_state.working_set if self._last_state is not None else 0

    def _in_flight_bytes(self, read_at: float, working_set: int) -> int:
        """Bytes asked and not shown yet, judged by a reading taken at ``read_at``.

        Called with the lock held. A round goes down by what its shrinkers gave back and by the
        drop of the working set since it was sent (credited once, oldest round first); it is
        done when 90 % of it showed, over when its grace ended. A round sent after the reading
        began cannot show in it. The time each round took to show is what the grace follows.
        """
        judged = [r for r in self._in_flight if r.sent_at <= read_at]
        drop = judged[0].base - working_set if judged else 0
        left = policy.credit_drop([r.outstanding for r in judged], drop)
        remaining = dict(zip(map(id, judged), left, strict=True))
        keep: list[_Round] = []
        total = 0
        # Rounds decided at the high watermark or above (not explicit requests, far below).
        high = self._marks.high if self._marks is not None else None
        rises = [working_set - r.base for r in judged if high is not None and r.base >= high]
        rise = max(rises, default=0)
        if rise > 0:
            # Memory grew after a request, before it showed: the headroom must cover that.
            self._rise.raise_to(rise, read_at)
        for round_ in self._in_flight:
            out = remaining.get(id(round_), round_.outstanding)
            judged_now = id(round_) in remaining
            if judged_now and out * 10 <= round_.asked:
                self._reclaim_times.append(read_at - round_.sent_at)
                self._shown = True
                continue
            if round_.deadline <= read_at:
                # Unshown within its grace: the grace was too short for this client.
                self._reclaim_times.append(read_at - round_.sent_at)
                continue
            keep.append(round_)
            total += out
        self._in_flight = keep
        return total

    def evaluate(self, reason: str = "watermark") -> MemoryState | None:
        """Read memory now and ask for what must go; escalate if earlier asks did not help."""
        with self._eval_lock:
            return self._evaluate(reason)

    def _evaluate(self, reason: str, escalate: bool = True) -> MemoryState | None:
        membership = self._membership
        if membership is not None and membership.changed():
            log.warning("the process moved to another cgroup")
            self._switch_memory()
        if self.memory is None:
            return None
        # Taken before the reading: a request sent while it was being read cannot show in it.
        read_at = time.monotonic()
        state = self.memory.read()
        self._grown_since_read = 0
        self._last_state = state
        self._measure_growth(read_at, state.working_set)
        now = time.monotonic()
        with self._lock:
            # Before the watermarks: the reclaim times and rise this reading shows count.
            in_flight = self._in_flight_bytes(read_at, state.working_set)
            self._judge_rounds(now, state.working_set)
        self._rewatermark(state)
        marks = self._marks
        if marks is None:
            return state
        if state.working_set < marks.low:
            with self._lock:
                self._distrusted.clear()
        if state.working_set < marks.high:
            self._above_since = None
            if state.working_set < marks.low:
                self._episode = False
                self._episode_step = 0
            return state
        if not self._episode:
            self._episode = True
            self.notify_level(Level.LOW)
        if self._above_since is None:
            self._above_since = now
        need = policy.bytes_to_free(state.working_set, marks, in_flight)
        asked = self.shrink(need, reason) if need > 0 else {}
        stuck = now - self._above_since >= self.config.escalate_after
        if escalate and (stuck or (need > 0 and not asked and in_flight == 0)):
            self._escalate(state)
            self._above_since = now
        return state

    def _escalate(self, state: MemoryState) -> None:
        if self._episode_step >= self.config.max_escalation:
            return
        self._episode_step += 1
        log.info(
            "memory not coming down (working set %d, high watermark %d): escalation step %d",
            state.working_set,
            self._marks.high if self._marks else -1,
            self._episode_step,
        )
        if self._episode_step == 1:
            self.notify_level(Level.MEDIUM)
        else:
            gc.collect()
            malloc_trim(0)
            self.notify_level(Level.OOM)

    # ------------------------------------------------------------------ the thread

    def _timeout(self) -> float:
        if self.memory is None:
            return -1
        if self._marks is None:
            # No limit now; one may be set later.
            return self.config.recheck_interval
        state = self._last_state
        above = state is not None and state.working_set >= self._marks.high
        if self._in_flight or self._rounds or above:
            # Above the high watermark, or waiting to see a request's effect: read often, unless
            # usage thresholds will tell us of every crossing (then only to escalate). Rounds to
            # judge need readings too: a threshold tells of the crossing, not how low usage went.
            if self._thresholds:
                return self.config.episode_poll
            return self.config.shortest_poll
        if not self._needs_polling():
            # Thresholds tell of usage, but nothing tells of a new limit or a move.
            return self.config.recheck_interval
        if state is None:
            return self.config.shortest_poll
        return policy.poll_interval(
            state.working_set,
            self._marks,
            growth_rate=self.config.growth_rate,
            shortest=self.config.shortest_poll,
            longest=self.config.longest_poll,
        )

    def _run(self) -> None:
        assert self._epoll is not None
        while not self._stopping:
            timeout = self._timeout()
            started = time.monotonic()
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            if not events and timeout >= 0:
                self._measure_lateness(time.monotonic() - started - timeout)
            if self._stopping:
                break
            try:
                # Under the evaluation lock: a reporting thread deciding at once (_direct_check)
                # may switch the memory source, and with it the notifiers, meanwhile.
                with self._eval_lock:
                    self._handle(events)
                if self._thresholds_stale:
                    self._move_thresholds()
            except Exception:
                log.exception("controller evaluation failed; continuing")
                time.sleep(self.config.escalate_after)

    def _handle(self, events: list[tuple[int, int]]) -> None:
        reason = "poll"
        level: Level | None = None
        # A timed wake-up reads; so does any notifier. A wake-up fd alone (close, or the
        # thresholds to move), or a threshold a reporting thread already drained (it read right
        # after, in _direct_check), reads only if this thread has not read for episode_poll:
        # at once it would read the same again, taking the GIL from the thread that allocates
        # (the allocator did so twice per crossing), but it must still read at its own pace,
        # as only its readings escalate.
        read = not events
        for fd, _mask in events:
            if fd == self._wake_fd:
                eventfd_drain(self._wake_fd)
                continue
            threshold = next((t for t in self._thresholds if t.fileno() == fd), None)
            if threshold is not None:
                if threshold.consume():
                    read = True
                    reason = "usage threshold"
                continue
            read = True
            notifier = self._by_fd.get(fd)
            if notifier is None:
                continue
            try:
                real = notifier.consume()
            except CgroupError:
                real = True
            if real:
                reason = type(notifier).__name__
                level = max(level or Level.LOW, _level_of(notifier))
        if level is not None:
            self.notify_level(level)
            if level >= Level.OOM:
                self._boost_headroom()
        now = time.monotonic()
        if not read and now - self._thread_read_at < self.config.episode_poll:
            return
        self._thread_read_at = now
        try:
            self._evaluate(reason)
        except CgroupNotFound as err:
            # The cgroup was removed under us (its files now fail with ENODEV).
            log.error("memory cgroup gone: %s; looking for the current one", err)
            self._switch_memory()

    def _watch_notifiers(self) -> None:
        assert self._epoll is not None
        for notifier in self._notifiers:
            self._epoll.register(notifier.fileno(), notifier.events)
            self._by_fd[notifier.fileno()] = notifier

    def _switch_memory(self) -> None:
        """Watch the memory cgroup the process is in now (called with the evaluation lock).

        Registrations and counts are kept; only the source, its notifiers and thresholds change.
        Without a cgroup to watch the controller idles.
        """
        for notifier in self._notifiers:
            if self._epoll is not None:
                try:
                    self._epoll.unregister(notifier.fileno())
                except OSError as unreg_err:
                    if unreg_err.errno != errno.ENOENT:
                        raise
            notifier.close()
        self._notifiers.clear()
        self._by_fd.clear()
        self._install_thresholds([])
        self._marks = None
        self._last_state = None
        self._window = None  # the new group's working set is no growth of the old one's
        old = self.memory
        self.memory = None
        if old is not None:
            old.close()
        try:
            memory = steering_source_of()
            memory.read()
        except CgroupError as again:
            log.error("no memory cgroup to watch (%s): controller idle", again)
            return
        self.memory = memory
        self._rewatermark()
        self._arm_pressure_signals()
        if self._epoll is not None:
            self._watch_notifiers()
        log.warning("now watching %s", "; ".join(self._signal_lines()))


def _level_of(notifier: Notifier) -> Level:
    if isinstance(notifier, PressureLevel):
        return {
            V1Level.LOW: Level.LOW,
            V1Level.MEDIUM: Level.MEDIUM,
            V1Level.CRITICAL: Level.OOM,
        }[notifier.level]
    if isinstance(notifier, OomNotifier):
        return Level.OOM
    if isinstance(notifier, MemoryEventsWatcher) and notifier.moved - {"high"}:
        return Level.OOM  # memory.max reached (or the OOM killer ran): the last step
    return Level.MEDIUM


def _is_write_refusal(err: BaseException) -> bool:
    cause = err.__cause__ if isinstance(err.__cause__, OSError) else err
    return isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


#: A process memory budget (``"512M"``): this process's controller steers by its own RSS.
BUDGET_ENV = "PYSHRINKER_BUDGET"

_default: Controller | None = None
_default_lock = threading.Lock()


def default_controller() -> Controller:
    """The process's embedded controller, created and started on first use."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            budget_env = os.environ.get(BUDGET_ENV)
            budget = parse_size(budget_env) if budget_env else None
            _default = Controller.for_current_process(budget=budget).start()
        return _default


def _forget_default_after_fork() -> None:
    global _default, _default_lock
    _default_lock = threading.Lock()
    if _default is not None:
        _default.forget_after_fork()
        _default = None


os.register_at_fork(after_in_child=_forget_default_after_fork)

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"256M"``, ``"8G"``, ``"1048576"``, ``"512KiB"`` -> bytes (powers of 1024)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in _SUFFIXES and value[-1:] else ""
    number = value[: len(value) - len(suffix)].strip()
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 8G)") from None
    if amount < 0 or amount != amount:
        raise ValueError(f"size must be >= 0: {text!r}")
    return int(amount * _SUFFIXES[suffix])
