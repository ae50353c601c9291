/*
 * Layer tar writer: lfs_create.
 *
 * Writes a tree (or a list of changes) beneath root_fd as a tar stream in the
 * order Docker and containerd produce: depth-first, each directory's entries
 * sorted byte-wise by name, a directory before its children.  Headers are
 * ustar; a PAX extended header precedes an entry only when something does not
 * fit ustar (long names/links, big ids or sizes, sub-second or out-of-range
 * mtimes, xattrs, sparse maps).  Numeric owners only.  A non-directory with
 * more links than one, seen before in this archive, becomes a hardlink entry.
 * The stream ends with two zero blocks and no further record padding (as Go's
 * archive/tar).
 *
 * The output goes through an lfs_sink (compression, digests, the fd).  File
 * content is read with large reads straight into the output buffer.
 */
#include "internal.h"
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>

#define OUTBUF_SIZE (1u << 20)      /* output buffer; also the largest read */
#define OPEN_DEPTH 48               /* directory fds kept open while walking */
#define DENTS_BUF 65536
#define WH_PREFIX ".wh."
#define WH_OPAQUE ".wh..wh..opq"

/* ------------------------------------------------------------ writer state */

typedef struct xent {
    const char *name;             /* points into tw->xlist */
    size_t voff, vlen;            /* value in tw->xvals */
} xent;

typedef struct seg {
    int64_t off, len;
} seg;

typedef struct tw {
    lfs_sink *sink;
    lfs_error *err;
    lfs_create_opts o;
    int root_fd;
    unsigned char *buf;           /* output buffer, OUTBUF_SIZE */
    size_t used;
    uint64_t offset;              /* tar bytes produced so far */
    uint64_t entries;
    lfs_hl_map links;
    lfs_strbuf pax;                   /* PAX records of the entry being written */
    lfs_strbuf alias;                 /* ustar name of a sparse entry */
    lfs_strbuf xname;                 /* name of a PAX header entry */
    lfs_strbuf xlist;                 /* listxattr result */
    lfs_strbuf xvals;                 /* xattr values */
    xent *xe;
    size_t nxe, xecap;
    seg *segs;
    size_t nsegs, segcap;
    char *linkbuf;                /* readlink target, LFS_PATH_MAX + 1 */
    char *dents;                  /* getdents64 buffer */
    const char *opaque_name;      /* overlay opaque xattr name */
} tw;

typedef struct ent {
    const char *name;             /* tar name ("dir/" for directories) */
    size_t namelen;
    const char *link;             /* symlink target / hardlink path, or NULL */
    size_t linklen;
    char type;
    uint32_t mode, uid, gid;
    int64_t size;                 /* bytes of data after the header (sparse: map + segments) */
    int64_t mtime;
    int32_t nsec;
    uint32_t major, minor;
    int xattrs;                   /* write tw->xe[0..nxe) */
    int sparse;                   /* GNU.sparse 1.0 with tw->segs */
    int64_t realsize;
} ent;

static int tw_fail(tw *t, int code, const char *path, const char *fmt, const char *what)
{
    return lfs_fail(t->err, code, (int64_t)t->offset, path, path, fmt, what);
}

static int tw_flush(tw *t)
{
    if (!t->used) return 0;
    int rc = lfs_sink_write(t->sink, t->buf, t->used, t->err);
    if (rc < 0) return rc;
    t->used = 0;
    return 0;
}

static int tw_emit(tw *t, const void *p, size_t n)
{
    const unsigned char *s = p;
    while (n) {
        if (t->used == OUTBUF_SIZE) {
            int rc = tw_flush(t);
            if (rc < 0) return rc;
        }
        size_t k = OUTBUF_SIZE - t->used;
        if (k > n) k = n;
        if (s) {
            memcpy(t->buf + t->used, s, k);
            s += k;
        } else {
            memset(t->buf + t->used, 0, k);
        }
        t->used += k;
        t->offset += k;
        n -= k;
    }
    return 0;
}

static int tw_zeros(tw *t, size_t n) { return tw_emit(t, NULL, n); }

static int tw_pad(tw *t, uint64_t datalen)
{
    size_t r = (size_t)(datalen % LFS_BLOCK);
    return r ? tw_zeros(t, LFS_BLOCK - r) : 0;
}

/* ------------------------------------------------------------ header encoding */

/* Zero-padded octal filling width-1 digits and a NUL (Go's and GNU tar's layout). */
static void put_octal(unsigned char *f, size_t width, uint64_t v)
{
    f[width - 1] = 0;
    for (size_t i = width - 1; i-- > 0;) {
        f[i] = (unsigned char)('0' + (v & 7));
        v >>= 3;
    }
}

static void put_str(unsigned char *f, size_t width, const char *s, size_t n)
{
    if (n > width) n = width;
    memcpy(f, s, n);
}

static void put_checksum(unsigned char *h)
{
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < LFS_BLOCK; i++) sum += h[i];
    put_octal(h + 148, 7, sum);   /* six digits, NUL, and the space stays */
}

/* Split a name into ustar prefix/name: 1 and *split set (0: no prefix) if it fits. */
static int ustar_split(const char *name, size_t len, size_t *split)
{
    if (len <= 100) {
        *split = 0;
        return 1;
    }
    size_t lim = len;
    if (lim > 156) lim = 156;
    else if (name[lim - 1] == '/') lim--;
    size_t i = lim;
    while (i > 0 && name[i - 1] != '/') i--;
    if (i == 0) return 0;
    size_t slash = i - 1;             /* index of the separating '/' */
    size_t nlen = len - slash - 1;
    if (slash == 0 || slash > 155 || nlen == 0 || nlen > 100) return 0;
    *split = slash + 1;
    return 1;
}

static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t k;
        uint32_t cp;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xE0) == 0xC0) { k = 1; cp = c & 0x1F; }
        else if ((c & 0xF0) == 0xE0) { k = 2; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { k = 3; cp = c & 0x07; }
        else return 0;
        if (i + k >= n) return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += k + 1;
    }
    return 1;
}

static size_t ndigits(size_t n)
{
    size_t d = 1;
    while (n >= 10) { n /= 10; d++; }
    return d;
}

