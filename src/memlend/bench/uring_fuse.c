/*
 * uring_fuse: a raw FUSE server (no libfuse) that answers from /dev/fuse either the
 * classic way (read() a request, writev() the reply) or over io_uring (Linux 6.14+,
 * FUSE_OVER_IO_URING), so the two transports can be timed against each other with
 * everything else equal. memlend.bench.fuse_uring builds and drives it (issue 13).
 *
 *   uring_fuse SRCFILE MOUNTPOINT classic|uring|uring-defer [QUEUE_DEPTH [THREADS [PIN]]]
 *
 * It serves one read-only regular file, MOUNTPOINT/data, whose bytes are SRCFILE
 * loaded into memory at start; OPEN replies FOPEN_DIRECT_IO (as memlend does), so
 * every read(2) is a round trip to this process. It mounts with mount(2) on an open
 * /dev/fuse itself (needs root) and handles INIT, LOOKUP, GETATTR, OPEN(DIR), READ,
 * READDIR (empty), STATFS, FLUSH, RELEASE(DIR), FORGET; anything else gets ENOSYS.
 *
 * classic: THREADS threads (default 1), each read(/dev/fuse) then writev(/dev/fuse)
 *          per request (what libfuse's loops and memlend's workers do).
 * uring:   INIT goes over /dev/fuse as always; the INIT reply sets FUSE_OVER_IO_URING
 *          (bit 41 of the 64-bit flags, in flags2 with FUSE_INIT_EXT). Then one thread
 *          per possible CPU (the kernel keeps one queue per possible CPU and routes a
 *          request to the queue of the CPU the requesting task runs on; the ring only
 *          goes live once every queue has an entry) sets up an io_uring with 128-byte
 *          SQEs and registers QUEUE_DEPTH entries with IORING_OP_URING_CMD
 *          FUSE_IO_URING_CMD_REGISTER (iov[0] = struct fuse_uring_req_header,
 *          iov[1] = payload buffer). A request arrives as a completion; the reply is
 *          written into the same buffers and sent with FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
 *          which also asks for the next request: one io_uring_enter() per request. The
 *          main thread keeps reading /dev/fuse for what the kernel still sends there
 *          (FORGET, INTERRUPT).
 * uring-defer: the same with IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN:
 *          the kernel's task work (copying a request into the entry's buffers) runs
 *          when the queue thread waits in io_uring_enter, instead of being signalled
 *          to it (TWA_SIGNAL) as with the default flags, which libfuse uses.
 * Raw syscalls only (io_uring_setup/io_uring_enter + mmap), no liburing.
 *
 * Pinning is the caller's (taskset): every thread inherits it; with PIN = 1, queue
 * thread q pins itself to CPU q instead (libfuse's layout for io_uring). Runs until unmounted;
 * then prints one JSON line of counters to stdout (requests seen per transport) and
 * exits 0. Exit 3: the kernel did not offer FUSE_OVER_IO_URING (enable_uring=N); on
 * that and every other failure after mounting it detaches the mount first.
 *
 * The FUSE-over-io_uring structs and command numbers below are those of the kernel's
 * include/uapi/linux/fuse.h (7.42+); the system header may predate them.
 *
 *   gcc -O2 -Wall -pthread -o uring_fuse uring_fuse.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

/* ---- FUSE-over-io_uring uapi (include/uapi/linux/fuse.h, protocol 7.42+) ---- */
#ifndef FUSE_OVER_IO_URING
#define FUSE_OVER_IO_URING (1ULL << 41)
#endif
#ifndef FUSE_URING_IN_OUT_HEADER_SZ
#define FUSE_URING_IN_OUT_HEADER_SZ 128
#define FUSE_URING_OP_IN_OUT_SZ 128
struct fuse_uring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id; /* echo in fuse_uring_cmd_req.commit_id */
    uint32_t payload_sz;
    uint32_t padding;
    uint64_t reserved;
};
struct fuse_uring_req_header {
    char in_out[FUSE_URING_IN_OUT_HEADER_SZ]; /* fuse_in_header / fuse_out_header */
    char op_in[FUSE_URING_OP_IN_OUT_SZ];      /* the per-opcode header (in_args[0]) */
    struct fuse_uring_ent_in_out ring_ent_in_out;
};
enum fuse_uring_cmd {
    FUSE_IO_URING_CMD_INVALID = 0,
    FUSE_IO_URING_CMD_REGISTER = 1,
    FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2,
};
struct fuse_uring_cmd_req { /* in the 80-byte command area of a 128-byte SQE */
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};
#endif

