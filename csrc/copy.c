/*
 * Copying files and trees: lfs_copy_file, lfs_copy_tree.
 *
 * A regular file is cloned (FICLONE) when the filesystem can, else its data
 * segments are copied with copy_file_range (holes stay holes), else with
 * sendfile or read/write.  Then owner, mode, xattrs and times, in that order
 * (chown clears set-id bits and file capabilities, so they come after it).
 *
 * lfs_copy_tree walks with directory fds (openat O_NOFOLLOW), keeps hardlinks,
 * and sets a directory's metadata after its children.  The content of regular
 * files is copied by a second thread while the walk creates the next entries.
 */
#include "internal.h"
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <linux/fs.h>

#define COPY_BUF (1u << 20)         /* read/write fallback buffer */
#define OPEN_DEPTH 32               /* directory levels whose fds stay open */
#define DENTS_BUF 65536
#define QUEUE_LEN 64                /* regular files waiting for the content thread */
#define WAKE_BATCH 8                /* queued files that wake the idle content thread */

/* ------------------------------------------------------------ copy context */

typedef struct cctx {
    int flags;
    lfs_error *err;
    lfs_copy_stats st;
    int reflink;                  /* 0 after FICLONE said "not here" */
    int cfr;                      /* 0 after copy_file_range said "not here" */
    int sendfile;                 /* 0 after sendfile said "not here" */
    char *buf;                    /* read/write buffer, allocated on first use */
    lfs_strbuf xlist, xval;
    char *linkbuf;                /* LFS_PATH_MAX + 1 */
} cctx;

static void ctx_init(cctx *c, int flags, lfs_error *err)
{
    memset(c, 0, sizeof *c);
    c->flags = flags;
    c->err = err;
    c->reflink = !(flags & LFS_COPY_NO_REFLINK);
    c->cfr = c->reflink;          /* copy_file_range clones too on XFS and btrfs */
    c->sendfile = 1;
}

static void ctx_free(cctx *c)
{
    free(c->buf);
    free(c->linkbuf);
    lfs_sb_free(&c->xlist);
    lfs_sb_free(&c->xval);
}

static int fail_errno(cctx *c, int e, const char *path, const char *what)
{
    return lfs_fail(c->err, e, -1, path, NULL, "%s: %s", what, strerror(e));
}

/* ------------------------------------------------------------ data */

static int is_unsupported(int e)
{
    return e == EXDEV || e == ENOSYS || e == EINVAL || e == EOPNOTSUPP || e == ENOTTY ||
           e == EBADF || e == EPERM;
}

/* Copy [off, off+len) from sfd to dfd.  Returns 0, or <0; stops early at EOF. */
static int copy_range(cctx *c, int sfd, int dfd, int64_t off, int64_t len, const char *path)
{
    while (len > 0) {
        size_t want = len > (int64_t)(1 << 30) ? (size_t)1 << 30 : (size_t)len;
        ssize_t n;
        if (c->cfr) {
            loff_t in = off, out = off;
            n = copy_file_range(sfd, &in, dfd, &out, want, 0);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (is_unsupported(errno)) { c->cfr = 0; continue; }
                return fail_errno(c, errno, path, "copying data");
            }
        } else if (c->sendfile) {
            if (lseek(dfd, off, SEEK_SET) < 0) return fail_errno(c, errno, path, "seeking");
            off_t in = off;
            n = sendfile(dfd, sfd, &in, want);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (is_unsupported(errno)) { c->sendfile = 0; continue; }
                return fail_errno(c, errno, path, "copying data");
            }
        } else {
            if (!c->buf && !(c->buf = malloc(COPY_BUF)))
                return lfs_fail(c->err, ENOMEM, -1, path, NULL, "out of memory");
            if (want > COPY_BUF) want = COPY_BUF;
            n = pread(sfd, c->buf, want, off);
            if (n < 0) {
                if (errno == EINTR) continue;
                return fail_errno(c, errno, path, "reading");
            }
            for (ssize_t done = 0; done < n;) {
                ssize_t w = pwrite(dfd, c->buf + done, (size_t)(n - done), off + done);
                if (w < 0) {
                    if (errno == EINTR) continue;
                    return fail_errno(c, errno, path, "writing");
                }
                done += w;
            }
        }
        if (n == 0) break;        /* the source got shorter */
        off += n;
        len -= n;
        c->st.bytes += (uint64_t)n;
    }
    return 0;
}

