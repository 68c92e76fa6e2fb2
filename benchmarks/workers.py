"""Worker processes of one memory cgroup sharing it: gunicorn and multiprocessing.Pool.

Each run starts a fresh cgroup v1 memory group (``--limits``, default 1024 and 512 MiB) and in
it either a real pre-fork server, gunicorn with N sync workers (``--gunicorn-workers``, default 4
and 8), driven over loopback TCP by a load generator outside the group, or a
``multiprocessing.Pool`` of N workers (``--pool-workers``, default 4) fed by a driver process in
the group. Every worker holds a :class:`~pyshrinker.ChunkCache` of a cached computation: key ->
``random.Random(key).randbytes(size)``, 16-128 KiB by key. Keys are Zipf-distributed (exponent
``--zipf``, default 0.9) over enough keys that all of them would take ``--keyspace`` times the
limit (default 4). Every second worker's cache has cost 2 (``Shrinker`` cost: twice as dear to
rebuild), the others cost 1, so that asking in proportion to holdings / cost is visible.

Each configuration runs twice: with the default election (one controller for the cgroup, in
one of the workers) and with ``PYSHRINKER_ELECTION=off`` (each worker embeds its own controller,
as before elections). A baseline runs the same caches (same number, same costs) in one process:
gunicorn with one sync worker holding N caches, a request going to one of them at random; or a
one-worker Pool holding N caches. Each run loads for ``--seconds`` (default 30) after the group's
working set first reaches the high watermark.

Measures, over the window from the first time the working set reaches the high watermark to the
end of the load:

* ``oom_kills``: the group's ``memory.oom_control`` oom_kill count (the whole run).
* ``evicted_ratio``: bytes evicted / bytes that had to go. *Evicted*: chunks the workers freed on
  shrink requests (``Shrinker.stats().chunks_freed``) times the chunk size. *Had to go*: for each
  episode (the group's working set at or above the high watermark, from the moment it gets there
  until it is below it again), the highest working set seen in it less the low watermark; summed
  over the episodes. A monitor outside the group finds them: a usage threshold eventfd at the
  fixed rule's high watermark wakes it, and it reads the group every 5 ms besides. The
  watermarks are those the controllers in the group use at the time, as the workers that run
  one write them (see :class:`Monitor`): the adaptive watermarks move. Target: at most 1.1.
* ``share_error``: whether each worker (each cache, in the baseline) was asked in proportion to
  its holdings / cost. The workers sample their holdings and the chunks asked of them
  (``Shrinker.stats().chunks_requested``) every 20 ms. In each 50 ms interval the bytes asked
  of all caches together are due to each cache in proportion to its holding / cost at the
  interval's start; over the window, a cache's error is the bytes asked of it over the bytes
  due to it, minus 1. The largest ``|error|`` is reported. Target: within 10 % (0.10).
  (``share_error_by_mean`` compares each cache's share of all asks with its share of the mean
  holdings / cost instead: coarser, as holdings settle at the start.)
* ``mean_usage``: the group's mean working set (``usage - total_inactive_file``, what the
  controller steers by) over the window as a fraction of the limit, from the monitor's readings;
  ``mean_usage_raw`` the same of ``memory.usage_in_bytes``. Target: at least 80 %.
* ``hit_rate``: cache hits / lookups over the window (the workers count them); beside it the
  baseline's hit rate for the same caches in one process. Target: within 3 points of it
  (``hit_rate_gap``; ``hit_rate_gap_relative`` is the gap as a fraction of the baseline's).
* ``controllers``: distinct processes running a controller for the workers' caches (from each
  worker's own report); with the election, the elected controller's status (``probe``, run in
  the group after the load) must list every worker as registered with it.

The machine is shared and noisy: the figures are printed, never asserted; compare election on
and off within one run. The last line of output is one JSON object.

    python benchmarks/workers.py                  # the full table (about 15 minutes)
    python benchmarks/workers.py --quick          # 256 MiB, 2 workers, a few seconds each
    python benchmarks/workers.py --kinds pool --limits 512 --seconds 10
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import faulthandler
import itertools
import json
import multiprocessing
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

MiB = 1 << 20
KiB = 1 << 10
CHUNK = 4096
#: Value sizes by key: 16 KiB to 128 KiB, mean 72 KiB.
SIZE_STEPS = 8
SIZE_UNIT = 16 * KiB
MEAN_SIZE = SIZE_UNIT * (SIZE_STEPS + 1) // 2
#: Costs of the workers' caches, by worker index.
COSTS = (1.0, 2.0)
#: Seconds between a worker's samples of its holdings and counters.
SAMPLE_EVERY = 0.02
#: Makes a process of ours in the group print its threads' stacks (a signal gunicorn leaves alone).
STACKS_SIGNAL = signal.SIGRTMIN + 3
#: Seconds between the monitor's readings of the group.
MONITOR_EVERY = 0.005


def value_size(key: int) -> int:
    """Bytes of the value under ``key`` (16-128 KiB, uncorrelated with the key's popularity)."""
    return SIZE_UNIT * (1 + (key * 2654435761 >> 11) % SIZE_STEPS)


def compute(key: int) -> bytes:
    """The cached computation."""
    return random.Random(key).randbytes(value_size(key))


def key_count(limit: int, keyspace: float) -> int:
    """Keys whose values together take ``keyspace`` times ``limit``."""
    return max(1000, int(limit * keyspace / MEAN_SIZE))


class Zipf:
    """Keys 0..n-1 with probability proportional to 1 / (rank + 1) ** exponent."""

    def __init__(self, n: int, exponent: float, seed: int) -> None:
        self.cum = list(itertools.accumulate(1.0 / (r + 1) ** exponent for r in range(n)))
        self.rng = random.Random(seed)

    def keys(self, count: int) -> list[int]:
        total = self.cum[-1]
        cum, rnd = self.cum, self.rng.random
        return [bisect.bisect_left(cum, rnd() * total) for _ in range(count)]


# ---------------------------------------------------------------------- in a worker


class Holder:
    """A worker's caches, its counters, and its samples of them; dumped to a file at exit.

    One cache per worker process; the baseline's single process holds as many as the run has
    workers, and a request goes to one of them at random.
    """

    def __init__(self, index: int, caches: int, dump_dir: str) -> None:
        from pyshrinker import ChunkCache

        # A run that does not end prints every thread's stack of every process (see stacks()).
        faulthandler.register(STACKS_SIGNAL, all_threads=True)

        self.index = index
        self.dump_dir = dump_dir
        first = index * caches
        self.costs = [COSTS[(first + i) % len(COSTS)] for i in range(caches)]
        self.caches: list[ChunkCache[int, bytes]] = [
            ChunkCache(CHUNK, cost=cost, name=f"worker-{first + i}")
            for i, cost in enumerate(self.costs)
        ]
        self.hits = [0] * caches
        self.misses = [0] * caches
        self.rng = random.Random(os.getpid())
        self.samples: list[list[float]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_loop, daemon=True)
        self._sampler.start()
        with open(os.path.join(dump_dir, f"ready-{os.getpid()}"), "w") as f:
            f.write(str(index))

    def lookup(self, key: int) -> bool:
        """Serve ``key``: from the cache, or computed and cached. True on a hit."""
        which = self.rng.randrange(len(self.caches)) if len(self.caches) > 1 else 0
        cache = self.caches[which]
        value = cache.get(key)
        if value is not None:
            self.hits[which] += 1
            return True
        self.misses[which] += 1
        value = compute(key)
        cache.put(key, value, nbytes=len(value))
        return False

    def _sample(self) -> None:
        # (t, then per cache: chunks held, hits, misses, chunks requested, chunks freed)
        row: list[float] = [time.monotonic()]
        for cache, hits, misses in zip(self.caches, self.hits, self.misses, strict=True):
            stats = cache.shrinker.stats()
            row += [cache.chunks, hits, misses, stats.chunks_requested, stats.chunks_freed]
        self.samples.append(row)

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self._sample()
            self._write_marks()

    def _write_marks(self) -> None:
        """Where this process runs a controller: its watermarks now, for the Monitor (the
        adaptive ones move with what it measures)."""
        from pyshrinker import default_controller

        path = os.path.join(self.dump_dir, f"marks-{os.getpid()}")
        role, _leader = self.role()
        marks = default_controller().watermarks if role != "follower" else None
        if marks is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a follower now (after a failover): another one's count
            return
        with open(path + ".tmp", "w") as f:
            f.write(f"{marks.high} {marks.low}")
        os.replace(path + ".tmp", path)

    def role(self) -> tuple[str, int]:
        """Where this worker's controller runs: (role, pid of its process)."""
        from pyshrinker.shared import SharedTransport

        transport = self.caches[0].shrinker.transport
        if isinstance(transport, SharedTransport):
            return transport.role, transport.leader_pid
        return "own", os.getpid()

    def dump(self) -> None:
        """Write everything to ``dump_dir/<pid>.json``."""
        self._stop.set()
        self._sample()
        from pyshrinker.trim import trim_stats

        role, leader = self.role()
        trims = trim_stats()
        out = {
            "trim": [trims.trims, trims.deferred, trims.seconds, trims.untrimmed_bytes],
            "pid": os.getpid(),
            "index": self.index,
            "costs": self.costs,
            "role": role,
            "leader": leader,
            "samples": self.samples,
        }
        path = os.path.join(self.dump_dir, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(path + ".tmp", path)


_holder: Holder | None = None


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """GET /<key>: 'hit' or 'miss', after serving the key's value from the worker's cache."""
    assert _holder is not None
    try:
        key = int(environ["PATH_INFO"].lstrip("/"))
    except ValueError:
        start_response("404 Not Found", [("Content-Length", "0")])
        return []
    body = b"hit\n" if _holder.lookup(key) else b"miss\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def serve_gunicorn(args: argparse.Namespace) -> int:
    """In the group: gunicorn's arbiter on the inherited listening socket."""
    from gunicorn.app.base import BaseApplication

    faulthandler.register(STACKS_SIGNAL, all_threads=True)

    caches = args.caches

    def post_fork(server: Any, worker: Any) -> None:
        global _holder
        _holder = Holder(worker.age - 1, caches, args.dump_dir)

    def worker_exit(server: Any, worker: Any) -> None:
        if _holder is not None:
            _holder.dump()

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings = {
                "bind": [f"fd://{args.fd}"],
                "workers": args.workers,
                "worker_class": "sync",
                "timeout": 120,
                "graceful_timeout": 20,
                "backlog": 4096,
                "loglevel": "warning",
                "accesslog": None,
                "post_fork": post_fork,
                "worker_exit": worker_exit,
            }
            for name, value in settings.items():
                self.cfg.set(name, value)

        def load(self) -> Callable[..., Any]:
            return wsgi_app

    Server().run()
    return 0


def _pool_init(counter: Any, caches: int, dump_dir: str) -> None:
    global _holder
    from multiprocessing.util import Finalize

    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _holder = Holder(index, caches, dump_dir)
    # Run when the worker leaves after pool.close() (multiprocessing's exit function).
    Finalize(_holder, _holder.dump, exitpriority=10)


def _pool_task(keys: list[int]) -> tuple[int, int]:
    assert _holder is not None
    hits = sum(_holder.lookup(key) for key in keys)
    return hits, len(keys) - hits


def drive_pool(args: argparse.Namespace) -> int:
    """In the group: a Pool of ``--workers`` processes fed batches of Zipf keys until told to pause
    (a first byte on stdin; the workers stay, for the probe), then, at a second byte, closed so
    every worker dumps its figures."""
    faulthandler.register(STACKS_SIGNAL, all_threads=True)
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("i", 0)
    zipf = Zipf(args.keys, args.zipf, seed=1)
    stop = threading.Event()

    paused = threading.Event()

    def wait_for_stop() -> None:
        # The raw fd, not sys.stdin: a forked pool worker closes sys.stdin, which would wait
        # forever for the buffer's lock held by this thread at the fork. A first byte pauses
        # the load (the workers stay, for the probe), the next one ends the run.
        os.read(0, 1)
        paused.set()
        os.read(0, 1)
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()

    pool = ctx.Pool(args.workers, _pool_init, (counter, args.caches, args.dump_dir))
    # A few batches queued per worker, no more: the pool's queue is unbounded.
    room = threading.Semaphore(4 * args.workers)
    totals = [0, 0]
    lock = threading.Lock()

    def done(result: tuple[int, int]) -> None:
        with lock:
            totals[0] += result[0]
            totals[1] += result[1]
        room.release()

    while not paused.is_set():
        room.acquire()
        pool.apply_async(_pool_task, (zipf.keys(32),), callback=done)
    stop.wait()
    pool.close()
    pool.join()
    hits, misses = totals
    print(json.dumps({"hits": hits, "misses": misses}), flush=True)
    return 0


# ---------------------------------------------------------------------- outside the group


def load_client(
    port: int, keys: int, exponent: float, seed: int, threads: int, stop: Any, out: Any
) -> None:
    """A load generator process: ``threads`` threads, one HTTP/1.0 request per connection,
    until ``stop`` is set; sends its counts of hits, misses and errors to ``out``."""
    counts = {"hit": 0, "miss": 0, "error": 0}
    lock = threading.Lock()

    def run(n: int) -> None:
        zipf = Zipf(keys, exponent, seed * 1000 + n)
        mine = {"hit": 0, "miss": 0, "error": 0}
        while not stop.is_set():
            for key in zipf.keys(16):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                        conn.sendall(b"GET /%d HTTP/1.0\r\nHost: bench\r\n\r\n" % key)
                        data = b""
                        while chunk := conn.recv(4096):
                            data += chunk
                    word = data.rsplit(b"\r\n\r\n", 1)[-1].strip()
                    mine["hit" if word == b"hit" else "miss" if word == b"miss" else "error"] += 1
                except OSError:
                    mine["error"] += 1
                    time.sleep(0.01)
        with lock:
            for k, v in mine.items():
                counts[k] += v

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.send(counts)
    out.close()


class Monitor:
    """Reads the group (outside it): episodes above the high watermark and mean usage.

    The watermarks are those of the controllers running in the group now, as the workers write
    them (``marks-<pid>`` in the dump directory; the adaptive watermarks move): with several
    (election off), the highest high and the highest low, so that an episode starts when the
    first controller would act and what had to go is the least any of them would ask for.
    Until one is written, the fixed rule's (``policy.watermarks``), which a controller starts on.
    """

    def __init__(self, path: str, dump_dir: str) -> None:
        from pyshrinker import policy
        from pyshrinker.cgroup import CgroupV1
        from pyshrinker.signals.v1 import UsageThreshold

        self.source = CgroupV1.open(path)
        self.dump_dir = dump_dir
        limit = self.source.read().limit
        assert limit is not None
        self.limit = limit
        fixed = policy.watermarks(limit, False)
        self.high, self.low = fixed.high, fixed.low
        # A wake-up at the fixed high (the lowest a controller starts on); read every 5 ms too.
        self.threshold = UsageThreshold.register(path, fixed.high)
        self.readings: list[tuple[float, int, int]] = []
        self.episodes: list[tuple[float, int]] = []  # (start, most above the low watermark)
        self.first_high: float | None = None
        self.window_end: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.threshold.fileno(), select.POLLIN)
        above = False
        while not self._stop.is_set():
            if poller.poll(MONITOR_EVERY * 1000):
                self.threshold.consume()
            now = time.monotonic()
            try:
                state = self.source.read()
            except Exception:
                continue
            if self.window_end is not None and now > self.window_end:
                continue
            self.readings.append((now, state.working_set, state.usage))
            self._read_marks()
            if state.working_set >= self.high:
                if self.first_high is None:
                    self.first_high = now
                if not above:
                    self.episodes.append((now, state.working_set - self.low))
                elif state.working_set - self.low > self.episodes[-1][1]:
                    self.episodes[-1] = (self.episodes[-1][0], state.working_set - self.low)
                above = True
            else:
                above = False

    def _read_marks(self) -> None:
        marks = []
        for name in os.listdir(self.dump_dir):
            if name.startswith("marks-") and not name.endswith(".tmp"):
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(self.dump_dir, name)) as f:
                        high, low = map(int, f.read().split())
                    marks.append((high, low))
        if marks:
            self.high = max(high for high, _ in marks)
            self.low = max(low for _, low in marks)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.threshold.close()
        self.source.close()

    def figures(self, start: float, end: float) -> dict[str, Any]:
        limit = self.limit
        window = [r for r in self.readings if start <= r[0] <= end]
        # Time-weighted means: each reading holds until the next.
        ws = raw = span = 0.0
        for (t0, w, u), (t1, _, _) in itertools.pairwise(window):
            ws += w * (t1 - t0)
            raw += u * (t1 - t0)
            span += t1 - t0
        episodes = [e for e in self.episodes if start <= e[0] <= end]
        return {
            "episodes": len(episodes),
            "had_to_go": sum(max(0, above_low) for _, above_low in episodes),
            "mean_usage": ws / span / limit if span else float("nan"),
            "mean_usage_raw": raw / span / limit if span else float("nan"),
            "readings": len(window),
        }


