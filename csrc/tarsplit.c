/*
 * tar-split records: keep what a layer's tar stream holds besides the files
 * lfs_apply wrote, so that the stream can be rebuilt bit for bit (same DiffID)
 * from the unpacked tree once the blob is gone.
 *
 * Recording (lfs_rec, driven by extract.c).  The tar parser reports every byte
 * it consumes (lfs_tar_set_hook).  Entry data that the extractor declared as
 * going to a new regular file (lfs_rec_file) becomes a file operation naming
 * the file's path and size, with a CRC-32 of the content so a changed file is
 * caught by name; every other byte -- headers, PAX and GNU extension blocks,
 * sparse maps, padding, data that was skipped or went nowhere, end blocks,
 * whatever follows them -- is kept as it was.  Operations go into a staging
 * buffer that is zstd-compressed in the same pass and written in big chunks.
 *
 * A file the record names must still hold the content at the end of the layer.
 * The layer itself may break that: a path written twice, a file replaced by a
 * directory or symlink, a directory removed after files were written into it.
 * The extractor calls lfs_rec_removing before anything is removed or replaced;
 * if that removes (a name of) an inode the record reads later, or a directory
 * that contains one, the content is read at once and kept in the record as a
 * "captured" blob for that operation.  Captured content is spooled in an
 * anonymous file (O_TMPFILE beside the tree, or memfd) and appended after the
 * operations.  Files reached through a symlinked parent are not named at all:
 * their content is kept inline, since the path might not lead to them later.
 *
 * Record layout (integers little-endian; uv = unsigned LEB128):
 *   header   16 bytes   "LFSTSPLT", u32 version (1), u32 flags (0)
 *   body     one zstd frame (content checksum on) of operations:
 *              'R' u32 n, n bytes          n bytes of the stream, kept here
 *              'F' uv plen, path, uv size, u32 crc
 *                                          size bytes: the content of file path
 *              'S' uv plen, path, uv realsize, uv nseg, nseg x (uv off, uv len),
 *                  uv size, u32 crc        sparse file: the segments' bytes
 *              'E'                         end
 *            F and S operations are numbered 0, 1, ... in order ("seq").
 *   blobs    one zstd frame per captured operation, its content
 *   index    nblobs x { u64 seq, u64 offset, u64 length, u64 size }, by seq;
 *            offset and length of the frame, from the start of the record
 *   trailer  128 bytes: "LFSTSEND", u32 version, u32 flags, u64 body_offset,
 *            u64 body_length, u64 index_offset, u64 nblobs, u64 tar_size,
 *            u64 files, u64 kept_bytes, u8 diff_id[32], u32 index crc,
 *            u32 body crc, 12 bytes zero, u32 crc of the 124 bytes before it
 *   (crc: CRC-32 as gzip's, ISA-L crc32_gzip_refl)
 *
 * Reassembly reads the trailer and index first (the record must be a regular
 * file) and checks the body's CRC (a damaged record is refused before any file
 * is opened: zstd's own checksum comes only at the end), then streams the body: kept bytes are copied, file operations read
 * the file beneath the root (in-root resolution, final component never
 * followed; type, size and CRC checked) or their captured blob.  Output goes
 * out in 1 MiB buffers; with two or more CPUs a second thread hashes and
 * writes them while the first reads the next files (sha256 is the ceiling).
 * The hash is compared with the DiffID at the end.
 */
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <isa-l/crc.h>
#include <zstd.h>

#define REC_MAGIC "LFSTSPLT"
#define END_MAGIC "LFSTSEND"
#define REC_VERSION 1
#define HDR_SIZE 16
#define TRAILER_SIZE 128
#define INDEX_ENTRY 32

#define BODY_CAP (1u << 20)         /* operations staged before compressing */
#define IO_CAP (1u << 20)           /* file reads, output writes */
#define NOUT 4                      /* output buffers in flight (reassembly) */
#define ZSTD_LEVEL 1             /* headers: level 1 is both faster and smaller than 3 here */

#define OP_RAW 'R'
#define OP_FILE 'F'
#define OP_SPARSE 'S'
#define OP_END 'E'

#define NONE ((size_t)-1)

/* ------------------------------------------------------------------ helpers */

static uint32_t crc32c_(uint32_t crc, const void *p, size_t n)
{
    return crc32_gzip_refl(crc, (const unsigned char *)p, (uint64_t)n);
}

static void put_le32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static size_t put_uv(unsigned char *p, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (unsigned char)v;
    return n;
}

