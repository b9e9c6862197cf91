/* memlend._native: the remote tier's measured hot path in C (docs/native.md).

   Only what the profile named: decoding GET / GET_REPLY / PUT payloads, the lender's
   whole answer to a chunk of GET frames (parse, look the keys up in the store's
   index, one sendmsg from the arena), its receiving of a PUT frame into one reused
   buffer, and the client's one-block round trip (send, wait without the GIL, check
   the reply). Everything else stays in Python
   (memlend.remote.protocol is the definition; this file follows it byte for byte,
   and tests/test_native.py fuzzes the two against each other), and the mount's READ
   of one lent block (_native_read.c).

   Nothing here may crash the daemon on bad input: every length is checked
   against the buffer before it is read, and anything unexpected is either a
   ProtocolError (the same message the Python decoder gives) or "not the fast
   case" (the caller hands the same bytes to the Python decoder, which judges). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#define HEADER_SIZE 14
#define VERSION 1
#define T_GET 0x10
#define T_GET_REPLY 0x11
#define MAX_PAYLOAD (4u << 20)
#define MAX_KEYS 256
#define MAX_KEY_LEN 64
#define MAX_IOV 1024

static PyObject *ProtocolError; /* memlend.remote.protocol.ProtocolError, set by init() */

static inline uint32_t be16(const unsigned char *p) { return (uint32_t)p[0] << 8 | p[1]; }
static inline uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void put16(unsigned char *p, uint32_t v) { p[0] = v >> 8; p[1] = v; }
static inline void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

/* A file descriptor argument (PyLong_AsInt is 3.13+). */
static int as_fd(PyObject *o) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || v > INT_MAX) { /* a closed socket's fileno() is -1: as recv() says */
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return (int)v;
}

static PyObject *protocol_error(const char *msg) {
    PyErr_SetString(ProtocolError ? ProtocolError : PyExc_ValueError, msg);
    return NULL;
}

/* A frame header that is exactly: magic, version, `type`, no flags, a length that
   fits the frame limit. */
static inline int header_is(const unsigned char *h, int type) {
    return h[0] == 'M' && h[1] == 'L' && h[2] == VERSION && h[3] == type && h[4] == 0 &&
           h[5] == 0 && be32(h + 10) <= MAX_PAYLOAD;
}

static void header(unsigned char *h, int type, uint32_t rid, uint32_t length) {
    h[0] = 'M'; h[1] = 'L'; h[2] = VERSION; h[3] = type; h[4] = 0; h[5] = 0;
    put32(h + 6, rid);
    put32(h + 10, length);
}

/* ---- decoding: the same rules and messages as protocol._decode_keys/_values ---- */

/* Checks a GET payload; returns its key count, or -1 with `why` set. */
static long check_keys(const unsigned char *p, size_t size, char *why, size_t whylen) {
    if (size < 2) {
        snprintf(why, whylen, "truncated message");
        return -1;
    }
    uint32_t n = be16(p);
    if (n > MAX_KEYS) {
        snprintf(why, whylen, "%u keys in one message (at most %d)", n, MAX_KEYS);
        return -1;
    }
    size_t pos = 2;
    for (uint32_t i = 0; i < n; i++) {
        if (pos >= size) {
            snprintf(why, whylen, "truncated message");
            return -1;
        }
        uint32_t klen = p[pos];
        if (klen < 1 || klen > MAX_KEY_LEN) {
            snprintf(why, whylen, "key length %u outside 1..%d", klen, MAX_KEY_LEN);
            return -1;
        }
        pos += 1 + klen;
        if (pos > size) {
            snprintf(why, whylen, "truncated message");
            return -1;
        }
    }
    if (pos != size) {
        snprintf(why, whylen, "trailing bytes after message");
        return -1;
    }
    return (long)n;
}

/* The keys of a payload that check_keys() accepted. */
static PyObject *keys_list(const unsigned char *p, uint32_t n) {
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    size_t pos = 2;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t klen = p[pos];
        PyObject *k = PyBytes_FromStringAndSize((const char *)p + pos + 1, klen);
        if (k == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, k);
        pos += 1 + klen;
    }
    return out;
}

static PyObject *decode_keys(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    char why[96];
    long n = check_keys(b.buf, (size_t)b.len, why, sizeof why);
    PyObject *out = n < 0 ? protocol_error(why) : keys_list(b.buf, (uint32_t)n);
    PyBuffer_Release(&b);
    return out;
}

