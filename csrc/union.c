/*
 * The union filesystem of the aufs driver: AUFS-format layer directories
 * served as one merged tree through FUSE (libfuse3, low-level API).
 *
 * Layers are given top first.  A name is looked up from the top layer down:
 *   - ".wh.NAME" in a layer hides NAME in every layer below it;
 *   - ".wh..wh..opq" in a directory hides that directory's entries in every
 *     layer below; other ".wh..wh.*" names are bookkeeping, never visible;
 *   - a directory merges with the same-named directories below it until a
 *     layer has a whiteout, a non-directory or an opaque marker there;
 *   - a non-directory hides everything of that name below it;
 *   - a layer holding both NAME and .wh.NAME shows NAME (and hides the layers
 *     below), so a crash between "make NAME" and "remove .wh.NAME" is harmless.
 * No ".wh.*" name is ever visible through the mount.
 *
 * Nodes.  A directory is "loaded" the first time it is looked into: each of
 * its merged layers is listed once and every visible child becomes a node
 * (name, type, topmost layer, and for a directory the layers that merge into
 * it).  A node's address is its FUSE node id.  st_ino is the inode number of
 * the topmost layer's entry for a non-directory (so hardlinks inside a layer
 * share it) and of the lowest merged layer's for a directory (so copy-up never
 * changes it), tagged per device when layers span filesystems; st_nlink is the
 * backing one except for merged directories, which report 1 (as overlayfs
 * does: "unknown").
 * The kernel caches names and attributes (long timeouts on read-only mounts)
 * and gets attributes with directory listings (READDIRPLUS).  Reads and writes
 * go straight to the backing file, whose fd is the FUSE file handle; replies
 * to reads are spliced from it when the kernel allows.
 *
 * Writable mounts (layers[0] is the container's layer): anything that changes
 * a lower entry copies it up first (content with holes, owner, mode, xattrs
 * and times; missing parent directories are copied up with their metadata;
 * the parent's times are kept).  New entries land in the top layer, removing
 * the whiteout that hid the name (a directory made over a whiteout becomes
 * opaque); removing an entry that exists below leaves ".wh.NAME"; renaming a
 * directory that exists below is EXDEV (callers fall back to copying).
 * Copies are made under a temporary name (in the work directory, or beside
 * the target as ".wh..wh.cpup.N") and renamed into place.
 *
 * Locking: u->lock guards the node tree and is held only briefly (listing a
 * directory for the first time is the longest section).  u->wlock serialises
 * every change to the writable layer, so a node's parent, name, layer and
 * merged layers only change under both locks.  File data never takes a lock.
 */
#define FUSE_USE_VERSION 312
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/xattr.h>

#include <fuse_lowlevel.h>

#define WH_PREFIX ".wh."
#define WH_PREFIX_LEN 4
#define WH_META ".wh..wh."
#define WH_META_LEN 8
#define WH_OPAQUE ".wh..wh..opq"
#define TMP_PREFIX ".wh..wh.cpup."
#define MAX_LAYERS 4096
#define PBUF 4096

/* A file handle: the backing fd, the layer it was opened in, and the kernel's
 * backing id when the kernel does the file's I/O itself (passthrough), else 0. */
#define FH_MAKE(fd, layer, bid) \
    (((uint64_t)(bid) << 48) | ((uint64_t)(layer) << 32) | (uint32_t)(fd))
#define FH_FD(fh) ((int)(uint32_t)(fh))
#define FH_LAYER(fh) ((unsigned)(((fh) >> 32) & 0xffff))
#define FH_BID(fh) ((unsigned)((fh) >> 48))

/* FUSE passthrough (Linux >= 6.9), which libfuse 3.14 does not know: the
 * protocol pieces used when patching its messages (include/uapi/linux/fuse.h). */
#define K_FUSE_OPEN 14
#define K_FUSE_INIT 26
#define K_FUSE_CREATE 35
#define K_INIT_EXT (1u << 30)
#define K_INIT2_PASSTHROUGH (1u << 5)          /* FUSE_PASSTHROUGH >> 32 */
#define K_FOPEN_DIRECT_IO (1u << 0)
#define K_FOPEN_KEEP_CACHE (1u << 1)
#define K_FOPEN_PASSTHROUGH (1u << 7)
struct k_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define K_DEV_IOC_BACKING_OPEN _IOW(229, 1, struct k_backing_map)
#define K_DEV_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)

typedef struct unode unode;
struct unode {
    unode *parent;                /* NULL for the root and for detached nodes */
    unode *hnext;                 /* hash chain */
    unode *first, *last;          /* children in listing order */
    unode *next, *prev;           /* siblings; for detached nodes the detached list */
    char *name;
    uint32_t namelen;
    uint32_t hash;
    uint64_t nlookup;             /* references the kernel holds */
    uint64_t ino;                 /* st_ino as reported */
    uint32_t pins;                /* open directory listings holding the node */
    uint32_t nchildren;
    uint32_t type;                /* S_IFMT bits */
    uint16_t layer;               /* topmost layer holding the entry */
    uint16_t ndl, capdl;          /* directories: layers that merge, top first */
    uint8_t loaded;               /* directories: children are nodes */
    uint8_t detached;             /* removed from the tree; freed when unreferenced */
    uint16_t *dl;
    uint32_t bid;                 /* the kernel's backing id while passthrough opens last */
    uint32_t bid_refs;            /* open handles in passthrough */
    uint32_t ncached;             /* open handles whose I/O comes to the server */
};

typedef struct ulayer {
    int fd;                       /* O_PATH directory */
    char *path;                   /* absolute, for the xattr calls */
    uint64_t ino_tag;             /* or'ed into st_ino: 0 on the first layer's device */
} ulayer;

typedef struct ufs {
    ulayer *layers;
    size_t nlayers;
    int writable;
    int workfd;                   /* copy-up temporaries, or -1 */
    double entry_timeout, attr_timeout;
    pthread_mutex_t lock;         /* the node tree */
    pthread_mutex_t wlock;        /* changes to the writable layer */
    int locks_made;
    unode *root;
    unode **buckets;
    size_t nbuckets, count;
    unode *detached;
    uint64_t tmpseq;
    struct fuse_session *se;
    int sefd;                     /* /dev/fuse */
    int ready_fd;
    int ready;
    /* passthrough: wanted, offered by the kernel, switched on by the INIT reply */
    int pt_want, pt_kernel, pt_on;
} ufs;

/* One open directory: its children as they were at opendir. */
typedef struct dent {
    unode *node;
    uint64_t ino;
    uint32_t type;
    uint32_t off;                 /* name in names */
} dent;

typedef struct dsnap {
    size_t n;
    dent *e;
    char *names;
    uint64_t self_ino, parent_ino;
} dsnap;

static void lock(ufs *u) { pthread_mutex_lock(&u->lock); }
static void unlock(ufs *u) { pthread_mutex_unlock(&u->lock); }
static void wlock(ufs *u) { pthread_mutex_lock(&u->wlock); }
static void wunlock(ufs *u) { pthread_mutex_unlock(&u->wlock); }

static unode *N(ufs *u, fuse_ino_t ino)
{
    return ino == FUSE_ROOT_ID ? u->root : (unode *)(uintptr_t)ino;
}

static fuse_ino_t ID(ufs *u, unode *n)
{
    return n == u->root ? FUSE_ROOT_ID : (fuse_ino_t)(uintptr_t)n;
}

static uint64_t map_ino(const ufs *u, unsigned layer, uint64_t ino)
{
    return ino | u->layers[layer].ino_tag;
}

static int is_wh_name(const char *name)
{
    return strncmp(name, WH_PREFIX, WH_PREFIX_LEN) == 0;
}

static int topfd(const ufs *u)
{
    return u->layers[0].fd;
}

/* ------------------------------------------------------------ paths */

/* dir "/" prefix name suffix, with dir "." (the root) left out. */
static int pjoin(char *buf, size_t cap, const char *dir, const char *prefix, const char *name,
                 const char *suffix)
{
    int n;
    if (dir[0] == '.' && dir[1] == 0)
        n = snprintf(buf, cap, "%s%s%s", prefix, name, suffix);
    else
        n = snprintf(buf, cap, "%s/%s%s%s", dir, prefix, name, suffix);
    if (n < 0 || (size_t)n >= cap) return -ENAMETOOLONG;
    return n;
}

/* The node's path relative to a layer root ("." for the root).  Lock held. */
static int node_path(const ufs *u, const unode *n, char *buf, size_t cap)
{
    if (n == u->root) {
        buf[0] = '.';
        buf[1] = 0;
        return 1;
    }
    size_t len = 0;
    for (const unode *p = n; p != u->root; p = p->parent) {
        if (!p->parent) return -ENOENT;     /* detached */
        len += p->namelen + 1;
    }
    len -= 1;
    if (len + 1 > cap) return -ENAMETOOLONG;
    buf[len] = 0;
    size_t pos = len;
    for (const unode *p = n; p != u->root; p = p->parent) {
        pos -= p->namelen;
        memcpy(buf + pos, p->name, p->namelen);
        if (pos) buf[--pos] = '/';
    }
    return (int)len;
}

/* Absolute path of a relative path in a layer (for the xattr calls). */
static int abs_path(const ufs *u, unsigned layer, const char *rel, char *buf, size_t cap)
{
    int n;
    if (rel[0] == '.' && rel[1] == 0)
        n = snprintf(buf, cap, "%s", u->layers[layer].path);
    else
        n = snprintf(buf, cap, "%s/%s", u->layers[layer].path, rel);
    if (n < 0 || (size_t)n >= cap) return -ENAMETOOLONG;
    return n;
}

/* ------------------------------------------------------------ node table */

static uint32_t hash_bytes(uint64_t seed, const char *s, size_t len)
{
    uint64_t h = 1469598103934665603ull ^ seed;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return (uint32_t)(h ^ (h >> 32));
}

static uint32_t node_hash(const unode *parent, const char *name, size_t len)
{
    return hash_bytes((uint64_t)(uintptr_t)parent * 0x9E3779B97F4A7C15ull, name, len);
}

static unode *ht_find(ufs *u, const unode *parent, const char *name, size_t len)
{
    uint32_t h = node_hash(parent, name, len);
    for (unode *n = u->buckets[h & (u->nbuckets - 1)]; n; n = n->hnext)
        if (n->hash == h && n->parent == parent && n->namelen == len &&
            memcmp(n->name, name, len) == 0)
            return n;
    return NULL;
}