static int pread_full(int fd, void *buf, size_t n, uint64_t off)
{
    unsigned char *p = buf;
    while (n) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (r == 0) return -ENODATA;
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

/* A growable list of NUL-terminated strings. */
typedef struct strlist {
    char *p;
    size_t len, cap;
} strlist;

static int sl_add(strlist *b, const char *a, size_t an, const char *s, size_t n)
{
    size_t need = an + (an && n ? 1 : 0) + n + 1;
    if (b->len + need > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 4096;
        while (nc < b->len + need) nc *= 2;
        char *np = realloc(b->p, nc);
        if (!np) return -ENOMEM;
        b->p = np;
        b->cap = nc;
    }
    char *d = b->p + b->len;
    memcpy(d, a, an);
    if (an && n) d[an++] = '/';
    memcpy(d + an, s, n);
    d[an + n] = 0;
    b->len += an + n + 1;
    return 0;
}

/* ================================================================ recording */

typedef struct fent {
    uint64_t dev, ino;
    int64_t size;                   /* content bytes in the stream */
    int64_t realsize;               /* file size */
    size_t sp, nsp;                 /* sparse segments in rec->sp */
    uint32_t crc;
    int state;                      /* F_OPEN, F_DONE, F_CAPTURED */
} fent;

enum { F_OPEN, F_DONE, F_CAPTURED };

typedef struct blob {
    uint64_t seq, off, len, size;   /* off: in the spool while recording */
} blob;

struct lfs_rec {
    int fd, root_fd;
    int failed;
    lfs_error ferr;                 /* the hook's first error */

    ZSTD_CCtx *z;
    unsigned char *buf;             /* staged operations */
    size_t len;
    size_t rop;                     /* length field of the open 'R' operation, or NONE */
    unsigned char *zout;
    size_t zcap;
    uint64_t written;               /* record bytes written to fd */
    uint64_t body_len;
    uint32_t body_crc;

    uint64_t tar_bytes;             /* stream bytes seen */
    uint64_t kept;                  /* stream bytes kept in 'R' operations */

    int cur;                        /* a file operation is open */
    int64_t got;
    uint32_t crc;
    size_t plen;
    char path[LFS_PATH_MAX];

    fent *f;
    size_t nf, capf;
    lfs_sparse *sp;
    size_t nsp, capsp;
    size_t *slots;                  /* (dev, ino) -> index + 1 into f; open addressing */
    size_t scap, sn;
    size_t live;                    /* operations whose file could still be removed */

    int spool;
    uint64_t spool_len;
    ZSTD_CCtx *zb;
    blob *b;
    size_t nb, capb;
    unsigned char *io;
};

static int rfail(lfs_rec *r, lfs_error *err, int code, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static int rfail(lfs_rec *r, lfs_error *err, int code, const char *path, const char *fmt, ...)
{
    char msg[LFS_ERR_MSG];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    (void)r;
    return lfs_fail(err, code, -1, path, NULL, "%s", msg);
}

/* The hook cannot return errors: the first one sticks and stops recording. */
static void hook_fail(lfs_rec *r, int code, const char *path, const char *what)
{
    if (r->failed) return;
    r->failed = code ? code : EIO;
    lfs_fail(&r->ferr, r->failed, -1, path, NULL, "tar-split record: %s", what);
}

/* Compress staged operations (end: finish the frame) and write what comes out. */
static int body_flush(lfs_rec *r, int end)
{
    ZSTD_inBuffer in = { r->buf, r->len, 0 };
    for (;;) {
        ZSTD_outBuffer out = { r->zout, r->zcap, 0 };
        size_t rem = ZSTD_compressStream2(r->z, &out, &in, end ? ZSTD_e_end : ZSTD_e_continue);
        if (ZSTD_isError(rem)) return -EIO;
        if (out.pos) {
            int w = lfs_write_full(r->fd, r->zout, out.pos);
            if (w < 0) return w;
            r->written += out.pos;
            r->body_len += out.pos;
            r->body_crc = crc32c_(r->body_crc, r->zout, out.pos);
        }
        if (end ? rem == 0 : in.pos == in.size) break;
    }
    r->len = 0;
    return 0;
}

static void raw_close(lfs_rec *r)
{
    if (r->rop == NONE) return;
    put_le32(r->buf + r->rop, (uint32_t)(r->len - r->rop - 4));
    r->rop = NONE;
}

/* Append operation bytes (not part of an 'R' payload). */
static int body_put(lfs_rec *r, const void *p, size_t n)
{
    raw_close(r);
    const unsigned char *s = p;
    while (n) {
        if (r->len == BODY_CAP) {
            int w = body_flush(r, 0);
            if (w < 0) return w;
        }
        size_t k = BODY_CAP - r->len;
        if (k > n) k = n;
        memcpy(r->buf + r->len, s, k);
        r->len += k;
        s += k;
        n -= k;
    }
    return 0;
}

/* Append stream bytes kept in the record: one 'R' operation per staging buffer. */
static int raw_add(lfs_rec *r, const unsigned char *p, size_t n)
{
    r->kept += n;
    while (n) {
        if (r->rop == NONE) {
            if (BODY_CAP - r->len < 5 + 64) {
                int w = body_flush(r, 0);
                if (w < 0) return w;
            }
            r->buf[r->len] = OP_RAW;
            r->rop = r->len + 1;
            r->len += 5;
        }
        size_t k = BODY_CAP - r->len;
        if (k > n) k = n;
        memcpy(r->buf + r->len, p, k);
        r->len += k;
        p += k;
        n -= k;
        if (n) {
            raw_close(r);
            int w = body_flush(r, 0);
            if (w < 0) return w;
        }
    }
    return 0;
}

static int file_op(lfs_rec *r, const fent *f);

/* The open file operation is complete: write it.  Errors stick (lfs_rec_status). */
static int file_close(lfs_rec *r)
{
    if (!r->cur) return 0;
    r->cur = 0;
    fent *f = &r->f[r->nf - 1];
    if (r->got != f->size) {
        hook_fail(r, EIO, r->path, "file content recorded incompletely");
        return -EIO;
    }
    f->crc = r->crc;
    f->state = F_DONE;
    int w = file_op(r, f);
    if (w < 0) hook_fail(r, -w, NULL, w == -EIO ? "compression failed" : "cannot write the record");
    return w;
}

static int file_op(lfs_rec *r, const fent *f)
{
    unsigned char op[1 + 10 + 10 + 10 + 4];
    size_t n = 0;
    op[n++] = f->nsp ? OP_SPARSE : OP_FILE;
    n += put_uv(op + n, r->plen);
    int w = body_put(r, op, n);
    if (w == 0) w = body_put(r, r->path, r->plen);
    if (w < 0) return w;
    n = 0;
    if (f->nsp) {
        n += put_uv(op + n, (uint64_t)f->realsize);
        n += put_uv(op + n, f->nsp);
        for (size_t i = 0; i < f->nsp && w == 0; i++) {
            if (n > sizeof op - 20) {
                w = body_put(r, op, n);
                n = 0;
            }
            n += put_uv(op + n, (uint64_t)r->sp[f->sp + i].offset);
            n += put_uv(op + n, (uint64_t)r->sp[f->sp + i].length);
        }
        if (w < 0) return w;
        if (n > sizeof op - 14) {
            if ((w = body_put(r, op, n)) < 0) return w;
            n = 0;
        }
    }
    n += put_uv(op + n, (uint64_t)f->size);
    put_le32(op + n, f->crc);
    n += 4;
    return body_put(r, op, n);
}

void lfs_rec_hook(void *arg, int kind, const unsigned char *p, size_t n)
{
    lfs_rec *r = arg;
    if (r->failed) return;
    r->tar_bytes += n;
    if (kind == LFS_TAR_DATA && r->cur) {
        r->got += (int64_t)n;
        r->crc = crc32c_(r->crc, p, n);
        return;
    }
    if (r->cur && file_close(r) < 0) return;
    int w = raw_add(r, p, n);
    if (w < 0) hook_fail(r, -w, NULL, w == -EIO ? "compression failed" : "cannot write the record");
}

int lfs_rec_status(const lfs_rec *r, lfs_error *err)
{
    if (!r->failed) return 0;
    if (err) *err = r->ferr;
    return -r->failed;
}

/* ---- the inode map ---- */

static uint64_t ino_hash(uint64_t dev, uint64_t ino)
{
    uint64_t h = (ino ^ (dev * 0x9e3779b97f4a7c15ULL)) * 0xff51afd7ed558ccdULL;
    return h ^ (h >> 29);
}

static size_t *map_slot(size_t *slots, size_t cap, const fent *f, uint64_t dev, uint64_t ino)
{
    size_t mask = cap - 1, i = (size_t)ino_hash(dev, ino) & mask;
    for (;;) {
        size_t v = slots[i];
        if (v == 0) return &slots[i];
        const fent *e = &f[v - 1];
        if (e->dev == dev && e->ino == ino) return &slots[i];
        i = (i + 1) & mask;
    }
}

static int map_put(lfs_rec *r, size_t idx)
{
    if ((r->sn + 1) * 2 > r->scap) {
        size_t nc = r->scap ? r->scap * 2 : 1024;
        size_t *ns = calloc(nc, sizeof *ns);
        if (!ns) return -ENOMEM;
        for (size_t i = 0; i < r->scap; i++) {
            size_t v = r->slots[i];
            if (v) *map_slot(ns, nc, r->f, r->f[v - 1].dev, r->f[v - 1].ino) = v;
        }
        free(r->slots);
        r->slots = ns;
        r->scap = nc;
    }
    size_t *s = map_slot(r->slots, r->scap, r->f, r->f[idx].dev, r->f[idx].ino);
    if (*s == 0) r->sn++;
    *s = idx + 1;
    return 0;
}

/* The live operation reading inode (dev, ino), or NULL. */
static fent *map_get(lfs_rec *r, uint64_t dev, uint64_t ino)
{
    if (!r->scap) return NULL;
    size_t v = *map_slot(r->slots, r->scap, r->f, dev, ino);
    if (!v) return NULL;
    fent *f = &r->f[v - 1];
    return f->state == F_CAPTURED ? NULL : f;
}

/* ---- declaring files ---- */

int lfs_rec_file(lfs_rec *r, int fd, const char *path, size_t len, const lfs_entry *e,
                 lfs_error *err)
{
    int w = lfs_rec_status(r, err);
    if (w < 0) return w;
    if (r->cur && (w = file_close(r)) < 0) return lfs_rec_status(r, err);
    if (len >= LFS_PATH_MAX) return rfail(r, err, ENAMETOOLONG, path, "path too long for the record");
    struct stat st;
    if (fstat(fd, &st) < 0) return rfail(r, err, errno, path, "cannot stat the new file");
    if (r->nf == r->capf) {
        size_t nc = r->capf ? r->capf * 2 : 1024;
        fent *nf = realloc(r->f, nc * sizeof *nf);
        if (!nf) return rfail(r, err, ENOMEM, path, "out of memory");
        r->f = nf;
        r->capf = nc;
    }
    size_t sp = r->nsp;
    if (e->nsparse) {
        if (r->nsp + e->nsparse > r->capsp) {
            size_t nc = r->capsp ? r->capsp : 64;
            while (nc < r->nsp + e->nsparse) nc *= 2;
            lfs_sparse *ns = realloc(r->sp, nc * sizeof *ns);
            if (!ns) return rfail(r, err, ENOMEM, path, "out of memory");
            r->sp = ns;
            r->capsp = nc;
        }
        memcpy(r->sp + r->nsp, e->sparse, e->nsparse * sizeof *e->sparse);
        r->nsp += e->nsparse;
    }
    fent *f = &r->f[r->nf];
    *f = (fent){ (uint64_t)st.st_dev, (uint64_t)st.st_ino, e->size, e->realsize, sp,
                 e->nsparse, 0, F_OPEN };
    r->nf++;
    if (map_put(r, r->nf - 1) < 0) return rfail(r, err, ENOMEM, path, "out of memory");
    r->live++;
    memcpy(r->path, path, len);
    r->plen = len;
    r->cur = 1;
    r->got = 0;
    r->crc = 0;
    return 0;
}

/* ---- capturing content before it is removed ---- */

static int spool_open(lfs_rec *r, lfs_error *err)
{
    if (r->spool >= 0) return 0;
    int fd = openat(r->root_fd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) fd = memfd_create("layerfs-record", MFD_CLOEXEC);
    if (fd < 0) return rfail(r, err, errno, NULL, "cannot create a spool for captured content");
    r->spool = fd;
    if (!r->zb) {
        r->zb = ZSTD_createCCtx();
        if (!r->zb) return rfail(r, err, ENOMEM, NULL, "out of memory");
        ZSTD_CCtx_setParameter(r->zb, ZSTD_c_compressionLevel, ZSTD_LEVEL);
        ZSTD_CCtx_setParameter(r->zb, ZSTD_c_checksumFlag, 1);
    }
    if (!r->io && !(r->io = malloc(IO_CAP))) return rfail(r, err, ENOMEM, NULL, "out of memory");
    if (!r->zout) return rfail(r, err, ENOMEM, NULL, "out of memory");
    return 0;
}

static int blob_feed(lfs_rec *r, const unsigned char *p, size_t n, int end, uint64_t *clen)
{
    ZSTD_inBuffer in = { p, n, 0 };
    for (;;) {
        ZSTD_outBuffer out = { r->zout, r->zcap, 0 };
        size_t rem = ZSTD_compressStream2(r->zb, &out, &in, end ? ZSTD_e_end : ZSTD_e_continue);
        if (ZSTD_isError(rem)) return -EIO;
        if (out.pos) {
            int w = lfs_write_full(r->spool, r->zout, out.pos);
            if (w < 0) return w;
            r->spool_len += out.pos;
            *clen += out.pos;
        }
        if (end ? rem == 0 : in.pos == in.size) return 0;
    }
}

/* Open dirfd/name for reading.  Without root, a file of ours that a layer
 * made unreadable (mode 0000, 0200; Fedora's /etc/shadow) is read through a
 * moment of u+r. */
static int open_own_file(int dirfd, const char *name)
{
    mode_t was;
    return lfs_open_opening_up(dirfd, name, O_RDONLY | O_NOCTTY | O_NONBLOCK, S_IFREG, S_IRUSR,
                               geteuid(), 0, &was);
}

/* Keep the content of operation f (its file is dirfd/name) in the record. */
static int capture(lfs_rec *r, fent *f, int dirfd, const char *name, lfs_error *err)
{
    size_t seq = (size_t)(f - r->f);
    if (f->state == F_OPEN) {
        int w = file_close(r);
        if (w < 0) return lfs_rec_status(r, err);
    }
    int w = spool_open(r, err);
    if (w < 0) return w;
    if (r->nb == r->capb) {
        size_t nc = r->capb ? r->capb * 2 : 16;
        blob *nb = realloc(r->b, nc * sizeof *nb);
        if (!nb) return rfail(r, err, ENOMEM, name, "out of memory");
        r->b = nb;
        r->capb = nc;
    }
    int fd = open_own_file(dirfd, name);
    if (fd < 0) return rfail(r, err, errno, name, "cannot open the file to keep its content in the record");
    struct stat st;
    if (fstat(fd, &st) < 0) {
        w = rfail(r, err, errno, name, "cannot stat the file");
        goto out;
    }
    if ((uint64_t)st.st_dev != f->dev || (uint64_t)st.st_ino != f->ino || !S_ISREG(st.st_mode) ||
        st.st_size != f->realsize) {
        w = rfail(r, err, EIO, name, "file changed while the layer was applied");
        goto out;
    }
    ZSTD_CCtx_reset(r->zb, ZSTD_reset_session_only);
    uint64_t off0 = r->spool_len, clen = 0;
    uint32_t crc = 0;
    lfs_sparse whole = { 0, f->size };
    const lfs_sparse *segs = f->nsp ? r->sp + f->sp : &whole;
    size_t nseg = f->nsp ? f->nsp : 1;
    for (size_t i = 0; i < nseg; i++) {
        uint64_t off = (uint64_t)segs[i].offset, left = (uint64_t)segs[i].length;
        while (left) {
            size_t k = left < IO_CAP ? (size_t)left : IO_CAP;
            if ((w = pread_full(fd, r->io, k, off)) < 0) {
                w = rfail(r, err, w == -ENODATA ? EIO : -w, name, "cannot read the file");
                goto out;
            }
            crc = crc32c_(crc, r->io, k);
            if ((w = blob_feed(r, r->io, k, 0, &clen)) < 0) {
                w = rfail(r, err, -w, NULL, "cannot write the spool of captured content");
                goto out;
            }
            off += k;
            left -= k;
        }
    }
    if ((w = blob_feed(r, NULL, 0, 1, &clen)) < 0) {
        w = rfail(r, err, -w, NULL, "cannot write the spool of captured content");
        goto out;
    }
    if (crc != f->crc) {
        w = rfail(r, err, EIO, name, "file content changed while the layer was applied");
        goto out;
    }
    r->b[r->nb++] = (blob){ seq, off0, clen, (uint64_t)f->size };
    f->state = F_CAPTURED;
    r->live--;
    w = 0;
out:
    close(fd);
    return w;
}

/* Capture every live operation whose inode is beneath the directory dirfd/name. */
static int capture_tree(lfs_rec *r, int dirfd, const char *name, lfs_error *err)
{
    int top = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (top < 0) {
        if (errno == ENOENT || errno == ENOTDIR || errno == ELOOP || errno == EACCES) return 0;
        return rfail(r, err, errno, name, "cannot open the directory to be removed");
    }
    strlist work = {0};
    int rc = sl_add(&work, "", 0, "", 0) < 0 ? rfail(r, err, ENOMEM, name, "out of memory") : 0;
    for (size_t wi = 0; rc == 0 && wi < work.len && r->live;) {
        size_t rl = strlen(work.p + wi);
        char *rel = malloc(rl + 1);
        if (!rel) {
            rc = rfail(r, err, ENOMEM, name, "out of memory");
            break;
        }
        memcpy(rel, work.p + wi, rl + 1);
        wi += rl + 1;
        int fd = lfs_open_dir_beneath(top, rel, rl, 0);
        if (fd < 0) {
            free(rel);
            if (fd == -ENOENT || fd == -ENOTDIR || fd == -ELOOP || fd == -EACCES) continue;
            rc = rfail(r, err, -fd, name, "cannot open a directory to be removed");
            break;
        }
        struct stat dst;
        DIR *d = fstat(fd, &dst) == 0 ? fdopendir(fd) : NULL;
        if (!d) {
            rc = rfail(r, err, errno, name, "cannot read a directory to be removed");
            close(fd);
            free(rel);
            break;
        }
        struct dirent *de;
        errno = 0;
        while (rc == 0 && (de = readdir(d))) {
            const char *nm = de->d_name;
            if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0))) continue;
            unsigned char t = de->d_type;
            if (t == DT_UNKNOWN) {
                struct stat st;
                if (fstatat(fd, nm, &st, AT_SYMLINK_NOFOLLOW) < 0) continue;
                t = S_ISREG(st.st_mode) ? DT_REG : S_ISDIR(st.st_mode) ? DT_DIR : DT_LNK;
            }
            if (t == DT_REG) {
                fent *f = map_get(r, (uint64_t)dst.st_dev, (uint64_t)de->d_ino);
                if (f) rc = capture(r, f, fd, nm, err);
            } else if (t == DT_DIR) {
                if (sl_add(&work, rel, rl, nm, strlen(nm)) < 0)
                    rc = rfail(r, err, ENOMEM, name, "out of memory");
            }
            errno = 0;
        }
        if (rc == 0 && errno) rc = rfail(r, err, errno, name, "cannot read a directory to be removed");
        closedir(d);
        free(rel);
    }
    free(work.p);
    close(top);
    return rc;
}