static PyObject *decode_values(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *p = b.buf;
    size_t size = (size_t)b.len, pos = 2;
    char why[96];
    PyObject *out = NULL;
    if (size < 2) {
        protocol_error("truncated message");
        goto done;
    }
    uint32_t n = be16(p);
    if (n > MAX_KEYS) {
        snprintf(why, sizeof why, "%u keys in one message (at most %d)", n, MAX_KEYS);
        protocol_error(why);
        goto done;
    }
    out = PyList_New(n);
    if (out == NULL) goto done;
    for (uint32_t i = 0; i < n; i++) {
        if (pos >= size) goto truncated;
        unsigned found = p[pos];
        PyObject *v;
        if (found == 0) {
            v = Py_NewRef(Py_None);
            pos += 1;
        } else if (found == 1) {
            if (size - pos < 5) goto truncated;
            size_t vlen = be32(p + pos + 1);
            pos += 5;
            if (vlen > size - pos) goto truncated;
            v = PyBytes_FromStringAndSize((const char *)p + pos, (Py_ssize_t)vlen);
            if (v == NULL) goto fail;
            pos += vlen;
        } else {
            snprintf(why, sizeof why, "bad found flag %u", found);
            protocol_error(why);
            goto fail;
        }
        PyList_SET_ITEM(out, i, v);
    }
    if (pos != size) {
        protocol_error("trailing bytes after message");
        goto fail;
    }
    goto done;
truncated:
    protocol_error("truncated message");
fail:
    Py_CLEAR(out);
done:
    PyBuffer_Release(&b);
    return out;
}

/* The items of a PUT payload p[0..size) as [(key, value)], each value a slice of
   `src`, the object p points into at offset `base` (no copy when it is a memoryview);
   NULL with a ProtocolError carrying protocol._decode_put's message for anything
   malformed. */
static PyObject *put_items(PyObject *src, size_t base, const unsigned char *p, size_t size) {
    char why[96];
    if (size < 2) return protocol_error("truncated message");
    uint32_t n = be16(p);
    if (n > MAX_KEYS) {
        snprintf(why, sizeof why, "%u keys in one message (at most %d)", n, MAX_KEYS);
        return protocol_error(why);
    }
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    size_t pos = 2;
    for (uint32_t i = 0; i < n; i++) {
        if (pos >= size) goto truncated;
        uint32_t klen = p[pos];
        if (klen < 1 || klen > MAX_KEY_LEN) {
            snprintf(why, sizeof why, "key length %u outside 1..%d", klen, MAX_KEY_LEN);
            protocol_error(why);
            goto fail;
        }
        /* the key and the value's length (one message for either cut short) */
        if (size - pos < 1 + (size_t)klen + 4) goto truncated;
        size_t vlen = be32(p + pos + 1 + klen);
        size_t at = pos + 1 + klen + 4;
        if (vlen > size - at) goto truncated;
        PyObject *key = PyBytes_FromStringAndSize((const char *)p + pos + 1, klen);
        PyObject *value = key == NULL ? NULL
                                      : PySequence_GetSlice(src, (Py_ssize_t)(base + at),
                                                            (Py_ssize_t)(base + at + vlen));
        PyObject *item = value == NULL ? NULL : PyTuple_Pack(2, key, value);
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (item == NULL) goto fail;
        PyList_SET_ITEM(out, i, item);
        pos = at + vlen;
    }
    if (pos != size) {
        protocol_error("trailing bytes after message");
        goto fail;
    }
    return out;
truncated:
    protocol_error("truncated message");
fail:
    Py_DECREF(out);
    return NULL;
}

/* decode_put(payload) -> [(key, value)]: protocol._decode_put; the values are slices
   of `payload` (views when it is a memoryview). */
static PyObject *decode_put(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *out = put_items(arg, 0, b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return out;
}

/* Is d[0..n) only whole, valid GET frames (protocol.parse_gets's rule)? Counts the
   frames and their keys; the one place that rule is written here. */
static int whole_gets(const unsigned char *d, size_t n, size_t *frames, size_t *nkeys) {
    char why[96];
    size_t pos = 0;
    *frames = *nkeys = 0;
    while (pos < n) {
        if (n - pos < HEADER_SIZE || !header_is(d + pos, T_GET)) return 0;
        size_t length = be32(d + pos + 10);
        if (length > n - pos - HEADER_SIZE) return 0;
        long k = check_keys(d + pos + HEADER_SIZE, length, why, sizeof why);
        if (k < 0) return 0;
        (*frames)++;
        *nkeys += (size_t)k;
        pos += HEADER_SIZE + length;
    }
    return 1;
}

/* parse_gets(data) -> [(request id, [keys])] | None: protocol.parse_gets. */
static PyObject *parse_gets(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *d = b.buf;
    size_t n = (size_t)b.len, pos = 0, frames, nkeys;
    PyObject *out = NULL;
    if (!whole_gets(d, n, &frames, &nkeys)) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    out = PyList_New(0);
    if (out == NULL) goto done;
    while (pos < n) { /* checked above: every frame is whole and valid */
        size_t length = be32(d + pos + 10);
        const unsigned char *payload = d + pos + HEADER_SIZE;
        PyObject *keys = keys_list(payload, be16(payload));
        if (keys == NULL) goto fail;
        PyObject *item = Py_BuildValue("(kN)", (unsigned long)be32(d + pos + 6), keys);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
        pos += HEADER_SIZE + length;
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    PyBuffer_Release(&b);
    return out;
}

/* encode_get(keys, request id) -> bytes: a GET frame (ValueError for bad keys). */
static PyObject *encode_get(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_get(keys, request_id)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "keys must be a sequence");
    if (seq == NULL) return NULL;
    unsigned long rid = PyLong_AsUnsignedLong(args[1]);
    PyObject *out = NULL;
    if (rid == (unsigned long)-1 && PyErr_Occurred()) goto done;
    if (rid > 0xFFFFFFFFul) {
        PyErr_Format(PyExc_ValueError, "request id %lu out of range", rid);
        goto done;
    }
    Py_ssize_t nkeys = PySequence_Fast_GET_SIZE(seq);
    if (nkeys > MAX_KEYS) {
        PyErr_Format(PyExc_ValueError, "%zd keys in one message (at most %d)", nkeys, MAX_KEYS);
        goto done;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    size_t length = 2;
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        if (!PyBytes_Check(items[i])) {
            PyErr_SetString(PyExc_TypeError, "keys must be bytes");
            goto done;
        }
        Py_ssize_t klen = PyBytes_GET_SIZE(items[i]);
        if (klen < 1 || klen > MAX_KEY_LEN) {
            PyErr_Format(PyExc_ValueError, "key length %zd outside 1..%d", klen, MAX_KEY_LEN);
            goto done;
        }
        length += 1 + (size_t)klen;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(HEADER_SIZE + length));
    if (out == NULL) goto done;
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out);
    header(w, T_GET, (uint32_t)rid, (uint32_t)length);
    put16(w + HEADER_SIZE, (uint32_t)nkeys);
    w += HEADER_SIZE + 2;
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        Py_ssize_t klen = PyBytes_GET_SIZE(items[i]);
        *w++ = (unsigned char)klen;
        memcpy(w, PyBytes_AS_STRING(items[i]), (size_t)klen);
        w += klen;
    }
