/* Error records, sha256, growable strings and the hardlink map. */
#include "internal.h"
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <openssl/evp.h>

static void copy_str(char *dst, size_t cap, const char *src)
{
    if (!src) { dst[0] = 0; return; }
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

int lfs_fail(lfs_error *err, int code, int64_t offset, const char *path,
             const char *entry, const char *fmt, ...)
{
    if (code <= 0) code = EIO;
    if (err) {
        err->code = code;
        err->offset = offset;
        copy_str(err->path, sizeof err->path, path);
        copy_str(err->entry, sizeof err->entry, entry);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return -code;
}

void lfs_err_context(lfs_error *err, const char *entry, int64_t offset)
{
    if (!err) return;
    if (entry && !err->entry[0]) copy_str(err->entry, sizeof err->entry, entry);
    if (offset >= 0 && err->offset < 0) err->offset = offset;
}

int lfs_sha256_init(lfs_sha256 *h)
{
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    if (!c) return -ENOMEM;
    if (EVP_DigestInit_ex(c, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(c);
        return -EIO;
    }
    h->ctx = c;
    return 0;
}

void lfs_sha256_update(lfs_sha256 *h, const void *p, size_t n)
{
    if (n) EVP_DigestUpdate((EVP_MD_CTX *)h->ctx, p, n);
}

void lfs_sha256_final(lfs_sha256 *h, unsigned char out[32])
{
    unsigned int len = 32;
    EVP_DigestFinal_ex((EVP_MD_CTX *)h->ctx, out, &len);
}

void lfs_sha256_free(lfs_sha256 *h)
{
    if (h->ctx) EVP_MD_CTX_free((EVP_MD_CTX *)h->ctx);
    h->ctx = NULL;
}

/* ------------------------------------------------------------ growable strings */

int lfs_sb_reserve(lfs_strbuf *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -ENOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

int lfs_sb_append(lfs_strbuf *b, const void *s, size_t n)
{
    if (lfs_sb_reserve(b, n) < 0) return -ENOMEM;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

int lfs_sb_set(lfs_strbuf *b, const char *s, size_t n)
{
    b->len = 0;
    return lfs_sb_append(b, s, n);
}

void lfs_sb_truncate(lfs_strbuf *b, size_t len)
{
    b->len = len;
    if (b->p) b->p[len] = 0;
}

void lfs_sb_free(lfs_strbuf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ------------------------------------------------------------ hardlink map */

struct lfs_hl_slot {
    dev_t dev;
    ino_t ino;
    char *path;                   /* NULL: empty slot */
};

static size_t hl_hash(dev_t dev, ino_t ino)
{
    uint64_t h = (uint64_t)ino * 0x9E3779B97F4A7C15ull ^ (uint64_t)dev * 0xC2B2AE3D27D4EB4Full;
    return (size_t)(h ^ (h >> 29));
}

const char *lfs_hl_find(const lfs_hl_map *m, dev_t dev, ino_t ino)
{
    if (!m->cap) return NULL;
    for (size_t i = hl_hash(dev, ino) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (!m->slots[i].path) return NULL;
        if (m->slots[i].dev == dev && m->slots[i].ino == ino) return m->slots[i].path;
    }
}

int lfs_hl_add(lfs_hl_map *m, dev_t dev, ino_t ino, const char *path)
{
    if ((m->n + 1) * 2 > m->cap) {
        size_t ncap = m->cap ? m->cap * 2 : 64;
        struct lfs_hl_slot *ns = calloc(ncap, sizeof *ns);
        if (!ns) return -ENOMEM;
        for (size_t i = 0; i < m->cap; i++) {
            if (!m->slots[i].path) continue;
            size_t j = hl_hash(m->slots[i].dev, m->slots[i].ino) & (ncap - 1);
            while (ns[j].path) j = (j + 1) & (ncap - 1);
            ns[j] = m->slots[i];
        }
        free(m->slots);
        m->slots = ns;
        m->cap = ncap;
    }
    char *copy = strdup(path);
    if (!copy) return -ENOMEM;
    size_t i = hl_hash(dev, ino) & (m->cap - 1);
    while (m->slots[i].path) i = (i + 1) & (m->cap - 1);
    m->slots[i].dev = dev;
    m->slots[i].ino = ino;
    m->slots[i].path = copy;
    m->n++;
    return 0;
}

void lfs_hl_free(lfs_hl_map *m)
{
    for (size_t i = 0; i < m->cap; i++) free(m->slots[i].path);
    free(m->slots);
    m->slots = NULL;
    m->cap = m->n = 0;
}

int lfs_run_workers(void *(*fn)(void *), void *arg, unsigned threads)
{
    if (threads > LFS_MAX_WORKERS) threads = LFS_MAX_WORKERS;
    pthread_t t[LFS_MAX_WORKERS];
    unsigned started = 0;
    for (unsigned k = 1; k < threads; k++) {
        if (pthread_create(&t[k], NULL, fn, arg) != 0) break;
        started = k;
    }
    int fail = fn(arg) != NULL;
    for (unsigned k = 1; k <= started; k++) {
        void *r = NULL;
        pthread_join(t[k], &r);
        if (r) fail = 1;
    }
    return fail ? -1 : 0;
}

/* ---- keyed name hash (SipHash-1-3) ---- */

void lfs_hash_key_init(lfs_hash_key *k)
{
    uint64_t b[2];
    if (getrandom(b, sizeof b, GRND_NONBLOCK) != (ssize_t)sizeof b) {
        /* no entropy pool yet (early boot): still unknown to an archive's author */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        b[0] = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ULL ^ (uint64_t)(uintptr_t)k;
        b[1] = (uint64_t)ts.tv_sec * 0xc2b2ae3d27d4eb4fULL ^ (uint64_t)getpid();
    }
    k->k0 = b[0];
    k->k1 = b[1];
}

#define ROTL64(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND do { \
        v0 += v1; v1 = ROTL64(v1, 13); v1 ^= v0; v0 = ROTL64(v0, 32); \
        v2 += v3; v3 = ROTL64(v3, 16); v3 ^= v2; \
        v0 += v3; v3 = ROTL64(v3, 21); v3 ^= v0; \
        v2 += v1; v1 = ROTL64(v1, 17); v1 ^= v2; v2 = ROTL64(v2, 32); \
    } while (0)

uint64_t lfs_hash_name(const lfs_hash_key *k, const char *s, size_t n)
{
    uint64_t v0 = k->k0 ^ 0x736f6d6570736575ULL, v1 = k->k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k->k0 ^ 0x6c7967656e657261ULL, v3 = k->k1 ^ 0x7465646279746573ULL;
    const unsigned char *p = (const unsigned char *)s;
    size_t left = n;
    for (; left >= 8; p += 8, left -= 8) {
        uint64_t m;
        memcpy(&m, p, 8);           /* little-endian hosts: the reference byte order */
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)n << 56;
    for (size_t i = 0; i < left; i++) b |= (uint64_t)p[i] << (8 * i);
    v3 ^= b;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}