int lfs_rec_removing(lfs_rec *r, int dirfd, const char *name, const struct stat *st, lfs_error *err)
{
    int w = lfs_rec_status(r, err);
    if (w < 0) return w;
    if (r->live == 0) return 0;
    struct stat sb;
    if (!st) {
        if (fstatat(dirfd, name, &sb, AT_SYMLINK_NOFOLLOW) < 0) {
            if (errno == ENOENT) return 0;
            return rfail(r, err, errno, name, "cannot stat the entry to be removed");
        }
        st = &sb;
    }
    if (S_ISREG(st->st_mode)) {
        fent *f = map_get(r, (uint64_t)st->st_dev, (uint64_t)st->st_ino);
        return f ? capture(r, f, dirfd, name, err) : 0;
    }
    if (S_ISDIR(st->st_mode)) return capture_tree(r, dirfd, name, err);
    return 0;
}

/* ---- open / finish ---- */

int lfs_rec_open(lfs_rec **out, int fd, int root_fd, lfs_error *err)
{
    *out = NULL;
    if (fd < 0) return lfs_fail(err, EBADF, -1, NULL, NULL, "no file descriptor for the record");
    lfs_rec *r = calloc(1, sizeof *r);
    if (!r) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
    r->fd = fd;
    r->root_fd = root_fd;
    r->rop = NONE;
    r->spool = -1;
    r->zcap = ZSTD_CStreamOutSize();
    r->buf = malloc(BODY_CAP);
    r->zout = malloc(r->zcap);
    r->z = ZSTD_createCCtx();
    if (!r->buf || !r->zout || !r->z) {
        lfs_rec_free(r);
        return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
    }
    ZSTD_CCtx_setParameter(r->z, ZSTD_c_compressionLevel, ZSTD_LEVEL);
    ZSTD_CCtx_setParameter(r->z, ZSTD_c_checksumFlag, 1);
    unsigned char hdr[HDR_SIZE];
    memcpy(hdr, REC_MAGIC, 8);
    put_le32(hdr + 8, REC_VERSION);
    put_le32(hdr + 12, 0);
    int w = lfs_write_full(fd, hdr, sizeof hdr);
    if (w < 0) {
        lfs_rec_free(r);
        return lfs_fail(err, -w, -1, NULL, NULL, "cannot write the tar-split record");
    }
    r->written = HDR_SIZE;
    *out = r;
    return 0;
}

