"""The mempressure ABI lines: formatting, parsing, and every malformed form refused."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyshrinker.abi import (
    MAX_CHUNK_SIZE,
    MAX_COST,
    MAX_LINE,
    MAX_REPORT,
    MIN_COST,
    Level,
    RegisterLevel,
    RegisterShrinker,
    Report,
    format_register,
    format_register_level,
    format_report,
    parse_event_control,
    parse_report,
    validate_chunk_size,
    validate_cost,
)
from pyshrinker.errors import AbiError, PyshrinkerError

fds = st.integers(0, 2**31 - 1)
chunk_sizes = st.integers(1, MAX_CHUNK_SIZE)
costs = st.floats(min_value=MIN_COST, max_value=MAX_COST)
report_counts = st.integers(-MAX_REPORT, MAX_REPORT)


class TestLevel:
    """Level.parse and Level.label."""

    @pytest.mark.parametrize(
        ("name", "level"),
        [
            ("low", Level.LOW),
            ("medium", Level.MEDIUM),
            ("oom", Level.OOM),
            ("critical", Level.OOM),
            ("LOW", Level.LOW),
            ("Medium", Level.MEDIUM),
            (" oom\n", Level.OOM),
        ],
    )
    def test_parse_known_names(self, name: str, level: Level) -> None:
        """Known names parse, case-insensitively; v1's 'critical' means oom."""
        assert Level.parse(name) is level

    @pytest.mark.parametrize("name", ["", "high", "lo", "oomm", "1", "low,hierarchy", "crit"])
    def test_parse_unknown_names(self, name: str) -> None:
        """Anything else is an AbiError, which is also a ValueError."""
        with pytest.raises(AbiError) as info:
            Level.parse(name)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, PyshrinkerError)

    def test_labels_round_trip(self) -> None:
        """Each level's label is the ABI word that parses back to it."""
        assert [lv.label for lv in Level] == ["low", "medium", "oom"]
        for level in Level:
            assert Level.parse(level.label) is level

    def test_order_is_mildest_first(self) -> None:
        """Levels compare by severity."""
        assert Level.LOW < Level.MEDIUM < Level.OOM


class TestRegisterShrinker:
    """Shrinker registrations written to cgroup.event_control."""

    def test_without_cost(self) -> None:
        """Three fields register with the default cost 1."""
        assert parse_event_control("3 4 4096\n") == RegisterShrinker(3, 4, 4096, 1.0)

    def test_with_cost(self) -> None:
        """A fourth field is the rebuild cost."""
        assert parse_event_control(b"3 4 1048576 2.5\n") == RegisterShrinker(3, 4, 1 << 20, 2.5)

    def test_bytes_and_str_agree(self) -> None:
        """A line parses the same as bytes or str."""
        assert parse_event_control(b"7 8 512") == parse_event_control("7 8 512")

    def test_trailing_nul_and_no_newline(self) -> None:
        """A trailing NUL (some writers add one) or a missing newline is accepted."""
        assert parse_event_control(b"3 4 4096\x00") == RegisterShrinker(3, 4, 4096)
        assert parse_event_control(b"3 4 4096\n\x00") == RegisterShrinker(3, 4, 4096)
        assert parse_event_control("3 4 4096") == RegisterShrinker(3, 4, 4096)

    def test_explicit_plus_sign(self) -> None:
        """kstrto* accepts a leading '+'."""
        assert parse_event_control("+3 +4 +4096") == RegisterShrinker(3, 4, 4096)

    def test_largest_chunk_size(self) -> None:
        """1 TiB is the largest chunk size accepted."""
        assert parse_event_control(f"3 4 {MAX_CHUNK_SIZE}").chunk_size == MAX_CHUNK_SIZE

    def test_largest_fd(self) -> None:
        """An fd up to INT_MAX is accepted."""
        assert parse_event_control(f"{2**31 - 1} 0 1").efd == 2**31 - 1

    def test_format_omits_default_cost(self) -> None:
        """format_register writes the cost only when it is not 1."""
        assert format_register(3, 4, 4096) == b"3 4 4096\n"
        assert format_register(3, 4, 4096, 1.0) == b"3 4 4096\n"
        assert format_register(3, 4, 4096, 2.5) == b"3 4 4096 2.5\n"

    @given(efd=fds, shrinker_fd=fds, chunk_size=chunk_sizes, cost=costs)
    def test_round_trip(self, efd: int, shrinker_fd: int, chunk_size: int, cost: float) -> None:
        """format_register then parse_event_control gives back the same registration."""
        line = format_register(efd, shrinker_fd, chunk_size, cost)
        assert len(line) <= MAX_LINE
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        parsed = parse_event_control(line)
        assert parsed == RegisterShrinker(efd, shrinker_fd, chunk_size, cost)
        assert isinstance(parsed, RegisterShrinker)
        assert parsed.cost == cost


