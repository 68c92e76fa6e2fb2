"""The check that no test is skipped or deselected in every stage (tests/kernel_features.py)."""

from __future__ import annotations

import json
from pathlib import Path

from .kernel_features import FEATURES, check_coverage


def write_stage(path: Path, stage: str, tests: dict[str, tuple[str, list[str]]]) -> str:
    """A stage's outcomes file, as pytest_sessionfinish writes it."""
    data = {
        "stage": stage,
        "tests": {n: {"outcome": o, "features": f} for n, (o, f) in tests.items()},
    }
    path.write_text(json.dumps(data))
    return str(path)


class TestCheckCoverage:
    """check_coverage over this stage's outcomes and another stage's file."""

    def test_each_test_passed_somewhere(self, tmp_path: Path) -> None:
        """A v2 test deselected here but passed in the guest is fine; so is a plain one."""
        here = {
            "t.py::a": {"outcome": "passed", "features": ["v1"]},
            "t.py::b": {"outcome": "deselected", "features": ["v2"]},
        }
        guest = write_stage(
            tmp_path / "g.json",
            "guest",
            {"t.py::a": ("deselected", ["v1"]), "t.py::b": ("passed", ["v2"])},
        )
        problems, summary = check_coverage("host", here, [guest])
        assert problems == []
        assert len(summary) == len(FEATURES)
        assert "v2: 1 tests; passed 0 in host, 1 in guest" in summary

    def test_skipped_everywhere_is_a_problem(self, tmp_path: Path) -> None:
        """Skipped in one stage and deselected in the other: reported, with where."""
        here = {"t.py::b": {"outcome": "skipped", "features": ["v2"]}}
        guest = write_stage(tmp_path / "g.json", "guest", {"t.py::b": ("deselected", ["v2"])})
        problems, _ = check_coverage("host", here, [guest])
        assert problems == ["t.py::b: passed in no stage (skipped in host, deselected in guest)"]

    def test_only_in_one_stage_and_failed(self, tmp_path: Path) -> None:
        """A test the other stage never collected, failed here: reported."""
        here = {"t.py::c": {"outcome": "failed", "features": []}}
        guest = write_stage(tmp_path / "g.json", "guest", {})
        problems, _ = check_coverage("host", here, [guest])
        assert problems == ["t.py::c: passed in no stage (failed in host)"]

    def test_missing_stage_file(self, tmp_path: Path) -> None:
        """No file from the other stage (the guest did not run): reported."""
        here = {"t.py::a": {"outcome": "passed", "features": []}}
        problems, _ = check_coverage("host", here, [str(tmp_path / "absent.json")])
        assert len(problems) == 1 and "no outcomes from another stage" in problems[0]

    def test_a_stage_named_twice(self, tmp_path: Path) -> None:
        """Another file claiming this stage's name must not replace this stage's outcomes."""
        here = {"t.py::a": {"outcome": "passed", "features": []}}
        other = write_stage(tmp_path / "g.json", "host", {"t.py::a": ("not run", [])})
        problems, _ = check_coverage("host", here, [other])
        assert problems == [f"outcomes of stage 'host' twice (again in {other})"]

    def test_an_expected_failure_counts_as_run(self, tmp_path: Path) -> None:
        """An xfail (an upstream test for an intended difference) is not a test no stage ran."""
        here = {"t.py::x": {"outcome": "xfailed", "features": []}}
        other = write_stage(tmp_path / "g.json", "debug", {"t.py::x": ("skipped", [])})
        problems, _ = check_coverage("host", here, [other])
        assert problems == []