static int pax_add(tw *t, const char *key, const void *val, size_t vlen)
{
    size_t klen = strlen(key);
    size_t n = klen + vlen + 3;       /* " " "=" "\n" */
    size_t d = ndigits(n);
    if (ndigits(n + d) > d) d++;
    char num[24];
    int w = snprintf(num, sizeof num, "%zu ", n + d);
    if (lfs_sb_reserve(&t->pax, n + d) < 0) return -ENOMEM;
    lfs_sb_append(&t->pax, num, (size_t)w);
    lfs_sb_append(&t->pax, key, klen);
    lfs_sb_append(&t->pax, "=", 1);
    lfs_sb_append(&t->pax, val, vlen);
    lfs_sb_append(&t->pax, "\n", 1);
    return 0;
}

static int pax_add_num(tw *t, const char *key, int64_t v)
{
    char num[24];
    int w = snprintf(num, sizeof num, "%lld", (long long)v);
    return pax_add(t, key, num, (size_t)w);
}

static int pax_add_time(tw *t, const char *key, int64_t sec, int32_t nsec)
{
    char num[48];
    int w;
    if (!nsec) {
        w = snprintf(num, sizeof num, "%lld", (long long)sec);
    } else {
        const char *sign = "";
        if (sec < 0) {                /* -1.25 is sec -2, nsec 750000000 */
            sign = "-";
            sec = -(sec + 1);
            nsec = 1000000000 - nsec;
        }
        w = snprintf(num, sizeof num, "%s%lld.%09d", sign, (long long)sec, (int)nsec);
        while (w > 0 && num[w - 1] == '0') w--;
    }
    return pax_add(t, key, num, (size_t)w);
}

/* The header block of an entry: common fields. */
static void fill_header(unsigned char *h, char type, const char *name, size_t namelen,
                        size_t split, uint32_t mode, uint32_t uid, uint32_t gid, uint64_t size,
                        uint64_t mtime, const char *link, size_t linklen,
                        uint32_t major, uint32_t minor)
{
    memset(h, 0, LFS_BLOCK);
    if (split) {
        put_str(h + 345, 155, name, split - 1);
        put_str(h, 100, name + split, namelen - split);
    } else {
        put_str(h, 100, name, namelen);
    }
    put_octal(h + 100, 8, mode);
    put_octal(h + 108, 8, uid);
    put_octal(h + 116, 8, gid);
    put_octal(h + 124, 12, size);
    put_octal(h + 136, 12, mtime);
    h[156] = (unsigned char)type;
    if (link) put_str(h + 157, 100, link, linklen);
    memcpy(h + 257, "ustar\0" "00", 8);
    put_octal(h + 329, 8, major);
    put_octal(h + 337, 8, minor);
    put_checksum(h);
}

#define MAX_OCTAL7 07777777ull
#define MAX_OCTAL11 077777777777ll

/* Name of the entry that carries the PAX records: DIR/PaxHeaders.0/BASE. */
static int pax_header_name(tw *t, const char *name, size_t len)
{
    while (len > 1 && name[len - 1] == '/') len--;
    size_t base = len;
    while (base > 0 && name[base - 1] != '/') base--;
    t->xname.len = 0;
    if (lfs_sb_append(&t->xname, name, base) < 0 || lfs_sb_append(&t->xname, "PaxHeaders.0/", 13) < 0 ||
        lfs_sb_append(&t->xname, name + base, len - base) < 0)
        return -ENOMEM;
    return 0;
}

/* Name under which a GNU sparse 1.0 entry is stored: DIR/GNUSparseFile.0/BASE. */
static int sparse_alias(tw *t, const char *name, size_t len)
{
    size_t base = len;
    while (base > 0 && name[base - 1] != '/') base--;
    t->alias.len = 0;
    if (lfs_sb_append(&t->alias, name, base) < 0 || lfs_sb_append(&t->alias, "GNUSparseFile.0/", 16) < 0 ||
        lfs_sb_append(&t->alias, name + base, len - base) < 0)
        return -ENOMEM;
    return 0;
}

static int write_header(tw *t, const ent *e)
{
    unsigned char h[LFS_BLOCK];
    int rc = 0;
    t->pax.len = 0;

    const char *uname = e->name;      /* name in the ustar fields */
    size_t ulen = e->namelen;
    size_t split = 0;
    int pax_path = 0;
    if (e->sparse) {
        if (sparse_alias(t, e->name, e->namelen) < 0) return -ENOMEM;
        uname = t->alias.p;
        ulen = t->alias.len;
        if (!ustar_split(uname, ulen, &split)) split = 0;
    } else if (!ustar_split(e->name, e->namelen, &split)) {
        pax_path = 1;
        split = 0;
    }
    int pax_link = e->link && e->linklen > 100;
    int binary = ((pax_path || e->sparse) && !utf8_valid((const unsigned char *)e->name, e->namelen)) ||
                 (pax_link && !utf8_valid((const unsigned char *)e->link, e->linklen));
    int pax_uid = e->uid > MAX_OCTAL7, pax_gid = e->gid > MAX_OCTAL7;
    int pax_size = e->size > MAX_OCTAL11;
    int pax_mtime = e->nsec != 0 || e->mtime < 0 || e->mtime > MAX_OCTAL11;

    /* Keys in byte order (hdrcharset first, where readers look for it). */
    if (binary) rc |= pax_add(t, "hdrcharset", "BINARY", 6);
    if (e->sparse) {
        rc |= pax_add(t, "GNU.sparse.major", "1", 1);
        rc |= pax_add(t, "GNU.sparse.minor", "0", 1);
        rc |= pax_add(t, "GNU.sparse.name", e->name, e->namelen);
        rc |= pax_add_num(t, "GNU.sparse.realsize", e->realsize);
    }
    if (e->xattrs) {
        char key[XATTR_NAME_MAX + 32];
        for (size_t i = 0; i < t->nxe; i++) {
            snprintf(key, sizeof key, "SCHILY.xattr.%s", t->xe[i].name);
            rc |= pax_add(t, key, t->xvals.p + t->xe[i].voff, t->xe[i].vlen);
        }
    }
    if (pax_gid) rc |= pax_add_num(t, "gid", e->gid);
    if (pax_link) rc |= pax_add(t, "linkpath", e->link, e->linklen);
    if (pax_mtime) rc |= pax_add_time(t, "mtime", e->mtime, e->nsec);
    if (pax_path) rc |= pax_add(t, "path", e->name, e->namelen);
    if (pax_size) rc |= pax_add_num(t, "size", e->size);
    if (pax_uid) rc |= pax_add_num(t, "uid", e->uid);
    if (rc) return -ENOMEM;

    if (t->pax.len) {
        size_t xsplit;
        if (pax_header_name(t, e->name, e->namelen) < 0) return -ENOMEM;
        size_t xlen = t->xname.len;
        if (!ustar_split(t->xname.p, xlen, &xsplit)) {
            xsplit = 0;
            if (xlen > 100) xlen = 100;
        }
        fill_header(h, 'x', t->xname.p, xlen, xsplit, 0, 0, 0, t->pax.len, 0, NULL, 0, 0, 0);
        if ((rc = tw_emit(t, h, LFS_BLOCK)) < 0) return rc;
        if ((rc = tw_emit(t, t->pax.p, t->pax.len)) < 0) return rc;
        if ((rc = tw_pad(t, t->pax.len)) < 0) return rc;
    }
    uint64_t mt = (e->mtime < 0 || e->mtime > MAX_OCTAL11) ? 0 : (uint64_t)e->mtime;
    fill_header(h, e->type, uname, pax_path ? (ulen > 100 ? 100 : ulen) : ulen, split,
                e->mode & 07777, pax_uid ? 0 : e->uid, pax_gid ? 0 : e->gid,
                pax_size ? 0 : (uint64_t)e->size, mt, e->link, e->linklen, e->major, e->minor);
    if ((rc = tw_emit(t, h, LFS_BLOCK)) < 0) return rc;
    t->entries++;
    return 0;
}