class TestRegisterLevel:
    """Level registrations written to cgroup.event_control."""

    @pytest.mark.parametrize("word", ["low", "medium", "oom", "critical"])
    def test_parse(self, word: str) -> None:
        """'<efd> <level fd> <level>' is a level registration."""
        parsed = parse_event_control(f"5 6 {word}\n")
        assert parsed == RegisterLevel(5, 6, Level.parse(word))

    def test_level_with_fourth_field(self) -> None:
        """A level registration has exactly three fields."""
        with pytest.raises(AbiError):
            parse_event_control("5 6 low 2")

    def test_unknown_level(self) -> None:
        """An unknown level word is refused."""
        with pytest.raises(AbiError):
            parse_event_control("5 6 high")

    def test_v1_mode_suffix_refused(self) -> None:
        """v1's ',hierarchy' suffix is not part of the mempressure ABI."""
        with pytest.raises(AbiError):
            parse_event_control("5 6 low,hierarchy")

    @given(efd=fds, level_fd=fds, level=st.sampled_from(Level))
    def test_round_trip(self, efd: int, level_fd: int, level: Level) -> None:
        """format_register_level then parse_event_control gives back the registration."""
        line = format_register_level(efd, level_fd, level)
        assert parse_event_control(line) == RegisterLevel(efd, level_fd, level)


class TestReport:
    """Accounting lines written to mempressure.shrinker."""

    @pytest.mark.parametrize(
        ("line", "report"),
        [
            ("3 10\n", Report(3, 10)),
            ("3 +10\n", Report(3, 10)),
            ("3 -10\n", Report(3, -10)),
            (b"3 -1\x00", Report(3, -1)),
            (f"3 {MAX_REPORT}", Report(3, MAX_REPORT)),
            (f"3 -{MAX_REPORT}", Report(3, -MAX_REPORT)),
        ],
    )
    def test_parse(self, line: str | bytes, report: Report) -> None:
        """+N adds chunks, -N removes them."""
        assert parse_report(line) == report

    def test_format(self) -> None:
        """format_report writes the signed count."""
        assert format_report(3, 10) == b"3 10\n"
        assert format_report(3, -10) == b"3 -10\n"

    @given(efd=fds, chunks=report_counts)
    def test_round_trip(self, efd: int, chunks: int) -> None:
        """format_report then parse_report gives back the report."""
        assert parse_report(format_report(efd, chunks)) == Report(efd, chunks)


