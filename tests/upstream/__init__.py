"""Upstream test suites (cachetools', CPython's functools tests) run against pyshrinker's caches."""