static int ht_add(ufs *u, unode *n)
{
    if (u->count + 1 > u->nbuckets) {
        size_t nb = u->nbuckets * 2;
        unode **b = calloc(nb, sizeof *b);
        if (!b) return -ENOMEM;
        for (size_t i = 0; i < u->nbuckets; i++) {
            unode *c = u->buckets[i];
            while (c) {
                unode *next = c->hnext;
                c->hnext = b[c->hash & (nb - 1)];
                b[c->hash & (nb - 1)] = c;
                c = next;
            }
        }
        free(u->buckets);
        u->buckets = b;
        u->nbuckets = nb;
    }
    unode **head = &u->buckets[n->hash & (u->nbuckets - 1)];
    n->hnext = *head;
    *head = n;
    u->count++;
    return 0;
}

static void ht_del(ufs *u, unode *n)
{
    for (unode **pp = &u->buckets[n->hash & (u->nbuckets - 1)]; *pp; pp = &(*pp)->hnext)
        if (*pp == n) {
            *pp = n->hnext;
            n->hnext = NULL;
            u->count--;
            return;
        }
}

static int dl_add(unode *n, unsigned layer, int front)
{
    if (n->ndl == n->capdl) {
        unsigned cap = n->capdl ? n->capdl * 2u : 2u;
        if (cap > MAX_LAYERS) cap = MAX_LAYERS;
        uint16_t *p = realloc(n->dl, cap * sizeof *p);
        if (!p) return -ENOMEM;
        n->dl = p;
        n->capdl = (uint16_t)cap;
    }
    if (front) {
        memmove(n->dl + 1, n->dl, n->ndl * sizeof *n->dl);
        n->dl[0] = (uint16_t)layer;
    } else {
        n->dl[n->ndl] = (uint16_t)layer;
    }
    n->ndl++;
    return 0;
}

static void node_free(unode *n)
{
    free(n->name);
    free(n->dl);
    free(n);
}

static void link_child(unode *parent, unode *n)
{
    n->parent = parent;
    n->prev = parent->last;
    n->next = NULL;
    if (parent->last) parent->last->next = n;
    else parent->first = n;
    parent->last = n;
    parent->nchildren++;
}

static void unlink_child(unode *n)
{
    unode *p = n->parent;
    if (n->prev) n->prev->next = n->next;
    else p->first = n->next;
    if (n->next) n->next->prev = n->prev;
    else p->last = n->prev;
    p->nchildren--;
    n->next = n->prev = NULL;
}

static unode *node_new(ufs *u, unode *parent, const char *name, size_t len, uint32_t type,
                       unsigned layer, uint64_t ino)
{
    unode *n = calloc(1, sizeof *n);
    if (!n) return NULL;
    n->name = malloc(len + 1);
    if (!n->name) {
        free(n);
        return NULL;
    }
    memcpy(n->name, name, len);
    n->name[len] = 0;
    n->namelen = (uint32_t)len;
    n->hash = node_hash(parent, name, len);
    n->type = type;
    n->layer = (uint16_t)layer;
    n->ino = ino;
    n->parent = parent;
    if (S_ISDIR(type) && dl_add(n, layer, 0) < 0) {
        node_free(n);
        return NULL;
    }
    if (ht_add(u, n) < 0) {
        node_free(n);
        return NULL;
    }
    link_child(parent, n);
    return n;
}

/* Free a detached node once neither the kernel nor a listing refers to it. */
static void node_release(ufs *u, unode *n)
{
    if (!n->detached || n->nlookup || n->pins) return;
    if (n->prev) n->prev->next = n->next;
    else u->detached = n->next;
    if (n->next) n->next->prev = n->prev;
    node_free(n);
}

/* Take a node (and anything below it) out of the tree. */
static void node_detach(ufs *u, unode *n)
{
    while (n->first) node_detach(u, n->first);
    ht_del(u, n);
    unlink_child(n);
    n->parent = NULL;
    n->detached = 1;
    n->next = u->detached;
    n->prev = NULL;
    if (u->detached) u->detached->prev = n;
    u->detached = n;
    node_release(u, n);
}

/* Give a node a new parent and name. */
static int node_move(ufs *u, unode *n, unode *parent, const char *name, size_t len)
{
    char *nm = malloc(len + 1);
    if (!nm) return -ENOMEM;
    memcpy(nm, name, len);
    nm[len] = 0;
    ht_del(u, n);
    unlink_child(n);
    free(n->name);
    n->name = nm;
    n->namelen = (uint32_t)len;
    n->hash = node_hash(parent, name, len);
    link_child(parent, n);
    if (ht_add(u, n) < 0) {
        /* cannot grow the table: the chain still works at the current size */
        unode **head = &u->buckets[n->hash & (u->nbuckets - 1)];
        n->hnext = *head;
        *head = n;
        u->count++;
    }
    return 0;
}

/* ------------------------------------------------------------ listing a directory */

typedef struct nsent {
    uint32_t hash, off, len;
    int32_t close;                /* layers below this one are hidden for the name */
    unode *node;
} nsent;

typedef struct nameset {
    nsent *t;
    size_t cap, n;
    char *buf;
    size_t blen, bcap;
} nameset;

static nsent *ns_get(nameset *s, const char *name, size_t len)
{
    if ((s->n + 1) * 2 > s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        nsent *t = calloc(cap, sizeof *t);
        if (!t) return NULL;
        for (size_t i = 0; i < s->cap; i++) {
            if (!s->t[i].len) continue;
            size_t j = s->t[i].hash & (cap - 1);
            while (t[j].len) j = (j + 1) & (cap - 1);
            t[j] = s->t[i];
        }
        free(s->t);
        s->t = t;
        s->cap = cap;
    }
    uint32_t h = hash_bytes(0, name, len);
    for (size_t i = h & (s->cap - 1);; i = (i + 1) & (s->cap - 1)) {
        nsent *e = &s->t[i];
        if (!e->len) {
            if (s->blen + len > s->bcap) {
                size_t bcap = s->bcap ? s->bcap * 2 : 4096;
                while (bcap < s->blen + len) bcap *= 2;
                char *b = realloc(s->buf, bcap);
                if (!b) return NULL;
                s->buf = b;
                s->bcap = bcap;
            }
            memcpy(s->buf + s->blen, name, len);
            e->hash = h;
            e->off = (uint32_t)s->blen;
            e->len = (uint32_t)len;
            e->close = INT32_MAX;
            e->node = NULL;
            s->blen += len;
            s->n++;
            return e;
        }
        if (e->hash == h && e->len == len && memcmp(s->buf + e->off, name, len) == 0) return e;
    }
}

static uint32_t dtype_mode(unsigned char t)
{
    switch (t) {
    case DT_REG: return S_IFREG;
    case DT_DIR: return S_IFDIR;
    case DT_LNK: return S_IFLNK;
    case DT_CHR: return S_IFCHR;
    case DT_BLK: return S_IFBLK;
    case DT_FIFO: return S_IFIFO;
    case DT_SOCK: return S_IFSOCK;
    default: return 0;
    }
}

/* Whether layer/path is there (not following a final symlink): 1, 0, or <0. */
static int exists_at(int dirfd, const char *path)
{
    struct stat st;
    if (fstatat(dirfd, path, &st, AT_SYMLINK_NOFOLLOW) == 0) return 1;
    if (errno == ENOENT || errno == ENOTDIR) return 0;
    return -errno;
}

/* A child directory that merges over several layers stops at the first one
 * holding an opaque marker. */
static int cut_opaque(ufs *u, unode *d, const char *dpath)
{
    char p[PBUF];
    struct stat st;
    for (unode *c = d->first; c; c = c->next) {
        if (!S_ISDIR(c->type) || c->ndl < 2) continue;
        int n = pjoin(p, sizeof p, dpath, "", c->name, "/" WH_OPAQUE);
        if (n < 0) return -ENAMETOOLONG;
        for (unsigned k = 0; k + 1 < c->ndl; k++) {
            int r = exists_at(u->layers[c->dl[k]].fd, p);
            if (r < 0) return r;
            if (r) {
                c->ndl = (uint16_t)(k + 1);
                p[n - (int)strlen("/" WH_OPAQUE)] = 0;     /* the directory itself */
                if (fstatat(u->layers[c->dl[k]].fd, p, &st, AT_SYMLINK_NOFOLLOW) < 0)
                    return -errno;
                c->ino = map_ino(u, c->dl[k], st.st_ino);
                break;
            }
        }
    }
    return 0;
}

static int list_layer(ufs *u, unode *d, unsigned L, const char *dpath, nameset *ns)
{
    int fd = openat(u->layers[L].fd, dpath, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return (errno == ENOENT || errno == ENOTDIR) ? 0 : -errno;
    DIR *dir = fdopendir(fd);
    if (!dir) {
        int e = errno;
        close(fd);
        return -e;
    }
    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(dir);
        if (!de) {
            if (errno) rc = -errno;
            break;
        }
        const char *nm = de->d_name;
        size_t len = strlen(nm);
        if (nm[0] == '.' && (len == 1 || (len == 2 && nm[1] == '.'))) continue;
        if (len >= WH_PREFIX_LEN && memcmp(nm, WH_PREFIX, WH_PREFIX_LEN) == 0) {
            if ((len >= WH_META_LEN && memcmp(nm, WH_META, WH_META_LEN) == 0) ||
                len == WH_PREFIX_LEN)
                continue;
            nsent *e = ns_get(ns, nm + WH_PREFIX_LEN, len - WH_PREFIX_LEN);
            if (!e) {
                rc = -ENOMEM;
                break;
            }
            if (e->close > (int32_t)L) e->close = (int32_t)L;
            continue;
        }
        nsent *e = ns_get(ns, nm, len);
        if (!e) {
            rc = -ENOMEM;
            break;
        }
        if (e->close < (int32_t)L) continue;          /* hidden by a higher layer */
        uint32_t type = dtype_mode(de->d_type);
        if (!type) {
            struct stat st;
            if (fstatat(fd, nm, &st, AT_SYMLINK_NOFOLLOW) < 0) {
                if (errno == ENOENT) continue;
                rc = -errno;
                break;
            }
            type = st.st_mode & S_IFMT;
        }
        if (!e->node) {
            e->node = node_new(u, d, nm, len, type, L, map_ino(u, L, de->d_ino));
            if (!e->node) {
                rc = -ENOMEM;
                break;
            }
            if (!S_ISDIR(type) && e->close > (int32_t)L) e->close = (int32_t)L;
        } else if (S_ISDIR(e->node->type) && S_ISDIR(type)) {
            if (dl_add(e->node, L, 0) < 0) {
                rc = -ENOMEM;
                break;
            }
            e->node->ino = map_ino(u, L, de->d_ino);  /* the lowest merged layer's */
        } else if (e->close > (int32_t)L) {
            e->close = (int32_t)L;                     /* a non-directory under a directory */
        }
    }
    closedir(dir);
    return rc;
}

