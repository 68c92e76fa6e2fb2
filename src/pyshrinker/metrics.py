"""Prometheus metrics: what the shrinkers were asked and freed, how fast, and memory.

Needs the ``metrics`` extra (``pip install 'pyshrinker[metrics]'``, which brings
``prometheus-client``)::

    from pyshrinker import metrics

    metrics.start_http_server(9464)             # serves /metrics on 127.0.0.1:9464
    # or, into an application's own registry:
    exporter = metrics.register(registry)

Most figures are read when Prometheus scrapes, from what already exists: each live shrinker's
:meth:`~pyshrinker.client.Shrinker.stats` (summed by shrinker name), the controller's
registrations (:meth:`~pyshrinker.controller.Controller.shrinkers`) and one reading of its
memory source. Only the reaction time histogram is fed as requests happen, by a request
observer (:func:`~pyshrinker.client.add_request_observer`) that exists only while an exporter is
registered, so without one handling a request costs nothing more.

The metrics (counters and the held gauges per ``shrinker`` label, the shrinker's name):

* ``pyshrinker_requests_total``: requests handled;
* ``pyshrinker_chunks_requested_total``, ``pyshrinker_chunks_freed_total``,
  ``pyshrinker_chunks_readded_total``: chunks asked, freed by the callbacks, given back unfreed;
* ``pyshrinker_callback_errors_total``: callbacks that raised or returned no count;
* ``pyshrinker_held_chunks``, ``pyshrinker_held_bytes`` (gauges): what the shrinkers hold;
* ``pyshrinker_reaction_seconds`` (histogram): from reading a request to the callback's return;
* ``pyshrinker_memory_usage_bytes``, ``pyshrinker_memory_working_set_bytes``,
  ``pyshrinker_memory_limit_bytes`` (gauges): the controller's memory source now (no limit
  sample when there is no limit);
* ``pyshrinker_controller_shrinkers``, ``pyshrinker_controller_reclaimable_bytes`` (gauges): the
  registrations the controller holds and the bytes it counts as reclaimable.

Counters are sums over the shrinkers alive now: when one is closed its counts leave the sum,
which Prometheus takes as a counter reset.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

import attrs

try:
    import prometheus_client
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
    )
    from prometheus_client.registry import CollectorRegistry
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pyshrinker.metrics needs prometheus-client: pip install 'pyshrinker[metrics]'"
    ) from err

from pyshrinker import controller as _controller_module
from pyshrinker.client import (
    RequestOutcome,
    Shrinker,
    ShrinkerStats,
    add_request_observer,
    live_shrinkers,
    remove_request_observer,
)
from pyshrinker.controller import Controller
from pyshrinker.errors import PyshrinkerError

log = logging.getLogger(__name__)

#: Bucket bounds of the reaction time histogram, in seconds.
REACTION_BUCKETS = (
    0.00001,
    0.00005,
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
)

_COUNTERS: tuple[tuple[str, str, Callable[[ShrinkerStats], int]], ...] = (
    ("pyshrinker_requests", "Shrink requests handled.", lambda s: s.requests),
    (
        "pyshrinker_chunks_requested",
        "Chunks asked by the controller.",
        lambda s: s.chunks_requested,
    ),
    ("pyshrinker_chunks_freed", "Chunks the reclaim callbacks freed.", lambda s: s.chunks_freed),
    ("pyshrinker_chunks_readded", "Chunks given back as not freed.", lambda s: s.chunks_readded),
    (
        "pyshrinker_callback_errors",
        "Reclaim callbacks that raised or returned no count.",
        lambda s: s.callback_errors,
    ),
)

ControllerSource = Controller | Callable[[], "Controller | None"] | None


def default_controller_if_started() -> Controller | None:
    """The process's embedded controller if it has been started (never starts one).

    .. versionadded:: 0.1.0
    """
    controller = _controller_module._default
    if controller is None or controller.closed:
        return None
    return controller


class ShrinkerCollector:
    """A prometheus_client collector reading shrinkers, controller and memory at scrape time.

    ``shrinkers`` returns the shrinkers to report (default: every live one in the process);
    ``controller`` is a controller, a function returning one (or None), or None for the
    process's embedded controller when it has been started.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        shrinkers: Callable[[], Iterable[Shrinker]] = live_shrinkers,
        controller: ControllerSource = None,
    ) -> None:
        self._shrinkers = shrinkers
        self._controller = controller

    def _current_controller(self) -> Controller | None:
        source = self._controller
        if source is None:
            return default_controller_if_started()
        if isinstance(source, Controller):
            return source
        return source()

    def describe(self) -> Iterable[Metric]:
        """The metric families (without samples), so registries can detect name clashes."""
        counters, gauges = self._families()
        return [*counters.values(), *gauges.values()]

    @staticmethod
    def _families() -> tuple[dict[str, CounterMetricFamily], dict[str, GaugeMetricFamily]]:
        per = ["shrinker"]
        counters = {name: CounterMetricFamily(name, doc, labels=per) for name, doc, _ in _COUNTERS}
        gauges = {
            name: GaugeMetricFamily(name, doc, labels=labels)
            for name, doc, labels in (
                ("pyshrinker_held_chunks", "Chunks held.", per),
                ("pyshrinker_held_bytes", "Bytes held, in chunks.", per),
                ("pyshrinker_memory_usage_bytes", "Memory usage.", []),
                (
                    "pyshrinker_memory_working_set_bytes",
                    "Memory usage less inactive file cache.",
                    [],
                ),
                ("pyshrinker_memory_limit_bytes", "Memory limit.", []),
                (
                    "pyshrinker_controller_shrinkers",
                    "Shrinkers registered with the controller.",
                    [],
                ),
                (
                    "pyshrinker_controller_reclaimable_bytes",
                    "Bytes the controller counts as reclaimable.",
                    [],
                ),
            )
        }
        return counters, gauges

    def collect(self) -> Iterable[Metric]:
        """Read everything now and return the metric families."""
        counters, gauges = self._families()
        totals: dict[str, list[int]] = {}
        for shrinker in self._shrinkers():
            stats = shrinker.stats()
            row = totals.setdefault(shrinker.name, [0] * (len(_COUNTERS) + 2))
            for i, (_, _, value) in enumerate(_COUNTERS):
                row[i] += value(stats)
            row[-2] += stats.held
            row[-1] += stats.held * shrinker.chunk_size
        for label, row in sorted(totals.items()):
            for i, (name, _, _) in enumerate(_COUNTERS):
                counters[name].add_metric([label], row[i])
            gauges["pyshrinker_held_chunks"].add_metric([label], row[-2])
            gauges["pyshrinker_held_bytes"].add_metric([label], row[-1])
        controller = self._current_controller()
        if controller is not None:
            infos = controller.shrinkers()
            gauges["pyshrinker_controller_shrinkers"].add_metric([], len(infos))
            reclaimable = sum(info.count * info.chunk_size for info in infos)
            gauges["pyshrinker_controller_reclaimable_bytes"].add_metric([], reclaimable)
            memory = controller.memory
            if memory is not None:
                try:
                    state = memory.read()
                except (OSError, PyshrinkerError) as err:
                    log.debug("metrics: reading memory failed: %s", err)
                else:
                    gauges["pyshrinker_memory_usage_bytes"].add_metric([], state.usage)
                    gauges["pyshrinker_memory_working_set_bytes"].add_metric([], state.working_set)
                    if state.limit is not None:
                        gauges["pyshrinker_memory_limit_bytes"].add_metric([], state.limit)
        # Families without samples are left out (no limit, no controller...).
        return [f for f in (*counters.values(), *gauges.values()) if f.samples]