/* ------------------------------------------------------------ metadata helpers */

static void clamp_time(const tw *t, int64_t *sec, int32_t *nsec)
{
    if (t->o.clamp_mtime && (*sec > t->o.source_date_epoch ||
                             (*sec == t->o.source_date_epoch && *nsec > 0))) {
        *sec = t->o.source_date_epoch;
        *nsec = 0;
    }
}

static void ent_from_stat(const tw *t, ent *e, const struct stat *st)
{
    memset(e, 0, sizeof *e);
    e->mode = st->st_mode & 07777;
    e->uid = st->st_uid;
    e->gid = st->st_gid;
    e->mtime = st->st_mtim.tv_sec;
    e->nsec = (int32_t)st->st_mtim.tv_nsec;
    clamp_time(t, &e->mtime, &e->nsec);
}

static int is_exported_xattr(const char *name)
{
    return strncmp(name, "trusted.overlay.", 16) != 0 && strncmp(name, "user.overlay.", 13) != 0;
}

static int xent_cmp(const void *a, const void *b)
{
    return strcmp(((const xent *)a)->name, ((const xent *)b)->name);
}

/* Path for l*xattr of dirfd/name. */
static void proc_path(char *out, size_t cap, int dirfd, const char *name)
{
    snprintf(out, cap, "/proc/self/fd/%d/%s", dirfd, name);
}

/* Collect the entry's exported xattrs into t->xe (sorted); fd >= 0 or dirfd/name. */
static int read_xattrs(tw *t, int fd, int dirfd, const char *name, const char *path)
{
    char pp[64 + NAME_MAX + 1];
    t->nxe = 0;
    t->xvals.len = 0;
    if (t->o.no_xattrs) return 0;
    if (fd < 0) proc_path(pp, sizeof pp, dirfd, name);
    ssize_t n;
    for (;;) {
        if (lfs_sb_reserve(&t->xlist, 4096) < 0) return tw_fail(t, ENOMEM, path, "%s", "out of memory");
        size_t cap = t->xlist.cap - 1;
        n = fd >= 0 ? flistxattr(fd, t->xlist.p, cap) : llistxattr(pp, t->xlist.p, cap);
        if (n >= 0) break;
        if (errno == ENOTSUP) return 0;
        if (errno != ERANGE) return tw_fail(t, errno, path, "listing xattrs: %s", strerror(errno));
        n = fd >= 0 ? flistxattr(fd, NULL, 0) : llistxattr(pp, NULL, 0);
        if (n < 0) return tw_fail(t, errno, path, "listing xattrs: %s", strerror(errno));
        t->xlist.len = 0;
        if (lfs_sb_reserve(&t->xlist, (size_t)n + 1) < 0) return tw_fail(t, ENOMEM, path, "%s", "out of memory");
    }
    if (n == 0) return 0;
    t->xlist.p[n] = 0;
    for (size_t i = 0; i < (size_t)n;) {
        const char *xn = t->xlist.p + i;
        size_t l = strlen(xn);
        i += l + 1;
        if (!l || !is_exported_xattr(xn)) continue;
        ssize_t v;
        for (;;) {
            if (lfs_sb_reserve(&t->xvals, 4096) < 0) return tw_fail(t, ENOMEM, path, "%s", "out of memory");
            char *dst = t->xvals.p + t->xvals.len;
            size_t cap = t->xvals.cap - t->xvals.len - 1;
            v = fd >= 0 ? fgetxattr(fd, xn, dst, cap) : lgetxattr(pp, xn, dst, cap);
            if (v >= 0 || errno != ERANGE) break;
            v = fd >= 0 ? fgetxattr(fd, xn, NULL, 0) : lgetxattr(pp, xn, NULL, 0);
            if (v < 0) break;
            if (lfs_sb_reserve(&t->xvals, (size_t)v + 1) < 0) return tw_fail(t, ENOMEM, path, "%s", "out of memory");
        }
        if (v < 0) {
            if (errno == ENODATA) continue;       /* removed meanwhile */
            return lfs_fail(t->err, errno, (int64_t)t->offset, path, path,
                            "reading xattr %s: %s", xn, strerror(errno));
        }
        if (t->nxe == t->xecap) {
            size_t nc = t->xecap ? t->xecap * 2 : 16;
            xent *nx = realloc(t->xe, nc * sizeof *nx);
            if (!nx) return tw_fail(t, ENOMEM, path, "%s", "out of memory");
            t->xe = nx;
            t->xecap = nc;
        }
        t->xe[t->nxe].name = xn;
        t->xe[t->nxe].voff = t->xvals.len;
        t->xe[t->nxe].vlen = (size_t)v;
        t->nxe++;
        t->xvals.len += (size_t)v;
    }
    if (t->nxe > 1) qsort(t->xe, t->nxe, sizeof *t->xe, xent_cmp);
    return 0;
}

/* ------------------------------------------------------------ content */

