/* The mount's READ of one lent block, in C (docs/native.md, "The FUSE read path").

   Included at the end of _native.c (one translation unit: it shares the frame
   helpers and the client's wait). A FUSE worker calls read_next() instead of
   read(2): with the GIL released it reads the next request, and if it is a READ
   of one block of a file whose blocks were lent at its current version (the
   daemon keeps that per file in a slot, below), it asks the lender, opens the
   sealed block (AES-256-GCM, OpenSSL) into the reply and answers the kernel,
   all without Python. Anything else (another request, a miss, a time-out, a
   blob that does not open) goes back to Python with the request still in the
   buffer, which serves it as before, and is told what the lender said so it does
   not ask again. Python does the bookkeeping of a served hit after the reply
   has gone. */

#include <openssl/evp.h>
#include <pthread.h>
#include <unistd.h>

#define FUSE_READ 15
#define FUSE_IN_HEADER 40
#define FUSE_READ_IN 40
#define FUSE_OUT_HEADER 16
#define SEAL_FORMAT 1
#define SEAL_NONCE 12
#define SEAL_TAG 16
#define SEAL_OVERHEAD (1 + SEAL_NONCE + SEAL_TAG)
#define REMOTE_KEY_LEN 32 /* epoch (8) | file id | version | block, big-endian u64s */
#define SLOT_BITS 20      /* a file handle's low bits: its file's slot (0: none) */

enum { READ_PYTHON, READ_HIT, READ_MISS, READ_FAULT, READ_BAD_SEAL };

/* What a READ needs of its file, written by the daemon on every change. */
struct read_slot {
    uint64_t file_id, version;
    int lent; /* some blocks were lent at this version: the lender may hold them */
};

static pthread_mutex_t rd_lock = PTHREAD_MUTEX_INITIALIZER;
static struct read_slot *rd_slots;
static size_t rd_nslots;
static unsigned rd_shift;
static unsigned char rd_epoch[8];
static unsigned char rd_key[32], rd_prev[32];
static int rd_has_key, rd_has_prev;
static long rd_generation = -1; /* the lender's health generation while it is active */
static __thread EVP_CIPHER_CTX *rd_ctx;

/* _native_forget.c: the next request from /dev/fuse, FORGETs queued on the way. */
static ssize_t read_request(int fd, unsigned char *buf, size_t len, int *err);

static inline uint64_t le64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline void put64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (unsigned char)v;
}

/* read_setup(block_shift, epoch): the block size and this mount run's epoch. */
static PyObject *read_setup(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[1]) || PyBytes_GET_SIZE(args[1]) != 8) {
        PyErr_SetString(PyExc_TypeError, "read_setup(block_shift, epoch: 8 bytes)");
        return NULL;
    }
    long shift = PyLong_AsLong(args[0]);
    if (shift == -1 && PyErr_Occurred()) return NULL;
    if (shift < 9 || shift > 24) {
        PyErr_SetString(PyExc_ValueError, "block shift out of range");
        return NULL;
    }
    pthread_mutex_lock(&rd_lock);
    rd_shift = (unsigned)shift;
    memcpy(rd_epoch, PyBytes_AS_STRING(args[1]), 8);
    pthread_mutex_unlock(&rd_lock);
    Py_RETURN_NONE;
}

/* read_keys(current, previous or None): the sealing keys a blob may be opened with. */
static PyObject *read_keys(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[0]) || PyBytes_GET_SIZE(args[0]) != 32 ||
        (args[1] != Py_None && (!PyBytes_Check(args[1]) || PyBytes_GET_SIZE(args[1]) != 32))) {
        PyErr_SetString(PyExc_TypeError, "read_keys(current: 32 bytes, previous: 32 bytes | None)");
        return NULL;
    }
    pthread_mutex_lock(&rd_lock);
    memcpy(rd_key, PyBytes_AS_STRING(args[0]), 32);
    rd_has_key = 1;
    rd_has_prev = args[1] != Py_None;
    if (rd_has_prev) memcpy(rd_prev, PyBytes_AS_STRING(args[1]), 32);
    pthread_mutex_unlock(&rd_lock);
    Py_RETURN_NONE;
}

/* read_lender(generation): the lender is active in this health generation (-1: it is
   not; every READ goes to Python). A connection of another generation is not used. */
static PyObject *read_lender(PyObject *self, PyObject *arg) {
    long gen = PyLong_AsLong(arg);
    if (gen == -1 && PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&rd_lock);
    rd_generation = gen;
    pthread_mutex_unlock(&rd_lock);
    Py_RETURN_NONE;
}

