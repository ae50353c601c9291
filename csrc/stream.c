/* STUB: replaced by the real implementation. */
#include "internal.h"
#include <errno.h>
int lfs_src_open(lfs_src **out, int fd, int c, int t, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, NULL, NULL, "not implemented"); }
ssize_t lfs_src_chunk(lfs_src *s, const unsigned char **p, size_t m, lfs_error *e) { return -ENOSYS; }
ssize_t lfs_src_read(lfs_src *s, void *b, size_t n, lfs_error *e) { return -ENOSYS; }
uint64_t lfs_src_offset(const lfs_src *s) { return 0; }
int lfs_src_finish(lfs_src *s, lfs_digests *o, lfs_error *e) { return -ENOSYS; }
void lfs_src_free(lfs_src *s) {}
int lfs_sink_open(lfs_sink **o, int fd, int c, int l, int t, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, NULL, NULL, "not implemented"); }
int lfs_sink_write(lfs_sink *s, const void *p, size_t n, lfs_error *e) { return -ENOSYS; }
int lfs_sink_finish(lfs_sink *s, lfs_digests *o, lfs_error *e) { return -ENOSYS; }
void lfs_sink_free(lfs_sink *s) {}
int lfs_digest_stream(int fd, int c, lfs_digests *o, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, NULL, NULL, "not implemented"); }
int lfs_sha256_fd(int fd, unsigned char *o, uint64_t *s, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, NULL, NULL, "not implemented"); }