static int write_data(tw *t, int fd, int64_t off, int64_t len, const char *path)
{
    while (len > 0) {
        if (t->used == OUTBUF_SIZE) {
            int rc = tw_flush(t);
            if (rc < 0) return rc;
        }
        size_t k = OUTBUF_SIZE - t->used;
        if ((int64_t)k > len) k = (size_t)len;
        ssize_t r = pread(fd, t->buf + t->used, k, off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return tw_fail(t, errno, path, "reading: %s", strerror(errno));
        }
        if (r == 0) return tw_fail(t, EIO, path, "%s", "file shrank while it was being archived");
        t->used += (size_t)r;
        t->offset += (uint64_t)r;
        off += r;
        len -= r;
    }
    return 0;
}

static int add_segment(tw *t, int64_t off, int64_t len, const char *path)
{
    if (t->nsegs == t->segcap) {
        size_t nc = t->segcap ? t->segcap * 2 : 16;
        seg *ns = realloc(t->segs, nc * sizeof *ns);
        if (!ns) return tw_fail(t, ENOMEM, path, "%s", "out of memory");
        t->segs = ns;
        t->segcap = nc;
    }
    t->segs[t->nsegs].off = off;
    t->segs[t->nsegs].len = len;
    t->nsegs++;
    return 0;
}

/* Data segments of a file with holes; 0 with t->nsegs = 0 when it has none. */
static int find_segments(tw *t, int fd, int64_t size, const char *path)
{
    t->nsegs = 0;
    off_t first_hole = lseek(fd, 0, SEEK_HOLE);
    if (first_hole < 0 || first_hole >= size) return 0;       /* no holes (or no way to tell) */
    int64_t pos = 0;
    while (pos < size) {
        off_t d = lseek(fd, pos, SEEK_DATA);
        if (d < 0) {
            if (errno == ENXIO) break;                /* only a hole from here */
            if (errno == EINVAL || errno == ENOTSUP) { t->nsegs = 0; return 0; }
            return tw_fail(t, errno, path, "finding data: %s", strerror(errno));
        }
        if (d >= size) break;
        off_t h = lseek(fd, d, SEEK_HOLE);
        if (h < 0) return tw_fail(t, errno, path, "finding holes: %s", strerror(errno));
        if (h > size) h = size;
        int r = add_segment(t, d, h - d, path);
        if (r < 0) return r;
        pos = h;
    }
    if (t->nsegs == 1 && t->segs[0].off == 0 && t->segs[0].len == size) {
        t->nsegs = 0;                                 /* no holes after all */
        return 0;
    }
    /* A trailing hole: a zero-length segment at the end fixes the size for readers. */
    if (t->nsegs == 0 || t->segs[t->nsegs - 1].off + t->segs[t->nsegs - 1].len < size) {
        int r = add_segment(t, size, 0, path);
        if (r < 0) return r;
    }
    return 0;
}

/* The sparse map block(s) that open a GNU.sparse 1.0 entry's data. */
static int sparse_map(tw *t, lfs_strbuf *m)
{
    char num[48];
    int w = snprintf(num, sizeof num, "%zu\n", t->nsegs);
    m->len = 0;
    if (lfs_sb_append(m, num, (size_t)w) < 0) return -ENOMEM;
    for (size_t i = 0; i < t->nsegs; i++) {
        w = snprintf(num, sizeof num, "%lld\n%lld\n", (long long)t->segs[i].off,
                     (long long)t->segs[i].len);
        if (lfs_sb_append(m, num, (size_t)w) < 0) return -ENOMEM;
    }
    return 0;
}

static int write_regular(tw *t, ent *e, int fd, const struct stat *st, const char *path)
{
    int rc;
    int64_t size = st->st_size;
    e->type = LFS_T_REG;
    e->size = size;
    /* st_blocks cannot rule holes out (an xattr block or extent-tree blocks
     * count too): look whenever sparse files are asked for. */
    if (t->o.sparse && size > 0) {
        if ((rc = find_segments(t, fd, size, path)) < 0) return rc;
        if (t->nsegs) {
            lfs_strbuf m = {0};
            if (sparse_map(t, &m) < 0) return tw_fail(t, ENOMEM, path, "%s", "out of memory");
            int64_t stored = (int64_t)((m.len + LFS_BLOCK - 1) / LFS_BLOCK * LFS_BLOCK);
            for (size_t i = 0; i < t->nsegs; i++) stored += t->segs[i].len;
            e->sparse = 1;
            e->realsize = size;
            e->size = stored;
            rc = write_header(t, e);
            if (rc == 0) rc = tw_emit(t, m.p, m.len);
            if (rc == 0) rc = tw_pad(t, m.len);
            lfs_sb_free(&m);
            if (rc < 0) return rc == -ENOMEM ? tw_fail(t, ENOMEM, path, "%s", "out of memory") : rc;
            int64_t data = 0;
            for (size_t i = 0; i < t->nsegs; i++) {
                if ((rc = write_data(t, fd, t->segs[i].off, t->segs[i].len, path)) < 0) return rc;
                data += t->segs[i].len;
            }
            return tw_pad(t, (uint64_t)data);
        }
    }
    if ((rc = write_header(t, e)) < 0)
        return rc == -ENOMEM ? tw_fail(t, ENOMEM, path, "%s", "out of memory") : rc;
    if ((rc = write_data(t, fd, 0, size, path)) < 0) return rc;
    return tw_pad(t, (uint64_t)size);
}

/* ------------------------------------------------------------ entries */

/* A whiteout entry named name (regular, empty, mode 0, owner 0). */
static int write_whiteout(tw *t, const char *name, size_t namelen, int64_t mtime, int32_t nsec)
{
    ent e;
    memset(&e, 0, sizeof e);
    e.name = name;
    e.namelen = namelen;
    e.type = LFS_T_REG;
    e.mtime = mtime;
    e.nsec = nsec;
    clamp_time(t, &e.mtime, &e.nsec);
    int rc = write_header(t, &e);
    if (rc == -ENOMEM) return tw_fail(t, ENOMEM, name, "%s", "out of memory");
    return rc;
}

/* dir/.wh.base for the entry path (len bytes). */
static int whiteout_name(lfs_strbuf *out, const char *path, size_t len)
{
    size_t base = len;
    while (base > 0 && path[base - 1] != '/') base--;
    out->len = 0;
    if (lfs_sb_append(out, path, base) < 0 || lfs_sb_append(out, WH_PREFIX, 4) < 0 ||
        lfs_sb_append(out, path + base, len - base) < 0)
        return -ENOMEM;
    return 0;
}