done:
    Py_DECREF(seq);
    return out;
}

/* ---- the lender: serve_gets ------------------------------------------------------ */

/* Sends iov[0..n) with as few sendmsg calls as IOV_MAX allows. Returns the bytes
   sent (stops early when the socket is full), or -1 with errno set. */
static ssize_t send_iov(int fd, struct iovec *iov, size_t n) {
    size_t sent = 0, i = 0;
    while (i < n) {
        size_t chunk = n - i < MAX_IOV ? n - i : MAX_IOV;
        struct msghdr msg = {.msg_iov = iov + i, .msg_iovlen = chunk};
        ssize_t r = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return (ssize_t)sent;
            return -1;
        }
        sent += (size_t)r;
        size_t want = 0;
        for (size_t j = i; j < i + chunk; j++) want += iov[j].iov_len;
        if ((size_t)r < want) return (ssize_t)sent;
        i += chunk;
    }
    return (ssize_t)sent;
}

/* The bytes of iov[..] from offset `skip` on, as one bytes object. */
static PyObject *join_iov(const struct iovec *iov, size_t n, size_t skip) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += iov[i].iov_len;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(total - skip));
    if (out == NULL) return NULL;
    char *w = PyBytes_AS_STRING(out);
    for (size_t i = 0; i < n; i++) {
        size_t len = iov[i].iov_len;
        const char *src = iov[i].iov_base;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        memcpy(w, src + skip, len - skip);
        w += len - skip;
        skip = 0;
    }
    return out;
}

/* Checks serve_gets' common arguments; 0 on success, -1 with an exception set. */
static int serve_args(PyObject *const *args, int *do_send, int *fd, Py_ssize_t *slot_size) {
    *do_send = PyObject_IsTrue(args[4]);
    if (*do_send < 0) return -1;
    *fd = *do_send ? as_fd(args[0]) : -1; /* not sending: no socket needed */
    if (*do_send && *fd < 0) return -1;
    if (!PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "entries must be a dict");
        return -1;
    }
    *slot_size = PyLong_AsSsize_t(args[3]);
    if (*slot_size <= 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "slot_size must be positive");
        return -1;
    }
    return 0;
}

/* serve_gets(fd, data, entries, arena, slot_size, send) -> (rest, hits, nkeys) | None

   `data`: bytes received on a ready connection with nothing buffered. If it holds
   only whole, valid GET frames (protocol.parse_gets's rule), answers every one:
   each key is looked up in `entries` (the namespace's index, key -> (slot, length,
   tail)), and the GET_REPLY frames are sent with sendmsg straight from `arena` (the
   slot) and the tail; a value that would overflow the frame is reported missing,
   as LenderServer._reply_get does. With send false (the connection has output
   queued) nothing is sent. Returns the bytes not sent (b"" if all were), the keys
   found (for the policy and the counters) and the number of keys asked; None when
   `data` is not that case (the caller feeds it to receive_data). OSError when the
   socket fails. */
