/*
 * Directory trees for the diff engine (layerfs/diff):
 *
 *   lfs_walk         one record per entry of a tree (lstat, link target, xattrs),
 *                    in sorted preorder, written to a pipe that Python parses;
 *   lfs_files_equal  whether pairs of regular files hold the same bytes, on a
 *                    few threads, stopping each pair at its first difference.
 *
 * Both do the whole job in one call, so the GIL stays released throughout.
 */
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

/* listxattrat(2) (Linux 6.13): the xattr names of dirfd/name, without the
 * path walk llistxattr does for every entry.  Where the kernel (or a seccomp
 * filter) refuses it, the walk falls back to llistxattr. */
#if defined(SYS_listxattrat)
#define LFS_NR_LISTXATTRAT SYS_listxattrat
#elif defined(__x86_64__) || defined(__aarch64__)
#define LFS_NR_LISTXATTRAT 465
#endif

/* ---------------------------------------------------------------- output buffer */

typedef struct wbuf {
    int fd;
    unsigned char *p;
    size_t len, cap;
    pthread_mutex_t *lock;        /* several writers to fd (whole batches under it), or NULL */
} wbuf;

static int wb_flush(wbuf *w, lfs_error *err)
{
    size_t off = 0;
    int e = 0;
    if (w->lock) pthread_mutex_lock(w->lock);
    while (off < w->len) {
        ssize_t n = write(w->fd, w->p + off, w->len - off);
        if (n < 0) {
            if (errno == EINTR) continue;
            e = errno;
            break;
        }
        off += (size_t)n;
    }
    if (w->lock) pthread_mutex_unlock(w->lock);
    w->len = 0;
    if (e) return lfs_fail(err, e, -1, NULL, NULL, "writing walk records");
    return 0;
}

static int wb_reserve(wbuf *w, size_t n, lfs_error *err)
{
    if (w->len + n <= w->cap) return 0;
    int r = wb_flush(w, err);
    if (r < 0) return r;
    if (n > w->cap) {
        unsigned char *q = realloc(w->p, n);
        if (!q) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
        w->p = q;
        w->cap = n;
    }
    return 0;
}

static void put(wbuf *w, const void *p, size_t n)
{
    memcpy(w->p + w->len, p, n);
    w->len += n;
}

static void put32(wbuf *w, uint32_t v) { put(w, &v, 4); }
static void put64(wbuf *w, uint64_t v) { put(w, &v, 8); }

/* ---------------------------------------------------------------- walking */

struct comparer;

typedef struct walker {
    wbuf out;
    char path[PATH_MAX];          /* root + "/" + relative path of the current entry */
    size_t root_len;
    char *xnames;                 /* listxattr buffer */
    size_t xnames_cap;
    unsigned char *xval;          /* one xattr value */
    size_t xval_cap;
    lfs_error *err;
    struct comparer *cmp;         /* lfs_walk_compare: regular files go to it, or NULL */
    int dfd;                      /* the current entry's directory, or -1: use path */
    const char *name;             /* the current entry's name in dfd */
    int rfd;                      /* lfs_walk_compare: the same directory under the
                                     reference root; -1: by path; -2: it has none */
    int no_xattrat;               /* listxattrat refused: llistxattr only */
} walker;

static int cmp_offer(struct comparer *c, const char *rel, int rfd, const char *name,
                     const struct stat *st, lfs_error *err);

static ssize_t llistxattr_entry(walker *w, char *buf, size_t cap)
{
#ifdef LFS_NR_LISTXATTRAT
    if (w->dfd >= 0 && !w->no_xattrat) {
        ssize_t n = (ssize_t)syscall(LFS_NR_LISTXATTRAT, w->dfd, w->name,
                                     (unsigned)AT_SYMLINK_NOFOLLOW, buf, cap);
        if (n >= 0 || (errno != ENOSYS && errno != EPERM && errno != EINVAL)) return n;
        w->no_xattrat = 1;
    }
#endif
    return llistxattr(w->path, buf, cap);
}