static int write_opaque(tw *t, const char *dir, size_t len, int64_t mtime, int32_t nsec)
{
    lfs_strbuf n = {0};
    while (len > 0 && dir[len - 1] == '/') len--;
    if (lfs_sb_append(&n, dir, len) < 0 || lfs_sb_append(&n, "/" WH_OPAQUE, 1 + strlen(WH_OPAQUE)) < 0) {
        lfs_sb_free(&n);
        return tw_fail(t, ENOMEM, dir, "%s", "out of memory");
    }
    int rc = write_whiteout(t, n.p, n.len, mtime, nsec);
    lfs_sb_free(&n);
    return rc;
}

static int dir_is_opaque(tw *t, int fd, const char *path)
{
    char v[8];
    ssize_t n = fgetxattr(fd, t->opaque_name, v, sizeof v);
    if (n < 0) {
        if (errno == ENODATA || errno == ENOTSUP || errno == ERANGE) return 0;
        return tw_fail(t, errno, path, "reading the opaque xattr: %s", strerror(errno));
    }
    return n == 1 && v[0] == 'y';
}

#define NODE_OPAQUE 1             /* overlay: write the opaque marker after a directory */

/*
 * Write the filesystem entry dirfd/base under the tar name in *path (no trailing
 * slash).  For a directory, *subfd receives its open fd when subfd != NULL and
 * *isdir is set.  *opaque is set when an opaque marker followed the directory.
 */
static int write_node(tw *t, int dirfd, const char *base, lfs_strbuf *path, int flags,
                      int *subfd, int *isdir, int *opaque, const struct stat *pre)
{
    struct stat st;
    ent e;
    int rc = 0;
    if (subfd) *subfd = -1;
    if (isdir) *isdir = 0;
    if (opaque) *opaque = 0;
    if (pre) {
        st = *pre;
    } else if (fstatat(dirfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0) {
        return tw_fail(t, errno, path->p, "stat: %s", strerror(errno));
    }
    size_t plen = path->len;

    switch (st.st_mode & S_IFMT) {
    case S_IFDIR: {
        int fd = openat(dirfd, base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) return tw_fail(t, errno, path->p, "opening the directory: %s", strerror(errno));
        if (fstat(fd, &st) < 0) {
            rc = tw_fail(t, errno, path->p, "stat: %s", strerror(errno));
            goto dir_out;
        }
        if ((rc = read_xattrs(t, fd, -1, NULL, path->p)) < 0) goto dir_out;
        ent_from_stat(t, &e, &st);
        e.type = LFS_T_DIR;
        if (lfs_sb_append(path, "/", 1) < 0) { rc = tw_fail(t, ENOMEM, path->p, "%s", "out of memory"); goto dir_out; }
        e.name = path->p;
        e.namelen = path->len;
        e.xattrs = t->nxe > 0;
        rc = write_header(t, &e);
        path->len = plen;
        path->p[plen] = 0;
        if (rc < 0) {
            if (rc == -ENOMEM) rc = tw_fail(t, ENOMEM, path->p, "%s", "out of memory");
            goto dir_out;
        }
        if ((flags & NODE_OPAQUE) && t->o.source == LFS_SRC_OVERLAY) {
            rc = dir_is_opaque(t, fd, path->p);
            if (rc < 0) goto dir_out;
            if (rc > 0) {
                rc = write_opaque(t, path->p, plen, st.st_mtim.tv_sec, (int32_t)st.st_mtim.tv_nsec);
                if (rc < 0) goto dir_out;
                if (opaque) *opaque = 1;
            }
            rc = 0;
        }
        if (isdir) *isdir = 1;
        if (subfd) { *subfd = fd; return 0; }
    dir_out:
        close(fd);
        return rc;
    }
    case S_IFREG: {
        int fd = openat(dirfd, base, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0) return tw_fail(t, errno, path->p, "opening: %s", strerror(errno));
        struct stat fst;
        if (fstat(fd, &fst) < 0) {
            rc = tw_fail(t, errno, path->p, "stat: %s", strerror(errno));
            goto reg_out;
        }
        if (!S_ISREG(fst.st_mode) || fst.st_ino != st.st_ino || fst.st_dev != st.st_dev) {
            rc = tw_fail(t, EAGAIN, path->p, "%s", "the file was replaced while it was being archived");
            goto reg_out;
        }
        if ((rc = read_xattrs(t, fd, -1, NULL, path->p)) < 0) goto reg_out;
        ent_from_stat(t, &e, &fst);
        e.name = path->p;
        e.namelen = path->len;
        e.xattrs = t->nxe > 0;
        const char *first = fst.st_nlink > 1 ? lfs_hl_find(&t->links, fst.st_dev, fst.st_ino) : NULL;
        if (first) {
            e.type = LFS_T_LINK;
            e.link = first;
            e.linklen = strlen(first);
            rc = write_header(t, &e);
            if (rc == -ENOMEM) rc = tw_fail(t, ENOMEM, path->p, "%s", "out of memory");
            goto reg_out;
        }
        if (fst.st_nlink > 1 && lfs_hl_add(&t->links, fst.st_dev, fst.st_ino, path->p) < 0) {
            rc = tw_fail(t, ENOMEM, path->p, "%s", "out of memory");
            goto reg_out;
        }
        rc = write_regular(t, &e, fd, &fst, path->p);
    reg_out:
        close(fd);
        return rc;
    }
    case S_IFLNK: {
        ssize_t n = readlinkat(dirfd, base, t->linkbuf, LFS_PATH_MAX + 1);
        if (n < 0) return tw_fail(t, errno, path->p, "readlink: %s", strerror(errno));
        if (n > LFS_PATH_MAX) return tw_fail(t, ENAMETOOLONG, path->p, "%s", "symlink target too long");
        t->linkbuf[n] = 0;
        if ((rc = read_xattrs(t, -1, dirfd, base, path->p)) < 0) return rc;
        ent_from_stat(t, &e, &st);
        e.type = LFS_T_SYMLINK;
        e.name = path->p;
        e.namelen = path->len;
        e.link = t->linkbuf;
        e.linklen = (size_t)n;
        e.xattrs = t->nxe > 0;
        break;
    }
    case S_IFCHR:
    case S_IFBLK:
    case S_IFIFO:
        if (S_ISCHR(st.st_mode) && t->o.source == LFS_SRC_OVERLAY && st.st_rdev == makedev(0, 0)) {
            lfs_strbuf wn = {0};
            if (whiteout_name(&wn, path->p, path->len) < 0) {
                lfs_sb_free(&wn);
                return tw_fail(t, ENOMEM, path->p, "%s", "out of memory");
            }
            rc = write_whiteout(t, wn.p, wn.len, st.st_mtim.tv_sec, (int32_t)st.st_mtim.tv_nsec);
            lfs_sb_free(&wn);
            return rc;
        }
        if ((rc = read_xattrs(t, -1, dirfd, base, path->p)) < 0) return rc;
        ent_from_stat(t, &e, &st);
        e.type = S_ISCHR(st.st_mode) ? LFS_T_CHR : S_ISBLK(st.st_mode) ? LFS_T_BLK : LFS_T_FIFO;
        if (!S_ISFIFO(st.st_mode)) {
            e.major = major(st.st_rdev);
            e.minor = minor(st.st_rdev);
            if (e.major > MAX_OCTAL7 || e.minor > MAX_OCTAL7)
                return tw_fail(t, EOVERFLOW, path->p, "%s", "device number too large for a tar header");
        }
        e.name = path->p;
        e.namelen = path->len;
        e.xattrs = t->nxe > 0;
        break;
    case S_IFSOCK:
        return 0;                 /* sockets are not archived */
    default:
        return tw_fail(t, EINVAL, path->p, "%s", "unknown file type");
    }
    /* Hardlinked symlinks, devices and fifos too (as Docker does). */
    if (st.st_nlink > 1) {
        const char *first = lfs_hl_find(&t->links, st.st_dev, st.st_ino);
        if (first) {
            e.type = LFS_T_LINK;
            e.link = first;
            e.linklen = strlen(first);
            e.major = e.minor = 0;
        } else if (lfs_hl_add(&t->links, st.st_dev, st.st_ino, path->p) < 0) {
            return tw_fail(t, ENOMEM, path->p, "%s", "out of memory");
        }
    }
    rc = write_header(t, &e);
    if (rc == -ENOMEM) rc = tw_fail(t, ENOMEM, path->p, "%s", "out of memory");
    return rc;
}

/* ------------------------------------------------------------ whole tree */

typedef struct frame {
    int fd;                       /* -1 while closed to bound fd use */
    dev_t dev;
    ino_t ino;
    char *arena;                  /* names, NUL-separated */
    char **names;
    size_t n, i;
    size_t pathlen;               /* length of "dir/" prefix of the tar path */
} frame;

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Read and sort the names of directory fd into f. */
static int read_names(tw *t, int fd, frame *f, const char *path)
{
    lfs_strbuf ar = {0};
    size_t count = 0;
    if (lseek(fd, 0, SEEK_SET) < 0)
        return tw_fail(t, errno, path, "reading the directory: %s", strerror(errno));
    for (;;) {
        ssize_t n = getdents64(fd, t->dents, DENTS_BUF);
        if (n < 0) {
            lfs_sb_free(&ar);
            return tw_fail(t, errno, path, "reading the directory: %s", strerror(errno));
        }
        if (n == 0) break;
        for (ssize_t off = 0; off < n;) {
            struct dirent64 *d = (struct dirent64 *)(t->dents + off);
            off += d->d_reclen;
            const char *nm = d->d_name;
            if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0))) continue;
            if (lfs_sb_append(&ar, nm, strlen(nm) + 1) < 0) {
                lfs_sb_free(&ar);
                return tw_fail(t, ENOMEM, path, "%s", "out of memory");
            }
            count++;
        }
    }
    char **names = malloc((count ? count : 1) * sizeof *names);
    if (!names) {
        lfs_sb_free(&ar);
        return tw_fail(t, ENOMEM, path, "%s", "out of memory");
    }
    size_t k = 0;
    for (size_t off = 0; k < count; k++) {
        names[k] = ar.p + off;
        off += strlen(ar.p + off) + 1;
    }
    if (count > 1) qsort(names, count, sizeof *names, name_cmp);
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
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
}

