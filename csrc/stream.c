/*
 * Layer byte streams: reading (lfs_src) and writing (lfs_sink), plus the
 * whole-stream helpers lfs_digest_stream and lfs_sha256_fd.
 *
 * Reading:  fd -> sha256 (digest) -> detect + decompress -> sha256 (DiffID) -> consumer
 * Writing:  tar bytes -> sha256 (DiffID) -> compress -> sha256 (digest) -> fd
 *
 * Reading side
 *   The producer reads the input in chunks of SRC_RAW_CAP bytes and
 *   decompresses them into buffers of SRC_BUF_CAP bytes; the consumer (tar
 *   parser, file writer) borrows those zero-copy through lfs_src_chunk.  With
 *   threads (threads >= 2, or 0 on a machine with two or more CPUs) the
 *   producer runs in its own thread, up to SRC_RAW_N chunks and SRC_NBUF
 *   buffers ahead; the consumer holds one buffer at a time and gives it back
 *   when it asks for the next, so there is one lock round-trip per buffer.
 *   Without threads the same fill functions run in the caller's thread.
 *
 *   Hashing is shared out: neither the compressed chunks nor the decompressed
 *   buffers are hashed where they are made.  Whichever thread would otherwise
 *   wait does it -- the consumer while it waits for data, the producer while
 *   the ring is full -- in order, one thread per stream at a time.  A fast
 *   consumer (digest only) thus takes both hashes and leaves the producer
 *   only reading and decompressing; a slow one (writing files) leaves them to
 *   the producer.  Plain tar is hashed once (digest == DiffID).
 *   Measured (CPU seconds per thread, digest of a 512 MiB tar of /usr files,
 *   2 CPUs): with the DiffID hash fixed in the producer, zstd 0.95 producer /
 *   0.01 consumer and gzip 1.29 / 0.01; fixed in the consumer, zstd 0.60 /
 *   0.31 and gzip 0.84 / 0.31; shared as above, zstd 0.61 / 0.38 and gzip
 *   0.80 / 0.40 (the consumer also takes part of the compressed-side hash;
 *   all on a busy machine), and with a consumer that sleeps between reads
 *   the producer takes over the hashing.  One thread alone: zstd 0.95, gzip
 *   1.28.  The buffer
 *   sizes (64 KiB - 1 MiB input chunks, 256 KiB - 4 MiB buffers, 3-32 deep)
 *   made no difference beyond noise; 4 x 1 MiB + 4 x 256 KiB keeps it small.
 *
 *   A producer blocked in read() on a pipe is woken through an eventfd when
 *   the consumer gives up (lfs_src_free), so freeing never hangs.
 *
 * Writing side
 *   lfs_sink_write copies into staging buffers of SINK_BUF_CAP bytes.  With
 *   threads a worker thread compresses, hashes and writes full buffers, so
 *   the tar writer (reading files) overlaps with compression; the writer
 *   hashes each buffer (DiffID) as it hands it over.  zstd also uses
 *   libzstd's own workers (ZSTD_c_nbWorkers).  The encoder is always fed
 *   whole SINK_BUF_CAP pieces, so its output does not depend on how the
 *   caller cut its writes nor on the thread setting (except zstd, see below).
 *
 *   gzip encoders, CPU seconds for 100 MB of a tar of /usr files (one
 *   thread, both hashes included) and output/input size:
 *     ISA-L level 1  0.35 s  0.459      zlib level 1  1.30 s  0.449
 *     ISA-L level 2  0.36 s  0.453      zlib level 4  1.86 s  0.426
 *     ISA-L level 3  0.49 s  0.449      zlib level 6  3.95 s  0.416
 *   (zstd level 1: 0.35 s 0.444, level 3: 0.70 s 0.407.)  So gzip levels 1-3
 *   are ISA-L's levels 1-3, levels 4-9 are zlib's, and the default (level 0)
 *   is ISA-L level 1: nearly four times faster than zlib's fastest level for
 *   an output 2% larger.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <isa-l/igzip_lib.h>
#include <zlib.h>
#include <zstd.h>

#ifndef SRC_RAW_CAP
#define SRC_RAW_CAP  (256u << 10)   /* one chunk of compressed input (one read) */
#endif
#ifndef SRC_RAW_N
#define SRC_RAW_N    4              /* raw chunks in flight (threaded) */
#endif
#ifndef SRC_BUF_CAP
#define SRC_BUF_CAP  (1u << 20)     /* one decompressed buffer */
#endif
#ifndef SRC_NBUF
#define SRC_NBUF     4              /* decompressed buffers in flight (threaded) */
#endif
#define SRC_PEEK     LFS_BLOCK      /* bytes read before detecting the format */
#define SRC_SEEK_READ (8u << 10)    /* seek mode: read at a time, the rest seeked over
                                       (Debian layer scan: 4 KiB 10.0 ms, 8 KiB 10.6,
                                       16 KiB 11.6, 64 KiB 13.9) */

#define SINK_BUF_CAP (1u << 20)     /* staging buffer (uncompressed) */
#define SINK_OUT_CAP (1u << 20)     /* compressed output buffer */
#define SINK_NBUF    4

#define HASH_FD_BUF  (256u << 10)

/* zstd frames may ask for windows up to 2 GiB (zstd --long=31); accept what
 * the reference encoder can produce. */
#define ZSTD_WINDOWLOG_LIMIT 31

/* ------------------------------------------------------------------------ */
/* small helpers                                                             */
/* ------------------------------------------------------------------------ */

static const char *errstr(int e)
{
    const char *s = strerrordesc_np(e);
    return s ? s : "unknown error";
}

static int cpu_count(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* Start a thread with every signal blocked, so signals keep going to the
 * caller's threads (Python handles them in the main thread). */
static int start_thread(pthread_t *th, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    sigfillset(&all);
    int rc = pthread_sigmask(SIG_SETMASK, &all, &old);
    if (rc) return -rc;
    rc = pthread_create(th, NULL, fn, arg);
    int rc2 = pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) return -rc;
    (void)rc2; /* restoring a mask we just read cannot fail */
    return 0;
}

static void copy_error(lfs_error *dst, const lfs_error *src)
{
    if (dst && dst != src) memcpy(dst, src, sizeof *dst);
}

/* A tar header block whose checksum matches (unsigned or historic signed sum). */
static int tar_header_valid(const unsigned char *b)
{
    unsigned long stored = 0;
    int digits = 0;
    for (int i = 148; i < 156; i++) {
        unsigned char c = b[i];
        if (c == ' ' && !digits) continue;
        if (c >= '0' && c <= '7') { stored = stored * 8 + (c - '0'); digits++; continue; }
        if (c == 0 || c == ' ') break;
        return 0;
    }
    if (!digits) return 0;
    unsigned long usum = 0;
    long ssum = 0;
    for (int i = 0; i < LFS_BLOCK; i++) {
        unsigned char c = (i >= 148 && i < 156) ? ' ' : b[i];
        usum += c;
        ssum += (signed char)c;
    }
    return stored == usum || (long)stored == ssum;
}

static const char *other_compression(const unsigned char *b, size_t n)
{
    static const struct { const char *name; const char *magic; size_t len; } tab[] = {
        { "xz", "\xfd" "7zXZ\0", 6 },
        { "bzip2", "BZh", 3 },
        { "lz4", "\x04\x22\x4d\x18", 4 },
        { "lz4 (legacy)", "\x02\x21\x4c\x18", 4 },
        { "lzip", "LZIP", 4 },
        { "lzop", "\x89LZO\0", 5 },
        { "compress (.Z)", "\x1f\x9d", 2 },
    };
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
        if (n >= tab[i].len && memcmp(b, tab[i].magic, tab[i].len) == 0) return tab[i].name;
    return NULL;
}

