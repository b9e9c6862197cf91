/* readcheck.so: LD_PRELOAD shim that checks every read(2) a program makes under one
 * directory against the same bytes of the same file under another.
 *
 * memlend's testbed runs Postmark with it (memlend.bench.postmark): Postmark reads the
 * files it wrote through the mount but never checks what it reads, so the shim does.
 * MEMLEND_CHECK_MNT  the directory whose reads are checked (the mount)
 * MEMLEND_CHECK_REF  the reference directory (the mount's backing directory)
 * MEMLEND_CHECK_OUT  where "reads bytes bad" is written at exit
 * The mount writes through to the backing store, so the backing file holds, at the
 * moment of each read, exactly what the read must return (one writer: Postmark). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
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
}

__attribute__((destructor)) static void report(void) {
    const char *out = getenv("MEMLEND_CHECK_OUT");
    if (!out) return;
    FILE *f = fopen(out, "w");
    if (!f) return;
    fprintf(f, "%llu %llu %llu\n", reads, bytes, bad);
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

ssize_t read(int fd, void *buf, size_t count) {
    ssize_t n = real_read(fd, buf, count);
    if (n > 0 && fd >= 0 && fd < MAX_FD && ref_fd[fd]) {
        off_t end = lseek(fd, 0, SEEK_CUR);
        char *want = malloc((size_t)n);
        if (!want || end < n || pread(ref_fd[fd] - 1, want, (size_t)n, end - n) != n ||
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