static int walk_tree(tw *t)
{
    frame *fr = NULL;
    size_t nf = 0, cap = 0;
    lfs_strbuf path = {0};
    int rc = 0;
    if (lfs_sb_reserve(&path, 256) < 0) return tw_fail(t, ENOMEM, NULL, "%s", "out of memory");
    path.p[0] = 0;

    int rfd = openat(t->root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (rfd < 0) {
        lfs_sb_free(&path);
        return tw_fail(t, errno, ".", "opening the root: %s", strerror(errno));
    }
    struct stat rst;
    cap = 16;
    fr = calloc(cap, sizeof *fr);
    if (!fr) { close(rfd); lfs_sb_free(&path); return tw_fail(t, ENOMEM, NULL, "%s", "out of memory"); }
    fr[0].fd = rfd;
    nf = 1;
    if (fstat(rfd, &rst) < 0) { rc = tw_fail(t, errno, ".", "stat: %s", strerror(errno)); goto out; }
    fr[0].dev = rst.st_dev;
    fr[0].ino = rst.st_ino;
    if ((rc = read_names(t, rfd, &fr[0], ".")) < 0) goto out;

    while (nf > 0) {
        frame *f = &fr[nf - 1];
        if (f->i == f->n) {
            if (nf >= 2 && fr[nf - 2].fd < 0) {
                /* Reopen the parent that was closed to bound fd use. */
                frame *p = &fr[nf - 2];
                int pfd = openat(f->fd, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                struct stat pst;
                path.len = p->pathlen;
                path.p[path.len] = 0;
                if (pfd < 0) { rc = tw_fail(t, errno, path.p, "reopening: %s", strerror(errno)); goto out; }
                if (fstat(pfd, &pst) < 0 || pst.st_dev != p->dev || pst.st_ino != p->ino) {
                    close(pfd);
                    rc = tw_fail(t, EAGAIN, path.p, "%s", "directory moved while it was being archived");
                    goto out;
                }
                p->fd = pfd;
            }
            frame_free(f);
            nf--;
            continue;
        }
        const char *name = f->names[f->i++];
        path.len = f->pathlen;
        if (lfs_sb_append(&path, name, strlen(name)) < 0) { rc = tw_fail(t, ENOMEM, NULL, "%s", "out of memory"); goto out; }
        int sub = -1, isdir = 0;
        rc = write_node(t, f->fd, name, &path, NODE_OPAQUE, &sub, &isdir, NULL, NULL);
        if (rc < 0) goto out;
        if (sub < 0) continue;
        if (nf == cap) {
            frame *nfr = realloc(fr, cap * 2 * sizeof *fr);
            if (!nfr) { close(sub); rc = tw_fail(t, ENOMEM, path.p, "%s", "out of memory"); goto out; }
            fr = nfr;
            memset(fr + cap, 0, cap * sizeof *fr);
            cap *= 2;
        }
        frame *c = &fr[nf];
        memset(c, 0, sizeof *c);
        c->fd = sub;
        nf++;
        struct stat sst;
        if (fstat(sub, &sst) < 0) { rc = tw_fail(t, errno, path.p, "stat: %s", strerror(errno)); goto out; }
        c->dev = sst.st_dev;
        c->ino = sst.st_ino;
        if ((rc = read_names(t, sub, c, path.p)) < 0) goto out;
        if (lfs_sb_append(&path, "/", 1) < 0) { rc = tw_fail(t, ENOMEM, NULL, "%s", "out of memory"); goto out; }
        c->pathlen = path.len;
        if (nf > OPEN_DEPTH) {
            frame *old = &fr[nf - 1 - OPEN_DEPTH];
            if (old->fd >= 0) { close(old->fd); old->fd = -1; }
        }
    }
out:
    for (size_t i = 0; i < nf; i++) frame_free(&fr[i]);
    free(fr);
    lfs_sb_free(&path);
    return rc;
}

/* ------------------------------------------------------------ change lists */

typedef struct citem {
    char *path;                   /* normalised, owned */
    int kind;
} citem;

/* Sort key byte i of an item: the opaque marker of p sorts as "p/", the first
 * of p's children. */
static unsigned item_key(const citem *c, size_t len, size_t i)
{
    unsigned ch = i < len ? (unsigned char)c->path[i] : '/';
    return ch == '/' ? 1 : ch + 1;
}

static int citem_cmp(const void *x, const void *y)
{
    const citem *a = x, *b = y;
    size_t al = strlen(a->path), bl = strlen(b->path);
    size_t kal = al + (a->kind == LFS_CHANGE_OPAQUE), kbl = bl + (b->kind == LFS_CHANGE_OPAQUE);
    size_t n = kal < kbl ? kal : kbl;
    for (size_t i = 0; i < n; i++) {
        unsigned ka = item_key(a, al, i), kb = item_key(b, bl, i);
        if (ka != kb) return ka < kb ? -1 : 1;
    }
    if (kal != kbl) return kal < kbl ? -1 : 1;
    /* The same path deleted and written: the whiteout first (it is about the
     * lower layers), then the new entry. */
    int ra = a->kind == LFS_CHANGE_DELETE ? 0 : 1, rb = b->kind == LFS_CHANGE_DELETE ? 0 : 1;
    return ra - rb;
}

/* Normalise a change path: drop leading "/" and "./", empty and "." components,
 * a trailing "/".  ".." anywhere, or nothing left, is EINVAL. */
static int normalise(const char *in, char **out)
{
    size_t n = strlen(in);
    char *o = malloc(n + 1);
    if (!o) return -ENOMEM;
    size_t k = 0;
    const char *p = in;
    while (*p) {
        while (*p == '/') p++;
        if (!*p) break;
        const char *s = p;
        while (*p && *p != '/') p++;
        size_t l = (size_t)(p - s);
        if (l == 1 && s[0] == '.') continue;
        if (l == 2 && s[0] == '.' && s[1] == '.') { free(o); return -EINVAL; }
        if (k) o[k++] = '/';
        memcpy(o + k, s, l);
        k += l;
    }
    if (!k) { free(o); return -EINVAL; }
    o[k] = 0;
    *out = o;
    return 0;
}

typedef struct pcache {
    lfs_strbuf dir;                   /* path of the cached parent */
    int fd;                       /* -1: none; root_fd is never cached */
} pcache;

/* fd of the parent directory of path (plen: length of the parent part). */
static int parent_fd(tw *t, pcache *pc, const char *path, size_t plen)
{
    if (plen == 0) return t->root_fd;
    if (pc->fd >= 0 && pc->dir.len == plen && memcmp(pc->dir.p, path, plen) == 0) return pc->fd;
    if (pc->fd >= 0) close(pc->fd);
    pc->fd = -1;
    int fd = lfs_open_dir_beneath(t->root_fd, path, plen, 1);
    if (fd < 0) {
        int e = -fd;
        char *d = strndup(path, plen);
        int rc = tw_fail(t, e, d ? d : path, "opening the directory: %s", strerror(e));
        free(d);
        return rc;
    }
    if (lfs_sb_set(&pc->dir, path, plen) < 0) {
        close(fd);
        return tw_fail(t, ENOMEM, path, "%s", "out of memory");
    }
    pc->fd = fd;
    return fd;
}

static size_t parent_len(const char *p, size_t len)
{
    size_t i = len;
    while (i > 0 && p[i - 1] != '/') i--;
    return i ? i - 1 : 0;
}

/* Write the filesystem entry at path (len bytes) of a change list. */
static int write_change_node(tw *t, pcache *pc, const char *p, size_t len, int flags,
                             int *isdir, int *opaque, int must_be_dir)
{
    size_t pl = parent_len(p, len);
    int dfd = parent_fd(t, pc, p, pl);
    if (dfd < 0) return dfd;
    lfs_strbuf path = {0};
    if (lfs_sb_set(&path, p, len) < 0) return tw_fail(t, ENOMEM, p, "%s", "out of memory");
    const char *base = path.p + (pl ? pl + 1 : 0);
    struct stat st;
    int rc;
    if (fstatat(dfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0) {
        rc = tw_fail(t, errno, path.p, "stat: %s", strerror(errno));
    } else if (must_be_dir && !S_ISDIR(st.st_mode)) {
        rc = tw_fail(t, ENOTDIR, path.p, "%s", "parent of a change is not a directory");
    } else {
        rc = write_node(t, dfd, base, &path, flags, NULL, isdir, opaque, &st);
    }
    lfs_sb_free(&path);
    return rc;
}

static int write_changes(tw *t, const lfs_change *changes, size_t nchanges)
{
    citem *items = calloc(nchanges ? nchanges : 1, sizeof *items);
    if (!items) return tw_fail(t, ENOMEM, NULL, "%s", "out of memory");
    int rc = 0;
    size_t n = 0;
    pcache pc = { {0}, -1 };
    size_t *chain = NULL;         /* lengths of the directories written on the current path */
    size_t depth = 0;
    lfs_strbuf chain_path = {0};
    lfs_strbuf wh = {0};
    lfs_strbuf opaque_done = {0};
    int have_opaque_done = 0;

    for (size_t i = 0; i < nchanges; i++) {
        const char *src = changes[i].path ? changes[i].path : "";
        int kind = changes[i].kind;
        if (kind != LFS_CHANGE_PATH && kind != LFS_CHANGE_DELETE && kind != LFS_CHANGE_OPAQUE) {
            rc = lfs_fail(t->err, EINVAL, -1, src, NULL, "unknown change kind %d", kind);
            goto out;
        }
        int r = normalise(src, &items[n].path);
        if (r == -EINVAL) {
            rc = lfs_fail(t->err, EINVAL, -1, src, NULL, "%s",
                          "change paths must be relative, without \"..\" components");
            goto out;
        }
        if (r < 0) { rc = tw_fail(t, ENOMEM, src, "%s", "out of memory"); goto out; }
        items[n++].kind = kind;
    }
    if (n > 1) qsort(items, n, sizeof *items, citem_cmp);
    chain = malloc((LFS_PATH_MAX + 1) * sizeof *chain);
    if (!chain) { rc = tw_fail(t, ENOMEM, NULL, "%s", "out of memory"); goto out; }

    for (size_t i = 0; i < n; i++) {
        if (i > 0 && items[i].kind == items[i - 1].kind && strcmp(items[i].path, items[i - 1].path) == 0)
            continue;             /* duplicate */
        const char *p = items[i].path;
        size_t len = strlen(p);
        int kind = items[i].kind;
        /* The directories that must precede this entry: its ancestors, and for an
         * opaque marker the directory itself. */
        size_t need = kind == LFS_CHANGE_OPAQUE ? len : parent_len(p, len);
        while (depth > 0) {
            size_t l = chain[depth - 1];
            if (l <= need && memcmp(chain_path.p, p, l) == 0 && (l == need || p[l] == '/')) break;
            depth--;
        }
        size_t have = depth ? chain[depth - 1] : 0;
        if (have < need) {
            if (lfs_sb_set(&chain_path, p, need) < 0) { rc = tw_fail(t, ENOMEM, p, "%s", "out of memory"); goto out; }
            size_t pos = have ? have + 1 : 0;
            while (pos <= need) {
                size_t end = pos;
                while (end < need && p[end] != '/') end++;
                rc = write_change_node(t, &pc, p, end, 0, NULL, NULL, 1);
                if (rc < 0) goto out;
                if (depth > LFS_PATH_MAX) { rc = tw_fail(t, ENAMETOOLONG, p, "%s", "path too deep"); goto out; }
                chain[depth++] = end;
                pos = end + 1;
            }
        }
        if (kind == LFS_CHANGE_PATH) {
            int isdir = 0, opq = 0;
            rc = write_change_node(t, &pc, p, len, NODE_OPAQUE, &isdir, &opq, 0);
            if (rc < 0) goto out;
            if (isdir) {
                if (lfs_sb_set(&chain_path, p, len) < 0) { rc = tw_fail(t, ENOMEM, p, "%s", "out of memory"); goto out; }
                if (depth > LFS_PATH_MAX) { rc = tw_fail(t, ENAMETOOLONG, p, "%s", "path too deep"); goto out; }
                chain[depth++] = len;
            }
            if (opq) {
                if (lfs_sb_set(&opaque_done, p, len) < 0) { rc = tw_fail(t, ENOMEM, p, "%s", "out of memory"); goto out; }
                have_opaque_done = 1;
            }
        } else if (kind == LFS_CHANGE_DELETE) {
            if (whiteout_name(&wh, p, len) < 0) { rc = tw_fail(t, ENOMEM, p, "%s", "out of memory"); goto out; }
            if ((rc = write_whiteout(t, wh.p, wh.len, 0, 0)) < 0) goto out;
        } else {
            if (have_opaque_done && opaque_done.len == len && memcmp(opaque_done.p, p, len) == 0)
                continue;         /* already written after the directory */
            if ((rc = write_opaque(t, p, len, 0, 0)) < 0) goto out;
        }
    }
out:
    for (size_t i = 0; i < n; i++) free(items[i].path);
    free(items);
    free(chain);
    if (pc.fd >= 0) close(pc.fd);
    lfs_sb_free(&pc.dir);
    lfs_sb_free(&chain_path);
    lfs_sb_free(&wh);
    lfs_sb_free(&opaque_done);
    return rc;
}

/* ------------------------------------------------------------ entry point */

int lfs_create(int root_fd, const lfs_change *changes, size_t nchanges, int out_fd,
               const lfs_create_opts *opts, lfs_create_result *res, lfs_error *err)
{
    tw t;
    memset(&t, 0, sizeof t);
    t.err = err;
    t.root_fd = root_fd;
    if (opts) t.o = *opts;
    t.opaque_name = t.o.overlay_user_xattr ? "user.overlay.opaque" : "trusted.overlay.opaque";
    if (res) memset(res, 0, sizeof *res);

    int rc;
    t.buf = malloc(OUTBUF_SIZE);
    t.linkbuf = malloc(LFS_PATH_MAX + 2);
    t.dents = malloc(DENTS_BUF);
    if (!t.buf || !t.linkbuf || !t.dents) {
        rc = lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
        goto out;
    }
    rc = lfs_sink_open(&t.sink, out_fd, t.o.compression, t.o.level, t.o.threads, err);
    if (rc < 0) {
        t.sink = NULL;
        goto out;
    }
    rc = changes ? write_changes(&t, changes, nchanges) : walk_tree(&t);
    if (rc < 0) goto out;
    if ((rc = tw_zeros(&t, 2 * LFS_BLOCK)) < 0) goto out;
    if ((rc = tw_flush(&t)) < 0) goto out;
    lfs_digests d;
    memset(&d, 0, sizeof d);
    rc = lfs_sink_finish(t.sink, &d, err);
    if (rc < 0) goto out;
    if (res) {
        res->digests = d;
        res->entries = t.entries;
    }
    rc = 0;
out:
    if (t.sink) lfs_sink_free(t.sink);
    free(t.buf);
    free(t.linkbuf);
    free(t.dents);
    lfs_hl_free(&t.links);
    lfs_sb_free(&t.pax);
    lfs_sb_free(&t.alias);
    lfs_sb_free(&t.xname);
    lfs_sb_free(&t.xlist);
    lfs_sb_free(&t.xvals);
    free(t.xe);
    free(t.segs);
    return rc;
}