#define FILE_INO 2
#define MAX_WRITE (1u << 20)
#define MAX_PAGES 256
#define DEV_BUF (MAX_WRITE + 8192)
#define TTL 3600

static const char *FILE_NAME = "data";
static char *data;
static size_t data_size;
static int fuse_fd = -1;
static int uring_mode;
static int defer_taskrun;
static unsigned depth = 4;
static int classic_threads = 1;
static int pin_queues;
static int nqueues;
static atomic_ulong dev_requests, ring_requests, ring_errors;
static const char *mountpoint; /* set once mounted: failing exits detach it */

static void fail(int code)
{
    if (mountpoint)
        umount2(mountpoint, MNT_DETACH);
    exit(code);
}

static void die(const char *what)
{
    fprintf(stderr, "uring_fuse: %s: %s\n", what, strerror(errno));
    fail(1);
}

/* ---- request handling, shared by both transports -------------------------------- */

static void fill_attr(uint64_t ino, struct fuse_attr *a)
{
    memset(a, 0, sizeof(*a));
    a->ino = ino;
    a->blksize = 4096;
    if (ino == FUSE_ROOT_ID) {
        a->mode = S_IFDIR | 0755;
        a->nlink = 2;
    } else {
        a->mode = S_IFREG | 0444;
        a->nlink = 1;
        a->size = data_size;
        a->blocks = (data_size + 511) / 512;
    }
}

struct reply {
    const void *buf; /* reply body (after fuse_out_header) */
    size_t len;
    int error; /* 0 or -errno */
    int none;  /* no reply at all (FORGET) */
};

/* `opin`: the per-opcode header; `name`: the bytes after it (LOOKUP's name). The
 * classic transport passes the body after fuse_in_header for both; io_uring puts the
 * first argument in op_in and the rest in the payload buffer. `scratch` holds small
 * reply bodies. */
static struct reply handle(const struct fuse_in_header *in, const void *opin, const char *name,
                           char *scratch)
{
    struct reply r = {scratch, 0, 0, 0};
    switch (in->opcode) {
    case FUSE_LOOKUP: {
        if (in->nodeid != FUSE_ROOT_ID || strcmp(name, FILE_NAME) != 0) {
            r.error = -ENOENT;
            break;
        }
        struct fuse_entry_out *e = (void *)scratch;
        memset(e, 0, sizeof(*e));
        e->nodeid = FILE_INO;
        e->entry_valid = e->attr_valid = TTL;
        fill_attr(FILE_INO, &e->attr);
        r.len = sizeof(*e);
        break;
    }
    case FUSE_GETATTR: {
        if (in->nodeid != FUSE_ROOT_ID && in->nodeid != FILE_INO) {
            r.error = -ENOENT;
            break;
        }
        struct fuse_attr_out *a = (void *)scratch;
        memset(a, 0, sizeof(*a));
        a->attr_valid = TTL;
        fill_attr(in->nodeid, &a->attr);
        r.len = sizeof(*a);
        break;
    }
    case FUSE_OPEN:
    case FUSE_OPENDIR: {
        struct fuse_open_out *o = (void *)scratch;
        memset(o, 0, sizeof(*o));
        if (in->opcode == FUSE_OPEN) {
            if (in->nodeid != FILE_INO) {
                r.error = -EISDIR;
                break;
            }
            if ((((const struct fuse_open_in *)opin)->flags & O_ACCMODE) != O_RDONLY) {
                r.error = -EACCES;
                break;
            }
            o->open_flags = FOPEN_DIRECT_IO;
        }
        r.len = sizeof(*o);
        break;
    }
    case FUSE_READ: {
        const struct fuse_read_in *rd = opin;
        uint64_t off = rd->offset;
        size_t n = 0;
        if (off < data_size) {
            n = rd->size;
            if (n > data_size - off)
                n = data_size - off;
        }
        r.buf = data + (off < data_size ? off : 0);
        r.len = n;
        break;
    }
    case FUSE_READDIR: /* empty listing: nobody lists this directory */
    case FUSE_FLUSH:
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
    case FUSE_ACCESS:
        break;
    case FUSE_STATFS: {
        struct fuse_statfs_out *s = (void *)scratch;
        memset(s, 0, sizeof(*s));
        s->st.bsize = s->st.frsize = 4096;
        s->st.namelen = 255;
        r.len = sizeof(*s);
        break;
    }
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT: /* every request is answered at once; nothing to interrupt */
        r.none = 1;
        break;
    default:
        r.error = -ENOSYS;
    }
    return r;
}

