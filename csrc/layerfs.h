/*
 * layerfs C core: the public interface.
 *
 * This header is also the cffi cdef (layerfs/_build.py strips the preprocessor
 * lines), so it holds only plain declarations: no includes, no inline code.
 *
 * Conventions
 *   - Every entry point returns 0 on success or a negative errno value, and on
 *     failure fills the caller's lfs_error (errno, path, entry, byte offset,
 *     reason).  Nothing here touches Python objects, so cffi releases the GIL
 *     for the whole call: one call processes a whole archive or a whole tree.
 *   - Paths inside a root are resolved as if the root were "/" (openat2 with
 *     RESOLVE_IN_ROOT); the final component is never followed.
 */
#ifndef LAYERFS_H
#define LAYERFS_H
#include <stdint.h>
#include <stddef.h>

#define LFS_COMP_AUTO -1
#define LFS_COMP_NONE 0
#define LFS_COMP_GZIP 1
#define LFS_COMP_ZSTD 2

#define LFS_WH_APPLY 0      /* delete what a whiteout hides; opaque dirs emptied of lower entries */
#define LFS_WH_OVERLAY 1    /* char 0:0 whiteouts, overlay.opaque=y xattr on opaque dirs */
#define LFS_WH_KEEP 2       /* store .wh. files as they are (AUFS layer directory) */

#define LFS_OWNER_KEEP 0    /* chown to the archive's numeric ids; failure is an error */
#define LFS_OWNER_SKIP 1    /* never chown; counted as a warning when ids differ from ours */
#define LFS_OWNER_MAP 2     /* map ids through uid_map/gid_map; unmapped ids are an error */

#define LFS_ERR_MSG 512
#define LFS_PATH_MAX 4096

typedef struct lfs_error {
    int code;                     /* positive errno */
    int64_t offset;               /* byte offset in the (uncompressed) tar stream, or -1 */
    char path[4096];              /* file concerned: filesystem path or archive name */
    char entry[4096];             /* archive entry name, or "" */
    char message[512];            /* the reason, in words */
} lfs_error;

typedef struct lfs_digests {
    unsigned char digest[32];     /* sha256 of the bytes as read/written (compressed blob) */
    unsigned char diff_id[32];    /* sha256 of the uncompressed tar stream */
    uint64_t compressed_size;     /* bytes of the blob */
    uint64_t tar_size;            /* bytes of the uncompressed tar stream */
    int compression;              /* LFS_COMP_* actually used/detected */
} lfs_digests;

typedef struct lfs_idmap {
    uint32_t inner;               /* first id inside the layer */
    uint32_t outer;               /* first id on the host */
    uint32_t count;
} lfs_idmap;

typedef struct lfs_apply_opts {
    int compression;              /* LFS_COMP_AUTO detects by magic */
    int whiteouts;                /* LFS_WH_* */
    int overlay_user_xattr;       /* overlay mode: user.overlay.opaque instead of trusted. */
    int owners;                   /* LFS_OWNER_* */
    const lfs_idmap *uid_map;
    size_t uid_map_len;
    const lfs_idmap *gid_map;
    size_t gid_map_len;
    int skip_devices;             /* do not mknod char/block devices; warn instead */
    int no_xattrs;                /* do not set any xattr; warn when one is dropped */
    int threads;                  /* 0 auto, 1 single thread, 2 decompress+hash in a second thread */
    uint64_t max_entries;         /* 0: default 10,000,000 */
    uint64_t max_pax_size;        /* 0: default 1 MiB per PAX/GNU long header */
    uint64_t max_xattrs_size;     /* 0: default 1 MiB per entry */
    int record;                   /* write a tar-split record of the layer to record_fd */
    int record_fd;                /* (see lfs_reassemble); used only when record != 0 */
} lfs_apply_opts;

typedef struct lfs_apply_result {
    lfs_digests digests;
    uint64_t entries;             /* tar entries processed */
    uint64_t whiteouts;           /* whiteouts and opaque markers processed */
    uint64_t warnings;            /* owners/devices/xattrs skipped under the unprivileged options */
    char first_warning[512];
    uint64_t record_size;         /* bytes written to record_fd (opts->record) */
} lfs_apply_result;