static int copy_data(cctx *c, int sfd, int dfd, const struct stat *st, const char *path)
{
    int64_t size = st->st_size;
    if (size == 0) return 0;
    if (c->reflink) {
        if (ioctl(dfd, FICLONE, sfd) == 0) {
            c->st.reflinked++;
            c->st.bytes += (uint64_t)size;
            return 0;
        }
        if (is_unsupported(errno)) c->reflink = 0;
    }
    /* st_blocks cannot rule holes out (an xattr block or extent-tree blocks
     * count too); where it has room for all the data, one SEEK_HOLE tells. */
    if ((int64_t)st->st_blocks * 512 >= size) {
        off_t h = lseek(sfd, 0, SEEK_HOLE);
        if (h < 0 || h >= size) return copy_range(c, sfd, dfd, 0, size, path);
    }

    /* Holes: copy the data segments only, then set the size for a trailing hole. */
    int64_t pos = 0;
    while (pos < size) {
        off_t d = lseek(sfd, pos, SEEK_DATA);
        if (d < 0) {
            if (errno == ENXIO) break;
            if (errno == EINVAL || errno == EOPNOTSUPP) return copy_range(c, sfd, dfd, pos, size - pos, path);
            return fail_errno(c, errno, path, "finding data");
        }
        if (d >= size) break;
        off_t h = lseek(sfd, d, SEEK_HOLE);
        if (h < 0) return fail_errno(c, errno, path, "finding holes");
        if (h > size) h = size;
        int rc = copy_range(c, sfd, dfd, d, h - d, path);
        if (rc < 0) return rc;
        pos = h;
    }
    if (ftruncate(dfd, size) < 0) return fail_errno(c, errno, path, "setting the size");
    return 0;
}

/* ------------------------------------------------------------ metadata */

static void proc_path(char *out, size_t cap, int dirfd, const char *name)
{
    snprintf(out, cap, "/proc/self/fd/%d/%s", dirfd, name);
}

/* Copy every xattr from (sfd | spath) to (dfd | dpath). */
static int copy_xattrs(cctx *c, int sfd, const char *spath, int dfd, const char *dpath,
                       const char *path)
{
    ssize_t n;
    for (;;) {
        if (lfs_sb_reserve(&c->xlist, 4096) < 0) return lfs_fail(c->err, ENOMEM, -1, path, NULL, "out of memory");
        size_t cap = c->xlist.cap - 1;
        n = sfd >= 0 ? flistxattr(sfd, c->xlist.p, cap) : llistxattr(spath, c->xlist.p, cap);
        if (n >= 0) break;
        if (errno == ENOTSUP) return 0;
        if (errno != ERANGE) return fail_errno(c, errno, path, "listing xattrs");
        n = sfd >= 0 ? flistxattr(sfd, NULL, 0) : llistxattr(spath, NULL, 0);
        if (n < 0) return fail_errno(c, errno, path, "listing xattrs");
        if (lfs_sb_reserve(&c->xlist, (size_t)n + 1) < 0) return lfs_fail(c->err, ENOMEM, -1, path, NULL, "out of memory");
    }
    for (size_t i = 0; i < (size_t)n;) {
        const char *name = c->xlist.p + i;
        size_t l = strnlen(name, (size_t)n - i);
        i += l + 1;
        if (!l) continue;
        ssize_t v;
        for (;;) {
            if (lfs_sb_reserve(&c->xval, 4096) < 0) return lfs_fail(c->err, ENOMEM, -1, path, NULL, "out of memory");
            size_t cap = c->xval.cap - 1;
            v = sfd >= 0 ? fgetxattr(sfd, name, c->xval.p, cap) : lgetxattr(spath, name, c->xval.p, cap);
            if (v >= 0 || errno != ERANGE) break;
            v = sfd >= 0 ? fgetxattr(sfd, name, NULL, 0) : lgetxattr(spath, name, NULL, 0);
            if (v < 0) break;
            if (lfs_sb_reserve(&c->xval, (size_t)v + 1) < 0) return lfs_fail(c->err, ENOMEM, -1, path, NULL, "out of memory");
        }
        if (v < 0) {
            if (errno == ENODATA) continue;
            return lfs_fail(c->err, errno, -1, path, NULL, "reading xattr %s: %s", name, strerror(errno));
        }
        int r = dfd >= 0 ? fsetxattr(dfd, name, c->xval.p, (size_t)v, 0)
                         : lsetxattr(dpath, name, c->xval.p, (size_t)v, 0);
        if (r < 0) return lfs_fail(c->err, errno, -1, path, NULL, "setting xattr %s: %s", name, strerror(errno));
    }
    return 0;
}

/* Owner, mode, xattrs, times of an open destination (regular file or directory);
 * cur: the destination's current stat, to skip a chown or chmod that changes nothing. */