static int detect(const unsigned char *b, size_t n, const char **other)
{
    *other = NULL;
    if (n >= 2 && b[0] == 0x1f && b[1] == 0x8b) return LFS_COMP_GZIP;
    if (n >= 4 && b[0] == 0x28 && b[1] == 0xb5 && b[2] == 0x2f && b[3] == 0xfd) return LFS_COMP_ZSTD;
    /* a zstd stream may start with a skippable frame (magic 0x184D2A5?) */
    if (n >= 4 && (b[0] & 0xf0) == 0x50 && b[1] == 0x2a && b[2] == 0x4d && b[3] == 0x18)
        return LFS_COMP_ZSTD;
    if (n >= LFS_BLOCK && tar_header_valid(b)) return LFS_COMP_NONE;
    *other = other_compression(b, n);
    return LFS_COMP_NONE;
}

/* ------------------------------------------------------------------------ */
/* reading side                                                              */
/* ------------------------------------------------------------------------ */

enum { GZ_BETWEEN, GZ_MEMBER };

/*
 * Threaded mode bookkeeping (counters under mu):
 *   Raw chunk k (compressed input, one read) lives in raw[k % SRC_RAW_N].
 *   raw_read chunks have been read by the producer, raw_hashed of them
 *   hashed.  The producer reads chunk k only once chunk k - SRC_RAW_N is
 *   hashed (it has finished decoding it long before).
 *   Tar buffer j lives in buf[j % SRC_NBUF].  tar_filled buffers have been
 *   filled by the producer, tar_hashed hashed, tar_released given back by the
 *   consumer (which holds buffer tar_released while it reads it).  Buffer j
 *   is refilled only once buffer j - SRC_NBUF is both hashed and released.
 *   Hashing only reads a buffer, so it runs alongside decoding (raw) or
 *   alongside the consumer (tar).  One thread at a time hashes each stream
 *   (raw_busy, tar_busy), in order.
 */
struct lfs_src {
    int fd;
    int comp;                     /* LFS_COMP_* in use */
    int threaded;
    int no_hash;                  /* LFS_SRC_NO_HASH: no digests */
    int seek;                     /* LFS_SRC_SEEK in force: plain regular file, skips seek */
    uint64_t seek_len;            /* seek: bytes of the file from where reading began */

    /* ---- producer (the producer thread, or the caller's thread) ---- */
    unsigned char *raw[SRC_RAW_N];
    size_t raw_len[SRC_RAW_N];
    const unsigned char *in;      /* current raw chunk: in[in_pos..in_len) not yet decoded */
    size_t in_pos, in_len;
    int in_eof;
    uint64_t raw_size;            /* bytes read from fd */
    uint64_t produced;            /* decompressed bytes produced */
    struct inflate_state *gz;
    int gz_state;
    uint64_t gz_members;
    uint64_t gz_member_off;       /* compressed offset of the current member */
    ZSTD_DCtx *zd;
    size_t zret;                  /* last ZSTD_decompressStream result (0: frame complete) */
    int pend_rc;                  /* error to report after the bytes already produced */
    lfs_error pend_err;
    int wake_fd;                  /* eventfd: wakes a producer waiting on a pipe */
    int stop;                     /* atomic: the consumer gave up */

    /* ---- shared ---- */
    lfs_sha256 h_raw;             /* digest: every byte read (compressed input only) */
    lfs_sha256 h_tar;             /* DiffID; for plain input also the digest */
    uint64_t raw_read, raw_hashed;
    int raw_busy;
    unsigned char *buf[SRC_NBUF];
    size_t len[SRC_NBUF];
    uint64_t tar_filled, tar_hashed, tar_released;
    int tar_busy;
    int p_done;                   /* producer finished: nothing more will be filled */
    int p_rc;                     /* 0 clean end, <0 error described by p_err */
    lfs_error p_err;
    int sync_init;
    pthread_mutex_t mu;
    pthread_cond_t cv;            /* any change of the shared state */
    pthread_t th;
    int th_started;

    /* ---- consumer ---- */
    const unsigned char *cur;
    size_t cur_pos, cur_len;
    int holding;
    uint64_t consumed;
    int finished;
    lfs_digests result;
};

static uint64_t raw_offset(const lfs_src *s)
{
    return s->raw_size - (s->in_len - s->in_pos);
}

/* Seek mode: bytes of the file not yet read or seeked over (raw_size counts both). */
static uint64_t seek_left(const lfs_src *s)
{
    return s->seek_len > s->raw_size ? s->seek_len - s->raw_size : 0;
}

static int stopped(lfs_src *s)
{
    return __atomic_load_n(&s->stop, __ATOMIC_ACQUIRE);
}

/* Threaded mode, mu held: hash the next raw chunk or tar buffer if one is
 * waiting and nobody is hashing that stream.  Returns 1 if it did. */
static int hash_step(lfs_src *s)
{
    lfs_sha256 *h;
    const unsigned char *p;
    size_t n;
    int *busy;
    uint64_t *seq;
    if (!s->raw_busy && s->raw_hashed < s->raw_read) {
        unsigned i = (unsigned)(s->raw_hashed % SRC_RAW_N);
        h = &s->h_raw, p = s->raw[i], n = s->raw_len[i], busy = &s->raw_busy, seq = &s->raw_hashed;
    } else if (!s->tar_busy && s->tar_hashed < s->tar_filled) {
        unsigned i = (unsigned)(s->tar_hashed % SRC_NBUF);
        h = &s->h_tar, p = s->buf[i], n = s->len[i], busy = &s->tar_busy, seq = &s->tar_hashed;
    } else {
        return 0;
    }
    *busy = 1;
    pthread_mutex_unlock(&s->mu);
    if (!s->no_hash) lfs_sha256_update(h, p, n);
    pthread_mutex_lock(&s->mu);
    *busy = 0;
    ++*seq;
    pthread_cond_broadcast(&s->cv);
    return 1;
}

/* read(2) with EINTR/EAGAIN handling; for pipes and sockets with a producer
 * thread, waits in poll() together with the wake eventfd. */
static ssize_t src_read_fd(lfs_src *s, void *buf, size_t n, lfs_error *err)
{
    for (;;) {
        if (stopped(s))
            return lfs_fail(err, ECANCELED, -1, "", NULL, "reading stopped");
        if (s->wake_fd >= 0) {
            struct pollfd pf[2] = { { s->fd, POLLIN, 0 }, { s->wake_fd, POLLIN, 0 } };
            if (poll(pf, 2, -1) < 0) {
                int e = errno;
                if (e == EINTR) continue;
                return lfs_fail(err, e, -1, "", NULL, "poll: %s", errstr(e));
            }
            if (pf[1].revents) continue;    /* woken: re-check stop */
        }
        ssize_t r = read(s->fd, buf, n);
        if (r >= 0) return r;
        int e = errno;
        if (e == EINTR) continue;
        if (e == EAGAIN || e == EWOULDBLOCK) {   /* non-blocking fd: wait for data */
            struct pollfd pf = { s->fd, POLLIN, 0 };
            if (s->wake_fd < 0 && poll(&pf, 1, -1) < 0 && errno != EINTR) {
                e = errno;
                return lfs_fail(err, e, -1, "", NULL, "poll: %s", errstr(e));
            }
            continue;
        }
        return lfs_fail(err, e, -1, "", NULL, "read failed at offset %llu: %s",
                        (unsigned long long)s->raw_size, errstr(e));
    }
}

