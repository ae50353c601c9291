/*
 * lfs_scan: list a layer without extracting it.
 *
 * One binary record per entry (layout in layerfs.h) goes to out_fd, batched
 * into large writes.  With LFS_SCAN_HASH each regular file's content is
 * hashed; a sparse file is hashed as the expanded file (holes read as zeros),
 * so the same file gives the same digest whether or not it was stored sparse.
 */
#include "internal.h"
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define OUT_BATCH (256u << 10)
#define REC_FIXED 104u           /* record bytes before the path, reclen included */

static const unsigned char zeros[64 << 10];

typedef struct outbuf {
    int fd;
    unsigned char *p;
    size_t len, cap;
} outbuf;

static int write_all(int fd, const unsigned char *p, size_t n, lfs_error *err)
{
    int r = lfs_write_full(fd, p, n);
    if (r == -EPIPE)
        return lfs_fail(err, EPIPE, -1, NULL, NULL, "the reader of the scan records went away");
    if (r < 0) return lfs_fail(err, -r, -1, NULL, NULL, "writing scan records failed");
    return 0;
}

static int out_flush(outbuf *o, lfs_error *err)
{
    int r = write_all(o->fd, o->p, o->len, err);
    o->len = 0;
    return r;
}

/* Room for n more bytes; flushes first when the batch would overflow. */
static int out_reserve(outbuf *o, size_t n, lfs_error *err)
{
    if (o->len + n <= o->cap) return 0;
    if (o->len) {
        int r = out_flush(o, err);
        if (r < 0) return r;
    }
    if (n <= o->cap) return 0;
    unsigned char *p = realloc(o->p, n);
    if (!p) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
    o->p = p;
    o->cap = n;
    return 0;
}

static unsigned char *put_u16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    return p + 2;
}

static unsigned char *put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
    return p + 4;
}

static unsigned char *put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
    return p + 8;
}

static unsigned char *put_bytes(unsigned char *p, const void *s, size_t n)
{
    if (n) memcpy(p, s, n);
    return p + n;
}

static void hash_zeros(lfs_sha256 *h, int64_t n)
{
    while (n > 0) {
        size_t k = n > (int64_t)sizeof zeros ? sizeof zeros : (size_t)n;
        lfs_sha256_update(h, zeros, k);
        n -= (int64_t)k;
    }
}

/* Hash `n` bytes of entry data. */
static int hash_data(lfs_tar *t, lfs_sha256 *h, int64_t n, lfs_error *err)
{
    while (n > 0) {
        const unsigned char *p;
        ssize_t got = lfs_tar_data(t, &p, (size_t)n, err);
        if (got < 0) return (int)got;
        if (got == 0) return lfs_fail(err, EIO, -1, NULL, NULL, "entry data ended early");
        lfs_sha256_update(h, p, (size_t)got);
        n -= got;
    }
    return 0;
}

/* Holes are hashed as zeros, which costs time in proportion to the size a
 * sparse entry claims, not to the bytes it stores: a hostile layer could claim
 * exabytes.  One scan hashes at most this many hole bytes in all. */
#define HOLE_HASH_BUDGET ((int64_t)64 << 30)

static int hash_entry(lfs_tar *t, const lfs_entry *e, unsigned char out[32],
                      int64_t *hole_budget, lfs_error *err)
{
    if (e->sparse) {
        int64_t stored = 0;
        for (size_t i = 0; i < e->nsparse; i++) stored += e->sparse[i].length;
        int64_t holes = e->realsize - stored;
        if (holes > *hole_budget)
            return lfs_fail(err, E2BIG, e->header_offset, NULL, e->path,
                            "sparse file of %lld bytes: hashing its holes would pass the "
                            "scan's limit of %lld hole bytes",
                            (long long)e->realsize, (long long)HOLE_HASH_BUDGET);
        *hole_budget -= holes;
    }
    lfs_sha256 h = {0};
    if (lfs_sha256_init(&h) < 0) return lfs_fail(err, ENOMEM, -1, NULL, e->path, "sha256 init failed");
    int r = 0;
    if (e->sparse) {
        int64_t pos = 0;
        for (size_t i = 0; i < e->nsparse && r == 0; i++) {
            hash_zeros(&h, e->sparse[i].offset - pos);
            r = hash_data(t, &h, e->sparse[i].length, err);
            pos = e->sparse[i].offset + e->sparse[i].length;
        }
        if (r == 0) hash_zeros(&h, e->realsize - pos);
    } else {
        r = hash_data(t, &h, e->size, err);
    }
    if (r == 0) lfs_sha256_final(&h, out);
    lfs_sha256_free(&h);
    return r;
}