static int meta_fd(cctx *c, int sfd, int dfd, const struct stat *st, const struct stat *cur,
                   const char *path)
{
    int chown_needed = !(c->flags & LFS_COPY_NO_OWNER) &&
                       (!cur || cur->st_uid != st->st_uid || cur->st_gid != st->st_gid);
    if (chown_needed && fchown(dfd, st->st_uid, st->st_gid) < 0)
        return fail_errno(c, errno, path, "chown");
    /* chown may have cleared set-id bits: then chmod regardless. */
    if ((chown_needed || !cur || (cur->st_mode & 07777) != (st->st_mode & 07777)) &&
        fchmod(dfd, st->st_mode & 07777) < 0)
        return fail_errno(c, errno, path, "chmod");
    if (!(c->flags & LFS_COPY_NO_XATTRS)) {
        int rc = copy_xattrs(c, sfd, NULL, dfd, NULL, path);
        if (rc < 0) return rc;
    }
    struct timespec ts[2] = { st->st_atim, st->st_mtim };
    if (futimens(dfd, ts) < 0) return fail_errno(c, errno, path, "setting times");
    return 0;
}

/* The same for a node without an fd (symlink, device, fifo, socket). */
static int meta_at(cctx *c, int sdir, const char *sname, int ddir, const char *dname,
                   const struct stat *st, const char *path)
{
    if (!(c->flags & LFS_COPY_NO_OWNER) &&
        fchownat(ddir, dname, st->st_uid, st->st_gid, AT_SYMLINK_NOFOLLOW) < 0)
        return fail_errno(c, errno, path, "chown");
    if (!S_ISLNK(st->st_mode) && fchmodat(ddir, dname, st->st_mode & 07777, 0) < 0)
        return fail_errno(c, errno, path, "chmod");
    if (!(c->flags & LFS_COPY_NO_XATTRS)) {
        char sp[64 + LFS_PATH_MAX], dp[64 + LFS_PATH_MAX];
        proc_path(sp, sizeof sp, sdir, sname);
        proc_path(dp, sizeof dp, ddir, dname);
        int rc = copy_xattrs(c, -1, sp, -1, dp, path);
        if (rc < 0) return rc;
    }
    struct timespec ts[2] = { st->st_atim, st->st_mtim };
    if (utimensat(ddir, dname, ts, AT_SYMLINK_NOFOLLOW) < 0) return fail_errno(c, errno, path, "setting times");
    return 0;
}

/* Content then metadata of a regular file; closes nothing. */
static int finish_regular(cctx *c, int sfd, int dfd, const struct stat *st, const char *path)
{
    int rc = copy_data(c, sfd, dfd, st, path);
    if (rc < 0) return rc;
    struct stat cur;
    if (fstat(dfd, &cur) < 0) return fail_errno(c, errno, path, "stat");
    return meta_fd(c, sfd, dfd, st, &cur, path);
}

/* A non-directory, non-regular node. */
static int copy_special(cctx *c, int sdir, const char *sname, int ddir, const char *dname,
                        const struct stat *st, const char *path, const char *dpath)
{
    if (S_ISLNK(st->st_mode)) {
        if (!c->linkbuf && !(c->linkbuf = malloc(LFS_PATH_MAX + 1)))
            return lfs_fail(c->err, ENOMEM, -1, path, NULL, "out of memory");
        ssize_t n = readlinkat(sdir, sname, c->linkbuf, LFS_PATH_MAX + 1);
        if (n < 0) return fail_errno(c, errno, path, "readlink");
        if (n > LFS_PATH_MAX) return lfs_fail(c->err, ENAMETOOLONG, -1, path, NULL, "symlink target too long");
        c->linkbuf[n] = 0;
        if (symlinkat(c->linkbuf, ddir, dname) < 0) return fail_errno(c, errno, dpath, "creating the symlink");
    } else if (S_ISCHR(st->st_mode) || S_ISBLK(st->st_mode) || S_ISFIFO(st->st_mode) ||
               S_ISSOCK(st->st_mode)) {
        if (mknodat(ddir, dname, (st->st_mode & S_IFMT) | 0600, st->st_rdev) < 0)
            return fail_errno(c, errno, dpath, "creating the node");
    } else {
        return lfs_fail(c->err, EINVAL, -1, path, NULL, "unknown file type");
    }
    c->st.files++;
    return meta_at(c, sdir, sname, ddir, dname, st, path);
}

static int open_src_regular(cctx *c, int sdir, const char *sname, const struct stat *st,
                            const char *path)
{
    int fd = openat(sdir, sname, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) return fail_errno(c, errno, path, "opening");
    struct stat fst;
    if (fstat(fd, &fst) < 0) {
        int e = errno;
        close(fd);
        return fail_errno(c, e, path, "stat");
    }
    if (!S_ISREG(fst.st_mode) || fst.st_ino != st->st_ino || fst.st_dev != st->st_dev) {
        close(fd);
        return lfs_fail(c->err, EAGAIN, -1, path, NULL, "the file was replaced while it was being copied");
    }
    return fd;
}

static int create_dst(cctx *c, int ddir, const char *dname, const struct stat *st, const char *epath)
{
    int fd = openat(ddir, dname, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                    st->st_mode & 0777);
    if (fd < 0) return fail_errno(c, errno, epath, "creating the copy");
    return fd;
}

