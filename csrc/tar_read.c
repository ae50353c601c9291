/*
 * lfs_tar: a pull parser for tar streams read through an lfs_src.
 *
 * Formats: v7, ustar (name + prefix), star (131-byte prefix), GNU (long names
 * 'L'/'K', old sparse 'S' with extension headers, base-256 numbers, dumpdir
 * 'D', volume label 'V') and PAX ('x' per-entry records; 'g' global records
 * are checked and otherwise ignored, as Docker and Go do), including the GNU
 * sparse formats 0.0, 0.1 and 1.0 carried in PAX records.
 *
 * Every number is range-checked, never truncated; nothing is allocated from a
 * size read from the archive before that size is checked against a limit.
 * Buffers are owned by the lfs_tar and reused from one entry to the next, and
 * entry data is handed out zero-copy from lfs_src_chunk.
 *
 * A hook (lfs_tar_set_hook) may watch every byte consumed from the stream:
 * entry data as lfs_tar_data hands it out, everything else (headers, extension
 * headers, sparse maps, padding, data skipped unread, end blocks, and after
 * lfs_tar_drain the bytes that follow the end) as raw bytes.  tarsplit.c keeps
 * the raw bytes to rebuild the stream later.
 *
 * Error offsets: the offset (in the uncompressed stream) of the header block
 * that is at fault; for faults of an entry as a whole (its data, its sparse
 * map) the offset of the entry's first header, as in lfs_entry.header_offset.
 */
#include "internal.h"
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysmacros.h>

#define DEFAULT_MAX_ENTRIES 10000000ULL
#define DEFAULT_MAX_PAX (1ULL << 20)
#define DEFAULT_MAX_XATTRS (1ULL << 20)

/* Header field offsets (POSIX ustar, with the GNU and star variants). */
#define H_NAME 0
#define H_MODE 100
#define H_UID 108
#define H_GID 116
#define H_SIZE 124
#define H_MTIME 136
#define H_CHKSUM 148
#define H_TYPE 156
#define H_LINKNAME 157
#define H_MAGIC 257
#define H_VERSION 263
#define H_DEVMAJOR 329
#define H_DEVMINOR 337
#define H_PREFIX 345
#define H_GNU_ATIME 345
#define H_GNU_SPARSE 386
#define H_GNU_ISEXT 482
#define H_GNU_REALSIZE 483
#define H_STAR_TRAILER 508

enum { FMT_V7, FMT_USTAR, FMT_STAR, FMT_GNU };

typedef struct gbuf {
    unsigned char *p;
    size_t cap;
} gbuf;

/* Extended-header state waiting for the entry it applies to. */
typedef struct pax_state {
    int present;
    int64_t hdr_off;
    const char *path, *linkpath, *sparse_name;
    int has_size, has_uid, has_gid, has_mtime, has_atime;
    int64_t size;
    uint32_t uid, gid;
    int64_t mtime_sec, atime_sec;
    int32_t mtime_nsec, atime_nsec;
    /* GNU sparse records */
    int has_sp_size, has_sp_realsize, has_sp_major, has_sp_minor, has_numblocks;
    int64_t sp_size, sp_realsize, sp_major, sp_minor, numblocks;
    int sp_kind;                  /* 0 none, 1 GNU.sparse.map (0.1), 2 offset/numbytes pairs (0.0) */
    int pair_open;                /* an offset waits for its numbytes */
    int64_t pair_offset;
} pax_state;

/* An xattr record as found: raw name (NUL-terminated at its '='), raw value. */
typedef struct xrec {
    char *name;
    unsigned char *value;
    size_t len;
    int libarchive;               /* LIBARCHIVE.xattr (name URL-encoded, value base64) */
    int drop;
} xrec;

struct lfs_tar {
    lfs_src *src;
    uint64_t max_entries, max_pax, max_xattrs;
    uint64_t nentries;
    int state;                    /* 0 reading, 1 end of archive, <0 failed with -errno */
    int64_t data_left;            /* entry data not yet handed out */
    int64_t skip_after;           /* padding (or unread payload) after the data */
    lfs_entry e;
    char empty[1];
    unsigned char hdr[LFS_BLOCK];
    gbuf name;                    /* header name (prefix/name) */
    gbuf link;                    /* header linkname */
    gbuf lname;                   /* GNU 'L' */
    gbuf llink;                   /* GNU 'K' */
    int have_lname, have_llink;
    gbuf pax;                     /* 'x' records, rewritten in place into strings */
    size_t pax_len;
    gbuf glob;                    /* 'g' records */
    pax_state px;
    xrec *xr;                     /* records of the pending PAX header */
    size_t nxr, xr_cap;
    lfs_xattr *xattrs;            /* the entry's xattrs */
    size_t nxattrs, xattrs_cap;
    lfs_sparse *sparse;
    size_t nsparse, sparse_cap;
    lfs_tar_hook hook;            /* reports every byte consumed (lfs_tar_set_hook) */
    void *hook_arg;
};

static const unsigned char zero_block[LFS_BLOCK];

/* ---------------------------------------------------------------- helpers */

