"""The pyshrinker command: each subcommand as a user runs it, on the real kernel where needed."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib.util import find_spec

import pytest

from pyshrinker import __version__ as pyshrinker_version
from pyshrinker import cli, demo
from pyshrinker.abi import Level
from pyshrinker.cgroup import V1_MOUNT, v1_memory_available, v2_group_of, v2_mount
from pyshrinker.controller import ShrinkRequest
from tests.conftest import need
from tests.v2_helpers import run_in_container, run_in_group

MiB = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STATUS_KEYS = {
    "schema",
    "pid",
    "memory",
    "limit",
    "usage",
    "working_set",
    "headroom",
    "watermarks",
    "psi",
    "signals",
    "unavailable",
    "controller",
}
RUN_KEYS = {
    "schema",
    "command",
    "cgroup",
    "limit",
    "peak_usage",
    "oom_kill",
    "signal",
    "exit_status",
    "seconds",
    "leftovers_killed",
}
#: Allocates 200 MiB and touches every page (bytearray zero-fills).
ALLOCATE_200M = "b = bytearray(200 * 1024 * 1024); print('survived')"


def pyshrinker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pyshrinker ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "pyshrinker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_json(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in {text!r}"
    return json.loads(lines[-1])


def run_groups() -> set[str]:
    return set(glob.glob(os.path.join(V1_MOUNT, cli.RUN_GROUP_PREFIX + "*")))


@pytest.fixture
def v1_run() -> Iterator[None]:
    """Needs v1 groups; fails if ``pyshrinker run`` left a group behind (and removes it)."""
    need(v1_memory_available(), "needs root and a cgroup v1 memory hierarchy")
    yield from no_groups_left_behind(run_groups)


def no_groups_left_behind(groups: Callable[[], set[str]]) -> Iterator[None]:
    """Fail if the test left new ``groups()`` behind (killing their processes, removing them)."""
    before = groups()
    yield
    leftovers = groups() - before
    for path in leftovers:
        with open(os.path.join(path, "cgroup.procs")) as f:
            for pid in f.read().split():
                os.kill(int(pid), signal.SIGKILL)
        for _ in range(500):
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.01)
    assert not leftovers, f"pyshrinker run left groups behind: {leftovers}"


class TestHelp:
    """Every subcommand answers --help; the command is installed under both names."""

    @pytest.mark.parametrize(
        "command", [[], ["status"], ["watch"], ["run"], ["demo"], ["daemon"]], ids=str
    )
    def test_help_exits_0(self, command):
        """--help prints the subcommand's usage and exits 0."""
        proc = pyshrinker(*command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(" ".join(["usage: pyshrinker", *command]))

    def test_console_script(self):
        """The ``pyshrinker`` console script is installed next to the interpreter."""
        script = os.path.join(os.path.dirname(sys.executable), "pyshrinker")
        proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0
        assert proc.stdout.strip() == f"pyshrinker {pyshrinker_version}"

    def test_no_subcommand_is_usage_error(self):
        """No subcommand: exit 2 with the usage on stderr."""
        proc = pyshrinker()
        assert proc.returncode == 2
        assert "usage: pyshrinker" in proc.stderr

    def test_main_returns_instead_of_exiting(self, capsys):
        """``main(argv)`` returns argparse's status rather than raising SystemExit."""
        assert cli.main(["status", "--no-such-option"]) == 2
        assert "unrecognized arguments" in capsys.readouterr().err


class TestStatus:
    """status: memory cgroup, limit, usage, PSI and signal sources."""

    def test_json_has_documented_keys_and_sane_values(self):
        """status --json is one object with the documented keys and plausible values."""
        proc = pyshrinker("status", "--json")
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert set(status) == STATUS_KEYS
        assert status["schema"] == 1
        assert status["pid"] > 0
        assert status["memory"]["version"] in {"v1", "v2", "host", "budget"}
        assert os.path.isabs(status["memory"]["path"])
        limit = status["limit"]
        assert limit is None or (isinstance(limit, int) and limit > 0)
        assert isinstance(status["usage"], int) and status["usage"] > 0
        assert 0 <= status["working_set"] <= status["usage"]
        if limit is None:
            assert status["headroom"] is None
        else:
            assert status["headroom"] == limit - status["working_set"]
        assert set(status["psi"]) == {"system", "cgroup"}
        for entry in status["psi"].values():
            if entry is not None:
                assert set(entry) == {"path", "some", "full"}
                assert 0.0 <= entry["some"]["avg10"] <= 100.0
                assert entry["some"]["total_us"] >= 0
        assert status["signals"][0].startswith(f"memory: {status['memory']['version']} ")
        assert all(isinstance(line, str) for line in status["signals"])
        # The test process leads its run's election scope (the status command inherits it).
        assert status["controller"]["state"] in {"running", "none"}
        assert all(isinstance(why, str) and why for why in status["unavailable"].values())

    def test_text_output(self):
        """Plain status names the memory source, the limit and the signals in use."""
        proc = pyshrinker("status")
        assert proc.returncode == 0, proc.stderr
        for label in ("memory source", "limit", "working set", "PSI system", "signals"):
            assert label in proc.stdout

    @pytest.mark.v1
    def test_inside_a_limited_group(self, v1_run):
        """Under ``run --memory 256M`` status shows that group, its limit and usage thresholds."""
        proc = pyshrinker(
            "run", "--memory", "256M", "--", sys.executable, "-m", "pyshrinker", "status", "--json"
        )
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert status["memory"]["version"] == "v1"
        assert os.path.basename(status["memory"]["path"]).startswith(cli.RUN_GROUP_PREFIX)
        assert status["limit"] == 256 * MiB
        thresholds = [line for line in status["signals"] if "usage threshold" in line]
        assert len(thresholds) == 2
        assert "adaptive polling of usage" not in status["signals"]


class TestWatch:
    """watch: a usage line per interval, events as they come, clean stop."""

    def test_count_2_prints_two_updates(self):
        """--count 2 prints exactly two usage lines and exits 0."""
        proc = pyshrinker("watch", "--count", "2", "--interval", "0.1", timeout=60)
        assert proc.returncode == 0, proc.stderr
        updates = [line for line in proc.stdout.splitlines() if "  usage " in line]
        assert len(updates) == 2
        assert proc.stdout.startswith("watching ")

    def test_ctrl_c_exits_130(self):
        """SIGINT (Ctrl-C) stops it with status 130 and no traceback."""
        # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored
        # SIGINT ignored: give the child the default disposition, as a terminal's would have.
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyshrinker", "watch", "--interval", "0.1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("watching ")
            assert "usage" in proc.stdout.readline()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130
        assert "Traceback" not in err

    @pytest.mark.parametrize(
        "args", [["--count", "0"], ["--interval", "-1"], ["--interval", "inf"], ["--count", "x"]]
    )
    def test_bad_arguments_are_usage_errors(self, args):
        """Non-positive counts and intervals: exit 2."""
        assert pyshrinker("watch", *args).returncode == 2


class TestDescribeEvents:
    """How watch prints bursts of levels and requests."""

    def test_one_level(self):
        """A single level event is one line naming it."""
        assert cli.describe_events([Level.MEDIUM]) == ["level medium"]

    def test_burst_of_levels_is_counted(self):
        """A burst prints the highest level and a count of each."""
        lines = cli.describe_events([Level.LOW, Level.OOM, Level.LOW])
        assert lines == ["level oom (3 events: low 2, oom 1)"]

    def test_few_requests_each_shown(self):
        """Up to three requests are shown one by one, with bytes when the chunk size is known."""
        request = ShrinkRequest(1.0, 7, 12, "usage threshold")
        lines = cli.describe_events([(request, MiB)])
        assert lines == ["request 12 chunks (12.0 MiB) from shrinker 7 (usage threshold)"]

    def test_many_requests_summed(self):
        """More than three requests become one line with totals."""
        batch = [(ShrinkRequest(1.0, 7, 2, "poll"), MiB) for _ in range(5)]
        assert cli.describe_events(batch) == [
            "5 requests: 10 chunks (10.0 MiB) from shrinkers 7 (poll)"
        ]


class TestRun:
    """run: a command in a fresh memory-limited cgroup, reported and cleaned up."""

    def test_oom_kill_reported(self, v1_run):
        """200 MiB touched under a 64M limit: OOM-killed, exit 137, oom_kill 1 in the JSON."""
        proc = pyshrinker(
            "run", "--memory", "64M", "--json", "--", sys.executable, "-c", ALLOCATE_200M
        )
        assert proc.returncode == 137, proc.stderr
        assert "survived" not in proc.stdout
        report = last_json(proc.stderr)
        assert set(report) == RUN_KEYS
        assert report["oom_kill"] == 1
        assert report["signal"] == "SIGKILL"
        assert report["exit_status"] == 137
        assert report["limit"] == 64 * MiB
        assert 32 * MiB < report["peak_usage"] <= 64 * MiB
        assert report["command"] == [sys.executable, "-c", ALLOCATE_200M]
        assert not os.path.exists(report["cgroup"])

    def test_human_report_names_the_oom_killer(self, v1_run):
        """Without --json the report is one stderr line naming the OOM killer."""
        proc = pyshrinker("run", "--memory", "64M", "--", sys.executable, "-c", ALLOCATE_200M)
        assert proc.returncode == 137
        report = proc.stderr.strip().splitlines()[-1]
        assert report.startswith("pyshrinker run: killed by the OOM killer (SIGKILL)")
        assert "oom_kill 1" in report
        assert "exit status 137" in report

    def test_exit_status_passed_through(self, v1_run):
        """A command exiting 3 makes run exit 3, with no OOM kill."""
        proc = pyshrinker(
            "run",
            "--memory",
            "64M",
            "--json",
            "--",
            sys.executable,
            "-c",
            "import sys; print('out'); sys.exit(3)",
        )
        assert proc.returncode == 3
        assert proc.stdout == "out\n"
        report = last_json(proc.stderr)
        assert report["exit_status"] == 3
        assert report["signal"] is None
        assert report["oom_kill"] == 0

    def test_without_double_dash(self, v1_run):
        """The command may follow the options without ``--``."""
        proc = pyshrinker("run", "--memory", "64M", "true")
        assert proc.returncode == 0
        assert "exited with status 0" in proc.stderr

    def test_group_removed_afterwards(self, v1_run):
        """No group with the run prefix is left once run returns."""
        before = run_groups()
        proc = pyshrinker("run", "--memory", "64M", "--json", "--", "true")
        assert proc.returncode == 0
        assert run_groups() == before
        assert not os.path.exists(last_json(proc.stderr)["cgroup"])

    def test_leftover_processes_killed(self, v1_run):
        """A background process the command leaves is killed so the group can go."""
        proc = pyshrinker(
            "run",
            "--memory",
            "64M",
            "--json",
            "--",
            "sh",
            "-c",
            "sleep 60 >/dev/null 2>&1 & echo started",
        )
        assert proc.returncode == 0
        report = last_json(proc.stderr)
        assert report["leftovers_killed"] == 1
        assert not os.path.exists(report["cgroup"])

    def test_sigterm_forwarded(self, v1_run):
        """SIGTERM to run reaches the command; run exits 128 + 15."""
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyshrinker",
                "run",
                "--memory",
                "64M",
                "--json",
                "--",
                sys.executable,
                "-c",
                "import time; print('ready', flush=True); time.sleep(60)",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 143
        assert last_json(err)["signal"] == "SIGTERM"

    def test_report_to_file(self, v1_run, tmp_path):
        """-o FILE writes the report there, not to stderr."""
        out = tmp_path / "report.json"
        proc = pyshrinker("run", "-m", "64M", "--json", "-o", str(out), "--", "true")
        assert proc.returncode == 0
        assert proc.stderr == ""
        assert json.loads(out.read_text())["exit_status"] == 0

    @pytest.mark.parametrize("size", ["lots", "0", "-5M"])
    def test_bad_size_is_usage_error(self, size):
        """An unreadable or non-positive --memory: exit 2 and a one-line error."""
        proc = pyshrinker("run", "--memory", size, "--", "true")
        assert proc.returncode == 2
        assert proc.stderr.splitlines()[-1].startswith("pyshrinker run: error: argument --memory")

    def test_no_command_is_usage_error(self):
        """``run --memory 64M`` with nothing to run: exit 2."""
        proc = pyshrinker("run", "--memory", "64M", "--")
        assert proc.returncode == 2
        assert "no command given" in proc.stderr

    def test_command_not_found(self):
        """An unknown command: exit 127, as a shell would, and no group made."""
        before = run_groups() if os.path.isdir(V1_MOUNT) else set()
        proc = pyshrinker("run", "--memory", "64M", "--", "no-such-command-pyshrinker")
        assert proc.returncode == 127
        assert proc.stderr.strip() == (
            "pyshrinker run: error: command not found: no-such-command-pyshrinker"
        )
        if os.path.isdir(V1_MOUNT):
            assert run_groups() == before

    def test_no_cgroup_is_a_clear_error(self, monkeypatch, capsys):
        """Where groups cannot be created: exit 1, one line saying what is needed."""
        monkeypatch.setattr(cli, "managed_cgroup_class", lambda: None)
        assert cli.main(["run", "--memory", "64M", "--", "true"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "needs root and either the cgroup v1 memory controller" in err
        assert "+memory in" in err


class TestExitStatus:
    """Popen return codes become shell exit statuses."""

    @pytest.mark.parametrize(("returncode", "status"), [(0, 0), (3, 3), (-9, 137), (-15, 143)])
    def test_conversion(self, returncode, status):
        """Killed by signal N is 128 + N; exit codes pass through."""
        assert cli.exit_status(returncode) == status


class TestDemo:
    """demo: the allocator with and without pyshrinker, and its plot."""

    @pytest.mark.v1
    def test_plot_written(self, tmp_path):
        """--plot: both runs behave, and the file is a PNG.

        512 MiB rather than the default 256: the margin against the OOM killer under a busy
        machine is tests/test_allocator.py's subject, the command's output is this test's.
        """
        need(v1_memory_available(), "needs root and a cgroup v1 memory hierarchy")
        need(
            find_spec("matplotlib") is not None, "needs matplotlib (pip install 'pyshrinker[plot]')"
        )
        png = tmp_path / "demo.png"
        proc = pyshrinker(
            "demo", "--memory", "512M", "--total", "1G", "--plot", str(png), "--json", timeout=300
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        report = json.loads(proc.stdout)
        with_, without = report["with_shrinker"], report["without_shrinker"]
        assert with_["returncode"] == 0 and with_["oom_kill"] == 0
        assert with_["allocated_bytes"] == 1 << 30
        assert with_["max_usage_bytes"] <= 512 * MiB
        assert with_["requests"] > 0
        assert without["returncode"] == -9 and without["oom_kill"] >= 1
        assert not glob.glob(os.path.join(V1_MOUNT, "pyshrinker-demo-*"))

    def test_process_budget_fallback(self, monkeypatch, capsys):
        """Where no group can be made, one run under a process budget keeps RSS under it."""
        monkeypatch.setattr(demo, "managed_cgroup_class", lambda: None)
        assert cli.main(["demo", "--memory", "192M", "--total", "512M", "--json"]) == 0
        captured = capsys.readouterr()
        assert "process budget" in captured.err
        report = json.loads(captured.out)
        assert list(report) == ["with_shrinker"]
        run = report["with_shrinker"]
        assert run["returncode"] == 0
        assert run["allocated_bytes"] == 512 * MiB
        assert 0 < run["max_usage_bytes"] <= 192 * MiB

    def test_plot_without_matplotlib(self, monkeypatch, capsys, tmp_path):
        """Without matplotlib --plot fails at once (exit 1) naming the extra to install."""
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
        assert cli.main(["demo", "--plot", str(tmp_path / "x.png")]) == 1
        err = capsys.readouterr().err
        assert "pyshrinker[plot]" in err
        assert err.count("\n") == 1
        assert not (tmp_path / "x.png").exists()

    @pytest.mark.parametrize("args", [["--total", "lots"], ["--memory", "0"]])
    def test_bad_sizes_are_usage_errors(self, args):
        """Unreadable sizes: exit 2."""
        assert pyshrinker("demo", *args).returncode == 2


@pytest.mark.v1
class TestAllocatorTrace:
    """The allocator's --trace, which the demo's plot reads."""

    def test_trace_events(self, v1_group, tmp_path):
        """In a 512 MiB group: start, requests, progress and end lines, in time order."""
        group = v1_group(512 * MiB)
        trace = tmp_path / "trace"
        proc = group.spawn(
            [
                sys.executable,
                "-m",
                "pyshrinker.allocator",
                "--total",
                "2G",
                "--trace",
                str(trace),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0
        lines = [line.split() for line in trace.read_text().splitlines()]
        kinds = [words[0] for words in lines]
        assert kinds[0] == "start" and kinds[-1] == "end"
        assert "progress" in kinds
        requests = [words for words in lines if words[0] == "request"]
        assert len(requests) == last_json(out)["requests"] > 0
        assert all(int(words[2]) > 0 for words in requests)
        progress = [int(words[2]) for words in lines if words[0] == "progress"]
        assert progress[-1] == 2 << 30
        assert progress == sorted(progress)


class TestDaemon:
    """daemon: wired to pyshrinker.daemon when it is installed, a clear error when not."""

    def test_help_matches_installation(self):
        """--help shows the daemon's options if the module exists, else says it is missing."""
        proc = pyshrinker("daemon", "--help")
        assert proc.returncode == 0
        if importlib.util.find_spec("pyshrinker.daemon") is not None:
            assert "--mount" in proc.stdout
        else:
            assert "not part of this installation" in proc.stdout

    def test_missing_module_is_a_clear_error(self, monkeypatch, capsys):
        """Without pyshrinker.daemon: exit 1 and one line saying so; --help still exits 0."""
        monkeypatch.setattr(cli, "_load_daemon", lambda: None)
        assert cli.main(["daemon"]) == 1
        err = capsys.readouterr().err
        assert err == (
            "pyshrinker daemon: error: the daemon is not part of this installation "
            "(no module pyshrinker.daemon)\n"
        )
        assert cli.main(["daemon", "--help"]) == 0

    def test_not_imported_for_other_commands(self):
        """Other subcommands do not import pyshrinker.daemon (or FUSE)."""
        code = (
            "import sys; from pyshrinker import cli; cli.build_parser(); "
            "print('pyshrinker.daemon' in sys.modules)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert proc.stdout.strip() == "False"


class TestFormatting:
    """Small pieces of the text output."""

    @pytest.mark.parametrize(
        ("n", "text"),
        [(0, "0 B"), (1536, "1.5 KiB"), (256 * MiB, "256.0 MiB"), (3 << 30, "3.0 GiB")],
    )
    def test_format_bytes(self, n, text):
        """Binary units, one decimal."""
        assert demo.format_bytes(n) == text

    def test_usage_bar(self):
        """A quarter of the limit fills a quarter of the bar; no limit, no bar."""
        assert cli.usage_bar(25, 100, width=8) == "[##......]  25 %"
        assert cli.usage_bar(25, None) == ""


def v2_run_groups() -> set[str]:
    mount = v2_mount() or "/sys/fs/cgroup"
    return set(glob.glob(os.path.join(mount, cli.RUN_GROUP_PREFIX + "*")))


@pytest.fixture
def v2_run() -> Iterator[None]:
    """Needs v2 groups; fails if ``pyshrinker run`` left a v2 group behind (and removes it)."""
    yield from no_groups_left_behind(v2_run_groups)


STATUS = [sys.executable, "-m", "pyshrinker", "status"]


@pytest.mark.v2
class TestOnV2:
    """status, watch, run and demo on a real cgroup v2 kernel."""

    def test_status_in_a_limited_group(self, v2_group, report_figure):
        """In a group with memory.max 256 MiB: that group, its limit, events and PSI."""
        group = v2_group(256 * MiB)
        done = run_in_group(group, [*STATUS, "--json"], timeout=120)
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert status["memory"] == {
            "version": "v2",
            "path": group.path,
            "cgroup": group.path,
            "limit_from": status["memory"]["limit_from"],
        }
        assert status["memory"]["limit_from"].startswith(f"{256 * MiB} bytes, memory.max of ")
        assert status["limit"] == 256 * MiB
        assert 0 < status["working_set"] <= status["usage"] < 256 * MiB
        assert status["watermarks"]["high"] < 256 * MiB
        assert status["psi"]["cgroup"]["path"] == f"{group.path}/memory.pressure"
        assert f"cgroup v2 memory.events ({group.path})" in status["signals"]
        text = run_in_group(group, STATUS, timeout=120)
        assert text.returncode == 0, text.stderr
        report_figure(
            "pyshrinker status in a v2 group with memory.max 256 MiB", text="\n" + text.stdout
        )

    def test_status_at_the_root(self):
        """At the v2 root (no limit, no memory.current): the machine, working set <= usage."""
        need(v2_group_of() == v2_mount(), "needs this process in the v2 root group")
        proc = pyshrinker("status", "--json")
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert status["memory"]["version"] == "host"
        assert status["memory"]["cgroup"] is None
        assert 0 < status["working_set"] <= status["usage"] <= status["limit"]

    def test_status_with_no_limit(self, v2_group, report_figure):
        """A group with no limit up the hierarchy: the machine's MemAvailable, and why."""
        group = v2_group(None)
        done = run_in_group(group, [*STATUS, "--json"], timeout=120)
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert status["memory"]["version"] == "host"
        assert status["memory"]["cgroup"] == group.path
        assert "no memory.max or memory.high" in status["memory"]["limit_from"]
        assert "MemAvailable" in status["memory"]["limit_from"]
        assert 0 < status["working_set"] <= status["usage"] <= status["limit"]
        assert status["watermarks"] is not None
        text = run_in_group(group, STATUS, timeout=120)
        assert text.returncode == 0, text.stderr
        assert "MemAvailable under" in text.stdout
        report_figure("pyshrinker status in a v2 group with no limit", text="\n" + text.stdout)

    def test_status_in_the_container_shape(self, v2_group, report_figure):
        """Namespace, read-only cgroupfs, non-root: the container's limit; PSI falls back."""
        group = v2_group(256 * MiB)
        done = run_in_container(group, [*STATUS, "--json"], timeout=120)
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert status["memory"]["path"] == "/sys/fs/cgroup"
        assert status["limit"] == 256 * MiB
        assert any(
            why.startswith("needs a write, refused") for why in status["unavailable"].values()
        )
        text = run_in_container(group, STATUS, timeout=120)
        assert text.returncode == 0, text.stderr
        assert "psi trigger on /sys/fs/cgroup/memory.pressure: needs a write, refused" in (
            text.stdout
        )
        report_figure("pyshrinker status in the container shape", text="\n" + text.stdout)

    def test_watch(self, v2_group):
        """watch in a v2 group: usage lines against its 256 MiB limit."""
        group = v2_group(256 * MiB)
        argv = [sys.executable, "-m", "pyshrinker", "watch", "--count", "2", "--interval", "0.2"]
        done = run_in_group(group, argv, timeout=120)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith(f"watching cgroup v2 {group.path}")
        updates = [line for line in lines if "  usage " in line]
        assert len(updates) == 2
        assert all("of 256.0 MiB" in line for line in updates)

    def test_run_creates_a_v2_group(self, v2_run):
        """run --memory 64M: a fresh v2 group with memory.max; 200 MiB there is OOM-killed."""
        proc = pyshrinker(
            "run", "--memory", "64M", "--json", "--", sys.executable, "-c", ALLOCATE_200M
        )
        assert proc.returncode == 137, proc.stderr
        report = last_json(proc.stderr)
        assert set(report) == RUN_KEYS
        mount = v2_mount() or "/sys/fs/cgroup"
        assert os.path.dirname(report["cgroup"]) == mount
        assert os.path.basename(report["cgroup"]).startswith(cli.RUN_GROUP_PREFIX)
        assert report["limit"] == 64 * MiB
        assert report["oom_kill"] >= 1 and report["signal"] == "SIGKILL"
        assert 0 < report["peak_usage"] <= 64 * MiB

    def test_run_fits(self, v2_run):
        """A command that fits exits 0; memory.peak and oom_kill 0 are reported."""
        code = "b = bytearray(32 << 20)"
        proc = pyshrinker("run", "--memory", "256M", "--json", "--", sys.executable, "-c", code)
        assert proc.returncode == 0, proc.stderr
        report = last_json(proc.stderr)
        assert report["oom_kill"] == 0 and report["exit_status"] == 0
        assert 32 * MiB <= report["peak_usage"] <= 256 * MiB

    def test_status_under_run(self, v2_run):
        """status under ``run --memory`` shows the v2 group run made."""
        proc = pyshrinker("run", "--memory", "256M", "--", *STATUS, "--json")
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert status["memory"]["version"] == "v2"
        assert os.path.basename(status["memory"]["path"]).startswith(cli.RUN_GROUP_PREFIX)
        assert status["limit"] == 256 * MiB

    def test_demo(self):
        """demo on v2: with pyshrinker exit 0 under the limit, without it OOM-killed."""
        proc = pyshrinker("demo", "--memory", "256M", "--total", "512M", "--json", timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "cgroup v2 memory group" in proc.stderr
        report = json.loads(proc.stdout)
        with_, without = report["with_shrinker"], report["without_shrinker"]
        assert with_["returncode"] == 0 and with_["oom_kill"] == 0
        assert with_["max_usage_bytes"] <= 256 * MiB
        assert without["returncode"] == -9 and without["oom_kill"] >= 1
        mount = v2_mount() or "/sys/fs/cgroup"
        assert not glob.glob(os.path.join(mount, "pyshrinker-demo-*"))
