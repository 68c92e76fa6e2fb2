"""ChunkCache: chunk accounting, LRU reclaim, pins, eviction callbacks."""

from __future__ import annotations

import logging
import threading

import pytest

from pyshrinker import ChunkCache, settle

from .helpers import private_controller

MiB = 1 << 20


@pytest.fixture
def ctl():
    """A private controller and its embedded transport."""
    with private_controller() as pair:
        yield pair


def count(controller, cache) -> int:
    cache.flush()
    return controller.count(cache.shrinker.efd)


class TestMapping:
    """The mapping side: put, get, pop, sizes."""

    def test_put_get_pop(self, ctl):
        """Values come back; removal is reported."""
        controller, transport = ctl
        with ChunkCache(4096, transport=transport) as cache:
            cache.put("a", 1, nbytes=10_000)  # 3 chunks
            cache["b"] = 2  # 1 chunk
            assert cache["a"] == 1 and cache.get("b") == 2 and cache.get("zz") is None
            assert cache.chunks == 4 and len(cache) == 2 and "a" in cache
            assert count(controller, cache) == 4
            assert cache.pop("a") == 1
            with pytest.raises(KeyError):
                cache["a"]
            assert cache.pop("a", "dflt") == "dflt"
            del cache["b"]
            assert cache.chunks == 0
            assert count(controller, cache) == 0

    def test_replace_reports_difference(self, ctl):
        """Replacing an entry reports only the change in chunks."""
        controller, transport = ctl
        with ChunkCache(4096, transport=transport) as cache:
            cache.put("k", "v", chunks=5)
            cache.put("k", "w", chunks=2)
            assert cache.chunks == 2
            assert count(controller, cache) == 2

    @pytest.mark.parametrize("chunks", [0, -1, 1.5, True])
    def test_bad_sizes(self, ctl, chunks):
        """Entries are at least one whole chunk."""
        _, transport = ctl
        with ChunkCache(4096, transport=transport) as cache, pytest.raises(ValueError):
            cache.put("k", "v", chunks=chunks)
        with ChunkCache(4096, transport=transport) as cache, pytest.raises(TypeError):
            cache.put("k", "v", chunks=1, nbytes=1)

    def test_max_chunks_evicts_lru(self, ctl):
        """A hard cap evicts the least recently used, reported as our own frees."""
        controller, transport = ctl
        evicted = []
        with ChunkCache(
            4096, max_chunks=3, on_evict=lambda k, v: evicted.append(k), transport=transport
        ) as cache:
            for key in "abc":
                cache.put(key, key)
            cache.get("a")
            cache.put("d", "d")
            assert evicted == ["b"]
            assert list(cache) == ["c", "a", "d"]
            assert count(controller, cache) == 3
            with pytest.raises(ValueError, match="max_chunks"):
                cache.put("huge", 0, chunks=4)


class TestReclaim:
    """Shrink requests evict LRU-first, skip pins, and keep the books exact."""

    def test_lru_first(self, ctl):
        """The least recently used entries go first."""
        controller, transport = ctl
        with ChunkCache(MiB, transport=transport) as cache:
            for key in range(10):
                cache.put(key, key)
            cache.get(0)
            controller.request(cache.shrinker.efd, 3)
            assert settle()
            assert list(cache) == [4, 5, 6, 7, 8, 9, 0]
            assert count(controller, cache) == 7
            assert cache.stats().evicted_on_request == 3

    def test_pinned_entries_survive_and_count_as_not_freed(self, ctl):
        """Pinned entries are never freed; what could not be freed is re-added."""
        controller, transport = ctl
        with ChunkCache(MiB, transport=transport) as cache:
            cache.put("a", 1, chunks=2)
            cache.put("b", 2, chunks=2)
            with cache.pinned("a") as value:
                assert value == 1
                controller.request(cache.shrinker.efd, 4)
                assert settle()
                assert list(cache) == ["a"]
                assert count(controller, cache) == 2
                assert cache.shrinker.stats().chunks_readded == 2
            controller.request(cache.shrinker.efd, 2)
            assert settle()
            assert len(cache) == 0
        with (
            ChunkCache(MiB, transport=transport) as cache,
            pytest.raises(KeyError),
            cache.pinned("missing"),
        ):
            pass

    def test_whole_entries_beyond_request_reported(self, ctl):
        """Freeing a 3-chunk entry for a 1-chunk request reports the 2 extra."""
        controller, transport = ctl
        with ChunkCache(MiB, transport=transport) as cache:
            cache.put("big", 0, chunks=3)
            cache.put("small", 0, chunks=1)
            controller.request(cache.shrinker.efd, 1)
            assert settle()
            assert list(cache) == ["small"]
            assert count(controller, cache) == 1

    def test_on_evict_raising_is_logged(self, ctl, caplog):
        """An eviction callback that raises is logged; the entry stays evicted."""
        controller, transport = ctl

        def on_evict(key, value):
            raise RuntimeError(f"cannot write back {key}")

        with ChunkCache(MiB, on_evict=on_evict, transport=transport) as cache:
            cache.put("a", 1)
            cache.put("b", 2)
            with caplog.at_level(logging.ERROR):
                controller.request(cache.shrinker.efd, 1)
                assert settle()
            assert "cannot write back a" in caplog.text
            assert list(cache) == ["b"]
            assert count(controller, cache) == 1

    def test_on_evict_runs_outside_the_lock(self, ctl):
        """The eviction callback may use the cache (it would deadlock under the lock)."""
        controller, transport = ctl
        seen = []
        holder: list[ChunkCache] = []

        def on_evict(key, value):
            seen.append((key, len(holder[0])))

        with ChunkCache(MiB, on_evict=on_evict, transport=transport) as cache:
            holder.append(cache)
            cache.put("a", 1)
            cache.put("b", 2)
            controller.request(cache.shrinker.efd, 1)
            assert settle()
            assert seen == [("a", 1)]

    def test_requests_while_threads_write(self, ctl):
        """Concurrent puts, gets and pops with requests keep the books exact."""
        controller, transport = ctl
        with ChunkCache(4096, transport=transport) as cache:
            stop = threading.Event()

            def worker(seed: int) -> None:
                i = 0
                while not stop.is_set():
                    key = (seed, i % 200)
                    if i % 3:
                        cache.put(key, i, chunks=1 + i % 4)
                    else:
                        cache.pop(key, None)
                    cache.get((seed, (i * 7) % 200))
                    i += 1

            threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
            for t in threads:
                t.start()
            try:
                for _ in range(50):
                    cache.flush()
                    controller.request(cache.shrinker.efd, 20)
            finally:
                stop.set()
                for t in threads:
                    t.join()
            assert settle()
            assert count(controller, cache) == cache.chunks


class TestClose:
    """Closing unregisters and empties."""

    def test_close_unregisters(self, ctl):
        """After close the controller no longer knows the cache; close is idempotent."""
        controller, transport = ctl
        cache = ChunkCache(4096, transport=transport)
        cache.put("a", 1)
        cache.close()
        cache.close()
        assert controller.shrinkers() == []
        assert len(cache) == 0
