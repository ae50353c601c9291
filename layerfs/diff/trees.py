"""The exact ("naive") diff of two directory trees.

:func:`compare_trees` walks both trees once, in sorted-merge order (os.scandir
and lstat, no recursion limit), and yields one :class:`TreeChange` per path
that differs, parents before children.  It works for any two directories: the
layer directories of the ``vfs`` driver, two mounted views of the ``overlay``
driver, two unpacked images.

What counts as a change
    type, permission bits (07777, not for symlinks), owner (uid, gid), device
    number, xattrs (overlayfs' private ones excepted), symlink target, and for
    non-directories size and mtime to the nanosecond.  A directory's own mtime
    only says that its entries changed, and those are reported themselves, so it
    is compared only with ``dir_mtime=True``.

When metadata cannot decide
    Two regular files of equal size and equal mtime whose nanoseconds are zero
    on both sides may be a truncated timestamp (tar, some copy tools) hiding a
    content change: then their content is compared, chunk by chunk, stopping at
    the first difference.  Equal non-zero nanoseconds are trusted.

Shape of the answer
    - a path only in the new tree is ``added``; an added directory is followed
      by every entry below it, each ``added``;
    - a path only in the old tree is ``deleted``; a deleted directory is one
      record (not one per child);
    - a path in both that differs is ``modified``, with ``fields`` mapping each
      differing field to (old, new).  A type change (``fields["type"]``) from a
      non-directory to a directory is followed by the new directory's entries,
      ``added``; from a directory to a non-directory the old entries go with it.
    - hardlinks are not special: each path is reported on its own.

>>> for c in compare_trees("rootfs-v1", "rootfs-v2"):          # doctest: +SKIP
...     print(c.kind, c.path, sorted(c.fields))
modified /etc/hosts ['mtime', 'size']
"""
from __future__ import annotations

