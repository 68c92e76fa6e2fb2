"""A process of a memory cgroup that holds a ChunkCache, driven by tests/test_election.py.

It joins the election of its cgroup and scope ($PYSHRINKER_ELECTION_SCOPE) like any process
with a cache, then answers one JSON line per command read from stdin:

    alloc N      put N entries of one chunk (each a real --value-size bytes)
    free N       drop the N oldest entries
    books        settle, flush; the cache's chunks and the controller's count of them
    status       the controller's status (from whichever process runs it)
    fork         fork a child that adds an entry and checks its own books, then exits
    grow MIB     start allocating MIB MiB more in the background, 1 MiB a millisecond
    exit         leave (exit status 0)

    python tests/election_worker.py --value-size 4096
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

from pyshrinker import ChunkCache, settle
from pyshrinker.client import _default_transport
from pyshrinker.shared import SharedTransport

MiB = 1 << 20


def books(cache: ChunkCache[int, bytes]) -> dict[str, Any]:
    """Quiescent books: (after settling and flushing) chunks held and the controller's count."""
    for _ in range(100):
        settle()
        cache.flush()
        try:
            count = cache.shrinker.controller_count()
        except Exception as err:  # during a failover: try again
            count = repr(err)
            time.sleep(0.01)
            continue
        if count == cache.chunks:
            break
        time.sleep(0.01)
    transport = cache.shrinker.transport
    shared = transport if isinstance(transport, SharedTransport) else None
    return {
        "pid": os.getpid(),
        "chunks": cache.chunks,
        "count": count,
        "role": shared.role if shared else "none",
        "leader": shared.leader_pid if shared else os.getpid(),
        "switches": shared.switches if shared else 0,
        "switched_at": shared.switched_at if shared else None,
        "requests": cache.shrinker.stats().requests,
        "evicted": cache.stats().evicted_on_request,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--value-size", type=int, default=64)
    args = parser.parse_args(argv)
    cache: ChunkCache[int, bytes] = ChunkCache(4096, name=f"worker-{os.getpid()}")
    assert cache.shrinker.transport is _default_transport()
    next_key = 0
    keys: list[int] = []
    lock = threading.Lock()

    def put(n: int, size: int) -> None:
        nonlocal next_key
        for _ in range(n):
            with lock:
                key = next_key
                next_key += 1
            cache.put(key, b"\x01" * size, nbytes=max(1, size))
            with lock:
                keys.append(key)

    def grow(mib: int) -> None:
        for _ in range(mib):
            put(1, MiB)
            time.sleep(0.001)

    def answer(payload: dict[str, Any]) -> None:
        print(json.dumps(payload), flush=True)

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        command, rest = words[0], [int(w) for w in words[1:]]
        if command == "alloc":
            put(rest[0], args.value_size)
            answer({"chunks": cache.chunks})
        elif command == "free":
            with lock:
                doomed, keys[:] = keys[: rest[0]], keys[rest[0] :]
            for key in doomed:
                cache.pop(key, None)
            answer({"chunks": cache.chunks})
        elif command == "books":
            answer(books(cache))
        elif command == "status":
            transport = cache.shrinker.transport
            assert isinstance(transport, SharedTransport)
            answer(transport.status())
        elif command == "grow":
            threading.Thread(target=grow, args=(rest[0],), daemon=True).start()
            answer({"growing": rest[0]})
        elif command == "fork":
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                ok = False
                try:
                    cache.put(-1, b"child", chunks=2)
                    mine = books(cache)
                    ok = mine["count"] == mine["chunks"] and mine["leader"] != os.getpid()
                finally:
                    os.write(write_end, b"1" if ok else b"0")
                    os._exit(0)
            os.close(write_end)
            verdict = os.read(read_end, 1)
            os.close(read_end)
            os.waitpid(pid, 0)
            answer({"child": pid, "child_ok": verdict == b"1"})
        elif command == "exit":
            answer({"bye": os.getpid()})
            return 0
        else:
            answer({"error": f"unknown command {command!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
