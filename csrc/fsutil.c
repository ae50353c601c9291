/*
 * In-root path resolution and tree removal.
 *
 * lfs_open_dir_in_root resolves a directory path beneath a root fd as if the
 * root were "/": with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) when the
 * kernel has it, otherwise (and whenever missing directories must be made) by a
 * walk that opens one component at a time with O_NOFOLLOW and expands symlinks
 * itself, clamping ".." and absolute targets at the root.
 *
 * lfs_remove_at / lfs_remove_tree remove a tree without following symlinks.
 * The walk is iterative and keeps at most RM_OPEN_MAX directories open; deeper
 * ancestors are closed and re-opened through ".." (checked by device/inode)
 * when the walk climbs back, so any depth works within a small fd budget.
 */
#include "internal.h"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_SYMLINKS 40
#define RM_OPEN_MAX 32
#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_CLOEXEC)

static int sys_openat2(int dirfd, const char *path, int flags, uint64_t resolve)
{
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = (uint64_t)flags;
    how.resolve = resolve;
    for (int tries = 0;; tries++) {
        long r = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
        if (r >= 0) return (int)r;
        /* EAGAIN: a concurrent rename made ".." resolution unsafe; retry. */
        if ((errno == EAGAIN || errno == EINTR) && tries < 64) continue;
        return -errno;
    }
}