@attrs.define(eq=False)
class Exporter:
    """What :func:`register` added to a registry; :meth:`close` takes it all out again.

    .. versionadded:: 0.1.0
    """

    registry: CollectorRegistry
    collector: ShrinkerCollector
    #: Seconds from reading a request to the callback's return, per shrinker name.
    reaction: prometheus_client.Histogram
    server: WSGIServer | None = None
    _thread: threading.Thread | None = attrs.field(default=None, alias="thread")
    _closed: bool = attrs.field(default=False, alias="closed")

    def observe(self, outcome: RequestOutcome) -> None:
        """Record one handled request (the request observer)."""
        self.reaction.labels(outcome.shrinker.name).observe(outcome.reaction_s)

    def close(self) -> None:
        """Stop observing, unregister from the registry, stop the HTTP server; idempotent."""
        if self._closed:
            return
        self._closed = True
        remove_request_observer(self.observe)
        for collector in (self.collector, self.reaction):
            try:
                self.registry.unregister(collector)
            except KeyError:
                pass
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def register(
    registry: CollectorRegistry | None = None,
    *,
    controller: ControllerSource = None,
    shrinkers: Callable[[], Iterable[Shrinker]] = live_shrinkers,
) -> Exporter:
    """Add pyshrinker's metrics to ``registry`` (default: prometheus_client's global one).

    ``controller`` and ``shrinkers`` are as for :class:`ShrinkerCollector`. Registering twice
    in one registry raises ValueError (duplicated time series); close the first one before.

    .. versionadded:: 0.1.0
    """
    registry = registry if registry is not None else prometheus_client.REGISTRY
    collector = ShrinkerCollector(shrinkers, controller)
    registry.register(collector)
    try:
        reaction = prometheus_client.Histogram(
            "pyshrinker_reaction_seconds",
            "Seconds from reading a shrink request to the reclaim callback's return.",
            ["shrinker"],
            buckets=REACTION_BUCKETS,
            registry=registry,
        )
    except BaseException:
        registry.unregister(collector)
        raise
    exporter = Exporter(registry, collector, reaction)
    add_request_observer(exporter.observe)
    return exporter


def start_http_server(
    port: int,
    addr: str = "127.0.0.1",
    *,
    registry: CollectorRegistry | None = None,
    controller: ControllerSource = None,
) -> Exporter:
    """Register the metrics and serve them over HTTP on ``addr:port`` from a daemon thread.

    Only the local host by default. Port 0 picks a free port: read it from
    ``exporter.server.server_port``. ``close()`` stops the server.

    .. versionadded:: 0.1.0
    """
    registry = registry if registry is not None else prometheus_client.REGISTRY
    exporter = register(registry, controller=controller)
    try:
        server, thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
    except BaseException:
        exporter.close()
        raise
    exporter.server = server
    exporter._thread = thread
    return exporter


__all__ = [
    "REACTION_BUCKETS",
    "Exporter",
    "ShrinkerCollector",
    "default_controller_if_started",
    "register",
    "start_http_server",
]
