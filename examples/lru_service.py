"""A small HTTP caching service in front of a slow backend, that keeps serving under a memory limit.

``GET /item/<key>`` answers with the key's value: from a :class:`~pyshrinker.ShrinkableLRU` when
it is there, else from the backend (a simulated one: it sleeps ``--backend-latency`` seconds and
generates a deterministic value of ``--value-size`` bytes, ~100 KiB by default), then cached.
``GET /stats`` answers with the cache's and the shrinker's figures as JSON.

The cache has no ``maxsize``: it grows while memory is free and gives entries back, least
recently used first, when the controller asks, so the service keeps answering inside a
memory-limited cgroup whose limit is smaller than its working set. With a plain
``cachetools.LRUCache`` you would have to guess a size that is safe at the worst moment.

It binds to 127.0.0.1 only and prints ``listening on http://127.0.0.1:<port>`` first (``--port
0``, the default, picks a free port). Run it under a limit, for example (as root)::

    pyshrinker run --memory 128M -- python examples/lru_service.py --port 8080
    curl -s http://127.0.0.1:8080/item/hello | wc -c
    curl -s http://127.0.0.1:8080/stats

``tests/test_lru_service.py`` runs it in a 128 MiB cgroup v1 group and drives it over more keys
than fit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from pyshrinker import ShrinkableLRU, default_controller

HOST = "127.0.0.1"
DEFAULT_VALUE_SIZE = 100 * 1024


def value_for(key: str, size: int = DEFAULT_VALUE_SIZE) -> bytes:
    """The backend's value for ``key``: ``size`` bytes, the same every time, fresh each call."""
    seed = hashlib.blake2b(key.encode("utf-8"), digest_size=64).digest()
    return (seed * (size // len(seed) + 1))[:size]


class SlowBackend:
    """A backend that takes ``latency`` seconds per fetch (a database, a renderer...)."""

    def __init__(self, latency: float, value_size: int) -> None:
        self.latency = latency
        self.value_size = value_size
        self.fetches = 0
        self._lock = threading.Lock()

    def fetch(self, key: str) -> bytes:
        """The value of ``key``, slowly."""
        time.sleep(self.latency)
        with self._lock:
            self.fetches += 1
        return value_for(key, self.value_size)


class CachingService:
    """The cache in front of the backend, and the figures ``/stats`` reports."""

    def __init__(self, backend: SlowBackend) -> None:
        self.backend = backend
        self.cache: ShrinkableLRU[str, bytes] = ShrinkableLRU(name="lru-service")
        self.started = time.monotonic()

    def get(self, key: str) -> tuple[bytes, bool]:
        """The value of ``key`` and whether it came from the cache."""
        value = self.cache.get(key)
        if value is not None:
            return value, True
        value = self.backend.fetch(key)
        self.cache[key] = value
        return value, False

    def stats(self) -> dict[str, Any]:
        """The cache's and the shrinker's figures."""
        stats = self.cache.stats()
        shrinker = self.cache.shrinker.stats()
        return {
            "entries": stats.entries,
            "cached_bytes": stats.currsize,
            "chunks": stats.chunks,
            "hits": stats.hits,
            "misses": stats.misses,
            "evicted_on_request": stats.evicted_on_request,
            "backend_fetches": self.backend.fetches,
            "shrink_requests": shrinker.requests,
            "chunks_requested": shrinker.chunks_requested,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "signals": default_controller().describe_signals(),
        }


def make_handler(service: CachingService) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``service``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
        server_version = "pyshrinker-lru-service/0.1"

        def do_GET(self) -> None:
            if self.path.startswith("/item/") and len(self.path) > len("/item/"):
                key = unquote(self.path[len("/item/") :])
                value, hit = service.get(key)
                self._send(HTTPStatus.OK, value, "application/octet-stream", hit)
            elif self.path == "/stats":
                body = json.dumps(service.stats()).encode()
                self._send(HTTPStatus.OK, body, "application/json", None)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", None)

        def _send(self, status: HTTPStatus, body: bytes, kind: str, hit: bool | None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            if hit is not None:
                self.send_header("X-Cache", "hit" if hit else "miss")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would be most of the output

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--value-size", type=int, default=DEFAULT_VALUE_SIZE)
    parser.add_argument("--backend-latency", type=float, default=0.005, help="seconds per fetch")
    args = parser.parse_args(argv)

    service = CachingService(SlowBackend(args.backend_latency, args.value_size))
    server = ThreadingHTTPServer((HOST, args.port), make_handler(service))
    server.daemon_threads = True

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on http://{HOST}:{server.server_address[1]}", flush=True)
    print("controller signals:", "; ".join(default_controller().describe_signals()), flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        service.cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