/* ---- io_uring, raw ---------------------------------------------------------------- */

struct ent {
    struct fuse_uring_req_header hdr __attribute__((aligned(64)));
    struct iovec iov[2];
    char *payload;
    char scratch[256] __attribute__((aligned(8)));
};

struct queue {
    int qid;
    int ring_fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    char *sqes; /* 128-byte entries */
    unsigned pending; /* SQEs written, not yet submitted */
    struct ent *ents;
};

static void *map_ring(int fd, size_t len, off_t off)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, off);
    if (p == MAP_FAILED)
        die("mmap io_uring");
    return p;
}

static void queue_setup(struct queue *q)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
    if (defer_taskrun)
        p.flags |= IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    p.cq_entries = 2 * depth;
    q->ring_fd = (int)syscall(__NR_io_uring_setup, depth, &p);
    if (q->ring_fd < 0)
        die("io_uring_setup");
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq, *cq;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        sq = cq = map_ring(q->ring_fd, sq_len > cq_len ? sq_len : cq_len, IORING_OFF_SQ_RING);
    } else {
        sq = map_ring(q->ring_fd, sq_len, IORING_OFF_SQ_RING);
        cq = map_ring(q->ring_fd, cq_len, IORING_OFF_CQ_RING);
    }
    q->sq_head = (unsigned *)(sq + p.sq_off.head);
    q->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    q->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    q->sq_array = (unsigned *)(sq + p.sq_off.array);
    q->cq_head = (unsigned *)(cq + p.cq_off.head);
    q->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    q->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    q->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    q->sqes = map_ring(q->ring_fd, p.sq_entries * 128, IORING_OFF_SQES);
}

/* Write one URING_CMD SQE for entry `e` (not yet submitted). */
static void queue_cmd(struct queue *q, struct ent *e, uint32_t cmd_op, uint64_t commit_id)
{
    unsigned tail = *q->sq_tail; /* only this thread writes the tail */
    unsigned idx = tail & *q->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(q->sqes + (size_t)idx * 128);
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_fd;
    sqe->cmd_op = cmd_op;
    sqe->user_data = (uint64_t)(uintptr_t)e;
    if (cmd_op == FUSE_IO_URING_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    struct fuse_uring_cmd_req *req = (struct fuse_uring_cmd_req *)sqe->cmd;
    req->qid = (uint16_t)q->qid;
    req->commit_id = commit_id;
    q->sq_array[idx] = idx;
    __atomic_store_n(q->sq_tail, tail + 1, __ATOMIC_RELEASE);
    q->pending++;
}

/* Answer the request that arrived in entry `e`; queue its COMMIT_AND_FETCH. */
static void ring_request(struct queue *q, struct ent *e)
{
    struct fuse_uring_req_header *h = &e->hdr;
    struct fuse_in_header in;
    memcpy(&in, h->in_out, sizeof(in));
    uint64_t commit_id = h->ring_ent_in_out.commit_id;
    uint32_t in_payload = h->ring_ent_in_out.payload_sz;
    if (in_payload < MAX_WRITE)
        e->payload[in_payload] = '\0'; /* LOOKUP's name is NUL-terminated anyway */
    atomic_fetch_add_explicit(&ring_requests, 1, memory_order_relaxed);
    struct reply r = handle(&in, h->op_in, e->payload, e->scratch);
    struct fuse_out_header *out = (struct fuse_out_header *)h->in_out;
    size_t len = r.error ? 0 : r.len;
    if (len && r.buf != e->payload)
        memcpy(e->payload, r.buf, len); /* the kernel copies the reply from here */
    out->unique = in.unique;
    out->error = r.error;
    out->len = (uint32_t)(sizeof(*out) + len);
    h->ring_ent_in_out.payload_sz = (uint32_t)len;
    queue_cmd(q, e, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, commit_id);
}

static void *queue_thread(void *arg)
{
    struct queue *q = arg;
    size_t payload_sz = MAX_WRITE > MAX_PAGES * 4096 ? MAX_WRITE : MAX_PAGES * 4096;
    if (pin_queues) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(q->qid, &set);
        if (sched_setaffinity(0, sizeof(set), &set) != 0)
            die("sched_setaffinity");
    }
    queue_setup(q);
    q->ents = aligned_alloc(64, sizeof(struct ent) * depth);
    if (!q->ents)
        die("malloc");
    memset(q->ents, 0, sizeof(struct ent) * depth);
    for (unsigned i = 0; i < depth; i++) {
        struct ent *e = &q->ents[i];
        e->payload = aligned_alloc(4096, payload_sz);
        if (!e->payload)
            die("malloc payload");
        memset(e->payload, 0, payload_sz);
        e->iov[0].iov_base = &e->hdr;
        e->iov[0].iov_len = sizeof(e->hdr);
        e->iov[1].iov_base = e->payload;
        e->iov[1].iov_len = payload_sz;
        queue_cmd(q, e, FUSE_IO_URING_CMD_REGISTER, 0);
    }
    for (;;) {
        unsigned to_submit = q->pending;
        int rc = (int)syscall(__NR_io_uring_enter, q->ring_fd, to_submit, 1,
                              IORING_ENTER_GETEVENTS, NULL, 0);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            die("io_uring_enter");
        }
        q->pending -= (unsigned)rc < to_submit ? (unsigned)rc : to_submit;
        unsigned head = *q->cq_head;
        unsigned tail = __atomic_load_n(q->cq_tail, __ATOMIC_ACQUIRE);
        int stop = 0;
        for (; head != tail; head++) {
            struct io_uring_cqe *cqe = &q->cqes[head & *q->cq_mask];
            struct ent *e = (struct ent *)(uintptr_t)cqe->user_data;
            if (cqe->res == 0) {
                ring_request(q, e);
            } else if (cqe->res == -EAGAIN || cqe->res == -EINTR) {
                queue_cmd(q, e, FUSE_IO_URING_CMD_REGISTER, 0); /* INIT not seen yet */
            } else {
                if (cqe->res != -ENOTCONN && cqe->res != -ECANCELED) {
                    fprintf(stderr, "uring_fuse: qid %d: ring command failed: %s\n", q->qid,
                            strerror(-cqe->res));
                    atomic_fetch_add(&ring_errors, 1);
                }
                stop = 1; /* unmounted (ENOTCONN), or broken: this queue is done */
            }
        }
        __atomic_store_n(q->cq_head, head, __ATOMIC_RELEASE);
        if (stop)
            break;
    }
    return NULL;
}

