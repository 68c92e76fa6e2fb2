"""Prometheus exporter and the request observer hook behind it."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pyshrinker import Shrinker, client, settle
from pyshrinker import controller as controller_module
from pyshrinker.client import RequestOutcome, add_request_observer, remove_request_observer
from pyshrinker.metrics import (
    ShrinkerCollector,
    default_controller_if_started,
    register,
    start_http_server,
)

from .helpers import ScriptedMemory, private_controller

MiB = 1 << 20
LIMIT = 512 * MiB
WORKING_SET = 100 * MiB

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(registry: CollectorRegistry) -> Samples:
    """What Prometheus would read from ``registry`` now."""
    return parse(generate_latest(registry).decode("utf-8"))


def of(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """The key of one sample."""
    return name, frozenset(labels.items())


@pytest.fixture
def ctl():
    """A private controller over scripted memory (well below its limit) and its transport."""
    memory = ScriptedMemory.with_limit(LIMIT, working_set=WORKING_SET)
    with private_controller(memory) as pair:
        yield pair


class Freer:
    """Frees ``share`` of what it is asked (1.0 = all), or raises."""

    def __init__(self, share: float = 1.0, fail: bool = False) -> None:
        self.share = share
        self.fail = fail

    def __call__(self, n: int) -> int:
        if self.fail:
            raise RuntimeError("no")
        return int(n * self.share)


class TestRequestObserver:
    """add_request_observer sees every handled request."""

    def test_outcomes(self, ctl):
        """Asked, freed, re-added and failure reach the observer; removal stops it."""
        controller, transport = ctl
        seen: list[RequestOutcome] = []
        add_request_observer(seen.append)
        try:
            with Shrinker.register(MiB, Freer(0.5), transport=transport) as s:
                s.report(10)
                controller.request(s.efd, 4)
                assert settle()
                s._reclaim = Freer(fail=True)
                controller.request(s.efd, 3)
                assert settle()
                remove_request_observer(seen.append)
                controller.request(s.efd, 1)
                assert settle()
        finally:
            remove_request_observer(seen.append)
        assert [(o.shrinker, o.asked, o.freed, o.readded, o.failed) for o in seen] == [
            (s, 4, 2, 2, False),
            (s, 3, 0, 3, True),
        ]
        assert all(0 < o.reaction_s < 5 for o in seen)

    def test_raising_observer_is_logged(self, ctl, caplog):
        """An observer that raises is logged and the request is still settled."""
        controller, transport = ctl

        def broken(outcome: RequestOutcome) -> None:
            raise ValueError("observer broke")

        add_request_observer(broken)
        try:
            with (
                caplog.at_level(logging.ERROR, logger="pyshrinker"),
                Shrinker.register(MiB, Freer(0.5), transport=transport) as s,
            ):
                s.report(10)
                controller.request(s.efd, 4)
                assert settle()
                assert controller.count(s.efd) == 8
        finally:
            remove_request_observer(broken)
        assert "observer broke" in caplog.text


class TestExporter:
    """The collector's output after real requests, parsed back."""

    def test_after_real_requests(self, ctl):
        """Per-shrinker counters, held chunks, reaction histogram, memory and controller."""
        controller, transport = ctl
        registry = CollectorRegistry()
        with (
            Shrinker.register(MiB, Freer(0.5), name="half", transport=transport) as half,
            Shrinker.register(4096, Freer(), name="all", transport=transport) as whole,
            register(registry, controller=controller, shrinkers=lambda: [half, whole]),
        ):
            half.report(10)
            whole.report(300)  # past one batch of 256: sent
            whole.flush()
            controller.request(half.efd, 4)
            controller.request(whole.efd, 100)
            assert settle()
            controller.request(whole.efd, 50)
            assert settle()
            got = scrape(registry)
        assert got[of("pyshrinker_requests_total", shrinker="half")] == 1
        assert got[of("pyshrinker_requests_total", shrinker="all")] == 2
        assert got[of("pyshrinker_chunks_requested_total", shrinker="half")] == 4
        assert got[of("pyshrinker_chunks_freed_total", shrinker="half")] == 2
        assert got[of("pyshrinker_chunks_readded_total", shrinker="half")] == 2
        assert got[of("pyshrinker_chunks_freed_total", shrinker="all")] == 150
        assert got[of("pyshrinker_callback_errors_total", shrinker="all")] == 0
        assert got[of("pyshrinker_held_chunks", shrinker="half")] == 8
        assert got[of("pyshrinker_held_bytes", shrinker="half")] == 8 * MiB
        assert got[of("pyshrinker_held_chunks", shrinker="all")] == 150
        assert got[of("pyshrinker_reaction_seconds_count", shrinker="half")] == 1
        assert got[of("pyshrinker_reaction_seconds_count", shrinker="all")] == 2
        assert got[of("pyshrinker_reaction_seconds_bucket", shrinker="all", le="+Inf")] == 2
        assert 0 < got[of("pyshrinker_reaction_seconds_sum", shrinker="all")] < 5
        assert got[of("pyshrinker_memory_usage_bytes")] == WORKING_SET
        assert got[of("pyshrinker_memory_working_set_bytes")] == WORKING_SET
        assert got[of("pyshrinker_memory_limit_bytes")] == LIMIT
        assert got[of("pyshrinker_controller_shrinkers")] == 2
        assert got[of("pyshrinker_controller_reclaimable_bytes")] == 8 * MiB + 150 * 4096

    def test_same_name_summed_and_live_by_default(self, ctl):
        """Shrinkers sharing a name are summed; by default every live shrinker is reported."""
        controller, transport = ctl
        name = f"shared-{uuid.uuid4().hex[:8]}"
        registry = CollectorRegistry()
        with (
            Shrinker.register(MiB, Freer(), name=name, transport=transport) as a,
            Shrinker.register(MiB, Freer(), name=name, transport=transport) as b,
            register(registry, controller=controller),
        ):
            a.report(3)
            b.report(4)
            assert scrape(registry)[of("pyshrinker_held_chunks", shrinker=name)] == 7
            b.close()
            assert scrape(registry)[of("pyshrinker_held_chunks", shrinker=name)] == 3
        assert of("pyshrinker_held_chunks", shrinker=name) not in scrape(registry)

    def test_close_unregisters(self, ctl):
        """After close() the registry holds nothing of ours and may be registered again."""
        controller, _ = ctl
        registry = CollectorRegistry()
        exporter = register(registry, controller=controller)
        with pytest.raises(ValueError, match="Duplicated"):
            register(registry, controller=controller)
        assert exporter.observe in client._observers
        exporter.close()
        exporter.close()
        assert exporter.observe not in client._observers
        assert not any(name.startswith("pyshrinker") for name, _ in scrape(registry))
        with register(registry, controller=controller):
            assert of("pyshrinker_controller_shrinkers") in scrape(registry)

    def test_no_controller_started(self, monkeypatch):
        """Without a started default controller, no memory figures and none is started."""
        monkeypatch.setattr(controller_module, "_default", None)
        assert default_controller_if_started() is None
        collector = ShrinkerCollector(shrinkers=list)
        assert list(collector.collect()) == []
        assert controller_module._default is None

    def test_http_server(self, ctl):
        """start_http_server serves the text format on the local host; close() stops it."""
        controller, transport = ctl
        registry = CollectorRegistry()
        with Shrinker.register(MiB, Freer(), name="served", transport=transport) as s:
            exporter = start_http_server(0, registry=registry, controller=controller)
            try:
                assert exporter.server is not None
                host, port = exporter.server.server_address[:2]
                assert host == "127.0.0.1"
                s.report(5)
                controller.request(s.efd, 2)
                assert settle()
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as response:
                    got = parse(response.read().decode("utf-8"))
                assert got[of("pyshrinker_chunks_freed_total", shrinker="served")] == 2
            finally:
                exporter.close()
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(url, timeout=2)