static int blob_cmp(const void *a, const void *b)
{
    const blob *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

int lfs_rec_finish(lfs_rec *r, const lfs_digests *d, uint64_t *size, lfs_error *err)
{
    int w = lfs_rec_status(r, err);
    if (w < 0) return w;
    if ((w = file_close(r)) < 0) return lfs_rec_status(r, err);
    unsigned char end = OP_END;
    if ((w = body_put(r, &end, 1)) < 0 || (w = body_flush(r, 1)) < 0)
        return lfs_fail(err, w == -EIO ? EIO : -w, -1, NULL, NULL,
                        w == -EIO ? "tar-split record: compression failed"
                                  : "cannot write the tar-split record");
    if (r->tar_bytes != d->tar_size)
        return lfs_fail(err, EIO, -1, NULL, NULL,
                        "tar-split record covers %llu bytes of a %llu-byte stream",
                        (unsigned long long)r->tar_bytes, (unsigned long long)d->tar_size);
    /* captured content, copied from the spool */
    uint64_t blobs_at = r->written;
    if (r->nb) {
        uint64_t off = 0;
        while (off < r->spool_len) {
            size_t k = r->spool_len - off < IO_CAP ? (size_t)(r->spool_len - off) : IO_CAP;
            if ((w = pread_full(r->spool, r->io, k, off)) < 0)
                return lfs_fail(err, w == -ENODATA ? EIO : -w, -1, NULL, NULL,
                                "cannot read the spool of captured content");
            if ((w = lfs_write_full(r->fd, r->io, k)) < 0)
                return lfs_fail(err, -w, -1, NULL, NULL, "cannot write the tar-split record");
            off += k;
        }
        r->written += r->spool_len;
        qsort(r->b, r->nb, sizeof *r->b, blob_cmp);
    }
    uint64_t index_at = r->written;
    uint32_t icrc = 0;
    for (size_t i = 0; i < r->nb; i++) {
        unsigned char e[INDEX_ENTRY];
        put_le64(e, r->b[i].seq);
        put_le64(e + 8, blobs_at + r->b[i].off);
        put_le64(e + 16, r->b[i].len);
        put_le64(e + 24, r->b[i].size);
        icrc = crc32c_(icrc, e, sizeof e);
        if ((w = lfs_write_full(r->fd, e, sizeof e)) < 0)
            return lfs_fail(err, -w, -1, NULL, NULL, "cannot write the tar-split record");
        r->written += sizeof e;
    }
    unsigned char t[TRAILER_SIZE];
    memset(t, 0, sizeof t);
    memcpy(t, END_MAGIC, 8);
    put_le32(t + 8, REC_VERSION);
    put_le32(t + 12, 0);
    put_le64(t + 16, HDR_SIZE);
    put_le64(t + 24, r->body_len);
    put_le64(t + 32, index_at);
    put_le64(t + 40, r->nb);
    put_le64(t + 48, d->tar_size);
    put_le64(t + 56, r->nf);
    put_le64(t + 64, r->kept);
    memcpy(t + 72, d->diff_id, 32);
    put_le32(t + 104, icrc);
    put_le32(t + 108, r->body_crc);
    put_le32(t + 124, crc32c_(0, t, 124));
    if ((w = lfs_write_full(r->fd, t, sizeof t)) < 0)
        return lfs_fail(err, -w, -1, NULL, NULL, "cannot write the tar-split record");
    r->written += sizeof t;
    if (size) *size = r->written;
    return 0;
}

void lfs_rec_free(lfs_rec *r)
{
    if (!r) return;
    ZSTD_freeCCtx(r->z);
    ZSTD_freeCCtx(r->zb);
    if (r->spool >= 0) close(r->spool);
    free(r->buf);
    free(r->zout);
    free(r->f);
    free(r->sp);
    free(r->slots);
    free(r->b);
    free(r->io);
    free(r);
}

/* ============================================================== reassembly */

typedef struct trailer {
    uint64_t body_off, body_len, index_off, nblobs, tar_size, files, kept;
    unsigned char diff_id[32];
    uint32_t index_crc, body_crc;
} trailer;

typedef struct rd {
    int fd, root_fd, out_fd;
    uint64_t start, size;           /* record bytes: [start, start + size) of fd */
    trailer t;
    lfs_error *err;
    blob *b;                        /* index: off from the record start */
    size_t bi;

    ZSTD_DCtx *z;
    unsigned char *in;              /* compressed body */
    size_t in_cap, in_len, in_pos;
    uint64_t body_read;
    unsigned char *dec;             /* decompressed operations */
    size_t dec_cap, dec_len, dec_pos;
    int frame_done;

    unsigned char *ob;              /* output buffer being filled: obuf[handed % NOUT] */
    size_t olen;
    uint64_t out_bytes;             /* bytes handed to the output stage */
    lfs_sha256 h;                   /* owned by the output stage */

    /* output stage: buffers handed over in order, hashed and written */
    unsigned char *obuf[NOUT];
    size_t olens[NOUT];
    uint64_t handed, done;
    int threaded, stop, abort_;
    int werr;                       /* the output stage's write error (errno), sticky */
    uint64_t werr_off;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;

    ZSTD_DCtx *zb;                  /* captured blobs */

    int dfd;                        /* directory of the last file */
    size_t dlen;
    char dpath[LFS_PATH_MAX];
    char path[LFS_PATH_MAX];
} rd;

static int bad(rd *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int bad(rd *r, const char *fmt, ...)
{
    char msg[LFS_ERR_MSG];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return lfs_fail(r->err, EBADMSG, -1, NULL, NULL, "damaged tar-split record: %s", msg);
}

static int read_trailer(int fd, uint64_t *start, uint64_t *size, trailer *t, lfs_error *err)
{
    struct stat st;
    if (fstat(fd, &st) < 0) return lfs_fail(err, errno, -1, NULL, NULL, "cannot stat the record");
    if (!S_ISREG(st.st_mode))
        return lfs_fail(err, EINVAL, -1, NULL, NULL, "the tar-split record must be a regular file");
    off_t pos = lseek(fd, 0, SEEK_CUR);
    if (pos < 0) return lfs_fail(err, errno, -1, NULL, NULL, "cannot seek in the record");
    if (pos > st.st_size || (uint64_t)(st.st_size - pos) < HDR_SIZE + TRAILER_SIZE)
        return lfs_fail(err, EBADMSG, -1, NULL, NULL, "damaged tar-split record: too short");
    *start = (uint64_t)pos;
    *size = (uint64_t)(st.st_size - pos);
    unsigned char h[HDR_SIZE], b[TRAILER_SIZE];
    int w = pread_full(fd, h, sizeof h, *start);
    if (w == 0) w = pread_full(fd, b, sizeof b, *start + *size - TRAILER_SIZE);
    if (w < 0) return lfs_fail(err, w == -ENODATA ? EBADMSG : -w, -1, NULL, NULL, "cannot read the record");
    if (memcmp(h, REC_MAGIC, 8) != 0)
        return lfs_fail(err, EBADMSG, -1, NULL, NULL, "not a tar-split record");
    if (memcmp(b, END_MAGIC, 8) != 0 || get_le32(b + 124) != crc32c_(0, b, 124))
        return lfs_fail(err, EBADMSG, -1, NULL, NULL,
                        "damaged tar-split record: trailer missing or corrupt (truncated?)");
    if (get_le32(h + 8) != REC_VERSION || get_le32(b + 8) != REC_VERSION)
        return lfs_fail(err, ENOTSUP, -1, NULL, NULL, "tar-split record version %u is not supported",
                        get_le32(h + 8));
    t->body_off = get_le64(b + 16);
    t->body_len = get_le64(b + 24);
    t->index_off = get_le64(b + 32);
    t->nblobs = get_le64(b + 40);
    t->tar_size = get_le64(b + 48);
    t->files = get_le64(b + 56);
    t->kept = get_le64(b + 64);
    memcpy(t->diff_id, b + 72, 32);
    t->index_crc = get_le32(b + 104);
    t->body_crc = get_le32(b + 108);
    if (get_le32(h + 12) != 0 || get_le32(b + 12) != 0)
        return lfs_fail(err, ENOTSUP, -1, NULL, NULL, "tar-split record has unknown flags");
    uint64_t tail = *size - TRAILER_SIZE;
    if (t->body_off != HDR_SIZE || t->body_len > tail - HDR_SIZE ||
        t->index_off < t->body_off + t->body_len || t->index_off > tail ||
        t->nblobs > t->files || t->nblobs > (tail - t->index_off) / INDEX_ENTRY ||
        t->index_off + t->nblobs * INDEX_ENTRY != tail)
        return lfs_fail(err, EBADMSG, -1, NULL, NULL, "damaged tar-split record: inconsistent trailer");
    return 0;
}

int lfs_record_read_info(int record_fd, lfs_record_info *out, lfs_error *err)
{
    uint64_t start, size;
    trailer t;
    int w = read_trailer(record_fd, &start, &size, &t, err);
    if (w < 0) return w;
    memset(out, 0, sizeof *out);
    memcpy(out->diff_id, t.diff_id, 32);
    out->tar_size = t.tar_size;
    out->files = t.files;
    out->captured = t.nblobs;
    out->kept_bytes = t.kept;
    out->record_size = size;
    return 0;
}

static int read_index(rd *r)
{
    if (!r->t.nblobs) return 0;
    size_t n = (size_t)r->t.nblobs;
    unsigned char *raw = malloc(n * INDEX_ENTRY);
    r->b = calloc(n, sizeof *r->b);
    if (!raw || !r->b) {
        free(raw);
        return lfs_fail(r->err, ENOMEM, -1, NULL, NULL, "out of memory");
    }
    int w = pread_full(r->fd, raw, n * INDEX_ENTRY, r->start + r->t.index_off);
    if (w < 0) {
        free(raw);
        return lfs_fail(r->err, w == -ENODATA ? EBADMSG : -w, -1, NULL, NULL, "cannot read the record");
    }
    if (crc32c_(0, raw, n * INDEX_ENTRY) != r->t.index_crc) {
        free(raw);
        return bad(r, "index of captured content is corrupt");
    }
    uint64_t lo = r->t.body_off + r->t.body_len;
    for (size_t i = 0; i < n; i++) {
        const unsigned char *e = raw + i * INDEX_ENTRY;
        blob *b = &r->b[i];
        *b = (blob){ get_le64(e), get_le64(e + 8), get_le64(e + 16), get_le64(e + 24) };
        if (b->seq >= r->t.files || (i && b->seq <= r->b[i - 1].seq) || b->off < lo ||
            b->len > r->t.index_off - b->off || b->off > r->t.index_off) {
            free(raw);
            return bad(r, "index of captured content is inconsistent");
        }
    }
    free(raw);
    return 0;
}

/* The compressed body against its CRC, before anything is opened or written. */
static int check_body(rd *r)
{
    unsigned char *buf = malloc(IO_CAP);
    if (!buf) return lfs_fail(r->err, ENOMEM, -1, NULL, NULL, "out of memory");
    uint32_t crc = 0;
    int w = 0;
    for (uint64_t off = 0; off < r->t.body_len;) {
        size_t k = r->t.body_len - off < IO_CAP ? (size_t)(r->t.body_len - off) : IO_CAP;
        if ((w = pread_full(r->fd, buf, k, r->start + r->t.body_off + off)) < 0) {
            w = lfs_fail(r->err, w == -ENODATA ? EBADMSG : -w, -1, NULL, NULL, "cannot read the record");
            break;
        }
        crc = crc32c_(crc, buf, k);
        off += k;
    }
    free(buf);
    if (w == 0 && crc != r->t.body_crc) w = bad(r, "body is corrupt");
    return w;
}

/* ---- the decompressed body ---- */

static int body_more(rd *r)
{
    for (;;) {
        if (r->frame_done) return bad(r, "operations run past the end of the body");
        if (r->in_pos == r->in_len) {
            uint64_t left = r->t.body_len - r->body_read;
            if (left == 0) return bad(r, "body ends early (truncated?)");
            size_t k = left < r->in_cap ? (size_t)left : r->in_cap;
            int w = pread_full(r->fd, r->in, k, r->start + r->t.body_off + r->body_read);
            if (w < 0) return lfs_fail(r->err, w == -ENODATA ? EBADMSG : -w, -1, NULL, NULL,
                                       "cannot read the record");
            r->body_read += k;
            r->in_len = k;
            r->in_pos = 0;
        }
        ZSTD_inBuffer in = { r->in, r->in_len, r->in_pos };
        ZSTD_outBuffer out = { r->dec, r->dec_cap, 0 };
        size_t ret = ZSTD_decompressStream(r->z, &out, &in);
        r->in_pos = in.pos;
        if (ZSTD_isError(ret)) return bad(r, "body: %s", ZSTD_getErrorName(ret));
        if (ret == 0) r->frame_done = 1;
        if (out.pos) {
            r->dec_len = out.pos;
            r->dec_pos = 0;
            return 0;
        }
    }
}

static int body_get(rd *r, void *dst, size_t n)
{
    unsigned char *d = dst;
    while (n) {
        if (r->dec_pos == r->dec_len) {
            int w = body_more(r);
            if (w < 0) return w;
        }
        size_t k = r->dec_len - r->dec_pos;
        if (k > n) k = n;
        memcpy(d, r->dec + r->dec_pos, k);
        r->dec_pos += k;
        d += k;
        n -= k;
    }
    return 0;
}

static int body_uv(rd *r, uint64_t *v)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        unsigned char c;
        int w = body_get(r, &c, 1);
        if (w < 0) return w;
        if (shift == 63 && c > 1) break;
        x |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            *v = x;
            return 0;
        }
    }
    return bad(r, "malformed number");
}