/* ------------------------------------------------------------ lfs_copy_file */

int lfs_copy_file(int src_dirfd, const char *src, int dst_dirfd, const char *dst,
                  int flags, lfs_copy_stats *stats, lfs_error *err)
{
    cctx c;
    ctx_init(&c, flags, err);
    struct stat st;
    int rc;
    if (fstatat(src_dirfd, src, &st, AT_SYMLINK_NOFOLLOW) < 0) {
        rc = fail_errno(&c, errno, src, "stat");
        goto out;
    }
    if (S_ISDIR(st.st_mode)) {
        rc = lfs_fail(err, EISDIR, -1, src, NULL, "is a directory (use lfs_copy_tree)");
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = copy_special(&c, src_dirfd, src, dst_dirfd, dst, &st, src, dst);
        goto out;
    }
    int sfd = open_src_regular(&c, src_dirfd, src, &st, src);
    if (sfd < 0) { rc = sfd; goto out; }
    int dfd = create_dst(&c, dst_dirfd, dst, &st, dst);
    if (dfd < 0) {
        close(sfd);
        rc = dfd;
        goto out;
    }
    c.st.files++;
    rc = finish_regular(&c, sfd, dfd, &st, src);
    close(sfd);
    if (close(dfd) < 0 && rc == 0) rc = fail_errno(&c, errno, dst, "closing");
    if (rc < 0) unlinkat(dst_dirfd, dst, 0);
out:
    if (stats) *stats = c.st;
    ctx_free(&c);
    return rc;
}

/* ------------------------------------------------------------ content thread
 *
 * The walk (producer) creates each destination file and queues it; the content
 * thread (consumer) copies the data and sets the metadata.  The queue is a
 * single-producer single-consumer ring: head and tail are atomics, and the
 * mutex is taken only for the content thread to sleep or to be woken.  It
 * sets consumer_waiting and re-checks the tail under the mutex; the walk
 * publishes the tail first and then reads the flag (both seq_cst), so a
 * wake-up is never lost.  The walk never waits: when the ring is full it
 * copies the file itself.
 */

typedef struct job {
    int sfd, dfd;
    struct stat st;
    lfs_strbuf path;
} job;

typedef struct worker {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv_work;
    job ring[QUEUE_LEN];
    _Atomic size_t head;          /* next job the consumer takes */
    _Atomic size_t tail;          /* next free slot of the producer */
    _Atomic int consumer_waiting;
    _Atomic int stop;             /* no more jobs */
    _Atomic int abort;            /* skip the remaining jobs' content, just close them */
    _Atomic int failed;
    lfs_error err;
    cctx c;
} worker;

static void wake(worker *w, pthread_cond_t *cv)
{
    pthread_mutex_lock(&w->mu);
    pthread_cond_signal(cv);
    pthread_mutex_unlock(&w->mu);
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    for (;;) {
        size_t head = atomic_load(&w->head);
        if (head == atomic_load(&w->tail)) {
            if (atomic_load(&w->stop) && head == atomic_load(&w->tail)) break;
            pthread_mutex_lock(&w->mu);
            atomic_store(&w->consumer_waiting, 1);
            while (head == atomic_load(&w->tail) && !atomic_load(&w->stop))
                pthread_cond_wait(&w->cv_work, &w->mu);
            atomic_store(&w->consumer_waiting, 0);
            pthread_mutex_unlock(&w->mu);
            continue;
        }
        job *j = &w->ring[head % QUEUE_LEN];
        int skip = atomic_load(&w->failed) || atomic_load(&w->abort);
        int rc = 0;
        if (!skip) rc = finish_regular(&w->c, j->sfd, j->dfd, &j->st, j->path.p);
        close(j->sfd);
        if (close(j->dfd) < 0 && !skip && rc == 0) rc = fail_errno(&w->c, errno, j->path.p, "closing");
        if (rc < 0) atomic_store(&w->failed, 1);
        atomic_store(&w->head, head + 1);
    }
    return NULL;
}

static int worker_start(worker *w, int flags)
{
    memset(w, 0, sizeof *w);
    w->err.offset = -1;
    ctx_init(&w->c, flags, &w->err);
    if (pthread_mutex_init(&w->mu, NULL) != 0) return -1;
    if (pthread_cond_init(&w->cv_work, NULL) != 0) {
        pthread_mutex_destroy(&w->mu);
        return -1;
    }
    if (pthread_create(&w->th, NULL, worker_main, w) != 0) {
        pthread_cond_destroy(&w->cv_work);
        pthread_mutex_destroy(&w->mu);
        return -1;
    }
    return 0;
}

