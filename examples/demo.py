"""The README's demo: the two-thread allocator inside a 256 MiB memory cgroup.

Runs the allocator with ``--total 8G`` in a fresh cgroup v1 memory group limited to 256 MiB
with pyshrinker (it must finish, never OOM-killed, peak usage under the limit), then the same
allocator with ``--no-shrinker`` (the kernel's OOM killer ends it), and removes the groups.
Where no group can be created it runs under a process budget instead, and says so.

The demo lives in :mod:`pyshrinker.demo`; this script is ``pyshrinker demo`` under its old
path and takes the same options (``--limit``/``--memory``, ``--total``, ``--plot``, ``--json``).
"""

from __future__ import annotations

import sys

from pyshrinker.demo import main

if __name__ == "__main__":
    sys.exit(main())
