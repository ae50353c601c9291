/* STUB: replaced by the real implementation. */
#include "internal.h"
#include <errno.h>
int lfs_copy_file(int sd, const char *s, int dd, const char *d, int f, lfs_copy_stats *st, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, s, NULL, "not implemented"); }
int lfs_copy_tree(int sd, const char *s, int dd, const char *d, int f, lfs_copy_stats *st, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, s, NULL, "not implemented"); }
