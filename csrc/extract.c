/*
 * Layer extraction: lfs_apply.
 *
 * Every entry name is normalised lexically (no leading "/", no "." or empty
 * components, ".." resolved, never above the root), then split into a parent
 * directory and a final component.  The parent is opened beneath the root as if
 * the root were "/"; the final component is only ever used through *at() calls
 * on that parent fd that do not follow it.
 *
 * Parent cache ("chain").  The chain holds the directory fds of one path from the
 * root down: level 0 is the root, level i the directory named by the first i
 * components of cpath.  Looking up a parent keeps the levels it shares with the
 * chain and opens the rest one component at a time with openat(O_NOFOLLOW |
 * O_DIRECTORY) from the deepest shared level: a plain directory walk, no symlink
 * is ever crossed, so it is the same as resolving in the root.  When a component
 * is a symlink (or missing and not to be made), that lookup falls back to
 * lfs_open_dir_in_root_ex (openat2 RESOLVE_IN_ROOT, or the walk that resolves
 * symlinks itself inside the root); its fd goes on the chain with "holes" for the
 * levels it skipped, and the chain is marked aliased from that level on.  In a
 * sorted layer every entry's parent is on the chain or one level below it, so a
 * whole layer costs about one openat per directory and no openat2 at all.
 *
 * Invalidation: entries only ever change children of their own parent, and the
 * chain never holds anything below the parent of the entry being applied, so a
 * removal or a new symlink cannot change what an unaliased chain level names.
 * An aliased level (reached through a symlink) may sit anywhere, so when an entry
 * removes a directory or symlink or creates a symlink while the chain is
 * aliased, the whole chain is dropped before the next lookup (not at once: the
 * current entry keeps its parent fd).  Directory entries put
 * their own fd on the chain, since their children follow.  At most CHAIN_FDS
 * levels hold fds (plus the deepest), so deep trees stay within the fd limit.
 *
 * Path set (whiteout modes apply/overlay): an open-addressing hash set of every
 * path this layer wrote, plus each of their ancestors flagged PS_ANCESTOR,
 * strings in an arena (no malloc per entry).  A whiteout leaves paths of its own
 * layer alone; an opaque marker removes every child of its directory that is
 * not in the set and descends into children that are directories in the set,
 * so the marker may come anywhere in the layer.
 *
 * Prune memo: once a directory has been pruned, everything beneath it is in the
 * set, and stays so as long as entries reach it by its own path: a second marker
 * (a layer may repeat them: a few bytes each, a whole directory scan each) finds
 * nothing to remove.  Each slot keeps the generation (pgen) at which it was
 * pruned, and a prune that meets a directory pruned in the current generation
 * skips it.  Only prunes whose directory was reached without symlinks record
 * or use the memo, and an entry whose parent is reached through a symlink (its
 * content may land in a pruned directory under a name not in the set) starts a
 * new generation.
 *
 * Directory times are recorded (path, times, seq) and applied after the last
 * entry, deepest first, re-resolving each directory in the root and opening it
 * with O_NOFOLLOW (a directory replaced meanwhile is skipped).
 *
 * Tar-split record (opts->record, tarsplit.c): the parser's byte hook feeds the
 * record; do_file names the file an entry's data goes to (only when its parent
 * was reached without symlinks, else the data stays in the record), and every
 * removal or replacement first calls lfs_rec_removing.
 */
#include "internal.h"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452
#endif

#define CHAIN_FDS 48
#define MAX_LEVELS (LFS_PATH_MAX / 2 + 2)
#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_CLOEXEC)
#define FILE_FLAGS (O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY)
#define NO_ID ((uint32_t)-1)

#define PS_WRITTEN 1u
#define PS_ANCESTOR 2u

static const char OPAQUE[] = ".wh..wh..opq";
static const char WH[] = ".wh.";
static const char WH_META[] = ".wh..wh.";

/* ---- arena of strings ---- */

typedef struct ablk {
    struct ablk *next;
    size_t used, cap;
    char data[];
} ablk;

static char *arena_dup(ablk **head, const char *s, size_t n)
{
    ablk *b = *head;
    if (!b || b->cap - b->used < n + 1) {
        size_t cap = n + 1 > 65536 - sizeof(ablk) ? n + 1 : 65536 - sizeof(ablk);
        b = malloc(sizeof(ablk) + cap);
        if (!b) return NULL;
        b->next = *head;
        b->used = 0;
        b->cap = cap;
        *head = b;
    }
    char *p = b->data + b->used;
    memcpy(p, s, n);
    p[n] = 0;
    b->used += n + 1;
    return p;
}

static void arena_free(ablk **head)
{
    for (ablk *b = *head, *nx; b; b = nx) {
        nx = b->next;
        free(b);
    }
    *head = NULL;
}

/* ---- path set ---- */

typedef struct pslot {
    const char *s;
    uint64_t h;
    uint32_t len;
    uint32_t flags;
    uint64_t pruned;              /* ctx.pgen when last pruned as a directory, 0 never */
} pslot;

/* ---- the extraction state ---- */

/* Which directory an fd is: device, inode and (where the filesystem records it)
 * birth time, so that an inode number reused after a removal does not match. */
typedef struct dir_ident {
    uint64_t dev, ino;
    int64_t btime_sec;
    uint32_t btime_nsec;
    int has_btime;
} dir_ident;

static int get_ident(int fd, dir_ident *id)
{
    struct statx sx;
    if (statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_INO | STATX_BTIME, &sx) < 0)
        return -1;
    id->dev = ((uint64_t)sx.stx_dev_major << 32) | sx.stx_dev_minor;
    id->ino = sx.stx_ino;
    id->has_btime = (sx.stx_mask & STATX_BTIME) != 0;
    id->btime_sec = id->has_btime ? sx.stx_btime.tv_sec : 0;
    id->btime_nsec = id->has_btime ? sx.stx_btime.tv_nsec : 0;
    return 0;
}

static int same_ident(const dir_ident *a, const dir_ident *b)
{
    if (a->dev != b->dev || a->ino != b->ino) return 0;
    if (a->has_btime && b->has_btime)
        return a->btime_sec == b->btime_sec && a->btime_nsec == b->btime_nsec;
    return 1;
}

typedef struct dtime {
    const char *path;
    uint32_t len, depth;
    uint64_t seq;
    struct timespec ts[2];
    uint32_t mode;
    int set_mode;
    dir_ident id;                 /* the directory the times belong to: by the end */
} dtime;                          /* its path may lead elsewhere */

typedef struct opened_dir {
    int fd;
    mode_t mode;                  /* its mode before it was opened up */
    dir_ident id;
} opened_dir;

typedef struct ctx {
    int root_fd;
    const lfs_apply_opts *o;
    lfs_apply_result *res;
    lfs_error *err;
    lfs_tar *tar;
    lfs_rec *rec;                   /* tar-split record (opts->record), or NULL */
    const lfs_entry *e;             /* entry being applied (for error context) */
    int use_openat2;
    uid_t euid;
    gid_t egid;
    int defer_dir_mode;             /* not root: directory modes at the end, u+rwx meanwhile */
    opened_dir *od;                 /* not root: lower directories opened up (see open_up) */
    size_t nod, capod;
    uint32_t new_uid, new_gid;      /* owner of directories made on the way, whiteout devices */

    /* chain cache */
    size_t nlev, clen;
    size_t alias_level;             /* first level reached through a symlink, 0 none */
    int stale;                      /* cut the chain at alias_level before the next lookup */
    int lfd[MAX_LEVELS];
    uint32_t lend[MAX_LEVELS];
    /* what a node created in a level gets by itself (see creation_defaults) */
    uint32_t lgen[MAX_LEVELS];      /* == dgen: known; 0 never is */
    uint32_t lgid[MAX_LEVELS];
    unsigned char lacl[MAX_LEVELS]; /* the directory has a default ACL */
    uint32_t dgen;
    uid_t fsuid;
    gid_t fsgid;
    int umask_known;
    mode_t umask;
    char cpath[LFS_PATH_MAX];

    /* path set */
    lfs_hash_key hkey;              /* drawn per call: names cannot be chosen to collide */
    int track;
    pslot *slots;
    size_t scap, sn;
    ablk *arena;
    uint64_t pgen;                  /* prune memo generation (see prune) */
    uint64_t root_pruned;           /* pgen when the root was last pruned */

    /* directory times */
    dtime *dt;
    size_t ndt, capdt;
    uint64_t seq;

    char name[LFS_PATH_MAX];        /* normalised entry name */
    char link[LFS_PATH_MAX];        /* normalised hardlink target */
    char tmp[LFS_PATH_MAX];         /* NUL-terminated copies for the resolver */
    char rel[LFS_PATH_MAX];         /* opaque walk: directory being pruned */
    char wpath[LFS_PATH_MAX + NAME_MAX + 2];  /* whiteout targets, opaque walk */
} ctx;