static PyObject *serve_chunk(int fd, const unsigned char *d, size_t n, PyObject *entries,
                             const Py_buffer *ab, Py_ssize_t slot_size, int do_send) {
    PyObject *result = NULL, *hits = NULL;
    unsigned char *scratch = NULL;
    struct iovec *iov = NULL;

    /* Pass 1: validate everything first. A malformed frame after good ones must
       not have those answered twice (receive_data answers them, then fails). */
    size_t pos = 0, frames, nkeys;
    if (!whole_gets(d, n, &frames, &nkeys) || frames == 0) goto not_fast;

    /* Pass 2: build every reply as iovecs over a scratch area (16 bytes of header
       and count per frame, 5 bytes of flag and length per key). */
    scratch = PyMem_Malloc(16 * frames + 5 * nkeys);
    iov = PyMem_Malloc(sizeof(struct iovec) * (2 * frames + 3 * nkeys));
    hits = PyList_New(0);
    if (scratch == NULL || iov == NULL || hits == NULL) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto fail;
    }
    unsigned char *s = scratch;
    size_t niov = 0;
    const char *arena = ab->buf;
    size_t arena_len = (size_t)ab->len;
    pos = 0;
    while (pos < n) {
        size_t length = be32(d + pos + 10);
        uint32_t rid = be32(d + pos + 6);
        const unsigned char *p = d + pos + HEADER_SIZE;
        uint32_t k = be16(p);
        unsigned char *head = s;
        s += 16;
        size_t head_iov = niov;
        iov[niov++] = (struct iovec){head, 16};
        size_t reply_len = 2, room = MAX_PAYLOAD - 2;
        size_t kp = 2;
        for (uint32_t i = 0; i < k; i++) {
            uint32_t klen = p[kp];
            PyObject *key = PyBytes_FromStringAndSize((const char *)p + kp + 1, klen);
            kp += 1 + klen;
            if (key == NULL) goto fail;
            PyObject *e = PyDict_GetItemWithError(entries, key); /* borrowed */
            if (e == NULL && PyErr_Occurred()) {
                Py_DECREF(key);
                goto fail;
            }
            const char *body = NULL, *tail = NULL;
            size_t body_len = 0, tail_len = 0;
            int found = 0;
            if (e != NULL) {
                if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 3 ||
                    !PyBytes_Check(PyTuple_GET_ITEM(e, 2))) {
                    Py_DECREF(key);
                    PyErr_SetString(PyExc_TypeError, "index entry is not (slot, length, tail)");
                    goto fail;
                }
                Py_ssize_t slot = PyLong_AsSsize_t(PyTuple_GET_ITEM(e, 0));
                Py_ssize_t vlen = PyLong_AsSsize_t(PyTuple_GET_ITEM(e, 1));
                if (PyErr_Occurred()) {
                    Py_DECREF(key);
                    goto fail;
                }
                PyObject *t = PyTuple_GET_ITEM(e, 2);
                /* A slot being filled (-1) or one outside the arena is a miss. */
                if (slot >= 0 && vlen >= 0) {
                    body_len = (size_t)(vlen < slot_size ? vlen : slot_size);
                    size_t start = (size_t)slot * (size_t)slot_size;
                    if (start <= arena_len && body_len <= arena_len - start) {
                        body = arena + start;
                        tail = PyBytes_AS_STRING(t);
                        tail_len = (size_t)PyBytes_GET_SIZE(t);
                        found = body_len + tail_len + 5 <= room;
                    }
                }
            }
            if (found) {
                room -= body_len + tail_len + 5;
                reply_len += body_len + tail_len + 5;
                s[0] = 1;
                put32(s + 1, (uint32_t)(body_len + tail_len));
                iov[niov++] = (struct iovec){s, 5};
                s += 5;
                if (body_len) iov[niov++] = (struct iovec){(void *)body, body_len};
                if (tail_len) iov[niov++] = (struct iovec){(void *)tail, tail_len};
                int r = PyList_Append(hits, key);
                Py_DECREF(key);
                if (r < 0) goto fail;
            } else {
                Py_DECREF(key);
                room -= 1;
                reply_len += 1;
                s[0] = 0;
                iov[niov++] = (struct iovec){s, 1};
                s += 5;
            }
        }
        header(head, T_GET_REPLY, rid, (uint32_t)reply_len);
        put16(head + HEADER_SIZE, k);
        iov[head_iov].iov_len = HEADER_SIZE + 2;
        pos += HEADER_SIZE + length;
    }

    ssize_t sent = 0;
    if (do_send) {
        sent = send_iov(fd, iov, niov);
        if (sent < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
    }
    size_t total = 0;
    for (size_t i = 0; i < niov; i++) total += iov[i].iov_len;
    PyObject *rest = (size_t)sent == total ? PyBytes_FromStringAndSize(NULL, 0)
                                           : join_iov(iov, niov, (size_t)sent);
    if (rest == NULL) goto fail;
    result = Py_BuildValue("(NOn)", rest, hits, (Py_ssize_t)nkeys);
    goto fail; /* the common cleanup; result is kept */
not_fast:
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(hits);
    PyMem_Free(scratch);
    PyMem_Free(iov);
    return result;
}

static PyObject *serve_gets(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "serve_gets(fd, data, entries, arena, slot_size, send)");
        return NULL;
    }
    PyObject *rest[5] = {args[0], args[2], args[3], args[4], args[5]};
    int do_send, fd;
    Py_ssize_t slot_size;
    if (serve_args(rest, &do_send, &fd, &slot_size) < 0) return NULL;
    Py_buffer db, ab;
    if (PyObject_GetBuffer(args[1], &db, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[3], &ab, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&db);
        return NULL;
    }
    PyObject *out = serve_chunk(fd, db.buf, (size_t)db.len, args[2], &ab, slot_size, do_send);
    PyBuffer_Release(&ab);
    PyBuffer_Release(&db);
    return out;
}

