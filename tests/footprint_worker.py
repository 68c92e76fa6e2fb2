"""Run by tests/test_footprint.py and tests/test_trim.py in a fresh process (not a test module).

A fresh interpreter is the only honest place to see what pyshrinker does to a process: the
allocator's state (glibc's dynamic mmap threshold), the threads, the fds and the signal handlers
all belong to the whole process, and a test runner has changed them already. Each command prints
one JSON line.

    python tests/footprint_worker.py rss-after-reclaim [--no-trim]
    python tests/footprint_worker.py fill-chunk-cache [--mib 2048]
    python tests/footprint_worker.py threshold {none,embedded,files,pinned}
    python tests/footprint_worker.py audit
    python tests/footprint_worker.py imports
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
O_CLOEXEC = 0o2000000


def run_in_fresh_process(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """For the tests: run one of this script's commands in a new interpreter; its JSON line.

    ``env``: variables to set in it, over the test process's own.
    """
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def rss() -> int:
    """Resident bytes now."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE


def put_heap_sized_values(cache: Any, total_bytes: int, seed: int) -> int:
    """Put values of 8-32 KiB into ``cache`` until ``total_bytes``; returns the bytes put."""
    rng = random.Random(seed)
    done = key = 0
    while done < total_bytes:
        size = rng.randint(8 << 10, 32 << 10)
        # bytes * n touches every page (bytes(n) may get untouched pages from calloc).
        cache.put(key, b"v" * size, nbytes=size)
        done += size
        key += 1
    return done


def rss_after_reclaim(no_trim: bool, total_mib: int) -> dict[str, Any]:
    """Fill a ChunkCache with 8-32 KiB values, have 3/4 of its chunks asked, measure RSS."""
    import pyshrinker.trim
    from pyshrinker import ChunkCache, Controller, EmbeddedTransport, settle

    if no_trim:
        # The same cache with trimming switched off: what ChunkCache did before.
        pyshrinker.trim._trimmer = pyshrinker.trim.HeapTrimmer(after_bytes=1 << 62)
    controller = Controller.create(None).start()
    cache: ChunkCache[int, bytes] = ChunkCache(4096, transport=EmbeddedTransport(controller))
    put_heap_sized_values(cache, total_mib * MiB, seed=7)
    cache.flush()
    before = rss()
    asked = cache.chunks * 3 // 4
    controller.request(cache.shrinker.efd, asked)
    if not settle(10):
        raise RuntimeError("the request was not handled")
    after = rss()
    freed = cache.shrinker.stats().chunks_freed * cache.chunk_size
    stats = pyshrinker.trim.trim_stats()
    cache.close()
    controller.close()
    return {
        "rss_before": before,
        "rss_after": after,
        "freed_bytes": freed,
        "asked_chunks": asked,
        "trims": stats.trims,
    }


def fill_chunk_cache(total_mib: int) -> dict[str, Any]:
    """Put ``total_mib`` MiB of 8-32 KiB values into a ChunkCache as fast as it goes.

    Run in a memory-limited group: the embedded controller asks the cache for memory, and what
    the cache frees stays in malloc's heap unless it is trimmed.
    """
    import pyshrinker.trim
    from pyshrinker import ChunkCache

    cache: ChunkCache[int, bytes] = ChunkCache(4096)
    done = put_heap_sized_values(cache, total_mib * MiB, seed=1)
    stats = pyshrinker.trim.trim_stats()
    return {
        "allocated_bytes": done,
        "held_bytes": cache.chunks * cache.chunk_size,
        "requests": cache.shrinker.stats().requests,
        "trims": stats.trims,
    }


