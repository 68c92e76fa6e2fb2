"""What creating a cache does to the process: the audit of docs/concepts/process.md, tested.

Each check that concerns process-wide state (the allocator, threads, fds, signal handlers) runs in
a fresh interpreter (tests/footprint_worker.py): the test runner's own process has changed all of
them already.
"""

from __future__ import annotations

import sys
import threading
import uuid

import pytest

from pyshrinker import Shrinker, _switch, set_reaction_switch_interval
from pyshrinker.client import Listener

from .footprint_worker import run_in_fresh_process as run_worker


class TestAllocatorSettings:
    """No allocator setting changes: glibc's dynamic mmap threshold still moves."""

    def test_control_pinned_threshold_is_seen(self) -> None:
        """The check works: threshold pinned (as pyshrinker used to), 512 KiB is mmapped."""
        assert run_worker("threshold", "pinned")["mmapped_512k"] is True

    @pytest.mark.parametrize("mode", ["none", "embedded", "files"])
    def test_threshold_still_dynamic(self, mode: str) -> None:
        """After caches and the embedded controller, or a FilesTransport, 512 KiB is heap memory."""
        assert run_worker("threshold", mode)["mmapped_512k"] is False

    def test_no_mallopt_binding(self) -> None:
        """pyshrinker has no way to change malloc's settings: no mallopt in the compiled module."""
        from pyshrinker import _syscalls

        assert not hasattr(_syscalls, "mallopt")
        assert not hasattr(_syscalls.lib, "pys_mallopt")


class TestAudit:
    """Threads, fds and signal handlers a process gets from its first caches."""

    @pytest.mark.parametrize(
        ("role", "threads"),
        [
            ("leader", ["pyshrinker-controller", "pyshrinker-door", "pyshrinker-listener"]),
            ("follower", ["pyshrinker-link", "pyshrinker-listener"]),
            ("off", ["pyshrinker-controller", "pyshrinker-listener"]),
        ],
    )
    def test_what_caches_add(self, role: str, threads: list[str]) -> None:
        """Daemon threads only (the controller's and its door when this process leads its
        cgroup, a link to it when it follows), CLOEXEC fds only, no signal handler, the same
        switch interval."""
        env = {"PYSHRINKER_ELECTION_SCOPE": f"audit-{uuid.uuid4().hex}"}  # leads its own
        if role == "follower":
            env = {}  # this test process leads its run's scope
            Shrinker.register(4096, lambda n: 0).close()
        elif role == "off":
            env["PYSHRINKER_ELECTION"] = "off"
        found = run_worker("audit", env=env)
        assert found["threads"] == [[name, True] for name in threads]
        assert found["fds"], "the caches registered nothing?"
        assert found["fds_without_cloexec"] == []
        assert all(
            fd.startswith(("anon_inode:[eventfd]", "anon_inode:[eventpoll]", "socket:[", "/"))
            for fd in found["fds"]
        ), found["fds"]
        assert found["changed_signals"] == []
        assert found["switch_interval_after"] == found["switch_interval_before"]


@pytest.fixture
def restore_interval(monkeypatch):
    """No listener counted and no option set; the interpreter's interval restored afterwards."""
    before = sys.getswitchinterval()
    for name, value in (("_running", 0), ("_wanted", None), ("_saved", None), ("_applied", None)):
        monkeypatch.setattr(_switch, name, value)
    yield before
    sys.setswitchinterval(before)