#define RECV_SIZE (64 << 10) /* as LenderServer's RECV_SIZE */
static unsigned char recv_buf[RECV_SIZE]; /* used with the GIL held only */

/* recv_serve(fd, entries, arena, slot_size, send) -> (data, served)

   LenderServer._read's whole hot path: one recv() into a static buffer (no bytes
   object for the common case), then serve_gets on what came. (None, (rest, hits,
   asked)) when it served; (bytes received, None) when they are not whole GET frames
   (the caller decodes them); (b"", None) at end of file; (None, None) when nothing
   was there. OSError when the socket fails. */
static PyObject *recv_serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "recv_serve(fd, entries, arena, slot_size, send)");
        return NULL;
    }
    int do_send, fd;
    Py_ssize_t slot_size;
    if (serve_args(args, &do_send, &fd, &slot_size) < 0) return NULL;
    fd = as_fd(args[0]);
    if (fd < 0) return NULL;
    ssize_t r;
    do {
        r = recv(fd, recv_buf, RECV_SIZE, MSG_DONTWAIT);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return Py_BuildValue("(OO)", Py_None, Py_None);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (r == 0) return Py_BuildValue("(yO)", "", Py_None);
    Py_buffer ab;
    if (PyObject_GetBuffer(args[2], &ab, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *served = serve_chunk(fd, recv_buf, (size_t)r, args[1], &ab, slot_size, do_send);
    PyBuffer_Release(&ab);
    if (served == NULL) return NULL;
    if (served != Py_None) return Py_BuildValue("(ON)", Py_None, served);
    Py_DECREF(served);
    return Py_BuildValue("(y#O)", (const char *)recv_buf, (Py_ssize_t)r, Py_None);
}

/* recv_put(sock, buf, got, size) -> (got, items | None)

   lender.server.py_recv_put in C: the receiving of one big PUT frame
   (LenderServer._read_put) on the socket `sock` (anything with a fileno()): buf[0..got)
   holds the frame's first bytes, header included, and the frame is `size` bytes. One
   recv() straight into buf[got..size) -- never past the frame, so whatever follows
   it stays in the socket for the general path -- and, once the frame is whole, its
   items as decode_put gives them, the values views of `buf` (valid until buf is
   written again). `got` is -1 at end of file. OSError when the socket fails,
   ProtocolError for a malformed payload. */
static PyObject *recv_put(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "recv_put(sock, buf, got, size)");
        return NULL;
    }
    PyObject *fileno = PyObject_CallMethod(args[0], "fileno", NULL);
    if (fileno == NULL) return NULL;
    int fd = as_fd(fileno);
    Py_DECREF(fileno);
    if (fd < 0) return NULL;
    Py_ssize_t got = PyLong_AsSsize_t(args[2]), size = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer bb;
    if (PyObject_GetBuffer(args[1], &bb, PyBUF_WRITABLE) < 0) return NULL;
    PyObject *out = NULL, *view = NULL;
    if (size < HEADER_SIZE || size > bb.len || got < 0 || got > size) {
        PyErr_SetString(PyExc_ValueError, "recv_put needs 0 <= got <= size <= len(buf)");
        goto done;
    }
    unsigned char *buf = bb.buf;
    if (got < size) {
        ssize_t r;
        do {
            r = recv(fd, buf + got, (size_t)(size - got), MSG_DONTWAIT);
        } while (r < 0 && errno == EINTR);
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        if (r == 0) {
            out = Py_BuildValue("(nO)", (Py_ssize_t)-1, Py_None);
            goto done;
        }
        if (r > 0) got += r;
    }
    if (got < size) {
        out = Py_BuildValue("(nO)", got, Py_None);
        goto done;
    }
    view = PyMemoryView_FromObject(args[1]);
    PyObject *items = view == NULL ? NULL
                                   : put_items(view, HEADER_SIZE, buf + HEADER_SIZE,
                                               (size_t)(size - HEADER_SIZE));
    if (items != NULL) out = Py_BuildValue("(nN)", got, items);
done:
    Py_XDECREF(view);
    PyBuffer_Release(&bb);
    return out;
}

/* ---- the client: get_one ----------------------------------------------------------- */

static inline double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Waits until `fd` is ready for `events` or `deadline` passes; 1 ready, 0 timed out,
   -1 error (errno). */
static int wait_fd(int fd, short events, double deadline) {
    for (;;) {
        double left = deadline - now_mono();
        if (left <= 0) return 0;
        struct pollfd pfd = {.fd = fd, .events = events};
        struct timespec ts = {.tv_sec = (time_t)left,
                              .tv_nsec = (long)((left - (double)(time_t)left) * 1e9)};
        int r = ppoll(&pfd, 1, &ts, NULL);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return -1;
    }
}

