/* STUB: replaced by the real implementation. */
#include "internal.h"
#include <errno.h>
int lfs_tar_open(lfs_tar **o, lfs_src *s, const lfs_tar_limits *l, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, NULL, NULL, "not implemented"); }
int lfs_tar_next(lfs_tar *t, const lfs_entry **en, lfs_error *e) { return -ENOSYS; }
ssize_t lfs_tar_data(lfs_tar *t, const unsigned char **p, size_t m, lfs_error *e) { return -ENOSYS; }
void lfs_tar_free(lfs_tar *t) {}
