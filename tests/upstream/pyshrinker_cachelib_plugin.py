"""A pytest plugin (``-p``) that runs cachelib's own SimpleCache tests against ours.

cachelib's ``tests/test_simple_cache.py`` does ``from cachelib import SimpleCache`` and
parametrizes its tests over that class and a subclass of it. A ``-p`` plugin is imported
before any conftest or test module, so pointing ``cachelib.SimpleCache`` at
:class:`pyshrinker.contrib.cachelib.ShrinkableSimpleCache` here runs those tests, unchanged,
against ours.
"""

import cachelib

from pyshrinker.contrib.cachelib import ShrinkableSimpleCache

cachelib.SimpleCache = ShrinkableSimpleCache  # type: ignore[misc]