/* read_slot(slot, file_id, version, lent): a file's state, as the daemon knows it. */
static PyObject *read_slot(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "read_slot(slot, file_id, version, lent)");
        return NULL;
    }
    Py_ssize_t slot = PyLong_AsSsize_t(args[0]);
    unsigned long long file_id = PyLong_AsUnsignedLongLong(args[1]);
    unsigned long long version = PyLong_AsUnsignedLongLong(args[2]);
    int lent = PyObject_IsTrue(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (slot < 1 || slot >= (1 << SLOT_BITS)) {
        PyErr_SetString(PyExc_ValueError, "slot out of range");
        return NULL;
    }
    pthread_mutex_lock(&rd_lock);
    if ((size_t)slot >= rd_nslots) {
        size_t n = rd_nslots ? rd_nslots : 1024;
        while (n <= (size_t)slot) n *= 2;
        struct read_slot *s = realloc(rd_slots, n * sizeof *s);
        if (s == NULL) {
            pthread_mutex_unlock(&rd_lock);
            return PyErr_NoMemory();
        }
        memset(s + rd_nslots, 0, (n - rd_nslots) * sizeof *s);
        rd_slots = s;
        rd_nslots = n;
    }
    rd_slots[slot] = (struct read_slot){file_id, version, lent};
    pthread_mutex_unlock(&rd_lock);
    Py_RETURN_NONE;
}

/* Opens blob (format | nonce | ciphertext | tag) sealed under `key` with the block's
   name as associated data into out; 1 if it verified. */
static int open_blob(const unsigned char *key, const unsigned char *name,
                     const unsigned char *blob, size_t n, unsigned char *out) {
    if (rd_ctx == NULL) {
        rd_ctx = EVP_CIPHER_CTX_new();
        if (rd_ctx == NULL || !EVP_DecryptInit_ex(rd_ctx, EVP_aes_256_gcm(), NULL, NULL, NULL)) {
            EVP_CIPHER_CTX_free(rd_ctx);
            rd_ctx = NULL;
            return 0;
        }
    }
    size_t ct = n - SEAL_OVERHEAD;
    int len = 0;
    return EVP_DecryptInit_ex(rd_ctx, NULL, NULL, key, blob + 1) &&
           EVP_DecryptUpdate(rd_ctx, NULL, &len, name, REMOTE_KEY_LEN) &&
           EVP_DecryptUpdate(rd_ctx, out, &len, blob + 1 + SEAL_NONCE, (int)ct) &&
           EVP_CIPHER_CTX_ctrl(rd_ctx, EVP_CTRL_GCM_SET_TAG, SEAL_TAG,
                               (void *)(blob + n - SEAL_TAG)) &&
           EVP_DecryptFinal_ex(rd_ctx, out + len, &len) > 0;
}

/* Answers request `unique` with data, or with -EIO if the kernel refuses that reply
   (not when it no longer waits: ENOENT, interrupted; ENODEV, unmounted). */
static void reply_data(int fd, uint64_t unique, const unsigned char *data, size_t n) {
    unsigned char h[FUSE_OUT_HEADER];
    uint32_t len = (uint32_t)(FUSE_OUT_HEADER + n);
    int32_t error = 0;
    memcpy(h, &len, 4);
    memcpy(h + 4, &error, 4);
    memcpy(h + 8, &unique, 8);
    struct iovec iov[2] = {{h, FUSE_OUT_HEADER}, {(void *)data, n}};
    if (writev(fd, iov, n ? 2 : 1) >= 0 || errno == ENOENT || errno == ENODEV) return;
    len = FUSE_OUT_HEADER;
    error = -EIO;
    memcpy(h, &len, 4);
    memcpy(h + 4, &error, 4);
    if (write(fd, h, FUSE_OUT_HEADER) < 0) { /* nothing more can be done */
    }
}

/* read_next(fuse_fd, buf, scratch, conn_fd, generation, request_id, spin, deadline,
             stale_at)
       -> (n, outcome, seconds, caught, late, status, file_id, version, block)

   The next request from /dev/fuse into `buf`, its READ of one lent block served from
   the lender over `conn_fd` (-1: none; not used after `stale_at`, on the monotonic
   clock, when the lender may have closed it for idleness) when it can be. n: the request's size, left in
   buf for Python (0 once served, -1 when unmounted). outcome: READ_PYTHON (not asked),
   READ_HIT (served), READ_MISS (the lender has no valid copy: do not ask again),
   READ_FAULT (`status`: an errno, or -TIMED_OUT, -CLOSED, -NOT_FAST for a reply that
   is not one whole answer to this request: the connection is done for), READ_BAD_SEAL (a blob that did not open). seconds: the
   lender's round trip; caught: the reply came while spinning; late: the wait ended
   more than CLIENT_LATE past its deadline. `scratch` (writable, at least twice a
   block plus 4 KiB) holds the lender's reply and the kernel's. */
