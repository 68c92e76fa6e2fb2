"""pyshrinker.contrib: what the upstream suites cannot see (shrink requests, sizes, versions)."""

from __future__ import annotations

import pickle
import sys
import uuid
from importlib import metadata

import pytest

from pyshrinker.contrib import ENTRY_OVERHEAD, require_version
from pyshrinker.errors import FrameworkVersionError, PyshrinkerError


class TestRequireVersion:
    def test_older_is_refused_with_the_version_needed(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(metadata, "version", lambda name: "4.1.13")
        with pytest.raises(FrameworkVersionError) as info:
            require_version("Django", (4, 2), "pyshrinker.contrib.django")
        assert "needs Django >= 4.2" in str(info.value)
        assert "4.1.13 is installed" in str(info.value)
        assert isinstance(info.value, ImportError) and isinstance(info.value, PyshrinkerError)

    @pytest.mark.parametrize("found", ["4.2", "4.2.0rc1", "5.2.19", "10.0"])
    def test_new_enough_passes(self, monkeypatch: pytest.MonkeyPatch, found: str) -> None:
        monkeypatch.setattr(metadata, "version", lambda name: found)
        require_version("Django", (4, 2), "pyshrinker.contrib.django")

    def test_an_old_framework_fails_the_import(self, monkeypatch: pytest.MonkeyPatch) -> None:
        pytest.importorskip("django")
        monkeypatch.setattr(metadata, "version", lambda name: "3.2.25")
        monkeypatch.delitem(sys.modules, "pyshrinker.contrib.django", raising=False)
        with pytest.raises(FrameworkVersionError, match=r"needs Django >= 4\.2"):
            import pyshrinker.contrib.django  # noqa: F401


class TestDjango:
    @pytest.fixture
    def cache(self) -> object:
        pytest.importorskip("django")
        from pyshrinker.contrib.django import ShrinkableCache

        cache = ShrinkableCache(f"test-{uuid.uuid4().hex}", {})
        yield cache
        cache.clear()

    def test_no_max_entries_means_no_cap(self, cache: object) -> None:
        for n in range(1000):
            cache.set(n, n)  # type: ignore[attr-defined]
        assert len(cache._cache) == 1000  # type: ignore[attr-defined]
        assert cache.get(0) == 0  # type: ignore[attr-defined]

    def test_entries_are_sized_by_their_pickles(self, cache: object) -> None:
        cache.set("a", b"x" * 10_000)  # type: ignore[attr-defined]
        cache.set("b", "y")  # type: ignore[attr-defined]
        expected = sum(
            len(pickle.dumps(v, pickle.HIGHEST_PROTOCOL)) + ENTRY_OVERHEAD
            for v in (b"x" * 10_000, "y")
        )
        assert cache._cache.stats().nbytes == expected  # type: ignore[attr-defined]

    def test_a_shrink_request_takes_the_expiries_too(self, cache: object) -> None:
        for n in range(100):
            cache.set(n, b"v" * 8192, timeout=1000)  # type: ignore[attr-defined]
        cache.get(0)  # type: ignore[attr-defined]  # most recently used now
        store = cache._cache  # type: ignore[attr-defined]
        store.flush()  # the controller's count is exact: all of it can be asked back
        freed = store._reclaim(50)  # as the listener thread does for a request of 50 chunks
        assert freed >= 50
        assert 0 < len(store) < 100
        assert set(cache._expire_info) == set(store)  # type: ignore[attr-defined]
        assert cache.get(0) == b"v" * 8192  # type: ignore[attr-defined]
        assert cache.get(1) is None  # type: ignore[attr-defined]  # least recently used: gone
        assert cache.has_key(1) is False  # type: ignore[attr-defined]

    def test_one_store_per_location(self) -> None:
        pytest.importorskip("django")
        from pyshrinker.contrib.django import ShrinkableCache

        name = f"test-{uuid.uuid4().hex}"
        first, second = ShrinkableCache(name, {}), ShrinkableCache(name, {})
        other = ShrinkableCache(f"{name}-other", {})
        first.set("k", 1)
        assert second.get("k") == 1
        assert other.get("k") is None
        first.clear()


class TestCachelib:
    @pytest.fixture
    def cache(self) -> object:
        pytest.importorskip("cachelib")
        from pyshrinker.contrib.cachelib import ShrinkableSimpleCache

        cache = ShrinkableSimpleCache()
        yield cache
        cache.close()

    def test_no_threshold_means_no_cap(self, cache: object) -> None:
        for n in range(1000):
            cache.set(str(n), n)  # type: ignore[attr-defined]
        assert len(cache._cache) == 1000  # type: ignore[attr-defined]

    def test_threshold_evicts_expired_then_least_recently_used(self) -> None:
        pytest.importorskip("cachelib")
        from pyshrinker.contrib.cachelib import ShrinkableSimpleCache

        cache = ShrinkableSimpleCache(threshold=3)
        cache.set("old", 1, timeout=-1)  # already expired
        for key in "abc":
            cache.set(key, key)
        cache.get("a")  # b is now the least recently used live entry
        cache.set("d", "d")  # over the threshold: the expired entry goes
        assert "old" not in cache._cache
        cache.set("e", "e")  # over again: b, least recently used, goes
        assert sorted(cache._cache) == ["a", "c", "d", "e"]
        cache.close()

    def test_a_shrink_request_evicts_least_recently_used(self, cache: object) -> None:
        for n in range(100):
            cache.set(str(n), b"v" * 8192)  # type: ignore[attr-defined]
        cache.get("0")  # type: ignore[attr-defined]
        cache._cache.flush()  # type: ignore[attr-defined]
        assert cache._cache._reclaim(50) >= 50  # type: ignore[attr-defined]
        assert cache.get("0") == b"v" * 8192  # type: ignore[attr-defined]
        assert cache.get("1") is None  # type: ignore[attr-defined]
        assert cache.has("1") is False  # type: ignore[attr-defined]

    def test_close_is_idempotent(self, cache: object) -> None:
        cache.close()  # type: ignore[attr-defined]
        cache.close()  # type: ignore[attr-defined]