/* Queue a file: 0 queued (the fds are the thread's now), 1 the queue is full
 * (nothing taken: copy it here), <0 the thread failed (fds closed). */
static int worker_push(worker *w, int sfd, int dfd, const struct stat *st, const char *path, size_t plen)
{
    if (atomic_load(&w->failed)) {
        close(sfd);
        close(dfd);
        return -1;
    }
    size_t tail = atomic_load(&w->tail);
    if (tail - atomic_load(&w->head) == QUEUE_LEN) {
        /* Full: the walk copies this one itself rather than wait (on a busy
         * machine the content thread may not get a CPU for a while). */
        if (atomic_load(&w->consumer_waiting)) wake(w, &w->cv_work);
        return 1;
    }
    job *slot = &w->ring[tail % QUEUE_LEN];
    slot->path.len = 0;
    if (lfs_sb_append(&slot->path, path, plen) < 0) {
        close(sfd);
        close(dfd);
        return -ENOMEM;
    }
    slot->sfd = sfd;
    slot->dfd = dfd;
    slot->st = *st;
    atomic_store(&w->tail, tail + 1);
    /* Wake an idle content thread once a few files are queued (or a big one):
     * a wake-up per small file costs more than it saves. */
    if (atomic_load(&w->consumer_waiting) &&
        (tail + 1 - atomic_load(&w->head) >= WAKE_BATCH || st->st_size >= (1 << 20)))
        wake(w, &w->cv_work);
    return 0;
}

/* Wait for the queued files; abort: skip their content.  Returns 0 or -1 (failed). */
static int worker_stop(worker *w, int abort)
{
    if (abort) atomic_store(&w->abort, 1);
    atomic_store(&w->stop, 1);
    wake(w, &w->cv_work);
    pthread_join(w->th, NULL);
    for (size_t i = 0; i < QUEUE_LEN; i++) lfs_sb_free(&w->ring[i].path);
    pthread_cond_destroy(&w->cv_work);
    pthread_mutex_destroy(&w->mu);
    ctx_free(&w->c);
    return atomic_load(&w->failed) ? -1 : 0;
}

/* ------------------------------------------------------------ lfs_copy_tree */

/* The new top directory may have inherited POSIX ACLs from a default ACL of the
 * directory it was made in; drop them so that the copies get exactly the
 * source's modes (the source's own ACLs are copied with its xattrs). */
static int drop_inherited_acls(int fd, lfs_error *err, const char *path)
{
    static const char *names[] = { "system.posix_acl_default", "system.posix_acl_access" };
    for (size_t i = 0; i < 2; i++) {
        if (fremovexattr(fd, names[i]) < 0 && errno != ENODATA && errno != EOPNOTSUPP)
            return lfs_fail(err, errno, -1, path, NULL, "removing the inherited %s: %s",
                            names[i], strerror(errno));
    }
    return 0;
}

typedef struct dname {
    char *name;
    unsigned char type;           /* DT_* from getdents */
} dname;

typedef struct frame {
    int sfd, dfd;                 /* -1 while closed to bound fd use */
    struct stat st;               /* the source directory (metadata applied at the end) */
    struct stat dst;              /* identity of the destination directory */
    char *arena;
    dname *names;
    size_t n, i;
    size_t spathlen;              /* length of "src/.../dir" in the source path */
    size_t dpathlen;              /* length of "dir/" in the destination-relative path */
} frame;

typedef struct tree {
    cctx c;
    worker w;
    int threaded;
    int droot;                    /* fd of the destination root */
    lfs_hl_map links;
    lfs_strbuf spath;                 /* source path (for errors) */
    lfs_strbuf dpath;                 /* destination path relative to droot (for hardlinks) */
    char *dents;
} tree;

static int read_names(tree *t, int fd, frame *f)
{
    lfs_strbuf ar = {0};
    size_t count = 0;
    for (;;) {
        ssize_t n = getdents64(fd, t->dents, DENTS_BUF);
        if (n < 0) {
            int e = errno;
            lfs_sb_free(&ar);
            return fail_errno(&t->c, e, t->spath.p, "reading the directory");
        }
        if (n == 0) break;
        for (ssize_t off = 0; off < n;) {
            struct dirent64 *d = (struct dirent64 *)(t->dents + off);
            off += d->d_reclen;
            const char *nm = d->d_name;
            if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0))) continue;
            unsigned char ty = d->d_type;
            if (lfs_sb_append(&ar, &ty, 1) < 0 || lfs_sb_append(&ar, nm, strlen(nm) + 1) < 0) {
                lfs_sb_free(&ar);
                return lfs_fail(t->c.err, ENOMEM, -1, t->spath.p, NULL, "out of memory");
            }
            count++;
        }
    }
    dname *names = malloc((count ? count : 1) * sizeof *names);
    if (!names) {
        lfs_sb_free(&ar);
        return lfs_fail(t->c.err, ENOMEM, -1, t->spath.p, NULL, "out of memory");
    }
    size_t off = 0;
    for (size_t k = 0; k < count; k++) {
        names[k].type = (unsigned char)ar.p[off];
        names[k].name = ar.p + off + 1;
        off += strlen(ar.p + off + 1) + 2;
    }
    f->arena = ar.p;
    f->names = names;
    f->n = count;
    f->i = 0;
    return 0;
}