static int emit(outbuf *o, const lfs_entry *e, const unsigned char *digest, int with_offset,
                int64_t data_offset, lfs_error *err)
{
    size_t plen = strlen(e->path), llen = strlen(e->linkpath);
    size_t total = REC_FIXED + plen + llen + e->nsparse * 16 + (with_offset ? 8 : 0);
    for (size_t i = 0; i < e->nxattrs; i++) total += 8 + strlen(e->xattrs[i].name) + e->xattrs[i].len;
    if (total - 4 > UINT32_MAX)
        return lfs_fail(err, E2BIG, e->header_offset, NULL, e->path, "scan record too large");
    int r = out_reserve(o, total, err);
    if (r < 0) return r;
    unsigned char *p = o->p + o->len, *start = p;
    p = put_u32(p, (uint32_t)(total - 4));
    *p++ = (unsigned char)e->type;
    *p++ = digest ? 1 : 0;
    p = put_u16(p, 0);
    p = put_u32(p, e->mode);
    p = put_u32(p, e->uid);
    p = put_u32(p, e->gid);
    p = put_u64(p, (uint64_t)e->realsize);
    p = put_u64(p, (uint64_t)e->mtime_sec);
    p = put_u32(p, (uint32_t)e->mtime_nsec);
    p = put_u32(p, e->devmajor);
    p = put_u32(p, e->devminor);
    p = put_u64(p, (uint64_t)e->header_offset);
    if (digest) p = put_bytes(p, digest, 32);
    else {
        memset(p, 0, 32);
        p += 32;
    }
    p = put_u32(p, (uint32_t)plen);
    p = put_u32(p, (uint32_t)llen);
    p = put_u32(p, (uint32_t)e->nxattrs);
    p = put_u32(p, (uint32_t)e->nsparse);
    p = put_bytes(p, e->path, plen);
    p = put_bytes(p, e->linkpath, llen);
    for (size_t i = 0; i < e->nxattrs; i++) {
        size_t nl = strlen(e->xattrs[i].name);
        p = put_u32(p, (uint32_t)nl);
        p = put_u32(p, (uint32_t)e->xattrs[i].len);
        p = put_bytes(p, e->xattrs[i].name, nl);
        p = put_bytes(p, e->xattrs[i].value, e->xattrs[i].len);
    }
    for (size_t i = 0; i < e->nsparse; i++) {
        p = put_u64(p, (uint64_t)e->sparse[i].offset);
        p = put_u64(p, (uint64_t)e->sparse[i].length);
    }
    if (with_offset) p = put_u64(p, (uint64_t)data_offset);
    o->len += (size_t)(p - start);
    return 0;
}

int lfs_scan(int in_fd, int out_fd, int compression, int flags,
             lfs_digests *out, lfs_error *err)
{
    lfs_src *src = NULL;
    lfs_tar *t = NULL;
    outbuf o = {.fd = out_fd};
    int64_t hole_budget = HOLE_HASH_BUDGET;
    int r = (flags & LFS_SCAN_NO_STREAM_HASH)
        ? lfs_src_open_ex(&src, in_fd, compression, 0, LFS_SRC_NO_HASH | LFS_SRC_SEEK, err)
        : lfs_src_open(&src, in_fd, compression, 0, err);
    if (r < 0) return r;
    r = lfs_tar_open(&t, src, NULL, err);
    if (r < 0) goto done;
    o.p = malloc(OUT_BATCH);
    if (!o.p) {
        r = lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
        goto done;
    }
    o.cap = OUT_BATCH;
    for (;;) {
        const lfs_entry *e;
        r = lfs_tar_next(t, &e, err);
        if (r <= 0) break;
        unsigned char digest[32];
        int hashed = 0;
        int64_t data_offset = -1;
        if (e->type == LFS_T_REG && !e->sparse) data_offset = (int64_t)lfs_src_offset(src);
        if (e->type == LFS_T_REG &&
            ((flags & LFS_SCAN_HASH) || (e->sparse && (flags & LFS_SCAN_HASH_SPARSE)))) {
            r = hash_entry(t, e, digest, &hole_budget, err);
            if (r < 0) break;
            hashed = 1;
        }
        r = emit(&o, e, hashed ? digest : NULL, (flags & LFS_SCAN_DATA_OFFSET) != 0, data_offset,
                 err);
        if (r < 0) break;
    }
    if (r < 0) goto done;
    r = out_flush(&o, err);
    if (r < 0) goto done;
    r = lfs_src_finish(src, out, err);
done:
    free(o.p);
    lfs_tar_free(t);
    lfs_src_free(src);
    return r < 0 ? r : 0;
}