/* Apply the layer read from in_fd onto the directory root_fd. */
int lfs_apply(int in_fd, int root_fd, const lfs_apply_opts *opts,
              lfs_apply_result *res, lfs_error *err);

/* Hash a layer stream: digest of the bytes, DiffID of the decompressed tar. */
int lfs_digest_stream(int in_fd, int compression, lfs_digests *out, lfs_error *err);

/* Decompress the stream read from in_fd (gzip, zstd or plain, as detected or
 * given) into out_fd, decompressing in a second thread while writing; out gets
 * the digests (of the bytes read and of what was written). */
int lfs_decompress_fd(int in_fd, int out_fd, int compression, lfs_digests *out, lfs_error *err);

/* A decompressed stream read piece by piece (decompression runs ahead in a
 * second thread).  hash: 0 computes no digests (finish gives zeros).  read:
 * bytes copied into buf, 0 at the end, <0 error.  finish: reads what is left
 * and gives the digests.  free: also when unfinished (the thread is stopped). */
typedef struct lfs_reader lfs_reader;
int lfs_reader_open(lfs_reader **out, int in_fd, int compression, int hash, lfs_error *err);
ssize_t lfs_reader_read(lfs_reader *r, void *buf, size_t n, lfs_error *err);
int lfs_reader_finish(lfs_reader *r, lfs_digests *out, lfs_error *err);
void lfs_reader_free(lfs_reader *r);

/* Tar bytes written piece by piece to fd, compressed (LFS_COMP_NONE, _GZIP:
 * level 1-3 with ISA-L, 4-9 with zlib, 0 for 1; _ZSTD: 0 for 3), in a second
 * thread when threads is 0 on a machine with two CPUs or more (or threads >= 2).
 * The output depends only on the bytes, the compression and the level (and,
 * for zstd, on whether threads is 1: then no zstd workers).
 * finish: flushes and gives the digests (of the bytes written to fd, and the
 * DiffID of the tar); free: also when unfinished. */
typedef struct lfs_sink lfs_sink;
int lfs_sink_open(lfs_sink **out, int fd, int compression, int level, int threads, lfs_error *err);
int lfs_sink_write(lfs_sink *s, const void *p, size_t n, lfs_error *err);
int lfs_sink_finish(lfs_sink *s, lfs_digests *out, lfs_error *err);
void lfs_sink_free(lfs_sink *s);

/* sha256 of everything readable from fd. */
int lfs_sha256_fd(int fd, unsigned char *out32, uint64_t *size, lfs_error *err);

/* ---- writing layers ---- */

#define LFS_SRC_PLAIN 0             /* source tree has no whiteouts of its own (or AUFS .wh. files, copied as they are) */
#define LFS_SRC_OVERLAY 1           /* source is an overlay upper dir: char 0:0 -> .wh.NAME, opaque xattr -> .wh..wh..opq */

#define LFS_CHANGE_PATH 0           /* write the filesystem entry at path (not recursive) */
#define LFS_CHANGE_DELETE 1         /* write a whiteout .wh.NAME for path */
#define LFS_CHANGE_OPAQUE 2         /* write path/.wh..wh..opq */

typedef struct lfs_change {
    const char *path;             /* relative to root, no leading "/" or "./" */
    int kind;                     /* LFS_CHANGE_* */
} lfs_change;

typedef struct lfs_create_opts {
    int compression;              /* LFS_COMP_NONE/GZIP/ZSTD */
    int level;                    /* 0: library default */
    int threads;                  /* compression workers; 0 auto */
    int source;                   /* LFS_SRC_* */
    int overlay_user_xattr;       /* LFS_SRC_OVERLAY reads user.overlay.opaque */
    int sparse;                   /* detect holes and write PAX GNU.sparse 1.0 entries */
    int clamp_mtime;              /* clamp mtimes to source_date_epoch */
    int64_t source_date_epoch;
    int no_xattrs;
} lfs_create_opts;