static char type_char(mode_t m)
{
    switch (m & S_IFMT) {
    case S_IFREG: return '0';
    case S_IFLNK: return '2';
    case S_IFCHR: return '3';
    case S_IFBLK: return '4';
    case S_IFDIR: return '5';
    case S_IFIFO: return '6';
    case S_IFSOCK: return 's';
    default: return '?';
    }
}

/* The xattr names of the current path (not following a symlink) into w->xnames;
 * returns their total length, 0 when none or unsupported, <0 error. */
static ssize_t list_xattrs(walker *w)
{
    for (;;) {
        ssize_t n = llistxattr_entry(w, w->xnames, w->xnames_cap);
        if (n >= 0) return n;
        if (errno == ENOTSUP || errno == ENOENT) return 0;
        if (errno != ERANGE)
            return lfs_fail(w->err, errno, -1, w->path, NULL, "listing xattrs");
        ssize_t need = llistxattr_entry(w, NULL, 0);
        if (need < 0)
            return lfs_fail(w->err, errno, -1, w->path, NULL, "listing xattrs");
        size_t cap = (size_t)need + 256;
        char *q = realloc(w->xnames, cap);
        if (!q) return lfs_fail(w->err, ENOMEM, -1, w->path, NULL, "out of memory");
        w->xnames = q;
        w->xnames_cap = cap;
    }
}

/* Value of xattr name of the current path into w->xval; length, -1 when it
 * vanished (skip it), < -1 error (err filled). */
static ssize_t get_xattr(walker *w, const char *name)
{
    for (;;) {
        ssize_t n = lgetxattr(w->path, name, w->xval, w->xval_cap);
        if (n >= 0) return n;
        if (errno == ENODATA || errno == ENOTSUP) return -1;
        if (errno != ERANGE) {
            lfs_fail(w->err, errno, -1, w->path, NULL, "reading xattr %s", name);
            return -2;
        }
        ssize_t need = lgetxattr(w->path, name, NULL, 0);
        if (need < 0) {
            if (errno == ENODATA) return -1;
            lfs_fail(w->err, errno, -1, w->path, NULL, "reading xattr %s", name);
            return -2;
        }
        size_t cap = (size_t)need + 64;
        unsigned char *q = realloc(w->xval, cap);
        if (!q) {
            lfs_fail(w->err, ENOMEM, -1, w->path, NULL, "out of memory");
            return -2;
        }
        w->xval = q;
        w->xval_cap = cap;
    }
}