static void start_queues(void)
{
    nqueues = (int)sysconf(_SC_NPROCESSORS_CONF); /* the kernel: num_possible_cpus() */
    struct queue *qs = calloc((size_t)nqueues, sizeof(*qs));
    if (!qs)
        die("calloc");
    for (int i = 0; i < nqueues; i++) {
        pthread_t t;
        qs[i].qid = i;
        if (pthread_create(&t, NULL, queue_thread, &qs[i]))
            die("pthread_create");
        pthread_detach(t);
    }
}

/* ---- /dev/fuse, classic ----------------------------------------------------------- */

static void dev_reply(uint64_t unique, int error, const void *buf, size_t len)
{
    struct fuse_out_header out = {(uint32_t)(sizeof(out) + (error ? 0 : len)), error, unique};
    struct iovec iov[2] = {{&out, sizeof(out)}, {(void *)buf, error ? 0 : len}};
    if (writev(fuse_fd, iov, error || !len ? 1 : 2) < 0 && errno != ENOENT)
        die("writev /dev/fuse"); /* ENOENT: the request was interrupted meanwhile */
}

static void init(const struct fuse_in_header *in, const struct fuse_init_in *ii)
{
    uint64_t offered = ii->flags;
    if (ii->flags & FUSE_INIT_EXT)
        offered |= (uint64_t)ii->flags2 << 32;
    struct fuse_init_out o;
    memset(&o, 0, sizeof(o));
    o.major = FUSE_KERNEL_VERSION;
    o.minor = ii->minor; /* what the kernel speaks; this server uses nothing newer */
    o.max_readahead = ii->max_readahead;
    uint64_t want = FUSE_MAX_PAGES | FUSE_INIT_EXT;
    if (uring_mode) {
        if (!(offered & FUSE_OVER_IO_URING)) {
            fprintf(stderr, "uring_fuse: the kernel did not offer FUSE_OVER_IO_URING "
                            "(INIT flags 0x%llx; /sys/module/fuse/parameters/enable_uring "
                            "is N?)\n",
                    (unsigned long long)offered);
            fail(3);
        }
        want |= FUSE_OVER_IO_URING;
    }
    want &= offered;
    o.flags = (uint32_t)want;
    o.flags2 = (uint32_t)(want >> 32);
    o.max_background = 16;
    o.congestion_threshold = 12;
    o.max_write = MAX_WRITE;
    o.max_pages = MAX_PAGES;
    o.time_gran = 1;
    dev_reply(in->unique, 0, &o, sizeof(o));
    fprintf(stderr, "uring_fuse: INIT 7.%u, kernel offered 0x%llx, using 0x%llx\n", ii->minor,
            (unsigned long long)offered, (unsigned long long)want);
    if (uring_mode)
        start_queues(); /* INIT is processed: REGISTER no longer gets EAGAIN */
}