int lfs_has_openat2(void)
{
    const char *env = getenv("LAYERFS_NO_OPENAT2");
    if (env && *env && strcmp(env, "0") != 0) return 0;
    int fd = sys_openat2(AT_FDCWD, "/", DIR_FLAGS, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
    if (fd < 0) return 0;
    close(fd);
    return 1;
}

int lfs_open_dir_beneath(int dfd, const char *rel, size_t len, int use_openat2)
{
    char path[LFS_PATH_MAX];
    if (len >= sizeof path) return -ENAMETOOLONG;
    memcpy(path, rel, len);
    path[len] = 0;
    if (use_openat2) {
        int fd = sys_openat2(dfd, len ? path : ".", DIR_FLAGS,
                             RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS);
        if (fd >= 0 || (fd != -ENOSYS && fd != -EPERM)) return fd;
    }
    int fd = openat(dfd, ".", DIR_FLAGS);
    if (fd < 0) return -errno;
    for (char *p = path; *p;) {
        char *s = p;
        while (*p && *p != '/') p++;
        size_t n = (size_t)(p - s);
        if (*p) *p++ = 0;
        if (n == 0 || n > NAME_MAX) {
            close(fd);
            return n ? -ENAMETOOLONG : -EINVAL;
        }
        int nfd = openat(fd, s, DIR_FLAGS | O_NOFOLLOW);
        int er = errno;
        close(fd);
        if (nfd < 0) return -er;
        fd = nfd;
    }
    return fd;
}

/* Give a directory made on the way its fixed mode (umask-independent) and owner. */
static int fix_new_dir(int fd, uid_t uid, gid_t gid)
{
    if (uid != (uid_t)-1 && fchown(fd, uid, gid) < 0) return -errno;
    if (fchmod(fd, 0755) < 0) return -errno;
    return 0;
}

/* Open the symlink-free path `cur` (clen bytes, components separated by '/')
 * beneath root_fd, refusing symlinks on the way. */
static int reopen_plain(int root_fd, const char *cur, size_t clen)
{
    int fd = openat(root_fd, ".", DIR_FLAGS);
    if (fd < 0) return -errno;
    char name[NAME_MAX + 1];
    size_t i = 0;
    while (i < clen) {
        size_t s = i;
        while (i < clen && cur[i] != '/') i++;
        size_t n = i - s;
        if (i < clen) i++;
        if (n == 0) continue;
        if (n > NAME_MAX) { close(fd); return -ENAMETOOLONG; }
        memcpy(name, cur + s, n);
        name[n] = 0;
        int nfd = openat(fd, name, DIR_FLAGS | O_NOFOLLOW);
        int e = errno;
        close(fd);
        if (nfd < 0) return e == ELOOP ? -EAGAIN : -e;
        fd = nfd;
    }
    return fd;
}

/* The component walk: every step is openat(O_NOFOLLOW) on a directory we hold;
 * symlinks are read and their text spliced in front of the remaining path. */
static int walk_in_root(int root_fd, const char *path, int create, uid_t uid, gid_t gid,
                        lfs_error *err)
{
    const size_t cap = 2 * LFS_PATH_MAX + 2;
    char *rem = malloc(cap);              /* path still to resolve: rem[pos..rlen) */
    char *cur = malloc(LFS_PATH_MAX);     /* symlink-free path of fd, for ".." */
    char *lnk = malloc(LFS_PATH_MAX);
    char name[NAME_MAX + 1];
    int fd = -1, rc = 0, links = 0, retries = 0;
    size_t rlen = strlen(path), pos = 0, clen = 0;

    if (!rem || !cur || !lnk) { rc = lfs_fail(err, ENOMEM, -1, path, NULL, "out of memory"); goto out; }
    if (rlen >= LFS_PATH_MAX) { rc = lfs_fail(err, ENAMETOOLONG, -1, path, NULL, "path too long"); goto out; }
    memcpy(rem, path, rlen + 1);
    fd = openat(root_fd, ".", DIR_FLAGS);
    if (fd < 0) { rc = lfs_fail(err, errno, -1, path, NULL, "cannot open the root directory"); goto out; }

    while (pos < rlen) {
        while (pos < rlen && rem[pos] == '/') pos++;
        if (pos >= rlen) break;
        size_t s = pos;
        while (pos < rlen && rem[pos] != '/') pos++;
        size_t n = pos - s;
        if (n == 1 && rem[s] == '.') continue;
        if (n == 2 && rem[s] == '.' && rem[s + 1] == '.') {
            if (clen == 0) continue;                 /* ".." at the root stays there */
            while (clen > 0 && cur[clen - 1] != '/') clen--;
            if (clen > 0) clen--;                    /* drop the separator */
            int nfd = reopen_plain(root_fd, cur, clen);
            if (nfd < 0) {
                rc = lfs_fail(err, -nfd, -1, path, NULL, "cannot re-open a parent directory while resolving");
                goto out;
            }
            close(fd);
            fd = nfd;
            continue;
        }
        if (n > NAME_MAX) { rc = lfs_fail(err, ENAMETOOLONG, -1, path, NULL, "path component too long"); goto out; }
        memcpy(name, rem + s, n);
        name[n] = 0;

        int nfd = openat(fd, name, DIR_FLAGS | O_NOFOLLOW);
        if (nfd >= 0) {
            close(fd);
            fd = nfd;
            if (clen + n + 2 >= LFS_PATH_MAX) { rc = lfs_fail(err, ENAMETOOLONG, -1, path, NULL, "resolved path too long"); goto out; }
            if (clen) cur[clen++] = '/';
            memcpy(cur + clen, name, n);
            clen += n;
            continue;
        }
        int e = errno;
        if (e == ENOENT) {
            if (!create) { rc = lfs_fail(err, ENOENT, -1, path, NULL, "directory '%s' does not exist", name); goto out; }
            if (mkdirat(fd, name, 0700) == 0) {
                nfd = openat(fd, name, DIR_FLAGS | O_NOFOLLOW);
                if (nfd < 0) { rc = lfs_fail(err, errno, -1, path, NULL, "cannot open new directory '%s'", name); goto out; }
                int r = fix_new_dir(nfd, uid, gid);
                if (r < 0) { close(nfd); rc = lfs_fail(err, -r, -1, path, NULL, "cannot set owner/mode of new directory '%s'", name); goto out; }
                close(nfd);
            } else if (errno != EEXIST) {
                rc = lfs_fail(err, errno, -1, path, NULL, "cannot create directory '%s'", name);
                goto out;
            }
            if (++retries > 1000) { rc = lfs_fail(err, EAGAIN, -1, path, NULL, "directory '%s' keeps changing", name); goto out; }
            pos = s;                                 /* open it again */
            continue;
        }
        if (e != ELOOP && e != ENOTDIR) {
            rc = lfs_fail(err, e, -1, path, NULL, "cannot open directory '%s'", name);
            goto out;
        }
        struct stat st;
        if (fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            rc = lfs_fail(err, errno, -1, path, NULL, "cannot stat '%s'", name);
            goto out;
        }
        if (!S_ISLNK(st.st_mode)) {
            rc = lfs_fail(err, ENOTDIR, -1, path, NULL, "'%s' is not a directory", name);
            goto out;
        }
        if (++links > MAX_SYMLINKS) {
            rc = lfs_fail(err, ELOOP, -1, path, NULL, "too many levels of symbolic links");
            goto out;
        }
        ssize_t ll = readlinkat(fd, name, lnk, LFS_PATH_MAX);
        if (ll < 0) { rc = lfs_fail(err, errno, -1, path, NULL, "cannot read symlink '%s'", name); goto out; }
        if (ll >= LFS_PATH_MAX) { rc = lfs_fail(err, ENAMETOOLONG, -1, path, NULL, "symlink '%s' target too long", name); goto out; }
        if (ll == 0) { rc = lfs_fail(err, ENOENT, -1, path, NULL, "symlink '%s' has an empty target", name); goto out; }
        size_t rest = rlen - pos;
        if ((size_t)ll + 1 + rest + 1 > cap) { rc = lfs_fail(err, ENAMETOOLONG, -1, path, NULL, "path too long after symlink expansion"); goto out; }
        memmove(rem + ll + 1, rem + pos, rest + 1);
        memcpy(rem, lnk, (size_t)ll);
        rem[ll] = '/';
        rlen = (size_t)ll + 1 + rest;
        pos = 0;
        if (lnk[0] == '/') {                         /* absolute: from the root */
            nfd = openat(root_fd, ".", DIR_FLAGS);
            if (nfd < 0) { rc = lfs_fail(err, errno, -1, path, NULL, "cannot open the root directory"); goto out; }
            close(fd);
            fd = nfd;
            clen = 0;
        }
    }
    rc = fd;
    fd = -1;
out:
    if (fd >= 0) close(fd);
    free(rem);
    free(cur);
    free(lnk);
    return rc;
}

int lfs_open_dir_in_root_ex(int root_fd, const char *path, int create, int use_openat2,
                            uid_t uid, gid_t gid, lfs_error *err)
{
    if (strlen(path) >= LFS_PATH_MAX)
        return lfs_fail(err, ENAMETOOLONG, -1, path, NULL, "path too long");
    if (use_openat2) {
        const char *p = path;
        while (*p == '/') p++;
        int fd = sys_openat2(root_fd, *p ? p : ".", DIR_FLAGS, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
        if (fd >= 0) return fd;
        if (fd == -ENOENT && create) {
            /* fall through: the walk makes the missing directories */
        } else if (fd == -ENOSYS || fd == -E2BIG || fd == -EPERM) {
            /* openat2 unusable here (old kernel, seccomp): walk instead */
        } else if (fd == -ELOOP) {
            return lfs_fail(err, ELOOP, -1, path, NULL,
                            "too many levels of symbolic links (or a magic link) in the path");
        } else if (fd == -ENOTDIR) {
            return lfs_fail(err, ENOTDIR, -1, path, NULL, "a component of the path is not a directory");
        } else if (fd == -ENOENT) {
            return lfs_fail(err, ENOENT, -1, path, NULL, "directory does not exist");
        } else {
            return lfs_fail(err, -fd, -1, path, NULL, "cannot open directory in root");
        }
    }
    return walk_in_root(root_fd, path, create, uid, gid, err);
}

int lfs_open_dir_in_root(int root_fd, const char *path, int create, lfs_error *err)
{
    return lfs_open_dir_in_root_ex(root_fd, path, create, lfs_has_openat2(),
                                   (uid_t)-1, (gid_t)-1, err);
}

/* ---- tree removal ---- */

struct rm_frame {
    DIR *d;                 /* NULL while closed to save fds */
    dev_t dev;
    ino_t ino;
    size_t name_off;        /* offset of this directory's name in the names buffer */
    int removed;            /* something was removed in the current pass */
};

struct rm_state {
    struct rm_frame *f;
    size_t depth, cap;
    char *names;
    size_t nlen, ncap;
};

static int rm_push(struct rm_state *s, int fd, const char *name, lfs_error *err, const char *top)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return lfs_fail(err, e, -1, top, NULL, "cannot stat directory '%s'", name);
    }
    if (s->depth == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 64;
        struct rm_frame *nf = realloc(s->f, nc * sizeof *nf);
        if (!nf) { close(fd); return lfs_fail(err, ENOMEM, -1, top, NULL, "out of memory"); }
        s->f = nf;
        s->cap = nc;
    }
    size_t n = strlen(name) + 1;
    if (s->nlen + n > s->ncap) {
        size_t nc = s->ncap ? s->ncap : 4096;
        while (nc < s->nlen + n) nc *= 2;
        char *nn = realloc(s->names, nc);
        if (!nn) { close(fd); return lfs_fail(err, ENOMEM, -1, top, NULL, "out of memory"); }
        s->names = nn;
        s->ncap = nc;
    }
    DIR *d = fdopendir(fd);
    if (!d) {
        int e = errno;
        close(fd);
        return lfs_fail(err, e, -1, top, NULL, "cannot read directory '%s'", name);
    }
    struct rm_frame *fr = &s->f[s->depth++];
    fr->d = d;
    fr->dev = st.st_dev;
    fr->ino = st.st_ino;
    fr->name_off = s->nlen;
    fr->removed = 0;
    memcpy(s->names + s->nlen, name, n);
    s->nlen += n;
    /* Keep the fd budget: close the ancestor RM_OPEN_MAX levels up. */
    if (s->depth > RM_OPEN_MAX) {
        struct rm_frame *old = &s->f[s->depth - 1 - RM_OPEN_MAX];
        if (old->d) { closedir(old->d); old->d = NULL; }
    }
    return 0;
}