static int efail(ctx *c, int code, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int efail(ctx *c, int code, const char *path, const char *fmt, ...)
{
    char msg[LFS_ERR_MSG];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return lfs_fail(c->err, code, c->e ? c->e->header_offset : -1, path,
                    c->e ? c->e->path : NULL, "%s", msg);
}

/* An error already recorded by a helper: add the entry and its offset. */
static int ectx(ctx *c, int rc)
{
    if (c->e) lfs_err_context(c->err, c->e->path, c->e->header_offset);
    return rc;
}

static void warn(ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void warn(ctx *c, const char *fmt, ...)
{
    if (c->res->warnings++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->res->first_warning, sizeof c->res->first_warning, fmt, ap);
        va_end(ap);
    }
}

/* ---- path set operations ---- */

static pslot *pset_slot(pslot *slots, size_t cap, const char *s, size_t n, uint64_t h)
{
    size_t mask = cap - 1, i = (size_t)h & mask;
    for (;;) {
        pslot *sl = &slots[i];
        if (!sl->s) return sl;
        if (sl->h == h && sl->len == n && memcmp(sl->s, s, n) == 0) return sl;
        i = (i + 1) & mask;
    }
}

static pslot *pset_find(ctx *c, const char *s, size_t n)
{
    if (!c->slots) return NULL;
    pslot *sl = pset_slot(c->slots, c->scap, s, n, lfs_hash_name(&c->hkey, s, n));
    return sl->s ? sl : NULL;
}

static unsigned pset_get(ctx *c, const char *s, size_t n)
{
    pslot *sl = pset_find(c, s, n);
    return sl ? sl->flags : 0;
}

/* Add one path; returns 1 if it was new, 0 if it was there, <0 on ENOMEM. */
static int pset_add1(ctx *c, const char *s, size_t n, unsigned flags)
{
    if ((c->sn + 1) * 2 > c->scap) {
        size_t ncap = c->scap ? c->scap * 2 : 4096;
        pslot *ns = calloc(ncap, sizeof *ns);
        if (!ns) return -ENOMEM;
        for (size_t i = 0; i < c->scap; i++) {
            pslot *o = &c->slots[i];
            if (o->s) *pset_slot(ns, ncap, o->s, o->len, o->h) = *o;
        }
        free(c->slots);
        c->slots = ns;
        c->scap = ncap;
    }
    uint64_t h = lfs_hash_name(&c->hkey, s, n);
    pslot *sl = pset_slot(c->slots, c->scap, s, n, h);
    if (sl->s) {
        sl->flags |= flags;
        return 0;
    }
    const char *copy = arena_dup(&c->arena, s, n);
    if (!copy) return -ENOMEM;
    sl->s = copy;
    sl->h = h;
    sl->len = (uint32_t)n;
    sl->flags = flags;
    c->sn++;
    return 1;
}

/* Mark path written (or, with flags PS_ANCESTOR, as holding this layer's content),
 * and every ancestor as PS_ANCESTOR. */
static int pset_add(ctx *c, const char *s, size_t n, unsigned flags)
{
    int r = pset_add1(c, s, n, flags);
    while (r > 0) {
        while (n > 0 && s[n - 1] != '/') n--;
        if (n == 0) break;
        n--;
        r = pset_add1(c, s, n, PS_ANCESTOR);
    }
    return r < 0 ? efail(c, ENOMEM, s, "out of memory") : 0;
}

/* ---- names ---- */

/* Lexical normalisation into out (LFS_PATH_MAX bytes): "" is the root.
 * Returns the length, -ENAMETOOLONG or -EINVAL (escapes the root). */
static ssize_t normalise(const char *in, char *out)
{
    size_t len = 0;
    if (strlen(in) >= LFS_PATH_MAX) return -ENAMETOOLONG;
    const char *p = in;
    while (*p) {
        while (*p == '/') p++;
        if (!*p) break;
        const char *s = p;
        while (*p && *p != '/') p++;
        size_t n = (size_t)(p - s);
        if (n == 1 && s[0] == '.') continue;
        if (n == 2 && s[0] == '.' && s[1] == '.') {
            if (len == 0) return -EINVAL;
            while (len > 0 && out[len - 1] != '/') len--;
            if (len > 0) len--;
            continue;
        }
        if (len) out[len++] = '/';
        memcpy(out + len, s, n);
        len += n;
    }
    out[len] = 0;
    return (ssize_t)len;
}

static size_t parent_len(const char *s, size_t n)
{
    while (n > 0 && s[n - 1] != '/') n--;
    return n > 0 ? n - 1 : 0;
}

static size_t depth_of(const char *s, size_t n)
{
    if (n == 0) return 0;
    size_t d = 1;
    for (size_t i = 0; i < n; i++) d += s[i] == '/';
    return d;
}

static int has_prefix(const char *s, const char *pfx)
{
    return strncmp(s, pfx, strlen(pfx)) == 0;
}

/* ---- the chain ---- */

static void chain_cut(ctx *c, size_t level)
{
    while (c->nlev > level) {
        if (c->lfd[c->nlev] >= 0) close(c->lfd[c->nlev]);
        c->lfd[c->nlev] = -1;
        c->nlev--;
    }
    c->clen = level ? c->lend[level] : 0;
    if (c->alias_level > level) c->alias_level = 0;
}

/* Append the level p[0..end) (p shares cpath up to clen) holding fd (-1: a hole). */
static void chain_push(ctx *c, const char *p, size_t end, int fd)
{
    size_t lv = c->nlev + 1;
    if (lv >= MAX_LEVELS) {             /* cannot happen for names < LFS_PATH_MAX */
        if (fd >= 0) close(fd);
        return;
    }
    if (c->nlev > CHAIN_FDS && c->lfd[c->nlev] >= 0) {
        close(c->lfd[c->nlev]);         /* past the budget only the deepest keeps its fd */
        c->lfd[c->nlev] = -1;
    }
    memcpy(c->cpath + c->clen, p + c->clen, end - c->clen);
    c->clen = end;
    c->nlev = lv;
    c->lend[lv] = (uint32_t)end;
    c->lfd[lv] = fd;
    c->lgen[lv] = 0;
}

/* Something that may change what an aliased level names has happened. */
static void chain_changed(ctx *c)
{
    if (c->alias_level) c->stale = 1;
}

/* What a node created in directory pfd gets without being told: its group (the
 * directory's when it is set-group-ID, else ours) and whether a default ACL, not
 * the umask, shapes its mode.  Known per chain level until a directory's
 * metadata may have changed under it (dgen).  0, or -1 when it cannot be told. */
static int creation_defaults(ctx *c, int pfd, gid_t *gid, int *acl)
{
    size_t lv = c->nlev;
    int cached = c->lfd[lv] == pfd;
    if (cached && c->lgen[lv] == c->dgen) {
        *gid = c->lgid[lv];
        *acl = c->lacl[lv];
        return 0;
    }
    struct stat st;
    if (fstat(pfd, &st) < 0) return -1;
    ssize_t n = fgetxattr(pfd, "system.posix_acl_default", NULL, 0);
    if (n < 0 && errno != ENODATA && errno != ENOTSUP) return -1;
    *gid = (st.st_mode & S_ISGID) ? st.st_gid : c->fsgid;
    *acl = n > 0;
    if (cached) {
        c->lgen[lv] = c->dgen;
        c->lgid[lv] = *gid;
        c->lacl[lv] = (unsigned char)*acl;
    }
    return 0;
}

/* The umask, read without changing it (umask(2) would race other threads). */
static int read_umask(mode_t *out)
{
    int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    const char *p = strstr(buf, "\nUmask:");
    if (!p) return -1;
    char *end;
    unsigned long v = strtoul(p + 7, &end, 8);
    if (end == p + 7 || v > 0777) return -1;
    *out = (mode_t)v;
    return 0;
}

/* Without root, a directory that a lower layer left closed to its owner (0555,
 * as Fedora's /usr/bin is, 0500, 0000) refuses what this layer puts in it or
 * removes from it.  Where we own it, it gets u+rwx until the end of the layer
 * (restore_opened puts its mode back), as a rootless unpack must. */

/* Note directory fd, whose mode was mode, as opened up; 0, or -1 when it cannot
 * be noted (the caller puts the mode back). */
static int note_opened(ctx *c, int fd, mode_t mode)
{
    if (c->nod == c->capod) {
        size_t nc = c->capod ? c->capod * 2 : 16;
        opened_dir *n = realloc(c->od, nc * sizeof *n);
        if (!n) return -1;
        c->od = n;
        c->capod = nc;
    }
    opened_dir *o = &c->od[c->nod];
    if (get_ident(fd, &o->id) < 0) return -1;
    o->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (o->fd < 0) return -1;
    o->mode = mode;
    c->nod++;
    return 0;
}

/* When err is EACCES, open up directory dfd; 1 when it did (try again), else 0
 * with errno as it was (the caller reports the first failure). */
static int open_up(ctx *c, int dfd, int err)
{
    struct stat st;
    int saved = errno, ok = 0;
    if (err == EACCES && c->defer_dir_mode && fstat(dfd, &st) == 0 && S_ISDIR(st.st_mode) &&
        st.st_uid == c->fsuid && (st.st_mode & S_IRWXU) != S_IRWXU) {
        mode_t mode = st.st_mode & 07777;
        if (fchmod(dfd, mode | S_IRWXU) == 0) {
            ok = note_opened(c, dfd, mode) == 0;
            if (!ok) fchmod(dfd, mode);
        }
    }
    if (!ok) errno = saved;
    return ok;
}

/* Open directory name in pfd without following it; without root, open up pfd
 * or the directory itself where they are closed to us (see open_up). */
static int open_dir_up(ctx *c, int pfd, const char *name)
{
    int fd = openat(pfd, name, DIR_FLAGS | O_NOFOLLOW);
    if (fd >= 0 || errno != EACCES || !c->defer_dir_mode) return fd;
    if (open_up(c, pfd, EACCES)) {
        fd = openat(pfd, name, DIR_FLAGS | O_NOFOLLOW);
        if (fd >= 0 || errno != EACCES) return fd;
    }
    /* the directory itself is closed to us: opened up by name */
    mode_t was;
    fd = lfs_open_opening_up(pfd, name, DIR_FLAGS, S_IFDIR, S_IRWXU, c->fsuid, 1, &was);
    if (fd >= 0 && note_opened(c, fd, was) < 0) {
        fchmod(fd, was);
        close(fd);
        errno = EACCES;
        return -1;
    }
    return fd;
}

/* Run expr (an int, < 0 with errno set on failure) again if it failed for want
 * of permission in directory dfd and open_up let us in. */
#define OPENING_UP(c, dfd, expr) \
    ({ int r_ = (expr); if (r_ < 0 && open_up((c), (dfd), errno)) r_ = (expr); r_; })

/* Fix up a directory made on the way: mode 0755, owner new_uid:new_gid. */
static int fix_new_dir(ctx *c, int fd)
{
    if (c->new_uid != NO_ID && fchown(fd, c->new_uid, c->new_gid) < 0) return -errno;
    if (fchmod(fd, 0755) < 0) return -errno;
    return 0;
}

/* The fd of directory p[0..n) ("" the root) beneath the root, owned by the chain
 * (valid until the next dir_fd).  create: make missing directories. */
static int dir_fd_walk(ctx *c, const char *p, size_t n, int create)
{
    if (c->stale) {                     /* an aliased level may be an ancestor of any other */
        c->stale = 0;
        chain_cut(c, 0);
    }
    if (n == c->clen && c->lfd[c->nlev] >= 0 && memcmp(p, c->cpath, n) == 0)
        return c->lfd[c->nlev];

    /* levels shared with the chain */
    size_t m = 0, prev = 0;
    for (size_t lv = 1; lv <= c->nlev; lv++) {
        size_t end = c->lend[lv];
        if (end > n || (end < n && p[end] != '/')) break;
        if (memcmp(p + prev, c->cpath + prev, end - prev) != 0) break;
        m = lv;
        prev = end;
    }
    chain_cut(c, m);
    while (c->nlev > 0 && c->lfd[c->nlev] < 0) chain_cut(c, c->nlev - 1);

    int cur = c->lfd[c->nlev];
    size_t pos = c->nlev ? c->lend[c->nlev] + 1 : 0;
    char comp[NAME_MAX + 1];
    while (pos < n) {
        size_t s = pos;
        while (pos < n && p[pos] != '/') pos++;
        size_t len = pos - s;
        if (len > NAME_MAX) {
            memcpy(c->tmp, p, n);
            c->tmp[n] = 0;
            return efail(c, ENAMETOOLONG, c->tmp, "path component too long");
        }
        memcpy(comp, p + s, len);
        comp[len] = 0;
        int fd = open_dir_up(c, cur, comp);
        if (fd < 0 && errno == ENOENT && create) {
            if (OPENING_UP(c, cur, mkdirat(cur, comp, 0700)) == 0) {
                fd = openat(cur, comp, DIR_FLAGS | O_NOFOLLOW);
                if (fd >= 0) {
                    int r = fix_new_dir(c, fd);
                    if (r < 0) {
                        close(fd);
                        memcpy(c->tmp, p, pos);
                        c->tmp[pos] = 0;
                        return efail(c, -r, c->tmp, "cannot set owner/mode of new directory");
                    }
                }
            } else if (errno == EEXIST) {
                fd = openat(cur, comp, DIR_FLAGS | O_NOFOLLOW);
            } else {
                int e = errno;
                memcpy(c->tmp, p, pos);
                c->tmp[pos] = 0;
                return efail(c, e, c->tmp, "cannot create directory");
            }
        }
        if (fd < 0) {
            int e = errno;
            if (e == ELOOP || e == ENOTDIR) break;  /* a symlink: resolve in the root */
            memcpy(c->tmp, p, pos);
            c->tmp[pos] = 0;
            if (e == ENOENT) return efail(c, ENOENT, c->tmp, "directory does not exist");
            return efail(c, e, c->tmp, "cannot open directory");
        }
        chain_push(c, p, pos, fd);
        cur = fd;
        if (pos < n) pos++;
    }
    if (pos >= n && c->clen == n) return cur;

    /* Fallback: the whole path resolved in the root. */
    memcpy(c->tmp, p, n);
    c->tmp[n] = 0;
    int fd = lfs_open_dir_in_root_ex(c->root_fd, c->tmp, create, c->use_openat2,
                                     c->new_uid == NO_ID ? (uid_t)-1 : c->new_uid,
                                     c->new_uid == NO_ID ? (gid_t)-1 : c->new_gid, c->err);
    if (fd < 0) return ectx(c, fd);
    size_t first = c->nlev + 1;
    pos = c->clen ? c->clen + 1 : 0;
    while (pos < n) {                   /* holes for the levels skipped */
        while (pos < n && p[pos] != '/') pos++;
        if (pos >= n) break;
        chain_push(c, p, pos, -1);
        pos++;
    }
    chain_push(c, p, n, fd);
    if (!c->alias_level) c->alias_level = first;
    return fd;
}

/* dir_fd_walk; a directory reached through a symlink starts a new prune memo
 * generation, since what is written there is not in the path set by its own path. */
static int dir_fd(ctx *c, const char *p, size_t n, int create)
{
    int fd = dir_fd_walk(c, p, n, create);
    if (fd >= 0 && c->alias_level) c->pgen++;
    return fd;
}

/* fd of directory p[0..n) if the chain holds it, else -1. */
static int chain_find(ctx *c, const char *p, size_t n)
{
    if (c->stale) return -1;
    if (n == 0) return c->root_fd;
    for (size_t lv = 1; lv <= c->nlev; lv++)
        if (c->lend[lv] == n) return memcmp(p, c->cpath, n) == 0 ? c->lfd[lv] : -1;
    return -1;
}

/* ---- metadata ---- */

/* An owner that cannot be given; EINVAL is an id the user namespace does not map. */
static int chown_failed(ctx *c, int err, const char *path, uint32_t uid, uint32_t gid)
{
    if (err == EINVAL)
        return efail(c, err, path, "cannot change owner to %u:%u: not mapped in this user "
                     "namespace (map more ids: /etc/subuid, /etc/subgid)", uid, gid);
    if (err == EPERM && c->euid != 0)
        return efail(c, err, path, "cannot change owner to %u:%u (not root: owners can be "
                     "skipped)", uid, gid);
    return efail(c, err, path, "cannot change owner to %u:%u", uid, gid);
}

static int map_id(const lfs_idmap *m, size_t nm, uint32_t id, uint32_t *out)
{
    for (size_t i = 0; i < nm; i++) {
        if (id >= m[i].inner && (uint64_t)id - m[i].inner < m[i].count) {
            uint64_t v = (uint64_t)m[i].outer + (id - m[i].inner);
            if (v >= NO_ID) return -1;
            *out = (uint32_t)v;
            return 0;
        }
    }
    return -1;
}

/* Owner to give the entry: NO_ID for "do not chown". */
static int entry_ids(ctx *c, const lfs_entry *e, const char *path, uint32_t *uid, uint32_t *gid)
{
    switch (c->o->owners) {
    case LFS_OWNER_SKIP:
        *uid = *gid = NO_ID;
        if (e->uid != (uint32_t)c->euid || e->gid != (uint32_t)c->egid)
            warn(c, "owner %u:%u of '%s' not applied (owners skipped)", e->uid, e->gid, path);
        return 0;
    case LFS_OWNER_MAP:
        if (map_id(c->o->uid_map, c->o->uid_map_len, e->uid, uid) < 0)
            return efail(c, EINVAL, path, "uid %u is not in the uid map", e->uid);
        if (map_id(c->o->gid_map, c->o->gid_map_len, e->gid, gid) < 0)
            return efail(c, EINVAL, path, "gid %u is not in the gid map", e->gid);
        return 0;
    default:
        if (e->uid == NO_ID || e->gid == NO_ID)
            return efail(c, EINVAL, path, "owner %u:%u is not a valid id", e->uid, e->gid);
        *uid = e->uid;
        *gid = e->gid;
        return 0;
    }
}

static void entry_times(const lfs_entry *e, struct timespec ts[2])
{
    ts[1].tv_sec = (time_t)e->mtime_sec;
    ts[1].tv_nsec = e->mtime_nsec >= 0 && e->mtime_nsec < 1000000000 ? e->mtime_nsec : 0;
    if (e->has_atime) {
        ts[0].tv_sec = (time_t)e->atime_sec;
        ts[0].tv_nsec = e->atime_nsec >= 0 && e->atime_nsec < 1000000000 ? e->atime_nsec : 0;
    } else {
        ts[0] = ts[1];
    }
}

/* xattrs a union filesystem reads from its layer directories as instructions:
 * overlayfs (trusted.overlay.*, user.overlay.* with userxattr: opaque, redirect,
 * metacopy, whiteout...) and fuse-overlayfs, the overlay driver's mount program
 * (user.fuseoverlayfs.opaque hides the lower directories, *.override_stat and
 * user.containers.* stand in for the owner, mode and security xattrs it shows).
 * A layer never sets them; where they are on disk, they are not the layer's. */
static int is_overlay_xattr(const char *name)
{
    return has_prefix(name, "trusted.overlay.") || has_prefix(name, "user.overlay.") ||
           has_prefix(name, "user.fuseoverlayfs.") || has_prefix(name, "security.fuseoverlayfs.") ||
           has_prefix(name, "user.containers.");
}

/* xattrs of e on fd (or, fd < 0, on pfd/base without following it). */
static int set_xattrs(ctx *c, const lfs_entry *e, int fd, int pfd, const char *base, const char *path)
{
    if (!e->nxattrs) return 0;
    if (c->o->no_xattrs) {
        warn(c, "%zu xattr(s) of '%s' not applied (xattrs disabled)", e->nxattrs, path);
        return 0;
    }
    char proc[64 + NAME_MAX];
    if (fd < 0) snprintf(proc, sizeof proc, "/proc/self/fd/%d/%s", pfd, base);
    for (size_t i = 0; i < e->nxattrs; i++) {
        const lfs_xattr *x = &e->xattrs[i];
        if (is_overlay_xattr(x->name)) {
            warn(c, "overlay xattr '%s' of '%s' dropped", x->name, path);
            continue;
        }
        int r = fd >= 0 ? fsetxattr(fd, x->name, x->value, x->len, 0)
                        : lsetxattr(proc, x->name, x->value, x->len, 0);
        if (r == 0) continue;
        int er = errno;
        if ((er == ENOTSUP || er == EPERM) && c->o->owners != LFS_OWNER_KEEP) {
            warn(c, "xattr '%s' of '%s' not set: %s", x->name, path, strerror(er));
            continue;
        }
        if (er == ENOTSUP)
            return efail(c, er, path, "cannot set xattr '%s': the filesystem does not support "
                         "this xattr namespace (extract without xattrs to skip them)", x->name);
        return efail(c, er, path, "cannot set xattr '%s'", x->name);
    }
    return 0;
}

/* chmod pfd/base without following it (devices, fifos). */
static int chmod_nofollow(int pfd, const char *base, mode_t mode)
{
    if (syscall(SYS_fchmodat2, pfd, base, mode, AT_SYMLINK_NOFOLLOW) == 0) return 0;
    if (errno != ENOSYS && errno != EINVAL) return -errno;
    return fchmodat(pfd, base, mode, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
}

/* Metadata of a new non-directory, non-regular entry, which cannot be opened. */
static int meta_at(ctx *c, const lfs_entry *e, int pfd, const char *base, const char *path,
                   uint32_t uid, uint32_t gid, int chmod_it)
{
    gid_t dgid;
    int acl;
    int own_ok = uid == NO_ID || (uid == (uint32_t)c->fsuid &&
                                  creation_defaults(c, pfd, &dgid, &acl) == 0 && gid == (uint32_t)dgid);
    if (!own_ok && fchownat(pfd, base, uid, gid, AT_SYMLINK_NOFOLLOW) < 0)
        return chown_failed(c, errno, path, uid, gid);
    if (chmod_it) {
        int r = chmod_nofollow(pfd, base, e->mode & 07777);
        if (r < 0) return efail(c, -r, path, "cannot change mode to %04o", e->mode & 07777);
    }
    int r = set_xattrs(c, e, -1, pfd, base, path);
    if (r < 0) return r;
    struct timespec ts[2];
    entry_times(e, ts);
    if (utimensat(pfd, base, ts, AT_SYMLINK_NOFOLLOW) < 0)
        return efail(c, errno, path, "cannot set times");
    return 0;
}

/* ---- replacing ---- */

/* lfs_remove_at in directory dfd, opening dfd up if it is closed to us. */
static int remove_at(ctx *c, int dfd, const char *name)
{
    int r = lfs_remove_at(dfd, name, c->err);
    if (r == -EACCES && open_up(c, dfd, EACCES)) r = lfs_remove_at(dfd, name, c->err);
    return r;
}

/* Remove whatever is at pfd/base (a directory recursively), for a new entry. */
static int replace(ctx *c, int pfd, const char *base, const char *path)
{
    struct stat st;
    if (OPENING_UP(c, pfd, fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW)) < 0) {
        if (errno == ENOENT) return 0;
        return efail(c, errno, path, "cannot stat the existing entry");
    }
    if (c->rec) {
        int r = lfs_rec_removing(c->rec, pfd, base, &st, c->err);
        if (r < 0) return ectx(c, r);
    }
    if (S_ISDIR(st.st_mode)) {
        chain_changed(c);
        int r = remove_at(c, pfd, base);
        return r < 0 ? ectx(c, r) : 0;
    }
    if (S_ISLNK(st.st_mode)) chain_changed(c);
    if (OPENING_UP(c, pfd, unlinkat(pfd, base, 0)) < 0 && errno != ENOENT)
        return efail(c, errno, path, "cannot remove the existing entry");
    return 0;
}

/* ---- entry types ---- */

static int file_data(ctx *c, const lfs_entry *e, int fd, const char *path)
{
    const unsigned char *p;
    ssize_t n;
    if (e->nsparse == 0) {
        int64_t left = e->size;
        while (left > 0) {
            n = lfs_tar_data(c->tar, &p, (size_t)left, c->err);
            if (n < 0) return ectx(c, (int)n);
            if (n == 0) break;
            int r = lfs_write_full(fd, p, (size_t)n);
            if (r < 0) return efail(c, -r, path, "cannot write file data");
            left -= n;
        }
        if (left > 0) return efail(c, EIO, path, "file data ends %lld bytes early", (long long)left);
        return 0;
    }
    if (e->realsize < 0 || ftruncate(fd, (off_t)e->realsize) < 0)
        return efail(c, e->realsize < 0 ? EINVAL : errno, path, "cannot size sparse file to %lld bytes",
                     (long long)e->realsize);
    for (size_t i = 0; i < e->nsparse; i++) {
        int64_t off = e->sparse[i].offset, left = e->sparse[i].length;
        if (off < 0 || left < 0 || off > e->realsize || left > e->realsize - off)
            return efail(c, EINVAL, path, "sparse segment %zu lies outside the file", i);
        while (left > 0) {
            n = lfs_tar_data(c->tar, &p, (size_t)left, c->err);
            if (n < 0) return ectx(c, (int)n);
            if (n == 0) return efail(c, EIO, path, "sparse file data ends early");
            int r = lfs_pwrite_full(fd, p, (size_t)n, (off_t)off);
            if (r < 0) return efail(c, -r, path, "cannot write file data");
            off += n;
            left -= n;
        }
    }
    return 0;
}

static int do_file(ctx *c, const lfs_entry *e, int pfd, const char *base, const char *path,
                   uint32_t uid, uint32_t gid)
{
    /* A file that gets its owner and mode by being created skips fchown/fchmod:
     * two of the six calls per file of a typical layer (root-owned, 0644/0755). */
    mode_t want = e->mode & 07777;
    gid_t dgid;
    int acl, own_ok = uid == NO_ID, mode_ok = 0;
    /* Without root, setting user.* xattrs takes write permission on the file:
     * a read-only file gets its mode after them. */
    int chmod_last = c->euid != 0 && e->nxattrs && !(want & S_IWUSR);
    if (creation_defaults(c, pfd, &dgid, &acl) == 0) {
        own_ok = own_ok || (uid == (uint32_t)c->fsuid && gid == (uint32_t)dgid);
        mode_ok = own_ok && !acl && c->umask_known && !(want & 07000) && !(want & c->umask) &&
                  !chmod_last;
    }
    int fd;
    for (int tries = 0;; tries++) {
        fd = OPENING_UP(c, pfd, openat(pfd, base, FILE_FLAGS, mode_ok ? want : 0600));
        if (fd >= 0) break;
        if (errno != EEXIST || tries > 0) return efail(c, errno, path, "cannot create file");
        int r = replace(c, pfd, base, path);
        if (r < 0) return r;
    }
    int r = 0;
    /* the record names the file only if its path leads to it without symlinks */
    if (c->rec && e->size > 0 && !c->alias_level)
        r = lfs_rec_file(c->rec, fd, path, strlen(path), e, c->err);
    if (r == 0) r = file_data(c, e, fd, path);
    if (r < 0) goto out;
    if (!own_ok && fchown(fd, uid, gid) < 0) {
        r = chown_failed(c, errno, path, uid, gid);
        goto out;
    }
    if (!mode_ok && !chmod_last && fchmod(fd, want) < 0) {
        r = efail(c, errno, path, "cannot change mode to %04o", want);
        goto out;
    }
    r = set_xattrs(c, e, fd, pfd, base, path);
    if (r < 0) goto out;
    if (chmod_last && fchmod(fd, want) < 0) {
        r = efail(c, errno, path, "cannot change mode to %04o", want);
        goto out;
    }
    struct timespec ts[2];
    entry_times(e, ts);
    if (futimens(fd, ts) < 0) r = efail(c, errno, path, "cannot set times");
out:
    if (close(fd) < 0 && r == 0) r = efail(c, errno, path, "cannot close file");
    return r;
}

static int do_symlink(ctx *c, const lfs_entry *e, int pfd, const char *base, const char *path,
                      uint32_t uid, uint32_t gid)
{
    for (int tries = 0;; tries++) {
        if (OPENING_UP(c, pfd, symlinkat(e->linkpath, pfd, base)) == 0) break;
        if (errno != EEXIST || tries > 0)
            return efail(c, errno, path, "cannot create symlink to '%s'", e->linkpath);
        int r = replace(c, pfd, base, path);
        if (r < 0) return r;
    }
    chain_changed(c);
    return meta_at(c, e, pfd, base, path, uid, gid, 0);
}

static int do_node(ctx *c, const lfs_entry *e, int pfd, const char *base, const char *path,
                   uint32_t uid, uint32_t gid)
{
    mode_t fmt = e->type == LFS_T_CHR ? S_IFCHR : e->type == LFS_T_BLK ? S_IFBLK : S_IFIFO;
    dev_t dev = fmt == S_IFIFO ? 0 : makedev(e->devmajor, e->devminor);
    for (int tries = 0;; tries++) {
        if (OPENING_UP(c, pfd, mknodat(pfd, base, fmt | 0600, dev)) == 0) break;
        if (errno != EEXIST || tries > 0)
            return efail(c, errno, path, fmt == S_IFIFO ? "cannot create fifo"
                         : errno == EPERM ? "cannot create device node (devices can be skipped)"
                         : "cannot create device node");
        int r = replace(c, pfd, base, path);
        if (r < 0) return r;
    }
    return meta_at(c, e, pfd, base, path, uid, gid, 1);
}

static int do_hardlink(ctx *c, const lfs_entry *e, int pfd, const char *base, const char *path,
                       size_t len)
{
    ssize_t tn = normalise(e->linkpath, c->link);
    if (tn == -EINVAL) return efail(c, EINVAL, path, "hardlink target '%s' escapes the root", e->linkpath);
    if (tn < 0) return efail(c, ENAMETOOLONG, path, "hardlink target is too long");
    if (tn == 0) return efail(c, EPERM, path, "hardlink target '%s' is the root directory", e->linkpath);
    size_t tplen = parent_len(c->link, (size_t)tn);
    const char *tbase = c->link + (tplen ? tplen + 1 : 0);
    if ((size_t)tn == len && memcmp(c->link, c->name, len) == 0) {
        struct stat st;                 /* a link to itself: nothing to do if it exists */
        if (fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0)
            return efail(c, ENOENT, path, "hardlink target '%s' does not exist", c->link);
        if (S_ISDIR(st.st_mode))
            return efail(c, EPERM, path, "hardlink target '%s' is a directory", c->link);
        return 0;
    }
    int tfd = chain_find(c, c->link, tplen), own = 0;
    if (tfd < 0) {
        memcpy(c->tmp, c->link, tplen);
        c->tmp[tplen] = 0;
        tfd = lfs_open_dir_in_root_ex(c->root_fd, c->tmp, 0, c->use_openat2, (uid_t)-1, (gid_t)-1, c->err);
        if (tfd < 0) {
            if (tfd == -ENOENT || tfd == -ENOTDIR)
                return efail(c, ENOENT, path, "hardlink target '%s' does not exist", c->link);
            return ectx(c, tfd);
        }
        own = 1;
    }
    int rc = 0;
    for (int tries = 0;; tries++) {
        if (OPENING_UP(c, pfd, OPENING_UP(c, tfd, linkat(tfd, tbase, pfd, base, 0))) == 0) break;
        int er = errno;
        if (er == EEXIST && tries == 0) {
            rc = replace(c, pfd, base, path);
            if (rc < 0) break;
            continue;
        }
        if (er == ENOENT) {
            struct stat st;
            if (fstatat(tfd, tbase, &st, AT_SYMLINK_NOFOLLOW) < 0)
                rc = efail(c, ENOENT, path, "hardlink target '%s' does not exist", c->link);
            else
                rc = efail(c, er, path, "cannot create hardlink to '%s'", c->link);
        } else if (er == EPERM || er == EISDIR) {
            struct stat st;
            if (fstatat(tfd, tbase, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode))
                rc = efail(c, EPERM, path, "hardlink target '%s' is a directory", c->link);
            else
                rc = efail(c, er, path, "cannot create hardlink to '%s'", c->link);
        } else {
            rc = efail(c, er, path, "cannot create hardlink to '%s'", c->link);
        }
        break;
    }
    if (own) close(tfd);
    return rc;
}

static int add_dtime(ctx *c, const lfs_entry *e, int fd, const char *path, size_t len)
{
    dir_ident id;
    if (get_ident(fd, &id) < 0) return efail(c, errno, path, "cannot stat the directory");
    if (c->ndt == c->capdt) {
        size_t nc = c->capdt ? c->capdt * 2 : 256;
        dtime *nd = realloc(c->dt, nc * sizeof *nd);
        if (!nd) return efail(c, ENOMEM, path, "out of memory");
        c->dt = nd;
        c->capdt = nc;
    }
    const char *copy = arena_dup(&c->arena, path, len);
    if (!copy) return efail(c, ENOMEM, path, "out of memory");
    dtime *d = &c->dt[c->ndt++];
    d->path = copy;
    d->len = (uint32_t)len;
    d->depth = (uint32_t)depth_of(path, len);
    d->seq = c->seq++;
    entry_times(e, d->ts);
    d->mode = e->mode & 07777;
    d->set_mode = c->defer_dir_mode;
    d->id = id;
    return 0;
}

/* Owner, mode and xattrs of directory fd; times are recorded for the end. */
static int meta_dir(ctx *c, const lfs_entry *e, int fd, const char *path, size_t len,
                    uint32_t uid, uint32_t gid)
{
    /* Its group, set-group-ID bit or default ACL may change.  Its ancestors on the
     * chain are other directories unless a level came through a symlink (or it is
     * the root, level 0); the level it is pushed as starts unknown. */
    if (len == 0 || c->alias_level) c->dgen++;
    if (uid != NO_ID && fchown(fd, uid, gid) < 0)
        return chown_failed(c, errno, path, uid, gid);
    mode_t mode = e->mode & 07777;
    if (c->defer_dir_mode) mode |= S_IRWXU;
    if (fchmod(fd, mode) < 0) return efail(c, errno, path, "cannot change mode to %04o", mode);
    int r = set_xattrs(c, e, fd, -1, NULL, path);
    if (r < 0) return r;
    return add_dtime(c, e, fd, path, len);
}

static int set_opaque(ctx *c, int fd, const char *path)
{
    const char *xn = c->o->overlay_user_xattr ? "user.overlay.opaque" : "trusted.overlay.opaque";
    if (fsetxattr(fd, xn, "y", 1, 0) < 0)
        return efail(c, errno, path, "cannot set %s on the opaque directory", xn);
    return 0;
}

/* Directory over directory: the entry's metadata wins, xattrs included, so an
 * xattr the existing directory has and the entry does not is removed (the view
 * then matches an overlay mount, where the upper directory's xattrs are the
 * ones seen).  overlay.* markers and SELinux labels are not the layer's to drop. */
static int drop_stale_xattrs(ctx *c, const lfs_entry *e, int fd, const char *path)
{
    if (c->o->no_xattrs) return 0;
    char stackbuf[4096];
    char *buf = stackbuf;
    ssize_t n = flistxattr(fd, buf, sizeof stackbuf);
    if (n < 0 && errno == ERANGE) {
        ssize_t want = flistxattr(fd, NULL, 0);
        if (want < 0) return efail(c, errno, path, "cannot list xattrs");
        buf = malloc((size_t)want + 1);
        if (!buf) return efail(c, ENOMEM, path, "out of memory");
        n = flistxattr(fd, buf, (size_t)want);
    }
    if (n < 0) {
        int er = errno;
        if (buf != stackbuf) free(buf);
        if (er == ENOTSUP) return 0;
        return efail(c, er, path, "cannot list xattrs");
    }
    int rc = 0;
    for (ssize_t off = 0; off < n; off += (ssize_t)strlen(buf + off) + 1) {
        const char *name = buf + off;
        if (!*name || is_overlay_xattr(name) || strcmp(name, "security.selinux") == 0)
            continue;
        int keep = 0;
        for (size_t i = 0; i < e->nxattrs && !keep; i++)
            keep = strcmp(e->xattrs[i].name, name) == 0;
        if (!keep && fremovexattr(fd, name) < 0 && errno != ENODATA) {
            rc = efail(c, errno, path, "cannot remove xattr '%s' the entry does not carry", name);
            break;
        }
    }
    if (buf != stackbuf) free(buf);
    return rc;
}

static int do_dir(ctx *c, const lfs_entry *e, int pfd, const char *base, const char *path,
                  size_t len, uint32_t uid, uint32_t gid)
{
    int fd = -1, replaced = 0, existed = 0;
    if (OPENING_UP(c, pfd, mkdirat(pfd, base, 0700)) < 0) {
        if (errno != EEXIST) return efail(c, errno, path, "cannot create directory");
        fd = open_dir_up(c, pfd, base);
        existed = fd >= 0;
        if (fd < 0) {
            if (errno != ENOTDIR && errno != ELOOP)
                return efail(c, errno, path, "cannot open the existing directory");
            /* a non-directory (or symlink) is there: replace it */
            replaced = 1;
            chain_changed(c);
            int rr = c->rec ? lfs_rec_removing(c->rec, pfd, base, NULL, c->err) : 0;
            if (rr < 0) return ectx(c, rr);
            if (OPENING_UP(c, pfd, unlinkat(pfd, base, 0)) < 0 && errno != ENOENT)
                return efail(c, errno, path, "cannot remove the existing entry");
            if (mkdirat(pfd, base, 0700) < 0) return efail(c, errno, path, "cannot create directory");
        }
    }
    if (fd < 0) {
        fd = openat(pfd, base, DIR_FLAGS | O_NOFOLLOW);
        if (fd < 0) return efail(c, errno, path, "cannot open the new directory");
    }
    int r = existed ? drop_stale_xattrs(c, e, fd, path) : 0;
    if (r == 0) r = meta_dir(c, e, fd, path, len, uid, gid);
    /* Overlay: the non-directory this replaces (a whiteout device, or any entry) hid
     * the lower directory of that name; the new directory must go on hiding it. */
    if (r == 0 && replaced && c->o->whiteouts == LFS_WH_OVERLAY)
        r = set_opaque(c, fd, path);
    if (r < 0) {
        close(fd);
        return r;
    }
    /* Its children come next: put it on the chain (the chain is its parent). */
    if (!c->stale && c->clen == parent_len(path, len) && c->lfd[c->nlev] == pfd)
        chain_push(c, path, len, fd);
    else
        close(fd);
    return 0;
}

/* ---- whiteouts ---- */

struct strbuf {
    char *p;
    size_t len, cap;
};

static int sb_add(struct strbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 4096;
        while (nc < b->len + n + 1) nc *= 2;
        char *np = realloc(b->p, nc);
        if (!np) return -ENOMEM;
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->len, s, n);
    b->p[b->len + n] = 0;
    b->len += n + 1;
    return 0;
}

