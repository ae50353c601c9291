/* STUB: replaced by the real implementation. */
#include "internal.h"
#include <errno.h>
int lfs_scan(int i, int o, int c, int f, lfs_digests *d, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, NULL, NULL, "not implemented"); }