static void frame_free(frame *f)
{
    free(f->arena);
    free(f->names);
    f->arena = NULL;
    f->names = NULL;
    if (f->sfd >= 0) close(f->sfd);
    if (f->dfd >= 0) close(f->dfd);
    f->sfd = f->dfd = -1;
}

/* Reopen a closed parent frame p through "..", checking it is the same directory. */
static int reopen_parent(tree *t, frame *child, frame *p)
{
    struct stat a, b;
    int s = openat(child->sfd, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (s < 0) return fail_errno(&t->c, errno, t->spath.p, "reopening the directory");
    int d = openat(child->dfd, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d < 0) {
        int e = errno;
        close(s);
        return fail_errno(&t->c, e, t->spath.p, "reopening the directory");
    }
    if (fstat(s, &a) < 0 || fstat(d, &b) < 0 || a.st_ino != p->st.st_ino || a.st_dev != p->st.st_dev ||
        b.st_ino != p->dst.st_ino || b.st_dev != p->dst.st_dev) {
        close(s);
        close(d);
        return lfs_fail(t->c.err, EAGAIN, -1, t->spath.p, NULL, "directory moved while it was being copied");
    }
    p->sfd = s;
    p->dfd = d;
    return 0;
}

/* Set the path buffers to the entry name inside frame f. */
static int set_paths(tree *t, const frame *f, const char *name)
{
    size_t l = strlen(name);
    lfs_sb_truncate(&t->spath, f->spathlen);
    lfs_sb_truncate(&t->dpath, f->dpathlen);
    if (lfs_sb_append(&t->spath, "/", 1) < 0 || lfs_sb_append(&t->spath, name, l) < 0 ||
        lfs_sb_append(&t->dpath, name, l) < 0)
        return lfs_fail(t->c.err, ENOMEM, -1, name, NULL, "out of memory");
    return 0;
}

/* Copy one regular file of the tree (content maybe on the other thread). */
static int tree_regular(tree *t, frame *f, const char *name, int sfd, const struct stat *st)
{
    int dfd = create_dst(&t->c, f->dfd, name, st, t->spath.p);
    if (dfd < 0) {
        close(sfd);
        return dfd;
    }
    t->c.st.files++;
    if (st->st_nlink > 1 && lfs_hl_add(&t->links, st->st_dev, st->st_ino, t->dpath.p) < 0) {
        close(sfd);
        close(dfd);
        return lfs_fail(t->c.err, ENOMEM, -1, t->spath.p, NULL, "out of memory");
    }
    if (t->threaded && st->st_size > 0) {
        int rc = worker_push(&t->w, sfd, dfd, st, t->spath.p, t->spath.len);
        if (rc == -ENOMEM) return lfs_fail(t->c.err, ENOMEM, -1, t->spath.p, NULL, "out of memory");
        if (rc < 0) return -ECANCELED;    /* the content thread failed: its error is reported */
        if (rc == 0) return 0;
    }
    int rc = finish_regular(&t->c, sfd, dfd, st, t->spath.p);
    close(sfd);
    if (close(dfd) < 0 && rc == 0) rc = fail_errno(&t->c, errno, t->spath.p, "closing");
    return rc;
}

static int walk_copy(tree *t, int s0, int d0, const struct stat *st0)
{
    frame *fr = calloc(16, sizeof *fr);
    size_t nf = 0, cap = 16;
    int rc = 0;
    if (!fr) {
        close(s0);
        close(d0);
        return lfs_fail(t->c.err, ENOMEM, -1, t->spath.p, NULL, "out of memory");
    }
    fr[0].sfd = s0;
    fr[0].dfd = d0;
    fr[0].st = *st0;
    nf = 1;
    if (fstat(d0, &fr[0].dst) < 0) { rc = fail_errno(&t->c, errno, t->spath.p, "stat"); goto out; }
    fr[0].spathlen = t->spath.len;
    fr[0].dpathlen = 0;
    if ((rc = read_names(t, s0, &fr[0])) < 0) goto out;

    while (nf > 0) {
        frame *f = &fr[nf - 1];
        if (f->i == f->n) {
            lfs_sb_truncate(&t->spath, f->spathlen);
            rc = meta_fd(&t->c, f->sfd, f->dfd, &f->st, &f->dst, t->spath.p);
            if (rc < 0) goto out;
            if (nf >= 2 && fr[nf - 2].sfd < 0) {
                lfs_sb_truncate(&t->spath, fr[nf - 2].spathlen);
                if ((rc = reopen_parent(t, f, &fr[nf - 2])) < 0) goto out;
            }
            frame_free(f);
            nf--;
            continue;
        }
        dname *dn = &f->names[f->i++];
        const char *name = dn->name;
        if ((rc = set_paths(t, f, name)) < 0) goto out;
        struct stat st;
        int sfd = -1;
        if (dn->type == DT_REG || dn->type == DT_DIR) {
            int fl = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
            if (dn->type == DT_DIR) fl |= O_DIRECTORY;
            sfd = openat(f->sfd, name, fl);
            if (sfd < 0) {
                /* Replaced meanwhile (ELOOP, ENOTDIR): fall back to stat. */
                if (errno != ELOOP && errno != ENOTDIR) { rc = fail_errno(&t->c, errno, t->spath.p, "opening"); goto out; }
            } else if (fstat(sfd, &st) < 0) {
                rc = fail_errno(&t->c, errno, t->spath.p, "stat");
                close(sfd);
                goto out;
            } else if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
                close(sfd);
                rc = lfs_fail(t->c.err, EAGAIN, -1, t->spath.p, NULL, "the file was replaced while it was being copied");
                goto out;
            }
        }
        if (sfd < 0 && fstatat(f->sfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            rc = fail_errno(&t->c, errno, t->spath.p, "stat");
            goto out;
        }
        if (S_ISDIR(st.st_mode)) {
            if (st.st_dev == fr[0].dst.st_dev && st.st_ino == fr[0].dst.st_ino) {
                if (sfd >= 0) close(sfd);
                rc = lfs_fail(t->c.err, EINVAL, -1, t->spath.p, NULL,
                              "cannot copy a directory into itself");
                goto out;
            }
            if (sfd < 0) {
                sfd = openat(f->sfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                if (sfd < 0) { rc = fail_errno(&t->c, errno, t->spath.p, "opening the directory"); goto out; }
            }
            if (mkdirat(f->dfd, name, 0700) < 0) {
                rc = fail_errno(&t->c, errno, t->spath.p, "creating the directory copy");
                close(sfd);
                goto out;
            }
            int dfd = openat(f->dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (dfd < 0) {
                rc = fail_errno(&t->c, errno, t->spath.p, "opening the directory copy");
                close(sfd);
                goto out;
            }
            t->c.st.dirs++;
            if (nf == cap) {
                frame *nfr = realloc(fr, cap * 2 * sizeof *fr);
                if (!nfr) {
                    close(sfd);
                    close(dfd);
                    rc = lfs_fail(t->c.err, ENOMEM, -1, t->spath.p, NULL, "out of memory");
                    goto out;
                }
                fr = nfr;
                memset(fr + cap, 0, cap * sizeof *fr);
                cap *= 2;
            }
            frame *c = &fr[nf++];
            memset(c, 0, sizeof *c);
            c->sfd = sfd;
            c->dfd = dfd;
            c->st = st;
            c->spathlen = t->spath.len;
            if (lfs_sb_append(&t->dpath, "/", 1) < 0) { rc = lfs_fail(t->c.err, ENOMEM, -1, t->spath.p, NULL, "out of memory"); goto out; }
            c->dpathlen = t->dpath.len;
            if (fstat(dfd, &c->dst) < 0) { rc = fail_errno(&t->c, errno, t->spath.p, "stat"); goto out; }
            if ((rc = read_names(t, sfd, c)) < 0) goto out;
            if (nf > OPEN_DEPTH) {
                frame *old = &fr[nf - 1 - OPEN_DEPTH];
                if (old->sfd >= 0) { close(old->sfd); old->sfd = -1; }
                if (old->dfd >= 0) { close(old->dfd); old->dfd = -1; }
            }
            continue;
        }
        if (st.st_nlink > 1) {
            const char *first = lfs_hl_find(&t->links, st.st_dev, st.st_ino);
            if (first) {
                if (sfd >= 0) close(sfd);
                if (linkat(t->droot, first, f->dfd, name, 0) < 0) {
                    rc = fail_errno(&t->c, errno, t->spath.p, "linking");
                    goto out;
                }
                t->c.st.hardlinks++;
                continue;
            }
        }
        if (S_ISREG(st.st_mode)) {
            if (sfd < 0) {
                sfd = open_src_regular(&t->c, f->sfd, name, &st, t->spath.p);
                if (sfd < 0) { rc = sfd; goto out; }
            }
            if ((rc = tree_regular(t, f, name, sfd, &st)) < 0) goto out;
            continue;
        }
        if ((rc = copy_special(&t->c, f->sfd, name, f->dfd, name, &st, t->spath.p, t->spath.p)) < 0) goto out;
        if (st.st_nlink > 1 && lfs_hl_add(&t->links, st.st_dev, st.st_ino, t->dpath.p) < 0) {
            rc = lfs_fail(t->c.err, ENOMEM, -1, t->spath.p, NULL, "out of memory");
            goto out;
        }
    }
out:
    for (size_t i = 0; i < nf; i++) frame_free(&fr[i]);
    free(fr);
    return rc;
}

/* 1 when the directory that will hold dirfd/path is src_st or beneath it
 * (walking ".." up to "/"). */
static int inside(int dirfd, const char *path, const struct stat *src_st)
{
    const char *slash = strrchr(path, '/');
    char *parent = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : NULL;
    if (slash && !parent) return 0;
    int fd = openat(dirfd, parent ? parent : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(parent);
    struct stat st, up;
    int found = 0;
    if (fd < 0 || fstat(fd, &st) < 0) goto out;
    for (int depth = 0; depth < 4096; depth++) {
        if (st.st_dev == src_st->st_dev && st.st_ino == src_st->st_ino) { found = 1; break; }
        int p = openat(fd, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (p < 0) break;
        close(fd);
        fd = p;
        if (fstat(fd, &up) < 0 || (up.st_dev == st.st_dev && up.st_ino == st.st_ino)) break;
        st = up;
    }
out:
    if (fd >= 0) close(fd);
    return found;
}

int lfs_copy_tree(int src_dirfd, const char *src, int dst_dirfd, const char *dst,
                  int flags, lfs_copy_stats *stats, lfs_error *err)
{
    struct stat st;
    if (fstatat(src_dirfd, src, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return lfs_fail(err, errno, -1, src, NULL, "stat: %s", strerror(errno));
    if (!S_ISDIR(st.st_mode)) return lfs_copy_file(src_dirfd, src, dst_dirfd, dst, flags, stats, err);

    tree t;
    memset(&t, 0, sizeof t);
    ctx_init(&t.c, flags, err);
    t.droot = -1;
    int rc = 0, s0 = -1, d0 = -1;
    t.dents = malloc(DENTS_BUF);
    if (!t.dents || lfs_sb_append(&t.spath, src, strlen(src)) < 0 || lfs_sb_append(&t.dpath, "", 0) < 0) {
        rc = lfs_fail(err, ENOMEM, -1, src, NULL, "out of memory");
        goto out;
    }
    s0 = openat(src_dirfd, src, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (s0 < 0) { rc = lfs_fail(err, errno, -1, src, NULL, "opening: %s", strerror(errno)); goto out; }
    if (fstat(s0, &st) < 0) { rc = lfs_fail(err, errno, -1, src, NULL, "stat: %s", strerror(errno)); goto out; }
    if (inside(dst_dirfd, dst, &st)) {
        rc = lfs_fail(err, EINVAL, -1, dst, NULL, "cannot copy a directory into itself (%s)", src);
        goto out;
    }
    if (mkdirat(dst_dirfd, dst, 0700) < 0) { rc = lfs_fail(err, errno, -1, dst, NULL, "creating: %s", strerror(errno)); goto out; }
    d0 = openat(dst_dirfd, dst, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (d0 < 0) { rc = lfs_fail(err, errno, -1, dst, NULL, "opening: %s", strerror(errno)); goto out; }
    if ((rc = drop_inherited_acls(d0, err, dst)) < 0) goto out;
    t.droot = dup(d0);
    if (t.droot < 0) { rc = lfs_fail(err, errno, -1, dst, NULL, "dup: %s", strerror(errno)); goto out; }
    t.c.st.dirs++;
#ifndef LFS_COPY_SINGLE_THREAD
    t.threaded = sysconf(_SC_NPROCESSORS_ONLN) >= 2 && worker_start(&t.w, flags) == 0;
#endif

    rc = walk_copy(&t, s0, d0, &st);
    s0 = d0 = -1;                 /* walk_copy closed them */
    if (t.threaded) {
        int wrc = worker_stop(&t.w, rc < 0);
        /* The content thread's error, when the walk had none of its own or
         * stopped because of it (-ECANCELED from worker_push). */
        if (wrc < 0 && (rc == 0 || rc == -ECANCELED)) {
            if (err) *err = t.w.err;
            rc = -(t.w.err.code ? t.w.err.code : EIO);
        }
        t.c.st.bytes += t.w.c.st.bytes;
        t.c.st.reflinked += t.w.c.st.reflinked;
    }
out:
    if (s0 >= 0) close(s0);
    if (d0 >= 0) close(d0);
    if (t.droot >= 0) close(t.droot);
    if (stats) *stats = t.c.st;
    lfs_hl_free(&t.links);
    lfs_sb_free(&t.spath);
    lfs_sb_free(&t.dpath);
    free(t.dents);
    ctx_free(&t.c);
    return rc;
}