enum { GOT_VALUE, GOT_NONE, NOT_FAST, TIMED_OUT, CLOSED };
#define CLIENT_LATE 0.001 /* seconds past the deadline that only a descheduling explains */

/* Receives one GET_REPLY frame into buf[0..cap) (GIL released by the caller): spins
   until `spin_until` (0: not at all; a sched_yield between looks), then sleeps until
   `deadline`, and looks once more after it (a reply that came while this thread was
   not running is not a time-out). Returns NOT_FAST when the frame the header
   announces is whole or when what came cannot be the fast case (another type, bigger
   than buf): the caller judges buf[0..*gotp). Else TIMED_OUT, CLOSED, or -1 (errno). */
static int recv_frame(int fd, unsigned char *buf, size_t cap, size_t *gotp, double deadline,
                      double spin_until, int *caught) {
    size_t got = 0;
    int last = 0; /* the deadline has passed: one last look, then give up */
    for (;;) {
        ssize_t r = recv(fd, buf + got, cap - got, MSG_DONTWAIT);
        if (r > 0) {
            if (got == 0 && spin_until && now_mono() < spin_until) *caught = 1;
            got += (size_t)r;
            *gotp = got;
            if (got >= HEADER_SIZE) {
                size_t length = be32(buf + 10);
                if (length > cap - HEADER_SIZE || got >= HEADER_SIZE + length ||
                    !header_is(buf, T_GET_REPLY))
                    return NOT_FAST;
            }
            if (got == cap) return NOT_FAST;
            continue;
        }
        if (r == 0) return CLOSED;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
        if (last) return TIMED_OUT;
        double now = now_mono();
        if (spin_until && now < spin_until) {
            sched_yield();
            continue;
        }
        spin_until = 0;
        if (now >= deadline || wait_fd(fd, POLLIN, deadline) == 0) last = 1;
    }
}

/* Is buf[0..got) exactly one whole GET_REPLY frame answering request `rid`? */
static int is_reply_to(const unsigned char *buf, size_t got, unsigned long rid) {
    return got >= HEADER_SIZE && got == HEADER_SIZE + be32(buf + 10) &&
           header_is(buf, T_GET_REPLY) && be32(buf + 6) == rid;
}

/* The result of a client wait that did not end in the fast case: OSError for a socket
   error, else (status, the bytes received, caught, late); a time-out with part of a
   reply in is NOT_FAST (Python reads on). */
static PyObject *wait_result(int err, int status, const unsigned char *buf, size_t got,
                             int caught, int late) {
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (status == TIMED_OUT && got) status = NOT_FAST;
    PyObject *data = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)got);
    if (data == NULL) return NULL;
    return Py_BuildValue("(iNOO)", status, data, caught ? Py_True : Py_False,
                         late ? Py_True : Py_False);
}

/* get_one(fd, request id, key, buf, deadline, spin_seconds, budget)
       -> (status, value or received bytes, caught while spinning, late)

   The remote tier's one-block call: sends a one-key GET, waits for the reply
   without holding the GIL (other FUSE workers run meanwhile), spinning first for
   `spin_seconds` (a sched_yield between looks, so an application thread that needs
   this CPU gets it), then sleeping until `deadline` (time.monotonic() clock), or
   until `budget` seconds after the request was sent if that is later: time this
   client spent descheduled before sending is not the lender's. `buf` (a bytearray,
   or a memoryview of one) receives the reply. Status: GOT_VALUE (the sealed blob: a
   new bytes object, or a slice of `buf` if `buf` is a memoryview, valid until the
   next call with it),
   GOT_NONE (not there), NOT_FAST (anything else: the bytes received, for the Python
   decoder, which may need to read on), TIMED_OUT, CLOSED (peer closed). After the
   deadline the socket is read once more: a reply that came while this thread was not
   running is a hit, not a time-out. `late`: the call ended more than CLIENT_LATE
   past its deadline, which only a descheduled thread explains (for the stats). */