/* Where directory path p[0..n) records the generation it was pruned in (NULL:
 * nowhere, it is not in the set). */
static uint64_t *pruned_mark(ctx *c, const char *p, size_t n)
{
    if (n == 0) return &c->root_pruned;
    pslot *sl = pset_find(c, p, n);
    return sl ? &sl->pruned : NULL;
}

/* Remove from directory dfd (path d[0..dn)) everything this layer did not write,
 * descending into directories this layer wrote or put content in.  memo: dfd was
 * reached by its own path, without symlinks (see "Prune memo" above). */
static int prune(ctx *c, int dfd, const char *d, size_t dn, int memo)
{
    struct strbuf work = {0}, del = {0};
    int rc = 0;
    if (memo) {
        uint64_t *m = pruned_mark(c, d, dn);
        if (m && *m == c->pgen) return 0;
    }
    memcpy(c->wpath, d, dn);
    if (sb_add(&work, "", 0) < 0) { rc = efail(c, ENOMEM, d, "out of memory"); goto out; }
    chain_changed(c);
    for (size_t wi = 0; wi < work.len;) {
        size_t rl = strlen(work.p + wi);
        char *rel = c->rel;
        memcpy(rel, work.p + wi, rl + 1);       /* work.p moves as it grows */
        wi += rl + 1;
        int fd = lfs_open_dir_beneath(dfd, rel, rl, c->use_openat2);
        if (fd < 0) {
            if (fd == -ENOENT || fd == -ENOTDIR || fd == -ELOOP) continue;
            rc = efail(c, -fd, d, "cannot open '%s' in the opaque directory", rel);
            goto out;
        }
        DIR *dir = fdopendir(fd);
        if (!dir) { rc = efail(c, errno, d, "cannot read the opaque directory"); close(fd); goto out; }
        /* the directory's path: d[/rel] */
        size_t base = dn;
        if (rl) {
            if (base) c->wpath[base++] = '/';
            memcpy(c->wpath + base, rel, rl);
            base += rl;
        }
        del.len = 0;
        struct dirent *de;
        errno = 0;
        while ((de = readdir(dir))) {
            const char *nm = de->d_name;
            if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0))) continue;
            size_t nl = strlen(nm), full = base;
            unsigned flags = 0;
            if (base + 1 + nl < LFS_PATH_MAX) {
                if (full) c->wpath[full++] = '/';
                memcpy(c->wpath + full, nm, nl);
                full += nl;
                flags = pset_get(c, c->wpath, full);
            }
            int r = 0;
            if (!flags) {
                r = sb_add(&del, nm, nl);
            } else {
                int isdir = de->d_type == DT_DIR;
                if (de->d_type == DT_UNKNOWN) {
                    struct stat st;
                    isdir = fstatat(fd, nm, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
                }
                if (isdir && memo) {
                    pslot *sl = pset_find(c, c->wpath, full);
                    if (sl && sl->pruned == c->pgen) isdir = 0;     /* nothing to do there */
                }
                if (isdir && rl + 1 + nl < LFS_PATH_MAX) {
                    char *sub = c->tmp;
                    size_t sl = 0;
                    if (rl) { memcpy(sub, rel, rl); sub[rl] = '/'; sl = rl + 1; }
                    memcpy(sub + sl, nm, nl);
                    r = sb_add(&work, sub, sl + nl);
                }
            }
            if (r < 0) { closedir(dir); rc = efail(c, ENOMEM, d, "out of memory"); goto out; }
            errno = 0;
        }
        if (errno) { rc = efail(c, errno, d, "cannot read the opaque directory"); closedir(dir); goto out; }
        for (size_t i = 0; i < del.len;) {
            const char *nm = del.p + i;
            i += strlen(nm) + 1;
            int r = c->rec ? lfs_rec_removing(c->rec, fd, nm, NULL, c->err) : 0;
            if (r == 0) r = remove_at(c, fd, nm);
            if (r < 0) { closedir(dir); rc = ectx(c, r); goto out; }
        }
        closedir(dir);
        if (memo) {                     /* this directory holds only the layer's own now */
            uint64_t *m = pruned_mark(c, c->wpath, base);
            if (m) *m = c->pgen;
        }
    }