/* List every merged layer of d once and make its visible children nodes.  Lock held. */
static int load_dir(ufs *u, unode *d)
{
    char path[PBUF];
    int rc = node_path(u, d, path, sizeof path);
    if (rc < 0) return rc;
    nameset ns;
    memset(&ns, 0, sizeof ns);
    rc = 0;
    for (unsigned k = 0; k < d->ndl && rc == 0; k++) rc = list_layer(u, d, d->dl[k], path, &ns);
    if (rc == 0) rc = cut_opaque(u, d, path);
    free(ns.t);
    free(ns.buf);
    if (rc < 0) {
        while (d->first) node_detach(u, d->first);
        return rc;
    }
    d->loaded = 1;
    return 0;
}

static int ensure_loaded(ufs *u, unode *d)
{
    if (!S_ISDIR(d->type)) return -ENOTDIR;
    if (d->loaded) return 0;
    if (d->detached) return -ENOENT;
    return load_dir(u, d);
}

/* ------------------------------------------------------------ attributes */

/* The attributes the union shows for an entry stat'ed in its topmost layer:
 * a directory keeps the inode number of its lowest merged layer (dino), which
 * copy-up never changes; a merged directory has link count 1 ("unknown"). */
static void fix_stat(const ufs *u, unsigned layer, unsigned ndl, uint64_t dino, struct stat *st)
{
    if (S_ISDIR(st->st_mode) && dino) st->st_ino = dino;
    else st->st_ino = map_ino(u, layer, st->st_ino);
    if (S_ISDIR(st->st_mode) && ndl > 1) st->st_nlink = 1;
}

/* Path, topmost layer and merged-layer count of a node, read under the lock. */
static int node_where(ufs *u, unode *n, char *path, unsigned *layer, unsigned *ndl)
{
    lock(u);
    int rc = node_path(u, n, path, PBUF);
    *layer = n->layer;
    *ndl = n->ndl;
    unlock(u);
    return rc;
}

static int node_stat(ufs *u, unode *n, struct stat *st)
{
    char path[PBUF];
    lock(u);
    int rc = node_path(u, n, path, PBUF);
    unsigned layer = n->layer, ndl = n->ndl;
    uint64_t dino = S_ISDIR(n->type) ? n->ino : 0;
    unlock(u);
    if (rc < 0) return rc;
    if (fstatat(u->layers[layer].fd, path, st, AT_SYMLINK_NOFOLLOW) < 0) return -errno;
    fix_stat(u, layer, ndl, dino, st);
    return 0;
}

static void entry_of(ufs *u, struct fuse_entry_param *e, unode *n, const struct stat *st)
{
    memset(e, 0, sizeof *e);
    e->ino = ID(u, n);
    e->attr = *st;
    e->attr_timeout = u->attr_timeout;
    e->entry_timeout = u->entry_timeout;
}

static void forget_ref(ufs *u, unode *n, uint64_t k)
{
    lock(u);
    n->nlookup = n->nlookup > k ? n->nlookup - k : 0;
    node_release(u, n);
    unlock(u);
}

/* Reply with the entry of n, counting the kernel's new reference. */
static void reply_node(fuse_req_t req, ufs *u, unode *n)
{
    struct stat st;
    lock(u);
    n->nlookup++;
    unlock(u);
    int rc = node_stat(u, n, &st);
    if (rc < 0) {
        forget_ref(u, n, 1);
        fuse_reply_err(req, -rc);
        return;
    }
    struct fuse_entry_param e;
    entry_of(u, &e, n, &st);
    fuse_reply_entry(req, &e);
}

static void invalidate_attr(ufs *u, unode *n)
{
    int known;
    lock(u);
    known = n->nlookup > 0;
    unlock(u);
    if (known && u->se) fuse_lowlevel_notify_inval_inode(u->se, ID(u, n), -1, 0);
}

/* ------------------------------------------------------------ passthrough */

/*
 * libfuse sends a reply from the thread that calls fuse_reply_*(), through
 * the custom I/O writev below.  Just before replying to INIT, OPEN or CREATE a
 * handler says here what to add to the reply; the writev hook adds it and
 * forgets it.  (Per thread, so concurrent sessions and requests never mix.)
 */
static __thread ufs *tl_init_patch;
static __thread unsigned tl_open_bid;

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    ssize_t n = read(fd, buf, len);
    ufs *u = userdata;
    if (u && n >= 40 + 20) {
        uint32_t opcode, flags, flags2;
        memcpy(&opcode, (char *)buf + 4, 4);
        if (opcode == K_FUSE_INIT) {
            memcpy(&flags, (char *)buf + 40 + 12, 4);
            memcpy(&flags2, (char *)buf + 40 + 16, 4);
            u->pt_kernel = (flags & K_INIT_EXT) && (flags2 & K_INIT2_PASSTHROUGH);
        }
    }
    return n;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    if ((tl_init_patch || tl_open_bid) && count >= 2) {
        int32_t error;
        memcpy(&error, (char *)iov[0].iov_base + 4, 4);
        char *p = iov[count - 1].iov_base;
        size_t len = iov[count - 1].iov_len;
        if (error == 0 && tl_init_patch && len >= 40) {
            /* fuse_init_out: flags at 12, flags2 at 32, max_stack_depth at 36 */
            uint32_t flags, flags2, depth = 1;
            memcpy(&flags, p + 12, 4);
            memcpy(&flags2, p + 32, 4);
            flags |= K_INIT_EXT;
            flags2 |= K_INIT2_PASSTHROUGH;
            memcpy(p + 12, &flags, 4);
            memcpy(p + 32, &flags2, 4);
            memcpy(p + 36, &depth, 4);
            tl_init_patch->pt_on = 1;
        } else if (error == 0 && tl_open_bid && len >= 16) {
            /* fuse_open_out ends the reply: fh, open_flags, backing_id */
            uint32_t flags;
            int32_t bid = (int32_t)tl_open_bid;
            memcpy(&flags, p + len - 8, 4);
            flags = (flags | K_FOPEN_PASSTHROUGH) & ~(K_FOPEN_DIRECT_IO | K_FOPEN_KEEP_CACHE);
            memcpy(p + len - 8, &flags, 4);
            memcpy(p + len - 4, &bid, 4);
        }
        tl_init_patch = NULL;
        tl_open_bid = 0;
    }
    return writev(fd, iov, count);
}

static ssize_t io_splice_receive(int fdin, off_t *offin, int fdout, off_t *offout, size_t len,
                                 unsigned int flags, void *userdata)
{
    return splice(fdin, (loff_t *)offin, fdout, (loff_t *)offout, len, flags);
}

static ssize_t io_splice_send(int fdin, off_t *offin, int fdout, off_t *offout, size_t len,
                              unsigned int flags, void *userdata)
{
    return splice(fdin, (loff_t *)offin, fdout, (loff_t *)offout, len, flags);
}

static const struct fuse_custom_io union_io = {
    .writev = io_writev,
    .read = io_read,
    .splice_receive = io_splice_receive,
    .splice_send = io_splice_send,
};

/* A new open handle of n (file fd, in layer): its backing id when the kernel
 * will do its I/O, else 0.  Every passthrough open of one inode must share the
 * backing file, and an inode is never in passthrough and cached I/O at once,
 * so only files that cannot be copied up get passthrough.  Lock held. */
static unsigned pt_attach(ufs *u, unode *n, int fd, unsigned layer)
{
    if (!u->pt_on || !S_ISREG(n->type) || (u->writable && layer != 0) || n->ncached) {
        n->ncached++;
        return 0;
    }
    if (n->bid_refs == 0) {
        struct k_backing_map map;
        memset(&map, 0, sizeof map);
        map.fd = fd;
        int id = ioctl(u->sefd, K_DEV_IOC_BACKING_OPEN, &map);
        if (id <= 0 || id > 0xffff) {
            if (id > 0) {
                uint32_t b = (uint32_t)id;
                ioctl(u->sefd, K_DEV_IOC_BACKING_CLOSE, &b);
            } else if (errno == EPERM || errno == EOPNOTSUPP || errno == ENOTTY) {
                u->pt_on = 0;             /* not allowed here: stop asking */
            }
            n->ncached++;
            return 0;
        }
        n->bid = (uint32_t)id;
    }
    n->bid_refs++;
    return n->bid;
}

static void pt_detach(ufs *u, unode *n, unsigned bid)
{
    if (!bid) {
        if (n->ncached) n->ncached--;
        return;
    }
    if (n->bid_refs && --n->bid_refs == 0) {
        uint32_t b = n->bid;
        ioctl(u->sefd, K_DEV_IOC_BACKING_CLOSE, &b);
        n->bid = 0;
    }
}