/* ---- byte ranges of layer files (lfs_ranges_compare) ---- */

#define RANGE_CHUNK (256u << 10)
#define RANGE_BATCH 8

typedef struct range_job {
    int fd_a, fd_b;
    const int64_t *jobs;
    size_t n;
    unsigned char *result;
    unsigned char *digests;
    size_t next;                  /* under mu */
    pthread_mutex_t mu;
} range_job;

/* Read exactly n bytes at off; 0, or -1 (error or end of file). */
static int pread_full(int fd, unsigned char *p, size_t n, int64_t off)
{
    while (n > 0) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) return -1;
        p += r;
        n -= (size_t)r;
        off += r;
    }
    return 0;
}

static int hash_range(int fd, int64_t off, int64_t len, unsigned char *buf, unsigned char out[32])
{
    lfs_sha256 h = {0};
    if (lfs_sha256_init(&h) < 0) return -1;
    int r = 0;
    while (len > 0 && r == 0) {
        size_t k = len > (int64_t)RANGE_CHUNK ? RANGE_CHUNK : (size_t)len;
        r = pread_full(fd, buf, k, off);
        if (r == 0) lfs_sha256_update(&h, buf, k);
        off += (int64_t)k;
        len -= (int64_t)k;
    }
    if (r == 0) lfs_sha256_final(&h, out);
    lfs_sha256_free(&h);
    return r;
}

/* 1 same bytes, 0 not (or unreadable). */
static int same_range(int fa, int64_t oa, int fb, int64_t ob, int64_t len, unsigned char *ba,
                      unsigned char *bb)
{
    while (len > 0) {
        size_t k = len > (int64_t)RANGE_CHUNK ? RANGE_CHUNK : (size_t)len;
        if (pread_full(fa, ba, k, oa) < 0 || pread_full(fb, bb, k, ob) < 0) return 0;
        if (memcmp(ba, bb, k) != 0) return 0;
        oa += (int64_t)k;
        ob += (int64_t)k;
        len -= (int64_t)k;
    }
    return 1;
}

static void range_one(range_job *j, size_t i, unsigned char *ba, unsigned char *bb)
{
    const int64_t *q = j->jobs + 4 * i;
    int64_t oa = q[0], la = q[1], ob = q[2], lb = q[3];
    unsigned char res = 0;
    int have_a = oa >= 0 && la >= 0 && j->fd_a >= 0, have_b = ob >= 0 && lb >= 0 && j->fd_b >= 0;
    if (have_a && have_b && la == lb && same_range(j->fd_a, oa, j->fd_b, ob, la, ba, bb)) {
        res = LFS_RANGE_SAME;
    } else {
        if (have_a && hash_range(j->fd_a, oa, la, ba, j->digests + 64 * i) == 0)
            res |= LFS_RANGE_DIGEST_A;
        if (have_b && hash_range(j->fd_b, ob, lb, ba, j->digests + 64 * i + 32) == 0)
            res |= LFS_RANGE_DIGEST_B;
    }
    j->result[i] = res;
}

