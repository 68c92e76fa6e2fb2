"""CPython's own lru_cache tests (the running interpreter's Lib/test/test_functools.py), run
against :func:`pyshrinker.shrinkable_cache`.

The upstream ``TestLRU`` and ``TestCache`` classes take the functools module they test as
``module``: ours is functools with ``lru_cache`` and ``cache`` replaced by ``shrinkable_cache``.
The tests of an intended difference are expected to fail (``INTENDED``, with the reason;
docs/howto/functools.md lists the same): strict, so a test that starts passing is noticed.
"""

from __future__ import annotations

import functools
import sysconfig
import types
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyshrinker import CacheInfo, shrinkable_cache

from .sources import load_cpython_test_functools

upstream = load_cpython_test_functools()


def _cache(user_function: Callable[..., Any]) -> Any:
    """functools.cache: an unbounded cache."""
    return shrinkable_cache(maxsize=None)(user_function)


#: functools, as the upstream tests see it, with our decorator in place of lru_cache.
shrinkable_functools = types.ModuleType("shrinkable_functools")
shrinkable_functools.__dict__.update(
    {name: getattr(functools, name) for name in dir(functools) if not name.startswith("__")}
)
shrinkable_functools.lru_cache = shrinkable_cache  # type: ignore[attr-defined]
shrinkable_functools.cache = _cache  # type: ignore[attr-defined]
shrinkable_functools._CacheInfo = CacheInfo  # type: ignore[attr-defined]


@shrinkable_cache()
def shrinkable_cached_func(x: int, y: int) -> int:
    """Pickled by reference (test_pickle): a module-level name, as upstream's py_cached_func."""
    return 3 * x + y


#: Tests of an intended difference: test name -> why. (None on this interpreter.)
INTENDED: dict[str, str] = {}


def _mark_intended(cls: type[Any]) -> type[Any]:
    for name in dir(cls):
        reason = INTENDED.get(name)
        if reason is not None:
            setattr(cls, name, pytest.mark.xfail(reason=reason, strict=True)(getattr(cls, name)))
    return cls


@_mark_intended
class TestShrinkableLRU(upstream.TestLRU, unittest.TestCase):  # type: ignore[misc]
    """CPython's TestLRU, as TestLRUC and TestLRUPy run it, on shrinkable_cache."""

    module = shrinkable_functools
    cached_func = (shrinkable_cached_func,)

    @shrinkable_cache()
    def cached_meth(self, x: int, y: int) -> int:
        return 3 * x + y

    @staticmethod
    @shrinkable_cache()
    def cached_staticmeth(x: int, y: int) -> int:
        return 3 * x + y


@_mark_intended
class TestShrinkableCache(upstream.TestCache, unittest.TestCase):  # type: ignore[misc]
    """CPython's TestCache (functools.cache) on shrinkable_cache(maxsize=None)."""

    module = shrinkable_functools


def test_the_running_interpreters_suite() -> None:
    """The tests run are this interpreter's own (not another version's copy)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(upstream.__file__).resolve().is_relative_to(stdlib), (upstream.__file__, stdlib)
