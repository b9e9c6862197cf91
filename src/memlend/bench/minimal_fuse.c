/*
 * minimal_fuse: the smallest sensible FUSE server, as a latency baseline for memlend.
 *
 * libfuse 3 low-level API, single-threaded loop (fuse_session_loop). It serves one
 * read-only regular file, /data, whose bytes are SRCFILE loaded into one malloc'd
 * buffer at start. open() sets fi->direct_io = 1 (as memlend does with
 * FOPEN_DIRECT_IO), so the kernel page cache is not used and every read(2) is a
 * round trip to this process; read replies with fuse_reply_buf straight out of the
 * buffer. Nothing else: no locking, no cache, no copies.
 *
 *   minimal_fuse SRCFILE MOUNTPOINT [libfuse options, e.g. -o max_read=1048576]
 *
 * Runs in the foreground until unmounted (umount MOUNTPOINT) or SIGTERM/SIGINT.
 * Built at benchmark time by memlend.bench.fuse_latency:
 *   gcc -O2 -o minimal_fuse minimal_fuse.c $(pkg-config --cflags --libs fuse3)
 */
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FILE_INO 2
static const char *FILE_NAME = "data";

static char *data;
static size_t data_size;

static void fill_stat(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0444;
        st->st_nlink = 1;
        st->st_size = (off_t)data_size;
        st->st_blocks = (blkcnt_t)((data_size + 511) / 512);
    }
}

static void mf_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    /* Allow requests up to 1 MiB: libfuse derives max_pages from max_write, and
     * max_read must equal the -o max_read=1048576 given on the command line. */
    conn->max_write = 1 << 20;
    conn->max_read = 1 << 20;
}

static void mf_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e;
    if (parent != FUSE_ROOT_ID || strcmp(name, FILE_NAME) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    memset(&e, 0, sizeof(e));
    e.ino = FILE_INO;
    e.attr_timeout = 1.0;
    e.entry_timeout = 1.0;
    fill_stat(FILE_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void mf_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    if (ino != FUSE_ROOT_ID && ino != FILE_INO) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill_stat(ino, &st);
    fuse_reply_attr(req, &st, 1.0);
}

static void mf_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino != FILE_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    if ((fi->flags & O_ACCMODE) != O_RDONLY) {
        fuse_reply_err(req, EACCES);
        return;
    }
    fi->direct_io = 1; /* no kernel page cache: every read comes here */
    fuse_reply_open(req, fi);
}

static void mf_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    if (off < 0 || (size_t)off >= data_size) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    if (size > data_size - (size_t)off)
        size = data_size - (size_t)off;
    fuse_reply_buf(req, data + off, size);
}

static void mf_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    char buf[512];
    size_t used = 0;
    struct stat st;
    const char *names[] = {".", "..", FILE_NAME};
    const fuse_ino_t inos[] = {FUSE_ROOT_ID, FUSE_ROOT_ID, FILE_INO};
    (void)fi;
    if (ino != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    if (size > sizeof(buf))
        size = sizeof(buf);
    for (off_t i = off; i < 3; i++) {
        fill_stat(inos[i], &st);
        size_t n = fuse_add_direntry(req, buf + used, size - used, names[i], &st, i + 1);
        if (n > size - used)
            break;
        used += n;
    }
    fuse_reply_buf(req, buf, used);
}

static const struct fuse_lowlevel_ops ops = {
    .init = mf_init,
    .lookup = mf_lookup,
    .getattr = mf_getattr,
    .open = mf_open,
    .read = mf_read,
    .readdir = mf_readdir,
};

static int load(const char *path)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        perror(path);
        return -1;
    }
    data_size = (size_t)st.st_size;
    data = malloc(data_size ? data_size : 1);
    if (!data) {
        perror("malloc");
        return -1;
    }
    for (size_t done = 0; done < data_size;) {
        ssize_t n = pread(fd, data + done, data_size - done, (off_t)done);
        if (n <= 0) {
            perror("pread");
            return -1;
        }
        done += (size_t)n;
    }
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s SRCFILE MOUNTPOINT [-o options]\n", argv[0]);
        return 2;
    }
    if (load(argv[1]) != 0)
        return 1;
    const char *mountpoint = argv[2];
    /* libfuse sees: prog [options after MOUNTPOINT] */
    argv[2] = argv[0];
    struct fuse_args args = FUSE_ARGS_INIT(argc - 2, argv + 2);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    if (!se)
        return 1;
    int rc = 1;
    if (fuse_set_signal_handlers(se) == 0) {
        if (fuse_session_mount(se, mountpoint) == 0) {
            fprintf(stderr, "minimal_fuse: serving %zu bytes at %s/%s\n", data_size,
                    mountpoint, FILE_NAME);
            rc = fuse_session_loop(se) != 0;
            fuse_session_unmount(se);
        }
        fuse_remove_signal_handlers(se);
    }
    fuse_session_destroy(se);
    fuse_opt_free_args(&args);
    free(data);
    return rc;
}
