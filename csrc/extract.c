/* STUB: replaced by the real implementation. */
#include "internal.h"
#include <errno.h>
int lfs_apply(int in_fd, int root_fd, const lfs_apply_opts *o, lfs_apply_result *r, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, NULL, NULL, "not implemented"); }