/* Emit the record of the entry at w->path (relative part after root_len). */
static int emit_entry(walker *w, const struct stat *st)
{
    char link[PATH_MAX];
    size_t link_len = 0;
    if (S_ISLNK(st->st_mode)) {
        ssize_t n = w->dfd >= 0 ? readlinkat(w->dfd, w->name, link, sizeof link)
                                : readlink(w->path, link, sizeof link);
        if (n < 0) {
            if (errno == ENOENT) return 1;
            return lfs_fail(w->err, errno, -1, w->path, NULL, "reading symlink");
        }
        link_len = (size_t)n;
    }
    ssize_t xlen = list_xattrs(w);
    if (xlen < 0) return (int)xlen;
    const char *rel = w->path + w->root_len;
    if (*rel == '/') rel++;
    size_t rel_len = strlen(rel);

    /* the xattrs first, into a scratch area at the end of the buffer: their
     * values are only known after reading them */
    uint32_t nx = 0;
    size_t xbytes = 0;
    for (ssize_t off = 0; off < xlen; off += (ssize_t)strlen(w->xnames + off) + 1) {
        ssize_t v = get_xattr(w, w->xnames + off);
        if (v == -1) continue;
        if (v < -1) return -w->err->code;
        xbytes += 8 + strlen(w->xnames + off) + (size_t)v;
    }
    size_t fixed = 4 + 4 + 4 * 4 + 8 * 2 + 4 + 4 * 2 + 8 * 2 + 4 * 4;
    size_t reclen = fixed + rel_len + link_len + xbytes;
    int r = wb_reserve(&w->out, reclen, w->err);
    if (r < 0) return r;
    size_t start = w->out.len;
    put32(&w->out, 0);                      /* reclen, patched below */
    unsigned char head[4] = {(unsigned char)type_char(st->st_mode), 0, 0, 0};
    put(&w->out, head, 4);
    put32(&w->out, (uint32_t)(st->st_mode & 07777));
    put32(&w->out, (uint32_t)st->st_uid);
    put32(&w->out, (uint32_t)st->st_gid);
    put32(&w->out, (uint32_t)st->st_nlink);
    put64(&w->out, S_ISREG(st->st_mode) ? (uint64_t)st->st_size : 0);
    put64(&w->out, (uint64_t)(int64_t)st->st_mtim.tv_sec);
    put32(&w->out, (uint32_t)st->st_mtim.tv_nsec);
    put32(&w->out, major(st->st_rdev));
    put32(&w->out, minor(st->st_rdev));
    put64(&w->out, (uint64_t)st->st_dev);
    put64(&w->out, (uint64_t)st->st_ino);
    put32(&w->out, (uint32_t)rel_len);
    put32(&w->out, (uint32_t)link_len);
    size_t nx_at = w->out.len;
    put32(&w->out, 0);                      /* nxattrs, patched below */
    put32(&w->out, 0);                      /* reserved */
    put(&w->out, rel, rel_len);
    put(&w->out, link, link_len);
    for (ssize_t off = 0; off < xlen; off += (ssize_t)strlen(w->xnames + off) + 1) {
        const char *name = w->xnames + off;
        ssize_t v = get_xattr(w, name);
        if (v == -1) continue;
        if (v < -1) return -w->err->code;
        size_t nl = strlen(name);
        if (w->out.len + 8 + nl + (size_t)v > start + reclen) break;   /* grew meanwhile */
        put32(&w->out, (uint32_t)nl);
        put32(&w->out, (uint32_t)v);
        put(&w->out, name, nl);
        put(&w->out, w->xval, (size_t)v);
        nx++;
    }
    uint32_t len = (uint32_t)(w->out.len - start - 4);
    memcpy(w->out.p + start, &len, 4);
    memcpy(w->out.p + nx_at, &nx, 4);
    if (w->cmp && S_ISREG(st->st_mode) && w->rfd != -2)
        return cmp_offer(w->cmp, rel, w->rfd, w->name, st, w->err);
    return 0;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Sorted names of the directory at w->path (without "." and ".."). */
static int read_names(walker *w, int dfd, char ***out, size_t *count)
{
    *out = NULL;
    *count = 0;
    DIR *d = NULL;
    if (dfd >= 0) {
        int fd = fcntl(dfd, F_DUPFD_CLOEXEC, 0);
        if (fd >= 0 && !(d = fdopendir(fd))) close(fd);
    }
    if (!d) d = opendir(w->path);
    if (!d) {
        if (errno == ENOENT || errno == ENOTDIR) return 0;
        return lfs_fail(w->err, errno, -1, w->path, NULL, "opening directory");
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno) rc = lfs_fail(w->err, errno, -1, w->path, NULL, "reading directory");
            break;
        }
        const char *nm = de->d_name;
        if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0))) continue;
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 32;
            char **q = realloc(names, nc * sizeof *q);
            if (!q) { rc = lfs_fail(w->err, ENOMEM, -1, w->path, NULL, "out of memory"); break; }
            names = q;
            cap = nc;
        }
        names[n] = strdup(nm);
        if (!names[n]) { rc = lfs_fail(w->err, ENOMEM, -1, w->path, NULL, "out of memory"); break; }
        n++;
    }
    closedir(d);
    if (rc < 0) {
        for (size_t i = 0; i < n; i++) free(names[i]);
        free(names);
        return rc;
    }
    if (n > 1) qsort(names, n, sizeof *names, cmp_names);
    *out = names;
    *count = n;
    return 0;
}

/* The directory at path (O_PATH would do for the *at calls, but the names
 * are read from it too); -1 with errno when it cannot be opened. */
