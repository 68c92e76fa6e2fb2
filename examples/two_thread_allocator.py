"""The mempressure proposal's example program, done right.

Thread 1 registers a shrinker and allocates chunks (1 MiB by default, every page touched)
forever, or until --total bytes or --duration seconds; thread 2 - pyshrinker's listener
thread - frees the oldest chunks, as many as the controller asks. The last line of output is
one JSON object with the run's figures. The program lives in :mod:`pyshrinker.allocator`
(also runnable as ``python -m pyshrinker.allocator``); this script is kept for its old path.

    python examples/two_thread_allocator.py --total 8G
    python examples/two_thread_allocator.py --no-shrinker --total 8G
"""

from __future__ import annotations

import sys

from pyshrinker.allocator import main

if __name__ == "__main__":
    sys.exit(main())