static PyObject *read_next(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "read_next(fuse_fd, buf, scratch, conn_fd, generation, request_id, "
                        "spin, deadline, stale_at)");
        return NULL;
    }
    int fd = as_fd(args[0]);
    if (fd < 0) return NULL;
    long conn = PyLong_AsLong(args[3]);
    long gen = PyLong_AsLong(args[4]);
    unsigned long rid = PyLong_AsUnsignedLong(args[5]);
    double spin = PyFloat_AsDouble(args[6]);
    double wait = PyFloat_AsDouble(args[7]);
    double stale_at = PyFloat_AsDouble(args[8]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer bb, sb;
    if (PyObject_GetBuffer(args[1], &bb, PyBUF_WRITABLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[2], &sb, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&bb);
        return NULL;
    }
    unsigned char *buf = bb.buf, *scratch = sb.buf;
    ssize_t n = -1;
    int outcome = READ_PYTHON, status = 0, caught = 0, late = 0, err = 0;
    double seconds = 0;
    uint64_t file_id = 0, version = 0, block = 0;

    Py_BEGIN_ALLOW_THREADS
    n = read_request(fd, buf, (size_t)bb.len, &err);
    if (n >= FUSE_IN_HEADER + FUSE_READ_IN && conn >= 0 && le64(buf) >> 32 == FUSE_READ) do {
        uint64_t unique = le64(buf + 8), fh = le64(buf + FUSE_IN_HEADER);
        uint64_t offset = le64(buf + FUSE_IN_HEADER + 8);
        uint32_t size;
        memcpy(&size, buf + FUSE_IN_HEADER + 16, 4);
        size_t slot = (size_t)(fh & ((1u << SLOT_BITS) - 1));
        unsigned char key[32], prev[32], name[REMOTE_KEY_LEN];
        int has_prev, lent = 0;
        pthread_mutex_lock(&rd_lock);
        unsigned shift = rd_shift;
        if (slot && slot < rd_nslots && rd_has_key && gen == rd_generation && shift) {
            lent = rd_slots[slot].lent;
            file_id = rd_slots[slot].file_id;
            version = rd_slots[slot].version;
            memcpy(name, rd_epoch, 8);
            memcpy(key, rd_key, 32);
            memcpy(prev, rd_prev, 32);
        }
        has_prev = rd_has_prev;
        pthread_mutex_unlock(&rd_lock);
        size_t bs = (size_t)1 << (shift ? shift : 12);
        block = offset >> shift;
        if (!lent || size == 0 || (offset + size - 1) >> shift != block ||
            (size_t)sb.len < 2 * bs + 4096 || now_mono() > stale_at)
            break; /* Python: not a file with lent blocks, more than one block, an old
                      connection */
        put64(name + 8, file_id);
        put64(name + 16, version);
        put64(name + 24, block);

        /* The GET, as get_one() sends it. */
        unsigned char req[HEADER_SIZE + 3 + REMOTE_KEY_LEN];
        header(req, T_GET, (uint32_t)rid, 3 + REMOTE_KEY_LEN);
        put16(req + HEADER_SIZE, 1);
        req[HEADER_SIZE + 2] = REMOTE_KEY_LEN;
        memcpy(req + HEADER_SIZE + 3, name, REMOTE_KEY_LEN);
        double t0 = now_mono(), deadline = t0 + wait;
        unsigned char *got_buf = scratch, *plain = scratch + bs + 2048;
        size_t got = 0, cap = bs + 2048;
        ssize_t r;
        do r = send((int)conn, req, sizeof req, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (r < 0 && errno == EINTR);
        if (r != (ssize_t)sizeof req) { /* a fresh one-frame request fits any socket buffer */
            status = r < 0 ? errno : EAGAIN;
            outcome = READ_FAULT;
            break;
        }
        int w = recv_frame((int)conn, got_buf, cap, &got, deadline,
                           spin > 0 ? now_mono() + spin : 0, &caught);
        double t1 = now_mono();
        seconds = t1 - t0;
        late = t1 - deadline > CLIENT_LATE;
        outcome = READ_FAULT;
        if (w < 0) {
            status = errno;
            break;
        }
        if (w != NOT_FAST || !is_reply_to(got_buf, got, rid)) {
            status = -w; /* -NOT_FAST: an unexpected reply; -TIMED_OUT, -CLOSED */
            break;
        }
        size_t length = got - HEADER_SIZE;
        const unsigned char *pl = got_buf + HEADER_SIZE;
        if (length == 3 && pl[0] == 0 && pl[1] == 1 && pl[2] == 0) {
            outcome = READ_MISS;
            break;
        }
        if (!(length >= 7 && pl[0] == 0 && pl[1] == 1 && pl[2] == 1 && be32(pl + 3) == length - 7)) {
            status = -NOT_FAST;
            break;
        }
        const unsigned char *blob = pl + 7;
        size_t blen = length - 7;
        outcome = READ_BAD_SEAL;
        if (blen < SEAL_OVERHEAD || blob[0] != SEAL_FORMAT || blen - SEAL_OVERHEAD > bs) break;
        if (!open_blob(key, name, blob, blen, plain) &&
            !(has_prev && open_blob(prev, name, blob, blen, plain)))
            break;
        /* Served: the block's bytes the kernel asked for, up to its end (EOF). */
        size_t have = blen - SEAL_OVERHEAD, start = (size_t)(offset - (block << shift));
        size_t end = start + size < have ? start + size : have;
        reply_data(fd, unique, plain + start, end > start ? end - start : 0);
        outcome = READ_HIT;
        n = 0;
    } while (0);
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&sb);
    PyBuffer_Release(&bb);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(nidOOiKKK)", (Py_ssize_t)n, outcome, seconds,
                         caught ? Py_True : Py_False, late ? Py_True : Py_False, status,
                         (unsigned long long)file_id, (unsigned long long)version,
                         (unsigned long long)block);
}