static int open_dir(const char *path)
{
    return open(*path ? path : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
}

static const char *cmp_ref_root(struct comparer *c, size_t *len);

/* lfs_walk_compare: the directory under the reference root at the walked
 * directory's relative path (w->path): an fd, -1 (use paths) or -2 (none). */
static int open_ref_dir(walker *w)
{
    if (!w->cmp) return -1;
    size_t rl;
    const char *ref = cmp_ref_root(w->cmp, &rl);
    const char *rel = w->path + w->root_len;
    size_t n = strlen(rel);
    char buf[PATH_MAX];
    if (rl + n + 1 >= sizeof buf) return -1;
    memcpy(buf, ref, rl);
    memcpy(buf + rl, rel, n + 1);
    int fd = open_dir(buf);
    if (fd >= 0) return fd;
    return errno == ENOENT || errno == ENOTDIR ? -2 : -1;
}

static void close_fd(int *fd)
{
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* The entries of the directory at w->path, and below.  Entries are looked at
 * relative to the directory's fd (no path walk per entry); the fd is closed
 * while a subdirectory is walked and opened again after it, so a walk holds
 * two fds at most whatever the depth. */
static int walk_dir(walker *w)
{
    int dfd = open_dir(w->path);
    if (dfd < 0 && (errno == ENOENT || errno == ENOTDIR)) return 0;   /* gone */
    int rfd = open_ref_dir(w);
    char **names;
    size_t n;
    int rc = read_names(w, dfd, &names, &n);
    if (rc < 0) {
        close_fd(&dfd);
        if (rfd >= 0) close(rfd);
        return rc;
    }
    size_t base = strlen(w->path);
    for (size_t i = 0; i < n && rc >= 0; i++) {
        size_t nl = strlen(names[i]);
        if (base + 1 + nl >= sizeof w->path) {
            rc = lfs_fail(w->err, ENAMETOOLONG, -1, w->path, names[i], "path too long");
            break;
        }
        w->path[base] = '/';
        memcpy(w->path + base + 1, names[i], nl + 1);
        struct stat st;
        int sr = dfd >= 0 ? fstatat(dfd, names[i], &st, AT_SYMLINK_NOFOLLOW)
                          : lstat(w->path, &st);
        if (sr < 0) {
            if (errno == ENOENT) continue;          /* gone since readdir */
            rc = lfs_fail(w->err, errno, -1, w->path, NULL, "lstat");
            break;
        }
        w->dfd = dfd;
        w->name = names[i];
        w->rfd = rfd;
        int e = emit_entry(w, &st);
        w->dfd = -1;
        if (e < 0) { rc = e; break; }
        if (e == 0 && S_ISDIR(st.st_mode)) {
            close_fd(&dfd);
            if (rfd >= 0) close(rfd);
            rc = walk_dir(w);
            w->path[base + 1 + nl] = 0;              /* back to this entry's path */
            w->path[base] = 0;
            dfd = open_dir(w->path);                 /* -1: by path from here on */
            rfd = open_ref_dir(w);
            w->path[base] = '/';
        }
    }
    w->path[base] = 0;
    close_fd(&dfd);
    if (rfd >= 0) close(rfd);
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    return rc;
}

/* Walk the tree at root into w (set up by the caller: err, out, cmp). */
static int walk_tree(walker *w, const char *root)
{
    lfs_error *err = w->err;
    size_t rl = strlen(root);
    while (rl > 1 && root[rl - 1] == '/') rl--;
    if (rl >= sizeof w->path - 1) return lfs_fail(err, ENAMETOOLONG, -1, root, NULL, "path too long");
    memcpy(w->path, root, rl);
    w->path[rl] = 0;
    if (rl == 1 && root[0] == '/') w->path[0] = 0, rl = 0;   /* "/" walks as "" + "/name" */
    w->root_len = rl;
    w->xnames_cap = 1024;
    w->xnames = malloc(w->xnames_cap);
    w->xval_cap = 1024;
    w->xval = malloc(w->xval_cap);
    if (!w->xnames || !w->xval) return lfs_fail(err, ENOMEM, -1, root, NULL, "out of memory");
    struct stat st;
    if (lstat(rl ? w->path : "/", &st) < 0) return lfs_fail(err, errno, -1, root, NULL, "lstat");
    if (!S_ISDIR(st.st_mode)) return lfs_fail(err, ENOTDIR, -1, root, NULL, "not a directory");
    int rc;
    w->dfd = -1;
    w->rfd = -2;                                     /* the roots are not compared */
    if (rl == 0) {                                   /* the root "/" itself */
        w->path[0] = '/', w->path[1] = 0;
        rc = emit_entry(w, &st);
        w->path[0] = 0;
    } else {
        rc = emit_entry(w, &st);
    }
    if (rc >= 0) rc = walk_dir(w);
    if (rc >= 0) rc = wb_flush(&w->out, err);
    return rc;
}

int lfs_walk(const char *root, int out_fd, int flags, lfs_error *err)
{
    walker w;
    memset(&w, 0, sizeof w);
    w.err = err;
    w.out.fd = out_fd;
    w.out.cap = 1 << 16;
    w.out.p = malloc(w.out.cap);
    int rc = w.out.p ? walk_tree(&w, root) : lfs_fail(err, ENOMEM, -1, root, NULL, "out of memory");
    free(w.out.p);
    free(w.xnames);
    free(w.xval);
    (void)flags;
    return rc < 0 ? rc : 0;
}

/* ---------------------------------------------------------------- comparing files */

#define EQ_CHUNK (256 * 1024)
#define EQ_MAX_THREADS 16

typedef struct eq_job {
    const char **a;
    const char **b;
    size_t n;
    unsigned char *same;
    atomic_size_t next;
} eq_job;

/* Open dfd/name for reading if it is (still) a regular file: never follows a
 * symlink, never waits on a fifo, never keeps a device open; -1 otherwise. */
static int open_regular_at(int dfd, const char *name)
{
    int fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) return -1;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return -1;
    }
    return fd;
}

