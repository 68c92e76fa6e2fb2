"""A small Flask service whose Flask-Caching backend is pyshrinker's ShrinkableSimpleCache.

Served by any WSGI server::

    cd examples/frameworks
    gunicorn --workers 2 --worker-class gthread --threads 4 flask_service:app
    curl -s -D- http://127.0.0.1:8000/item/hello | head

``PYSHRINKER_EXAMPLE_CACHE=builtin`` serves the same from Flask-Caching's ``SimpleCache``
(see service_common.py for the other settings). benchmarks/frameworks.py runs it in a 256 MiB
memory cgroup under a load that wants several times that.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify
from flask_caching import Cache
from service_common import CACHE_KIND, MAX_ENTRIES, cache_figures, value_for

app = Flask(__name__)
# An hour: nothing expires during a benchmark, so the cache's size is what is measured. (Not 0,
# "never": past its threshold SimpleCache takes never-expiring entries for expired, and drops
# them all.)
app.config["CACHE_DEFAULT_TIMEOUT"] = 3600
if CACHE_KIND == "shrinkable":
    app.config["CACHE_TYPE"] = "pyshrinker.contrib.cachelib.ShrinkableSimpleCache"
    app.config["CACHE_OPTIONS"] = {"threshold": MAX_ENTRIES}
else:
    app.config["CACHE_TYPE"] = "SimpleCache"
    if MAX_ENTRIES is not None:
        app.config["CACHE_THRESHOLD"] = MAX_ENTRIES
cache = Cache(app)


@app.get("/item/<key>")
def item(key: str) -> Response:
    value = cache.get(key)
    hit = value is not None
    if not hit:
        value = value_for(key)
        cache.set(key, value)
    response = Response(value, content_type="application/octet-stream")
    response.headers["X-Cache"] = "hit" if hit else "miss"
    return response


@app.get("/stats")
def stats() -> Response:
    return jsonify(cache_figures(cache.cache._cache))