/* ------------------------------------------------------------ read side */

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    ufs *u = fuse_req_userdata(req);
    size_t len = strlen(name);
    unode *n = NULL;
    int rc = 0;
    if (!is_wh_name(name)) {
        lock(u);
        unode *d = N(u, parent);
        rc = ensure_loaded(u, d);
        if (rc == 0) n = ht_find(u, d, name, len);
        unlock(u);
    }
    if (rc < 0) {
        fuse_reply_err(req, -rc);
        return;
    }
    if (!n) {
        struct fuse_entry_param e;
        memset(&e, 0, sizeof e);
        e.entry_timeout = u->entry_timeout;
        fuse_reply_entry(req, &e);
        return;
    }
    reply_node(req, u, n);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    ufs *u = fuse_req_userdata(req);
    forget_ref(u, N(u, ino), nlookup);
    fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    ufs *u = fuse_req_userdata(req);
    lock(u);
    for (size_t i = 0; i < count; i++) {
        unode *n = N(u, forgets[i].ino);
        n->nlookup = n->nlookup > forgets[i].nlookup ? n->nlookup - forgets[i].nlookup : 0;
        node_release(u, n);
    }
    unlock(u);
    fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    ufs *u = fuse_req_userdata(req);
    struct stat st;
    if (fi) {
        if (fstat(FH_FD(fi->fh), &st) < 0) {
            fuse_reply_err(req, errno);
            return;
        }
        fix_stat(u, FH_LAYER(fi->fh), 1, 0, &st);
    } else {
        int rc = node_stat(u, N(u, ino), &st);
        if (rc < 0) {
            fuse_reply_err(req, -rc);
            return;
        }
    }
    fuse_reply_attr(req, &st, u->attr_timeout);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
    ufs *u = fuse_req_userdata(req);
    char path[PBUF], buf[PBUF + 1];
    unsigned layer, ndl;
    int rc = node_where(u, N(u, ino), path, &layer, &ndl);
    if (rc < 0) {
        fuse_reply_err(req, -rc);
        return;
    }
    ssize_t n = readlinkat(u->layers[layer].fd, path, buf, sizeof buf);
    if (n < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    if ((size_t)n >= sizeof buf) {
        fuse_reply_err(req, ENAMETOOLONG);
        return;
    }
    buf[n] = 0;
    fuse_reply_readlink(req, buf);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    ufs *u = fuse_req_userdata(req);
    lock(u);
    unode *d = N(u, ino);
    int rc = ensure_loaded(u, d);
    dsnap *s = NULL;
    if (rc == 0) {
        size_t names = 0;
        for (unode *c = d->first; c; c = c->next) names += c->namelen + 1;
        s = calloc(1, sizeof *s);
        if (s) {
            s->e = malloc((d->nchildren ? d->nchildren : 1) * sizeof *s->e);
            s->names = malloc(names ? names : 1);
        }
        if (!s || !s->e || !s->names) {
            rc = -ENOMEM;
        } else {
            size_t off = 0;
            for (unode *c = d->first; c; c = c->next) {
                dent *e = &s->e[s->n++];
                e->node = c;
                e->ino = c->ino;
                e->type = c->type;
                e->off = (uint32_t)off;
                memcpy(s->names + off, c->name, c->namelen + 1);
                off += c->namelen + 1;
                c->pins++;
            }
            s->self_ino = d->ino;
            s->parent_ino = d->parent ? d->parent->ino : d->ino;
        }
    }
    unlock(u);
    if (rc < 0) {
        if (s) {
            free(s->e);
            free(s->names);
            free(s);
        }
        fuse_reply_err(req, -rc);
        return;
    }
    fi->fh = (uint64_t)(uintptr_t)s;
    if (!u->writable) {
        fi->cache_readdir = 1;
        fi->keep_cache = 1;
    }
    fuse_reply_open(req, fi);
}

static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi, int plus)
{
    ufs *u = fuse_req_userdata(req);
    dsnap *s = (dsnap *)(uintptr_t)fi->fh;
    char *buf = malloc(size ? size : 1);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    char dpath[PBUF], cpath[PBUF];
    int dlen = -1;
    if (plus) {
        lock(u);
        dlen = node_path(u, N(u, ino), dpath, sizeof dpath);
        unlock(u);
    }
    size_t pos = 0;
    for (size_t i = off < 0 ? 0 : (size_t)off; i < s->n + 2; i++) {
        const char *name;
        struct stat st;
        unode *c = NULL;
        memset(&st, 0, sizeof st);
        if (i == 0) {
            name = ".";
            st.st_ino = s->self_ino;
            st.st_mode = S_IFDIR;
        } else if (i == 1) {
            name = "..";
            st.st_ino = s->parent_ino;
            st.st_mode = S_IFDIR;
        } else {
            dent *d = &s->e[i - 2];
            c = d->node;
            name = s->names + d->off;
            st.st_ino = d->ino;
            st.st_mode = d->type;
        }
        size_t ent;
        if (!plus) {
            ent = fuse_add_direntry(req, buf + pos, size - pos, name, &st, (off_t)(i + 1));
        } else {
            struct fuse_entry_param e;
            memset(&e, 0, sizeof e);
            e.attr = st;
            int counted = 0;
            if (c && dlen >= 0) {
                lock(u);
                unsigned layer = c->layer, ndl = c->ndl;
                uint64_t dino = S_ISDIR(c->type) ? c->ino : 0;
                int gone = c->detached;
                unlock(u);
                struct stat cst;
                if (!gone && pjoin(cpath, sizeof cpath, dpath, "", name, "") >= 0 &&
                    fstatat(u->layers[layer].fd, cpath, &cst, AT_SYMLINK_NOFOLLOW) == 0) {
                    fix_stat(u, layer, ndl, dino, &cst);
                    entry_of(u, &e, c, &cst);
                    counted = 1;
                }
            }
            ent = fuse_add_direntry_plus(req, buf + pos, size - pos, name, &e, (off_t)(i + 1));
            if (counted && ent <= size - pos) {
                lock(u);
                c->nlookup++;
                unlock(u);
            }
        }
        if (ent > size - pos) break;
        pos += ent;
    }
    fuse_reply_buf(req, buf, pos);
    free(buf);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    do_readdir(req, ino, size, off, fi, 0);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                           struct fuse_file_info *fi)
{
    do_readdir(req, ino, size, off, fi, 1);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    ufs *u = fuse_req_userdata(req);
    dsnap *s = (dsnap *)(uintptr_t)fi->fh;
    lock(u);
    for (size_t i = 0; i < s->n; i++) {
        unode *c = s->e[i].node;
        c->pins--;
        node_release(u, c);
    }
    unlock(u);
    free(s->e);
    free(s->names);
    free(s);
    fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    ufs *u = fuse_req_userdata(req);
    struct statvfs sv;
    if (fstatvfs(topfd(u), &sv) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    fuse_reply_statfs(req, &sv);
}

/* getxattr (name) or listxattr (name NULL) of ino where it lives: the size
 * needed when size is 0, else the value or list. */
static void reply_xattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    ufs *u = fuse_req_userdata(req);
    char path[PBUF], apath[PBUF + 512];
    unsigned layer, ndl;
    int rc = node_where(u, N(u, ino), path, &layer, &ndl);
    if (rc >= 0) rc = abs_path(u, layer, path, apath, sizeof apath);
    if (rc < 0) {
        fuse_reply_err(req, -rc);
        return;
    }
    char *buf = NULL;
    if (size && !(buf = malloc(size))) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    ssize_t n = name ? lgetxattr(apath, name, buf, size) : llistxattr(apath, buf, size);
    if (n < 0) fuse_reply_err(req, errno);
    else if (size == 0) fuse_reply_xattr(req, (size_t)n);
    else fuse_reply_buf(req, buf, (size_t)n);
    free(buf);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    reply_xattr(req, ino, name, size);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    reply_xattr(req, ino, NULL, size);
}

/* ------------------------------------------------------------ copy-up */

static int copy_xattrs_fd(int sfd, int dfd)
{
    ssize_t n = flistxattr(sfd, NULL, 0);
    if (n < 0) return (errno == ENOTSUP) ? 0 : -errno;
    if (n == 0) return 0;
    char *list = malloc((size_t)n);
    if (!list) return -ENOMEM;
    n = flistxattr(sfd, list, (size_t)n);
    int rc = n < 0 ? -errno : 0;
    char *val = NULL;
    size_t cap = 0;
    for (ssize_t i = 0; rc == 0 && i < n;) {
        const char *name = list + i;
        i += (ssize_t)strlen(name) + 1;
        ssize_t v = fgetxattr(sfd, name, NULL, 0);
        if (v < 0) {
            if (errno != ENODATA) rc = -errno;
            continue;
        }
        if ((size_t)v > cap) {
            char *p = realloc(val, (size_t)v);
            if (!p) {
                rc = -ENOMEM;
                break;
            }
            val = p;
            cap = (size_t)v;
        }
        v = fgetxattr(sfd, name, val, cap);
        if (v < 0) {
            if (errno != ENODATA) rc = -errno;
            continue;
        }
        if (fsetxattr(dfd, name, val, (size_t)v, 0) < 0) rc = -errno;
    }
    free(val);
    free(list);
    return rc;
}

/* Owner, mode, xattrs and times of sfd onto dfd (chown first: it clears set-id bits). */
static int copy_meta(int sfd, int dfd, const struct stat *st)
{
    if (fchown(dfd, st->st_uid, st->st_gid) < 0) return -errno;
    if (fchmod(dfd, st->st_mode & 07777) < 0) return -errno;
    int rc = copy_xattrs_fd(sfd, dfd);
    if (rc < 0) return rc;
    struct timespec ts[2] = { st->st_atim, st->st_mtim };
    if (futimens(dfd, ts) < 0) return -errno;
    return 0;
}

/* A copy of the directory (without its entries) or of the regular file without
 * its data, made at ddir/dname. */