static int open_regular(const char *path)
{
    return open_regular_at(AT_FDCWD, path);
}

static ssize_t read_full(int fd, unsigned char *p, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, p + got, n - got);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

/* Whether two open files hold the same bytes, read up to `size` bytes of each
 * (UINT64_MAX: to the end; a size known by lstat spares the read that finds the
 * end); closes both. */
static unsigned char equal_fds(int fa, int fb, uint64_t size, unsigned char *ba,
                               unsigned char *bb)
{
    unsigned char same = 1;
    while (size > 0) {
        size_t want = size > EQ_CHUNK ? EQ_CHUNK : (size_t)size;
        ssize_t ra = read_full(fa, ba, want);
        ssize_t rb = read_full(fb, bb, want);
        if (ra < 0 || rb < 0 || ra != rb || memcmp(ba, bb, (size_t)ra) != 0) {
            same = 0;
            break;
        }
        if ((size_t)ra < want) break;       /* the end (both shrank alike since lstat) */
        size -= (uint64_t)ra;
    }
    close(fa);
    close(fb);
    return same;
}

static unsigned char equal_pair(const char *a, const char *b, unsigned char *ba,
                                unsigned char *bb)
{
    int fa = open_regular(a);
    if (fa < 0) return 0;
    int fb = open_regular(b);
    if (fb < 0) {
        close(fa);
        return 0;
    }
    return equal_fds(fa, fb, UINT64_MAX, ba, bb);
}

static void *eq_worker(void *arg)
{
    eq_job *j = arg;
    unsigned char *ba = malloc(EQ_CHUNK), *bb = malloc(EQ_CHUNK);
    if (!ba || !bb) {
        free(ba);
        free(bb);
        return (void *)1;
    }
    for (;;) {
        size_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n) break;
        j->same[i] = equal_pair(j->a[i], j->b[i], ba, bb);
    }
    free(ba);
    free(bb);
    return NULL;
}

int lfs_files_equal(const char *paths, size_t n, unsigned threads, unsigned char *same,
                    lfs_error *err)
{
    eq_job j;
    j.a = malloc((n ? n : 1) * sizeof *j.a);
    j.b = malloc((n ? n : 1) * sizeof *j.b);
    if (!j.a || !j.b) {
        free(j.a);
        free(j.b);
        return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory comparing files");
    }
    const char *p = paths;
    for (size_t i = 0; i < n; i++) {
        j.a[i] = p;
        p += strlen(p) + 1;
        j.b[i] = p;
        p += strlen(p) + 1;
    }
    j.n = n;
    j.same = same;
    atomic_init(&j.next, 0);
    if (threads == 0) threads = 2;
    if ((size_t)threads > n) threads = n ? (unsigned)n : 1;
    int fail = lfs_run_workers(eq_worker, &j, threads) < 0;
    free(j.a);
    free(j.b);
    if (fail) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory comparing files");
    return 0;
}