/* ---- output ---- */

/* Hash and write one buffer (the output stage); returns 0 or -errno. */
static int out_process(rd *r, const unsigned char *p, size_t n, int failed)
{
    lfs_sha256_update(&r->h, p, n);
    return r->out_fd >= 0 && !failed ? lfs_write_full(r->out_fd, p, n) : 0;
}

static void *out_worker(void *arg)
{
    rd *r = arg;
    uint64_t off = 0;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        while (r->done == r->handed && !r->stop) pthread_cond_wait(&r->cv, &r->mu);
        if (r->done == r->handed || r->abort_) break;
        unsigned i = (unsigned)(r->done % NOUT);
        size_t n = r->olens[i];
        int failed = r->werr;
        pthread_mutex_unlock(&r->mu);
        int w = out_process(r, r->obuf[i], n, failed);
        pthread_mutex_lock(&r->mu);
        if (w < 0 && !r->werr) {
            r->werr = -w;
            r->werr_off = off;
        }
        off += n;
        r->done++;
        pthread_cond_broadcast(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

static int out_start(rd *r)
{
    for (int i = 0; i < NOUT; i++)
        if (!(r->obuf[i] = malloc(IO_CAP))) return -ENOMEM;
    r->ob = r->obuf[0];
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) < 2) return 0;
    int rc = pthread_mutex_init(&r->mu, NULL);
    if (rc) return -rc;
    if ((rc = pthread_cond_init(&r->cv, NULL))) {
        pthread_mutex_destroy(&r->mu);
        return -rc;
    }
    /* signals stay with the caller's threads */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&r->th, NULL, out_worker, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        pthread_cond_destroy(&r->cv);
        pthread_mutex_destroy(&r->mu);
        return 0;                       /* no thread: the caller's thread does it all */
    }
    r->threaded = 1;
    return 0;
}