out:
    free(work.p);
    free(del.p);
    return rc;
}

/* Open pfd/base as a directory without following it; in overlay mode a missing
 * one is made, and a non-directory this layer did not write is replaced.
 * Returns the fd, -ENOENT/-ENOTDIR when there is no such directory, or an error. */
static int open_target_dir(ctx *c, int pfd, const char *base, const char *path, size_t len, int make)
{
    int fd = open_dir_up(c, pfd, base);
    if (fd >= 0) return fd;
    int er = errno;
    if (er == ELOOP) er = ENOTDIR;
    if (er != ENOENT && er != ENOTDIR) return efail(c, er, path, "cannot open directory");
    if (!make || (er == ENOTDIR && (pset_get(c, path, len) & PS_WRITTEN))) return -er;
    if (er == ENOTDIR) {
        chain_changed(c);
        int r = c->rec ? lfs_rec_removing(c->rec, pfd, base, NULL, c->err) : 0;
        if (r < 0) return ectx(c, r);
        if (OPENING_UP(c, pfd, unlinkat(pfd, base, 0)) < 0 && errno != ENOENT)
            return efail(c, errno, path, "cannot remove the existing entry");
    }
    if (OPENING_UP(c, pfd, mkdirat(pfd, base, 0700)) < 0 && errno != EEXIST)
        return efail(c, errno, path, "cannot create directory");
    fd = openat(pfd, base, DIR_FLAGS | O_NOFOLLOW);
    if (fd < 0) return efail(c, errno, path, "cannot open the new directory");
    int r = fix_new_dir(c, fd);
    if (r < 0) {
        close(fd);
        return efail(c, -r, path, "cannot set owner/mode of new directory");
    }
    return fd;
}

