"""ShrinkableLRU's books: the controller always counts the chunks the cache holds.

A model (an OrderedDict of key -> size, least recently used first) predicts every single-threaded
step, shrink requests included. Between flushes the controller's count may lag by at most the
batch; after a flush, and after a request has been handled, it is exact. Bursts of concurrent
threads, with a request arriving in the middle, are checked by the same books afterwards.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pyshrinker import Controller, EmbeddedTransport, ShrinkableLRU, settle

keys = st.integers(0, 40)


class LRUBooks(RuleBasedStateMachine):
    """Sets, gets, deletes, popitem, clear, shrink requests and thread bursts on one cache."""

    def __init__(self) -> None:
        super().__init__()
        self.controller = Controller.create(None).start()
        self.transport = EmbeddedTransport(self.controller)
        self.cache: ShrinkableLRU[int, bytes] | None = None
        self.model: OrderedDict[int, int] = OrderedDict()
        self.maxsize: int | None = None
        self.chunk_size = 1
        self.batch = 0

    @initialize(
        maxsize=st.none() | st.integers(0, 6000),
        chunk_size=st.sampled_from([1, 64, 100, 4096]),
        batch=st.sampled_from([0, 300, 1 << 20]),
    )
    def make(self, maxsize: int | None, chunk_size: int, batch: int) -> None:
        self.cache = ShrinkableLRU(
            maxsize,
            getsizeof=len,
            memsize=len,
            chunk_size=chunk_size,
            batch_bytes=batch,
            transport=self.transport,
        )
        self.maxsize, self.chunk_size, self.batch = maxsize, chunk_size, batch

    @property
    def lru(self) -> ShrinkableLRU[int, bytes]:
        assert self.cache is not None
        return self.cache

    def _model_evict_to(self, total_cap: int, keep: int | None = None) -> None:
        while sum(self.model.values()) > total_cap:
            oldest = next(iter(self.model), None)
            if oldest is None or oldest == keep:
                return
            del self.model[oldest]

    # ---------------------------------------------------------------- single-threaded steps

    @rule(key=keys, size=st.integers(0, 1500))
    def set(self, key: int, size: int) -> None:
        if self.maxsize is not None and size > self.maxsize:
            with pytest.raises(ValueError, match="too large"):
                self.lru[key] = bytes(size)
            return
        self.lru[key] = bytes(size)
        self.model.pop(key, None)
        self.model[key] = size
        if self.maxsize is not None:
            self._model_evict_to(self.maxsize, keep=key)

    @rule(key=keys)
    def get(self, key: int) -> None:
        value = self.lru.get(key)
        if key in self.model:
            assert value is not None and len(value) == self.model[key]
            self.model.move_to_end(key)
        else:
            assert value is None

    @rule(key=keys)
    def delete(self, key: int) -> None:
        if key in self.model:
            del self.lru[key]
            del self.model[key]
        else:
            with pytest.raises(KeyError):
                del self.lru[key]

    @rule()
    def popitem(self) -> None:
        if not self.model:
            with pytest.raises(KeyError):
                self.lru.popitem()
            return
        key, value = self.lru.popitem()
        expected = next(iter(self.model))
        assert key == expected
        assert len(value) == self.model.pop(expected)

    @rule()
    def clear(self) -> None:
        self.lru.clear()
        self.model.clear()

    @rule(chunks=st.integers(0, 80))
    def shrink_request(self, chunks: int) -> None:
        """controller.request + settle(): the least recently used go until the chunks are freed."""
        asked = self.controller.request(self.lru.shrinker.efd, chunks)
        assert settle()
        if asked:
            cs = self.chunk_size
            held = -(-sum(self.model.values()) // cs)
            self._model_evict_to(max(0, held - asked) * cs)

    @rule()
    def flush(self) -> None:
        self.lru.flush()
        assert self.controller.count(self.lru.shrinker.efd) == self.lru.chunks

    @rule(
        threads=st.integers(2, 4),
        ops=st.integers(20, 300),
        seed=st.integers(0, 2**32 - 1),
        chunks=st.integers(1, 80),
    )
    def concurrent_burst(self, threads: int, ops: int, seed: int, chunks: int) -> None:
        """Threads set, get, delete and pop while a shrink request arrives."""
        cache = self.lru
        maxsize = self.maxsize
        errors: list[BaseException] = []
        start = threading.Barrier(threads + 1)

        def work(worker_seed: int) -> None:
            rng = random.Random(worker_seed)
            try:
                start.wait()
                for _ in range(ops):
                    key = rng.randrange(41)
                    op = rng.random()
                    if op < 0.45:
                        size = rng.randrange(1500)
                        if maxsize is None or size <= maxsize:
                            cache[key] = bytes(size)
                    elif op < 0.75:
                        cache.get(key)
                    elif op < 0.9:
                        cache.pop(key, None)
                    else:
                        try:
                            cache.popitem()
                        except KeyError:
                            pass
            except BaseException as err:
                errors.append(err)

        workers = [
            threading.Thread(target=work, args=(seed + n,), name=f"burst-{n}")
            for n in range(threads)
        ]
        for worker in workers:
            worker.start()
        start.wait()
        self.controller.request(cache.shrinker.efd, chunks)
        for worker in workers:
            worker.join()
        assert settle()
        assert errors == []
        # What the threads left is not predictable; the books must still balance.
        self.model = OrderedDict((key, len(value)) for key, value in cache.items())

    # ---------------------------------------------------------------- the books

    @invariant()
    def matches_model(self) -> None:
        if self.cache is None:
            return
        assert list(self.cache) == list(self.model)
        assert self.cache.currsize == sum(self.model.values())
        assert len(self.cache) == len(self.model)
        if self.maxsize is not None:
            assert self.cache.currsize <= self.maxsize

    @invariant()
    def count_within_batch(self) -> None:
        """Without a flush the count lags by less than the batch (plus a chunk's rounding)."""
        if self.cache is None:
            return
        counted = self.controller.count(self.cache.shrinker.efd) * self.chunk_size
        assert -self.batch <= counted - self.cache.currsize < self.batch + self.chunk_size

    def teardown(self) -> None:
        if self.cache is not None:
            self.cache.flush()
            assert self.controller.count(self.cache.shrinker.efd) == self.cache.chunks
            self.cache.close()
        self.controller.close()


TestLRUBooks = LRUBooks.TestCase
TestLRUBooks.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