static PyObject *get_one(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "get_one(fd, request_id, key, buf, deadline, spin, budget)");
        return NULL;
    }
    int fd = as_fd(args[0]);
    if (fd < 0) return NULL;
    unsigned long rid = PyLong_AsUnsignedLong(args[1]);
    double deadline = PyFloat_AsDouble(args[4]);
    double spin = PyFloat_AsDouble(args[5]);
    double budget = PyFloat_AsDouble(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (!PyBytes_Check(args[2]) || PyBytes_GET_SIZE(args[2]) < 1 ||
        PyBytes_GET_SIZE(args[2]) > MAX_KEY_LEN || rid > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_ValueError, "bad key or request id");
        return NULL;
    }
    size_t klen = (size_t)PyBytes_GET_SIZE(args[2]);
    unsigned char req[HEADER_SIZE + 3 + MAX_KEY_LEN];
    header(req, T_GET, (uint32_t)rid, (uint32_t)(3 + klen));
    put16(req + HEADER_SIZE, 1);
    req[HEADER_SIZE + 2] = (unsigned char)klen;
    memcpy(req + HEADER_SIZE + 3, PyBytes_AS_STRING(args[2]), klen);
    size_t req_len = HEADER_SIZE + 3 + klen;

    Py_buffer bb;
    if (PyObject_GetBuffer(args[3], &bb, PyBUF_WRITABLE) < 0) return NULL;
    unsigned char *buf = bb.buf;
    size_t cap = (size_t)bb.len, got = 0, sent = 0;
    int status = TIMED_OUT, caught = 0, err = 0, late = 0;

    Py_BEGIN_ALLOW_THREADS
    while (sent < req_len) {
        ssize_t r = send(fd, req + sent, req_len - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r > 0) {
            sent += (size_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int w = wait_fd(fd, POLLOUT, deadline);
            if (w <= 0) {
                err = w < 0 ? errno : 0;
                break;
            }
        } else {
            err = errno;
            break;
        }
    }
    if (sent == req_len) {
        double sent_at = now_mono();
        if (budget > 0 && sent_at + budget > deadline) deadline = sent_at + budget;
        int r = recv_frame(fd, buf, cap, &got, deadline, spin > 0 ? sent_at + spin : 0, &caught);
        if (r < 0)
            err = errno;
        else
            status = r;
    }
    late = now_mono() - deadline > CLIENT_LATE;
    Py_END_ALLOW_THREADS

    PyObject *out = NULL;
    PyObject *lt = late ? Py_True : Py_False;
    if (!err && status == NOT_FAST && is_reply_to(buf, got, rid)) {
        size_t length = got - HEADER_SIZE;
        const unsigned char *pl = buf + HEADER_SIZE;
        if (length >= 7 && pl[0] == 0 && pl[1] == 1 && pl[2] == 1 && be32(pl + 3) == length - 7) {
            Py_ssize_t at = HEADER_SIZE + 7, end = (Py_ssize_t)got;
            PyObject *v = PyMemoryView_Check(args[3])
                              ? PySequence_GetSlice(args[3], at, end) /* a view: no copy */
                              : PyBytes_FromStringAndSize((const char *)pl + 7, end - at);
            if (v != NULL)
                out = Py_BuildValue("(iNOO)", GOT_VALUE, v, caught ? Py_True : Py_False, lt);
            goto done;
        }
        if (length == 3 && pl[0] == 0 && pl[1] == 1 && pl[2] == 0) {
            out = Py_BuildValue("(iOOO)", GOT_NONE, Py_None, caught ? Py_True : Py_False, lt);
            goto done;
        }
    }
    out = wait_result(err, status, buf, got, caught, late);
done:
    PyBuffer_Release(&bb);
    return out;
}

/* The values of the one whole GET_REPLY in buf[0..got) answering request `rid` with
   `n` values, as slices of `view` (None where absent); NULL without an exception if
   it is anything else (the caller hands the bytes to the Python decoder). */
static PyObject *values_in(PyObject *view, const unsigned char *buf, size_t got,
                           unsigned long rid, uint32_t n) {
    if (!is_reply_to(buf, got, rid)) return NULL;
    size_t pos = HEADER_SIZE + 2;
    if (got < pos || be16(buf + HEADER_SIZE) != n) return NULL;
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (uint32_t i = 0; i < n; i++) {
        PyObject *v;
        if (pos < got && buf[pos] == 0) {
            v = Py_NewRef(Py_None);
            pos += 1;
        } else if (pos < got && buf[pos] == 1 && got - pos >= 5 &&
                   be32(buf + pos + 1) <= got - pos - 5) {
            size_t vlen = be32(buf + pos + 1);
            pos += 5;
            v = PySequence_GetSlice(view, (Py_ssize_t)pos, (Py_ssize_t)(pos + vlen));
            if (v == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            pos += vlen;
        } else {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    if (pos != got) Py_CLEAR(out);
    return out;
}

/* recv_values(fd, request id, n, buf, deadline, spin_seconds)
       -> (status, values or received bytes, caught while spinning, late)

   The client's multi-block wait: the reply to a GET of `n` keys already sent on `fd`,
   received without the GIL into `buf` (a memoryview of a bytearray big enough for
   the whole frame) as get_one does. GOT_VALUE: the list of values, slices of `buf`
   (no copy; valid until the next call with it), None where absent. Else NOT_FAST
   (the bytes received, for the Python decoder), TIMED_OUT, CLOSED, as get_one. */
static PyObject *recv_values(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "recv_values(fd, request_id, n, buf, deadline, spin)");
        return NULL;
    }
    int fd = as_fd(args[0]);
    if (fd < 0) return NULL;
    unsigned long rid = PyLong_AsUnsignedLong(args[1]);
    long n = PyLong_AsLong(args[2]);
    double deadline = PyFloat_AsDouble(args[4]);
    double spin = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred()) return NULL;
    if (rid > 0xFFFFFFFFul || n < 1 || n > MAX_KEYS || !PyMemoryView_Check(args[3])) {
        PyErr_SetString(PyExc_ValueError, "bad request id or key count, or buf not a memoryview");
        return NULL;
    }
    Py_buffer bb;
    if (PyObject_GetBuffer(args[3], &bb, PyBUF_WRITABLE) < 0) return NULL;
    unsigned char *buf = bb.buf;
    size_t cap = (size_t)bb.len, got = 0;
    int status, caught = 0, err = 0, late;
    Py_BEGIN_ALLOW_THREADS
    status = recv_frame(fd, buf, cap, &got, deadline, spin > 0 ? now_mono() + spin : 0, &caught);
    if (status < 0) err = errno;
    late = now_mono() - deadline > CLIENT_LATE;
    Py_END_ALLOW_THREADS
    PyObject *out = NULL;
    if (!err && status == NOT_FAST) {
        PyObject *values = values_in(args[3], buf, got, rid, (uint32_t)n);
        if (values != NULL) {
            out = Py_BuildValue("(iNOO)", GOT_VALUE, values, caught ? Py_True : Py_False,
                                late ? Py_True : Py_False);
            goto done;
        }
        if (PyErr_Occurred()) goto done;
    }
    out = wait_result(err, status, buf, got, caught, late);
done:
    PyBuffer_Release(&bb);
    return out;
}