/* Read the next raw chunk (compressed input).  Called when the current one is
 * fully decoded.  Returns bytes read, 0 at end of input, <0 error. */
static ssize_t src_refill(lfs_src *s, lfs_error *err)
{
    if (s->in_eof) return 0;
    if (s->in_pos < s->in_len)     /* the decoders always take all the input they are given */
        return lfs_fail(err, EIO, -1, "", NULL, "decoder made no progress");
    uint64_t k = s->raw_read;      /* only the producer changes raw_read */
    unsigned i = s->threaded ? (unsigned)(k % SRC_RAW_N) : 0;
    if (s->threaded) {
        pthread_mutex_lock(&s->mu);
        while (s->raw_hashed + SRC_RAW_N <= k && !stopped(s))
            if (!hash_step(s)) pthread_cond_wait(&s->cv, &s->mu);
        pthread_mutex_unlock(&s->mu);
    }
    ssize_t r = src_read_fd(s, s->raw[i], SRC_RAW_CAP, err);
    if (r < 0) return r;
    if (r == 0) { s->in_eof = 1; return 0; }
    s->in = s->raw[i];
    s->in_pos = 0;
    s->in_len = (size_t)r;
    s->raw_size += (uint64_t)r;
    if (s->threaded) {
        pthread_mutex_lock(&s->mu);
        s->raw_len[i] = (size_t)r;
        s->raw_read++;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    } else {
        lfs_sha256_update(&s->h_raw, s->raw[i], (size_t)r);
        s->raw_read++;
        s->raw_hashed++;
    }
    return r;
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int gz_error(lfs_src *s, int ret, lfs_error *err)
{
    const char *what;
    uint64_t off = raw_offset(s);
    int64_t at = (int64_t)s->produced;
    switch (ret) {
    case ISAL_INVALID_WRAPPER:
    case ISAL_UNSUPPORTED_METHOD:
        return lfs_fail(err, EINVAL, at, "", NULL,
                        "invalid gzip header (member at compressed offset %llu)",
                        (unsigned long long)s->gz_member_off);
    case ISAL_INCORRECT_CHECKSUM:
        if (!s->gz->wrapper_flag)
            return lfs_fail(err, EINVAL, at, "", NULL,
                            "invalid gzip header: header CRC mismatch (member at compressed offset %llu)",
                            (unsigned long long)s->gz_member_off);
        if (s->gz->next_in >= s->in + 8) {
            /* the trailer is the 8 bytes just taken from this chunk */
            const unsigned char *t = s->gz->next_in - 8;
            uint32_t crc = le32(t), isize = le32(t + 4);
            if (crc != s->gz->crc)
                return lfs_fail(err, EINVAL, at, "", NULL,
                                "gzip CRC32 mismatch at compressed offset %llu (stored %08x, computed %08x)",
                                (unsigned long long)(off - 8), crc, s->gz->crc);
            if (isize != s->gz->total_out)
                return lfs_fail(err, EINVAL, at, "", NULL,
                                "gzip ISIZE mismatch at compressed offset %llu (stored %u, actual %u)",
                                (unsigned long long)(off - 4), isize, s->gz->total_out);
        }
        return lfs_fail(err, EINVAL, at, "", NULL,
                        "gzip CRC32/ISIZE mismatch in the member trailer before compressed offset %llu",
                        (unsigned long long)off);
    case ISAL_INVALID_BLOCK: what = "invalid deflate block"; break;
    case ISAL_INVALID_SYMBOL: what = "invalid deflate symbol"; break;
    case ISAL_INVALID_LOOKBACK: what = "invalid deflate back-reference distance"; break;
    case ISAL_NEED_DICT: what = "deflate stream needs a preset dictionary"; break;
    default: what = "deflate decoding error"; break;
    }
    return lfs_fail(err, EINVAL, at, "", NULL, "corrupt gzip data: %s near compressed offset %llu",
                    what, (unsigned long long)off);
}

/* The fill functions decompress into out[0..cap) and set *np to the bytes
 * produced (< cap only at the end of the stream or with an error).  They
 * return 0, or <0 with err filled. */

static int fill_gzip(lfs_src *s, unsigned char *out, size_t cap, size_t *np, lfs_error *err)
{
    size_t n = 0;
    int rc = 0;
    while (n < cap) {
        if (stopped(s)) {
            rc = lfs_fail(err, ECANCELED, -1, "", NULL, "reading stopped");
            break;
        }
        if (s->gz_state == GZ_BETWEEN) {
            if (s->in_pos == s->in_len) {
                ssize_t r = src_refill(s, err);
                if (r < 0) { rc = (int)r; break; }
                if (r == 0) {
                    if (!s->gz_members)
                        rc = lfs_fail(err, EINVAL, 0, "", NULL, "truncated gzip stream: empty input");
                    break;      /* else the clean end after the last member */
                }
                continue;
            }
            const unsigned char *b = s->in + s->in_pos;
            if (b[0] != 0x1f || (s->in_len - s->in_pos >= 2 && b[1] != 0x8b)) {
                if (s->gz_members)
                    rc = lfs_fail(err, EINVAL, (int64_t)s->produced, "", NULL,
                                  "trailing garbage after the last gzip member at compressed offset %llu",
                                  (unsigned long long)raw_offset(s));
                else
                    rc = lfs_fail(err, EINVAL, 0, "", NULL,
                                  "invalid gzip header (no gzip magic) at compressed offset %llu",
                                  (unsigned long long)raw_offset(s));
                break;
            }
            isal_inflate_reset(s->gz);
            s->gz->crc_flag = ISAL_GZIP;     /* parse the header, check CRC32 and ISIZE */
            s->gz_member_off = raw_offset(s);
            s->gz_state = GZ_MEMBER;
        }
        s->gz->next_in = (uint8_t *)(s->in + s->in_pos);
        s->gz->avail_in = (uint32_t)(s->in_len - s->in_pos);
        s->gz->next_out = out + n;
        s->gz->avail_out = (uint32_t)(cap - n);
        int ret = isal_inflate(s->gz);
        size_t got = (size_t)(s->gz->next_out - (out + n));
        size_t used = (size_t)(s->gz->next_in - (s->in + s->in_pos));
        n += got;
        s->produced += got;
        s->in_pos += used;
        if (ret < 0) { rc = gz_error(s, ret, err); break; }
        if (s->gz->block_state == ISAL_BLOCK_FINISH) {
            s->gz_members++;
            s->gz_state = GZ_BETWEEN;
            continue;
        }
        if (got == 0 && used == 0 && n < cap) {
            ssize_t r = src_refill(s, err);
            if (r < 0) { rc = (int)r; break; }
            if (r == 0) {
                rc = lfs_fail(err, EINVAL, (int64_t)s->produced, "", NULL,
                              "truncated gzip stream: unexpected end of input at compressed offset %llu",
                              (unsigned long long)s->raw_size);
                break;
            }
        }
    }
    *np = n;
    return rc;
}

static int fill_zstd(lfs_src *s, unsigned char *out, size_t cap, size_t *np, lfs_error *err)
{
    ZSTD_outBuffer ob = { out, cap, 0 };
    int rc = 0;
    while (ob.pos < cap) {
        if (stopped(s)) {
            rc = lfs_fail(err, ECANCELED, -1, "", NULL, "reading stopped");
            break;
        }
        ZSTD_inBuffer ib = { s->in, s->in_len, s->in_pos };
        size_t before = ob.pos;
        size_t r = ZSTD_decompressStream(s->zd, &ob, &ib);
        size_t used = ib.pos - s->in_pos;
        s->in_pos = ib.pos;
        s->produced += ob.pos - before;
        if (ZSTD_isError(r)) {
            rc = lfs_fail(err, EINVAL, (int64_t)s->produced, "", NULL,
                          "corrupt zstd data near compressed offset %llu: %s",
                          (unsigned long long)raw_offset(s), ZSTD_getErrorName(r));
            break;
        }
        if (ob.pos != before || used != 0) {
            s->zret = r;
        } else {    /* no progress: needs input (a call without progress only repeats a hint) */
            ssize_t rr = src_refill(s, err);
            if (rr < 0) { rc = (int)rr; break; }
            if (rr == 0) {
                if (s->zret != 0)
                    rc = lfs_fail(err, EINVAL, (int64_t)s->produced, "", NULL,
                                  "truncated zstd stream: unexpected end of input at compressed offset %llu",
                                  (unsigned long long)s->raw_size);
                break;      /* else every frame is complete: the clean end */
            }
        }
    }
    *np = ob.pos;
    return rc;
}

/* Plain tar: read straight into the output buffer. */
static int fill_plain(lfs_src *s, unsigned char *out, size_t cap, size_t *np, lfs_error *err)
{
    size_t n = 0;
    int rc = 0;
    if (s->in_pos < s->in_len) {     /* bytes read while detecting the format */
        n = s->in_len - s->in_pos;
        if (n > cap) n = cap;
        memcpy(out, s->in + s->in_pos, n);
        s->in_pos += n;
    }
    while (n < cap && !s->in_eof) {
        ssize_t r = src_read_fd(s, out + n, cap - n, err);
        if (r < 0) { rc = (int)r; break; }
        if (r == 0) { s->in_eof = 1; break; }
        s->raw_size += (uint64_t)r;
        n += (size_t)r;
    }
    s->produced += n;
    *np = n;
    return rc;
}

/* Produce the next buffer of decompressed bytes.  Returns bytes (>0), 0 at
 * the clean end, <0 error (err filled).  Bytes produced before an error are
 * returned first, the error on the next call. */
static ssize_t src_fill(lfs_src *s, unsigned char *out, size_t cap, lfs_error *err)
{
    if (!s->pend_rc) {
        size_t n = 0;
        int rc;
        s->pend_err.offset = -1;
        switch (s->comp) {
        case LFS_COMP_GZIP: rc = fill_gzip(s, out, cap, &n, &s->pend_err); break;
        case LFS_COMP_ZSTD: rc = fill_zstd(s, out, cap, &n, &s->pend_err); break;
        default: rc = fill_plain(s, out, cap, &n, &s->pend_err); break;
        }
        if (rc < 0) s->pend_rc = rc;
        if (n > 0) return (ssize_t)n;
        if (!rc) return 0;
    }
    copy_error(err, &s->pend_err);
    return s->pend_rc;
}

static void *src_producer(void *arg)
{
    lfs_src *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        uint64_t j = s->tar_filled;
        /* buffer j reuses j - SRC_NBUF: it must be hashed and released */
        while (j >= SRC_NBUF && (s->tar_hashed + SRC_NBUF <= j || s->tar_released + SRC_NBUF <= j)
               && !stopped(s))
            if (!hash_step(s)) pthread_cond_wait(&s->cv, &s->mu);
        if (stopped(s)) {
            s->p_done = 1;
            s->p_rc = lfs_fail(&s->p_err, ECANCELED, -1, "", NULL, "reading stopped");
            break;
        }
        pthread_mutex_unlock(&s->mu);
        unsigned i = (unsigned)(j % SRC_NBUF);
        ssize_t n = src_fill(s, s->buf[i], SRC_BUF_CAP, &s->p_err);
        pthread_mutex_lock(&s->mu);
        if (n <= 0) {
            s->p_done = 1;
            s->p_rc = (int)n;
            break;
        }
        s->len[i] = (size_t)n;
        s->tar_filled++;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static int src_surface(lfs_src *s, lfs_error *err)
{
    if (s->p_rc < 0) {
        copy_error(err, &s->p_err);
        return s->p_rc;
    }
    return 0;
}

/* Make the next decompressed buffer current.  1: got one, 0: end, <0 error. */
static int src_next(lfs_src *s, lfs_error *err)
{
    s->cur_pos = s->cur_len = 0;
    if (!s->threaded) {
        if (s->p_done) return src_surface(s, err);
        ssize_t n = src_fill(s, s->buf[0], s->seek ? SRC_SEEK_READ : SRC_BUF_CAP, &s->p_err);
        if (n <= 0) {
            s->p_done = 1;
            s->p_rc = (int)n;
            return src_surface(s, err);
        }
        s->cur = s->buf[0];
        s->cur_len = (size_t)n;
        if (!s->no_hash) lfs_sha256_update(&s->h_tar, s->cur, s->cur_len);
        s->tar_filled++;
        s->tar_hashed++;
        return 1;
    }
    pthread_mutex_lock(&s->mu);
    if (s->holding) {
        s->tar_released++;
        s->holding = 0;
        pthread_cond_broadcast(&s->cv);
    }
    /* while waiting for data, take over the hashing */
    while (s->tar_released == s->tar_filled && !s->p_done)
        if (!hash_step(s)) pthread_cond_wait(&s->cv, &s->mu);
    if (s->tar_released == s->tar_filled) {
        pthread_mutex_unlock(&s->mu);
        return src_surface(s, err);
    }
    unsigned i = (unsigned)(s->tar_released % SRC_NBUF);
    s->cur = s->buf[i];
    s->cur_len = s->len[i];
    s->holding = 1;
    pthread_mutex_unlock(&s->mu);
    return 1;
}

ssize_t lfs_src_chunk(lfs_src *s, const unsigned char **p, size_t max, lfs_error *err)
{
    if (max == 0) return 0;
    if (s->cur_pos == s->cur_len) {
        int r = src_next(s, err);
        if (r <= 0) return r;
    }
    size_t n = s->cur_len - s->cur_pos;
    if (n > max) n = max;
    if (n > SSIZE_MAX) n = SSIZE_MAX;
    *p = s->cur + s->cur_pos;
    s->cur_pos += n;
    s->consumed += n;
    return (ssize_t)n;
}

ssize_t lfs_src_read(lfs_src *s, void *buf, size_t n, lfs_error *err)
{
    if (n > SSIZE_MAX) n = SSIZE_MAX;
    size_t got = 0;
    while (got < n) {
        const unsigned char *p;
        ssize_t r = lfs_src_chunk(s, &p, n - got, err);
        if (r < 0) return r;
        if (r == 0) break;
        memcpy((unsigned char *)buf + got, p, (size_t)r);
        got += (size_t)r;
    }
    return (ssize_t)got;
}

ssize_t lfs_src_skip(lfs_src *s, uint64_t n, lfs_error *err)
{
    uint64_t done = 0;
    if (s->seek) {
        /* what is already in memory: the current buffer, then the format peek */
        size_t k = s->cur_len - s->cur_pos;
        if (k > n) k = (size_t)n;
        s->cur_pos += k;
        done += k;
        if (done < n && s->in_pos < s->in_len) {
            k = s->in_len - s->in_pos;
            if (k > n - done) k = (size_t)(n - done);
            s->in_pos += k;
            s->produced += k;
            done += k;
        }
        uint64_t rest = n - done, left = seek_left(s);
        if (rest > left) rest = left;
        if (rest > 0) {
            if (rest > (uint64_t)INT64_MAX || lseek(s->fd, (off_t)rest, SEEK_CUR) < 0) {
                int e = rest > (uint64_t)INT64_MAX ? EOVERFLOW : errno;
                return lfs_fail(err, e, -1, "", NULL, "seek failed at offset %llu: %s",
                                (unsigned long long)s->raw_size, errstr(e));
            }
            s->raw_size += rest;
            s->produced += rest;
            done += rest;
        }
        s->consumed += done;
        if (done < n && seek_left(s) == 0) s->in_eof = 1;
        return (ssize_t)(done > (uint64_t)SSIZE_MAX ? SSIZE_MAX : done);
    }
    while (done < n) {
        const unsigned char *p;
        uint64_t want = n - done;
        ssize_t r = lfs_src_chunk(s, &p, want > SIZE_MAX ? SIZE_MAX : (size_t)want, err);
        if (r < 0) return r;
        if (r == 0) break;
        done += (uint64_t)r;
    }
    return (ssize_t)(done > (uint64_t)SSIZE_MAX ? SSIZE_MAX : done);
}

uint64_t lfs_src_offset(const lfs_src *s)
{
    return s->consumed;
}

int lfs_src_finish(lfs_src *s, lfs_digests *out, lfs_error *err)
{
    if (!s->finished && s->seek) {
        /* nothing to hash: what is left of the file is only counted */
        uint64_t left = seek_left(s);
        s->produced += (s->in_len - s->in_pos) + left;
        s->raw_size += left;
        s->in_pos = s->in_len;
        s->in_eof = 1;
    }
    if (!s->finished) {
        for (;;) {
            const unsigned char *p;
            ssize_t r = lfs_src_chunk(s, &p, SRC_BUF_CAP, err);
            if (r < 0) return (int)r;
            if (r == 0) break;
        }
        if (s->threaded) {
            /* the producer is done; hash what is left */
            pthread_mutex_lock(&s->mu);
            while (s->raw_hashed < s->raw_read || s->tar_hashed < s->tar_filled)
                if (!hash_step(s)) pthread_cond_wait(&s->cv, &s->mu);
            pthread_mutex_unlock(&s->mu);
        }
        memset(&s->result, 0, sizeof s->result);
        if (!s->no_hash) {
            lfs_sha256_final(&s->h_tar, s->result.diff_id);
            if (s->comp == LFS_COMP_NONE)
                memcpy(s->result.digest, s->result.diff_id, 32);
            else
                lfs_sha256_final(&s->h_raw, s->result.digest);
        }
        s->result.compressed_size = s->raw_size;
        s->result.tar_size = s->produced;
        s->result.compression = s->comp;
        s->finished = 1;
    }
    if (out) *out = s->result;
    return 0;
}

static int src_init_decoder(lfs_src *s, lfs_error *err)
{
    if (s->comp == LFS_COMP_GZIP) {
        s->gz = malloc(sizeof *s->gz);
        if (!s->gz) return lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory");
        isal_inflate_init(s->gz);
        s->gz_state = GZ_BETWEEN;
    } else if (s->comp == LFS_COMP_ZSTD) {
        s->zd = ZSTD_createDCtx();
        if (!s->zd) return lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory (zstd context)");
        size_t r = ZSTD_DCtx_setParameter(s->zd, ZSTD_d_windowLogMax, ZSTD_WINDOWLOG_LIMIT);
        if (ZSTD_isError(r))
            return lfs_fail(err, EINVAL, -1, "", NULL, "zstd: %s", ZSTD_getErrorName(r));
        s->zret = 1;    /* no frame seen yet: empty input is truncated */
    }
    return 0;
}

int lfs_src_open(lfs_src **out, int fd, int compression, int threads, lfs_error *err)
{
    return lfs_src_open_ex(out, fd, compression, threads, 0, err);
}

int lfs_src_open_ex(lfs_src **out, int fd, int compression, int threads, unsigned flags,
                    lfs_error *err)
{
    *out = NULL;
    if (compression != LFS_COMP_AUTO && compression != LFS_COMP_NONE &&
        compression != LFS_COMP_GZIP && compression != LFS_COMP_ZSTD)
        return lfs_fail(err, EINVAL, -1, "", NULL, "unknown compression %d", compression);
    lfs_src *s = calloc(1, sizeof *s);
    if (!s) return lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory");
    s->fd = fd;
    s->wake_fd = -1;
    s->no_hash = (flags & LFS_SRC_NO_HASH) != 0;
    int rc;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        rc = lfs_fail(err, e, -1, "", NULL, "fstat: %s", errstr(e));
        goto fail;
    }
    off_t start = -1;
    if ((flags & LFS_SRC_SEEK) && S_ISREG(st.st_mode) && (start = lseek(fd, 0, SEEK_CUR)) >= 0)
        s->seek_len = st.st_size > start ? (uint64_t)(st.st_size - start) : 0;
    else
        start = -1;
    if (S_ISREG(st.st_mode)) (void)posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    if ((rc = lfs_sha256_init(&s->h_raw)) || (rc = lfs_sha256_init(&s->h_tar))) {
        rc = lfs_fail(err, -rc, -1, "", NULL, "sha256 init failed");
        goto fail;
    }
    s->threaded = threads >= 2 || (threads == 0 && cpu_count() >= 2);
    for (unsigned i = 0; i < (s->threaded ? SRC_RAW_N : 1u); i++) {
        s->raw[i] = malloc(SRC_RAW_CAP);
        if (!s->raw[i]) { rc = lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory"); goto fail; }
    }
    for (unsigned i = 0; i < (s->threaded ? SRC_NBUF : 1u); i++) {
        s->buf[i] = malloc(SRC_BUF_CAP);
        if (!s->buf[i]) { rc = lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory"); goto fail; }
    }

    /* the first bytes: raw chunk 0 (hashed as compressed input, or copied
     * into the first tar buffer for plain input) */
    s->comp = compression;
    s->in = s->raw[0];
    if (compression != LFS_COMP_NONE) {
        while (s->in_len < SRC_PEEK && !s->in_eof) {
            ssize_t r = src_read_fd(s, s->raw[0] + s->in_len, SRC_RAW_CAP - s->in_len, err);
            if (r < 0) { rc = (int)r; goto fail; }
            if (r == 0) s->in_eof = 1;
            s->in_len += (size_t)r;
            s->raw_size += (uint64_t)r;
        }
    }
    if (compression == LFS_COMP_AUTO) {
        const char *other;
        s->comp = detect(s->in, s->in_len, &other);
        if (other) {
            rc = lfs_fail(err, ENOTSUP, 0, "", NULL, "unsupported compression: %s", other);
            goto fail;
        }
    }
    if (start >= 0 && s->comp == LFS_COMP_NONE) {
        s->seek = 1;            /* skips seek: read in this thread, no read-ahead */
        s->threaded = 0;
    }
    if (s->comp != LFS_COMP_NONE && s->in_len) {
        s->raw_len[0] = s->in_len;
        s->raw_read = 1;
        if (!s->threaded) {
            if (!s->no_hash) lfs_sha256_update(&s->h_raw, s->raw[0], s->in_len);
            s->raw_hashed = 1;
        }
    }
    rc = src_init_decoder(s, err);
    if (rc) goto fail;

    if (s->threaded) {
        if (!S_ISREG(st.st_mode)) {
            s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
            if (s->wake_fd < 0) {
                int e = errno;
                rc = lfs_fail(err, e, -1, "", NULL, "eventfd: %s", errstr(e));
                goto fail;
            }
        }
        if ((rc = pthread_mutex_init(&s->mu, NULL)) != 0) {
            rc = lfs_fail(err, rc, -1, "", NULL, "pthread_mutex_init: %s", errstr(rc));
            goto fail;
        }
        if ((rc = pthread_cond_init(&s->cv, NULL)) != 0) {
            pthread_mutex_destroy(&s->mu);
            rc = lfs_fail(err, rc, -1, "", NULL, "pthread_cond_init: %s", errstr(rc));
            goto fail;
        }
        s->sync_init = 1;
        rc = start_thread(&s->th, src_producer, s);
        if (rc) { rc = lfs_fail(err, -rc, -1, "", NULL, "pthread_create: %s", errstr(-rc)); goto fail; }
        s->th_started = 1;
    }
    *out = s;
    return 0;
fail:
    lfs_src_free(s);
    return rc < 0 ? rc : -EIO;
}

void lfs_src_free(lfs_src *s)
{
    if (!s) return;
    if (s->th_started) {
        pthread_mutex_lock(&s->mu);
        __atomic_store_n(&s->stop, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        if (s->wake_fd >= 0) {
            uint64_t one = 1;
            /* fails only when the counter is already signalled */
            if (write(s->wake_fd, &one, sizeof one) < 0) { /* nothing to do */ }
        }
        pthread_join(s->th, NULL);
    }
    if (s->sync_init) {
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
    }
    if (s->wake_fd >= 0) close(s->wake_fd);
    for (unsigned i = 0; i < SRC_NBUF; i++) free(s->buf[i]);
    for (unsigned i = 0; i < SRC_RAW_N; i++) free(s->raw[i]);
    free(s->gz);
    ZSTD_freeDCtx(s->zd);
    lfs_sha256_free(&s->h_raw);
    lfs_sha256_free(&s->h_tar);
    free(s);
}

/* ------------------------------------------------------------------------ */
/* writing side                                                              */
/* ------------------------------------------------------------------------ */

enum { ENC_NONE, ENC_ISAL, ENC_ZLIB, ENC_ZSTD };

struct lfs_sink {
    int fd;
    int comp;
    int enc;
    lfs_sha256 h_tar, h_out;
    uint64_t tar_size, out_size;

    struct isal_zstream *isal;
    unsigned char *isal_lvl;
    z_stream *zs;
    int zs_init;
    ZSTD_CCtx *zc;
    unsigned char *out;           /* compressed output buffer */

    /* staging (the writer's side) */
    unsigned char *stage;         /* current buffer being filled */
    size_t stage_len;
    int failed;                   /* sticky error in the writer's thread */
    lfs_error fail_err;
    int finished;
    lfs_digests result;

    /* worker thread */
    int threaded;
    unsigned char *buf[SINK_NBUF];
    size_t len[SINK_NBUF];
    unsigned head, count, cur;    /* ring: [head, head+count) queued for the worker */
    int closing;                  /* writer: the last buffer is queued */
    int abort;                    /* writer gave up: worker exits */
    int w_done;                   /* worker finished (all queued data or error) */
    int w_rc;
    lfs_error w_err;
    int sync_init;
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_free;
    pthread_t th;
    int th_started;
};

static int sink_emit(lfs_sink *s, const unsigned char *p, size_t n, lfs_error *err)
{
    if (!n) return 0;
    if (s->enc != ENC_NONE) lfs_sha256_update(&s->h_out, p, n);   /* plain: digest == DiffID */
    s->out_size += n;
    while (n) {
        ssize_t w = write(s->fd, p, n);
        if (w < 0) {
            int e = errno;
            if (e == EINTR) continue;
            if (e == EAGAIN || e == EWOULDBLOCK) {
                struct pollfd pf = { s->fd, POLLOUT, 0 };
                if (poll(&pf, 1, -1) < 0 && errno != EINTR) {
                    e = errno;
                    return lfs_fail(err, e, -1, "", NULL, "poll: %s", errstr(e));
                }
                continue;
            }
            return lfs_fail(err, e, -1, "", NULL, "write failed at output offset %llu: %s",
                            (unsigned long long)(s->out_size - n), errstr(e));
        }
        if (w == 0)
            return lfs_fail(err, EIO, -1, "", NULL, "write returned 0 at output offset %llu",
                            (unsigned long long)(s->out_size - n));
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Compress p[0..n) (tar bytes, already hashed) and write the output; with
 * last != 0 also end the stream. */
static int sink_process(lfs_sink *s, const unsigned char *p, size_t n, int last, lfs_error *err)
{
    int rc;
    switch (s->enc) {
    case ENC_NONE:
        return sink_emit(s, p, n, err);
    case ENC_ISAL: {
        struct isal_zstream *z = s->isal;
        z->next_in = (uint8_t *)p;
        z->avail_in = (uint32_t)n;
        z->end_of_stream = (uint16_t)(last ? 1 : 0);
        do {
            z->next_out = s->out;
            z->avail_out = SINK_OUT_CAP;
            int r = isal_deflate(z);
            if (r != COMP_OK)
                return lfs_fail(err, EIO, -1, "", NULL, "gzip (isa-l) compression failed (%d)", r);
            if ((rc = sink_emit(s, s->out, SINK_OUT_CAP - z->avail_out, err))) return rc;
        } while (z->avail_in > 0 || z->avail_out == 0 ||
                 (last && z->internal_state.state != ZSTATE_END));
        return 0;
    }
    case ENC_ZLIB: {
        z_stream *z = s->zs;
        z->next_in = (Bytef *)p;
        z->avail_in = (uInt)n;
        int flush = last ? Z_FINISH : Z_NO_FLUSH;
        for (;;) {
            z->next_out = s->out;
            z->avail_out = SINK_OUT_CAP;
            int r = deflate(z, flush);
            if (r == Z_STREAM_ERROR)
                return lfs_fail(err, EIO, -1, "", NULL, "gzip (zlib) compression failed");
            if ((rc = sink_emit(s, s->out, SINK_OUT_CAP - z->avail_out, err))) return rc;
            if (last ? r == Z_STREAM_END : (z->avail_in == 0 && z->avail_out != 0)) break;
        }
        return 0;
    }
    case ENC_ZSTD: {
        ZSTD_inBuffer ib = { p, n, 0 };
        ZSTD_EndDirective mode = last ? ZSTD_e_end : ZSTD_e_continue;
        for (;;) {
            ZSTD_outBuffer ob = { s->out, SINK_OUT_CAP, 0 };
            size_t r = ZSTD_compressStream2(s->zc, &ob, &ib, mode);
            if (ZSTD_isError(r))
                return lfs_fail(err, EIO, -1, "", NULL, "zstd compression failed: %s", ZSTD_getErrorName(r));
            if ((rc = sink_emit(s, s->out, ob.pos, err))) return rc;
            if (last ? r == 0 : ib.pos == ib.size) break;
        }
        return 0;
    }
    }
    return lfs_fail(err, EINVAL, -1, "", NULL, "bad encoder");
}

static void *sink_worker(void *arg)
{
    lfs_sink *s = arg;
    int rc = 0;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->count == 0 && !s->closing && !s->abort)
            pthread_cond_wait(&s->cv_work, &s->mu);
        if (s->abort) break;
        if (s->count == 0) {           /* closing and everything queued is done */
            pthread_mutex_unlock(&s->mu);
            if (!rc) rc = sink_process(s, NULL, 0, 1, &s->w_err);
            pthread_mutex_lock(&s->mu);
            break;
        }
        unsigned idx = s->head;
        pthread_mutex_unlock(&s->mu);
        if (!rc) rc = sink_process(s, s->buf[idx], s->len[idx], 0, &s->w_err);
        pthread_mutex_lock(&s->mu);
        s->head = (s->head + 1) % SINK_NBUF;
        s->count--;
        if (rc && !s->w_rc) s->w_rc = rc;
        pthread_cond_signal(&s->cv_free);
    }
    s->w_rc = rc ? rc : s->w_rc;
    s->w_done = 1;
    pthread_cond_broadcast(&s->cv_free);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int lfs_sink_open(lfs_sink **out, int fd, int compression, int level, int threads, lfs_error *err)
{
    *out = NULL;
    if (compression != LFS_COMP_NONE && compression != LFS_COMP_GZIP && compression != LFS_COMP_ZSTD)
        return lfs_fail(err, EINVAL, -1, "", NULL, "unknown compression %d", compression);
    lfs_sink *s = calloc(1, sizeof *s);
    if (!s) return lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory");
    s->fd = fd;
    s->comp = compression;
    int rc = lfs_sha256_init(&s->h_tar);
    if (!rc) rc = lfs_sha256_init(&s->h_out);
    if (rc) { rc = lfs_fail(err, -rc, -1, "", NULL, "sha256 init failed"); goto fail; }
    int ncpu = cpu_count();

    if (compression == LFS_COMP_GZIP) {
        if (level < 0 || level > 9) {
            rc = lfs_fail(err, EINVAL, -1, "", NULL, "gzip level %d out of range 1-9", level);
            goto fail;
        }
        if (level == 0) level = 1;
        if (level <= ISAL_DEF_MAX_LEVEL) {
            s->enc = ENC_ISAL;
            static const uint32_t lvl_size[] = {
                ISAL_DEF_LVL0_DEFAULT, ISAL_DEF_LVL1_DEFAULT, ISAL_DEF_LVL2_DEFAULT, ISAL_DEF_LVL3_DEFAULT
            };
            s->isal = calloc(1, sizeof *s->isal);
            if (!s->isal) { rc = lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory"); goto fail; }
            isal_deflate_init(s->isal);
            s->isal->level = (uint32_t)level;
            s->isal->level_buf_size = lvl_size[level];
            if (lvl_size[level]) {
                s->isal_lvl = malloc(lvl_size[level]);
                if (!s->isal_lvl) { rc = lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory"); goto fail; }
            }
            s->isal->level_buf = s->isal_lvl;
            s->isal->gzip_flag = IGZIP_GZIP;
        } else {
            s->enc = ENC_ZLIB;
            s->zs = calloc(1, sizeof *s->zs);
            if (!s->zs) { rc = lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory"); goto fail; }
            int r = deflateInit2(s->zs, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);
            if (r != Z_OK) { rc = lfs_fail(err, r == Z_MEM_ERROR ? ENOMEM : EINVAL, -1, "", NULL, "deflateInit2 failed (%d)", r); goto fail; }
            s->zs_init = 1;
        }
    } else if (compression == LFS_COMP_ZSTD) {
        s->enc = ENC_ZSTD;
        if (level == 0) level = 3;
        if (level > ZSTD_maxCLevel() || level < ZSTD_minCLevel()) {
            rc = lfs_fail(err, EINVAL, -1, "", NULL, "zstd level %d out of range %d..%d",
                          level, ZSTD_minCLevel(), ZSTD_maxCLevel());
            goto fail;
        }
        s->zc = ZSTD_createCCtx();
        if (!s->zc) { rc = lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory (zstd context)"); goto fail; }
        /* libzstd's output is the same for every nbWorkers >= 1 and differs
         * with 0 (single-threaded mode).  threads 1 keeps everything in the
         * caller's thread; the default uses workers even on one CPU, so that
         * it gives the same bytes on every machine. */
        int workers = threads == 0 ? ncpu : threads == 1 ? 0 : threads;
        size_t r = ZSTD_CCtx_setParameter(s->zc, ZSTD_c_compressionLevel, level);
        if (!ZSTD_isError(r)) r = ZSTD_CCtx_setParameter(s->zc, ZSTD_c_checksumFlag, 1);
        if (ZSTD_isError(r)) { rc = lfs_fail(err, EINVAL, -1, "", NULL, "zstd: %s", ZSTD_getErrorName(r)); goto fail; }
        /* fails only with a libzstd built without threads: then single-threaded */
        if (workers) (void)ZSTD_CCtx_setParameter(s->zc, ZSTD_c_nbWorkers, workers);
    } else {
        s->enc = ENC_NONE;
    }
    if (s->enc != ENC_NONE) {
        s->out = malloc(SINK_OUT_CAP);
        if (!s->out) { rc = lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory"); goto fail; }
    }

    s->threaded = threads >= 2 || (threads == 0 && ncpu >= 2);
    unsigned nbuf = s->threaded ? SINK_NBUF : 1;
    for (unsigned i = 0; i < nbuf; i++) {
        s->buf[i] = malloc(SINK_BUF_CAP);
        if (!s->buf[i]) { rc = lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory"); goto fail; }
    }
    s->stage = s->buf[0];
    s->cur = 0;
    if (s->threaded) {
        if ((rc = pthread_mutex_init(&s->mu, NULL)) != 0) {
            rc = lfs_fail(err, rc, -1, "", NULL, "pthread_mutex_init: %s", errstr(rc));
            goto fail;
        }
        if ((rc = pthread_cond_init(&s->cv_work, NULL)) != 0) {
            pthread_mutex_destroy(&s->mu);
            rc = lfs_fail(err, rc, -1, "", NULL, "pthread_cond_init: %s", errstr(rc));
            goto fail;
        }
        if ((rc = pthread_cond_init(&s->cv_free, NULL)) != 0) {
            pthread_cond_destroy(&s->cv_work);
            pthread_mutex_destroy(&s->mu);
            rc = lfs_fail(err, rc, -1, "", NULL, "pthread_cond_init: %s", errstr(rc));
            goto fail;
        }
        s->sync_init = 1;
        rc = start_thread(&s->th, sink_worker, s);
        if (rc) { rc = lfs_fail(err, -rc, -1, "", NULL, "pthread_create: %s", errstr(-rc)); goto fail; }
        s->th_started = 1;
    }
    *out = s;
    return 0;
fail:
    lfs_sink_free(s);
    return rc < 0 ? rc : -EIO;
}

static int sink_fail(lfs_sink *s, int rc, lfs_error *err)
{
    s->failed = rc;
    copy_error(err, &s->fail_err);
    return rc;
}

/* Hand the full staging buffer on: hash it, then process it here or queue it. */
static int sink_flush_stage(lfs_sink *s, lfs_error *err)
{
    if (!s->stage_len) return 0;
    lfs_sha256_update(&s->h_tar, s->stage, s->stage_len);
    if (!s->threaded) {
        int rc = sink_process(s, s->stage, s->stage_len, 0, &s->fail_err);
        s->stage_len = 0;
        return rc ? sink_fail(s, rc, err) : 0;
    }
    pthread_mutex_lock(&s->mu);
    s->len[s->cur] = s->stage_len;
    s->count++;
    pthread_cond_signal(&s->cv_work);
    while (s->count == SINK_NBUF && !s->w_done && !s->w_rc)
        pthread_cond_wait(&s->cv_free, &s->mu);
    int rc = s->w_rc;
    if (rc) copy_error(&s->fail_err, &s->w_err);
    s->cur = (s->head + s->count) % SINK_NBUF;
    pthread_mutex_unlock(&s->mu);
    s->stage = s->buf[s->cur];
    s->stage_len = 0;
    return rc ? sink_fail(s, rc, err) : 0;
}

int lfs_sink_write(lfs_sink *s, const void *p, size_t n, lfs_error *err)
{
    if (s->failed) { copy_error(err, &s->fail_err); return s->failed; }
    if (s->finished) return lfs_fail(err, EINVAL, -1, "", NULL, "write after finish");
    const unsigned char *b = p;
    s->tar_size += n;
    while (n) {
        if (!s->threaded && s->stage_len == 0 && n >= SINK_BUF_CAP) {
            /* a whole buffer's worth and nothing staged: process it in place
             * (the encoder still sees the same SINK_BUF_CAP pieces, so the
             * output does not depend on how the caller cut its writes) */
            lfs_sha256_update(&s->h_tar, b, SINK_BUF_CAP);
            int rc = sink_process(s, b, SINK_BUF_CAP, 0, &s->fail_err);
            if (rc) return sink_fail(s, rc, err);
            b += SINK_BUF_CAP;
            n -= SINK_BUF_CAP;
            continue;
        }
        size_t room = SINK_BUF_CAP - s->stage_len;
        size_t k = n < room ? n : room;
        memcpy(s->stage + s->stage_len, b, k);
        s->stage_len += k;
        b += k;
        n -= k;
        if (s->stage_len == SINK_BUF_CAP) {
            int rc = sink_flush_stage(s, err);
            if (rc) return rc;
        }
    }
    return 0;
}

int lfs_sink_finish(lfs_sink *s, lfs_digests *out, lfs_error *err)
{
    if (s->failed) { copy_error(err, &s->fail_err); return s->failed; }
    if (!s->finished) {
        int rc = sink_flush_stage(s, err);
        if (rc) return rc;
        if (!s->threaded) {
            rc = sink_process(s, NULL, 0, 1, &s->fail_err);
            if (rc) return sink_fail(s, rc, err);
        } else {
            pthread_mutex_lock(&s->mu);
            s->closing = 1;
            pthread_cond_signal(&s->cv_work);
            while (!s->w_done)
                pthread_cond_wait(&s->cv_free, &s->mu);
            rc = s->w_rc;
            if (rc) copy_error(&s->fail_err, &s->w_err);
            pthread_mutex_unlock(&s->mu);
            pthread_join(s->th, NULL);
            s->th_started = 0;
            if (rc) return sink_fail(s, rc, err);
        }
        memset(&s->result, 0, sizeof s->result);
        lfs_sha256_final(&s->h_tar, s->result.diff_id);
        if (s->enc == ENC_NONE)
            memcpy(s->result.digest, s->result.diff_id, 32);
        else
            lfs_sha256_final(&s->h_out, s->result.digest);
        s->result.tar_size = s->tar_size;
        s->result.compressed_size = s->out_size;
        s->result.compression = s->comp;
        s->finished = 1;
    }
    if (out) *out = s->result;
    return 0;
}

void lfs_sink_free(lfs_sink *s)
{
    if (!s) return;
    if (s->th_started) {
        pthread_mutex_lock(&s->mu);
        s->abort = 1;
        pthread_cond_signal(&s->cv_work);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->th, NULL);
    }
    if (s->sync_init) {
        pthread_cond_destroy(&s->cv_free);
        pthread_cond_destroy(&s->cv_work);
        pthread_mutex_destroy(&s->mu);
    }
    for (unsigned i = 0; i < SINK_NBUF; i++) free(s->buf[i]);
    free(s->out);
    free(s->isal);
    free(s->isal_lvl);
    if (s->zs_init) deflateEnd(s->zs);
    free(s->zs);
    ZSTD_freeCCtx(s->zc);
    lfs_sha256_free(&s->h_tar);
    lfs_sha256_free(&s->h_out);
    free(s);
}

/* ------------------------------------------------------------------------ */
/* whole-stream helpers                                                      */
/* ------------------------------------------------------------------------ */

int lfs_digest_stream(int in_fd, int compression, lfs_digests *out, lfs_error *err)
{
    lfs_src *s;
    int rc = lfs_src_open(&s, in_fd, compression, 0, err);
    if (rc) return rc;
    rc = lfs_src_finish(s, out, err);
    lfs_src_free(s);
    return rc;
}

struct lfs_reader {
    lfs_src *src;
};

int lfs_reader_open(lfs_reader **out, int in_fd, int compression, int hash, lfs_error *err)
{
    *out = NULL;
    lfs_reader *r = calloc(1, sizeof *r);
    if (!r) return lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory");
    int rc = lfs_src_open_ex(&r->src, in_fd, compression, 0, hash ? 0 : LFS_SRC_NO_HASH, err);
    if (rc < 0) {
        free(r);
        return rc;
    }
    *out = r;
    return 0;
}

ssize_t lfs_reader_read(lfs_reader *r, void *buf, size_t n, lfs_error *err)
{
    return lfs_src_read(r->src, buf, n, err);
}

int lfs_reader_finish(lfs_reader *r, lfs_digests *out, lfs_error *err)
{
    return lfs_src_finish(r->src, out, err);
}

void lfs_reader_free(lfs_reader *r)
{
    if (!r) return;
    lfs_src_free(r->src);
    free(r);
}

int lfs_decompress_fd(int in_fd, int out_fd, int compression, lfs_digests *out, lfs_error *err)
{
    lfs_src *s;
    int rc = lfs_src_open(&s, in_fd, compression, 0, err);
    if (rc < 0) return rc;
    uint64_t written = 0;
    for (;;) {
        const unsigned char *p;
        ssize_t n = lfs_src_chunk(s, &p, SRC_BUF_CAP, err);
        if (n < 0) { rc = (int)n; break; }
        if (n == 0) { rc = lfs_src_finish(s, out, err); break; }
        int w = lfs_write_full(out_fd, p, (size_t)n);
        if (w < 0) {
            rc = lfs_fail(err, -w, -1, "", NULL, "cannot write the decompressed stream at byte %llu: %s",
                          (unsigned long long)written, errstr(-w));
            break;
        }
        written += (uint64_t)n;
    }
    lfs_src_free(s);
    return rc;
}

int lfs_sha256_fd(int fd, unsigned char *out32, uint64_t *size, lfs_error *err)
{
    lfs_sha256 h;
    int rc = lfs_sha256_init(&h);
    if (rc) return lfs_fail(err, -rc, -1, "", NULL, "sha256 init failed");
    unsigned char *buf = malloc(HASH_FD_BUF);
    if (!buf) {
        lfs_sha256_free(&h);
        return lfs_fail(err, ENOMEM, -1, "", NULL, "out of memory");
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
        (void)posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    uint64_t total = 0;
    for (;;) {
        ssize_t r = read(fd, buf, HASH_FD_BUF);
        if (r > 0) {
            lfs_sha256_update(&h, buf, (size_t)r);
            total += (uint64_t)r;
            continue;
        }
        if (r == 0) break;
        int e = errno;
        if (e == EINTR) continue;
        if (e == EAGAIN || e == EWOULDBLOCK) {
            struct pollfd pf = { fd, POLLIN, 0 };
            if (poll(&pf, 1, -1) < 0 && errno != EINTR) {
                e = errno;
                rc = lfs_fail(err, e, -1, "", NULL, "poll: %s", errstr(e));
                goto out;
            }
            continue;
        }
        rc = lfs_fail(err, e, -1, "", NULL, "read failed at offset %llu: %s",
                      (unsigned long long)total, errstr(e));
        goto out;
    }
    lfs_sha256_final(&h, out32);
    if (size) *size = total;
    rc = 0;
out:
    free(buf);
    lfs_sha256_free(&h);
    return rc;
}