/* Stop the output stage: after every handed buffer (or at once with abort). */
static void out_stop(rd *r, int abort)
{
    if (!r->threaded) return;
    pthread_mutex_lock(&r->mu);
    r->stop = 1;
    if (abort) r->abort_ = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->th, NULL);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    r->threaded = 0;
}

static int write_error(rd *r)
{
    return lfs_fail(r->err, r->werr, (int64_t)r->werr_off, NULL, NULL, "cannot write the tar stream");
}

/* Hand the filled buffer to the output stage and take the next free one. */
static int out_flush(rd *r)
{
    if (!r->olen) return 0;
    if (!r->threaded) {
        int w = out_process(r, r->ob, r->olen, r->werr);
        if (w < 0 && !r->werr) {
            r->werr = -w;
            r->werr_off = r->out_bytes;
        }
        r->out_bytes += r->olen;
        r->olen = 0;
        return r->werr ? write_error(r) : 0;
    }
    pthread_mutex_lock(&r->mu);
    r->olens[r->handed % NOUT] = r->olen;
    r->handed++;
    pthread_cond_broadcast(&r->cv);
    while (r->handed - r->done >= NOUT) pthread_cond_wait(&r->cv, &r->mu);
    int werr = r->werr;
    pthread_mutex_unlock(&r->mu);
    r->out_bytes += r->olen;
    r->olen = 0;
    r->ob = r->obuf[r->handed % NOUT];
    return werr ? write_error(r) : 0;
}