/* Open dirfd/name as a directory without following it; EACCES is retried
 * once after giving the owner rwx (trees made unprivileged may be read-only). */
static int rm_open_dir(int dirfd, const char *name)
{
    int fd = openat(dirfd, name, DIR_FLAGS | O_NOFOLLOW);
    if (fd < 0 && errno == EACCES &&
        fchmodat(dirfd, name, S_IRWXU, AT_SYMLINK_NOFOLLOW) == 0)
        fd = openat(dirfd, name, DIR_FLAGS | O_NOFOLLOW);
    return fd < 0 ? -errno : fd;
}

/* unlinkat; inside the tree being removed (fix != 0) EACCES is retried once after
 * giving the containing directory u+rwx (never the caller's directory). */
static int rm_unlink(int dirfd, const char *name, int flags, int fix)
{
    if (unlinkat(dirfd, name, flags) == 0) return 0;
    if (fix && errno == EACCES && fchmod(dirfd, S_IRWXU) == 0 && unlinkat(dirfd, name, flags) == 0)
        return 0;
    return -errno;
}

int lfs_remove_at(int top_fd, const char *name, lfs_error *err)
{
    int r = rm_unlink(top_fd, name, 0, 0);
    if (r == 0 || r == -ENOENT) return 0;
    if (r != -EISDIR && r != -EPERM)
        return lfs_fail(err, -r, -1, name, NULL, "cannot remove '%s'", name);

    struct rm_state s;
    memset(&s, 0, sizeof s);
    int rc = 0;
    int fd = rm_open_dir(top_fd, name);
    if (fd < 0) {
        if (fd == -ENOENT) return 0;
        if (r == -EPERM && (fd == -ENOTDIR || fd == -ELOOP))   /* EPERM was not about a directory */
            return lfs_fail(err, EPERM, -1, name, NULL, "cannot remove '%s'", name);
        return lfs_fail(err, -fd, -1, name, NULL, "cannot open directory '%s' for removal", name);
    }
    rc = rm_push(&s, fd, name, err, name);
    if (rc < 0) goto out;

    while (s.depth > 0) {
        struct rm_frame *f = &s.f[s.depth - 1];
        errno = 0;
        struct dirent *de = readdir(f->d);
        if (de) {
            const char *dn = de->d_name;
            if (dn[0] == '.' && (dn[1] == 0 || (dn[1] == '.' && dn[2] == 0))) continue;
            int pfd = dirfd(f->d);
            if (de->d_type != DT_DIR) {
                r = rm_unlink(pfd, dn, 0, 1);
                if (r == 0) { f->removed = 1; continue; }
                if (r == -ENOENT) continue;
                if (r != -EISDIR && r != -EPERM) {
                    rc = lfs_fail(err, -r, -1, name, NULL, "cannot remove '%s'", dn);
                    goto out;
                }
            }
            int cfd = rm_open_dir(pfd, dn);
            if (cfd < 0) {
                if (cfd == -ENOENT) continue;
                if (cfd == -ENOTDIR || cfd == -ELOOP) {   /* not a directory after all */
                    r = rm_unlink(pfd, dn, 0, 1);
                    if (r == 0 || r == -ENOENT) { f->removed = 1; continue; }
                    rc = lfs_fail(err, -r, -1, name, NULL, "cannot remove '%s'", dn);
                    goto out;
                }
                rc = lfs_fail(err, -cfd, -1, name, NULL, "cannot open directory '%s' for removal", dn);
                goto out;
            }
            f->removed = 1;
            rc = rm_push(&s, cfd, dn, err, name);
            if (rc < 0) goto out;
            continue;
        }
        if (errno) { rc = lfs_fail(err, errno, -1, name, NULL, "cannot read directory"); goto out; }
        if (f->removed) {               /* another pass: some filesystems skip entries */
            f->removed = 0;             /* when the directory changes while it is read */
            rewinddir(f->d);
            continue;
        }
        /* Exhausted: remove this directory from its parent. */
        if (s.depth == 1) {
            closedir(f->d);
            f->d = NULL;
            s.depth = 0;
            r = rm_unlink(top_fd, name, AT_REMOVEDIR, 0);
            if (r < 0 && r != -ENOENT) rc = lfs_fail(err, -r, -1, name, NULL, "cannot remove directory '%s'", name);
            goto out;
        }
        struct rm_frame *p = &s.f[s.depth - 2];
        if (!p->d) {
            int pfd = openat(dirfd(f->d), "..", DIR_FLAGS);
            struct stat st;
            if (pfd < 0 || fstat(pfd, &st) < 0) {
                rc = lfs_fail(err, errno, -1, name, NULL, "cannot re-open a parent directory during removal");
                if (pfd >= 0) close(pfd);
                goto out;
            }
            if (st.st_dev != p->dev || st.st_ino != p->ino) {
                close(pfd);
                rc = lfs_fail(err, EBUSY, -1, name, NULL, "directory moved during removal");
                goto out;
            }
            p->d = fdopendir(pfd);
            if (!p->d) { rc = lfs_fail(err, errno, -1, name, NULL, "cannot read directory"); close(pfd); goto out; }
        }
        closedir(f->d);
        f->d = NULL;
        s.depth--;
        s.nlen = f->name_off;
        r = rm_unlink(dirfd(p->d), s.names + f->name_off, AT_REMOVEDIR, 1);
        if (r < 0 && r != -ENOENT) {
            rc = lfs_fail(err, -r, -1, name, NULL, "cannot remove directory '%s'", s.names + f->name_off);
            goto out;
        }
        p->removed = 1;
    }
out:
    for (size_t i = 0; i < s.depth; i++)
        if (s.f[i].d) closedir(s.f[i].d);
    free(s.f);
    free(s.names);
    return rc;
}

