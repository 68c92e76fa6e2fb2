"""Pure-Python reference models of ShrinkableLRU and @shrinkable_cache, for the stateful fuzz.

Keys and values are labels (ints): the fuzz stores hostile objects (:mod:`tests.hostile`) in the
real caches and compares their labels with these models after every step. The models say what
each operation must do, the errors included, in the order the C core checks them.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class ModelError(Exception):
    """An operation of the model raised ``kind`` (the exception type the cache must raise)."""

    def __init__(self, kind: type[BaseException]) -> None:
        super().__init__(kind.__name__)
        self.kind = kind


def _chunks(total: int, chunk_size: int) -> int:
    return -(-total // chunk_size)


class _Entries:
    """Entries in LRU order (first = least recently used) with sizes, and the shared counters."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        #: key label -> (value label, size), least recently used first.
        self.entries: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evicted_by_maxsize = 0
        self.evicted_on_request = 0
        #: (key label, value label) of every eviction on_evict must have heard of, in order.
        self.told: list[tuple[int, int]] = []

    @property
    def currsize(self) -> int:
        return sum(size for _, size in self.entries.values())

    @property
    def chunks(self) -> int:
        return _chunks(self.currsize, self.chunk_size)

    def items(self) -> list[tuple[int, int]]:
        return [(key, value) for key, (value, _size) in self.entries.items()]

    def _victims(
        self, key: int, size: int, max_total: int | None, max_entries: int | None
    ) -> list[int]:
        """The least recently used entries (never key) to evict until one of size fits."""
        present = key in self.entries
        others = self.currsize - (self.entries[key][1] if present else 0)
        count = len(self.entries) + (not present)
        victims = []
        for victim, (_value, victim_size) in self.entries.items():
            over = (max_total is not None and others + size > max_total) or (
                max_entries is not None and count > max_entries
            )
            if not over:
                break
            if victim == key:
                continue
            victims.append(victim)
            others -= victim_size
            count -= 1
        return victims

    def _evict_for(
        self, key: int, size: int, max_total: int | None, max_entries: int | None, tell: bool
    ) -> None:
        """Evict least recently used entries (never key) until one of size fits the caps."""
        for victim in self._victims(key, size, max_total, max_entries):
            value, _size = self.entries.pop(victim)
            self.evicted_by_maxsize += 1
            if tell:
                self.told.append((victim, value))

    def store(
        self,
        key: int,
        value: int,
        size: int,
        *,
        keep: bool,
        max_total: int | None,
        max_entries: int | None,
        tell: bool,
    ) -> int | None:
        """The C core's store(): the value kept (keep and present), else None after storing.

        The model's sizes are the bytes too (the fuzz gives the same sizer for both, or counts
        entries with a cap): a sum past sys.maxsize is refused, before any eviction, unless
        the evictions for the caps would bring it back under.
        """
        if keep and key in self.entries:
            return self.entries[key][0]
        others = self.currsize - (self.entries[key][1] if key in self.entries else 0)
        victims = self._victims(key, size, max_total, max_entries)
        left = others - sum(self.entries[victim][1] for victim in victims)
        if left + size > sys.maxsize:
            raise ModelError(OverflowError)
        self._evict_for(key, size, max_total, max_entries, tell)
        self.entries[key] = (value, size)
        self.entries.move_to_end(key)
        return None

    def reclaim(self, asked: int, tell: bool) -> None:
        """A shrink request for ``asked`` chunks: whole entries, least recently used first."""
        keep = max(self.chunks - asked, 0)
        target = min(keep * self.chunk_size, sys.maxsize)
        while self.currsize > target and self.entries:
            key, (value, _size) = self.entries.popitem(last=False)
            self.evicted_on_request += 1
            if tell:
                self.told.append((key, value))


def check_size(size: int, max_total: int | None) -> None:
    """The checks of a value's size, as value_size() and the setters make them."""
    if size < 0:
        raise ModelError(ValueError)
    if size > sys.maxsize:
        raise ModelError(OverflowError)
    if max_total is not None and size > max_total:
        raise ModelError(ValueError)


class ModelLRU(_Entries):
    """What a ShrinkableLRU of ``maxsize`` bytes must hold and answer.

    ``before`` is the reentrant action that ran inside the operation (a trap that fired), to be
    applied where the C core lets it run: see :meth:`set` and :meth:`setdefault`.
    """

    def __init__(self, maxsize: int | None, chunk_size: int, tell: bool) -> None:
        super().__init__(chunk_size)
        self.maxsize = maxsize
        self.tell = tell

    def set(self, key: int, value: int, size: int) -> None:
        check_size(size, self.maxsize)
        self.store(
            key, value, size, keep=False, max_total=self.maxsize, max_entries=None, tell=self.tell
        )

    def get(self, key: int) -> int | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            self.hits += 1
            return self.entries[key][0]
        self.misses += 1
        return None

    def getitem(self, key: int) -> int:
        value = self.get(key)
        if value is None:
            raise ModelError(KeyError)
        return value

    def contains(self, key: int) -> bool:
        return key in self.entries

    def delete(self, key: int) -> None:
        if key not in self.entries:
            raise ModelError(KeyError)
        del self.entries[key]

    def pop(self, key: int) -> int | None:
        if key not in self.entries:
            return None
        return self.entries.pop(key)[0]

    def popitem(self) -> tuple[int, int]:
        if not self.entries:
            raise ModelError(KeyError)
        key, (value, _size) = self.entries.popitem(last=False)
        return key, value

    def setdefault(
        self, key: int, value: int, size: int, meanwhile: Callable[[], Any] | None = None
    ) -> int:
        """setdefault, with ``meanwhile`` run after the first lookup missed (if it fired there)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][0]
        if meanwhile is not None:
            meanwhile()
        check_size(size, self.maxsize)
        kept = self.store(
            key, value, size, keep=True, max_total=self.maxsize, max_entries=None, tell=self.tell
        )
        return value if kept is None else kept

    def clear(self) -> None:
        self.entries.clear()


class ModelFunction(_Entries):
    """What a @shrinkable_cache function of ``maxsize`` entries must hold and answer.

    Results are labelled by a counter, in the order the function body runs, and sized by
    ``size_of(key)``.
    """

    def __init__(self, maxsize: int | None, chunk_size: int, size_of: Callable[[int], int]) -> None:
        super().__init__(chunk_size)
        self.maxsize = maxsize
        self.size_of = size_of
        self.results = 0

    def call(
        self, key: int, meanwhile: Callable[[], Any] | None = None, meanwhile_first: bool = False
    ) -> int:
        """Call with key; ``meanwhile`` runs after the miss, before (or after) the body's label."""
        if self.maxsize == 0:
            self.misses += 1
            return self._body(key, meanwhile, meanwhile_first)
        if key in self.entries:
            self.entries.move_to_end(key)
            self.hits += 1
            return self.entries[key][0]
        self.misses += 1
        result = self._body(key, meanwhile, meanwhile_first)
        size = self.size_of(key)
        check_size(size, None)
        self.store(
            key, result, size, keep=True, max_total=None, max_entries=self.maxsize, tell=False
        )
        return result

    def _body(self, key: int, meanwhile: Callable[[], Any] | None, first: bool) -> int:
        if meanwhile is not None and first:
            meanwhile()
        self.results += 1
        label = self.results
        if meanwhile is not None and not first:
            meanwhile()
        return label

    def clear(self) -> None:
        self.entries.clear()
        self.hits = self.misses = 0