static void *range_worker(void *arg)
{
    range_job *j = arg;
    unsigned char *ba = malloc(RANGE_CHUNK), *bb = malloc(RANGE_CHUNK);
    if (!ba || !bb) {
        free(ba);
        free(bb);
        return (void *)1;
    }
    for (;;) {
        pthread_mutex_lock(&j->mu);
        size_t i = j->next, end = i + RANGE_BATCH < j->n ? i + RANGE_BATCH : j->n;
        j->next = end;
        pthread_mutex_unlock(&j->mu);
        if (i >= end) break;
        for (; i < end; i++) range_one(j, i, ba, bb);
    }
    free(ba);
    free(bb);
    return NULL;
}

int lfs_ranges_compare(int fd_a, int fd_b, const int64_t *jobs, size_t n, unsigned threads,
                       unsigned char *result, unsigned char *digests, lfs_error *err)
{
    range_job j = {.fd_a = fd_a, .fd_b = fd_b, .jobs = jobs, .n = n, .result = result,
                   .digests = digests};
    if (n == 0) return 0;
    if (pthread_mutex_init(&j.mu, NULL) != 0)
        return lfs_fail(err, ENOMEM, -1, NULL, NULL, "mutex init failed");
    if (threads == 0) threads = 2;
    if ((size_t)threads > (n + RANGE_BATCH - 1) / RANGE_BATCH)
        threads = (unsigned)((n + RANGE_BATCH - 1) / RANGE_BATCH);
    int fail = lfs_run_workers(range_worker, &j, threads) < 0;
    pthread_mutex_destroy(&j.mu);
    if (fail) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory comparing ranges");
    return 0;
}

/* ---- same-named files of two uncompressed layers, compared (lfs_layers_prematch) ---- */

typedef struct pm_file {
    const char *name;             /* normalised: no leading "./" or "/", no trailing "/" */
    size_t len;
    uint64_t hash;
    int64_t off, size;
} pm_file;

typedef struct pm_side {
    int fd;
    const lfs_hash_key *key;      /* the same for both sides */
    pm_file *f;
    size_t n, cap;
    lfs_strbuf names;             /* the names, NUL-separated (offsets until the end) */
    int rc;
    lfs_error err;
} pm_side;

/* The name the diff engine gives p, when that takes no more than stripping
 * ("./", "/", trailing "/"); 0 when it takes more (such entries are left to
 * the caller's own comparison). */
static int pm_name(const char *p, const char **s, size_t *n)
{
    if (p[0] == '.' && p[1] == '/') p += 2;
    while (*p == '/') p++;
    size_t len = strlen(p);
    while (len && p[len - 1] == '/') len--;
    if (!len) return 0;
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '/' && i + 1 < len && p[i + 1] == '/') return 0;
        if (p[i] == '.' && (i == 0 || p[i - 1] == '/')) {
            size_t k = i + 1;
            if (k < len && p[k] == '.') k++;
            if (k == len || p[k] == '/') return 0;      /* "." or ".." component */
        }
    }
    *s = p;
    *n = len;
    return 1;
}

/* Headers only (data seeked over): every non-sparse regular file with its name,
 * data offset and size; a later entry of the same name is simply listed too. */
static void *pm_scan(void *arg)
{
    pm_side *sd = arg;
    lfs_src *src = NULL;
    lfs_tar *t = NULL;
    int r = lfs_src_open_ex(&src, sd->fd, LFS_COMP_NONE, 1, LFS_SRC_NO_HASH | LFS_SRC_SEEK,
                            &sd->err);
    if (r == 0) r = lfs_tar_open(&t, src, NULL, &sd->err);
    while (r == 0) {
        const lfs_entry *e;
        r = lfs_tar_next(t, &e, &sd->err);
        if (r <= 0) break;
        r = 0;
        const char *s;
        size_t n;
        if (e->type != LFS_T_REG || e->sparse || e->size <= 0 || !pm_name(e->path, &s, &n))
            continue;
        if (sd->n == sd->cap) {
            size_t nc = sd->cap ? 2 * sd->cap : 1024;
            pm_file *nf = realloc(sd->f, nc * sizeof *nf);
            if (!nf) { r = lfs_fail(&sd->err, ENOMEM, -1, NULL, NULL, "out of memory"); break; }
            sd->f = nf;
            sd->cap = nc;
        }
        pm_file *f = &sd->f[sd->n];
        f->name = (const char *)(uintptr_t)sd->names.len;     /* an offset for now */
        f->len = n;
        f->hash = lfs_hash_name(sd->key, s, n);
        f->off = (int64_t)lfs_src_offset(src);
        f->size = e->size;
        if (lfs_sb_append(&sd->names, s, n) < 0 || lfs_sb_append(&sd->names, "", 1) < 0) {
            r = lfs_fail(&sd->err, ENOMEM, -1, NULL, NULL, "out of memory");
            break;
        }
        sd->n++;
    }
    lfs_tar_free(t);
    lfs_src_free(src);
    sd->rc = r < 0 ? r : 0;
    if (sd->rc == 0)
        for (size_t i = 0; i < sd->n; i++)
            sd->f[i].name = sd->names.p + (uintptr_t)sd->f[i].name;
    return NULL;
}

