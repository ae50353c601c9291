/*
 * layerfs C core: declarations shared between the C files (never seen by cffi).
 *
 *   common.c   error records, sha256 (OpenSSL), growable strings, hardlink map
 *   stream.c   lfs_src (read fd -> detect/decompress -> hash both sides) and
 *              lfs_sink (tar bytes -> hash -> compress -> hash -> write fd)
 *   tar_read.c lfs_tar: a pull parser for ustar/v7/GNU/PAX over an lfs_src
 *   extract.c  lfs_apply: entries from lfs_tar written beneath a root
 *   fsutil.c   in-root path resolution, tree removal
 *   tar_write.c lfs_create: tar writer over an lfs_sink
 *   copy.c     lfs_copy_file / lfs_copy_tree
 *   scan.c     lfs_scan: entry records of a layer without extracting
 *   tarsplit.c tar-split records written while applying (lfs_rec, used by
 *              extract.c) and the stream rebuilt from them (lfs_reassemble)
 *   treescan.c lfs_walk (sorted directory entries) and lfs_files_equal (diff engine)
 *   union.c    lfs_union_serve: the aufs driver's FUSE union filesystem
 */
#ifndef LAYERFS_INTERNAL_H
#define LAYERFS_INTERNAL_H
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include "layerfs.h"

#define LFS_BLOCK 512

