/* STUB: replaced by the real implementation. */
#include "internal.h"
#include <errno.h>
int lfs_open_dir_in_root(int r, const char *p, int c, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, p, NULL, "not implemented"); }
int lfs_remove_at(int d, const char *n, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, n, NULL, "not implemented"); }
int lfs_remove_tree(int d, const char *p, lfs_error *e) { return lfs_fail(e, ENOSYS, -1, p, NULL, "not implemented"); }
int lfs_has_openat2(void) { return 0; }