def probe_in_group(group: Any, env: dict[str, str]) -> dict[str, Any] | None:
    """The elected controller's status, asked by a process in the group (registers nothing)."""
    code = "import json; from pyshrinker.shared import probe; print(json.dumps(probe()))"
    done = group.spawn([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = done.communicate(timeout=30)
    found: dict[str, Any] | None = json.loads(out.strip().splitlines()[-1])
    return found


def wait_ready(dump_dir: str, count: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(name.startswith("ready-") for name in os.listdir(dump_dir)) < count:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError("the workers did not start in time")
        time.sleep(0.02)


def wait_for_high(monitor: Monitor, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while monitor.first_high is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the working set never reached the high watermark")
        time.sleep(0.05)
    return monitor.first_high


def stacks(group: Any) -> None:
    """Have every process in our group print its threads' stacks (to our stderr)."""
    for pid in group.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, STACKS_SIGNAL)
    time.sleep(2)


def end_process(proc: subprocess.Popen[Any], group: Any, grace: float) -> None:
    """Stop the process we started and anything left in our group (all ours), by pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            stacks(group)
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while group.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in group.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_one(
    kind: str,
    workers: int,
    limit_mib: int,
    election: bool,
    baseline: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One configuration in a fresh group: start, load to the high watermark, measure, stop."""
    from pyshrinker.cgroup import ManagedCgroupV1

    prefix = os.environ.get("PYSHRINKER_CGROUP_PREFIX", "pyshrinker-bench-")
    limit = limit_mib * MiB
    keys = key_count(limit, args.keyspace)
    processes, caches = (1, workers) if baseline else (workers, 1)
    scope = f"bench-{uuid.uuid4().hex[:12]}"
    env = dict(os.environ, PYSHRINKER_ELECTION_SCOPE=scope)
    if not election:
        env["PYSHRINKER_ELECTION"] = "off"
    else:
        env.pop("PYSHRINKER_ELECTION", None)
    me = os.path.abspath(__file__)
    group = ManagedCgroupV1.create(f"{prefix}workers-{uuid.uuid4().hex[:8]}", limit)
    dump_dir = tempfile.mkdtemp(prefix="pyshrinker-workers-")
    result: dict[str, Any] = {
        "kind": kind,
        "workers": workers,
        "limit_mib": limit_mib,
        "election": "baseline" if baseline else ("on" if election else "off"),
        "keys": keys,
    }
    proc: subprocess.Popen[Any] | None = None
    listener: socket.socket | None = None
    monitor: Monitor | None = None
    status: dict[str, Any] | None = None
    try:
        monitor = Monitor(group.path, dump_dir)
        common = ["--dump-dir", dump_dir, "--workers", str(processes), "--caches", str(caches)]
        if kind == "gunicorn":
            listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
            port = listener.getsockname()[1]
            argv = [sys.executable, me, "--serve-gunicorn", "--fd", str(listener.fileno()), *common]
            proc = group.spawn(argv, env=env, pass_fds=(listener.fileno(),))
        else:
            argv = [
                sys.executable,
                me,
                "--drive-pool",
                "--keys",
                str(keys),
                "--zipf",
                str(args.zipf),
                *common,
            ]
            proc = group.spawn(
                argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        wait_ready(dump_dir, processes, proc, 60)
        started = time.monotonic()
        clients: list[tuple[Any, Any]] = []
        if kind == "gunicorn":
            # Load until the window ends; the window starts when the high watermark is reached.
            ctx = multiprocessing.get_context("fork")
            stop = ctx.Event()
            for n in range(args.clients):
                recv, send = ctx.Pipe(duplex=False)
                client = ctx.Process(
                    target=load_client,
                    args=(port, keys, args.zipf, n + 1, args.threads, stop, send),
                )
                client.start()
                send.close()
                clients.append((client, recv))
        window_start = wait_for_high(monitor, args.warmup_timeout)
        window_end = window_start + args.seconds
        monitor.window_end = window_end
        time.sleep(max(0.0, window_end - time.monotonic()))
        loaded_for = time.monotonic() - started
        if kind == "gunicorn":
            stop.set()
        else:
            assert proc.stdin is not None
            proc.stdin.write("p")  # pause: the pool's workers stay
            proc.stdin.flush()
        client_counts = {"hit": 0, "miss": 0, "error": 0}
        for client, recv in clients:
            if recv.poll(30):
                for k, v in recv.recv().items():
                    client_counts[k] += v
            client.join(10)
            if client.is_alive():
                client.kill()  # our own load generator, by pid
                client.join()
        if clients:
            result["client_counts"] = client_counts
        if election and not baseline:
            # Once the load has stopped, while every worker still runs: a new Python process
            # (some 20 MiB) started in a group held a few MiB under its limit was OOM-killed,
            # or made the kernel kill a worker, in 3 of 5 runs when it probed under load.
            if kind == "pool":
                time.sleep(0.5)  # the batches queued when it paused
            status = probe_in_group(group, env)
        if kind == "gunicorn":
            end_process(proc, group, 30)
        else:
            assert proc.stdin is not None
            proc.stdin.write("s")  # the end: the pool closes, its workers dump
            proc.stdin.flush()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                stacks(group)
                raise
        result["oom_kills"] = group.oom_kills()
        result["peak_mib"] = round(group.peak() / MiB, 1)
        result["loaded_s"] = round(loaded_for, 1)
        result.update(monitor.figures(window_start, window_end))
    finally:
        if monitor is not None:
            monitor.close()
        if proc is not None:
            end_process(proc, group, 5)
        if listener is not None:
            listener.close()
        group.remove()
    dumps = []
    for name in sorted(os.listdir(dump_dir)):
        path = os.path.join(dump_dir, name)
        if name.endswith(".json"):
            with open(path) as f:
                dumps.append(json.load(f))
        os.unlink(path)
    os.rmdir(dump_dir)
    result.update(worker_figures(dumps, window_start, window_end, result["had_to_go"]))
    result["processes_dumped"] = len(dumps)
    # Heap trims after reclaim (pyshrinker.trim), whole run: run, put off, CPU ms per trim.
    trims = [sum(d["trim"][i] for d in dumps) for i in range(4)]
    result["trims"], result["trims_deferred"] = trims[0], trims[1]
    result["trim_ms"] = round(trims[2] / trims[0] * 1000, 2) if trims[0] else None
    result["untrimmed_mib"] = round(trims[3] / MiB, 1)
    result["roles"] = sorted(d["role"] for d in dumps)
    result["controllers"] = len({d["leader"] for d in dumps})
    if status is not None:
        pids = {d["pid"] for d in dumps}
        registered = {entry[0] for entry in status["shrinkers"]}
        result["elected"] = {
            "pid": status["pid"],
            "followers": len(status["followers"]),
            "all_workers_registered": registered == pids and status["pid"] in pids,
            "shrinkers": len(status["shrinkers"]),
        }
    return result


#: Seconds of the intervals over which asks are compared with the holdings at their start.
SHARE_INTERVAL = 0.05


class Series:
    """One cache's samples: cumulative counters and holdings, by time."""

    def __init__(self, samples: list[list[float]], cache: int, cost: float) -> None:
        o = 1 + 5 * cache
        self.times = [s[0] for s in samples]
        self.rows = [s[o : o + 5] for s in samples]  # held, hits, misses, requested, freed
        self.cost = cost

    def at(self, t: float) -> list[float]:
        """The last sample taken at or before ``t`` (the first if none)."""
        return self.rows[max(0, bisect.bisect_right(self.times, t) - 1)]

    def mean_held(self, start: float, end: float) -> float:
        inside = [r[0] for t, r in zip(self.times, self.rows, strict=True) if start <= t <= end]
        return sum(inside) / len(inside) if inside else self.at(end)[0]


def share_errors(series: list[Series], start: float, end: float) -> tuple[list[float], list[float]]:
    """Each cache's bytes asked against its fair share of the asks, minus 1, two ways.

    First: in each SHARE_INTERVAL, the bytes asked of all caches are due to each in proportion
    to its holding / cost at the interval's start (what the controller saw when it decided);
    summed over the window, each cache's asks over what was due to it. Second: its share of all
    asks against its share of the mean holdings / cost over the window (coarser: a run's start,
    when holdings are still settling, weighs as much as any other moment).
    """
    due = [0.0] * len(series)
    t = start
    while t < end:
        t_next = min(end, t + SHARE_INTERVAL)
        asked = sum((s.at(t_next)[3] - s.at(t)[3]) for s in series)
        weights = [s.at(t)[0] / s.cost for s in series]
        total = sum(weights)
        if asked and total:
            for i, w in enumerate(weights):
                due[i] += asked * w / total
        t = t_next
    asked = [s.at(end)[3] - s.at(start)[3] for s in series]
    by_interval = [a / d - 1 if d else float("nan") for a, d in zip(asked, due, strict=True)]
    fair = [s.mean_held(start, end) / s.cost for s in series]
    total_asked, total_fair = sum(asked), sum(fair)
    by_mean = [
        (a / total_asked) / (f / total_fair) - 1 if total_asked and f else float("nan")
        for a, f in zip(asked, fair, strict=True)
    ]
    return by_interval, by_mean


def worker_figures(
    dumps: list[dict[str, Any]], start: float, end: float, had_to_go: int
) -> dict[str, Any]:
    """Evicted bytes, hit rate, holdings and each cache's asked share against its fair share."""
    series = [
        Series(dump["samples"], c, cost) for dump in dumps for c, cost in enumerate(dump["costs"])
    ]
    first = [s.at(start) for s in series]
    last = [s.at(end) for s in series]
    hits = sum(b[1] - a[1] for a, b in zip(first, last, strict=True))
    misses = sum(b[2] - a[2] for a, b in zip(first, last, strict=True))
    freed = sum(b[4] - a[4] for a, b in zip(first, last, strict=True)) * CHUNK
    by_interval, by_mean = share_errors(series, start, end)
    lookups = hits + misses
    return {
        "lookups": lookups,
        "lookups_per_s": round(lookups / (end - start)),
        "hit_rate": hits / lookups if lookups else float("nan"),
        "cache_mib": round(sum(s.mean_held(start, end) for s in series) * CHUNK / MiB, 1),
        "evicted_mib": round(freed / MiB, 1),
        "had_to_go_mib": round(had_to_go / MiB, 1),
        "evicted_ratio": freed / had_to_go if had_to_go else float("nan"),
        "share_errors": [round(e, 3) for e in by_interval],
        "share_error": max((abs(e) for e in by_interval), default=float("nan")),
        "share_errors_by_mean": [round(e, 3) for e in by_mean],
        "share_error_by_mean": max((abs(e) for e in by_mean), default=float("nan")),
    }


# ---------------------------------------------------------------------- the table

TARGETS = "evicted_ratio <= 1.1, share_error <= 0.10, mean_usage >= 0.80, hit rate within 0.03"


def verdicts(row: dict[str, Any], baseline: dict[str, Any] | None) -> list[str]:
    """What misses a target in this row."""
    missed = []
    if row["oom_kills"]:
        missed.append("oom")
    if not row["evicted_ratio"] <= 1.1:
        missed.append("evicted")
    if not row["share_error"] <= 0.10:
        missed.append("share")
    if not row["mean_usage"] >= 0.80:
        missed.append("usage")
    if baseline is not None and not abs(row["hit_rate"] - baseline["hit_rate"]) <= 0.03:
        missed.append("hits")
    return missed


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    head = (
        f"{'kind':<9}{'N':>3}{'limit':>6} {'election':<9}{'oom':>4}{'ep':>5}"
        f"{'evict/need':>11}{'share err':>10}{'(mean)':>7}{'usage':>7}{'raw':>6}{'hits':>7}"
        f"{'base':>7}{'cache':>7}{'req/s':>7}{'ctl':>4}  missed"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        base = row.get("baseline_hit_rate")
        print(
            f"{row['kind']:<9}{row['workers']:>3}{row['limit_mib']:>6} {row['election']:<9}"
            f"{row['oom_kills']:>4}{row['episodes']:>5}{row['evicted_ratio']:>11.2f}"
            f"{row['share_error']:>10.3f}{row['share_error_by_mean']:>7.3f}{row['mean_usage']:>7.1%}{row['mean_usage_raw']:>6.0%}"
            f"{row['hit_rate']:>7.1%}{(f'{base:.1%}' if base is not None else '-'):>7}"
            f"{row['cache_mib']:>7.0f}"
            f"{row['lookups_per_s']:>7}{row['controllers']:>4}  {','.join(row['missed']) or '-'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="256 MiB, 2 workers, 5 s a run: the machinery, not the figures",
    )
    parser.add_argument("--limits", default="1024,512", help="group limits, MiB")
    parser.add_argument("--gunicorn-workers", default="4,8")
    parser.add_argument("--pool-workers", default="4")
    parser.add_argument("--kinds", default="gunicorn,pool")
    parser.add_argument("--modes", default="on,off", help="election on, off, or both")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--keyspace", type=float, default=4.0)
    parser.add_argument("--zipf", type=float, default=0.9)
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--threads", type=int, default=6, help="threads per load generator")
    parser.add_argument("--warmup-timeout", type=float, default=120.0)
    # The roles this script plays inside the group.
    parser.add_argument("--serve-gunicorn", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--drive-pool", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dump-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--caches", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--keys", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_gunicorn:
        return serve_gunicorn(args)
    if args.drive_pool:
        return drive_pool(args)

    from pyshrinker.cgroup import v1_memory_available

    if not v1_memory_available():
        print(json.dumps({"benchmark": "workers", "skipped": "needs root and cgroup v1 memory"}))
        return 0
    if args.quick:
        args.limits, args.gunicorn_workers, args.pool_workers = "256", "2", "2"
        if args.seconds == parser.get_default("seconds"):
            args.seconds = 5.0
    kinds = [k for k in args.kinds.split(",") if k]
    if "gunicorn" in kinds:
        try:
            import gunicorn  # noqa: F401
        except ImportError:
            print(
                "gunicorn is not installed (pip install 'pyshrinker[bench]'): pool only",
                file=sys.stderr,
            )
            kinds.remove("gunicorn")
    modes = [m == "on" for m in args.modes.split(",") if m]
    limits = [int(x) for x in args.limits.split(",") if x]
    counts = {
        "gunicorn": [int(x) for x in args.gunicorn_workers.split(",") if x],
        "pool": [int(x) for x in args.pool_workers.split(",") if x],
    }
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    load = os.getloadavg()[0]
    for kind in kinds:
        for workers in counts[kind]:
            for limit in limits:
                base = None
                plan = [(True, True)] if not args.no_baseline else []
                for election, baseline in [*plan, *((m, False) for m in modes)]:
                    try:
                        row = run_one(kind, workers, limit, election, baseline, args)
                    except Exception as err:
                        # Reported, and the other runs go on: a failure is a figure too.
                        label = "baseline" if baseline else ("on" if election else "off")
                        failed.append(f"{kind} {workers} {limit} MiB {label}: {err!r}")
                        print(failed[-1], file=sys.stderr, flush=True)
                        continue
                    if baseline:
                        base = row
                    elif base is not None:
                        row["baseline_hit_rate"] = base["hit_rate"]
                        row["hit_rate_gap"] = base["hit_rate"] - row["hit_rate"]
                        row["hit_rate_gap_relative"] = row["hit_rate_gap"] / base["hit_rate"]
                    row["missed"] = verdicts(row, None if baseline else base)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        f"workers: {args.seconds:g} s measured a run, Zipf {args.zipf}, keys for "
        f"{args.keyspace:g}x the limit, load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; targets: {TARGETS}"
    )
    print_table(rows)
    for line in failed:
        print(f"FAILED {line}")
    end_load = os.getloadavg()[0]
    print(
        json.dumps(
            {
                "benchmark": "workers",
                "seconds": args.seconds,
                "load_average": [round(load, 1), round(end_load, 1)],
                "runs": rows,
                "failed": failed,
            }
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
