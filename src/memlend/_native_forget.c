/* FORGETs taken off /dev/fuse in C and handed to the daemon in batches
   (docs/native.md, "FORGET in batches").

   Included in _native.c before _native_read.c (one translation unit). FORGET and
   BATCH_FORGET have no reply and nobody waits for them, yet one arrives with every
   unlink, beside the next request (the parent's GETATTR). Served by a second Python
   worker, it fought that request's worker for the GIL: a few hand-overs of ~10 µs
   each, across the two CPUs, doubled an unlink's time. A worker waiting in
   next_request() or read_next() now queues (nodeid, nlookup) pairs here without
   the GIL and reads on; the first pair queued writes to an eventfd, and one daemon
   thread takes the whole queue at once a little later. */

#include <sys/eventfd.h>

#define FUSE_FORGET 2
#define FUSE_BATCH_FORGET 42

static pthread_mutex_t fg_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t *fg_items; /* nodeid, nlookup, nodeid, nlookup... */
static size_t fg_len, fg_cap; /* in pairs */
static int fg_fd = -1;        /* the /dev/fuse descriptor whose FORGETs are taken */
static int fg_efd = -1;       /* -1: not taken here (the Python loop serves them) */

static int fg_push(uint64_t nodeid, uint64_t nlookup, int *was_empty) {
    if (fg_len == fg_cap) {
        size_t cap = fg_cap ? 2 * fg_cap : 1024;
        uint64_t *p = realloc(fg_items, cap * 2 * sizeof *p);
        if (p == NULL) return -1;
        fg_items = p;
        fg_cap = cap;
    }
    *was_empty |= fg_len == 0;
    fg_items[2 * fg_len] = nodeid;
    fg_items[2 * fg_len + 1] = nlookup;
    fg_len++;
    return 0;
}

/* 1 if the request in buf (n bytes, read from fuse_fd) is a FORGET or BATCH_FORGET
   now queued, 0 if it is for Python (any other request, another mount's, taking
   forgets here is off, or no memory: Python serves it as before). Without the GIL. */
static int absorb_forget(int fuse_fd, const unsigned char *buf, ssize_t n) {
    if (n < FUSE_IN_HEADER + 8) return 0;
    uint32_t opcode;
    memcpy(&opcode, buf + 4, 4);
    if (opcode != FUSE_FORGET && opcode != FUSE_BATCH_FORGET) return 0;
    int ok = 0, was_empty = 0, efd;
    pthread_mutex_lock(&fg_lock);
    efd = fg_efd;
    if (efd < 0 || fuse_fd != fg_fd) {
        /* not taken here */
    } else if (opcode == FUSE_FORGET) {
        ok = fg_push(le64(buf + 16), le64(buf + FUSE_IN_HEADER), &was_empty) == 0;
    } else {
        uint32_t count;
        memcpy(&count, buf + FUSE_IN_HEADER, 4);
        if ((uint64_t)count * 16 <= (uint64_t)(n - FUSE_IN_HEADER - 8)) {
            const unsigned char *one = buf + FUSE_IN_HEADER + 8;
            size_t before = fg_len;
            ok = 1;
            for (uint32_t i = 0; i < count && ok; i++, one += 16)
                ok = fg_push(le64(one), le64(one + 8), &was_empty) == 0;
            if (!ok) fg_len = before; /* all of it to Python, none twice */
        }
    }
    if (ok && was_empty) { /* under the lock: forget_setup(-1) cannot close it meanwhile */
        uint64_t one = 1;
        ssize_t w;
        do w = write(efd, &one, sizeof one);
        while (w < 0 && errno == EINTR);
    }
    pthread_mutex_unlock(&fg_lock);
    return ok;
}

/* forget_setup(fuse_fd, eventfd) -> bool: take the FORGETs read from fuse_fd here
   from now on, and tell `eventfd` when the queue stops being empty. False if another
   mount of this process takes them already (one queue per process). eventfd -1
   stops it (what is queued stays for forgets_take). */
static PyObject *forget_setup(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "forget_setup(fuse_fd, eventfd)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]), efd = PyLong_AsLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    int ok = 1;
    pthread_mutex_lock(&fg_lock);
    if (efd < 0) {
        if (fd == fg_fd) fg_fd = fg_efd = -1;
    } else if (fg_efd >= 0 && fg_fd != fd) {
        ok = 0;
    } else {
        fg_fd = (int)fd;
        fg_efd = (int)efd;
    }
    pthread_mutex_unlock(&fg_lock);
    return PyBool_FromLong(ok);
}

/* forgets_take() -> bytes: the queued pairs, native-endian u64 nodeid and nlookup
   each; the queue is empty after. */
static PyObject *forgets_take(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&fg_lock);
    PyObject *out = PyBytes_FromStringAndSize((const char *)fg_items,
                                              (Py_ssize_t)(fg_len * 2 * sizeof(uint64_t)));
    if (out != NULL) fg_len = 0;
    if (fg_cap > 65536 && out != NULL) { /* a burst is over: give its memory back */
        free(fg_items);
        fg_items = NULL;
        fg_cap = 0;
    }
    pthread_mutex_unlock(&fg_lock);
    return out;
}

/* The next request from /dev/fuse into buf (len bytes), FORGETs queued on the way;
   without the GIL. Its size, or -1 once unmounted (ENODEV, or 0 bytes: /dev/fuse never
   gives 0, anything else that does is gone) or on another error, left in *err. EINTR,
   EAGAIN and ENOENT (a request interrupted before it was read) are read past, as the
   Python loop does. */
static ssize_t read_request(int fd, unsigned char *buf, size_t len, int *err) {
    for (;;) {
        ssize_t n = read(fd, buf, len);
        if (n > 0) {
            if (absorb_forget(fd, buf, n)) continue;
            return n;
        }
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == ENOENT)) continue;
        if (n < 0 && errno != ENODEV) *err = errno;
        return -1;
    }
}

/* next_request(fuse_fd, buf) -> n: read_request() for the Python loop when there is
   no lent-block path; -1 once unmounted, OSError for another error. */
static PyObject *next_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "next_request(fuse_fd, buf)");
        return NULL;
    }
    int fd = as_fd(args[0]);
    if (fd < 0) return NULL;
    Py_buffer bb;
    if (PyObject_GetBuffer(args[1], &bb, PyBUF_WRITABLE) < 0) return NULL;
    ssize_t n;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    n = read_request(fd, bb.buf, (size_t)bb.len, &err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bb);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(n);
}

/* close_fds(fds): close(2) each, the GIL released once for all (errors ignored: the
   descriptors are the caller's, known open). */
static PyObject *close_fds(PyObject *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "close_fds: a sequence of descriptors");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int *fds = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *fds);
    if (fds == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        fds[i] = as_fd(PySequence_Fast_GET_ITEM(seq, i));
        if (fds[i] < 0) {
            PyMem_Free(fds);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) close(fds[i]);
    Py_END_ALLOW_THREADS
    PyMem_Free(fds);
    Py_RETURN_NONE;
}