static int gbuf_reserve(gbuf *b, size_t n)
{
    if (n <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < n) cap *= 2;
    unsigned char *p = realloc(b->p, cap);
    if (!p) return -ENOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

/* Copy a NUL-terminated-or-full field of at most n bytes into b as a C string. */
static int gbuf_set_field(gbuf *b, const unsigned char *f, size_t n)
{
    size_t len = strnlen((const char *)f, n);
    if (gbuf_reserve(b, len + 1) < 0) return -ENOMEM;
    memcpy(b->p, f, len);
    b->p[len] = 0;
    return 0;
}

static int64_t pad512(int64_t n)
{
    return (LFS_BLOCK - (n % LFS_BLOCK)) % LFS_BLOCK;
}

static const char *name_so_far(const lfs_tar *t)
{
    if (t->px.path) return t->px.path;
    if (t->have_lname) return (const char *)t->lname.p;
    if (t->name.p) return (const char *)t->name.p;
    return "";
}

static int fail_state(lfs_tar *t, int rc)
{
    if (rc >= 0) rc = -EIO;
    t->state = rc;
    return rc;
}

/* Header numbers: octal (space/NUL padded or terminated) or base-256 (leading
 * byte with bit 7 set; bit 6 set means negative, two's complement).
 * Returns 0, -1 malformed, -2 out of int64 range. */
static int parse_num(const unsigned char *f, size_t n, int64_t *out)
{
    if (f[0] & 0x80) {
        unsigned char inv = (f[0] & 0x40) ? 0xff : 0;
        uint64_t x = 0;
        for (size_t i = 0; i < n; i++) {
            unsigned char c = f[i] ^ inv;
            if (i == 0) c &= 0x7f;
            if (x >> 56) return -2;
            x = (x << 8) | c;
        }
        if (x >> 63) return -2;
        *out = inv ? ~(int64_t)x : (int64_t)x;
        return 0;
    }
    size_t i = 0;
    while (i < n && f[i] == ' ') i++;
    uint64_t v = 0;
    while (i < n && f[i] >= '0' && f[i] <= '7') {
        if (v > (uint64_t)INT64_MAX / 8) return -2;
        v = v * 8 + (uint64_t)(f[i] - '0');
        i++;
    }
    while (i < n && (f[i] == ' ' || f[i] == 0)) i++;
    if (i != n) return -1;
    if (v > (uint64_t)INT64_MAX) return -2;
    *out = (int64_t)v;
    return 0;
}

static void field_text(char *dst, size_t cap, const unsigned char *f, size_t n)
{
    size_t j = 0;
    for (size_t i = 0; i < n && j + 4 < cap; i++) {
        unsigned char c = f[i];
        if (c >= 0x20 && c < 0x7f && c != '\\') {
            dst[j++] = (char)c;
        } else {
            j += (size_t)snprintf(dst + j, cap - j, "\\x%02x", c);
        }
    }
    dst[j] = 0;
}

static int hdr_num(lfs_tar *t, const unsigned char *h, size_t off, size_t n,
                   const char *field, int64_t hoff, const char *entry, int64_t *out,
                   lfs_error *err)
{
    int r = parse_num(h + off, n, out);
    if (r == 0) return 0;
    char txt[80];
    field_text(txt, sizeof txt, h + off, n);
    return lfs_fail(err, EINVAL, hoff, NULL, entry, "%s header field '%s': \"%s\"",
                    r == -2 ? "out of range" : "malformed", field, txt);
}

/* Decimal PAX numbers: digits only, no sign, within int64. */
static int parse_dec(const char *s, size_t n, int64_t *out)
{
    if (n == 0) return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > ((uint64_t)INT64_MAX - d) / 10) return -2;
        v = v * 10 + d;
    }
    *out = (int64_t)v;
    return 0;
}

/* PAX times: [-+]?digits(.digits)?; nanoseconds kept, finer digits dropped. */
static int parse_pax_time(const char *s, size_t n, int64_t *sec, int32_t *nsec)
{
    size_t i = 0;
    int neg = 0;
    if (i < n && (s[i] == '-' || s[i] == '+')) neg = s[i++] == '-';
    size_t dot = i;
    while (dot < n && s[dot] != '.') dot++;
    int64_t whole;
    int r = parse_dec(s + i, dot - i, &whole);
    if (r < 0) return r;
    int64_t frac = 0;
    if (dot < n) {
        int nd = 0;
        for (size_t k = dot + 1; k < n; k++) {
            if (s[k] < '0' || s[k] > '9') return -1;
            if (nd < 9) {
                frac = frac * 10 + (s[k] - '0');
                nd++;
            }
        }
        for (; nd < 9; nd++) frac *= 10;
    }
    if (!neg) {
        *sec = whole;
        *nsec = (int32_t)frac;
    } else if (frac == 0) {
        *sec = -whole;
        *nsec = 0;
    } else {
        *sec = -whole - 1;
        *nsec = (int32_t)(1000000000 - frac);
    }
    return 0;
}

static int push_sparse(lfs_tar *t, int64_t off, int64_t len)
{
    if (t->nsparse == t->sparse_cap) {
        size_t cap = t->sparse_cap ? t->sparse_cap * 2 : 16;
        lfs_sparse *p = realloc(t->sparse, cap * sizeof *p);
        if (!p) return -ENOMEM;
        t->sparse = p;
        t->sparse_cap = cap;
    }
    t->sparse[t->nsparse].offset = off;
    t->sparse[t->nsparse].length = len;
    t->nsparse++;
    return 0;
}

static int push_xrec(lfs_tar *t, char *name, unsigned char *value, size_t len, int libarchive)
{
    if (t->nxr == t->xr_cap) {
        size_t cap = t->xr_cap ? t->xr_cap * 2 : 8;
        xrec *p = realloc(t->xr, cap * sizeof *p);
        if (!p) return -ENOMEM;
        t->xr = p;
        t->xr_cap = cap;
    }
    t->xr[t->nxr] = (xrec){name, value, len, libarchive, 0};
    t->nxr++;
    return 0;
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* %XX decoding in place; returns the new length or -1. */
static ssize_t url_decode(unsigned char *s, size_t n)
{
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%') {
            if (i + 2 >= n) return -1;
            int a = hexval(s[i + 1]), b = hexval(s[i + 2]);
            if (a < 0 || b < 0) return -1;
            s[j++] = (unsigned char)(a * 16 + b);
            i += 2;
        } else {
            s[j++] = s[i];
        }
    }
    return (ssize_t)j;
}

static int b64val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Base64 decoding in place (padding optional); returns the new length or -1. */
static ssize_t b64_decode(unsigned char *s, size_t n)
{
    while (n > 0 && s[n - 1] == '=') n--;
    if (n % 4 == 1) return -1;
    size_t j = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64val(s[i]);
        if (v < 0) return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            s[j++] = (unsigned char)(acc >> bits);
        }
    }
    if (bits && (acc & ((1u << bits) - 1))) return -1;  /* leftover bits must be zero */
    return (ssize_t)j;
}

/* ------------------------------------------------------------ stream access */

/* Every read from the stream goes through these two, so that the hook sees
 * each consumed byte once, in order; only lfs_tar_data reports LFS_TAR_DATA. */
static ssize_t raw_chunk(lfs_tar *t, const unsigned char **p, size_t max, lfs_error *err)
{
    ssize_t r = lfs_src_chunk(t->src, p, max, err);
    if (r > 0 && t->hook) t->hook(t->hook_arg, LFS_TAR_RAW, *p, (size_t)r);
    return r;
}

static ssize_t raw_read(lfs_tar *t, void *buf, size_t n, lfs_error *err)
{
    ssize_t r = lfs_src_read(t->src, buf, n, err);
    if (r > 0 && t->hook) t->hook(t->hook_arg, LFS_TAR_RAW, buf, (size_t)r);
    return r;
}

static int truncated(lfs_tar *t, const char *entry, int64_t off, int64_t need, lfs_error *err)
{
    return lfs_fail(err, EINVAL, off, NULL, entry,
                    "truncated archive: entry '%s' needs %lld more bytes",
                    entry, (long long)need);
}

/* Skip n bytes; `need_extra` is added to the count reported when the stream ends early. */
static int skip_bytes(lfs_tar *t, int64_t n, int64_t need_extra, const char *entry,
                      int64_t off, lfs_error *err)
{
    if (!t->hook && n > 0) {        /* nobody watches the bytes: the stream may seek */
        ssize_t r = lfs_src_skip(t->src, (uint64_t)n, err);
        if (r < 0) {
            lfs_err_context(err, entry, off);
            return (int)r;
        }
        if (r < n) return truncated(t, entry, off, n - r + need_extra, err);
        return 0;
    }
    while (n > 0) {
        const unsigned char *p;
        ssize_t r = raw_chunk(t, &p, (size_t)n, err);
        if (r < 0) {
            lfs_err_context(err, entry, off);
            return (int)r;
        }
        if (r == 0) return truncated(t, entry, off, n + need_extra, err);
        n -= r;
    }
    return 0;
}