int lfs_remove_tree(int dirfd, const char *path, lfs_error *err)
{
    size_t n = strlen(path);
    if (n >= LFS_PATH_MAX) return lfs_fail(err, ENAMETOOLONG, -1, path, NULL, "path too long");
    char *buf = malloc(n + 1);
    if (!buf) return lfs_fail(err, ENOMEM, -1, path, NULL, "out of memory");
    memcpy(buf, path, n + 1);
    while (n > 1 && buf[n - 1] == '/') buf[--n] = 0;
    char *slash = strrchr(buf, '/');
    const char *base = slash ? slash + 1 : buf;
    int rc;
    if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
        rc = lfs_fail(err, EINVAL, -1, path, NULL, "refusing to remove '%s'", path);
        goto out;
    }
    int pfd = dirfd, own = 0;
    if (slash) {
        if (slash == buf) {
            pfd = open("/", DIR_FLAGS);
        } else {
            *slash = 0;
            pfd = openat(dirfd, buf, DIR_FLAGS);
        }
        if (pfd < 0) {
            rc = errno == ENOENT ? 0 : lfs_fail(err, errno, -1, path, NULL, "cannot open the parent directory");
            goto out;
        }
        own = 1;
    }
    rc = lfs_remove_at(pfd, base, err);
    if (rc < 0 && err) {
        /* report the path as the caller named it */
        size_t pl = strlen(path);
        if (pl >= sizeof err->path) pl = sizeof err->path - 1;
        memcpy(err->path, path, pl);
        err->path[pl] = 0;
    }
    if (own) close(pfd);
