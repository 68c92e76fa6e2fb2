"""Build script for ``pyshrinker._native``, the syscalls' C.

Every C declaration pyshrinker's syscalls use lives here (cffi API mode, compiled out of line
by ``pip install``), but eventfd read and write, which are in ``_eventfd_fast.c`` because cffi
cannot keep the GIL around a call (see ``_syscalls``). Each helper returns ``-errno`` on failure
instead of leaving errno to be read later, so :mod:`pyshrinker._syscalls` can turn results into
``OSError`` in one place.
Nothing outside ``_syscalls`` imports the compiled module.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
static const int PYS_EFD_CLOEXEC;
static const int PYS_EFD_NONBLOCK;
static const int PYS_EFD_SEMAPHORE;

int pys_eventfd(unsigned int initval, int flags);
int pys_eventfd_write_within(int fd, uint64_t value, long timeout_ns);
int pys_deadline_signal(void);
int pys_pidfd_open(int pid, unsigned int flags);
int pys_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
int pys_malloc_trim(size_t pad);
"""

SOURCE = r"""
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
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

/*
 * A write to an eventfd blocks while the counter cannot take the value, and only a read of
 * that eventfd (or a signal) ends the wait. The file status flags (O_NONBLOCK) belong to the
 * open file description, which a duplicate (dup, pidfd_getfd) shares with the original: making
 * one process's copy non-blocking would make the other's reads fail with EAGAIN. So the wait is
 * bounded by a signal instead: a timer of the writing thread sends it PYS_DEADLINE_SIGNAL every
 * timeout_ns while the write runs; the handler does nothing and is installed without
 * SA_RESTART, so a waiting write returns EINTR (a write that is not waiting is not disturbed).
 * Periodic, because the first expiry may come before the write starts waiting. Each thread
 * creates its timer once (creating one costs more than the write) and deletes it on exit.
 */
#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

/* Realtime: nothing else in glibc, CPython or libfuse uses it; glibc reserves those below. */
#define PYS_DEADLINE_SIGNAL (SIGRTMIN + 4)

static int pys_deadline_signal(void) { return PYS_DEADLINE_SIGNAL; }
static void pys_deadline_handler(int signo) { (void)signo; }

static pthread_once_t pys_deadline_once = PTHREAD_ONCE_INIT;
static pthread_key_t pys_deadline_key;
static int pys_deadline_errno = 0;

static void pys_deadline_timer_delete(void *timer) {
    timer_delete(*(timer_t *)timer);
    free(timer);
}

static void pys_deadline_install(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = pys_deadline_handler;
    sigemptyset(&action.sa_mask);
    if (sigaction(PYS_DEADLINE_SIGNAL, &action, NULL) < 0) pys_deadline_errno = errno;
    else pys_deadline_errno = pthread_key_create(&pys_deadline_key, pys_deadline_timer_delete);
}

/* This thread's timer, created on first use; NULL with errno set if it cannot be. */
static timer_t *pys_deadline_timer(void) {
    timer_t *timer = pthread_getspecific(pys_deadline_key);
    struct sigevent event;
    if (timer != NULL) return timer;
    timer = malloc(sizeof *timer);
    if (timer == NULL) return NULL;
    memset(&event, 0, sizeof event);
    event.sigev_notify = SIGEV_THREAD_ID;
    event.sigev_signo = PYS_DEADLINE_SIGNAL;
    event.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &event, timer) < 0) {
        int saved = errno;
        free(timer);
        errno = saved;
        return NULL;
    }
    errno = pthread_setspecific(pys_deadline_key, timer);
    if (errno != 0) {
        timer_delete(*timer);
        free(timer);
        return NULL;
    }
    return timer;
}

static long pys_elapsed_ns(const struct timespec *since) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000000000L + (now.tv_nsec - since->tv_nsec);
}

/* -EAGAIN once the write has waited timeout_ns (0 < timeout_ns < 1 s). */
static int pys_eventfd_write_within(int fd, uint64_t value, long timeout_ns) {
    static const struct itimerspec disarm;
    struct itimerspec every;
    struct timespec start;
    timer_t *timer;
    int result;

    pthread_once(&pys_deadline_once, pys_deadline_install);
    if (pys_deadline_errno) return -pys_deadline_errno;
    timer = pys_deadline_timer();
    if (timer == NULL) return -errno;
    every.it_value.tv_sec = every.it_interval.tv_sec = 0;
    every.it_value.tv_nsec = every.it_interval.tv_nsec = timeout_ns;
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (timer_settime(*timer, 0, &every, NULL) < 0) return -errno;
    for (;;) {
        ssize_t n = write(fd, &value, sizeof value);
        if (n == sizeof value) { result = 0; break; }
        if (n >= 0) { result = -EIO; break; }
        if (errno != EINTR) { result = -errno; break; }
        /* Interrupted: by our timer once the time is up, else by some other signal. */
        if (pys_elapsed_ns(&start) >= timeout_ns) { result = -EAGAIN; break; }
    }
    timer_settime(*timer, 0, &disarm, NULL);
    return result;
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
# librt: timer_create lives there before glibc 2.34 (an empty stub after).
ffibuilder.set_source("pyshrinker._native", SOURCE, libraries=["rt"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