/* Read the n-byte payload of a metadata header ('x', 'g', 'L', 'K') into b
 * (NUL-terminated) and skip its padding. */
static int read_payload(lfs_tar *t, gbuf *b, int64_t n, const char *what, const char *entry,
                        int64_t off, lfs_error *err)
{
    if ((uint64_t)n > t->max_pax)
        return lfs_fail(err, E2BIG, off, NULL, entry,
                        "%s of %lld bytes exceeds the limit of %llu bytes", what,
                        (long long)n, (unsigned long long)t->max_pax);
    if (gbuf_reserve(b, (size_t)n + 1) < 0) return lfs_fail(err, ENOMEM, off, NULL, entry, "out of memory");
    ssize_t r = raw_read(t, b->p, (size_t)n, err);
    if (r < 0) {
        lfs_err_context(err, entry, off);
        return (int)r;
    }
    if (r < n) return truncated(t, entry, off, n - r + pad512(n), err);
    b->p[n] = 0;
    return skip_bytes(t, pad512(n), 0, entry, off, err);
}

/* --------------------------------------------------------------- PAX records */

static void pax_reset(lfs_tar *t)
{
    memset(&t->px, 0, sizeof t->px);
    t->nxr = 0;
    t->nsparse = 0;
}

#define KEYIS(lit) (klen == sizeof(lit) - 1 && memcmp(key, lit, sizeof(lit) - 1) == 0)
#define KEYPREFIX(lit) (klen >= sizeof(lit) - 1 && memcmp(key, lit, sizeof(lit) - 1) == 0)

static int pax_number(const char *key, size_t klen, const char *v, size_t vlen, int64_t *out,
                      int64_t off, const char *entry, lfs_error *err)
{
    int r = parse_dec(v, vlen, out);
    if (r == 0) return 0;
    return lfs_fail(err, EINVAL, off, NULL, entry, "%s PAX value %.*s=\"%.*s\"",
                    r == -2 ? "out of range" : "malformed", (int)klen, key,
                    (int)(vlen > 64 ? 64 : vlen), v);
}

static int pax_id(const char *key, size_t klen, const char *v, size_t vlen, uint32_t *out,
                  int64_t off, const char *entry, lfs_error *err)
{
    int64_t x;
    int r = pax_number(key, klen, v, vlen, &x, off, entry, err);
    if (r < 0) return r;
    if (x >= 4294967295LL)
        return lfs_fail(err, EINVAL, off, NULL, entry, "PAX %.*s %lld out of range",
                        (int)klen, key, (long long)x);
    *out = (uint32_t)x;
    return 0;
}

static int pax_string(char *v, size_t vlen, const char *what, const char **out,
                      int64_t off, const char *entry, lfs_error *err)
{
    if (vlen == 0) {
        *out = NULL;
        return 0;
    }
    if (memchr(v, 0, vlen))
        return lfs_fail(err, EINVAL, off, NULL, entry, "NUL byte in PAX %s", what);
    v[vlen] = 0;                  /* overwrites the record's newline */
    *out = v;
    return 0;
}

static int pax_xattr(lfs_tar *t, char *name, size_t nlen, unsigned char *v, size_t vlen,
                     int libarchive, int64_t off, const char *entry, lfs_error *err)
{
    if (nlen == 0)
        return lfs_fail(err, EINVAL, off, NULL, entry, "empty xattr name in PAX header");
    name[nlen] = 0;               /* overwrites the '=' */
    if (push_xrec(t, name, v, vlen, libarchive) < 0)
        return lfs_fail(err, ENOMEM, off, NULL, entry, "out of memory");
    return 0;
}

static int xrec_cmp(const void *a, const void *b)
{
    const xrec *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    if (c) return c;
    return (x->name > y->name) - (x->name < y->name);   /* record order */
}

/* The entry's xattrs from the collected records.  libarchive writes each
 * xattr twice, as LIBARCHIVE.xattr.NAME (URL-encoded name, base64 value) and
 * as SCHILY.xattr.NAME with the same encoded NAME; a SCHILY record whose raw
 * name has a LIBARCHIVE twin in the same header is that copy and is dropped.
 * Then the names are decoded, and of equal names the last record wins.  The
 * result is sorted by name. */