import errno
import os
import stat
from typing import (Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

PathArg = Union[str, bytes, "os.PathLike[str]"]

#: xattr name prefixes that overlayfs keeps for itself; never user-visible content.
OVERLAY_PRIVATE_XATTRS = ("trusted.overlay.", "user.overlay.")

_CHUNK = 1 << 20

_TYPE_NAMES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def type_name(st_mode: int) -> str:
    """"file", "dir", "symlink", "char", "block", "fifo" or "socket"."""
    return _TYPE_NAMES.get(stat.S_IFMT(st_mode), "unknown")


class TreeChange(NamedTuple):
    """One difference between two trees.

    path: absolute within the trees ("/etc/hosts"); kind: "added", "modified"
    or "deleted"; fields: for "modified", each differing field mapped to
    (old, new) — "type", "mode", "uid", "gid", "rdev", "size", "mtime" (ns),
    "linkname", "xattr:NAME" (bytes or None), "content" (sha256 of each side);
    type: the entry's type in the new tree (the old one for "deleted").
    """
    path: str
    kind: str
    fields: Dict[str, Tuple[object, object]]
    type: str = ""


# ----------------------------------------------------------------- reading

def _listdir(path: bytes) -> List[Tuple[bytes, os.stat_result]]:
    """(name, lstat) of every entry of a directory, sorted by name (bytes)."""
    out = []
    with os.scandir(path) as it:
        for e in it:
            try:
                out.append((e.name, e.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue  # gone since readdir: as if it never was
    out.sort(key=lambda t: t[0])
    return out


def read_xattrs(path: bytes, ignore: Sequence[str] = OVERLAY_PRIVATE_XATTRS) -> Dict[str, bytes]:
    """Every xattr of path (not following a symlink), minus the ignored prefixes."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOENT):
            return {}
        raise
    out = {}
    for n in names:
        if ignore and n.startswith(tuple(ignore)):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return out


def same_content(a: PathArg, b: PathArg) -> bool:
    """Whether two regular files hold the same bytes (chunked, stops at the first difference)."""
    fa = os.open(a, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fb = os.open(b, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            if os.path.samestat(os.fstat(fa), os.fstat(fb)):
                return True
            for fd in (fa, fb):
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except OSError:
                    pass
            return fds_equal(fa, fb)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def fds_equal(fa: int, fb: int, size: Optional[int] = None) -> bool:
    """Whether two fds read the same bytes from where they stand (chunked, stops
    at the first difference).  With size, true once size bytes (at least one
    chunk) matched, as for a file whose lstat gave that size."""
    left = size
    while True:
        n = min(left, _CHUNK) if left is not None and left > 0 else _CHUNK
        ca = os.read(fa, n)
        cb = os.read(fb, n)
        # read() may return short counts: align the two sides
        while len(cb) < len(ca):
            more = os.read(fb, len(ca) - len(cb))
            if not more:
                break
            cb += more
        while len(ca) < len(cb):
            more = os.read(fa, len(cb) - len(ca))
            if not more:
                break
            ca += more
        if ca != cb:
            return False
        if not ca:
            return True
        if left is not None:
            left -= len(ca)
            if left <= 0:
                return True


def content_digest(path: bytes, read_errors: bool = False) -> Optional[str]:
    """sha256 of a file's content (C core, GIL released); None when it cannot be
    opened, or read unless read_errors (then the error is raised)."""
    from .. import _native
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _native.sha256_fd(fd, os.fsdecode(path))[0]
    except OSError:
        if read_errors:
            raise
        return None
    finally:
        os.close(fd)


# ----------------------------------------------------------------- comparing

def compare_entries(old_path: bytes, new_path: bytes, ost: os.stat_result,
                    nst: os.stat_result, *, dir_mtime: bool = False,
                    ignore_xattrs: Sequence[str] = OVERLAY_PRIVATE_XATTRS
                    ) -> Dict[str, Tuple[object, object]]:
    """The differing fields of two entries ({} when they are the same)."""
    if os.path.samestat(ost, nst):
        return {}
    ofmt, nfmt = stat.S_IFMT(ost.st_mode), stat.S_IFMT(nst.st_mode)
    if ofmt != nfmt:
        return {"type": (type_name(ost.st_mode), type_name(nst.st_mode))}
    fields: Dict[str, Tuple[object, object]] = {}
    if ofmt != stat.S_IFLNK and stat.S_IMODE(ost.st_mode) != stat.S_IMODE(nst.st_mode):
        fields["mode"] = (stat.S_IMODE(ost.st_mode), stat.S_IMODE(nst.st_mode))
    if ost.st_uid != nst.st_uid:
        fields["uid"] = (ost.st_uid, nst.st_uid)
    if ost.st_gid != nst.st_gid:
        fields["gid"] = (ost.st_gid, nst.st_gid)
    if ofmt in (stat.S_IFCHR, stat.S_IFBLK) and ost.st_rdev != nst.st_rdev:
        fields["rdev"] = ((os.major(ost.st_rdev), os.minor(ost.st_rdev)),
                          (os.major(nst.st_rdev), os.minor(nst.st_rdev)))
    is_dir = ofmt == stat.S_IFDIR
    if not is_dir and ost.st_size != nst.st_size:
        fields["size"] = (ost.st_size, nst.st_size)
    if (not is_dir or dir_mtime) and ost.st_mtime_ns != nst.st_mtime_ns:
        fields["mtime"] = (ost.st_mtime_ns, nst.st_mtime_ns)
    if ofmt == stat.S_IFLNK:
        ol, nl = os.readlink(old_path), os.readlink(new_path)
        if ol != nl:
            fields["linkname"] = (os.fsdecode(ol), os.fsdecode(nl))
    ox = read_xattrs(old_path, ignore_xattrs)
    nx = read_xattrs(new_path, ignore_xattrs)
    if ox != nx:
        for name in sorted(set(ox) | set(nx)):
            if ox.get(name) != nx.get(name):
                fields["xattr:" + name] = (ox.get(name), nx.get(name))
    if (ofmt == stat.S_IFREG and "size" not in fields and "mtime" not in fields
            and nst.st_size > 0 and ost.st_mtime_ns % 1_000_000_000 == 0):
        # equal size and mtime, whole seconds on both sides: the timestamp may
        # have been truncated, so only the bytes can tell
        if not same_content(old_path, new_path):
            fields["content"] = (content_digest(old_path), content_digest(new_path))
    return fields


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


def _display(rel: bytes) -> str:
    return "/" + os.fsdecode(rel)


def _walk_added(root: bytes, rel: bytes) -> Iterator[TreeChange]:
    """Every entry below root/rel (a directory), as added, in sorted preorder."""
    stack = [(rel, iter(_listdir(_join(root, rel) if rel else root)))]
    while stack:
        drel, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            continue
        name, st = nxt
        r = _join(drel, name)
        yield TreeChange(_display(r), "added", {}, type_name(st.st_mode))
        if stat.S_ISDIR(st.st_mode):
            stack.append((r, iter(_listdir(root + b"/" + r))))


def _merge(old: List[Tuple[bytes, os.stat_result]], new: List[Tuple[bytes, os.stat_result]]):
    """Merge two sorted listings: (name, old_stat or None, new_stat or None)."""
    i = j = 0
    while i < len(old) or j < len(new):
        if j >= len(new) or (i < len(old) and old[i][0] < new[j][0]):
            yield old[i][0], old[i][1], None
            i += 1
        elif i >= len(old) or new[j][0] < old[i][0]:
            yield new[j][0], None, new[j][1]
            j += 1
        else:
            yield old[i][0], old[i][1], new[j][1]
            i += 1
            j += 1


def compare_trees(old_root: Optional[PathArg], new_root: PathArg, *, dir_mtime: bool = False,
                  ignore_xattrs: Sequence[str] = OVERLAY_PRIVATE_XATTRS
                  ) -> Iterator[TreeChange]:
    """Yield the differences from old_root to new_root, sorted by path (parents
    first, then each directory's entries by name, as a tar made with
    ``--sort=name``).  old_root None stands for an empty tree.  The roots
    themselves are compared too (path "/") when both are given."""
    new_b = os.fsencode(new_root).rstrip(b"/") or b"/"
    if old_root is None:
        yield from _walk_added(new_b, b"")
        return
    old_b = os.fsencode(old_root).rstrip(b"/") or b"/"
    ost, nst = os.lstat(old_b), os.lstat(new_b)
    if not (stat.S_ISDIR(ost.st_mode) and stat.S_ISDIR(nst.st_mode)):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory",
                                 old_root if not stat.S_ISDIR(ost.st_mode) else new_root)
    if os.path.samestat(ost, nst):
        return
    f = compare_entries(old_b, new_b, ost, nst, dir_mtime=dir_mtime, ignore_xattrs=ignore_xattrs)
    if f:
        yield TreeChange("/", "modified", f, "dir")

    def pair(rel: bytes):
        return iter(_merge(_listdir(old_b + b"/" + rel if rel else old_b),
                           _listdir(new_b + b"/" + rel if rel else new_b)))

    stack = [(b"", pair(b""))]
    while stack:
        drel, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            continue
        name, o, n = nxt
        rel = _join(drel, name)
        if n is None:
            yield TreeChange(_display(rel), "deleted", {}, type_name(o.st_mode))
            continue
        if o is None:
            yield TreeChange(_display(rel), "added", {}, type_name(n.st_mode))
            if stat.S_ISDIR(n.st_mode):
                yield from _walk_added(new_b, rel)
            continue
        op, np_ = old_b + b"/" + rel, new_b + b"/" + rel
        if os.path.samestat(o, n):
            continue  # the same inode (a hardlinked or shared tree): nothing below differs
        fields = compare_entries(op, np_, o, n, dir_mtime=dir_mtime, ignore_xattrs=ignore_xattrs)
        if fields:
            yield TreeChange(_display(rel), "modified", fields, type_name(n.st_mode))
        if stat.S_ISDIR(n.st_mode):
            if stat.S_ISDIR(o.st_mode):
                stack.append((rel, pair(rel)))
            else:
                yield from _walk_added(new_b, rel)


# ----------------------------------------------------------------- for layer tars

def path_key(path: str) -> Tuple[str, ...]:
    """Sort key giving the order compare_trees yields (parents first, by component)."""
    return tuple(os.fsencode(path).split(b"/"))


def with_parents(changes: Iterable[TreeChange]) -> List[TreeChange]:
    """The changes plus, before them, every directory that contains a change
    and is not itself reported, as "modified" (so a layer tar carries the
    metadata of the directories it writes into, as container engines do).
    The input must be in compare_trees order."""
    out: List[TreeChange] = []
    have = set()
    for c in changes:
        parent = c.path.rsplit("/", 1)[0]
        missing = []
        while parent and parent not in have:
            missing.append(parent)
            parent = parent.rsplit("/", 1)[0]
        for p in reversed(missing):
            have.add(p)
            out.append(TreeChange(p, "modified", {}, "dir"))
        have.add(c.path)
        out.append(c)
    return out
