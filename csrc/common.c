/* Error records and sha256. */
#include "internal.h"
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
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