static void dev_loop(void)
{
    char *buf = aligned_alloc(4096, DEV_BUF);
    char scratch[256] __attribute__((aligned(8)));
    if (!buf)
        die("malloc");
    for (;;) {
        ssize_t n = read(fuse_fd, buf, DEV_BUF);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue;
            if (errno == ENODEV)
                return; /* unmounted */
            die("read /dev/fuse");
        }
        if ((size_t)n < sizeof(struct fuse_in_header))
            continue;
        const struct fuse_in_header *in = (const void *)buf;
        const char *body = buf + sizeof(*in);
        atomic_fetch_add_explicit(&dev_requests, 1, memory_order_relaxed);
        if (in->opcode == FUSE_INIT) {
            init(in, (const void *)body);
            continue;
        }
        if (in->opcode == FUSE_DESTROY) {
            dev_reply(in->unique, 0, NULL, 0);
            return;
        }
        struct reply r = handle(in, body, body, scratch);
        if (!r.none)
            dev_reply(in->unique, r.error, r.buf, r.len);
    }
}

static void *dev_thread(void *arg)
{
    (void)arg;
    dev_loop();
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 4 || (strcmp(argv[3], "classic") && strcmp(argv[3], "uring") &&
                     strcmp(argv[3], "uring-defer"))) {
        fprintf(stderr, "usage: uring_fuse SRCFILE MOUNTPOINT classic|uring|uring-defer "
                        "[QUEUE_DEPTH [THREADS [PIN]]]\n");
        return 2;
    }
    defer_taskrun = !strcmp(argv[3], "uring-defer");
    uring_mode = !strcmp(argv[3], "uring") || defer_taskrun;
    if (argc > 4)
        depth = (unsigned)atoi(argv[4]);
    if (argc > 5)
        classic_threads = atoi(argv[5]);
    if (argc > 6)
        pin_queues = atoi(argv[6]);
    if (classic_threads < 1 || classic_threads > 64) {
        fprintf(stderr, "uring_fuse: THREADS must be in 1..64\n");
        return 2;
    }
    if (depth < 1 || depth > 256 || (depth & (depth - 1))) {
        fprintf(stderr, "uring_fuse: QUEUE_DEPTH must be a power of two in 1..256\n");
        return 2;
    }
    int src = open(argv[1], O_RDONLY);
    struct stat st;
    if (src < 0 || fstat(src, &st))
        die(argv[1]);
    data_size = (size_t)st.st_size;
    data = malloc(data_size ? data_size : 1);
    if (!data)
        die("malloc");
    for (size_t got = 0; got < data_size;) {
        ssize_t n = pread(src, data + got, data_size - got, (off_t)got);
        if (n <= 0)
            die("read SRCFILE");
        got += (size_t)n;
    }
    close(src);
    if (mlockall(MCL_CURRENT) != 0)
        perror("uring_fuse: mlockall (continuing)");

    fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fuse_fd < 0)
        die("/dev/fuse");
    char opts[160];
    snprintf(opts, sizeof(opts),
             "fd=%d,rootmode=40000,user_id=0,group_id=0,max_read=%u", fuse_fd, MAX_WRITE);
    if (mount("uring_fuse", argv[2], "fuse.uring_fuse", MS_NOSUID | MS_NODEV, opts) != 0)
        die("mount");
    mountpoint = argv[2];
    for (int i = 1; i < classic_threads && !uring_mode; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, dev_thread, NULL))
            die("pthread_create");
        pthread_detach(t);
    }
    dev_loop();
    /* Unmounted: the queue threads have seen ENOTCONN (or will); report and go. */
    printf("{\"mode\": \"%s\", \"dev_requests\": %lu, \"ring_requests\": %lu, "
           "\"ring_errors\": %lu, \"queues\": %d, \"depth\": %u, \"dev_threads\": %d}\n",
           argv[3], atomic_load(&dev_requests), atomic_load(&ring_requests),
           atomic_load(&ring_errors), nqueues, depth, uring_mode ? 1 : classic_threads);
    fflush(stdout);
    return 0;
}