static int copy_shell(int sdir, const char *spath, int ddir, const char *dname, int isdir)
{
    int sfd = openat(sdir, spath,
                     O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | (isdir ? O_DIRECTORY : 0));
    if (sfd < 0) return -errno;
    struct stat st;
    int dfd = -1, rc = 0;
    if (fstat(sfd, &st) < 0) {
        rc = -errno;
        goto out;
    }
    if (isdir) {
        if (mkdirat(ddir, dname, 0700) < 0) {
            rc = -errno;
            goto out;
        }
        dfd = openat(ddir, dname, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    } else {
        dfd = openat(ddir, dname, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    }
    if (dfd < 0) {
        rc = -errno;
        if (isdir) unlinkat(ddir, dname, AT_REMOVEDIR);
        goto out;
    }
    rc = copy_meta(sfd, dfd, &st);
    close(dfd);
    if (rc < 0) unlinkat(ddir, dname, isdir ? AT_REMOVEDIR : 0);
out:
    close(sfd);
    return rc;
}

/* A temporary name for something about to be renamed into directory ppath of the
 * top layer.  wlock held. */
static int tmp_name(ufs *u, const char *ppath, char *buf, size_t cap, int *dirfd)
{
    char seq[48];
    snprintf(seq, sizeof seq, "%d.%llu", (int)getpid(), (unsigned long long)++u->tmpseq);
    if (u->workfd >= 0) {
        *dirfd = u->workfd;
        int n = snprintf(buf, cap, "cpup.%s", seq);
        return (n < 0 || (size_t)n >= cap) ? -ENAMETOOLONG : n;
    }
    *dirfd = topfd(u);
    return pjoin(buf, cap, ppath, TMP_PREFIX, seq, "");
}

static void remove_tmp(int dirfd, const char *name)
{
    lfs_error e;
    memset(&e, 0, sizeof e);
    lfs_remove_at(dirfd, name, &e);
}

static void restore_times(int dirfd, const char *path, const struct stat *st)
{
    struct timespec ts[2] = { st->st_atim, st->st_mtim };
    utimensat(dirfd, path, ts, AT_SYMLINK_NOFOLLOW);
}

/* Make n (and its missing parents) exist in the top layer.  With trunc, a
 * regular file gets no data (it is about to be truncated).  wlock held. */
static int copy_up(ufs *u, unode *n, int trunc)
{
    lock(u);
    int gone = n->detached, done = n->layer == 0;
    unode *p = n->parent;
    unlock(u);
    if (gone) return -ENOENT;
    if (done) return 0;
    int rc = copy_up(u, p, 0);
    if (rc < 0) return rc;

    char path[PBUF], ppath[PBUF], tmp[PBUF];
    lock(u);
    rc = node_path(u, n, path, sizeof path);
    if (rc >= 0) rc = node_path(u, p, ppath, sizeof ppath);
    unsigned L = n->layer;
    uint32_t type = n->type;
    unlock(u);
    if (rc < 0) return rc;
    int top = topfd(u), src = u->layers[L].fd, tdir;
    struct stat pst, st;
    if (fstatat(top, ppath, &pst, AT_SYMLINK_NOFOLLOW) < 0) return -errno;
    rc = tmp_name(u, ppath, tmp, sizeof tmp, &tdir);
    if (rc < 0) return rc;
    if (S_ISDIR(type)) {
        rc = copy_shell(src, path, tdir, tmp, 1);
    } else if (trunc && S_ISREG(type)) {
        rc = copy_shell(src, path, tdir, tmp, 0);
    } else {
        lfs_error err;
        memset(&err, 0, sizeof err);
        err.offset = -1;
        rc = lfs_copy_file(src, path, tdir, tmp, 0, NULL, &err);
        if (rc < 0) fprintf(stderr, "layerfs union: copy-up of %s: %s\n", path, err.message);
    }
    if (rc < 0) {
        remove_tmp(tdir, tmp);
        return rc;
    }
    if (renameat2(tdir, tmp, top, path, RENAME_NOREPLACE) < 0) {
        rc = -errno;
        remove_tmp(tdir, tmp);
        return rc;
    }
    restore_times(top, ppath, &pst);
    if (fstatat(top, path, &st, AT_SYMLINK_NOFOLLOW) < 0) return -errno;
    lock(u);
    if (S_ISDIR(type)) rc = dl_add(n, 0, 1);      /* a directory keeps its inode number */
    else n->ino = map_ino(u, 0, st.st_ino);
    n->layer = 0;
    unlock(u);
    invalidate_attr(u, n);
    return rc;
}

/* ------------------------------------------------------------ write side helpers */

/* Whether removing NAME from the top layer of directory d would let a lower
 * entry show, i.e. whether a whiteout is needed.  wlock held. */
static int lower_has(ufs *u, unode *d, const char *dpath, const char *name)
{
    char p[PBUF], w[PBUF];
    if (pjoin(p, sizeof p, dpath, "", name, "") < 0 ||
        pjoin(w, sizeof w, dpath, WH_PREFIX, name, "") < 0)
        return -ENAMETOOLONG;
    for (unsigned k = 0; k < d->ndl; k++) {
        unsigned L = d->dl[k];
        if (L == 0) continue;
        int r = exists_at(u->layers[L].fd, p);
        if (r) return r;
        r = exists_at(u->layers[L].fd, w);
        if (r < 0) return r;
        if (r) return 0;
    }
    return 0;
}

static int make_whiteout(ufs *u, const char *dpath, const char *name)
{
    char w[PBUF];
    if (pjoin(w, sizeof w, dpath, WH_PREFIX, name, "") < 0) return -ENAMETOOLONG;
    int fd = openat(topfd(u), w, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) return -errno;
    close(fd);
    return 0;
}

static void remove_whiteout(ufs *u, const char *dpath, const char *name)
{
    char w[PBUF];
    if (pjoin(w, sizeof w, dpath, WH_PREFIX, name, "") >= 0) unlinkat(topfd(u), w, 0);
}

/* Empty the top-layer copy of a directory that is empty in the union: only
 * .wh.* entries may be there (-ENOTEMPTY otherwise).  With check_only, remove nothing. */
static int clear_top_dir(ufs *u, const char *path, int check_only)
{
    int fd = openat(topfd(u), path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return -errno;
    DIR *dir = fdopendir(fd);
    if (!dir) {
        int e = errno;
        close(fd);
        return -e;
    }
    int rc = 0, again = 1;
    while (rc == 0 && again) {
        again = 0;
        rewinddir(dir);
        for (;;) {
            errno = 0;
            struct dirent *de = readdir(dir);
            if (!de) {
                if (errno) rc = -errno;
                break;
            }
            const char *nm = de->d_name;
            if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0))) continue;
            if (!is_wh_name(nm)) {
                rc = -ENOTEMPTY;
                break;
            }
            if (check_only) continue;
            lfs_error e;
            memset(&e, 0, sizeof e);
            rc = lfs_remove_at(dirfd(dir), nm, &e);
            if (rc < 0) break;
            again = 1;
        }
    }
    closedir(dir);
    return rc;
}

/* Before a new entry NAME in d: d exists in the top layer, NAME is free.
 * Fills d's path, the new entry's path, d's top-layer stat and whether a
 * whiteout hid NAME.  wlock held. */
static int prepare_new(ufs *u, unode *d, const char *name, char *dpath, char *path,
                       struct stat *dst, int *had_wh)
{
    size_t len = strlen(name);
    if (is_wh_name(name)) return -EPERM;
    if (len > NAME_MAX) return -ENAMETOOLONG;
    lock(u);
    int rc = ensure_loaded(u, d);
    if (rc == 0 && ht_find(u, d, name, len)) rc = -EEXIST;
    unlock(u);
    if (rc < 0) return rc;
    rc = copy_up(u, d, 0);
    if (rc < 0) return rc;
    lock(u);
    rc = node_path(u, d, dpath, PBUF);
    unlock(u);
    if (rc < 0) return rc;
    if (pjoin(path, PBUF, dpath, "", name, "") < 0) return -ENAMETOOLONG;
    if (fstatat(topfd(u), dpath, dst, AT_SYMLINK_NOFOLLOW) < 0) return -errno;
    char w[PBUF];
    if (pjoin(w, sizeof w, dpath, WH_PREFIX, name, "") < 0) return -ENAMETOOLONG;
    rc = exists_at(topfd(u), w);
    if (rc < 0) return rc;
    *had_wh = rc;
    return 0;
}

static void new_owner(fuse_req_t req, const struct stat *dst, uid_t *uid, gid_t *gid)
{
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    *uid = ctx->uid;
    *gid = (dst->st_mode & S_ISGID) ? dst->st_gid : ctx->gid;
}

/* After a new entry NAME was made in the top layer: drop the whiteout, add the
 * node and reply with its entry.  wlock held (released here). */
static void finish_new(fuse_req_t req, ufs *u, unode *d, const char *name, const char *dpath,
                       const char *path, int had_wh, struct fuse_file_info *fi)
{
    struct stat st;
    if (had_wh) remove_whiteout(u, dpath, name);
    if (fstatat(topfd(u), path, &st, AT_SYMLINK_NOFOLLOW) < 0) {
        int e = errno;
        wunlock(u);
        if (fi) close(FH_FD(fi->fh));
        fuse_reply_err(req, e);
        return;
    }
    fix_stat(u, 0, 1, 0, &st);
    lock(u);
    unode *n = ht_find(u, d, name, strlen(name));
    if (n) node_detach(u, n);
    n = node_new(u, d, name, strlen(name), st.st_mode & S_IFMT, 0, st.st_ino);
    unsigned bid = 0;
    if (n) {
        n->nlookup++;
        if (S_ISDIR(st.st_mode)) n->loaded = 1;
        if (fi) {
            bid = pt_attach(u, n, FH_FD(fi->fh), 0);
            fi->fh = FH_MAKE(FH_FD(fi->fh), 0, bid);
        }
    }
    unlock(u);
    wunlock(u);
    if (!n) {
        if (fi) close(FH_FD(fi->fh));
        fuse_reply_err(req, ENOMEM);
        return;
    }
    struct fuse_entry_param e;
    entry_of(u, &e, n, &st);
    if (fi) {
        tl_open_bid = bid;
        int r = fuse_reply_create(req, &e, fi);
        tl_open_bid = 0;
        if (r != 0) {
            lock(u);
            pt_detach(u, n, bid);
            unlock(u);
            close(FH_FD(fi->fh));
            forget_ref(u, n, 1);
        }
    } else {
        fuse_reply_entry(req, &e);
    }
}

/* chown then chmod (chown clears set-id bits) of a new entry at top/path. */
static int set_owner_mode(ufs *u, const char *path, uid_t uid, gid_t gid, mode_t mode, int islnk)
{
    if (fchownat(topfd(u), path, uid, gid, AT_SYMLINK_NOFOLLOW) < 0) return -errno;
    if (!islnk && fchmodat(topfd(u), path, mode & 07777, 0) < 0) return -errno;
    return 0;
}

/* ------------------------------------------------------------ write side */

/* A new non-directory, non-regular entry in the top layer: a device node, FIFO
 * or socket (link == NULL), or a symlink to link. */
