"""The mempressure ABI proposed for Linux in 2012-2013, as values and pure parsers.

A controller directory holds ``cgroup.event_control`` (registrations), ``mempressure.shrinker``
(accounting) and ``mempressure.level`` (level notifications). The lines:

* ``"<efd> <shrinker fd> <chunk size>\\n"`` to ``cgroup.event_control``: register a shrinker;
  pyshrinker accepts an optional fourth field, the relative cost to rebuild a chunk (default 1,
  from 0.001 to 1000);
* ``"<efd> <level fd> <low|medium|oom>\\n"`` to ``cgroup.event_control``: register for a level;
* ``"<efd> <N>\\n"`` to ``mempressure.shrinker``: N > 0 adds reclaimable chunks, N < 0 removes them.

The controller answers a shrinker through its eventfd: the 8-byte counter is the number of chunks
to free, already subtracted from the count. A level listener's eventfd is signalled when its level
or a higher one happens. These functions parse lines the way the proposed kernel would: anything
malformed is an :class:`~pyshrinker.errors.AbiError` (EINVAL in a file-based controller).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import enum

import attrs

from pyshrinker.errors import AbiError

EVENT_CONTROL = "cgroup.event_control"
SHRINKER_FILE = "mempressure.shrinker"
LEVEL_FILE = "mempressure.level"

#: Largest count one report line may carry; larger is refused as absurd.
MAX_REPORT = 2**48
#: Largest chunk size a shrinker may register (1 TiB).
MAX_CHUNK_SIZE = 2**40
#: A line longer than this is refused before parsing.
MAX_LINE = 256
#: Smallest and largest rebuild cost a shrinker may register. A cost divides a shrinker's
#: weight: within these bounds (a factor of a million between the cheapest and the dearest)
#: no weight can overflow a float (2**48 chunks of 1 TiB over 0.001 is about 3e29), so a
#: registration cannot make the policy's arithmetic infinite or NaN.
MIN_COST = 0.001
MAX_COST = 1000.0


class Level(enum.IntEnum):
    """Memory pressure levels, mildest first; a listener hears its level and those above."""

    #: The controller is reclaiming: drop what is cheap to rebuild.
    LOW = 0
    #: Reclaim is not keeping up (the proposal: "some swapping").
    MEDIUM = 1
    #: Severe pressure, an OOM kill is near: drop whatever you can.
    OOM = 2

    @classmethod
    def parse(cls, name: str) -> Level:
        """``"low"``, ``"medium"`` or ``"oom"`` (``"critical"``, v1's word, means oom)."""
        try:
            return _LEVEL_NAMES[name.strip().lower()]
        except KeyError:
            raise AbiError(f"unknown level {name!r}: expected low, medium or oom") from None

    @property
    def label(self) -> str:
        """The level's name in the ABI."""
        return self.name.lower()


_LEVEL_NAMES = {"low": Level.LOW, "medium": Level.MEDIUM, "oom": Level.OOM, "critical": Level.OOM}


@attrs.frozen
class RegisterShrinker:
    """``<efd> <shrinker fd> <chunk size> [cost]`` written to ``cgroup.event_control``."""

    efd: int
    shrinker_fd: int
    chunk_size: int
    cost: float = 1.0


@attrs.frozen
class RegisterLevel:
    """``<efd> <level fd> <level>`` written to ``cgroup.event_control``."""

    efd: int
    level_fd: int
    level: Level


@attrs.frozen
class Report:
    """``<efd> <N>`` written to ``mempressure.shrinker``."""

    efd: int
    chunks: int


def _int(token: str, what: str) -> int:
    # The kernel's kstrto* accept an optional sign and decimal digits only.
    body = token[1:] if token[:1] in "+-" else token
    if not body.isdigit() or not body.isascii():
        raise AbiError(f"{what} must be a decimal integer, got {token!r}")
    return int(token)


def _fd(token: str, what: str) -> int:
    value = _int(token, what)
    if value < 0 or value > 2**31 - 1:
        raise AbiError(f"{what} must be a file descriptor, got {token!r}")
    return value


def validate_chunk_size(chunk_size: int) -> int:
    """Check a chunk size: a positive number of bytes, at most 1 TiB."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise AbiError(f"chunk size must be an int, got {chunk_size!r}")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise AbiError(f"chunk size must be 1..{MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    return chunk_size


def validate_cost(cost: float) -> float:
    """Check a rebuild cost: a number from :data:`MIN_COST` to :data:`MAX_COST`."""
    if isinstance(cost, bool) or not isinstance(cost, (int, float)):
        raise AbiError(f"cost must be a number, got {cost!r}")
    # Written so that NaN fails too.
    if not MIN_COST <= cost <= MAX_COST:
        raise AbiError(f"cost must be from {MIN_COST} to {MAX_COST:g}, got {cost}")
    return float(cost)


_FLOAT_CHARS = "0123456789+-.eE"


def _tokens(line: bytes | str) -> list[str]:
    if isinstance(line, bytes):
        if len(line) > MAX_LINE:
            raise AbiError(f"line longer than {MAX_LINE} bytes")
        try:
            line = line.decode("ascii")
        except UnicodeDecodeError:
            raise AbiError("line is not ASCII") from None
    if len(line) > MAX_LINE:
        raise AbiError(f"line longer than {MAX_LINE} bytes")
    if not line.isascii():
        raise AbiError("line is not ASCII")
    # One line per write; a trailing newline (and the NUL some writers add) is allowed.
    body = line.rstrip("\x00").rstrip("\n")
    if "\n" in body or "\x00" in body:
        raise AbiError("one line per write")
    return body.split()


def parse_event_control(line: bytes | str) -> RegisterShrinker | RegisterLevel:
    """Parse a line written to ``cgroup.event_control``."""
    tokens = _tokens(line)
    if len(tokens) not in (3, 4):
        raise AbiError(f"expected '<efd> <fd> <chunk size|level>', got {tokens!r}")
    efd = _fd(tokens[0], "eventfd")
    target = _fd(tokens[1], "file descriptor")
    if tokens[2][:1].isdigit() or tokens[2][:1] in "+-":
        chunk_size = _int(tokens[2], "chunk size")
        validate_chunk_size(chunk_size)
        cost = 1.0
        if len(tokens) == 4:
            try:
                # float() also takes "1_0"; only plain decimal notation is allowed here.
                if tokens[3].strip(_FLOAT_CHARS):
                    raise ValueError(tokens[3])
                cost = float(tokens[3])
            except ValueError:
                raise AbiError(f"cost must be a number, got {tokens[3]!r}") from None
            validate_cost(cost)
        return RegisterShrinker(efd, target, chunk_size, cost)
    if len(tokens) != 3:
        raise AbiError("a level registration has three fields")
    return RegisterLevel(efd, target, Level.parse(tokens[2]))


def parse_report(line: bytes | str) -> Report:
    """Parse a line written to ``mempressure.shrinker``."""
    tokens = _tokens(line)
    if len(tokens) != 2:
        raise AbiError(f"expected '<efd> <N>', got {tokens!r}")
    chunks = _int(tokens[1], "count")
    if abs(chunks) > MAX_REPORT:
        raise AbiError(f"count {chunks} is absurd (more than {MAX_REPORT})")
    return Report(_fd(tokens[0], "eventfd"), chunks)


def format_register(efd: int, shrinker_fd: int, chunk_size: int, cost: float = 1.0) -> bytes:
    """The registration line; the cost field is written only when it is not 1."""
    cost_field = "" if cost == 1.0 else f" {cost!r}"
    return f"{efd} {shrinker_fd} {chunk_size}{cost_field}\n".encode("ascii")


def format_register_level(efd: int, level_fd: int, level: Level) -> bytes:
    """The level registration line."""
    return f"{efd} {level_fd} {level.label}\n".encode("ascii")


def format_report(efd: int, chunks: int) -> bytes:
    """The accounting line."""
    return f"{efd} {chunks}\n".encode("ascii")
