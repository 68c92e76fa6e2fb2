# Names the compiled parts; everything else is in pyproject.toml.
#   pyshrinker._native: the cffi extension (syscalls), built from _native_build.py.
#   pyshrinker._lru: the CPython extension under ShrinkableLRU and @shrinkable_cache.
#   pyshrinker._eventfd_fast: eventfd read/write keeping the GIL on non-blocking fds.
from setuptools import Extension, setup

setup(
    cffi_modules=["src/pyshrinker/_native_build.py:ffibuilder"],
    ext_modules=[
        Extension("pyshrinker._lru", ["src/pyshrinker/_lru.c"]),
        Extension("pyshrinker._eventfd_fast", ["src/pyshrinker/_eventfd_fast.c"]),
    ],
)