static int finish_xattrs(lfs_tar *t, int64_t off, const char *entry, lfs_error *err)
{
    size_t n = t->nxr, k;
    xrec *xr = t->xr;
    int lib = 0, schily = 0;
    for (size_t i = 0; i < n; i++) {
        if (xr[i].libarchive) lib = 1;
        else schily = 1;
    }
    if (lib && schily) {
        qsort(xr, n, sizeof *xr, xrec_cmp);
        for (size_t i = 0; i < n;) {
            size_t j = i;
            int twin = 0;
            while (j < n && strcmp(xr[j].name, xr[i].name) == 0) twin |= xr[j++].libarchive;
            for (; i < j; i++)
                if (twin && !xr[i].libarchive) xr[i].drop = 1;
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (!xr[i].libarchive || xr[i].drop) continue;
        ssize_t nl = url_decode((unsigned char *)xr[i].name, strlen(xr[i].name));
        if (nl <= 0 || memchr(xr[i].name, 0, (size_t)nl))
            return lfs_fail(err, EINVAL, off, NULL, entry,
                            "malformed URL-encoded name LIBARCHIVE.xattr.%s", xr[i].name);
        xr[i].name[nl] = 0;
        ssize_t vl = b64_decode(xr[i].value, xr[i].len);
        if (vl < 0)
            return lfs_fail(err, EINVAL, off, NULL, entry,
                            "malformed base64 value of LIBARCHIVE.xattr.%s", xr[i].name);
        xr[i].len = (size_t)vl;
    }
    if (n > 1) qsort(xr, n, sizeof *xr, xrec_cmp);
    if (t->xattrs_cap < n) {
        lfs_xattr *p = realloc(t->xattrs, n * sizeof *p);
        if (!p) return lfs_fail(err, ENOMEM, off, NULL, entry, "out of memory");
        t->xattrs = p;
        t->xattrs_cap = n;
    }
    uint64_t total = 0;
    k = 0;
    for (size_t i = 0; i < n; i++) {
        if (xr[i].drop) continue;
        size_t j = i + 1;
        while (j < n && xr[j].drop) j++;
        if (j < n && strcmp(xr[i].name, xr[j].name) == 0) continue;   /* a later record wins */
        t->xattrs[k].name = xr[i].name;
        t->xattrs[k].value = xr[i].value;
        t->xattrs[k].len = xr[i].len;
        total += strlen(xr[i].name) + xr[i].len;
        k++;
    }
    if (total > t->max_xattrs)
        return lfs_fail(err, E2BIG, off, NULL, entry,
                        "xattrs of the entry (%llu bytes) exceed the limit of %llu bytes",
                        (unsigned long long)total, (unsigned long long)t->max_xattrs);
    t->nxattrs = k;
    return 0;
}

static int pax_sparse_map(lfs_tar *t, const char *v, size_t vlen, int64_t off,
                          const char *entry, lfs_error *err)
{
    t->nsparse = 0;
    if (vlen == 0) return 0;
    size_t i = 0;
    int64_t pending = 0;
    int nvals = 0;
    for (;;) {
        size_t j = i;
        while (j < vlen && v[j] != ',') j++;
        int64_t x;
        if (parse_dec(v + i, j - i, &x) < 0)
            return lfs_fail(err, EINVAL, off, NULL, entry, "malformed GNU.sparse.map");
        if (nvals++ % 2 == 0) {
            pending = x;
        } else if (push_sparse(t, pending, x) < 0) {
            return lfs_fail(err, ENOMEM, off, NULL, entry, "out of memory");
        }
        if (j == vlen) break;
        i = j + 1;
    }
    if (nvals % 2)
        return lfs_fail(err, EINVAL, off, NULL, entry, "GNU.sparse.map has an odd number of values");
    return 0;
}

/* The records of an extended header are handled in passes:
 *   PAX_CHECK    framing only (global 'g' headers; the first step of the others);
 *   PAX_NAMES    framing, then path, linkpath and GNU.sparse.name (when the 'x'
 *                header is read, so later errors can name the entry);
 *   PAX_FIELDS   every other key (when the entry's own header has been read).
 * Names are NUL-terminated in place (over the record's newline or '='). */
enum { PAX_CHECK, PAX_NAMES, PAX_FIELDS };

static int parse_pax(lfs_tar *t, unsigned char *buf, size_t len, int pass, int64_t off,
                     const char *entry_name, lfs_error *err)
{
    size_t pos = 0;
    while (pos < len) {
        const char *entry = entry_name ? entry_name : name_so_far(t);
        if (buf[pos] == 0) {      /* NUL padding after the last record */
            for (size_t k = pos; k < len; k++)
                if (buf[k]) return lfs_fail(err, EINVAL, off, NULL, entry, "garbage after PAX records");
            break;
        }
        size_t i = pos;
        uint64_t rlen = 0;
        while (i < len && buf[i] >= '0' && buf[i] <= '9') {
            if (rlen > len) break;
            rlen = rlen * 10 + (uint64_t)(buf[i] - '0');
            i++;
        }
        if (i == pos || i >= len || buf[i] != ' ' || rlen > len - pos || rlen < (i - pos) + 1 + 3)
            return lfs_fail(err, EINVAL, off, NULL, entry, "malformed PAX record length at byte %zu", pos);
        size_t end = pos + (size_t)rlen - 1;      /* the newline */
        if (pass != PAX_FIELDS && buf[end] != '\n')
            return lfs_fail(err, EINVAL, off, NULL, entry, "PAX record at byte %zu does not end with a newline", pos);
        char *key = (char *)buf + i + 1;
        char *eq = memchr(key, '=', (size_t)((char *)buf + end - key));
        if (!eq)
            return lfs_fail(err, EINVAL, off, NULL, entry, "PAX record at byte %zu has no '='", pos);
        size_t klen = (size_t)(eq - key);
        if (klen == 0 || memchr(key, 0, klen))
            return lfs_fail(err, EINVAL, off, NULL, entry, "PAX record at byte %zu has an invalid key", pos);
        char *v = eq + 1;
        size_t vlen = (size_t)((char *)buf + end - v);
        pos += (size_t)rlen;
        if (pass == PAX_CHECK) continue;

        pax_state *px = &t->px;
        int r = 0;
        int64_t x;
        int is_name = KEYIS("path") || KEYIS("linkpath") || KEYIS("GNU.sparse.name");
        if (pass == PAX_NAMES) {
            if (KEYIS("path"))
                r = pax_string(v, vlen, "path", &px->path, off, entry, err);
            else if (KEYIS("linkpath"))
                r = pax_string(v, vlen, "linkpath", &px->linkpath, off, entry, err);
            else if (is_name)
                r = pax_string(v, vlen, "GNU.sparse.name", &px->sparse_name, off, entry, err);
            if (r < 0) return r;
            continue;
        }
        if (is_name) {
            /* done in the PAX_NAMES pass */
        } else if (KEYIS("size")) {
            px->has_size = vlen > 0;
            if (vlen) r = pax_number(key, klen, v, vlen, &px->size, off, entry, err);
        } else if (KEYIS("uid")) {
            px->has_uid = vlen > 0;
            if (vlen) r = pax_id(key, klen, v, vlen, &px->uid, off, entry, err);
        } else if (KEYIS("gid")) {
            px->has_gid = vlen > 0;
            if (vlen) r = pax_id(key, klen, v, vlen, &px->gid, off, entry, err);
        } else if (KEYIS("mtime") || KEYIS("atime")) {
            int is_m = key[0] == 'm';
            int *has = is_m ? &px->has_mtime : &px->has_atime;
            *has = vlen > 0;
            if (vlen) {
                int q = parse_pax_time(v, vlen, is_m ? &px->mtime_sec : &px->atime_sec,
                                       is_m ? &px->mtime_nsec : &px->atime_nsec);
                if (q < 0)
                    r = lfs_fail(err, EINVAL, off, NULL, entry, "%s PAX %.*s \"%.*s\"",
                                 q == -2 ? "out of range" : "malformed", (int)klen, key,
                                 (int)(vlen > 64 ? 64 : vlen), v);
            }
        } else if (KEYPREFIX("SCHILY.xattr.")) {
            r = pax_xattr(t, key + 13, klen - 13, (unsigned char *)v, vlen, 0, off, entry, err);
        } else if (KEYPREFIX("LIBARCHIVE.xattr.")) {
            r = pax_xattr(t, key + 17, klen - 17, (unsigned char *)v, vlen, 1, off, entry, err);
        } else if (KEYPREFIX("GNU.sparse.")) {
            const char *sk = key + 11;
            size_t sl = klen - 11;
#define SKIS(lit) (sl == sizeof(lit) - 1 && memcmp(sk, lit, sizeof(lit) - 1) == 0)
            if (SKIS("size") || SKIS("realsize") || SKIS("major") || SKIS("minor") ||
                       SKIS("numblocks")) {
                int *has;
                int64_t *dst;
                if (SKIS("size")) has = &px->has_sp_size, dst = &px->sp_size;
                else if (SKIS("realsize")) has = &px->has_sp_realsize, dst = &px->sp_realsize;
                else if (SKIS("major")) has = &px->has_sp_major, dst = &px->sp_major;
                else if (SKIS("minor")) has = &px->has_sp_minor, dst = &px->sp_minor;
                else has = &px->has_numblocks, dst = &px->numblocks;
                *has = vlen > 0;
                if (vlen) r = pax_number(key, klen, v, vlen, dst, off, entry, err);
            } else if (SKIS("map")) {
                if (px->sp_kind == 2)
                    r = lfs_fail(err, EINVAL, off, NULL, entry, "GNU.sparse.map mixed with GNU.sparse.offset");
                else {
                    px->sp_kind = vlen ? 1 : 0;
                    r = pax_sparse_map(t, v, vlen, off, entry, err);
                }
            } else if (SKIS("offset") || SKIS("numbytes")) {
                int is_off = sk[0] == 'o';
                if (px->sp_kind == 1)
                    r = lfs_fail(err, EINVAL, off, NULL, entry, "GNU.sparse.offset mixed with GNU.sparse.map");
                else if (is_off == px->pair_open)
                    r = lfs_fail(err, EINVAL, off, NULL, entry,
                                 "GNU.sparse.%s out of order", is_off ? "offset" : "numbytes");
                else if ((r = pax_number(key, klen, v, vlen, &x, off, entry, err)) == 0) {
                    px->sp_kind = 2;
                    px->pair_open = is_off;
                    if (is_off) px->pair_offset = x;
                    else if (push_sparse(t, px->pair_offset, x) < 0)
                        r = lfs_fail(err, ENOMEM, off, NULL, entry, "out of memory");
                }
            }
#undef SKIS
        }
        /* other keys (ctime, uname, gname, charset, comment, vendor records) are ignored */
        if (r < 0) return r;
    }
    if (pass == PAX_FIELDS && t->px.pair_open)
        return lfs_fail(err, EINVAL, off, NULL, entry_name, "GNU.sparse.offset without GNU.sparse.numbytes");
    return 0;
}

/* ------------------------------------------------------------------ sparse */

static int check_sparse(lfs_tar *t, int64_t realsize, int64_t stored, int64_t off,
                        const char *entry, lfs_error *err)
{
    if (realsize < 0)
        return lfs_fail(err, EINVAL, off, NULL, entry, "negative sparse real size %lld", (long long)realsize);
    int64_t end = 0, sum = 0;
    for (size_t i = 0; i < t->nsparse; i++) {
        int64_t o = t->sparse[i].offset, n = t->sparse[i].length;
        if (o < 0 || n < 0)
            return lfs_fail(err, EINVAL, off, NULL, entry, "negative sparse segment %lld+%lld",
                            (long long)o, (long long)n);
        if (o < end)
            return lfs_fail(err, EINVAL, off, NULL, entry,
                            "sparse segment %zu at %lld overlaps or precedes the previous one ending at %lld",
                            i, (long long)o, (long long)end);
        if (n > realsize || o > realsize - n)
            return lfs_fail(err, EINVAL, off, NULL, entry,
                            "sparse segment %lld+%lld lies beyond the real size %lld",
                            (long long)o, (long long)n, (long long)realsize);
        end = o + n;
        sum += n;                 /* segments are disjoint within realsize: no overflow */
    }
    if (sum != stored)
        return lfs_fail(err, EINVAL, off, NULL, entry,
                        "sparse map covers %lld bytes but the entry stores %lld",
                        (long long)sum, (long long)stored);
    return 0;
}

/* GNU old sparse: descriptors in the header, then extension blocks. */
static int read_old_sparse(lfs_tar *t, const unsigned char *h, int64_t hoff, const char *entry,
                           int64_t *realsize, lfs_error *err)
{
    int r;
    int64_t o, n;
    for (int i = 0; i < 4; i++) {
        const unsigned char *d = h + H_GNU_SPARSE + 24 * i;
        if (d[0] == 0) break;
        if ((r = hdr_num(t, d, 0, 12, "sparse offset", hoff, entry, &o, err)) < 0) return r;
        if ((r = hdr_num(t, d, 12, 12, "sparse numbytes", hoff, entry, &n, err)) < 0) return r;
        if (push_sparse(t, o, n) < 0) return lfs_fail(err, ENOMEM, hoff, NULL, entry, "out of memory");
    }
    if ((r = hdr_num(t, h, H_GNU_REALSIZE, 12, "realsize", hoff, entry, realsize, err)) < 0) return r;
    int ext = h[H_GNU_ISEXT] != 0;
    unsigned char blk[LFS_BLOCK];
    while (ext) {
        int64_t boff = (int64_t)lfs_src_offset(t->src);
        ssize_t got = raw_read(t, blk, LFS_BLOCK, err);
        if (got < 0) {
            lfs_err_context(err, entry, boff);
            return (int)got;
        }
        if (got < LFS_BLOCK) return truncated(t, entry, boff, LFS_BLOCK - got, err);
        for (int i = 0; i < 21; i++) {
            const unsigned char *d = blk + 24 * i;
            if (d[0] == 0) break;
            if ((r = hdr_num(t, d, 0, 12, "sparse offset", boff, entry, &o, err)) < 0) return r;
            if ((r = hdr_num(t, d, 12, 12, "sparse numbytes", boff, entry, &n, err)) < 0) return r;
            if (push_sparse(t, o, n) < 0) return lfs_fail(err, ENOMEM, boff, NULL, entry, "out of memory");
        }
        ext = blk[504] != 0;
    }
    return 0;
}

/* GNU sparse 1.0: the map is at the start of the data, as decimal lines
 * (count, then offset/length pairs) padded to a block.  Returns the bytes
 * of data it occupied in *used. */
static int read_sparse_map_1_0(lfs_tar *t, int64_t stored, int64_t off, const char *entry,
                               int64_t *used, lfs_error *err)
{
    unsigned char blk[LFS_BLOCK];
    int64_t count = -1, done_vals = 0, pending = 0;
    uint64_t cur = 0;
    int digits = 0, done = 0;
    *used = 0;
    while (!done) {
        if (stored - *used < LFS_BLOCK)
            return lfs_fail(err, EINVAL, off, NULL, entry, "GNU sparse 1.0 map runs past the entry's data");
        ssize_t got = raw_read(t, blk, LFS_BLOCK, err);
        if (got < 0) {
            lfs_err_context(err, entry, off);
            return (int)got;
        }
        if (got < LFS_BLOCK)
            return truncated(t, entry, off, stored - *used - got + pad512(stored), err);
        *used += LFS_BLOCK;
        for (int i = 0; i < LFS_BLOCK && !done; i++) {
            unsigned char c = blk[i];
            if (c >= '0' && c <= '9') {
                unsigned d = c - '0';
                if (cur > ((uint64_t)INT64_MAX - d) / 10)
                    return lfs_fail(err, EINVAL, off, NULL, entry, "number out of range in GNU sparse 1.0 map");
                cur = cur * 10 + d;
                digits++;
            } else if (c == '\n' && digits) {
                if (count < 0) {
                    count = (int64_t)cur;
                } else if (done_vals++ % 2 == 0) {
                    pending = (int64_t)cur;
                } else if (push_sparse(t, pending, (int64_t)cur) < 0) {
                    return lfs_fail(err, ENOMEM, off, NULL, entry, "out of memory");
                }
                cur = 0;
                digits = 0;
                if (done_vals / 2 == count && done_vals % 2 == 0) done = 1;
            } else {
                return lfs_fail(err, EINVAL, off, NULL, entry, "malformed GNU sparse 1.0 map");
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ entries */

static int header_format(const unsigned char *h)
{
    if (memcmp(h + H_MAGIC, "ustar\0", 6) == 0)
        return memcmp(h + H_STAR_TRAILER, "tar\0", 4) == 0 ? FMT_STAR : FMT_USTAR;
    if (memcmp(h + H_MAGIC, "ustar ", 6) == 0 && h[H_VERSION] == ' ' && h[H_VERSION + 1] == 0)
        return FMT_GNU;
    return FMT_V7;
}

static int compose_name(lfs_tar *t, const unsigned char *h, int fmt)
{
    size_t plen = 0;
    if (fmt == FMT_USTAR || fmt == FMT_STAR)
        plen = strnlen((const char *)h + H_PREFIX, fmt == FMT_STAR ? 131 : 155);
    size_t nlen = strnlen((const char *)h + H_NAME, 100);
    if (gbuf_reserve(&t->name, plen + nlen + 2) < 0) return -ENOMEM;
    unsigned char *p = t->name.p;
    if (plen) {
        memcpy(p, h + H_PREFIX, plen);
        p[plen++] = '/';
    }
    memcpy(p + plen, h + H_NAME, nlen);
    p[plen + nlen] = 0;
    return 0;
}

static int checksum_ok(const unsigned char *h)
{
    int64_t stored;
    if (parse_num(h + H_CHKSUM, 8, &stored) < 0) return 0;
    /* the sums with the checksum field read as spaces: whole-block sums (loops
     * the compiler vectorises) corrected for that field */
    uint32_t u = 0;
    int32_t s = 0;
    for (int i = 0; i < LFS_BLOCK; i++) u += h[i];
    for (int i = 0; i < LFS_BLOCK; i++) s += (signed char)h[i];
    for (int i = H_CHKSUM; i < H_CHKSUM + 8; i++) {
        u += (uint32_t)' ' - h[i];
        s += ' ' - (signed char)h[i];
    }
    return stored == (int64_t)u || stored == (int64_t)s;
}

static int pending_meta(const lfs_tar *t)
{
    return t->px.present || t->have_lname || t->have_llink;
}

static int end_of_archive(lfs_tar *t, int64_t off, lfs_error *err)
{
    if (pending_meta(t))
        return lfs_fail(err, EINVAL, off, NULL, name_so_far(t),
                        "archive ends after an extended header without its entry");
    t->state = 1;
    return 0;
}

/* Build t->e from the header in t->hdr (at hoff) and the pending extended state. */
static int build_entry(lfs_tar *t, int fmt, int64_t first_off, int64_t hoff, int64_t hsize,
                       lfs_error *err)
{
    const unsigned char *h = t->hdr;
    lfs_entry *e = &t->e;
    pax_state *px = &t->px;
    char tf = (char)h[H_TYPE];
    int r;
    int64_t v;

    if (compose_name(t, h, fmt) < 0) return lfs_fail(err, ENOMEM, hoff, NULL, NULL, "out of memory");
    e->path = (char *)t->name.p;
    if (t->have_lname) e->path = (char *)t->lname.p;
    if (px->path) e->path = (char *)px->path;
    const char *entry = px->sparse_name ? px->sparse_name : e->path;
    if (px->present &&
        (r = parse_pax(t, t->pax.p, t->pax_len, PAX_FIELDS, px->hdr_off, entry, err)) < 0)
        return r;

    int sparse_pax = 0, sparse_1_0 = 0;
    if (px->has_sp_major || px->has_sp_minor) {
        if (px->sp_major == 1 && px->sp_minor == 0 && px->has_sp_major && px->has_sp_minor)
            sparse_pax = sparse_1_0 = 1;
        else if (px->sp_major == 0 && (px->sp_minor == 0 || px->sp_minor == 1))
            sparse_pax = 1;
        else
            return lfs_fail(err, ENOTSUP, first_off, NULL, entry,
                            "unsupported GNU sparse format version %lld.%lld",
                            (long long)px->sp_major, (long long)px->sp_minor);
    } else if (px->sp_kind) {
        sparse_pax = 1;
    }
    if (sparse_pax && px->sparse_name) e->path = (char *)px->sparse_name;
    entry = e->path;

    switch (tf) {
    case '0': case '7': case 'S':
        e->type = LFS_T_REG;
        break;
    case '\0': {
        size_t n = strlen(e->path);
        e->type = (n && e->path[n - 1] == '/') ? LFS_T_DIR : LFS_T_REG;
        break;
    }
    case '1': case '2': case '3': case '4': case '5': case '6':
        e->type = tf;
        break;
    case 'D':
        e->type = LFS_T_DIR;
        break;
    default:
        if (tf >= 0x20 && tf < 0x7f)
            return lfs_fail(err, ENOTSUP, hoff, NULL, entry, "unsupported entry type '%c'", tf);
        return lfs_fail(err, ENOTSUP, hoff, NULL, entry, "unsupported entry type '\\x%02x'",
                        (unsigned char)tf);
    }
    if (tf == 'S' && fmt != FMT_GNU)
        return lfs_fail(err, EINVAL, hoff, NULL, entry, "old GNU sparse entry in a non-GNU header");
    if (tf == 'S' && sparse_pax)
        return lfs_fail(err, EINVAL, hoff, NULL, entry, "entry has both old GNU and PAX sparse maps");
    if (sparse_pax && e->type != LFS_T_REG)
        return lfs_fail(err, EINVAL, first_off, NULL, entry, "sparse map on a non-regular entry");

    if ((r = hdr_num(t, h, H_MODE, 8, "mode", hoff, entry, &v, err)) < 0) return r;
    if (v < 0 || v > 0xffffffffLL)
        return lfs_fail(err, EINVAL, hoff, NULL, entry, "invalid mode %lld", (long long)v);
    e->mode = (uint32_t)v & 07777;

    int64_t uid, gid;
    if ((r = hdr_num(t, h, H_UID, 8, "uid", hoff, entry, &uid, err)) < 0) return r;
    if ((r = hdr_num(t, h, H_GID, 8, "gid", hoff, entry, &gid, err)) < 0) return r;
    if (px->has_uid) uid = px->uid;
    if (px->has_gid) gid = px->gid;
    if (uid < 0 || uid >= 4294967295LL)
        return lfs_fail(err, EINVAL, hoff, NULL, entry, "uid %lld out of range", (long long)uid);
    if (gid < 0 || gid >= 4294967295LL)
        return lfs_fail(err, EINVAL, hoff, NULL, entry, "gid %lld out of range", (long long)gid);
    e->uid = (uint32_t)uid;
    e->gid = (uint32_t)gid;

    int64_t stored = px->has_size ? px->size : hsize;
    if (stored > INT64_MAX - LFS_BLOCK)
        return lfs_fail(err, EINVAL, px->hdr_off, NULL, entry, "PAX size %lld out of range", (long long)stored);

    if (px->has_mtime) {
        e->mtime_sec = px->mtime_sec;
        e->mtime_nsec = px->mtime_nsec;
    } else {
        if ((r = hdr_num(t, h, H_MTIME, 12, "mtime", hoff, entry, &e->mtime_sec, err)) < 0) return r;
        e->mtime_nsec = 0;
    }
    e->has_atime = 0;
    e->atime_sec = 0;
    e->atime_nsec = 0;
    if (px->has_atime) {
        e->has_atime = 1;
        e->atime_sec = px->atime_sec;
        e->atime_nsec = px->atime_nsec;
    } else if (fmt == FMT_GNU && h[H_GNU_ATIME] != 0) {
        if ((r = hdr_num(t, h, H_GNU_ATIME, 12, "atime", hoff, entry, &e->atime_sec, err)) < 0) return r;
        e->has_atime = 1;
    }

    e->linkpath = t->empty;
    if (e->type == LFS_T_LINK || e->type == LFS_T_SYMLINK) {
        if (px->linkpath) {
            e->linkpath = (char *)px->linkpath;
        } else if (t->have_llink) {
            e->linkpath = (char *)t->llink.p;
        } else {
            if (gbuf_set_field(&t->link, h + H_LINKNAME, 100) < 0)
                return lfs_fail(err, ENOMEM, hoff, NULL, entry, "out of memory");
            e->linkpath = (char *)t->link.p;
        }
    }

    e->devmajor = e->devminor = 0;
    if (e->type == LFS_T_CHR || e->type == LFS_T_BLK) {
        int64_t ma, mi;
        if ((r = hdr_num(t, h, H_DEVMAJOR, 8, "devmajor", hoff, entry, &ma, err)) < 0) return r;
        if ((r = hdr_num(t, h, H_DEVMINOR, 8, "devminor", hoff, entry, &mi, err)) < 0) return r;
        if (ma < 0 || ma > 0xffffffffLL)
            return lfs_fail(err, EINVAL, hoff, NULL, entry, "devmajor %lld out of range", (long long)ma);
        if (mi < 0 || mi > 0xffffffffLL)
            return lfs_fail(err, EINVAL, hoff, NULL, entry, "devminor %lld out of range", (long long)mi);
        dev_t d = makedev((unsigned)ma, (unsigned)mi);
        if ((int64_t)major(d) != ma || (int64_t)minor(d) != mi)
            return lfs_fail(err, EINVAL, hoff, NULL, entry, "device %lld:%lld cannot be represented",
                            (long long)ma, (long long)mi);
        e->devmajor = (uint32_t)ma;
        e->devminor = (uint32_t)mi;
    }

    t->nxattrs = 0;
    if (t->nxr && (r = finish_xattrs(t, px->hdr_off, entry, err)) < 0) return r;
    e->xattrs = t->nxattrs ? t->xattrs : NULL;
    e->nxattrs = t->nxattrs;

    /* data layout */
    int64_t realsize = stored, used = 0;
    if (tf == 'S') {
        t->nsparse = 0;
        if ((r = read_old_sparse(t, h, hoff, entry, &realsize, err)) < 0) return r;
    } else if (sparse_pax) {
        if (px->has_sp_size) realsize = px->sp_size;
        else if (px->has_sp_realsize) realsize = px->sp_realsize;
        else
            return lfs_fail(err, EINVAL, first_off, NULL, entry, "sparse entry without GNU.sparse.size/realsize");
        if (sparse_1_0) {
            if (px->sp_kind)
                return lfs_fail(err, EINVAL, first_off, NULL, entry,
                                "GNU sparse 1.0 entry with a map in its PAX header");
            t->nsparse = 0;
            if ((r = read_sparse_map_1_0(t, stored, first_off, entry, &used, err)) < 0) return r;
        } else if (px->has_numblocks && (uint64_t)px->numblocks != t->nsparse) {
            return lfs_fail(err, EINVAL, first_off, NULL, entry,
                            "GNU.sparse.numblocks %lld does not match the %zu map entries",
                            (long long)px->numblocks, t->nsparse);
        }
    }
    int is_sparse = tf == 'S' || sparse_pax;
    if (is_sparse) {
        if ((r = check_sparse(t, realsize, stored - used, first_off, entry, err)) < 0) return r;
        e->sparse = t->sparse;
        e->nsparse = t->nsparse;
    } else {
        e->sparse = NULL;
        e->nsparse = 0;
    }

    if (e->type == LFS_T_REG) {
        e->size = stored - used;
        e->realsize = is_sparse ? realsize : e->size;
        t->data_left = e->size;
        t->skip_after = pad512(stored);
    } else {
        e->size = 0;
        e->realsize = 0;
        t->data_left = 0;
        t->skip_after = tf == 'D' ? stored + pad512(stored) : 0;
    }
    e->header_offset = first_off;
    return 0;
}

/* Skip what is left of the current entry. */
static int finish_entry(lfs_tar *t, lfs_error *err)
{
    if (t->data_left == 0 && t->skip_after == 0) return 0;
    int64_t n = t->data_left;
    t->data_left = 0;
    int r = skip_bytes(t, n, t->skip_after, t->e.path, t->e.header_offset, err);
    if (r < 0) return r;
    n = t->skip_after;
    t->skip_after = 0;
    return skip_bytes(t, n, 0, t->e.path, t->e.header_offset, err);
}

static int next_entry(lfs_tar *t, lfs_error *err)
{
    int r = finish_entry(t, err);
    if (r < 0) return r;
    pax_reset(t);
    t->have_lname = t->have_llink = 0;
    if (t->name.p) t->name.p[0] = 0;
    int64_t first_off = -1;

    for (;;) {
        int64_t off = (int64_t)lfs_src_offset(t->src);
        ssize_t got = raw_read(t, t->hdr, LFS_BLOCK, err);
        if (got < 0) {
            lfs_err_context(err, name_so_far(t), off);
            return (int)got;
        }
        if (got == 0) return end_of_archive(t, off, err);
        if (got < LFS_BLOCK)
            return truncated(t, name_so_far(t), off, LFS_BLOCK - got, err);
        if (memcmp(t->hdr, zero_block, LFS_BLOCK) == 0) {
            int64_t off2 = off + LFS_BLOCK;
            got = raw_read(t, t->hdr, LFS_BLOCK, err);
            if (got < 0) {
                lfs_err_context(err, NULL, off2);
                return (int)got;
            }
            if (memcmp(t->hdr, zero_block, (size_t)got) != 0) {
                if (got < LFS_BLOCK)
                    return truncated(t, name_so_far(t), off2, LFS_BLOCK - got, err);
                return lfs_fail(err, EINVAL, off, NULL, name_so_far(t),
                                "a zero block is followed by a non-zero block");
            }
            return end_of_archive(t, off, err);
        }
        if (!checksum_ok(t->hdr)) {
            if (compose_name(t, t->hdr, header_format(t->hdr)) < 0 && t->name.p) t->name.p[0] = 0;
            return lfs_fail(err, EINVAL, off, NULL, name_so_far(t), "bad header checksum");
        }
        int fmt = header_format(t->hdr);
        char tf = (char)t->hdr[H_TYPE];
        if (tf != 'g' && tf != 'V' && first_off < 0) first_off = off;
        if (compose_name(t, t->hdr, fmt) < 0) return lfs_fail(err, ENOMEM, off, NULL, NULL, "out of memory");
        int64_t size;
        if ((r = hdr_num(t, t->hdr, H_SIZE, 12, "size", off, name_so_far(t), &size, err)) < 0) return r;
        if (size < 0)
            return lfs_fail(err, EINVAL, off, NULL, name_so_far(t), "negative size %lld", (long long)size);
        if (size > INT64_MAX - LFS_BLOCK)
            return lfs_fail(err, EINVAL, off, NULL, name_so_far(t), "size %lld out of range", (long long)size);

        switch (tf) {
        case 'x':
            pax_reset(t);
            if ((r = read_payload(t, &t->pax, size, "PAX header", name_so_far(t), off, err)) < 0) return r;
            t->px.present = 1;
            t->px.hdr_off = off;
            t->pax_len = (size_t)size;
            if ((r = parse_pax(t, t->pax.p, (size_t)size, PAX_NAMES, off, NULL, err)) < 0) return r;
            continue;
        case 'g':
            if ((r = read_payload(t, &t->glob, size, "PAX global header", name_so_far(t), off, err)) < 0) return r;
            if ((r = parse_pax(t, t->glob.p, (size_t)size, PAX_CHECK, off, NULL, err)) < 0) return r;
            continue;
        case 'L':
        case 'K': {
            gbuf *b = tf == 'L' ? &t->lname : &t->llink;
            /* a repeated 'L'/'K' replaces the earlier one (and its buffer may move) */
            if (tf == 'L') t->have_lname = 0;
            else t->have_llink = 0;
            if ((r = read_payload(t, b, size, tf == 'L' ? "GNU long name" : "GNU long link",
                                  name_so_far(t), off, err)) < 0)
                return r;
            if (tf == 'L') t->have_lname = 1;
            else t->have_llink = 1;
            continue;
        }
        case 'V':
            if ((r = skip_bytes(t, size, pad512(size), name_so_far(t), off, err)) < 0) return r;
            if ((r = skip_bytes(t, pad512(size), 0, name_so_far(t), off, err)) < 0) return r;
            pax_reset(t);
            t->have_lname = t->have_llink = 0;
            first_off = -1;
            continue;
        default:
            break;
        }
        if (t->nentries >= t->max_entries)
            return lfs_fail(err, E2BIG, off, NULL, name_so_far(t),
                            "archive has more than %llu entries", (unsigned long long)t->max_entries);
        if ((r = build_entry(t, fmt, first_off, off, size, err)) < 0) return r;
        t->nentries++;
        return 1;
    }
}

/* ------------------------------------------------------------------ public */

int lfs_tar_open(lfs_tar **out, lfs_src *src, const lfs_tar_limits *limits, lfs_error *err)
{
    *out = NULL;
    lfs_tar *t = calloc(1, sizeof *t);
    if (!t) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
    t->src = src;
    t->max_entries = limits && limits->max_entries ? limits->max_entries : DEFAULT_MAX_ENTRIES;
    t->max_pax = limits && limits->max_pax_size ? limits->max_pax_size : DEFAULT_MAX_PAX;
    t->max_xattrs = limits && limits->max_xattrs_size ? limits->max_xattrs_size : DEFAULT_MAX_XATTRS;
    if (t->max_pax > (uint64_t)SIZE_MAX / 2) t->max_pax = (uint64_t)SIZE_MAX / 2;
    t->e.path = t->empty;
    t->e.linkpath = t->empty;
    *out = t;
    return 0;
}

int lfs_tar_next(lfs_tar *t, const lfs_entry **e, lfs_error *err)
{
    *e = NULL;
    if (t->state < 0)
        return lfs_fail(err, -t->state, -1, NULL, NULL, "tar reader used after an error");
    if (t->state == 1) return 0;
    int r = next_entry(t, err);
    if (r < 0) return fail_state(t, r);
    if (r == 0) return 0;
    *e = &t->e;
    return 1;
}

ssize_t lfs_tar_data(lfs_tar *t, const unsigned char **p, size_t max, lfs_error *err)
{
    if (t->state < 0)
        return lfs_fail(err, -t->state, -1, NULL, NULL, "tar reader used after an error");
    if (t->data_left == 0 || max == 0) return 0;
    size_t want = max;
    if ((uint64_t)want > (uint64_t)t->data_left) want = (size_t)t->data_left;
    ssize_t n = lfs_src_chunk(t->src, p, want, err);
    if (n < 0) {
        lfs_err_context(err, t->e.path, t->e.header_offset);
        return fail_state(t, (int)n);
    }
    if (n == 0)
        return fail_state(t, truncated(t, t->e.path, t->e.header_offset,
                                       t->data_left + t->skip_after, err));
    t->data_left -= n;
    if (t->hook) t->hook(t->hook_arg, LFS_TAR_DATA, *p, (size_t)n);
    return n;
}

void lfs_tar_set_hook(lfs_tar *t, lfs_tar_hook fn, void *arg)
{
    t->hook = fn;
    t->hook_arg = arg;
}

int lfs_tar_drain(lfs_tar *t, lfs_error *err)
{
    if (t->state < 0)
        return lfs_fail(err, -t->state, -1, NULL, NULL, "tar reader used after an error");
    if (t->state != 1)
        return lfs_fail(err, EINVAL, -1, NULL, NULL, "tar reader drained before the end of the archive");
    for (;;) {
        const unsigned char *p;
        ssize_t r = raw_chunk(t, &p, (size_t)1 << 20, err);
        if (r < 0) return fail_state(t, (int)r);
        if (r == 0) return 0;
    }
}

void lfs_tar_free(lfs_tar *t)
{
    if (!t) return;
    free(t->name.p);
    free(t->link.p);
    free(t->lname.p);
    free(t->llink.p);
    free(t->pax.p);
    free(t->glob.p);
    free(t->xr);
    free(t->xattrs);
    free(t->sparse);
    free(t);
}
