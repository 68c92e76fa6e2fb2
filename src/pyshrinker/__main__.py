"""``python -m pyshrinker``: the ``pyshrinker`` command (:mod:`pyshrinker.cli`)."""

from __future__ import annotations

import sys

from pyshrinker.cli import main

if __name__ == "__main__":
    sys.exit(main())