typedef struct lfs_create_result {
    lfs_digests digests;
    uint64_t entries;
} lfs_create_result;

/* Write a layer tar of the tree under root_fd (changes == NULL: the whole tree,
 * sorted) or of exactly the listed changes (sorted into tar order here), to out_fd. */
int lfs_create(int root_fd, const lfs_change *changes, size_t nchanges, int out_fd,
               const lfs_create_opts *opts, lfs_create_result *res, lfs_error *err);

/* ---- copying ---- */

#define LFS_COPY_NO_OWNER 1         /* do not chown */
#define LFS_COPY_NO_XATTRS 2        /* do not copy xattrs */
#define LFS_COPY_NO_REFLINK 4       /* share no blocks: no FICLONE, no copy_file_range */

typedef struct lfs_copy_stats {
    uint64_t files;
    uint64_t dirs;
    uint64_t bytes;
    uint64_t reflinked;
    uint64_t hardlinks;
} lfs_copy_stats;

/* Copy one non-directory entry (regular file with holes, symlink, device, fifo)
 * keeping mode, owner, xattrs and times.  dst must not exist. */
int lfs_copy_file(int src_dirfd, const char *src, int dst_dirfd, const char *dst,
                  int flags, lfs_copy_stats *stats, lfs_error *err);

/* Copy the tree src_dirfd/src to dst_dirfd/dst (dst must not exist), keeping
 * hardlinks, metadata and holes; directory times are set after their children. */
int lfs_copy_tree(int src_dirfd, const char *src, int dst_dirfd, const char *dst,
                  int flags, lfs_copy_stats *stats, lfs_error *err);

/* Remove the tree dirfd/path without following symlinks (rm -rf). */
int lfs_remove_tree(int dirfd, const char *path, lfs_error *err);

/* ---- listing a layer without extracting ---- */

#define LFS_SCAN_HASH 1             /* compute sha256 of each regular file's content */
#define LFS_SCAN_DATA_OFFSET 2      /* records end with the entry's data offset (below) */
#define LFS_SCAN_HASH_SPARSE 4      /* compute sha256 of sparse regular files' content */
#define LFS_SCAN_NO_STREAM_HASH 8   /* no digest of the whole stream (*out's are zeros); an
                                       uncompressed regular file is then read only where
                                       needed, the rest seeked over */

/* Parse the layer on in_fd and write one binary record per entry to out_fd
 * (normally a pipe read by Python).  Record layout, little-endian, packed:
 *   uint32 reclen                  bytes that follow in this record
 *   uint8  type                    '0' '1' '2' '3' '4' '5' '6' (as lfs_entry.type)
 *   uint8  has_digest
 *   uint16 reserved (0)
 *   uint32 mode, uid, gid
 *   int64  size                    file size (realsize for sparse files)
 *   int64  mtime_sec
 *   int32  mtime_nsec
 *   uint32 devmajor, devminor
 *   int64  header_offset
 *   uint8  digest[32]              sha256 of the content (zeros unless has_digest)
 *   uint32 path_len, link_len, nxattrs, nsparse
 *   path bytes, link bytes
 *   nxattrs x (uint32 name_len, uint32 value_len, name bytes, value bytes)
 *   nsparse x (int64 offset, int64 length)
 *   [int64 data_offset]            with LFS_SCAN_DATA_OFFSET: offset in the uncompressed
 *                                  stream of a non-sparse regular file's first data
 *                                  byte (its data is then size contiguous bytes); -1
 *                                  for other entries
 * Digests of the whole stream go to *out. */
int lfs_scan(int in_fd, int out_fd, int compression, int flags,
             lfs_digests *out, lfs_error *err);

