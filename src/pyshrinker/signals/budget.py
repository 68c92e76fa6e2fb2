"""A process memory budget: resident memory against a byte budget, like Go's GOMEMLIMIT.

For machines with no memory limit, or where cgroups cannot be touched. The kernel gives no
notification for RSS, so the controller reads ``/proc/self/statm`` (pread on a kept-open fd,
about 1-2 us) adaptively: rarely far from the budget, often close to it.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import os

import attrs

from pyshrinker.cgroup import CgroupVersion, KernelFile, MemorySource, MemoryState
from pyshrinker.errors import MalformedFile

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def parse_statm(text: str) -> int:
    """Resident bytes from the text of ``/proc/<pid>/statm`` (second field, in pages)."""
    parts = text.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise MalformedFile(f"bad statm: {text!r}")
    return int(parts[1]) * PAGE_SIZE


@attrs.define(eq=False)
class ProcessBudget(MemorySource):
    """This process's resident memory, limited by ``budget`` bytes."""

    budget: int = 0

    @classmethod
    def open(cls, budget: int, pid: int | str = "self") -> ProcessBudget:
        """Watch process ``pid``'s RSS against ``budget`` bytes."""
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"budget must be a positive number of bytes, got {budget!r}")
        path = f"/proc/{pid}/statm"
        source = cls(CgroupVersion.BUDGET, path, budget=budget)
        source._files["statm"] = KernelFile.open(path)
        return source

    def read(self) -> MemoryState:
        rss = parse_statm(self._files["statm"].read_text())
        return MemoryState(usage=rss, working_set=rss, limit=self.budget)

    def describe_limit(self) -> str:
        return f"{self.budget} bytes, a budget for the resident memory of {self.path}"