static void make_node(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      dev_t rdev, const char *link)
{
    ufs *u = fuse_req_userdata(req);
    if (!u->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    char dpath[PBUF], path[PBUF];
    struct stat dst;
    int had_wh = 0;
    uid_t uid;
    gid_t gid;
    wlock(u);
    unode *d = N(u, parent);
    int rc = prepare_new(u, d, name, dpath, path, &dst, &had_wh);
    if (rc == 0) {
        if (link) rc = symlinkat(link, topfd(u), path) < 0 ? -errno : 0;
        else rc = mknodat(topfd(u), path, (mode & S_IFMT) | 0600, rdev) < 0 ? -errno : 0;
    }
    if (rc == 0) {
        new_owner(req, &dst, &uid, &gid);
        rc = link ? set_owner_mode(u, path, uid, gid, 0, 1)
                  : set_owner_mode(u, path, uid, gid, mode, 0);
        if (rc < 0) unlinkat(topfd(u), path, 0);
    }
    if (rc < 0) {
        wunlock(u);
        fuse_reply_err(req, -rc);
        return;
    }
    finish_new(req, u, d, name, dpath, path, had_wh, NULL);
}

static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
    make_node(req, parent, name, mode, rdev, NULL);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    ufs *u = fuse_req_userdata(req);
    if (!u->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    char dpath[PBUF], path[PBUF], tmp[PBUF], opq[PBUF];
    struct stat dst;
    int had_wh = 0, tdir;
    uid_t uid;
    gid_t gid;
    wlock(u);
    unode *d = N(u, parent);
    int rc = prepare_new(u, d, name, dpath, path, &dst, &had_wh);
    if (rc == 0) {
        new_owner(req, &dst, &uid, &gid);
        if (dst.st_mode & S_ISGID) mode |= S_ISGID;
        if (!had_wh) {
            if (mkdirat(topfd(u), path, 0700) < 0) rc = -errno;
            else if ((rc = set_owner_mode(u, path, uid, gid, mode, 0)) < 0)
                unlinkat(topfd(u), path, AT_REMOVEDIR);
        } else {
            /* over a whiteout: an opaque directory, made aside and renamed in */
            rc = tmp_name(u, dpath, tmp, sizeof tmp, &tdir);
            if (rc >= 0) rc = 0;
            if (rc == 0 && mkdirat(tdir, tmp, 0700) < 0) rc = -errno;
            if (rc == 0) {
                int fd = -1;
                if (pjoin(opq, sizeof opq, tmp, "", WH_OPAQUE, "") < 0) rc = -ENAMETOOLONG;
                else if ((fd = openat(tdir, opq, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644)) < 0)
                    rc = -errno;
                if (fd >= 0) close(fd);
                if (rc == 0 && fchownat(tdir, tmp, uid, gid, AT_SYMLINK_NOFOLLOW) < 0) rc = -errno;
                if (rc == 0 && fchmodat(tdir, tmp, mode & 07777, 0) < 0) rc = -errno;
                if (rc == 0 && renameat2(tdir, tmp, topfd(u), path, RENAME_NOREPLACE) < 0)
                    rc = -errno;
                if (rc < 0) remove_tmp(tdir, tmp);
            }
        }
    }
    if (rc < 0) {
        wunlock(u);
        fuse_reply_err(req, -rc);
        return;
    }
    finish_new(req, u, d, name, dpath, path, had_wh, NULL);
}

static void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
    make_node(req, parent, name, S_IFLNK | 0777, 0, link);
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
    ufs *u = fuse_req_userdata(req);
    if (!u->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    char dpath[PBUF], path[PBUF];
    struct stat dst;
    int had_wh = 0, fd = -1;
    uid_t uid;
    gid_t gid;
    wlock(u);
    unode *d = N(u, parent);
    int rc = prepare_new(u, d, name, dpath, path, &dst, &had_wh);
    if (rc == 0) {
        fd = openat(topfd(u), path,
                    (fi->flags & ~O_NOCTTY) | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0) rc = -errno;
    }
    if (rc == 0) {
        new_owner(req, &dst, &uid, &gid);
        if (fchown(fd, uid, gid) < 0 || fchmod(fd, mode & 07777) < 0) {
            rc = -errno;
            close(fd);
            unlinkat(topfd(u), path, 0);
        }
    }
    if (rc < 0) {
        wunlock(u);
        fuse_reply_err(req, -rc);
        return;
    }
    fi->fh = FH_MAKE(fd, 0, 0);
    finish_new(req, u, d, name, dpath, path, had_wh, fi);
}

static void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
    ufs *u = fuse_req_userdata(req);
    if (!u->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    char dpath[PBUF], path[PBUF], spath[PBUF];
    struct stat dst;
    int had_wh = 0;
    wlock(u);
    unode *s = N(u, ino), *d = N(u, newparent);
    int rc = S_ISDIR(s->type) ? -EPERM : 0;
    if (rc == 0) rc = copy_up(u, s, 0);
    if (rc == 0) rc = prepare_new(u, d, newname, dpath, path, &dst, &had_wh);
    if (rc == 0) {
        lock(u);
        rc = node_path(u, s, spath, sizeof spath);
        unlock(u);
    }
    if (rc >= 0) rc = linkat(topfd(u), spath, topfd(u), path, 0) < 0 ? -errno : 0;
    if (rc < 0) {
        wunlock(u);
        fuse_reply_err(req, -rc);
        return;
    }
    invalidate_attr(u, s);
    finish_new(req, u, d, newname, dpath, path, had_wh, NULL);
}

static void do_remove(fuse_req_t req, fuse_ino_t parent, const char *name, int isdir)
{
    ufs *u = fuse_req_userdata(req);
    if (!u->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    char dpath[PBUF], path[PBUF];
    wlock(u);
    lock(u);
    unode *d = N(u, parent), *n = NULL;
    int rc = is_wh_name(name) ? -ENOENT : ensure_loaded(u, d);
    if (rc == 0) {
        n = ht_find(u, d, name, strlen(name));
        if (!n) rc = -ENOENT;
    }
    if (rc == 0 && isdir && !S_ISDIR(n->type)) rc = -ENOTDIR;
    if (rc == 0 && !isdir && S_ISDIR(n->type)) rc = -EISDIR;
    if (rc == 0 && isdir) {
        rc = ensure_loaded(u, n);
        if (rc == 0 && n->first) rc = -ENOTEMPTY;
    }
    if (rc == 0) rc = node_path(u, d, dpath, sizeof dpath);
    unsigned layer = n ? n->layer : 0;
    unlock(u);
    if (rc >= 0) rc = pjoin(path, sizeof path, dpath, "", name, "");
    if (rc >= 0 && isdir && layer == 0) rc = clear_top_dir(u, path, 1);
    int need_wh = 0;
    if (rc >= 0) rc = need_wh = lower_has(u, d, dpath, name);
    if (rc >= 0 && need_wh) {
        rc = copy_up(u, d, 0);
        if (rc == 0) rc = make_whiteout(u, dpath, name);
    }
    if (rc >= 0 && layer == 0) {
        if (isdir) rc = clear_top_dir(u, path, 0);
        if (rc >= 0 && unlinkat(topfd(u), path, isdir ? AT_REMOVEDIR : 0) < 0) rc = -errno;
    }
    if (rc >= 0) {
        lock(u);
        node_detach(u, n);
        unlock(u);
        rc = 0;
    }
    wunlock(u);
    fuse_reply_err(req, -rc);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    do_remove(req, parent, name, 0);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    do_remove(req, parent, name, 1);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                      const char *newname, unsigned int flags)
{
    ufs *u = fuse_req_userdata(req);
    if (!u->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (flags & ~(unsigned)RENAME_NOREPLACE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (is_wh_name(newname)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    if (strlen(newname) > NAME_MAX) {
        fuse_reply_err(req, ENAMETOOLONG);
        return;
    }
    char dpath[PBUF], ndpath[PBUF], path[PBUF], npath[PBUF], opq[PBUF];
    wlock(u);
    lock(u);
    unode *d = N(u, parent), *nd = N(u, newparent), *s = NULL, *t = NULL;
    int rc = is_wh_name(name) ? -ENOENT : ensure_loaded(u, d);
    if (rc == 0) rc = ensure_loaded(u, nd);
    if (rc == 0 && !(s = ht_find(u, d, name, strlen(name)))) rc = -ENOENT;
    if (rc == 0) t = ht_find(u, nd, newname, strlen(newname));
    if (rc == 0 && t == s) t = NULL, s = NULL;          /* same entry: nothing to do */
    if (rc == 0 && s) {
        if (t && (flags & RENAME_NOREPLACE)) rc = -EEXIST;
        else if (S_ISDIR(s->type) && (s->ndl > 1 || s->layer != 0)) rc = -EXDEV;
        else if (t && S_ISDIR(t->type)) {
            if (!S_ISDIR(s->type)) rc = -EISDIR;
            else if ((rc = ensure_loaded(u, t)) == 0 && t->first) rc = -ENOTEMPTY;
        } else if (t && S_ISDIR(s->type)) {
            rc = -ENOTDIR;
        }
    }
    unsigned tlayer = t ? t->layer : 0;
    unlock(u);
    if (rc < 0 || !s) {
        wunlock(u);
        fuse_reply_err(req, -rc);
        return;
    }
    int isdir = S_ISDIR(s->type);
    rc = copy_up(u, s, 0);
    if (rc == 0) rc = copy_up(u, nd, 0);
    if (rc == 0) rc = copy_up(u, d, 0);
    if (rc == 0) {
        lock(u);
        rc = node_path(u, d, dpath, sizeof dpath);
        if (rc >= 0) rc = node_path(u, nd, ndpath, sizeof ndpath);
        unlock(u);
    }
    if (rc >= 0) rc = pjoin(path, sizeof path, dpath, "", name, "");
    if (rc >= 0) rc = pjoin(npath, sizeof npath, ndpath, "", newname, "");
    if (rc >= 0 && t && tlayer == 0 && !isdir) {
        /* two names of one inode: rename(2) does nothing, and so do we */
        struct stat a, b;
        if (fstatat(topfd(u), path, &a, AT_SYMLINK_NOFOLLOW) == 0 &&
            fstatat(topfd(u), npath, &b, AT_SYMLINK_NOFOLLOW) == 0 &&
            a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
            wunlock(u);
            fuse_reply_err(req, 0);
            return;
        }
    }
    int old_wh = 0, new_lower = 0, new_wh = 0;
    if (rc >= 0) rc = old_wh = lower_has(u, d, dpath, name);
    if (rc >= 0) rc = new_lower = lower_has(u, nd, ndpath, newname);
    if (rc >= 0) {
        char w[PBUF];
        rc = pjoin(w, sizeof w, ndpath, WH_PREFIX, newname, "");
        if (rc >= 0) rc = new_wh = exists_at(topfd(u), w);
    }
    if (rc >= 0 && t && isdir && tlayer == 0) rc = clear_top_dir(u, npath, 0);
    if (rc >= 0 && isdir && (new_lower || new_wh)) {
        /* the moved directory must hide what the target name has below */
        rc = pjoin(opq, sizeof opq, path, "", WH_OPAQUE, "");
        if (rc >= 0) {
            int fd = openat(topfd(u), opq, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
            if (fd < 0) rc = -errno;
            else close(fd);
        }
    }
    if (rc >= 0 && old_wh) rc = make_whiteout(u, dpath, name);
    if (rc >= 0 && renameat2(topfd(u), path, topfd(u), npath, flags & RENAME_NOREPLACE) < 0)
        rc = -errno;
    if (rc >= 0) {
        if (new_wh) remove_whiteout(u, ndpath, newname);
        lock(u);
        if (t) node_detach(u, t);
        rc = node_move(u, s, nd, newname, strlen(newname));
        unlock(u);
    }
    wunlock(u);
    fuse_reply_err(req, rc < 0 ? -rc : 0);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    ufs *u = fuse_req_userdata(req);
    if (!u->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    unode *n = N(u, ino);
    char path[PBUF];
    wlock(u);
    int rc = copy_up(u, n, (to_set & FUSE_SET_ATTR_SIZE) && attr->st_size == 0);
    if (rc == 0) {
        lock(u);
        rc = node_path(u, n, path, sizeof path);
        unlock(u);
    }
    int fd = (fi && FH_LAYER(fi->fh) == 0) ? FH_FD(fi->fh) : -1, top = topfd(u);
    if (rc >= 0 && (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID))) {
        uid_t uid = (to_set & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t)-1;
        gid_t gid = (to_set & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t)-1;
        if ((fd >= 0 ? fchown(fd, uid, gid) : fchownat(top, path, uid, gid, AT_SYMLINK_NOFOLLOW)) < 0)
            rc = -errno;
    }
    if (rc >= 0 && (to_set & FUSE_SET_ATTR_MODE)) {
        if (S_ISLNK(n->type)) rc = -EOPNOTSUPP;
        else if ((fd >= 0 ? fchmod(fd, attr->st_mode & 07777)
                          : fchmodat(top, path, attr->st_mode & 07777, 0)) < 0)
            rc = -errno;
    }
    if (rc >= 0 && (to_set & FUSE_SET_ATTR_SIZE)) {
        int tfd = fd;
        if (tfd < 0) {
            tfd = openat(top, path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
            if (tfd < 0) rc = -errno;
        }
        if (tfd >= 0 && ftruncate(tfd, attr->st_size) < 0) rc = -errno;
        if (tfd >= 0 && tfd != fd) close(tfd);
    }
    if (rc >= 0 && (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME |
                              FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW))) {
        struct timespec ts[2];
        ts[0].tv_sec = ts[1].tv_sec = 0;
        ts[0].tv_nsec = ts[1].tv_nsec = UTIME_OMIT;
        if (to_set & FUSE_SET_ATTR_ATIME_NOW) ts[0].tv_nsec = UTIME_NOW;
        else if (to_set & FUSE_SET_ATTR_ATIME) ts[0] = attr->st_atim;
        if (to_set & FUSE_SET_ATTR_MTIME_NOW) ts[1].tv_nsec = UTIME_NOW;
        else if (to_set & FUSE_SET_ATTR_MTIME) ts[1] = attr->st_mtim;
        if ((fd >= 0 ? futimens(fd, ts) : utimensat(top, path, ts, AT_SYMLINK_NOFOLLOW)) < 0)
            rc = -errno;
    }
    wunlock(u);
    struct stat st;
    if (rc >= 0) rc = node_stat(u, n, &st);
    if (rc < 0) fuse_reply_err(req, -rc);
    else fuse_reply_attr(req, &st, u->attr_timeout);
}

static void do_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                        size_t size, int flags, int remove)
{
    ufs *u = fuse_req_userdata(req);
    if (!u->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    unode *n = N(u, ino);
    char path[PBUF], apath[PBUF + 512];
    wlock(u);
    int rc = copy_up(u, n, 0);
    if (rc == 0) {
        lock(u);
        rc = node_path(u, n, path, sizeof path);
        unlock(u);
    }
    if (rc >= 0) rc = abs_path(u, 0, path, apath, sizeof apath);
    if (rc >= 0) {
        int r = remove ? lremovexattr(apath, name) : lsetxattr(apath, name, value, size, flags);
        rc = r < 0 ? -errno : 0;
    }
    wunlock(u);
    fuse_reply_err(req, rc < 0 ? -rc : 0);
}

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                        size_t size, int flags)
{
    do_setxattr(req, ino, name, value, size, flags, 0);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    do_setxattr(req, ino, name, NULL, 0, 0, 1);
}

/* ------------------------------------------------------------ files */

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    ufs *u = fuse_req_userdata(req);
    unode *n = N(u, ino);
    int wr = (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC);
    if (wr) {
        if (!u->writable) {
            fuse_reply_err(req, EROFS);
            return;
        }
        wlock(u);
        int rc = copy_up(u, n, (fi->flags & O_TRUNC) != 0);
        wunlock(u);
        if (rc < 0) {
            fuse_reply_err(req, -rc);
            return;
        }
    }
    char path[PBUF];
    unsigned layer, ndl;
    int rc = node_where(u, n, path, &layer, &ndl);
    if (rc < 0) {
        fuse_reply_err(req, -rc);
        return;
    }
    int fd = openat(u->layers[layer].fd, path,
                    (fi->flags & ~(O_CREAT | O_EXCL | O_NOCTTY)) | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    lock(u);
    unsigned bid = pt_attach(u, n, fd, layer);
    unlock(u);
    fi->fh = FH_MAKE(fd, layer, bid);
    fi->keep_cache = !u->writable;
    tl_open_bid = bid;
    int r = fuse_reply_open(req, fi);
    tl_open_bid = 0;
    if (r != 0) {
        lock(u);
        pt_detach(u, n, bid);
        unlock(u);
        close(fd);
    }
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
    buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    buf.buf[0].fd = FH_FD(fi->fh);
    buf.buf[0].pos = off;
    fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

static void op_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *in, off_t off,
                         struct fuse_file_info *fi)
{
    struct fuse_bufvec out = FUSE_BUFVEC_INIT(fuse_buf_size(in));
    out.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    out.buf[0].fd = FH_FD(fi->fh);
    out.buf[0].pos = off;
    ssize_t r = fuse_buf_copy(&out, in, 0);
    if (r < 0) fuse_reply_err(req, (int)-r);
    else fuse_reply_write(req, (size_t)r);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    ufs *u = fuse_req_userdata(req);
    lock(u);
    pt_detach(u, N(u, ino), FH_BID(fi->fh));
    unlock(u);
    close(FH_FD(fi->fh));
    fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    int fd = FH_FD(fi->fh);
    int r = datasync ? fdatasync(fd) : fsync(fd);
    fuse_reply_err(req, r < 0 ? errno : 0);
}

static void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    ufs *u = fuse_req_userdata(req);
    char path[PBUF];
    unsigned layer, ndl;
    int rc = node_where(u, N(u, ino), path, &layer, &ndl);
    if (rc >= 0 && u->writable && layer == 0) {
        int fd = openat(topfd(u), path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) rc = -errno;
        else {
            if ((datasync ? fdatasync(fd) : fsync(fd)) < 0) rc = -errno;
            close(fd);
        }
    }
    fuse_reply_err(req, rc < 0 ? -rc : 0);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi)
{
    int r = fallocate(FH_FD(fi->fh), mode, offset, length);
    fuse_reply_err(req, r < 0 ? errno : 0);
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                     struct fuse_file_info *fi)
{
    off_t r = lseek(FH_FD(fi->fh), off, whence);
    if (r < 0) fuse_reply_err(req, errno);
    else fuse_reply_lseek(req, r);
}

static void op_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, off_t off_in,
                               struct fuse_file_info *fi_in, fuse_ino_t ino_out, off_t off_out,
                               struct fuse_file_info *fi_out, size_t len, int flags)
{
    loff_t a = off_in, b = off_out;
    ssize_t r = copy_file_range(FH_FD(fi_in->fh), &a, FH_FD(fi_out->fh), &b, len,
                                (unsigned)flags);
    if (r < 0) fuse_reply_err(req, errno);
    else fuse_reply_write(req, (size_t)r);
}

/* ------------------------------------------------------------ session */

static void signal_ready(ufs *u, int code, const char *msg)
{
    if (u->ready_fd < 0) return;
    char line[LFS_ERR_MSG + 64];
    int n;
    if (code == 0) {
        n = snprintf(line, sizeof line, "ok %d\n", (int)getpid());
    } else {
        n = snprintf(line, sizeof line, "error %d %s", code, msg && *msg ? msg : strerror(code));
        if (n < 0) n = 0;
        if ((size_t)n >= sizeof line - 1) n = (int)sizeof line - 2;
        for (int i = 0; i < n; i++)
            if (line[i] == '\n') line[i] = ' ';
        line[n++] = '\n';
        line[n] = 0;
    }
    for (int off = 0; n > 0 && off < n;) {
        ssize_t w = write(u->ready_fd, line + off, (size_t)(n - off));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        off += (int)w;
    }
    close(u->ready_fd);
    u->ready_fd = -1;
    if (code == 0) u->ready = 1;
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    ufs *u = userdata;
    unsigned want = FUSE_CAP_ASYNC_READ | FUSE_CAP_PARALLEL_DIROPS | FUSE_CAP_SPLICE_WRITE |
                    FUSE_CAP_SPLICE_MOVE | FUSE_CAP_READDIRPLUS | FUSE_CAP_AUTO_INVAL_DATA;
    if (u->writable) want |= FUSE_CAP_ATOMIC_O_TRUNC;
    else want |= FUSE_CAP_CACHE_SYMLINKS;
    conn->want &= ~(FUSE_CAP_READDIRPLUS_AUTO | FUSE_CAP_HANDLE_KILLPRIV | FUSE_CAP_SPLICE_READ);
    conn->want |= want & conn->capable;
    conn->max_write = 1u << 20;
    conn->max_background = 64;
    conn->congestion_threshold = 48;
    conn->time_gran = 1;
    if (u->pt_want && u->pt_kernel) tl_init_patch = u;   /* the reply says "passthrough" */
    signal_ready(u, 0, NULL);
}

static const struct fuse_lowlevel_ops union_ops = {
    .init = op_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .readlink = op_readlink,
    .mknod = op_mknod,
    .mkdir = op_mkdir,
    .unlink = op_unlink,
    .rmdir = op_rmdir,
    .symlink = op_symlink,
    .rename = op_rename,
    .link = op_link,
    .open = op_open,
    .read = op_read,
    .write_buf = op_write_buf,
    .flush = op_flush,
    .release = op_release,
    .fsync = op_fsync,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .readdirplus = op_readdirplus,
    .releasedir = op_releasedir,
    .fsyncdir = op_fsyncdir,
    .statfs = op_statfs,
    .setxattr = op_setxattr,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
    .removexattr = op_removexattr,
    .create = op_create,
    .fallocate = op_fallocate,
    .lseek = op_lseek,
    .copy_file_range = op_copy_file_range,
};

static void ufs_free(ufs *u)
{
    if (!u) return;
    if (u->buckets) {
        for (size_t i = 0; i < u->nbuckets; i++) {
            unode *n = u->buckets[i];
            while (n) {
                unode *next = n->hnext;
                node_free(n);
                n = next;
            }
        }
        free(u->buckets);
    }
    for (unode *n = u->detached; n;) {
        unode *next = n->next;
        node_free(n);
        n = next;
    }
    if (u->root) node_free(u->root);
    for (size_t i = 0; u->layers && i < u->nlayers; i++) {
        if (u->layers[i].fd >= 0) close(u->layers[i].fd);
        free(u->layers[i].path);
    }
    free(u->layers);
    if (u->workfd >= 0) close(u->workfd);
    if (u->locks_made) {
        pthread_mutex_destroy(&u->lock);
        pthread_mutex_destroy(&u->wlock);
    }
    if (u->ready_fd >= 0) close(u->ready_fd);
    free(u);
}

/* Empty the work directory (leftovers of an earlier run). */
static int clean_workdir(int fd, const char *path, lfs_error *err)
{
    int dfd = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return lfs_fail(err, errno, -1, path, NULL, "opening the work directory: %s", strerror(errno));
    DIR *dir = fdopendir(dfd);
    if (!dir) {
        int e = errno;
        close(dfd);
        return lfs_fail(err, e, -1, path, NULL, "reading the work directory: %s", strerror(e));
    }
    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(dir);
        if (!de) {
            if (errno) rc = lfs_fail(err, errno, -1, path, NULL, "reading the work directory: %s", strerror(errno));
            break;
        }
        const char *nm = de->d_name;
        if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0))) continue;
        rc = lfs_remove_at(dirfd(dir), nm, err);
        if (rc < 0) break;
    }
    closedir(dir);
    return rc;
}