def threshold(mode: str) -> dict[str, Any]:
    """Whether glibc's mmap threshold still moves after creating a cache the way ``mode`` says.

    glibc serves a 1 MiB malloc with mmap at first (threshold 128 KiB) and, when it is freed,
    raises its dynamic threshold above 1 MiB, so a 512 KiB malloc then comes from the heap. A
    pinned threshold (``mallopt(M_MMAP_THRESHOLD)``) stops that: the 512 KiB block is mmapped.
    glibc marks mmapped chunks with bit 1 (IS_MMAPPED) of the size word just before the block.
    """
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    keep: list[Any] = []
    if mode == "pinned":
        # What pyshrinker's controller used to do on start: the control, which shows the test
        # can fail.
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)
    elif mode == "embedded":
        from pyshrinker import ChunkCache, ShrinkableLRU, default_controller

        keep += [ShrinkableLRU(), ChunkCache(4096), default_controller()]
    elif mode == "files":
        from pyshrinker import FilesTransport, abi

        directory = tempfile.mkdtemp(prefix="pyshrinker-footprint-")
        for name in (abi.EVENT_CONTROL, abi.SHRINKER_FILE, abi.LEVEL_FILE):
            with open(os.path.join(directory, name), "w", encoding="ascii"):
                pass
        keep.append(FilesTransport.open(directory))
    libc.free(libc.malloc(MiB))
    block = libc.malloc(512 * 1024)
    size_word = ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value
    libc.free(block)
    return {"mode": mode, "mmapped_512k": bool(size_word & 2)}


def _fds() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory's own fd, closed by now
    return found


def _cloexec(fd: int) -> bool:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
        for line in info:
            if line.startswith("flags:"):
                return bool(int(line.split()[1], 8) & O_CLOEXEC)
    return False


def audit() -> dict[str, Any]:
    """What creating each kind of cache (and using it) does to the process."""
    handlers = {
        sig: signal.getsignal(sig) for sig in signal.valid_signals() if sig < signal.SIGRTMIN
    }
    threads = {t.ident for t in threading.enumerate()}
    fds = _fds()
    interval = sys.getswitchinterval()

    from pyshrinker import ChunkCache, ShrinkableLRU, settle, shrinkable_cache

    chunk_cache: ChunkCache[int, bytes] = ChunkCache(4096)
    lru: ShrinkableLRU[int, bytes] = ShrinkableLRU()

    @shrinkable_cache(maxsize=None)
    def square(x: int) -> int:
        return x * x

    for i in range(100):
        chunk_cache.put(i, b"x" * 5000, nbytes=5000)
        lru[i] = b"y" * 5000
        square(i)
    settle()
    new_threads = [t for t in threading.enumerate() if t.ident not in threads]
    new_fds = {fd: target for fd, target in _fds().items() if fd not in fds}
    changed_signals = [
        signal.Signals(sig).name
        for sig, handler in handlers.items()
        if signal.getsignal(sig) != handler
    ]
    return {
        "threads": sorted((t.name, t.daemon) for t in new_threads),
        "fds": sorted(new_fds.values()),
        "fds_without_cloexec": sorted(new_fds[fd] for fd in new_fds if not _cloexec(fd)),
        "changed_signals": changed_signals,
        "switch_interval_before": interval,
        "switch_interval_after": sys.getswitchinterval(),
    }


def imports() -> dict[str, Any]:
    """What importing the allocator loads, then whether every public name resolves lazily."""
    import importlib

    import pyshrinker.allocator

    unused = ("pyshrinker.lru", "pyshrinker.ttl", "cachetools", "pyshrinker.subscribers")
    loaded_by_allocator = sorted(m for m in unused if m in sys.modules)
    exports = pyshrinker._MODULE_OF
    not_own = [
        n
        for n, m in exports.items()
        if getattr(pyshrinker, n) is not getattr(importlib.import_module(m), n)
    ]
    namespace: dict[str, Any] = {}
    exec("from pyshrinker import *", namespace)
    return {
        "loaded_by_allocator": loaded_by_allocator,
        "not_own_object": not_own,
        "missing_from_star": sorted(set(pyshrinker.__all__) - set(namespace)),
        "all_in_dir": set(pyshrinker.__all__) <= set(dir(pyshrinker)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    reclaim = commands.add_parser("rss-after-reclaim")
    reclaim.add_argument("--no-trim", action="store_true")
    reclaim.add_argument("--mib", type=int, default=96)
    fill = commands.add_parser("fill-chunk-cache")
    fill.add_argument("--mib", type=int, default=2048)
    allocator = commands.add_parser("threshold")
    allocator.add_argument("mode", choices=["none", "embedded", "files", "pinned"])
    commands.add_parser("audit")
    commands.add_parser("imports")
    args = parser.parse_args(argv)
    if args.command == "rss-after-reclaim":
        result = rss_after_reclaim(args.no_trim, args.mib)
    elif args.command == "fill-chunk-cache":
        result = fill_chunk_cache(args.mib)
    elif args.command == "threshold":
        result = threshold(args.mode)
    elif args.command == "imports":
        result = imports()
    else:
        result = audit()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
