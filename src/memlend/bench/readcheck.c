/* readcheck.so: LD_PRELOAD shim that checks every read(2) a program makes under one
 * directory against the same bytes of the same file under another.
 *
 * memlend's testbed runs Postmark with it (memlend.bench.postmark): Postmark reads the
 * files it wrote through the mount but never checks what it reads, so the shim does.
 * MEMLEND_CHECK_MNT  the directory whose reads are checked (the mount)
 * MEMLEND_CHECK_REF  the reference directory (the mount's backing directory)
 * MEMLEND_CHECK_OUT  where "reads bytes bad moved" is written at exit
 * MEMLEND_CHECK_TASKS (optional) a cgroup v1 blkio group's tasks file: the reads of
 *                    the reference are then made by a thread of their own placed in
 *                    that group (moved = 1 once it is), so their disk I/O is neither
 *                    throttled nor counted as the checked program's. Without it, or
 *                    if the move fails (moved = 0), the calling thread reads them.
 * The mount writes through to the backing store, so the backing file holds, at the
 * moment of each read, exactly what the read must return (one writer: Postmark). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_FD 65536

static const char *mnt, *ref;
static size_t mnt_len;
static int ref_fd[MAX_FD]; /* reference descriptor + 1; 0 = not checked */
static unsigned long long reads, bytes, bad;
static int moved;
static void forked(void);
static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static ssize_t (*real_read)(int, void *, size_t);
static int (*real_close)(int);

__attribute__((constructor)) static void init(void) {
    real_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
    real_openat = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, "openat");
    real_read = (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    mnt = getenv("MEMLEND_CHECK_MNT");
    ref = getenv("MEMLEND_CHECK_REF");
    mnt_len = mnt ? strlen(mnt) : 0;
    pthread_atfork(NULL, NULL, forked);
}

__attribute__((destructor)) static void report(void) {
    const char *out = getenv("MEMLEND_CHECK_OUT");
    if (!out) return;
    FILE *f = fopen(out, "w");
    if (!f) return;
    fprintf(f, "%llu %llu %llu %d\n", reads, bytes, bad, moved);
    fclose(f);
}

static int under_mount(const char *path) {
    return mnt && ref && strncmp(path, mnt, mnt_len) == 0 &&
           (path[mnt_len] == '/' || path[mnt_len] == '\0');
}

static void track(int fd, const char *path, int flags) {
    char full[4096];
    if (path[0] != '/') { /* relative to the working directory (Postmark runs in it) */
        char cwd[2048];
        if (!getcwd(cwd, sizeof cwd) ||
            (size_t)snprintf(full, sizeof full, "%s/%s", cwd, path) >= sizeof full)
            return;
        path = full;
    }
    if (fd < 0 || fd >= MAX_FD || !under_mount(path) || (flags & O_ACCMODE) == O_WRONLY)
        return;
    char other[4096];
    if ((size_t)snprintf(other, sizeof other, "%s%s", ref, path + mnt_len) >= sizeof other)
        return;
    int r = real_open(other, O_RDONLY);
    if (r >= 0)
        ref_fd[fd] = r + 1;
    else
        bad++; /* the file is not where the mount says it is */
}

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
}

int open(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real_open(path, flags, mode);
    track(fd, path, flags);
    return fd;
}

int open64(const char *path, int flags, ...) __attribute__((alias("open")));

/* Paths relative to another directory descriptor are not checked (nothing here
 * uses them). */
int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real_openat(dirfd, path, flags, mode);
    if (path[0] == '/' || dirfd == AT_FDCWD)
        track(fd, path, flags);
    return fd;
}

/* The reference reader: one request at a time, handed over under `lock`. A checked
 * read in a page cache holding the file costs no disk I/O; a read through a mount that
 * reads the disk with O_DIRECT leaves nothing in the backing store's page cache, so
 * the reference read goes to the disk a second time: measured in the testbed's
 * Postmark (docs/benchmarks.md, "Postmark's extra disk I/O, traced"), ~4,200 reads per
 * cell that the workload itself does not make. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t asked = PTHREAD_COND_INITIALIZER, answered = PTHREAD_COND_INITIALIZER;
static int helper = -1; /* -1 not started, 0 none (read inline), 1 running */
static struct { int fd, pending; void *buf; size_t n; off_t off; ssize_t got; } req;

static void *reader(void *arg) {
    const char *tasks = arg;
    int t = real_open(tasks, O_WRONLY);
    if (t >= 0) {
        char tid[32];
        int len = snprintf(tid, sizeof tid, "%d", gettid());
        moved = write(t, tid, (size_t)len) == len;
        real_close(t);
    }
    pthread_mutex_lock(&lock);
    for (;;) {
        while (req.pending != 1) pthread_cond_wait(&asked, &lock);
        req.got = pread(req.fd, req.buf, req.n, req.off);
        req.pending = 2;
        pthread_cond_signal(&answered);
    }
    return NULL;
}

static void forked(void) { /* the child has no reader thread: it starts its own */
    pthread_mutex_init(&lock, NULL);
    pthread_cond_init(&asked, NULL);
    pthread_cond_init(&answered, NULL);
    req.pending = 0;
    helper = -1;
}

static ssize_t ref_pread(int fd, void *buf, size_t n, off_t off) {
    if (helper < 0) {
        const char *tasks = getenv("MEMLEND_CHECK_TASKS");
        pthread_t th;
        helper = tasks && *tasks && pthread_create(&th, NULL, reader, (void *)tasks) == 0;
        if (helper) pthread_detach(th);
    }
    if (!helper) return pread(fd, buf, n, off);
    pthread_mutex_lock(&lock);
    req.fd = fd, req.buf = buf, req.n = n, req.off = off, req.pending = 1;
    pthread_cond_signal(&asked);
    while (req.pending != 2) pthread_cond_wait(&answered, &lock);
    req.pending = 0;
    ssize_t got = req.got;
    pthread_mutex_unlock(&lock);
    return got;
}

ssize_t read(int fd, void *buf, size_t count) {
    ssize_t n = real_read(fd, buf, count);
    if (n > 0 && fd >= 0 && fd < MAX_FD && ref_fd[fd]) {
        off_t end = lseek(fd, 0, SEEK_CUR);
        char *want = malloc((size_t)n);
        if (!want || end < n || ref_pread(ref_fd[fd] - 1, want, (size_t)n, end - n) != n ||
            memcmp(want, buf, (size_t)n) != 0)
            bad++;
        free(want);
        reads++;
        bytes += (unsigned long long)n;
    }
    return n;
}

int close(int fd) {
    if (fd >= 0 && fd < MAX_FD && ref_fd[fd]) {
        real_close(ref_fd[fd] - 1);
        ref_fd[fd] = 0;
    }
    return real_close(fd);
}
