"""A small Django service whose cache is pyshrinker.contrib.django.ShrinkableCache.

One module is the whole project (settings, URLs, views), served by any WSGI server::

    cd examples/frameworks
    gunicorn --workers 2 --worker-class gthread --threads 4 django_service:application
    curl -s -D- http://127.0.0.1:8000/item/hello | head

``PYSHRINKER_EXAMPLE_CACHE=builtin`` serves the same from Django's ``LocMemCache`` (see
service_common.py for the other settings). benchmarks/frameworks.py runs it in a 256 MiB
memory cgroup under a load that wants several times that.
"""

from __future__ import annotations

import json

import django
from django.conf import settings
from service_common import CACHE_KIND, MAX_ENTRIES, cache_figures, value_for

_options = {} if MAX_ENTRIES is None else {"MAX_ENTRIES": MAX_ENTRIES}
settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    SECRET_KEY="pyshrinker-example-not-secret",
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    CACHES={
        "default": {
            "BACKEND": (
                "pyshrinker.contrib.django.ShrinkableCache"
                if CACHE_KIND == "shrinkable"
                else "django.core.cache.backends.locmem.LocMemCache"
            ),
            "LOCATION": "items",
            "TIMEOUT": None,
            "OPTIONS": _options,
        }
    },
)
django.setup()

from django.core.cache import cache  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402


def item(request: HttpRequest, key: str) -> HttpResponse:
    value = cache.get(key)
    hit = value is not None
    if not hit:
        value = value_for(key)
        cache.set(key, value)
    response = HttpResponse(value, content_type="application/octet-stream")
    response["X-Cache"] = "hit" if hit else "miss"
    return response


def stats(request: HttpRequest) -> HttpResponse:
    return HttpResponse(json.dumps(cache_figures(cache._cache)), content_type="application/json")


urlpatterns = [path("item/<str:key>", item), path("stats", stats)]
application = get_wsgi_application()
