"""pyshrinker: caches that use memory greedily and give it back before the OOM killer comes.

The 2013 Linux "mempressure" shrinker proposal, both halves, in user space: a client that
reports reclaimable chunks and frees what it is asked, and a controller that watches the
kernel's real signals and decides how much to ask of whom.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyshrinker.abi import Level
    from pyshrinker.cache import CacheStats, ChunkCache
    from pyshrinker.client import (
        LevelSubscription,
        Shrinker,
        ShrinkerStats,
        set_reaction_switch_interval,
        settle,
        subscribe_levels,
    )
    from pyshrinker.controller import (
        Controller,
        ControllerConfig,
        ShrinkerInfo,
        ShrinkRequest,
        default_controller,
        parse_size,
    )
    from pyshrinker.errors import (
        AbiError,
        CgroupError,
        CgroupNotFound,
        CgroupPermissionError,
        ClosedError,
        ControllerFull,
        ControllerGone,
        ControllerNotFound,
        MalformedFile,
        PyshrinkerError,
        TransportError,
        TransportPermissionError,
        UnsupportedError,
    )
    from pyshrinker.lru import (
        CacheInfo,
        LRUStats,
        ShrinkableCachedFunction,
        ShrinkableLRU,
        shrinkable_cache,
    )
    from pyshrinker.subscribers import drop_on_oom, trim_on_pressure
    from pyshrinker.transport import EmbeddedTransport, FilesTransport, Transport
    from pyshrinker.ttl import ShrinkableTLRUCache, ShrinkableTTLCache

# The public names, by the module that defines them. They are imported on first use (PEP 562):
# a program that imports one submodule (``python -m pyshrinker.allocator``, a worker that only
# needs ChunkCache) does not pay for the rest - the LRU caches, cachetools, the TTL caches:
# 3-4 ms of an import of about 80 ms, measured.
_EXPORTS = {
    "pyshrinker.abi": ["Level"],
    "pyshrinker.cache": ["CacheStats", "ChunkCache"],
    "pyshrinker.client": [
        "LevelSubscription",
        "Shrinker",
        "ShrinkerStats",
        "set_reaction_switch_interval",
        "settle",
        "subscribe_levels",
    ],
    "pyshrinker.controller": [
        "Controller",
        "ControllerConfig",
        "ShrinkerInfo",
        "ShrinkRequest",
        "default_controller",
        "parse_size",
    ],
    "pyshrinker.errors": [
        "AbiError",
        "CgroupError",
        "CgroupNotFound",
        "CgroupPermissionError",
        "ClosedError",
        "ControllerFull",
        "ControllerGone",
        "ControllerNotFound",
        "MalformedFile",
        "PyshrinkerError",
        "TransportError",
        "TransportPermissionError",
        "UnsupportedError",
    ],
    "pyshrinker.lru": [
        "CacheInfo",
        "LRUStats",
        "ShrinkableCachedFunction",
        "ShrinkableLRU",
        "shrinkable_cache",
    ],
    "pyshrinker.subscribers": ["drop_on_oom", "trim_on_pressure"],
    "pyshrinker.transport": ["EmbeddedTransport", "FilesTransport", "Transport"],
    "pyshrinker.ttl": ["ShrinkableTLRUCache", "ShrinkableTTLCache"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


if not TYPE_CHECKING:
    # Hidden from type checkers, which see the imports above: a module-level __getattr__ would
    # make them accept any name, typos included.

    def __getattr__(name: str) -> Any:
        module = _MODULE_OF.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # the next lookup finds it without coming here
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


# A library stays quiet unless the application configures logging (and Python's last-resort
# handler, which prints warnings to stderr when no handler exists, is not used).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "AbiError",
    "CacheInfo",
    "CacheStats",
    "CgroupError",
    "CgroupNotFound",
    "CgroupPermissionError",
    "ChunkCache",
    "ClosedError",
    "Controller",
    "ControllerConfig",
    "ControllerFull",
    "ControllerGone",
    "ControllerNotFound",
    "EmbeddedTransport",
    "FilesTransport",
    "LRUStats",
    "Level",
    "LevelSubscription",
    "MalformedFile",
    "PyshrinkerError",
    "ShrinkRequest",
    "ShrinkableCachedFunction",
    "ShrinkableLRU",
    "ShrinkableTLRUCache",
    "ShrinkableTTLCache",
    "Shrinker",
    "ShrinkerInfo",
    "ShrinkerStats",
    "Transport",
    "TransportError",
    "TransportPermissionError",
    "UnsupportedError",
    "__version__",
    "default_controller",
    "drop_on_oom",
    "parse_size",
    "set_reaction_switch_interval",
    "settle",
    "shrinkable_cache",
    "subscribe_levels",
    "trim_on_pressure",
]