out:
    free(buf);
    return rc;
}

/* ---- whole writes ---- */

int lfs_write_full(int fd, const void *buf, size_t n)
{
    const unsigned char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int lfs_pwrite_full(int fd, const void *buf, size_t n, off_t off)
{
    const unsigned char *p = buf;
    while (n) {
        ssize_t w = pwrite(fd, p, n, off);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
        off += w;
    }
    return 0;
}

int lfs_open_opening_up(int dirfd, const char *name, int flags, int type, mode_t add,
                        uid_t uid, int keep, mode_t *was)
{
    int fd = openat(dirfd, name, flags | O_NOFOLLOW | O_CLOEXEC);
    if (fd >= 0 || errno != EACCES) return fd;
    int pf = openat(dirfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (pf < 0) {
        errno = EACCES;
        return -1;
    }
    struct stat st;
    char proc[32];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", pf);
    fd = -1;
    int e = EACCES;
    if (fstat(pf, &st) == 0 && (int)(st.st_mode & S_IFMT) == type && st.st_uid == uid &&
        (st.st_mode & add) != add && chmod(proc, (st.st_mode & 07777) | add) == 0) {
        *was = st.st_mode & 07777;
        fd = open(proc, flags | O_CLOEXEC);
        if (fd < 0) e = errno;
        if (!keep || fd < 0) chmod(proc, st.st_mode & 07777);
    }
    close(pf);
    if (fd < 0) errno = e;
    return fd;
}