int lfs_layers_prematch(int fd_a, int fd_b, unsigned threads, lfs_pairs *out, lfs_error *err)
{
    memset(out, 0, sizeof *out);
    lfs_hash_key key;
    lfs_hash_key_init(&key);
    pm_side sa = {.fd = fd_a, .key = &key}, sb = {.fd = fd_b, .key = &key};
    sa.err.offset = sb.err.offset = -1;
    pthread_t th;
    int threaded = pthread_create(&th, NULL, pm_scan, &sa) == 0;
    if (!threaded) pm_scan(&sa);
    pm_scan(&sb);
    if (threaded) pthread_join(th, NULL);
    int rc = 0;
    size_t cap = 1, *slot = NULL;
    if (sa.rc < 0 || sb.rc < 0) {
        *err = sa.rc < 0 ? sa.err : sb.err;
        rc = sa.rc < 0 ? sa.rc : sb.rc;
        goto done;
    }
    /* a's files by name (the last of a name wins, as when the layer is applied) */
    while (cap < 2 * sa.n + 2) cap *= 2;
    slot = malloc(cap * sizeof *slot);
    out->jobs = malloc((sb.n ? sb.n : 1) * 4 * sizeof *out->jobs);
    if (!slot || !out->jobs) { rc = lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory"); goto done; }
    for (size_t i = 0; i < cap; i++) slot[i] = SIZE_MAX;
    for (size_t i = 0; i < sa.n; i++) {
        size_t k = (size_t)sa.f[i].hash & (cap - 1);
        while (slot[k] != SIZE_MAX) {
            pm_file *o = &sa.f[slot[k]];
            if (o->hash == sa.f[i].hash && o->len == sa.f[i].len &&
                memcmp(o->name, sa.f[i].name, o->len) == 0)
                break;
            k = (k + 1) & (cap - 1);
        }
        slot[k] = i;
    }
    for (size_t j = 0; j < sb.n; j++) {
        pm_file *b = &sb.f[j];
        size_t k = (size_t)b->hash & (cap - 1);
        for (; slot[k] != SIZE_MAX; k = (k + 1) & (cap - 1)) {
            pm_file *a = &sa.f[slot[k]];
            if (a->hash != b->hash || a->len != b->len || memcmp(a->name, b->name, a->len) != 0)
                continue;
            if (a->size == b->size) {
                int64_t *q = out->jobs + 4 * out->n++;
                q[0] = a->off, q[1] = a->size, q[2] = b->off, q[3] = b->size;
            }
            break;
        }
    }
    out->result = malloc(out->n ? out->n : 1);
    out->digests = malloc(64 * (out->n ? out->n : 1));
    if (!out->result || !out->digests) {
        rc = lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
        goto done;
    }
    rc = lfs_ranges_compare(fd_a, fd_b, out->jobs, out->n, threads, out->result, out->digests, err);
done:
    free(slot);
    free(sa.f);
    free(sb.f);
    lfs_sb_free(&sa.names);
    lfs_sb_free(&sb.names);
    if (rc < 0) lfs_pairs_free(out);
    return rc;
}

void lfs_pairs_free(lfs_pairs *p)
{
    free(p->jobs);
    free(p->result);
    free(p->digests);
    memset(p, 0, sizeof *p);
}
