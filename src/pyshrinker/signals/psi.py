"""PSI (pressure stall information) for memory: averages and triggers.

The kernel side (Documentation/accounting/psi.rst):

* ``/proc/pressure/memory`` (whole system) and ``memory.pressure`` in each cgroup v2 group read
  ``some avg10=.. avg60=.. avg300=.. total=<us>`` and the same for ``full``.
* A trigger: open the file O_RDWR | O_NONBLOCK, write ``"<some|full> <stall us> <window us>"``
  and a NUL, then poll for POLLPRI. At most one event per window; one trigger per fd; closing
  the fd removes it; POLLERR means the group is gone.
* Windows run from 500 ms to 10 s. Without CAP_SYS_RESOURCE (even root may lack it, as here) a
  trigger is "unprivileged" and its window must be a multiple of 2 s, else EINVAL.
* An unprivileged trigger can fire once right after arming, so the first event is believed
  only if ``total`` moved since arming.
* Stalls come late for anonymous memory without swap: PSI adds to usage watermarks, never
  replaces them.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import enum
import errno
import os
import select

import attrs

from pyshrinker.cgroup import translated_errors
from pyshrinker.errors import MalformedFile, UnsupportedError

SYSTEM_MEMORY_PRESSURE = "/proc/pressure/memory"
MIN_WINDOW_US = 500_000
MAX_WINDOW_US = 10_000_000
UNPRIVILEGED_WINDOW_STEP_US = 2_000_000
#: The trigger a controller arms: 10 % of a 500 ms window stalled, the shortest window the
#: kernel allows (with CAP_SYS_RESOURCE); without it, widened to 200 ms of 2 s.
PSI_STALL_US = 50_000
PSI_WINDOW_US = MIN_WINDOW_US


class StallKind(enum.Enum):
    """Which stall a PSI line or trigger counts."""

    #: At least one task stalled on memory.
    SOME = "some"
    #: All non-idle tasks stalled at once.
    FULL = "full"


@attrs.frozen
class PsiLine:
    """One line of a pressure file: averages in percent, total stall in microseconds."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


@attrs.frozen
class PsiStats:
    """A whole pressure file; ``full`` is None where the kernel has no such line."""

    some: PsiLine
    full: PsiLine | None


def parse_psi(text: str) -> PsiStats:
    """Parse the text of a PSI pressure file."""
    lines: dict[str, PsiLine] = {}
    for raw in text.splitlines():
        parts = raw.split()
        if not parts:
            continue
        try:
            fields = dict(part.split("=", 1) for part in parts[1:])
            lines[parts[0]] = PsiLine(
                float(fields["avg10"]),
                float(fields["avg60"]),
                float(fields["avg300"]),
                int(fields["total"]),
            )
        except (KeyError, ValueError):
            raise MalformedFile(f"bad PSI line: {raw!r}") from None
    if "some" not in lines:
        raise MalformedFile("PSI file has no 'some' line")
    return PsiStats(lines["some"], lines.get("full"))


def read_psi(path: str = SYSTEM_MEMORY_PRESSURE) -> PsiStats:
    """Read and parse a PSI pressure file now."""
    with translated_errors(path), open(path, encoding="ascii") as f:
        return parse_psi(f.read())


def stall_total_moved(path: str, kind: StallKind, armed_total: int) -> bool:
    """Whether the ``kind`` stall total of ``path`` differs from ``armed_total``.

    An unprivileged trigger can fire once right after arming; its first event is believed only
    if stalls really accumulated since.
    """
    stats = read_psi(path)
    line = stats.some if kind is StallKind.SOME else stats.full
    return line is None or line.total_us != armed_total


def psi_available(path: str = SYSTEM_MEMORY_PRESSURE) -> bool:
    """Whether ``path`` exists and reads as a PSI file (PSI may be compiled out or disabled)."""
    try:
        read_psi(path)
    except (OSError, MalformedFile):
        return False
    return True


def unprivileged_window(window_us: int) -> int:
    """Round a window up to the multiple of 2 s an unprivileged trigger needs."""
    step = UNPRIVILEGED_WINDOW_STEP_US
    return min(MAX_WINDOW_US, -(-window_us // step) * step)


@attrs.define(eq=False)
class PsiTrigger:
    """A PSI trigger on a pressure file: POLLPRI when stalls exceed ``stall_us`` per window."""

    path: str
    kind: StallKind
    stall_us: int
    window_us: int
    #: True when the kernel refused the asked window as unprivileged and it was widened.
    widened: bool
    fd: int
    _armed_total: int | None = attrs.field(alias="armed_total")
    events: int = select.POLLPRI

    @classmethod
    def arm(
        cls,
        path: str = SYSTEM_MEMORY_PRESSURE,
        kind: StallKind = StallKind.SOME,
        stall_us: int = 150_000,
        window_us: int = 1_000_000,
    ) -> PsiTrigger:
        """Arm a trigger; if the kernel refuses the window as unprivileged, retry on 2 s steps."""
        if not MIN_WINDOW_US <= window_us <= MAX_WINDOW_US:
            raise ValueError(f"window must be {MIN_WINDOW_US}..{MAX_WINDOW_US} us, got {window_us}")
        if not 0 < stall_us <= window_us:
            raise ValueError(f"stall must be 1..window us, got {stall_us}")
        windows = [window_us]
        wider = unprivileged_window(window_us)
        if wider != window_us:
            windows.append(wider)
        last_error: OSError | None = None
        for window in windows:
            stall = stall_us * window // window_us
            with translated_errors(path):
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                before = read_psi(path)
                line = before.some if kind is StallKind.SOME else before.full
                os.write(fd, f"{kind.value} {stall} {window}\0".encode("ascii"))
            except OSError as err:
                os.close(fd)
                if err.errno == errno.EINVAL:
                    last_error = err
                    continue
                if err.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise UnsupportedError(err.errno, f"PSI triggers unsupported: {path}") from err
                with translated_errors(path):
                    raise
            # A refusal kept from the first window is a cycle (its traceback holds this frame,
            # and so every caller's): without it, objects being constructed up the stack (a
            # cache making the default controller) would wait for the collector.
            last_error = None
            return cls(
                path,
                kind,
                stall,
                window,
                window != window_us,
                fd,
                armed_total=line.total_us if line is not None else None,
            )
        raise UnsupportedError(
            errno.EINVAL, f"kernel refused PSI trigger on {path}: {last_error}"
        ) from last_error

    def fileno(self) -> int:
        return self.fd

    def consume(self) -> bool:
        """Whether this event is real: the first one only if stall ``total`` moved since arming."""
        armed, self._armed_total = self._armed_total, None
        return armed is None or stall_total_moved(self.path, self.kind, armed)

    def describe(self) -> str:
        note = " (window widened: unprivileged)" if self.widened else ""
        spec = f"{self.kind.value} {self.stall_us} {self.window_us}"
        return f"PSI trigger '{spec}'{note} on {self.path}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PsiTrigger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