/* ---------------------------------------------------------------- walking and comparing */

/* lfs_walk_compare: the walker offers each regular file of the tree; one with
 * a regular file of the same size at the same path under the reference root
 * (not the same inode, not decided by its mtime) becomes a job, and worker
 * threads compare the two while the walk goes on, writing one 'C' record per
 * job to the same pipe (whole batches under out_lock). */

typedef struct cmp_job {
    struct cmp_job *next;
    off_t size;                   /* of both files; -1: sizes differ, only hash them */
    char rel[];
} cmp_job;

typedef struct comparer {
    const char *root, *ref;       /* the walked tree, the reference tree */
    size_t root_len, ref_len;
    int trust_mtime;
    int out_fd;
    pthread_mutex_t out_lock;
    pthread_mutex_t mu;           /* the queue, done, stop, the first worker error */
    pthread_cond_t cv;
    cmp_job *head, *tail;
    int done;                     /* no more jobs will come */
    int stop;                     /* give up: drop the jobs left */
    int rc;                       /* first worker error (err filled) */
    lfs_error err;
} comparer;

/* buf (PATH_MAX) = base + "/" + rel[0..rl) (just base when rl is 0): 0, or -1
 * when it would not fit. */
static int join_path_n(char *buf, const char *base, size_t base_len, const char *rel, size_t rl)
{
    if (base_len + 1 + rl >= PATH_MAX) return -1;
    memcpy(buf, base, base_len);
    size_t n = base_len;
    if (rl) {
        buf[n++] = '/';
        memcpy(buf + n, rel, rl);
        n += rl;
    }
    buf[n] = 0;
    return 0;
}

/* "base/rel" into buf (PATH_MAX); 0, or -1 when too long. */
static int join_path(char *buf, const char *base, size_t base_len, const char *rel)
{
    return join_path_n(buf, base, base_len, rel, strlen(rel));
}

static const char *cmp_ref_root(comparer *c, size_t *len)
{
    *len = c->ref_len;
    return c->ref;
}

