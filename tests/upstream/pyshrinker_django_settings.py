"""Settings for Django's own test runner (tests/runtests.py) with LocMemCache -> ShrinkableCache.

Django's suite names its backend as ``django.core.cache.backends.locmem.LocMemCache`` in every
``override_settings``; the settings module is imported before any cache is made, so pointing
that name at :class:`pyshrinker.contrib.django.ShrinkableCache` runs every test written for
``LocMemCache`` (``LocMemCacheTests`` and the middleware, utils and i18n tests that use it)
against ours, unchanged. The other backends' tests (database, file) run on their own backends.
"""

import django.core.cache.backends.locmem as locmem
from test_sqlite import *  # noqa: F403  (the sdist's own default settings)

from pyshrinker.contrib.django import ShrinkableCache

locmem.LocMemCache = ShrinkableCache  # type: ignore[misc]