/* Opaque marker for the directory c->name[0..dl). */
static int do_opaque(ctx *c, size_t dl)
{
    int ov = c->o->whiteouts == LFS_WH_OVERLAY;
    c->res->whiteouts++;
    char *d = arena_dup(&c->arena, c->name, dl);
    if (!d) return efail(c, ENOMEM, c->name, "out of memory");
    int fd = c->root_fd;
    if (dl) {
        size_t pl = parent_len(d, dl);
        int pfd = dir_fd(c, d, pl, ov);
        if (pfd < 0) return !ov && (pfd == -ENOENT || pfd == -ENOTDIR) ? 0 : pfd;
        fd = open_target_dir(c, pfd, d + (pl ? pl + 1 : 0), d, dl, ov);
        if (fd == -ENOENT || fd == -ENOTDIR) return 0;  /* no directory there to hide anything in */
        if (fd < 0) return fd;
    }
    /* in the set before the prune, which records in d's slot that it was pruned */
    int r = dl ? pset_add(c, d, dl, PS_ANCESTOR) : 0;
    if (r == 0) r = ov ? set_opaque(c, fd, dl ? d : "/") : prune(c, fd, d, dl, !dl || !c->alias_level);
    if (fd != c->root_fd) close(fd);
    return r;
}

/* A whiteout entry: base starts with ".wh."; the parent is c->name[0..plen). */
static int do_whiteout(ctx *c, size_t plen, const char *base)
{
    const char *path = c->name;
    if (strcmp(base, OPAQUE) == 0) return do_opaque(c, plen);
    if (has_prefix(base, WH_META)) return 0;     /* AUFS metadata (.wh..wh.plnk, ...) */
    const char *target = base + sizeof WH - 1;
    if (!*target || strcmp(target, ".") == 0 || strcmp(target, "..") == 0)
        return efail(c, EINVAL, path, "invalid whiteout name '%s'", base);
    c->res->whiteouts++;
    int ov = c->o->whiteouts == LFS_WH_OVERLAY;

    size_t tl = strlen(target), wl = 0;
    if (plen) {
        memcpy(c->wpath, c->name, plen);
        c->wpath[plen] = '/';
        wl = plen + 1;
    }
    memcpy(c->wpath + wl, target, tl + 1);
    wl += tl;
    unsigned flags = pset_get(c, c->wpath, wl) & (PS_WRITTEN | PS_ANCESTOR);

    int pfd = dir_fd(c, c->name, plen, ov);
    if (!ov && (pfd == -ENOENT || pfd == -ENOTDIR)) return 0;    /* nothing below to hide */
    if (pfd < 0) return pfd;

    if (flags) {
        /* This layer wrote the path or something beneath it: what it wrote stays,
         * only lower content goes, as if the whiteout had come first. */
        int fd = open_target_dir(c, pfd, target, c->wpath, wl, 0);
        if (fd >= 0) {
            char *t = arena_dup(&c->arena, c->wpath, wl);
            int r = !t ? efail(c, ENOMEM, path, "out of memory")
                       : ov ? set_opaque(c, fd, t) : prune(c, fd, t, wl, !c->alias_level);
            close(fd);
            return r;
        }
        if (fd != -ENOENT && fd != -ENOTDIR) return fd;
        if (flags & PS_WRITTEN) return 0;        /* this layer's own non-directory */
    }
    if (!ov) {
        chain_changed(c);
        int r = c->rec ? lfs_rec_removing(c->rec, pfd, target, NULL, c->err) : 0;
        if (r == 0) r = remove_at(c, pfd, target);
        return r < 0 ? ectx(c, r) : 0;
    }
    for (int tries = 0;; tries++) {
        if (OPENING_UP(c, pfd, mknodat(pfd, target, S_IFCHR, makedev(0, 0))) == 0) break;
        if (errno != EEXIST || tries > 0)
            return efail(c, errno, c->wpath, "cannot create whiteout device");
        int r = replace(c, pfd, target, c->wpath);
        if (r < 0) return r;
    }
    if (c->new_uid != NO_ID && fchownat(pfd, target, c->new_uid, c->new_gid, AT_SYMLINK_NOFOLLOW) < 0)
        return efail(c, errno, c->wpath, "cannot change owner of whiteout device");
    return 0;
}