/* Byte ranges of two files read with pread (e.g. file contents inside two
 * uncompressed layers, at their LFS_SCAN_DATA_OFFSET offsets), on `threads`
 * threads (0: 2).  jobs holds n x (off_a, len_a, off_b, len_b); an offset < 0
 * (or fd -1) means no range on that side.  result[i]: LFS_RANGE_SAME when both
 * ranges are there, as long, and hold the same bytes; otherwise the sha256 of
 * each range that could be read goes to digests[64 i] (a) and digests[64 i +
 * 32] (b), flagged by LFS_RANGE_DIGEST_A / _B. */
#define LFS_RANGE_SAME 1
#define LFS_RANGE_DIGEST_A 2
#define LFS_RANGE_DIGEST_B 4
int lfs_ranges_compare(int fd_a, int fd_b, const int64_t *jobs, size_t n, unsigned threads,
                       unsigned char *result, unsigned char *digests, lfs_error *err);

/* Two uncompressed layer files, read headers only (data seeked over): every
 * pair of non-sparse regular files with the same name (leading "./" and "/"
 * stripped; names that need more normalising are left out; the last of a name
 * in a) and the same size, compared as by lfs_ranges_compare.  out->jobs holds
 * out->n x (off_a, len_a, off_b, len_b), out->result and out->digests as there.
 * Free with lfs_pairs_free (also after an error). */
typedef struct lfs_pairs {
    int64_t *jobs;
    unsigned char *result;
    unsigned char *digests;
    size_t n;
} lfs_pairs;
int lfs_layers_prematch(int fd_a, int fd_b, unsigned threads, lfs_pairs *out, lfs_error *err);
void lfs_pairs_free(lfs_pairs *p);

int lfs_has_openat2(void);

/* ---- tar-split records (csrc/tarsplit.c) ----
 * lfs_apply with opts->record writes a record of the layer's tar stream: every
 * byte that is not the content of a file it wrote (headers, extension headers,
 * padding, end blocks, trailing bytes, content that went nowhere or that the
 * layer itself replaced or removed later), and for the rest the path of the file
 * holding it.  With the unpacked files, lfs_reassemble rebuilds the tar stream
 * bit for bit (same DiffID).  The record must stay a regular file to be read. */

typedef struct lfs_record_info {
    unsigned char diff_id[32];    /* sha256 of the tar stream the record rebuilds */
    uint64_t tar_size;            /* its size in bytes */
    uint64_t files;               /* file contents read from the tree */
    uint64_t captured;            /* of those, kept in the record (replaced in the layer) */
    uint64_t kept_bytes;          /* tar bytes kept in the record (not counting captured) */
    uint64_t record_size;         /* bytes of the record */
} lfs_record_info;

/* Rebuild the tar stream of record_fd (a regular file, read from its current
 * offset to its end) from the files beneath root_fd, writing it to out_fd (-1:
 * only check).  Files are opened in the root without following symlinks; one
 * whose type, size or content differs is an error naming it (ESTALE), as is a
 * stream whose sha256 differs from the recorded DiffID (EILSEQ) -- out_fd then
 * received bytes that must be discarded.  A damaged record is EBADMSG. */
int lfs_reassemble(int record_fd, int root_fd, int out_fd, lfs_digests *out, lfs_error *err);

/* Read and check the trailer of the record on record_fd (from its current offset). */
int lfs_record_read_info(int record_fd, lfs_record_info *out, lfs_error *err);
/* ---- end of tar-split records ---- */

/* ---- union filesystem (csrc/union.c; FUSE, libfuse3 low-level API) ----
 * AUFS-format layer directories (whiteouts are .wh.NAME files, opaque
 * directories hold .wh..wh..opq) served as one merged tree on a mount point. */

typedef struct lfs_union_opts {
    int writable;                 /* layers[0] is the writable branch (copy-up target) */
    const char *workdir;          /* writable: directory on layers[0]'s filesystem for copy-up
                                     temporaries, emptied at start; NULL: temporaries go beside
                                     their target under .wh..wh. names (never visible) */
    int daemonize;                /* fork once the mount is up: the caller gets 0 at once and
                                     the child serves until the mount goes away */
    int debug;                    /* libfuse request trace on stderr (foreground only) */
    int no_passthrough;           /* never hand files to the kernel (FUSE passthrough, Linux
                                     >= 6.9, root): every read and write goes through the server */
    double entry_timeout;         /* seconds the kernel may cache names; < 0: default
                                     (read-only: 86400, writable: 1) */
    double attr_timeout;          /* seconds the kernel may cache attributes; < 0: as above */
    unsigned max_threads;         /* request threads; 0: default (8) */
    const char *fsname;           /* mount source shown in mountinfo; NULL: "layerfs" */
} lfs_union_opts;