/* Room for at least one byte at r->ob + r->olen; returns its size. */
static ssize_t out_room(rd *r)
{
    if (r->olen == IO_CAP) {
        int w = out_flush(r);
        if (w < 0) return w;
    }
    return (ssize_t)(IO_CAP - r->olen);
}

/* ---- operations ---- */

static int op_raw(rd *r)
{
    unsigned char b4[4];
    int w = body_get(r, b4, 4);
    if (w < 0) return w;
    uint64_t n = get_le32(b4);
    while (n) {
        ssize_t room = out_room(r);
        if (room < 0) return (int)room;
        size_t k = n < (uint64_t)room ? (size_t)n : (size_t)room;
        if ((w = body_get(r, r->ob + r->olen, k)) < 0) return w;
        r->olen += k;
        n -= k;
    }
    return 0;
}

static int changed(rd *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int changed(rd *r, const char *fmt, ...)
{
    char msg[LFS_ERR_MSG];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return lfs_fail(r->err, ESTALE, (int64_t)(r->out_bytes + r->olen), r->path, NULL,
                    "%s: the tree no longer matches the record", msg);
}

/* Open r->path (length plen) beneath the root for reading; checks type and size. */
static int open_file(rd *r, size_t plen, int64_t realsize)
{
    size_t pl = plen;
    while (pl > 0 && r->path[pl - 1] != '/') pl--;
    const char *base = r->path + pl;
    size_t dl = pl ? pl - 1 : 0;
    if (!*base) return bad(r, "empty file name");
    if (r->dfd < 0 || dl != r->dlen || memcmp(r->dpath, r->path, dl) != 0) {
        if (r->dfd >= 0 && r->dfd != r->root_fd) close(r->dfd);
        r->dfd = -1;
        if (dl == 0) {
            r->dfd = r->root_fd;
        } else {
            memcpy(r->dpath, r->path, dl);
            r->dpath[dl] = 0;
            lfs_error e2;
            int fd = lfs_open_dir_in_root(r->root_fd, r->dpath, 0, &e2);
            if (fd < 0) {
                if (fd == -ENOENT || fd == -ENOTDIR || fd == -ELOOP)
                    return changed(r, "'%s' is missing", r->path);
                return lfs_fail(r->err, -fd, -1, r->path, NULL, "cannot open the directory of the file: %s",
                                e2.message);
            }
            r->dfd = fd;
        }
        r->dlen = dl;
    }
    struct stat st;
    if (fstatat(r->dfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0) {
        if (errno == ENOENT || errno == ENOTDIR) return changed(r, "'%s' is missing", r->path);
        return lfs_fail(r->err, errno, -1, r->path, NULL, "cannot stat the file");
    }
    if (!S_ISREG(st.st_mode)) return changed(r, "'%s' is no longer a regular file", r->path);
    if (st.st_size != realsize)
        return changed(r, "'%s' has %lld bytes, the record says %lld", r->path,
                       (long long)st.st_size, (long long)realsize);
    int fd = open_own_file(r->dfd, base);
    if (fd < 0) return lfs_fail(r->err, errno, -1, r->path, NULL, "cannot open the file");
    return fd;
}

/* Copy size bytes of fd, from the segments (or from 0), to the output. */
static int copy_file(rd *r, int fd, const lfs_sparse *segs, size_t nseg, int64_t size, uint32_t *crc)
{
    lfs_sparse whole = { 0, size };
    if (!nseg) {
        segs = &whole;
        nseg = 1;
    }
    for (size_t i = 0; i < nseg; i++) {
        int64_t off = segs[i].offset, left = segs[i].length;
        while (left > 0) {
            ssize_t room = out_room(r);
            if (room < 0) return (int)room;
            size_t k = (uint64_t)left < (uint64_t)room ? (size_t)left : (size_t)room;
            ssize_t n = nseg == 1 && segs == &whole ? read(fd, r->ob + r->olen, k)
                                                    : pread(fd, r->ob + r->olen, k, (off_t)off);
            if (n < 0) {
                if (errno == EINTR) continue;
                return lfs_fail(r->err, errno, -1, r->path, NULL, "cannot read the file");
            }
            if (n == 0) return changed(r, "'%s' is shorter than recorded", r->path);
            *crc = crc32c_(*crc, r->ob + r->olen, (size_t)n);
            r->olen += (size_t)n;
            off += n;
            left -= n;
        }
    }
    return 0;
}

/* Content of operation seq from its captured blob. */
static int copy_blob(rd *r, const blob *b, int64_t size, uint32_t *crc)
{
    if ((int64_t)b->size != size) return bad(r, "captured content of '%s' has the wrong size", r->path);
    if (!r->zb && !(r->zb = ZSTD_createDCtx()))
        return lfs_fail(r->err, ENOMEM, -1, NULL, NULL, "out of memory");
    ZSTD_DCtx_reset(r->zb, ZSTD_reset_session_only);
    unsigned char in[64 << 10];
    uint64_t done = 0, got = 0;
    size_t in_len = 0, in_pos = 0;
    int frame_done = 0;
    while (!frame_done) {
        if (in_pos == in_len) {
            if (done == b->len) return bad(r, "captured content of '%s' is truncated", r->path);
            size_t k = b->len - done < sizeof in ? (size_t)(b->len - done) : sizeof in;
            int w = pread_full(r->fd, in, k, r->start + b->off + done);
            if (w < 0) return lfs_fail(r->err, w == -ENODATA ? EBADMSG : -w, -1, NULL, NULL,
                                       "cannot read the record");
            done += k;
            in_len = k;
            in_pos = 0;
        }
        ssize_t room = out_room(r);
        if (room < 0) return (int)room;
        ZSTD_inBuffer zi = { in, in_len, in_pos };
        ZSTD_outBuffer zo = { r->ob + r->olen, (size_t)room, 0 };
        size_t ret = ZSTD_decompressStream(r->zb, &zo, &zi);
        in_pos = zi.pos;
        if (ZSTD_isError(ret)) return bad(r, "captured content of '%s': %s", r->path, ZSTD_getErrorName(ret));
        if (got + zo.pos > (uint64_t)size) return bad(r, "captured content of '%s' is too long", r->path);
        *crc = crc32c_(*crc, r->ob + r->olen, zo.pos);
        r->olen += zo.pos;
        got += zo.pos;
        if (ret == 0) frame_done = 1;
    }
    if (got != (uint64_t)size || in_pos != in_len || done != b->len)
        return bad(r, "captured content of '%s' has the wrong size", r->path);
    return 0;
}

static int op_file(rd *r, int sparse, uint64_t seq, lfs_sparse **segs, size_t *segcap)
{
    uint64_t plen, realsize = 0, nseg = 0, size;
    int w = body_uv(r, &plen);
    if (w < 0) return w;
    if (plen == 0 || plen >= LFS_PATH_MAX) return bad(r, "bad path length %llu", (unsigned long long)plen);
    if ((w = body_get(r, r->path, (size_t)plen)) < 0) return w;
    r->path[plen] = 0;
    if (memchr(r->path, 0, (size_t)plen)) return bad(r, "NUL byte in a path");
    if (sparse) {
        if ((w = body_uv(r, &realsize)) < 0 || (w = body_uv(r, &nseg)) < 0) return w;
        if (realsize > INT64_MAX) return bad(r, "bad size");
        if (nseg > r->t.tar_size / 2 + 1) return bad(r, "bad sparse map");
        if (nseg > *segcap) {
            size_t nc = *segcap ? *segcap : 16;
            while (nc < nseg) nc *= 2;
            lfs_sparse *ns = realloc(*segs, nc * sizeof *ns);
            if (!ns) return lfs_fail(r->err, ENOMEM, -1, NULL, NULL, "out of memory");
            *segs = ns;
            *segcap = nc;
        }
        for (uint64_t i = 0; i < nseg; i++) {
            uint64_t o, l;
            if ((w = body_uv(r, &o)) < 0 || (w = body_uv(r, &l)) < 0) return w;
            if (o > realsize || l > realsize - o) return bad(r, "sparse segment outside the file");
            (*segs)[i].offset = (int64_t)o;
            (*segs)[i].length = (int64_t)l;
        }
    }
    unsigned char b4[4];
    if ((w = body_uv(r, &size)) < 0 || (w = body_get(r, b4, 4)) < 0) return w;
    uint32_t want = get_le32(b4);
    if (size > r->t.tar_size) return bad(r, "bad size");
    if (!sparse) realsize = size;
    else {
        uint64_t sum = 0;
        for (uint64_t i = 0; i < nseg; i++) sum += (uint64_t)(*segs)[i].length;
        if (sum != size) return bad(r, "sparse map does not add up");
    }

    uint32_t crc = 0;
    if (r->bi < r->t.nblobs && r->b[r->bi].seq == seq) {
        w = copy_blob(r, &r->b[r->bi++], (int64_t)size, &crc);
        if (w < 0) return w;
        if (crc != want) return bad(r, "captured content of '%s' is corrupt", r->path);
        return 0;
    }
    int fd = open_file(r, (size_t)plen, (int64_t)realsize);
    if (fd < 0) return fd;
    w = copy_file(r, fd, sparse ? *segs : NULL, sparse ? (size_t)nseg : 0, (int64_t)size, &crc);
    close(fd);
    if (w < 0) return w;
    if (crc != want) return changed(r, "content of '%s' differs from the record", r->path);
    return 0;
}

int lfs_reassemble(int record_fd, int root_fd, int out_fd, lfs_digests *out, lfs_error *err)
{
    struct stat st;
    if (fstat(root_fd, &st) < 0) return lfs_fail(err, errno, -1, NULL, NULL, "cannot stat the root");
    if (!S_ISDIR(st.st_mode)) return lfs_fail(err, ENOTDIR, -1, NULL, NULL, "the root is not a directory");
    rd *r = calloc(1, sizeof *r);
    if (!r) return lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
    r->fd = record_fd;
    r->root_fd = root_fd;
    r->out_fd = out_fd;
    r->err = err;
    r->dfd = -1;
    lfs_sparse *segs = NULL;
    size_t segcap = 0;
    int rc = read_trailer(record_fd, &r->start, &r->size, &r->t, err);
    if (rc < 0) goto out;
    if ((rc = read_index(r)) < 0) goto out;
    if ((rc = check_body(r)) < 0) goto out;
    if ((rc = lfs_sha256_init(&r->h)) < 0) {
        rc = lfs_fail(err, -rc, -1, NULL, NULL, "cannot start sha256");
        goto out;
    }
    r->in_cap = ZSTD_DStreamInSize();
    r->dec_cap = ZSTD_DStreamOutSize();
    r->in = malloc(r->in_cap);
    r->dec = malloc(r->dec_cap);
    r->z = ZSTD_createDCtx();
    if (!r->in || !r->dec || !r->z || out_start(r) < 0) {
        rc = lfs_fail(err, ENOMEM, -1, NULL, NULL, "out of memory");
        goto out;
    }

    uint64_t seq = 0;
    for (;;) {
        unsigned char op;
        if ((rc = body_get(r, &op, 1)) < 0) goto out;
        if (op == OP_END) break;
        if (op == OP_RAW) {
            rc = op_raw(r);
        } else if (op == OP_FILE || op == OP_SPARSE) {
            if (seq >= r->t.files) {
                rc = bad(r, "more file operations than the trailer says");
                goto out;
            }
            rc = op_file(r, op == OP_SPARSE, seq++, &segs, &segcap);
        } else {
            rc = bad(r, "unknown operation 0x%02x", op);
        }
        if (rc < 0) goto out;
        if (r->out_bytes + r->olen > r->t.tar_size) {
            rc = bad(r, "operations produce more than the recorded %llu bytes",
                     (unsigned long long)r->t.tar_size);
            goto out;
        }
    }
    /* the frame must end right here, with the body */
    if (!r->frame_done && r->dec_pos == r->dec_len) {
        ZSTD_inBuffer in = { r->in, r->in_len, r->in_pos };
        unsigned char x;
        ZSTD_outBuffer o = { &x, 1, 0 };
        size_t ret = ZSTD_decompressStream(r->z, &o, &in);
        r->in_pos = in.pos;
        if (!ZSTD_isError(ret) && ret == 0 && o.pos == 0) r->frame_done = 1;
    }
    if (!r->frame_done || r->dec_pos != r->dec_len || r->in_pos != r->in_len ||
        r->body_read != r->t.body_len) {
        rc = bad(r, "body does not end with its end operation");
        goto out;
    }
    if (seq != r->t.files || r->bi != r->t.nblobs) {
        rc = bad(r, "file operations do not match the trailer");
        goto out;
    }
    if ((rc = out_flush(r)) < 0) goto out;
    out_stop(r, 0);
    if (r->werr) {
        rc = write_error(r);
        goto out;
    }
    unsigned char dig[32];
    lfs_sha256_final(&r->h, dig);
    if (r->out_bytes != r->t.tar_size) {
        rc = bad(r, "rebuilt %llu bytes, the record says %llu", (unsigned long long)r->out_bytes,
                 (unsigned long long)r->t.tar_size);
        goto out;
    }
    if (memcmp(dig, r->t.diff_id, 32) != 0) {
        char a[65], b[65];
        for (int i = 0; i < 32; i++) {
            snprintf(a + 2 * i, 3, "%02x", dig[i]);
            snprintf(b + 2 * i, 3, "%02x", r->t.diff_id[i]);
        }
        rc = lfs_fail(err, EILSEQ, -1, NULL, NULL,
                      "rebuilt tar stream has DiffID sha256:%s, the record says sha256:%s", a, b);
        goto out;
    }
    if (out) {
        memset(out, 0, sizeof *out);
        memcpy(out->digest, dig, 32);
        memcpy(out->diff_id, dig, 32);
        out->compressed_size = r->out_bytes;
        out->tar_size = r->out_bytes;
        out->compression = LFS_COMP_NONE;
    }
    rc = 0;
out:
    out_stop(r, 1);
    lfs_sha256_free(&r->h);
    if (r->dfd >= 0 && r->dfd != root_fd) close(r->dfd);
    ZSTD_freeDCtx(r->z);
    ZSTD_freeDCtx(r->zb);
    free(r->in);
    free(r->dec);
    for (int i = 0; i < NOUT; i++) free(r->obuf[i]);
    free(r->b);
    free(segs);
    free(r);
    return rc < 0 ? rc : 0;
}