/* ---- one entry ---- */

static int do_entry(ctx *c, const lfs_entry *e)
{
    ssize_t n = normalise(e->path, c->name);
    if (n == -EINVAL) return efail(c, EINVAL, e->path, "path escapes the root");
    if (n < 0) return efail(c, ENAMETOOLONG, e->path, "path is too long");
    size_t len = (size_t)n;
    size_t plen = parent_len(c->name, len);
    const char *base = c->name + (len && plen ? plen + 1 : 0);
    const char *path = c->name;

    if (c->o->whiteouts != LFS_WH_KEEP) {
        /* whiteout prefixes in the parent part */
        for (size_t i = 0; i < plen;) {
            const char *s = c->name + i;
            size_t cl = 0;
            while (i + cl < plen && s[cl] != '/') cl++;
            if (cl >= sizeof WH - 1 && memcmp(s, WH, sizeof WH - 1) == 0) {
                if (cl >= sizeof WH_META - 1 && memcmp(s, WH_META, sizeof WH_META - 1) == 0)
                    return 0;                   /* inside AUFS metadata: skipped */
                return efail(c, EINVAL, path, "whiteout name '%.*s' followed by '/'", (int)cl, s);
            }
            i += cl + 1;
        }
        if (len && has_prefix(base, WH)) return do_whiteout(c, plen, base);
    } else if (len && has_prefix(base, WH) && (!has_prefix(base, WH_META) || strcmp(base, OPAQUE) == 0)) {
        c->res->whiteouts++;
    }

    char type = e->type;
    if (type != LFS_T_REG && type != LFS_T_LINK && type != LFS_T_SYMLINK && type != LFS_T_CHR &&
        type != LFS_T_BLK && type != LFS_T_DIR && type != LFS_T_FIFO)
        return efail(c, EINVAL, path, "unsupported entry type '%c'", type >= 32 && type < 127 ? type : '?');

    if ((type == LFS_T_CHR || type == LFS_T_BLK) && c->o->skip_devices) {
        warn(c, "device '%s' not created (devices skipped)", len ? path : "/");
        return 0;
    }

    uint32_t uid = NO_ID, gid = NO_ID;
    if (type != LFS_T_LINK) {
        int r = entry_ids(c, e, len ? path : "/", &uid, &gid);
        if (r < 0) return r;
    }

    if (len == 0) {
        if (type != LFS_T_DIR) return efail(c, EINVAL, "/", "the root can only be a directory");
        return meta_dir(c, e, c->root_fd, "", 0, uid, gid);
    }
    if (strlen(base) > NAME_MAX) return efail(c, ENAMETOOLONG, path, "file name too long");

    int pfd = dir_fd(c, c->name, plen, 1);
    if (pfd < 0) return pfd;

    int r;
    switch (type) {
    case LFS_T_REG: r = do_file(c, e, pfd, base, path, uid, gid); break;
    case LFS_T_DIR: r = do_dir(c, e, pfd, base, path, len, uid, gid); break;
    case LFS_T_SYMLINK: r = do_symlink(c, e, pfd, base, path, uid, gid); break;
    case LFS_T_LINK: r = do_hardlink(c, e, pfd, base, path, len); break;
    default: r = do_node(c, e, pfd, base, path, uid, gid); break;
    }
    if (r < 0) return r;
    return c->track ? pset_add(c, c->name, len, PS_WRITTEN) : 0;
}

