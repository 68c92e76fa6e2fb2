"""The contract of a cachetools-style mutable mapping LRU cache, as a mixin each cache class runs.

A test class inherits :class:`LRUCacheContract` and defines ``make(maxsize, getsizeof=None,
cls=None)`` (``cls``: a subclass of the cache class to instantiate instead). The contract is run
against ``cachetools.LRUCache`` too, which proves it describes cachetools' behaviour and not
ours. Sizes are always given explicitly (``getsizeof``): the caches differ in their default.
"""

from __future__ import annotations

import collections.abc
from typing import Any

import pytest


def one(value: object) -> int:
    """Every entry has size 1: maxsize counts entries."""
    return 1


def itself(value: int) -> int:
    """An int value is its own size."""
    return value


class LRUCacheContract:
    """What a cachetools-style LRU cache does; subclasses provide ``cache_class`` and ``make``."""

    cache_class: type[Any]

    def make(self, maxsize: int, getsizeof: Any = None, cls: type[Any] | None = None) -> Any:
        raise NotImplementedError

    # ---------------------------------------------------------------- the mapping

    def test_is_a_mutable_mapping(self):
        """The cache is a MutableMapping; a fresh one is empty with the given maxsize."""
        cache = self.make(2, one)
        assert isinstance(cache, collections.abc.MutableMapping)
        assert len(cache) == 0
        assert cache.maxsize == 2
        assert cache.currsize == 0
        assert repr(cache).startswith(type(cache).__name__)

    def test_insert_evicts_to_fit(self):
        """Inserting past maxsize keeps len at maxsize and the newest entry present."""
        cache = self.make(2, one)
        cache.update({1: 1, 2: 2})
        assert len(cache) == 2
        assert (cache[1], cache[2]) == (1, 2)
        cache[3] = 3
        assert len(cache) == 2
        assert cache[3] == 3
        assert (1 in cache) != (2 in cache)

    def test_update_replaces_values(self):
        """Setting an existing key replaces its value without growing the cache."""
        cache = self.make(2, one)
        cache.update({1: 1, 2: 2})
        cache.update({1: "a", 2: "b"})
        assert len(cache) == 2
        assert (cache[1], cache[2]) == ("a", "b")

    def test_delete(self):
        """del removes an entry; deleting a missing key raises KeyError."""
        cache = self.make(2, one)
        cache.update({1: 1, 2: 2})
        del cache[2]
        assert len(cache) == 1
        assert 2 not in cache
        assert cache.currsize == 1
        with pytest.raises(KeyError):
            del cache[2]
        assert len(cache) == 1

    def test_pop(self):
        """pop returns and removes; a missing key raises KeyError unless a default is given."""
        cache = self.make(2, one)
        cache.update({1: 1, 2: 2})
        assert cache.pop(2) == 2
        assert len(cache) == 1
        with pytest.raises(KeyError):
            cache.pop(2)
        assert cache.pop(2, None) is None
        assert cache.pop(2, "x") == "x"
        assert cache.pop(1) == 1
        assert len(cache) == 0
        assert cache.currsize == 0

    def test_popitem_least_recently_used_first(self):
        """popitem removes the least recently used pair; empty, it raises KeyError from None."""
        cache = self.make(3, one)
        cache.update({1: 1, 2: 2, 3: 3})
        cache[1]
        assert cache.popitem() == (2, 2)
        assert cache.popitem() == (3, 3)
        assert cache.popitem() == (1, 1)
        try:
            raise LookupError("context to be suppressed")
        except LookupError:
            with pytest.raises(KeyError) as info:
                cache.popitem()
        assert info.value.__suppress_context__ is True
        assert info.value.__cause__ is None
        assert type(cache).__name__ in str(info.value)

    def test_lru_eviction_order(self):
        """Insertion and lookup order decide which entry goes next."""
        cache = self.make(2, one)
        cache[1] = 1
        cache[2] = 2
        cache[3] = 3
        assert len(cache) == 2
        assert 1 not in cache
        assert (cache[2], cache[3]) == (2, 3)
        cache[2]
        cache[4] = 4
        assert 3 not in cache
        assert (cache[2], cache[4]) == (2, 4)
        cache[5] = 5
        assert 2 not in cache
        assert (cache[4], cache[5]) == (4, 5)

    def test_get_marks_used(self):
        """get() marks the entry most recently used, as [] does."""
        cache = self.make(2, one)
        cache[1] = 1
        cache[2] = 2
        assert cache.get(1) == 1
        cache[3] = 3
        assert 1 in cache
        assert 2 not in cache

    def test_contains_does_not_mark_used(self):
        """``in`` leaves recency alone."""
        cache = self.make(2, one)
        cache[1] = 1
        cache[2] = 2
        assert 1 in cache
        cache[3] = 3
        assert 1 not in cache
        assert 2 in cache

    def test_update_existing_marks_used(self):
        """Setting an existing key marks it most recently used."""
        cache = self.make(2, one)
        cache[1] = 1
        cache[2] = 2
        cache[1] = "updated"
        cache[3] = 3
        assert cache[1] == "updated"
        assert 3 in cache
        assert 2 not in cache

    def test_clear_resets_size_and_order(self):
        """clear empties the cache, currsize goes to 0, and LRU order starts afresh."""
        cache = self.make(2, one)
        cache[1] = 1
        cache[2] = 2
        cache.clear()
        assert len(cache) == 0
        assert cache.currsize == 0
        cache[3] = 3
        cache[4] = 4
        cache[3]
        cache[5] = 5
        assert set(cache) == {3, 5}

    def test_get_default(self):
        """get returns None or the default for a missing key."""
        cache = self.make(2, one)
        assert cache.get(1) is None
        assert cache.get(1, "d") == "d"
        cache[1] = 0
        assert cache.get(1, "d") == 0

    def test_setdefault(self):
        """setdefault returns the present value, or stores and returns the default."""
        cache = self.make(2, one)
        cache[1] = 2
        assert cache.setdefault(1) == 2
        assert cache.setdefault(1, 1) == 2
        assert cache.setdefault(2, 4) == 4
        assert cache[2] == 4
        assert cache.setdefault(3) is None
        assert 3 in cache
        assert len(cache) == 2

    def test_iteration_and_views(self):
        """Keys, values and items hold what was stored; == compares with a dict."""
        cache = self.make(3, one)
        cache.update({1: "a", 2: "b", 3: "c"})
        assert set(cache) == {1, 2, 3}
        assert set(cache.keys()) == {1, 2, 3}
        assert sorted(cache.values()) == ["a", "b", "c"]
        assert set(cache.items()) == {(1, "a"), (2, "b"), (3, "c")}
        assert (2, "b") in cache.items()
        assert (2, "x") not in cache.items()
        assert "c" in cache.values()
        assert cache == {1: "a", 2: "b", 3: "c"}
        assert cache != {1: "a"}

    # ---------------------------------------------------------------- sizes

    def _check_getsizeof(self, cache: Any) -> None:
        # cachetools' own sequence for a cache of maxsize 3 whose values are their sizes.
        assert cache.currsize == 0
        assert cache.maxsize == 3
        assert cache.getsizeof(1) == 1
        assert cache.getsizeof(3) == 3
        cache.update({1: 1, 2: 2})
        assert len(cache) == 2
        assert cache.currsize == 3
        assert (cache[1], cache[2]) == (1, 2)
        cache[1] = 2
        assert len(cache) == 1
        assert cache.currsize == 2
        assert cache[1] == 2
        assert 2 not in cache
        cache.update({1: 1, 2: 2})
        assert cache.currsize == 3
        cache[3] = 3
        assert len(cache) == 1
        assert cache.currsize == 3
        assert 1 not in cache
        assert 2 not in cache
        with pytest.raises(ValueError, match="too large"):
            cache[3] = 4
        assert cache.currsize == 3
        assert cache[3] == 3
        with pytest.raises(ValueError, match="too large"):
            cache[4] = 4
        assert len(cache) == 1
        assert cache[3] == 3

    def test_getsizeof_param(self):
        """getsizeof given as an argument sizes every value."""
        self._check_getsizeof(self.make(3, itself))

    def test_getsizeof_subclass(self):
        """getsizeof overridden as a method sizes every value."""

        class Sized(self.cache_class):  # type: ignore[name-defined]
            def getsizeof(self, value):
                return value

        self._check_getsizeof(self.make(3, cls=Sized))

    def test_negative_size_refused(self):
        """A negative size is a ValueError and nothing is stored."""
        cache = self.make(3, lambda value: -1)
        with pytest.raises(ValueError):
            cache[1] = 1
        assert len(cache) == 0
        assert cache.currsize == 0

    def test_maxsize_must_be_non_negative(self):
        """A negative maxsize is refused."""
        with pytest.raises(ValueError, match="non-negative"):
            self.make(-1, one)

    # ---------------------------------------------------------------- __missing__

    def _check_missing(self, cache: Any) -> None:
        # __missing__ stores the key as its own value; only [] calls it.
        assert len(cache) == 0
        assert cache[1] == 1
        assert cache[2] == 2
        assert len(cache) == 2
        assert cache[3] == 3
        assert len(cache) == 2
        assert 3 in cache
        assert (1 in cache) != (2 in cache)
        assert cache.get(4) is None
        assert cache.get(5, 25) == 25
        assert 4 not in cache and 5 not in cache
        with pytest.raises(KeyError):
            cache.pop(5)
        assert cache.pop(5, None) is None
        cache.clear()
        assert cache.setdefault(1, 7) == 7
        assert cache[1] == 7
        assert cache.setdefault(2) is None
        assert cache[2] is None

    def test_missing_subclass(self):
        """A subclass's __missing__ is called by [] only, not by get, pop or setdefault."""

        class Computing(self.cache_class):  # type: ignore[name-defined]
            def __missing__(self, key):
                try:
                    self[key] = key
                except ValueError:
                    pass  # too large to store: still returned
                return key

        self._check_missing(self.make(2, one, cls=Computing))
        big = self.make(2, itself, cls=Computing)
        assert big[1] == 1
        assert 1 in big
        assert big[3] == 3
        assert 3 not in big
        assert 1 in big

    def test_missing_default_raises_keyerror(self):
        """Without __missing__, [] on a missing key raises KeyError(key)."""
        cache = self.make(2, one)
        with pytest.raises(KeyError) as info:
            cache[(1, 2)]
        assert info.value.args == ((1, 2),)
