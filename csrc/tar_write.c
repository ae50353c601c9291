/* STUB: replaced by the real implementation. */
#include "internal.h"
#include <errno.h>
int lfs_create(int r, const lfs_change *c, size_t n, int o, const lfs_create_opts *op, lfs_create_result *res, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, NULL, NULL, "not implemented"); }