/* Mount the union of layers (top first) on mountpoint and serve it until it is
 * unmounted (umount, fusermount3 -u) or the process gets SIGTERM/SIGINT/SIGHUP.
 * ready_fd (or -1) receives one line: "ok PID\n" once the kernel has the mount
 * working (PID: the serving process), or "error ERRNO MESSAGE\n" if it failed;
 * then it is closed.  With opts->daemonize the caller returns 0 as soon as the
 * serving child is forked; errors found before that are returned (and written).
 * Where the kernel has FUSE passthrough, regular files that will not be copied
 * up (all of them on read-only mounts, the top layer's on writable ones) are
 * read and written by the kernel directly on the backing file. */
int lfs_union_serve(const char *mountpoint, const char *const *layers, size_t nlayers,
                    const lfs_union_opts *opts, int ready_fd, lfs_error *err);
/* ---- end of union filesystem ---- */
/* ---- directory trees for the diff engine (csrc/treescan.c) ---- */

/* Walk the tree at root (not following symlinks) in sorted preorder (each
 * directory's names by strcmp, a directory before its entries; the root first,
 * with an empty path) and write one record per entry to out_fd.  Record
 * layout, little-endian, packed:
 *   uint32 reclen                  bytes that follow in this record
 *   uint8  type                    '0' file '2' symlink '3' char '4' block '5' dir
 *                                  '6' fifo 's' socket
 *   uint8  reserved[3]
 *   uint32 mode (07777), uid, gid, nlink
 *   int64  size                    regular files; 0 otherwise
 *   int64  mtime_sec
 *   uint32 mtime_nsec, devmajor, devminor
 *   uint64 dev, ino
 *   uint32 path_len, link_len, nxattrs, reserved
 *   path bytes (relative to root, no leading "/"), link bytes (symlink target)
 *   nxattrs x (uint32 name_len, uint32 value_len, name bytes, value bytes)
 * Entries that vanish during the walk are left out.  flags: 0. */
int lfs_walk(const char *root, int out_fd, int flags, lfs_error *err);

/* lfs_walk of root, and at the same time, on `threads` worker threads (0: 2),
 * a comparison of each regular file with the regular file at the same path
 * under ref_root: of the same size (but not empty), their bytes are compared
 * (unless both are one inode, or with LFS_WALK_TRUST_MTIME their mtimes are
 * equal with a non-zero nanosecond part), and hashed when they differ; of
 * different sizes, both are hashed.  One more record per comparison, in the
 * same stream, in no particular order (little-endian, packed):
 *   uint32 reclen
 *   uint8  'C'
 *   uint8  same                    1: the same bytes; 0: not (or unreadable)
 *   uint8  has_digests             digests follow (both files read)
 *   uint8  reserved (0)
 *   uint32 path_len
 *   [uint8 digest_ref[32], digest[32]]  sha256 of the ref_root file and of the root file
 *   path bytes (relative, as in the walk record) */
#define LFS_WALK_TRUST_MTIME 1
int lfs_walk_compare(const char *root, const char *ref_root, int out_fd, int flags,
                     unsigned threads, lfs_error *err);

/* paths holds 2n NUL-terminated paths back to back: a0, b0, a1, b1, ...
 * same[i] = 1 when the regular files ai and bi hold the same bytes, else 0
 * (also when one cannot be opened or read).  Each pair stops at its first
 * difference; threads (0: 2) share the pairs. */
int lfs_files_equal(const char *paths, size_t n, unsigned threads, unsigned char *same,
                    lfs_error *err);
/* ---- end of directory trees ---- */
#endif