/* ---- directory times ---- */

static int cmp_dtime(const void *a, const void *b)
{
    const dtime *x = a, *y = b;
    if (x->depth != y->depth) return x->depth > y->depth ? -1 : 1;
    size_t n = x->len < y->len ? x->len : y->len;
    int r = memcmp(x->path, y->path, n);
    if (r) return r;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static int finish_dirs(ctx *c)
{
    c->e = NULL;
    if (c->ndt > 1) qsort(c->dt, c->ndt, sizeof *c->dt, cmp_dtime);
    for (size_t i = 0; i < c->ndt; i++) {
        const dtime *d = &c->dt[i];
        /* A directory listed again: its last record wins, and an earlier one
         * applied first could leave it closed to us (mode 0000 without root). */
        const dtime *nx = i + 1 < c->ndt ? &c->dt[i + 1] : NULL;
        if (nx && nx->len == d->len && memcmp(nx->path, d->path, d->len) == 0 &&
            same_ident(&nx->id, &d->id))
            continue;
        int fd;
        if (d->len == 0) {
            fd = c->root_fd;
        } else {
            size_t plen = parent_len(d->path, d->len);
            int pfd = dir_fd(c, d->path, plen, 0);
            if (pfd < 0) {
                if (pfd == -ENOENT || pfd == -ENOTDIR || pfd == -ELOOP) continue;   /* gone since */
                return pfd;
            }
            fd = openat(pfd, d->path + (plen ? plen + 1 : 0), DIR_FLAGS | O_NOFOLLOW);
            if (fd < 0) {
                if (errno == ENOENT || errno == ENOTDIR || errno == ELOOP) continue;
                return efail(c, errno, d->path, "cannot open directory to set its times");
            }
        }
        /* A directory removed or replaced since, or a path that now leads through a
         * symlink to another directory (d/a after d became a link to a): not ours. */
        dir_ident now;
        if (get_ident(fd, &now) < 0 || !same_ident(&now, &d->id)) {
            if (fd != c->root_fd) close(fd);
            continue;
        }
        int r = 0;
        if (d->set_mode && fchmod(fd, d->mode) < 0)
            r = efail(c, errno, d->len ? d->path : "/", "cannot change mode to %04o", d->mode);
        if (r == 0 && futimens(fd, d->ts) < 0)
            r = efail(c, errno, d->len ? d->path : "/", "cannot set directory times");
        if (fd != c->root_fd) close(fd);
        if (r < 0) return r;
    }
    return 0;
}

/* The modes open_up changed, put back; a directory this layer lists keeps the
 * mode finish_dirs gave it.  Every fd is closed; the first error is returned
 * when report is set. */
static int restore_opened(ctx *c, int report)
{
    int rc = 0;
    for (size_t i = c->nod; i-- > 0;) {
        opened_dir *o = &c->od[i];
        int listed = 0;
        for (size_t k = 0; k < c->ndt && !listed; k++)
            listed = c->dt[k].set_mode && same_ident(&c->dt[k].id, &o->id);
        if (!listed && fchmod(o->fd, o->mode) < 0 && report && rc == 0)
            rc = lfs_fail(c->err, errno, -1, NULL, NULL,
                          "cannot put back mode %04o of a directory opened up to write in it", o->mode);
        close(o->fd);
    }
    c->nod = 0;
    return rc;
}

/* ---- the call ---- */

int lfs_apply(int in_fd, int root_fd, const lfs_apply_opts *o, lfs_apply_result *res, lfs_error *err)
{
    if (!o || !res) return lfs_fail(err, EINVAL, -1, NULL, NULL, "missing options or result");
    memset(res, 0, sizeof *res);
    if (o->whiteouts < LFS_WH_APPLY || o->whiteouts > LFS_WH_KEEP)
        return lfs_fail(err, EINVAL, -1, NULL, NULL, "unknown whiteout mode %d", o->whiteouts);
    if (o->owners < LFS_OWNER_KEEP || o->owners > LFS_OWNER_MAP)
        return lfs_fail(err, EINVAL, -1, NULL, NULL, "unknown owner mode %d", o->owners);
    struct stat st;
    if (fstat(root_fd, &st) < 0) return lfs_fail(err, errno, -1, NULL, NULL, "cannot stat the root");
    if (!S_ISDIR(st.st_mode)) return lfs_fail(err, ENOTDIR, -1, NULL, NULL, "the root is not a directory");
    if (o->record && o->record_fd < 0)
        return lfs_fail(err, EBADF, -1, NULL, NULL, "no file descriptor for the tar-split record");

    ctx *c = calloc(1, sizeof *c);
    if (!c) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
    c->root_fd = root_fd;
    lfs_hash_key_init(&c->hkey);
    c->o = o;
    c->res = res;
    c->err = err;
    c->use_openat2 = lfs_has_openat2();
    c->euid = geteuid();
    c->egid = getegid();
    c->defer_dir_mode = c->euid != 0;
    c->track = o->whiteouts != LFS_WH_KEEP;
    c->lfd[0] = root_fd;
    c->dgen = 1;
    c->pgen = 1;
    c->fsuid = (uid_t)setfsuid((uid_t)-1);
    c->fsgid = (gid_t)setfsgid((gid_t)-1);
    c->umask_known = read_umask(&c->umask) == 0;
    switch (o->owners) {
    case LFS_OWNER_KEEP:
        c->new_uid = c->new_gid = c->euid == 0 ? 0 : NO_ID;
        break;
    case LFS_OWNER_MAP:
        if (map_id(o->uid_map, o->uid_map_len, 0, &c->new_uid) < 0 ||
            map_id(o->gid_map, o->gid_map_len, 0, &c->new_gid) < 0)
            c->new_uid = c->new_gid = NO_ID;
        break;
    default: c->new_uid = c->new_gid = NO_ID; break;
    }

    lfs_src *src = NULL;
    int rc = lfs_src_open(&src, in_fd, o->compression, o->threads, err);
    if (rc < 0) goto out;
    lfs_tar_limits lim = { o->max_entries, o->max_pax_size, o->max_xattrs_size };
    rc = lfs_tar_open(&c->tar, src, &lim, err);
    if (rc < 0) goto out;
    if (o->record) {
        rc = lfs_rec_open(&c->rec, o->record_fd, root_fd, err);
        if (rc < 0) goto out;
        lfs_tar_set_hook(c->tar, lfs_rec_hook, c->rec);
    }
    for (;;) {
        const lfs_entry *e = NULL;
        rc = lfs_tar_next(c->tar, &e, err);
        if (rc < 0) goto out;
        if (rc == 0) break;
        res->entries++;
        c->e = e;
        rc = do_entry(c, e);
        if (rc < 0) goto out;
        if (c->rec && (rc = lfs_rec_status(c->rec, err)) < 0) goto out;
    }
    c->e = NULL;
    if (c->rec && (rc = lfs_tar_drain(c->tar, err)) < 0) goto out;
    rc = lfs_src_finish(src, &res->digests, err);
    if (rc < 0) goto out;
    rc = finish_dirs(c);
    if (rc == 0 && c->rec) rc = lfs_rec_finish(c->rec, &res->digests, &res->record_size, err);
    if (rc == 0) rc = restore_opened(c, 1);
out:
    restore_opened(c, 0);
    chain_cut(c, 0);
    if (c->tar) lfs_tar_free(c->tar);
    lfs_rec_free(c->rec);
    if (src) lfs_src_free(src);
    free(c->slots);
    free(c->dt);
    free(c->od);
    arena_free(&c->arena);
    free(c);
    return rc < 0 ? rc : 0;
}