class TestSwitchInterval:
    """The listener leaves the switch interval alone unless the application opts in."""

    def test_left_alone_by_default(self, restore_interval) -> None:
        """A listener started without the option does not change the interval."""
        listener = Listener.start()
        try:
            assert listener.alive
            assert sys.getswitchinterval() == restore_interval
        finally:
            listener.close()
        assert sys.getswitchinterval() == restore_interval

    def test_listener_applies_and_restores(self, restore_interval) -> None:
        """Opted in: a listener that starts lowers the interval; when it closes, it comes back."""
        sys.setswitchinterval(0.005)
        set_reaction_switch_interval(0.001)
        assert sys.getswitchinterval() == pytest.approx(0.005)  # no listener runs yet
        listener = Listener.start()
        try:
            assert sys.getswitchinterval() == pytest.approx(0.001)
        finally:
            listener.close()
        assert sys.getswitchinterval() == pytest.approx(0.005)

    def test_option_follows_while_running(self, restore_interval) -> None:
        """Changed while a listener runs: applied at once; None restores the interval replaced."""
        sys.setswitchinterval(0.005)
        _switch.listener_started()
        try:
            set_reaction_switch_interval(0.001)
            assert sys.getswitchinterval() == pytest.approx(0.001)
            set_reaction_switch_interval(0.002)
            assert sys.getswitchinterval() == pytest.approx(0.002)
            set_reaction_switch_interval(None)
            assert sys.getswitchinterval() == pytest.approx(0.005)
        finally:
            _switch.listener_stopped()

    def test_never_raised(self, restore_interval) -> None:
        """An interval already lower than the option's stays as it is."""
        sys.setswitchinterval(0.0005)
        _switch.listener_started()
        try:
            set_reaction_switch_interval(0.001)
            assert sys.getswitchinterval() == pytest.approx(0.0005)
        finally:
            _switch.listener_stopped()
        assert sys.getswitchinterval() == pytest.approx(0.0005)

    def test_someone_elses_change_wins(self, restore_interval) -> None:
        """Set by the application after us, the interval is theirs: not restored, not lowered."""
        sys.setswitchinterval(0.005)
        set_reaction_switch_interval(0.001)
        _switch.listener_started()
        try:
            sys.setswitchinterval(0.003)
            set_reaction_switch_interval(None)
            assert sys.getswitchinterval() == pytest.approx(0.003)
        finally:
            _switch.listener_stopped()
        assert sys.getswitchinterval() == pytest.approx(0.003)

    @pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "1", True])
    def test_bad_values_refused(self, bad: object, restore_interval) -> None:
        """Only positive finite seconds or None."""
        with pytest.raises((TypeError, ValueError)):
            set_reaction_switch_interval(bad)  # type: ignore[arg-type]
        assert sys.getswitchinterval() == restore_interval

    def test_thread_safe(self, restore_interval) -> None:
        """Threads switching the option on and off leave the interval as it was."""
        sys.setswitchinterval(0.005)
        _switch.listener_started()

        def flip() -> None:
            for i in range(200):
                set_reaction_switch_interval(0.001 if i % 2 == 0 else None)

        try:
            threads = [threading.Thread(target=flip) for _ in range(4)]
            for each in threads:
                each.start()
            for each in threads:
                each.join()
            set_reaction_switch_interval(None)
        finally:
            _switch.listener_stopped()
        assert sys.getswitchinterval() == pytest.approx(0.005)


class TestImport:
    """The package imports its parts on first use: a program pays only for the ones it uses."""

    def test_allocator_leaves_the_caches_out(self) -> None:
        """``python -m pyshrinker.allocator`` imports neither the LRU caches nor cachetools."""
        assert run_worker("imports")["loaded_by_allocator"] == []

    def test_every_public_name_resolves(self) -> None:
        """Each name of ``__all__`` is there on first use, is its module's own object, and
        ``from pyshrinker import *`` binds them all."""
        found = run_worker("imports")
        assert found["not_own_object"] == []
        assert found["missing_from_star"] == []
        assert found["all_in_dir"] is True

    def test_type_checkers_see_the_names(self, tmp_path) -> None:
        """mypy sees the real imports, not the lazy ``__getattr__``: a typo is an error, and a
        name has its class's type."""
        api = pytest.importorskip("mypy.api", reason="mypy is in the dev extra")
        code = tmp_path / "user.py"
        code.write_text(
            "import pyshrinker\nx = pyshrinker.ShrinkableLRu\ny: int = pyshrinker.ShrinkableLRU\n"
        )
        out, _, status = api.run(
            [str(code), "--no-incremental", "--cache-dir", str(tmp_path / "cache")]
        )
        assert status == 1, out
        assert 'has no attribute "ShrinkableLRu"' in out
        assert 'expression has type "type[ShrinkableLRU' in out

    def test_unknown_name(self) -> None:
        import pyshrinker

        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            pyshrinker.nope  # noqa: B018