class TestMalformedEventControl:
    """Every malformed registration is an AbiError."""

    @pytest.mark.parametrize(
        "line",
        [
            pytest.param("", id="empty"),
            pytest.param("\n", id="only-newline"),
            pytest.param("3", id="one-field"),
            pytest.param("3 4", id="two-fields"),
            pytest.param("3 4 4096 1 5", id="five-fields"),
            pytest.param("3 4 4096 1 5 6", id="six-fields"),
            pytest.param("x 4 4096", id="efd-not-a-number"),
            pytest.param("3 y 4096", id="fd-not-a-number"),
            pytest.param("-3 4 4096", id="negative-efd"),
            pytest.param("3 -4 4096", id="negative-fd"),
            pytest.param(f"{2**31} 4 4096", id="efd-over-int-max"),
            pytest.param(f"3 {2**31} 4096", id="fd-over-int-max"),
            pytest.param("0x3 4 4096", id="hex-efd"),
            pytest.param("3 4 0x1000", id="hex-chunk"),
            pytest.param("3 4 4096.0", id="float-chunk"),
            pytest.param("3 4 4_096", id="underscore-chunk"),
            pytest.param("3 4 1e3", id="exponent-chunk"),
            pytest.param("3.0 4 4096", id="float-efd"),
            pytest.param("3 4 0", id="chunk-zero"),
            pytest.param("3 4 -4096", id="chunk-negative"),
            pytest.param("3 4 -0", id="chunk-minus-zero"),
            pytest.param(f"3 4 {MAX_CHUNK_SIZE + 1}", id="chunk-too-large"),
            pytest.param("3 4 9" * 30, id="chunk-absurd"),
            pytest.param("3 4 +", id="chunk-sign-only"),
            pytest.param("3 4 4096 0", id="cost-zero"),
            pytest.param("3 4 4096 -1", id="cost-negative"),
            pytest.param("3 4 4096 nan", id="cost-nan"),
            pytest.param("3 4 4096 inf", id="cost-inf"),
            pytest.param("3 4 4096 1e999", id="cost-overflows"),
            pytest.param("3 4 4096 1e-320", id="cost-subnormal"),
            pytest.param("3 4 4096 0.0009", id="cost-too-small"),
            pytest.param("3 4 4096 1001", id="cost-too-large"),
            pytest.param("3 4 4096 cheap", id="cost-word"),
            pytest.param("3 4 4096 1_0", id="cost-underscore"),
            pytest.param("3 4 4096\n5 6 4096\n", id="two-lines"),
            pytest.param("3 4\n4096", id="newline-inside"),
            pytest.param("3 4 40\x0096", id="nul-inside"),
            pytest.param("3 4 low\nmedium", id="two-level-lines"),
        ],
    )
    def test_refused(self, line: str) -> None:
        """The line is refused as str and as bytes."""
        with pytest.raises(AbiError):
            parse_event_control(line)
        with pytest.raises(AbiError):
            parse_event_control(line.encode("ascii"))

    @pytest.mark.parametrize(
        "line",
        [
            pytest.param("3 4 \uff14\uff10\uff19\uff16", id="fullwidth-digits"),
            pytest.param("\uff13 4 4096", id="fullwidth-efd"),
            pytest.param("3 4 4096 \uff12", id="fullwidth-cost"),
            pytest.param("3 4 4096 1.\uff15", id="fullwidth-cost-digit"),
            pytest.param("3 4 4096 \u0662", id="arabic-indic-cost"),
            pytest.param("3 4 lów", id="accented-level"),
            pytest.param("3 4 4096\u00a0", id="nbsp"),
        ],
    )
    def test_non_ascii_refused(self, line: str) -> None:
        """Non-ASCII is refused whether the line comes as str or UTF-8 bytes."""
        with pytest.raises(AbiError):
            parse_event_control(line)
        with pytest.raises(AbiError):
            parse_event_control(line.encode("utf-8"))

    def test_invalid_utf8_bytes(self) -> None:
        """Bytes that are not text at all are refused."""
        with pytest.raises(AbiError):
            parse_event_control(b"3 4 \xff\xfe")

    def test_too_long(self) -> None:
        """A line over MAX_LINE is refused before parsing, even if well-formed after padding."""
        padded = "3 4 4096" + " " * (MAX_LINE - len("3 4 4096") + 1)
        assert len(padded) == MAX_LINE + 1
        with pytest.raises(AbiError, match="longer"):
            parse_event_control(padded)
        with pytest.raises(AbiError, match="longer"):
            parse_event_control(padded.encode("ascii"))

    def test_max_line_accepted(self) -> None:
        """A line of exactly MAX_LINE bytes is still parsed."""
        padded = "3 4 4096" + " " * (MAX_LINE - len("3 4 4096"))
        assert len(padded) == MAX_LINE
        assert parse_event_control(padded.encode("ascii")) == RegisterShrinker(3, 4, 4096)

    @given(st.text(max_size=40))
    def test_never_crashes(self, line: str) -> None:
        """Arbitrary text either parses to a registration or raises AbiError, nothing else."""
        try:
            parsed = parse_event_control(line)
        except AbiError:
            return
        assert isinstance(parsed, (RegisterShrinker, RegisterLevel))
        assert line.isascii()
        if isinstance(parsed, RegisterShrinker):
            assert 0 < parsed.chunk_size <= MAX_CHUNK_SIZE
            assert math.isfinite(parsed.cost) and parsed.cost > 0


