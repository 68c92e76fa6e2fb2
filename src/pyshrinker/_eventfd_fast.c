/* pyshrinker._eventfd_fast: eventfd read and write that keep the GIL when they cannot wait.
 *
 * cffi (pyshrinker._native) and os.read/os.write release the GIL around every call. On a
 * non-blocking eventfd a read or write returns at once (or fails with EAGAIN), so the release
 * buys nothing; but while the GIL is released any CPU-bound thread of the application takes
 * it, and the caller then waits a whole switch interval (5 ms) to get it back. The direct
 * reclaim path (a report that makes the controller ask, served on the same thread) makes two
 * such calls, which put its p99 at 10-20 ms beside a busy thread. Here the call keeps the GIL
 * on a non-blocking fd, and releases it, as cffi does, on a blocking one, which may wait.
 *
 * Only pyshrinker._syscalls imports this module; it turns nothing into Python values beyond
 * an int, and errors into OSError (BlockingIOError for EAGAIN) with errno set.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>

/* 1 if fd is non-blocking, 0 if blocking, -1 with an OSError set. */
static int
is_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return (flags & O_NONBLOCK) != 0;
}

/* read(2) or write(2) of 8 bytes, retrying EINTR after running signal handlers. */
static int
transfer(int fd, uint64_t *value, int writing)
{
    int nonblocking = is_nonblocking(fd);
    if (nonblocking < 0) {
        return -1;
    }
    for (;;) {
        ssize_t n;
        int saved;
        if (nonblocking) {
            n = writing ? write(fd, value, sizeof *value) : read(fd, value, sizeof *value);
        }
        else {
            Py_BEGIN_ALLOW_THREADS
            n = writing ? write(fd, value, sizeof *value) : read(fd, value, sizeof *value);
            Py_END_ALLOW_THREADS
        }
        saved = errno;
        if (n == (ssize_t)sizeof *value) {
            return 0;
        }
        if (n >= 0) {
            /* An eventfd transfers 8 bytes or fails; anything else is not an eventfd. */
            errno = EINVAL;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (saved != EINTR) {
            errno = saved;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0) {
            return -1;
        }
    }
}

static int
fd_of(PyObject *arg, int *fd)
{
    int value = PyObject_AsFileDescriptor(arg);
    if (value < 0) {
        return -1;
    }
    *fd = value;
    return 0;
}

PyDoc_STRVAR(read_doc,
"read(fd) -> int\n\n"
"Read and reset an eventfd's counter. On a non-blocking fd the GIL is kept; a zero counter\n"
"raises BlockingIOError.");

static PyObject *
eventfd_fast_read(PyObject *module, PyObject *arg)
{
    int fd;
    uint64_t value = 0;
    (void)module;
    if (fd_of(arg, &fd) < 0 || transfer(fd, &value, 0) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong((unsigned long long)value);
}

PyDoc_STRVAR(write_doc,
"write(fd, value) -> None\n\n"
"Add value (1 .. 2**64-2) to an eventfd's counter. On a non-blocking fd the GIL is kept; a\n"
"counter that cannot take value raises BlockingIOError.");

static PyObject *
eventfd_fast_write(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    unsigned long long value;
    uint64_t raw;
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "write() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (fd_of(args[0], &fd) < 0) {
        return NULL;
    }
    if (!PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "value must be an int");
        return NULL;
    }
    value = PyLong_AsUnsignedLongLong(args[1]);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;  /* negative (OverflowError) or past 2**64 - 1 */
    }
    if (value == 0 || value == UINT64_MAX) {
        PyErr_SetString(PyExc_ValueError, "eventfd value must be in 1..2**64-2");
        return NULL;
    }
    raw = (uint64_t)value;
    if (transfer(fd, &raw, 1) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef eventfd_fast_methods[] = {
    {"read", (PyCFunction)eventfd_fast_read, METH_O, read_doc},
    {"write", (PyCFunction)(void (*)(void))eventfd_fast_write, METH_FASTCALL, write_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot eventfd_fast_slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef eventfd_fast_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pyshrinker._eventfd_fast",
    .m_doc = "eventfd read and write that keep the GIL on non-blocking fds (see _syscalls).",
    .m_size = 0,
    .m_methods = eventfd_fast_methods,
    .m_slots = eventfd_fast_slots,
};

PyMODINIT_FUNC
PyInit__eventfd_fast(void)
{
    return PyModuleDef_Init(&eventfd_fast_module);
}
