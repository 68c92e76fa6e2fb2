"""Build script for ``pyshrinker._native``, the only C the package has.

Every C declaration pyshrinker uses lives here (cffi API mode, compiled out of line by
``pip install``). Each helper returns ``-errno`` on failure instead of leaving errno to be
read later, so :mod:`pyshrinker._syscalls` can turn results into ``OSError`` in one place.
Nothing outside ``_syscalls`` imports the compiled module.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
static const int PYS_EFD_CLOEXEC;
static const int PYS_EFD_NONBLOCK;
static const int PYS_EFD_SEMAPHORE;

int pys_eventfd(unsigned int initval, int flags);
int pys_eventfd_read(int fd, uint64_t *value);
int pys_eventfd_write(int fd, uint64_t value);
int pys_pidfd_open(int pid, unsigned int flags);
int pys_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
int pys_malloc_trim(size_t pad);
"""

SOURCE = r"""
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

static const int PYS_EFD_CLOEXEC = EFD_CLOEXEC;
static const int PYS_EFD_NONBLOCK = EFD_NONBLOCK;
static const int PYS_EFD_SEMAPHORE = EFD_SEMAPHORE;

static int pys_eventfd(unsigned int initval, int flags) {
    int fd = eventfd(initval, flags);
    return fd < 0 ? -errno : fd;
}

/* An eventfd is read and written 8 bytes at a time; anything shorter is EINVAL. */
static int pys_eventfd_read(int fd, uint64_t *value) {
    ssize_t n = read(fd, value, sizeof *value);
    if (n < 0) return -errno;
    return n == sizeof *value ? 0 : -EIO;
}

static int pys_eventfd_write(int fd, uint64_t value) {
    ssize_t n = write(fd, &value, sizeof value);
    if (n < 0) return -errno;
    return n == sizeof value ? 0 : -EIO;
}

static int pys_pidfd_open(int pid, unsigned int flags) {
    long fd = syscall(SYS_pidfd_open, pid, flags);
    return fd < 0 ? -errno : (int)fd;
}

static int pys_pidfd_getfd(int pidfd, int targetfd, unsigned int flags) {
    long fd = syscall(SYS_pidfd_getfd, pidfd, targetfd, flags);
    return fd < 0 ? -errno : (int)fd;
}

static int pys_malloc_trim(size_t pad) {
    return malloc_trim(pad);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pyshrinker._native", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