class TestMalformedReport:
    """Every malformed accounting line is an AbiError."""

    @pytest.mark.parametrize(
        "line",
        [
            pytest.param("", id="empty"),
            pytest.param("3", id="one-field"),
            pytest.param("3 1 2", id="three-fields"),
            pytest.param("3 ten", id="word-count"),
            pytest.param("3 1.5", id="float-count"),
            pytest.param("3 0x10", id="hex-count"),
            pytest.param("3 1_000", id="underscore-count"),
            pytest.param("3 --1", id="double-sign"),
            pytest.param("3 -", id="sign-only"),
            pytest.param("-3 1", id="negative-efd"),
            pytest.param("e 1", id="word-efd"),
            pytest.param(f"{2**31} 1", id="efd-over-int-max"),
            pytest.param(f"3 {MAX_REPORT + 1}", id="absurd-positive"),
            pytest.param(f"3 -{MAX_REPORT + 1}", id="absurd-negative"),
            pytest.param("3 " + "9" * 200, id="absurd-digits"),
            pytest.param("3 1\n3 2\n", id="two-lines"),
            pytest.param("3 1\x002", id="nul-inside"),
            pytest.param("3 \uff11", id="fullwidth-count"),
            pytest.param("3 \u00b2", id="superscript-count"),
        ],
    )
    def test_refused(self, line: str) -> None:
        """The line is refused as str and as (UTF-8) bytes."""
        with pytest.raises(AbiError):
            parse_report(line)
        with pytest.raises(AbiError):
            parse_report(line.encode("utf-8"))

    def test_too_long(self) -> None:
        """A report padded past MAX_LINE is refused."""
        with pytest.raises(AbiError, match="longer"):
            parse_report(b"3 1" + b" " * MAX_LINE)

    @given(st.binary(max_size=40))
    def test_never_crashes(self, line: bytes) -> None:
        """Arbitrary bytes either parse to a report within bounds or raise AbiError."""
        try:
            parsed = parse_report(line)
        except AbiError:
            return
        assert abs(parsed.chunks) <= MAX_REPORT
        assert 0 <= parsed.efd <= 2**31 - 1


class TestValidators:
    """validate_chunk_size and validate_cost, used by the client before writing."""

    @pytest.mark.parametrize("value", [1, 4096, MAX_CHUNK_SIZE])
    def test_chunk_size_ok(self, value: int) -> None:
        """Positive sizes up to 1 TiB pass through unchanged."""
        assert validate_chunk_size(value) == value

    @pytest.mark.parametrize("value", [0, -1, MAX_CHUNK_SIZE + 1, 4096.0, "4096", True, None])
    def test_chunk_size_bad(self, value: object) -> None:
        """Zero, negative, too large and non-int sizes (bool included) are refused."""
        with pytest.raises(AbiError):
            validate_chunk_size(value)  # type: ignore[arg-type]

    @pytest.mark.parametrize("value", [1, 0.5, 2.0, MIN_COST, MAX_COST, 1000])
    def test_cost_ok(self, value: float) -> None:
        """Costs from 0.001 to 1000 come back as floats."""
        result = validate_cost(value)
        assert result == value and isinstance(result, float)

    @pytest.mark.parametrize(
        "value",
        [0, -1.0, 1e-320, 1e-300, 0.000999, 1000.001, 1e300, math.nan, math.inf, "1", True, None],
    )
    def test_cost_bad(self, value: object) -> None:
        """Zero, negative, out of 0.001..1000 (a subnormal too), NaN, infinite, non-numbers."""
        with pytest.raises(AbiError):
            validate_cost(value)  # type: ignore[arg-type]