static int cmp_offer(comparer *c, const char *rel, int rfd, const char *name,
                     const struct stat *st, lfs_error *err)
{
    char ref[PATH_MAX];
    struct stat rs;
    if (rfd >= 0) {
        if (fstatat(rfd, name, &rs, AT_SYMLINK_NOFOLLOW) < 0) return 0;
    } else {
        if (join_path(ref, c->ref, c->ref_len, rel) < 0 || lstat(ref, &rs) < 0) return 0;
    }
    if (!S_ISREG(rs.st_mode)) return 0;
    off_t size = st->st_size;
    if (rs.st_size != size) {
        size = -1;
    } else {
        if (size == 0 || (rs.st_dev == st->st_dev && rs.st_ino == st->st_ino)) return 0;
        if (c->trust_mtime && rs.st_mtim.tv_sec == st->st_mtim.tv_sec &&
            rs.st_mtim.tv_nsec == st->st_mtim.tv_nsec && st->st_mtim.tv_nsec != 0)
            return 0;
    }
    size_t rl = strlen(rel);
    cmp_job *j = malloc(sizeof *j + rl + 1);
    if (!j) return lfs_fail(err, ENOMEM, -1, rel, NULL, "out of memory");
    j->next = NULL;
    j->size = size;
    memcpy(j->rel, rel, rl + 1);
    pthread_mutex_lock(&c->mu);
    if (c->stop) {                            /* the workers gave up: no one to take it */
        pthread_mutex_unlock(&c->mu);
        free(j);
        return 0;
    }
    if (c->tail) c->tail->next = j;
    else c->head = j;
    c->tail = j;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

/* sha256 of the file at path into out; 0, or -1 when it cannot be read. */
static int hash_path(const char *path, unsigned char *buf, unsigned char out[32])
{
    int fd = open_regular(path);
    if (fd < 0) return -1;
    lfs_sha256 h = {0};
    int r = lfs_sha256_init(&h) < 0 ? -1 : 0;
    while (r == 0) {
        ssize_t n = read(fd, buf, EQ_CHUNK);
        if (n < 0) {
            if (errno == EINTR) continue;
            r = -1;
        } else if (n == 0) {
            break;
        } else {
            lfs_sha256_update(&h, buf, (size_t)n);
        }
    }
    if (r == 0) lfs_sha256_final(&h, out);
    lfs_sha256_free(&h);
    close(fd);
    return r;
}

static void cmp_fail(comparer *c, const lfs_error *e, int rc)
{
    pthread_mutex_lock(&c->mu);
    if (!c->rc) {
        c->rc = rc;
        c->err = *e;
    }
    c->stop = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* A worker's last directory on one side: the jobs come in walk order, so
 * most files are opened relative to it (no path walk from the root). */
typedef struct dir_cache {
    char rel[PATH_MAX];           /* its path relative to the root */
    size_t len;                   /* of rel */
    int fd;                       /* O_PATH, or -1 */
} dir_cache;

static int cached_dir(dir_cache *dc, const char *base, size_t base_len, const char *rel,
                      size_t dlen)
{
    if (dc->fd >= 0 && dc->len == dlen && memcmp(dc->rel, rel, dlen) == 0) return dc->fd;
    if (dc->fd >= 0) close(dc->fd);
    dc->fd = -1;
    char path[PATH_MAX];
    if (join_path_n(path, base, base_len, rel, dlen) < 0) return -1;
    int fd = open(*path ? path : "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    memcpy(dc->rel, rel, dlen);
    dc->len = dlen;
    dc->fd = fd;
    return fd;
}

/* Compare the job's two files, opened relative to the cached directories. */
static unsigned char cmp_job_equal(comparer *c, const cmp_job *j, dir_cache *ca, dir_cache *cb,
                                   unsigned char *ba, unsigned char *bb)
{
    const char *slash = strrchr(j->rel, '/');
    size_t dlen = slash ? (size_t)(slash - j->rel) : 0;
    const char *name = slash ? slash + 1 : j->rel;
    int da = cached_dir(ca, c->ref, c->ref_len, j->rel, dlen);
    int db = cached_dir(cb, c->root, c->root_len, j->rel, dlen);
    if (da < 0 || db < 0) return 0;
    int fa = open_regular_at(da, name);
    if (fa < 0) return 0;
    int fb = open_regular_at(db, name);
    if (fb < 0) {
        close(fa);
        return 0;
    }
    return equal_fds(fa, fb, (uint64_t)j->size, ba, bb);      /* >= 0: see cmp_worker */
}

static void *cmp_worker(void *arg)
{
    comparer *c = arg;
    lfs_error err;
    memset(&err, 0, sizeof err);
    wbuf out = {.fd = c->out_fd, .lock = &c->out_lock, .cap = 1 << 16};
    unsigned char *ba = malloc(EQ_CHUNK), *bb = malloc(EQ_CHUNK);
    out.p = malloc(out.cap);
    char pa[PATH_MAX], pb[PATH_MAX];
    dir_cache *ca = malloc(sizeof *ca), *cb = malloc(sizeof *cb);
    if (ca) ca->fd = -1;
    if (cb) cb->fd = -1;
    int rc = 0;
    if (!ba || !bb || !out.p || !ca || !cb)
        rc = lfs_fail(&err, ENOMEM, -1, NULL, NULL, "out of memory");
    for (;;) {
        pthread_mutex_lock(&c->mu);
        if (rc < 0) c->stop = 1;
        while (!c->head && !c->done && !c->stop) pthread_cond_wait(&c->cv, &c->mu);
        cmp_job *j = c->stop ? NULL : c->head;
        if (j) {
            c->head = j->next;
            if (!c->head) c->tail = NULL;
        }
        pthread_mutex_unlock(&c->mu);
        if (!j) break;
        unsigned char same = 0, has = 0, dig[64];
        if (join_path(pa, c->ref, c->ref_len, j->rel) == 0 &&
            join_path(pb, c->root, c->root_len, j->rel) == 0) {
            same = j->size < 0 ? 0 : cmp_job_equal(c, j, ca, cb, ba, bb);
            if (!same && hash_path(pa, ba, dig) == 0 && hash_path(pb, ba, dig + 32) == 0)
                has = 1;
        }
        size_t rl = strlen(j->rel);
        size_t total = 12 + (has ? 64 : 0) + rl;
        rc = wb_reserve(&out, total, &err);
        if (rc == 0) {
            unsigned char head[4] = {'C', same, has, 0};
            put32(&out, (uint32_t)(total - 4));
            put(&out, head, 4);
            put32(&out, (uint32_t)rl);
            if (has) put(&out, dig, 64);
            put(&out, j->rel, rl);
        }
        free(j);
    }
    if (rc == 0) rc = wb_flush(&out, &err);
    if (rc < 0) cmp_fail(c, &err, rc);
    if (ca && ca->fd >= 0) close(ca->fd);
    if (cb && cb->fd >= 0) close(cb->fd);
    free(ca);
    free(cb);
    free(out.p);
    free(ba);
    free(bb);
    return NULL;
}

int lfs_walk_compare(const char *root, const char *ref_root, int out_fd, int flags,
                     unsigned threads, lfs_error *err)
{
    comparer c;
    memset(&c, 0, sizeof c);
    c.root = root;
    c.root_len = strlen(root);
    while (c.root_len > 1 && root[c.root_len - 1] == '/') c.root_len--;
    c.ref = ref_root;
    c.ref_len = strlen(ref_root);
    while (c.ref_len > 1 && ref_root[c.ref_len - 1] == '/') c.ref_len--;
    if (c.root_len == 1 && root[0] == '/') c.root_len = 0;
    if (c.ref_len == 1 && ref_root[0] == '/') c.ref_len = 0;
    c.trust_mtime = (flags & LFS_WALK_TRUST_MTIME) != 0;
    c.out_fd = out_fd;
    if (pthread_mutex_init(&c.out_lock, NULL) != 0)
        return lfs_fail(err, ENOMEM, -1, root, NULL, "mutex init failed");
    if (pthread_mutex_init(&c.mu, NULL) != 0) {
        pthread_mutex_destroy(&c.out_lock);
        return lfs_fail(err, ENOMEM, -1, root, NULL, "mutex init failed");
    }
    if (pthread_cond_init(&c.cv, NULL) != 0) {
        pthread_mutex_destroy(&c.mu);
        pthread_mutex_destroy(&c.out_lock);
        return lfs_fail(err, ENOMEM, -1, root, NULL, "condition init failed");
    }
    if (threads == 0) threads = 2;
    if (threads > EQ_MAX_THREADS) threads = EQ_MAX_THREADS;
    pthread_t t[EQ_MAX_THREADS];
    unsigned started = 0;
    for (unsigned k = 0; k < threads; k++) {
        if (pthread_create(&t[k], NULL, cmp_worker, &c) != 0) break;
        started++;
    }
    walker w;
    memset(&w, 0, sizeof w);
    w.err = err;
    w.out.fd = out_fd;
    w.out.lock = &c.out_lock;
    w.out.cap = 1 << 16;
    w.out.p = malloc(w.out.cap);
    w.cmp = &c;
    int rc;
    if (!started) rc = lfs_fail(err, EAGAIN, -1, root, NULL, "cannot start a comparing thread");
    else if (!w.out.p) rc = lfs_fail(err, ENOMEM, -1, root, NULL, "out of memory");
    else rc = walk_tree(&w, root);
    pthread_mutex_lock(&c.mu);
    c.done = 1;
    if (rc < 0) c.stop = 1;
    pthread_cond_broadcast(&c.cv);
    pthread_mutex_unlock(&c.mu);
    for (unsigned k = 0; k < started; k++) pthread_join(t[k], NULL);
    while (c.head) {                          /* left by a stop */
        cmp_job *j = c.head;
        c.head = j->next;
        free(j);
    }
    if (rc >= 0 && c.rc < 0) {
        *err = c.err;
        rc = c.rc;
    }
    free(w.out.p);
    free(w.xnames);
    free(w.xval);
    pthread_cond_destroy(&c.cv);
    pthread_mutex_destroy(&c.mu);
    pthread_mutex_destroy(&c.out_lock);
    return rc < 0 ? rc : 0;
}