static int ufs_setup(ufs *u, const char *const *layers, size_t nlayers, const lfs_union_opts *o,
                     lfs_error *err)
{
    u->workfd = -1;
    u->nlayers = nlayers;
    u->writable = o->writable;
    u->entry_timeout = o->entry_timeout >= 0 ? o->entry_timeout : (o->writable ? 1.0 : 86400.0);
    u->attr_timeout = o->attr_timeout >= 0 ? o->attr_timeout : (o->writable ? 1.0 : 86400.0);
    u->layers = calloc(nlayers, sizeof *u->layers);
    if (!u->layers) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
    for (size_t i = 0; i < nlayers; i++) u->layers[i].fd = -1;
    dev_t devs[64];
    size_t ndevs = 0;
    struct stat st, rootst;
    for (size_t i = 0; i < nlayers; i++) {
        if (!layers[i]) return lfs_fail(err, EINVAL, -1, NULL, NULL, "layer %zu is NULL", i);
        u->layers[i].fd = open(layers[i], O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (u->layers[i].fd < 0)
            return lfs_fail(err, errno, -1, layers[i], NULL, "opening the layer directory: %s",
                            strerror(errno));
        u->layers[i].path = realpath(layers[i], NULL);
        if (!u->layers[i].path)
            return lfs_fail(err, errno, -1, layers[i], NULL, "resolving the layer path: %s",
                            strerror(errno));
        if (fstat(u->layers[i].fd, &st) < 0)
            return lfs_fail(err, errno, -1, layers[i], NULL, "stat: %s", strerror(errno));
        if (i == 0) rootst = st;
        size_t k = 0;
        while (k < ndevs && devs[k] != st.st_dev) k++;
        if (k == ndevs) {
            if (ndevs == sizeof devs / sizeof *devs)
                return lfs_fail(err, EINVAL, -1, layers[i], NULL, "layers span too many filesystems");
            devs[ndevs++] = st.st_dev;
        }
        u->layers[i].ino_tag = (uint64_t)k << 56;
    }
    if (o->writable && o->workdir) {
        u->workfd = open(o->workdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (u->workfd < 0)
            return lfs_fail(err, errno, -1, o->workdir, NULL, "opening the work directory: %s",
                            strerror(errno));
        if (fstat(u->workfd, &st) < 0)
            return lfs_fail(err, errno, -1, o->workdir, NULL, "stat: %s", strerror(errno));
        if (st.st_dev != rootst.st_dev)
            return lfs_fail(err, EXDEV, -1, o->workdir, NULL,
                            "the work directory is not on the top layer's filesystem");
        int rc = clean_workdir(u->workfd, o->workdir, err);
        if (rc < 0) return rc;
    }
    if (pthread_mutex_init(&u->lock, NULL) != 0 || pthread_mutex_init(&u->wlock, NULL) != 0)
        return lfs_fail(err, ENOMEM, -1, NULL, NULL, "cannot make locks");
    u->locks_made = 1;
    u->nbuckets = 1024;
    u->buckets = calloc(u->nbuckets, sizeof *u->buckets);
    unode *r = calloc(1, sizeof *r);
    u->root = r;
    if (!u->buckets || !r || !(r->name = calloc(1, 1)))
        return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
    r->type = S_IFDIR;
    r->layer = 0;
    r->nlookup = 1;
    for (size_t i = 0; i < nlayers; i++) {
        if (dl_add(r, (unsigned)i, 0) < 0) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
        if (i + 1 < nlayers) {
            int e = exists_at(u->layers[i].fd, WH_OPAQUE);
            if (e < 0) return lfs_fail(err, -e, -1, layers[i], NULL, "stat: %s", strerror(-e));
            if (e) break;
        }
    }
    unsigned low = r->dl[r->ndl - 1];
    if (fstat(u->layers[low].fd, &st) < 0)
        return lfs_fail(err, errno, -1, layers[low], NULL, "stat: %s", strerror(errno));
    r->ino = map_ino(u, low, st.st_ino);
    return 0;
}

static int add_opt(struct fuse_args *args, const char *s, lfs_error *err)
{
    if (fuse_opt_add_arg(args, s) != 0) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
    return 0;
}

int lfs_union_serve(const char *mountpoint, const char *const *layers, size_t nlayers,
                    const lfs_union_opts *opts, int ready_fd, lfs_error *err)
{
    lfs_union_opts o;
    if (opts) {
        o = *opts;
    } else {
        memset(&o, 0, sizeof o);
        o.entry_timeout = o.attr_timeout = -1;
    }
    ufs *u = calloc(1, sizeof *u);
    if (!u) {
        if (ready_fd >= 0) close(ready_fd);
        return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
    }
    u->ready_fd = ready_fd;
    u->workfd = -1;
    struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
    struct fuse_session *se = NULL;
    int mounted = 0, rc;
    struct stat st;

    if (!mountpoint || !layers || nlayers == 0 || nlayers > MAX_LAYERS) {
        rc = lfs_fail(err, EINVAL, -1, mountpoint, NULL,
                      "a union needs a mount point and 1 to %d layers", MAX_LAYERS);
        goto fail;
    }
    int serr = stat(mountpoint, &st) < 0 ? errno : (S_ISDIR(st.st_mode) ? 0 : ENOTDIR);
    if (serr) {
        int e = serr;
        rc = lfs_fail(err, e, -1, mountpoint, NULL, "mount point: %s", strerror(e));
        goto fail;
    }
    if (o.fsname && strpbrk(o.fsname, ",\\ \t\n")) {
        rc = lfs_fail(err, EINVAL, -1, mountpoint, NULL, "fsname may not hold ',', '\\' or spaces");
        goto fail;
    }
    rc = ufs_setup(u, layers, nlayers, &o, err);
    if (rc < 0) goto fail;

    char mopts[600];
    /* as root: every user sees the mount (allow_other) with the kernel's usual
     * permission checks, and set-id files and devices work as in a rootfs */
    snprintf(mopts, sizeof mopts, "fsname=%s,subtype=layerfs,default_permissions%s%s",
             o.fsname ? o.fsname : "layerfs", geteuid() == 0 ? ",allow_other,suid,dev" : "",
             o.writable ? "" : ",ro");
    if ((rc = add_opt(&args, "layerfs-union", err)) < 0 || (rc = add_opt(&args, "-o", err)) < 0 ||
        (rc = add_opt(&args, mopts, err)) < 0 || (o.debug && (rc = add_opt(&args, "-d", err)) < 0))
        goto fail;
    se = fuse_session_new(&args, &union_ops, sizeof union_ops, u);
    if (!se) {
        rc = lfs_fail(err, EINVAL, -1, mountpoint, NULL,
                      "cannot start a FUSE session (libfuse's reason is on stderr)");
        goto fail;
    }
    u->se = se;
    if (fuse_session_mount(se, mountpoint) != 0) {
        rc = lfs_fail(err, EIO, -1, mountpoint, NULL,
                      "cannot mount (is /dev/fuse there? libfuse's reason is on stderr)");
        goto fail;
    }
    mounted = 1;
    u->sefd = fuse_session_fd(se);
    u->pt_want = !o.no_passthrough && geteuid() == 0;
    if (u->pt_want && fuse_session_custom_io(se, &union_io, u->sefd) != 0) u->pt_want = 0;
    if (o.daemonize) {
        pid_t pid = fork();
        if (pid < 0) {
            rc = lfs_fail(err, errno, -1, mountpoint, NULL, "fork: %s", strerror(errno));
            goto fail;
        }
        if (pid > 0) {
            /* the child owns the mount and reports readiness */
            fuse_session_destroy(se);
            fuse_opt_free_args(&args);
            ufs_free(u);
            return 0;
        }
        setsid();
        if (u->ready_fd >= 0 && u->ready_fd <= 2) {
            int fd = fcntl(u->ready_fd, F_DUPFD_CLOEXEC, 3);
            if (fd >= 0) {
                close(u->ready_fd);
                u->ready_fd = fd;
            }
        }
        int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (nul >= 0) {
            dup2(nul, 0);
            dup2(nul, 1);
            close(nul);
        }
    }
    if (fuse_set_signal_handlers(se) != 0) {
        rc = lfs_fail(err, EIO, -1, mountpoint, NULL, "cannot set signal handlers");
        goto fail;
    }
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (!cfg) {
        fuse_remove_signal_handlers(se);
        rc = lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
        goto fail;
    }
    fuse_loop_cfg_set_max_threads(cfg, o.max_threads ? o.max_threads : 8);
    fuse_loop_cfg_set_idle_threads(cfg, 4);
    fuse_loop_cfg_set_clone_fd(cfg, 0);
    int lr = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    fuse_remove_signal_handlers(se);
    rc = 0;
    if (!u->ready) rc = lfs_fail(err, EIO, -1, mountpoint, NULL, "the mount ended before it was ready");
    else if (lr < 0 && lr != -ENODEV)
        rc = lfs_fail(err, -lr, -1, mountpoint, NULL, "serving: %s", strerror(-lr));
    signal_ready(u, err ? err->code : EIO, err ? err->message : NULL);
    fuse_session_unmount(se);
    fuse_session_destroy(se);
    fuse_opt_free_args(&args);
    ufs_free(u);
    return rc;

fail:
    signal_ready(u, err ? err->code : -rc, err ? err->message : NULL);
    if (se) {
        if (mounted) fuse_session_unmount(se);
        fuse_session_destroy(se);
    }
    fuse_opt_free_args(&args);
    ufs_free(u);
    return rc;
}