/* The mount's READ of one lent block (its own file; one translation unit). */
#include "_native_read.c"
/* FORGETs queued in C, taken by the daemon in batches. */
#include "_native_forget.c"

static PyObject *init(PyObject *self, PyObject *arg) {
    Py_XSETREF(ProtocolError, Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"init", init, METH_O, "init(ProtocolError): the exception the decoders raise"},
    {"decode_keys", decode_keys, METH_O, "A GET payload -> its keys (ProtocolError)"},
    {"decode_values", decode_values, METH_O, "A GET_REPLY payload -> its values"},
    {"decode_put", decode_put, METH_O, "A PUT payload -> its (key, value) items"},
    {"parse_gets", parse_gets, METH_O, "Whole GET frames -> [(request id, keys)] | None"},
    {"encode_get", (PyCFunction)(void (*)(void))encode_get, METH_FASTCALL, "A GET frame"},
    {"serve_gets", (PyCFunction)(void (*)(void))serve_gets, METH_FASTCALL,
     "The lender's answer to a chunk of GET frames"},
    {"recv_serve", (PyCFunction)(void (*)(void))recv_serve, METH_FASTCALL,
     "recv() and serve_gets in one call"},
    {"recv_put", (PyCFunction)(void (*)(void))recv_put, METH_FASTCALL,
     "recv() the rest of a PUT frame into its buffer; its items once whole"},
    {"get_one", (PyCFunction)(void (*)(void))get_one, METH_FASTCALL,
     "The client's one-block round trip"},
    {"recv_values", (PyCFunction)(void (*)(void))recv_values, METH_FASTCALL,
     "The client's multi-block wait"},
    {"read_setup", (PyCFunction)(void (*)(void))read_setup, METH_FASTCALL,
     "The mount's block size and epoch, for read_next"},
    {"read_keys", (PyCFunction)(void (*)(void))read_keys, METH_FASTCALL,
     "The sealing keys read_next opens blocks with"},
    {"read_lender", read_lender, METH_O, "The lender's active health generation (-1: none)"},
    {"read_slot", (PyCFunction)(void (*)(void))read_slot, METH_FASTCALL,
     "A file's state for read_next"},
    {"read_next", (PyCFunction)(void (*)(void))read_next, METH_FASTCALL,
     "The next FUSE request, a READ of one lent block served in C"},
    {"forget_setup", (PyCFunction)(void (*)(void))forget_setup, METH_FASTCALL, "Queue FORGETs in C, signalling an eventfd"},
    {"forgets_take", forgets_take, METH_NOARGS, "The queued FORGETs, as u64 pairs"},
    {"next_request", (PyCFunction)(void (*)(void))next_request, METH_FASTCALL,
     "The next FUSE request, FORGETs queued on the way"},
    {"close_fds", close_fds, METH_O, "close(2) each descriptor, the GIL released once"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "memlend._native",
    .m_doc = "The remote tier's hot path in C (docs/native.md).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "GOT_VALUE", GOT_VALUE) < 0 ||
        PyModule_AddIntConstant(m, "GOT_NONE", GOT_NONE) < 0 ||
        PyModule_AddIntConstant(m, "NOT_FAST", NOT_FAST) < 0 ||
        PyModule_AddIntConstant(m, "TIMED_OUT", TIMED_OUT) < 0 ||
        PyModule_AddIntConstant(m, "CLOSED", CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "READ_PYTHON", READ_PYTHON) < 0 ||
        PyModule_AddIntConstant(m, "READ_HIT", READ_HIT) < 0 ||
        PyModule_AddIntConstant(m, "READ_MISS", READ_MISS) < 0 ||
        PyModule_AddIntConstant(m, "READ_FAULT", READ_FAULT) < 0 ||
        PyModule_AddIntConstant(m, "READ_BAD_SEAL", READ_BAD_SEAL) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_BITS", SLOT_BITS) < 0 ||
        PyModule_AddObject(m, "CLIENT_LATE", PyFloat_FromDouble(CLIENT_LATE)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
