"""Ready-made subscribers: gc + malloc_trim on pressure, clear() on oom."""

from __future__ import annotations

import gc
import logging

import pytest

import pyshrinker
from pyshrinker import ChunkCache, Level, settle
from pyshrinker import _syscalls as syscalls
from pyshrinker.subscribers import drop_on_oom, trim_on_pressure

from .helpers import private_controller


@pytest.fixture
def ctl():
    """A private controller and its embedded transport."""
    with private_controller() as pair:
        yield pair


@pytest.fixture
def trims(monkeypatch) -> list[str]:
    """Record gc.collect and malloc_trim calls (the real ones still run)."""
    calls: list[str] = []
    real_collect, real_trim = gc.collect, syscalls.malloc_trim

    def collect(*args: int) -> int:
        calls.append("gc")
        return real_collect(*args)

    def malloc_trim(pad: int = 0) -> bool:
        calls.append(f"malloc_trim({pad})")
        return real_trim(pad)

    monkeypatch.setattr(gc, "collect", collect)
    monkeypatch.setattr(syscalls, "malloc_trim", malloc_trim)
    return calls


class Exploding(dict):
    """A cache whose clear() fails."""

    def clear(self) -> None:
        raise OSError("cannot clear")


class TestTrimOnPressure:
    """trim_on_pressure runs a full collection, then malloc_trim(0)."""

    def test_medium_triggers_gc_then_trim(self, ctl, trims, caplog):
        """Low pressure does nothing; medium collects, then trims; closed, nothing more."""
        controller, transport = ctl
        with (
            caplog.at_level(logging.INFO, logger="pyshrinker"),
            trim_on_pressure(transport=transport) as sub,
        ):
            assert sub.level is Level.MEDIUM
            controller.notify_level(Level.LOW)
            assert settle()
            assert trims == []
            controller.notify_level(Level.MEDIUM)
            assert settle()
            assert trims == ["gc", "malloc_trim(0)"]
        assert "medium pressure: gc collected" in caplog.text
        controller.notify_level(Level.OOM)
        assert settle()
        assert trims == ["gc", "malloc_trim(0)"]

    def test_oom_only(self, ctl, trims):
        """An oom-level subscription ignores medium and trims on oom."""
        controller, transport = ctl
        with trim_on_pressure("oom", transport=transport):
            controller.notify_level(Level.MEDIUM)
            assert settle()
            assert trims == []
            controller.notify_level(Level.OOM)
            assert settle()
        assert trims == ["gc", "malloc_trim(0)"]

    def test_level_argument(self, ctl, trims):
        """A low-level subscription trims on low pressure too."""
        controller, transport = ctl
        with trim_on_pressure("low", transport=transport):
            controller.notify_level(Level.LOW)
            assert settle()
        assert trims == ["gc", "malloc_trim(0)"]

    def test_exported(self):
        """The helpers are importable from the package."""
        assert pyshrinker.trim_on_pressure is trim_on_pressure
        assert pyshrinker.drop_on_oom is drop_on_oom


class TestDropOnOom:
    """drop_on_oom clears every cache on oom only."""

    def test_clears_on_oom_only(self, ctl, caplog):
        """Medium leaves the caches; oom clears them all, a ChunkCache included."""
        controller, transport = ctl
        plain = {"a": 1, "b": 2}
        chunked = ChunkCache(4096, transport=transport)
        try:
            chunked["x"] = b"x" * 100
            with (
                caplog.at_level(logging.WARNING, logger="pyshrinker"),
                drop_on_oom(plain, chunked, transport=transport),
            ):
                controller.notify_level(Level.MEDIUM)
                assert settle()
                assert plain and len(chunked) == 1
                controller.notify_level(Level.OOM)
                assert settle()
                assert plain == {}
                assert len(chunked) == 0
            assert "oom pressure: cleared 2 of 2 caches" in caplog.text
        finally:
            chunked.close()

    def test_failing_clear_does_not_stop_the_others(self, ctl, caplog):
        """A cache that cannot be cleared is logged; the rest are cleared."""
        controller, transport = ctl
        bad = Exploding(a=1)
        good = {"b": 2}
        with (
            caplog.at_level(logging.WARNING, logger="pyshrinker"),
            drop_on_oom(bad, good, transport=transport),
        ):
            controller.notify_level(Level.OOM)
            assert settle()
        assert good == {}
        assert "cannot clear" in caplog.text
        assert "cleared 1 of 2 caches" in caplog.text

    def test_needs_clear_method(self, ctl):
        """Objects without clear() are refused up front."""
        _, transport = ctl
        with pytest.raises(TypeError, match="clear"):
            drop_on_oom({}, 42, transport=transport)  # type: ignore[arg-type]