/* ---- errors (common.c) ---- */
/* Fill *err (if not NULL) and return -code.  offset -1 when unknown; path/entry may be NULL. */
int lfs_fail(lfs_error *err, int code, int64_t offset, const char *path,
             const char *entry, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
/* Set only err->entry / err->offset when the error came from a lower layer that
 * did not know them (keeps what is already there). */
void lfs_err_context(lfs_error *err, const char *entry, int64_t offset);

/* ---- sha256 (common.c; OpenSSL, SHA-NI when the CPU has it) ---- */
typedef struct lfs_sha256 { void *ctx; } lfs_sha256;
int lfs_sha256_init(lfs_sha256 *h);
void lfs_sha256_update(lfs_sha256 *h, const void *p, size_t n);
void lfs_sha256_final(lfs_sha256 *h, unsigned char out[32]);
void lfs_sha256_free(lfs_sha256 *h);

/* ---- growable strings (common.c) ----
 * Zero-initialised is empty; p is NUL-terminated once anything was added. */
typedef struct lfs_strbuf {
    char *p;
    size_t len, cap;
} lfs_strbuf;
int lfs_sb_reserve(lfs_strbuf *b, size_t extra);          /* room for extra bytes + NUL */
int lfs_sb_append(lfs_strbuf *b, const void *s, size_t n);
int lfs_sb_set(lfs_strbuf *b, const char *s, size_t n);
void lfs_sb_truncate(lfs_strbuf *b, size_t len);
void lfs_sb_free(lfs_strbuf *b);

/* Run fn(arg) on `threads` threads, the caller's among them (fewer if threads
 * cannot be made), and wait for all: 0, or -1 when any returned non-NULL. */
#define LFS_MAX_WORKERS 16
int lfs_run_workers(void *(*fn)(void *), void *arg, unsigned threads);

/* Keyed hash of names (SipHash-1-3) for hash tables of names an archive
 * chooses: with a key drawn per call, no archive can be made whose names all
 * land in one chain (which would make a table of n names cost n*n). */
typedef struct lfs_hash_key { uint64_t k0, k1; } lfs_hash_key;
void lfs_hash_key_init(lfs_hash_key *k);      /* random (getrandom), per call */
uint64_t lfs_hash_name(const lfs_hash_key *k, const char *s, size_t n);

/* ---- hardlink map: (dev, ino) -> the path first seen (common.c) ----
 * Zero-initialised is empty; lfs_hl_add copies path. */
typedef struct lfs_hl_map {
    struct lfs_hl_slot *slots;
    size_t cap, n;
} lfs_hl_map;
const char *lfs_hl_find(const lfs_hl_map *m, dev_t dev, ino_t ino);
int lfs_hl_add(lfs_hl_map *m, dev_t dev, ino_t ino, const char *path);
void lfs_hl_free(lfs_hl_map *m);

/* ---- reading side (stream.c) ---- */
typedef struct lfs_src lfs_src;
/* compression: LFS_COMP_AUTO detects gzip/zstd/plain by magic.
 * threads >= 2 (or 0 = auto): a second thread reads, hashes and decompresses ahead. */
int lfs_src_open(lfs_src **out, int fd, int compression, int threads, lfs_error *err);
/* Zero-copy read of the decompressed stream: *p points at up to max bytes valid
 * until the next call on s.  Returns bytes (>0), 0 at end of stream, <0 error. */
ssize_t lfs_src_chunk(lfs_src *s, const unsigned char **p, size_t max, lfs_error *err);
/* Copying read: fills buf with exactly n bytes unless the stream ends first.
 * Returns bytes read (short only at end of stream), <0 error. */
ssize_t lfs_src_read(lfs_src *s, void *buf, size_t n, lfs_error *err);
/* lfs_src_open with flags: LFS_SRC_NO_HASH computes no digest (lfs_src_finish
 * gives zeros); LFS_SRC_SEEK, for plain (uncompressed) input on a regular file,
 * makes lfs_src_skip seek over bytes instead of reading them, and reads in the
 * caller's thread. */
#define LFS_SRC_NO_HASH 1u
#define LFS_SRC_SEEK 2u
int lfs_src_open_ex(lfs_src **out, int fd, int compression, int threads, unsigned flags,
                    lfs_error *err);
/* Pass over n bytes of the decompressed stream: bytes skipped (fewer only at
 * the end of the stream), <0 error. */
ssize_t lfs_src_skip(lfs_src *s, uint64_t n, lfs_error *err);
/* Bytes of the decompressed stream consumed so far. */
uint64_t lfs_src_offset(const lfs_src *s);
/* Read to the end (trailing padding counts toward the DiffID), finish both hashes. */
int lfs_src_finish(lfs_src *s, lfs_digests *out, lfs_error *err);
void lfs_src_free(lfs_src *s);

/* ---- writing side (stream.c): lfs_sink, declared in layerfs.h ---- */

/* ---- tar parsing (tar_read.c) ---- */
typedef struct lfs_xattr {
    char *name;                   /* e.g. "security.capability" (from SCHILY.xattr. / LIBARCHIVE.xattr.) */
    unsigned char *value;
    size_t len;
} lfs_xattr;

typedef struct lfs_sparse {
    int64_t offset;               /* where the data segment goes in the file */
    int64_t length;
} lfs_sparse;

#define LFS_T_REG '0'
#define LFS_T_LINK '1'
#define LFS_T_SYMLINK '2'
#define LFS_T_CHR '3'
#define LFS_T_BLK '4'
#define LFS_T_DIR '5'
#define LFS_T_FIFO '6'

typedef struct lfs_entry {
    char *path;                   /* name after PAX/GNU overrides, as in the archive (not normalised) */
    char *linkpath;               /* hardlink/symlink target, "" otherwise */
    char type;                    /* LFS_T_*: '7', '\0' and old-GNU 'S' become '0' */
    uint32_t mode;                /* 07777 bits */
    uint32_t uid, gid;            /* validated: < 2^32 */
    int64_t size;                 /* data bytes that lfs_tar_read will return (sparse: stored segments only) */
    int64_t realsize;             /* size of the file on disk (== size unless sparse) */
    int64_t mtime_sec;
    int32_t mtime_nsec;
    int has_atime;
    int64_t atime_sec;
    int32_t atime_nsec;
    uint32_t devmajor, devminor;
    lfs_xattr *xattrs;
    size_t nxattrs;
    lfs_sparse *sparse;           /* NULL unless sparse; segments sorted, non-overlapping, within realsize */
    size_t nsparse;
    int64_t header_offset;        /* offset of the entry's first header (incl. PAX/GNU long headers) */
} lfs_entry;

typedef struct lfs_tar_limits {
    uint64_t max_entries;         /* 0: default */
    uint64_t max_pax_size;        /* 0: default 1 MiB */
    uint64_t max_xattrs_size;     /* 0: default 1 MiB */
} lfs_tar_limits;

typedef struct lfs_tar lfs_tar;
int lfs_tar_open(lfs_tar **out, lfs_src *src, const lfs_tar_limits *limits, lfs_error *err);
/* Next entry: 1 with *e set (valid until the next call), 0 at end of archive, <0 error.
 * Unread data of the previous entry is skipped. */
int lfs_tar_next(lfs_tar *t, const lfs_entry **e, lfs_error *err);
/* Zero-copy read of the current entry's data (sparse: stored segments back to back,
 * in map order).  Returns bytes (>0), 0 at end of the entry's data, <0 error. */
ssize_t lfs_tar_data(lfs_tar *t, const unsigned char **p, size_t max, lfs_error *err);
void lfs_tar_free(lfs_tar *t);

/* Byte hook: every byte lfs_tar consumes from its lfs_src is reported once, in
 * stream order -- entry data handed out by lfs_tar_data as LFS_TAR_DATA, all
 * else (headers, PAX/GNU extension headers and payloads, sparse maps, padding,
 * data skipped unread, end blocks, and through lfs_tar_drain whatever follows
 * the end of the archive) as LFS_TAR_RAW.  p is valid only during the call. */
#define LFS_TAR_RAW 0
#define LFS_TAR_DATA 1
typedef void (*lfs_tar_hook)(void *arg, int kind, const unsigned char *p, size_t n);
void lfs_tar_set_hook(lfs_tar *t, lfs_tar_hook fn, void *arg);
/* After lfs_tar_next returned 0: consume the rest of the stream (as raw bytes). */
int lfs_tar_drain(lfs_tar *t, lfs_error *err);

/* ---- tar-split records (tarsplit.c) ----
 * lfs_apply with opts->record: lfs_rec receives the byte hook of the parser and
 * is told by the extractor which file each entry's data went to, and before
 * anything is removed or replaced, so that content the layer wrote and later
 * destroyed is kept in the record. */
struct stat;
typedef struct lfs_rec lfs_rec;
/* Start a record on fd; root_fd: where captured content is spooled (O_TMPFILE). */
int lfs_rec_open(lfs_rec **out, int fd, int root_fd, lfs_error *err);
void lfs_rec_hook(void *rec, int kind, const unsigned char *p, size_t n);   /* an lfs_tar_hook */
/* 0, or the first error the hook met (copied to *err). */
int lfs_rec_status(const lfs_rec *r, lfs_error *err);
/* The data of entry e (e->size > 0) is about to be written to the new regular
 * file open on fd, at path[0..len) (normalised, reached without symlinks). */
int lfs_rec_file(lfs_rec *r, int fd, const char *path, size_t len, const lfs_entry *e,
                 lfs_error *err);
/* dirfd/name (st: its lstat, or NULL) is about to be removed or replaced. */
int lfs_rec_removing(lfs_rec *r, int dirfd, const char *name, const struct stat *st,
                     lfs_error *err);
/* After lfs_src_finish: write the rest of the record; *size: bytes written. */
int lfs_rec_finish(lfs_rec *r, const lfs_digests *d, uint64_t *size, lfs_error *err);
void lfs_rec_free(lfs_rec *r);

/* ---- filesystem helpers (fsutil.c) ---- */
/* Open the directory `path` beneath root_fd, resolving as if root_fd were "/"
 * (openat2 RESOLVE_IN_ROOT; a fallback walks component by component with
 * O_NOFOLLOW and resolves symlinks itself inside the root).  With create != 0,
 * missing directories are made (mode 0755). */
int lfs_open_dir_in_root(int root_fd, const char *path, int create, lfs_error *err);
/* The same with the choices made by the caller: use_openat2 (from lfs_has_openat2(),
 * read once per call), and the owner given to directories it makes (uid (uid_t)-1:
 * leave them as made).  Made directories always get mode 0755. */
int lfs_open_dir_in_root_ex(int root_fd, const char *path, int create, int use_openat2,
                            uid_t uid, gid_t gid, lfs_error *err);
/* Open the directory rel[0..len) beneath dfd (len 0: dfd itself, as a new fd)
 * following no symlink and no "..": fd or -errno (ELOOP: a symlink on the way).
 * One openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) call when use_openat2 and
 * the kernel has it, else one O_NOFOLLOW step per component. */
int lfs_open_dir_beneath(int dfd, const char *rel, size_t len, int use_openat2);
/* Open name in dirfd (never following it) with flags.  Without read or search
 * permission on a file of type `type` (S_IFDIR, S_IFREG) that uid owns, it is
 * found without being read (O_PATH), given the mode bits `add` through
 * /proc/self/fd (an O_PATH fd takes no fchmod) and opened; *was gets its mode
 * before.  keep: the bits stay (the caller puts the mode back), else they go at
 * once.  The fd, or -1 with errno (the first failure's when none of that applies). */
int lfs_open_opening_up(int dirfd, const char *name, int flags, int type, mode_t add,
                        uid_t uid, int keep, mode_t *was);
/* rm -rf of dirfd/name, never following symlinks; a missing name is not an error. */
int lfs_remove_at(int dirfd, const char *name, lfs_error *err);
/* write(2) / pwrite(2) all n bytes, retrying on EINTR and short writes: 0 or -errno. */
int lfs_write_full(int fd, const void *buf, size_t n);
int lfs_pwrite_full(int fd, const void *buf, size_t n, off_t off);

#endif
