"""The diff engine: compare two sources' entry maps, in sorted order.

>>> from layerfs.diff import compare
>>> for c in compare("rootfs-v1", "oci:image:2.0"):           # doctest: +SKIP
...     print(c.code, c.path, sorted(c.fields))
M /etc/hosts ['content', 'size']

What is compared (the rules of :mod:`layerfs.diff.trees`, extended to tarballs
and images): type; permission bits (not for symlinks); uid and gid; device
numbers; symlink target; xattrs (overlayfs' private ones excepted); for
non-directories size and mtime (ns; a tar mtime without a sub-second part
matches the same second); hardlink group (the other paths sharing the
inode); for regular files the content.  Directory mtimes only with
``dir_mtime=True``.  Content is decided by digests when a side has them
(tarballs: computed by the C scan), else by metadata when it can (both
directories, equal size and equal mtime with a non-zero sub-second part),
else by reading the bytes.

How the bytes are read, fastest first: two plain directories -- the new one
is walked while C threads compare its files with the old one's
(``lfs_walk_compare``), hashing those that differ; two uncompressed layer
files -- scanned without hashing every file, the same-size contents compared
in place with pread (``lfs_ranges_compare``) and hashed only where they
differ or where a change record shows them; anything else -- digests from
the scans, byte comparisons on a background thread, digests on demand.

Shape of the answer: like :func:`~layerfs.diff.trees.compare_trees` — parents
first, an added directory followed by every entry below it, a deleted
directory as one record; with ``renames=True`` a deleted file and an added
file with the same content (by digest, non-empty) become one "renamed" record.
"""
from __future__ import annotations

import collections
import contextlib
import fnmatch
import functools
import gc
import os
import queue
import re
import threading

from .. import _native
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

from .sources import (COARSE, IMPLICIT, OPAQUE, DirectorySource, EntryMeta, LayerInfo,
                      LayerStackSource, Source, SourceArg, _in_thread, _Task, open_source,
                      sort_key)
from .trees import OVERLAY_PRIVATE_XATTRS, TreeChange, fds_equal

KINDS = ("added", "deleted", "modified", "renamed")
CODES = {"added": "A", "deleted": "D", "modified": "M", "renamed": "R"}

#: field names that ``ignore`` accepts ("owner" = uid and gid, "xattr" = every
#: xattr, "xattr:NAME" one of them, NAME may be a glob).
IGNORABLE = ("mtime", "uid", "gid", "owner", "mode", "xattr", "content", "size", "linkname",
             "rdev", "hardlinks", "opaque")
SEMANTIC_IGNORE = frozenset({"mtime"})


@dataclass
class Change:
    """One difference between two sources.

    path: "/etc/hosts"; kind: "added", "deleted", "modified" or "renamed";
    type: the entry's type on the new side (the old side for "deleted");
    fields: for "modified" (and "renamed"), each differing field -> (old, new):
    "type", "mode", "uid", "gid", "rdev", "size", "mtime" (ns), "linkname",
    "xattr:NAME" (bytes or None), "content" (digests), "hardlinks" (tuples of
    the other paths of the group), "opaque"; old/new: the entries; old_path:
    where a renamed file was; hardlinks: the other paths of the new entry's
    hardlink group; layer: the new side's layer that wrote the entry (or
    whose whiteout deleted it); old_layer: the old side's layer that wrote it.
    """
    path: str
    kind: str
    type: str
    fields: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)
    old: Optional[EntryMeta] = None
    new: Optional[EntryMeta] = None
    old_path: Optional[str] = None
    hardlinks: Tuple[str, ...] = ()
    layer: Optional[LayerInfo] = None
    old_layer: Optional[LayerInfo] = None

    @property
    def code(self) -> str:
        """A, D, M, R, or T for a "modified" whose type changed."""
        if self.kind == "modified" and "type" in self.fields:
            return "T"
        return CODES[self.kind]

    @property
    def old_size(self) -> Optional[int]:
        return self.old.size if self.old is not None and self.old.type == "file" else None

    @property
    def new_size(self) -> Optional[int]:
        return self.new.size if self.new is not None and self.new.type == "file" else None


@dataclass
class Summary:
    """The counts of a diff's changes by kind, and the bytes of file data the
    changes add and remove: a hardlink group's data counts once, and not at
    all while another of its names keeps it (unchanged, or renamed)."""
    added: int = 0
    deleted: int = 0
    modified: int = 0
    type_changed: int = 0
    renamed: int = 0
    bytes_added: int = 0
    bytes_removed: int = 0

    @property
    def changes(self) -> int:
        return self.added + self.deleted + self.modified + self.type_changed + self.renamed

    def as_dict(self) -> Dict[str, int]:
        d = dict(self.__dict__)
        d["changes"] = self.changes
        return d


@dataclass(frozen=True)
class Options:
    ignore: FrozenSet[str] = frozenset()
    ignore_xattrs: Tuple[str, ...] = ()         # globs of xattr names
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    dir_mtime: bool = False
    renames: bool = False
    semantic: bool = False

    @classmethod
    def make(cls, *, ignore: Iterable[str] = (), include: Iterable[str] = (),
             exclude: Iterable[str] = (), dir_mtime: bool = False, renames: bool = False,
             semantic: bool = False) -> "Options":
        names = set()
        xattrs = []
        for item in ignore:
            for part in str(item).split(","):
                part = part.strip()
                if not part:
                    continue
                if part.startswith("xattr:"):
                    xattrs.append(part[6:])
                    continue
                if part in ("xattrs",):
                    part = "xattr"
                if part not in IGNORABLE:
                    raise ValueError(f"cannot ignore {part!r}; one of: {', '.join(IGNORABLE)}, "
                                     "xattr:NAME")
                if part == "owner":
                    names.update(("uid", "gid"))
                else:
                    names.add(part)
        if semantic:
            names |= SEMANTIC_IGNORE
        return cls(frozenset(names), tuple(xattrs), tuple(include), tuple(exclude),
                   dir_mtime and "mtime" not in names, renames, semantic)


# ----------------------------------------------------------------- path filters

@functools.lru_cache(maxsize=256)
def _anchored_glob(pattern: str) -> "re.Pattern[str]":
    """The regex of a pattern with a "/": anchored at the root ("./" and "/" in
    front and "/" at the end are dropped), "*" and "?" and "[...]" within one
    path component, a "**" component any number of components (none
    included); it matches the path or any of its ancestors."""
    p = pattern.rstrip("/")
    while p.startswith("./") or p.startswith("/"):
        p = p[2:] if p.startswith("./") else p[1:]
    out = []
    for comp in p.split("/") if p else []:
        if comp == "**":
            out.append("(?:/[^/]+)*")
            continue
        out.append("/")
        i, n = 0, len(comp)
        while i < n:
            ch = comp[i]
            i += 1
            if ch == "*":
                out.append("[^/]*")
            elif ch == "?":
                out.append("[^/]")
            elif ch == "[":
                j = i
                if j < n and comp[j] in "!^":
                    j += 1
                if j < n and comp[j] == "]":
                    j += 1
                while j < n and comp[j] != "]":
                    j += 1
                if j >= n:                      # no closing bracket: a plain "["
                    out.append("\\[")
                    continue
                body = comp[i:j].replace("\\", "\\\\")
                i = j + 1
                neg = body[:1] in ("!", "^")
                if neg:
                    body = body[1:]
                out.append("(?!/)[" + ("^" if neg else "") + body.replace("[", "\\[") + "]")
            else:
                out.append(re.escape(ch))
    if not out:
        return re.compile("(?!)")               # "/" or "./": names nothing
    return re.compile("".join(out) + "(?:/.*)?", re.S)


def _glob_match(pattern: str, path: str) -> bool:
    """A pattern with a "/" (see _anchored_glob) matches the path or an
    ancestor; one without matches any component name."""
    if "/" in pattern.rstrip("/"):
        return _anchored_glob(pattern).fullmatch(path) is not None
    pat = pattern.strip("/")
    return any(fnmatch.fnmatchcase(c, pat) for c in path.split("/") if c)


def _wanted(path: str, opts: Options) -> bool:
    if opts.exclude and any(_glob_match(p, path) for p in opts.exclude):
        return False
    if opts.include and path != "/":
        return any(_glob_match(p, path) for p in opts.include)
    return True


# ----------------------------------------------------------------- comparing two entries

def _mtime_differs(a: EntryMeta, b: EntryMeta) -> bool:
    if a.mtime_ns == b.mtime_ns:
        return False
    if (a.flags | b.flags) & COARSE and \
            ((a.flags & COARSE and a.mtime_ns % 1_000_000_000 == 0) or
             (b.flags & COARSE and b.mtime_ns % 1_000_000_000 == 0)):
        # a tar header without sub-second part: the same second is the same time
        return a.mtime_ns // 1_000_000_000 != b.mtime_ns // 1_000_000_000
    return True


def _xattr_ignored(name: str, opts: Options) -> bool:
    if name.startswith(OVERLAY_PRIVATE_XATTRS):
        return True
    return any(fnmatch.fnmatchcase(name, p) for p in opts.ignore_xattrs)


class _Side:
    """A source and its hardlink groups."""

    def __init__(self, src: Source):
        self.src = src
        self.entries = src.entries()
        self._groups: Optional[Dict[Any, List[str]]] = None
        self.content_equal = _ContentResults()       # path -> same bytes (prefetched)

    def groups(self) -> Dict[Any, List[str]]:
        """link key -> the sorted paths of each group of two or more."""
        if self._groups is None:
            counts = collections.Counter([m.link for m in self.entries.values()])
            shared = {k for k, n in counts.items() if n > 1 and k is not None}
            g: Dict[Any, List[str]] = {}
            if shared:
                for p, m in self.entries.items():
                    if m.link in shared:
                        g.setdefault(m.link, []).append(p)
            self._groups = {k: sorted(v) for k, v in g.items()}
        return self._groups

    def others(self, path: str, m: Optional[EntryMeta]) -> Tuple[str, ...]:
        if m is None or m.link is None:
            return ()
        group = self.groups().get(m.link)
        if not group:
            return ()
        return tuple(p for p in group if p != path)


def _unkept_bytes(side: _Side, other: _Side, changed: List[Tuple[str, EntryMeta]],
                  moved: Collection[str]) -> int:
    """The bytes of the files changed (path, entry of side) whose data no name
    keeps: the data of a hardlink group counts once, and not at all when one
    of its names is in other unchanged (a file there, not among changed) or
    moved (renamed: the same content under another name)."""
    changed_paths = {p for p, _ in changed}
    groups = side.groups()
    there = other.entries
    seen: set = set()
    total = 0
    for p, m in changed:
        if p in moved:
            continue
        if m.link is not None:
            if m.link in seen:
                continue
            seen.add(m.link)
            kept = False
            for q in groups.get(m.link, ()):
                if q in moved:
                    kept = True
                elif q not in changed_paths:
                    e = there.get(q)
                    kept = e is not None and e.type == "file"
                if kept:
                    break
            if kept:
                continue
        total += m.size
    return total


def _metadata_decides(ea: EntryMeta, eb: EntryMeta, opts: Options) -> bool:
    """Equal size and an untruncated equal mtime on two directory entries: the
    same content (the rule of :mod:`layerfs.diff.trees`)."""
    return ("mtime" not in opts.ignore and ea.mtime_ns == eb.mtime_ns
            and ea.mtime_ns % 1_000_000_000 != 0)


def files_equal(pa: bytes, pb: bytes, size: int) -> bool:
    """Whether two regular files of the given size hold the same bytes."""
    try:
        fa = os.open(pa, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fb = os.open(pb, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            return fds_equal(fa, fb, size)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


class _Cancelled(Exception):
    pass


class _SerialWorker:
    """One background thread running the submitted calls in order."""

    def __init__(self, name: str):
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._cancel = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            task, fn, args = item
            if self._cancel:
                task._error = _Cancelled()
                task._done.set()
                continue
            task._run(fn, args)

    def submit(self, fn, *args) -> _Task:
        task = _Task()
        self._queue.put((task, fn, args))
        return task

    def shutdown(self, cancel: bool = True) -> None:
        """Stop after the call under way (the queued ones are dropped with cancel)."""
        self._cancel = cancel
        self._queue.put(None)
        self._thread.join()


class _ContentResults:
    """Content decisions computed ahead of the merge, in path order, in chunks
    on a background thread (the C comparison releases the GIL): the merge
    waits only for the chunk that holds the path it is at."""

    def __init__(self):
        self.known: Dict[str, bool] = {}
        self.pending: Dict[str, Tuple[_Task, int]] = {}
        self.pool: Optional[_SerialWorker] = None
        self.prematch: Optional[_Task] = None    # _prematch of two layer files read in place

    def get(self, path: str) -> Optional[bool]:
        v = self.known.get(path)
        if v is None and path in self.pending:
            fut, i = self.pending.pop(path)
            v = fut.result()[i]
            self.known[path] = v
        return v

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel=True)
            self.pool = None


_PIPELINE_CHUNK = 256


def _prefetch_content(a: _Side, b: _Side, paths: List[str], opts: Options,
                      threads: int = 2) -> None:
    """Start deciding the content of every pair of regular files that metadata
    cannot decide: byte comparisons (C, its own threads) and the digests of
    directory files to match a tarball's, in path order, while the merge runs;
    results in ``a.content_equal``."""
    eb_map = b.entries
    byte_pairs = []
    hash_jobs = []
    done = a.content_equal.known
    a_path = getattr(a.src, "data_path", None)
    b_path = getattr(b.src, "data_path", None)
    range_jobs = []
    for p in paths:
        ea = a.entries[p]
        if ea.type != "file" or p in done:
            continue
        eb = eb_map.get(p)
        if ea.data is not None and eb is not None and eb.type == "file" and \
                eb.data is not None and ea.digest is None and eb.digest is None and \
                a_path is not None and b_path is not None and \
                (ea.size != eb.size or ea.size > 0):
            # both read in place: compare (same size) or hash both (the
            # digests of a content change)
            range_jobs.append((p, ea, eb))
            continue
        if eb is None or eb.type != "file" or eb.size != ea.size or ea.size == 0:
            continue
        if ea.inode is not None and ea.inode == eb.inode:
            continue
        if ea.digest is not None and eb.digest is not None:
            continue
        if ea.content is not None and eb.content is not None:
            if not _metadata_decides(ea, eb, opts):
                byte_pairs.append((p, ea.content, eb.content, ea.size))
        elif ea.digest is None and ea.content is not None and eb.digest is not None:
            hash_jobs.append((a.src, ea))
        elif eb.digest is None and eb.content is not None and ea.digest is not None:
            hash_jobs.append((b.src, eb))
    results = a.content_equal
    if range_jobs and results.prematch is not None:
        try:
            pre = results.prematch.result()
        except Exception:       # noqa: BLE001 - a shortcut only: the usual way decides
            pre = {}
        rest = []
        for job in range_jobs:
            p, ea, eb = job
            got = pre.get((ea.data, eb.data, ea.size)) if ea.size == eb.size else None
            if got is None:
                rest.append(job)
                continue
            same, da, db = got
            results.known[p] = same
            _take_digests(ea, eb, da, db)
        range_jobs = rest
    if range_jobs:
        _prefetch_ranges(results, a_path, b_path, range_jobs)
    native = getattr(_native, "files_equal", None)
    if not byte_pairs and not hash_jobs:
        return
    if native is None and len(byte_pairs) + len(hash_jobs) < 8:
        return
    if native is not None:
        # one thread feeding chunks to the C comparison (which has its own threads)
        results.pool = _SerialWorker("layerfs-content")
        for k in range(0, len(byte_pairs), _PIPELINE_CHUNK):
            chunk = byte_pairs[k:k + _PIPELINE_CHUNK]
            fut = results.pool.submit(native, [(pa, pb) for _, pa, pb, _ in chunk], threads)
            for i, (p, _, _, _) in enumerate(chunk):
                results.pending[p] = (fut, i)
        byte_pairs = []
    import concurrent.futures     # only without the C comparison
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for (p, _, _, _), eq in zip(byte_pairs, pool.map(lambda t: files_equal(*t[1:]),
                                                          byte_pairs, chunksize=16)):
            results.known[p] = eq
        for _ in pool.map(lambda job: job[0].digest(job[1]), hash_jobs, chunksize=16):
            pass


def _on_both(a_path: str, b_path: str, call):
    """call(fd of a_path, fd of b_path), both opened for it."""
    fa = os.open(a_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fb = os.open(b_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return call(fa, fb)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _take_digests(ea: EntryMeta, eb: EntryMeta, da: Optional[str], db: Optional[str]) -> None:
    """Keep the digests a comparison computed where the entries have none."""
    if da is not None and ea.digest is None:
        ea.digest = da
    if db is not None and eb.digest is None:
        eb.digest = db


def _prematch(a_path: str, b_path: str):
    """_native.layers_prematch of two layer files."""
    return _on_both(a_path, b_path, _native.layers_prematch)


def _range_chunk(a_path: str, b_path: str, chunk) -> List[bool]:
    """Compare (or hash) one chunk of in-place pairs; digests go onto the entries."""
    jobs = [(ea.data, ea.size, eb.data, eb.size) for _, ea, eb in chunk]
    got = _on_both(a_path, b_path, lambda fa, fb: _native.ranges_compare(fa, fb, jobs))
    out = []
    for (_, ea, eb), (same, da, db) in zip(chunk, got):
        _take_digests(ea, eb, da, db)
        out.append(same)
    return out


def _prefetch_ranges(results: "_ContentResults", a_path: str, b_path: str, jobs) -> None:
    """Pairs of files read in place, compared in chunks on a background thread
    (the C comparison has its own threads) while the merge runs."""
    if results.pool is None:
        results.pool = _SerialWorker("layerfs-content")
    for k in range(0, len(jobs), _RANGE_CHUNK):
        chunk = jobs[k:k + _RANGE_CHUNK]
        fut = results.pool.submit(_range_chunk, a_path, b_path, chunk)
        for i, (p, _, _) in enumerate(chunk):
            results.pending[p] = (fut, i)


_RANGE_CHUNK = 1 << 20


def _same_content(a: _Side, b: _Side, ea: EntryMeta, eb: EntryMeta, opts: Options,
                  path: Optional[str] = None) -> bool:
    if ea.inode is not None and ea.inode == eb.inode:
        return True
    if path is not None:
        known = a.content_equal.get(path)
        if known is not None:
            return known
    if ea.digest is not None and eb.digest is not None:
        return ea.digest == eb.digest
    if ea.size == 0:
        return True
    if ea.content is not None and eb.content is not None and _metadata_decides(ea, eb, opts):
        return True
    if ea.digest is not None or eb.digest is not None or ea.data is not None or \
            eb.data is not None:
        da, db = a.src.digest(ea), b.src.digest(eb)
        if da is None or db is None:
            return True   # one side cannot be read again: nothing more to tell
        return da == db
    if ea.content is not None and eb.content is not None:
        return files_equal(ea.content, eb.content, ea.size)
    return True


def compare_meta(a: _Side, b: _Side, path: str, ea: EntryMeta, eb: EntryMeta,
                 opts: Options) -> Dict[str, Tuple[Any, Any]]:
    """The differing fields of two entries of the same path ({} when none)."""
    if ea.type != eb.type:
        return {"type": (ea.type, eb.type)}
    if ea.type == "whiteout":
        return {}
    if (ea.flags | eb.flags) & IMPLICIT:
        return {}            # a directory no entry described: only its existence counts
    f: Dict[str, Tuple[Any, Any]] = {}
    ign = opts.ignore
    t = ea.type
    if t != "symlink" and ea.mode != eb.mode and "mode" not in ign:
        f["mode"] = (ea.mode, eb.mode)
    if ea.uid != eb.uid and "uid" not in ign:
        f["uid"] = (ea.uid, eb.uid)
    if ea.gid != eb.gid and "gid" not in ign:
        f["gid"] = (ea.gid, eb.gid)
    if t in ("char", "block") and ea.rdev != eb.rdev and "rdev" not in ign:
        f["rdev"] = (ea.rdev, eb.rdev)
    if t == "file" and ea.size != eb.size and "size" not in ign:
        f["size"] = (ea.size, eb.size)
    if (t != "dir" or opts.dir_mtime) and "mtime" not in ign and _mtime_differs(ea, eb):
        f["mtime"] = (ea.mtime_ns, eb.mtime_ns)
    if t in ("symlink", "hardlink") and ea.linkname != eb.linkname and "linkname" not in ign:
        # (a "hardlink": a raw view's link to a file of a lower layer)
        f["linkname"] = (ea.linkname, eb.linkname)
    if ea.xattrs != eb.xattrs and "xattr" not in ign:
        xa, xb = ea.xattrs, eb.xattrs
        for name in sorted(set(xa) | set(xb)):
            if xa.get(name) != xb.get(name) and not _xattr_ignored(name, opts):
                f["xattr:" + name] = (xa.get(name), xb.get(name))
    if (ea.flags ^ eb.flags) & OPAQUE and "opaque" not in ign:
        f["opaque"] = (bool(ea.flags & OPAQUE), bool(eb.flags & OPAQUE))
    if (ea.link is not None or eb.link is not None) and "hardlinks" not in ign:
        oa, ob = a.others(path, ea), b.others(path, eb)
        if oa != ob:
            f["hardlinks"] = (oa, ob)
    if t == "file" and "content" not in ign:
        if ea.size != eb.size or not _same_content(a, b, ea, eb, opts, path):
            if a.content_equal.pending:
                a.content_equal.get(path)       # its digests may be on their way
            f["content"] = (a.src.digest(ea), b.src.digest(eb))
    return f


# ----------------------------------------------------------------- the merge

@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while the entry maps are built: tens of
    thousands of new objects, none in a cycle, would otherwise make it walk
    every tracked object again and again.  Reference counting still frees."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _load_both(a: Source, b: Source, opts: Optional[Options] = None) -> Tuple[_Side, _Side]:
    """Build both maps, at the same time (the C scans release the GIL).  Two
    plain directories not yet loaded: the new one is walked while the C core
    compares its files with the old one's (lfs_walk_compare)."""
    compared = None
    if all(isinstance(s, LayerStackSource) and s.can_read_in_place() for s in (a, b)):
        # two uncompressed layer files: contents compared in place (pread)
        # where the metadata leaves a doubt, hashed only where they differ
        a.read_in_place()
        b.read_in_place()
        # the C core pairs the files by name from the headers alone and
        # compares them while the entries are being built here
        prematch = _in_thread(_prematch, a.data_path, b.data_path) \
            if opts is None or "content" not in opts.ignore else None
    else:
        prematch = None
    fa = _in_thread(a.entries)
    try:
        if (opts is not None and "content" not in opts.ignore and type(a) is DirectorySource
                and type(b) is DirectorySource and b._entries is None
                and hasattr(_native, "walk_compare")):
            compared = b.load_compared(a, "mtime" not in opts.ignore)
        else:
            b.entries()
    finally:
        fa.wait()
    fa.result()
    sa, sb = _Side(a), _Side(b)
    sa.content_equal.prematch = prematch
    if compared is not None:
        known = sa.content_equal.known
        ea_map, eb_map = sa.entries, sb.entries
        for p, (same, da, db) in compared.items():
            ea, eb = ea_map.get(p), eb_map.get(p)
            if ea is None or eb is None or ea.type != "file" or eb.type != "file":
                continue            # changed since: left to the usual way
            if ea.size == eb.size:
                known[p] = same
            _take_digests(ea, eb, da, db)
    return sa, sb


class Diff:
    """The changes from ``old`` to ``new`` (iterate once); ``summary`` counts
    them as they go (complete once the iteration ends)."""

    def __init__(self, old: Source, new: Source, options: Options, owned: Tuple[Source, ...] = ()):
        self.old = old
        self.new = new
        self.options = options
        self._owned = list(owned)          # sources opened for this diff: closed at its end
        self.summary = Summary()
        self._started = False
        # (path, entry) of the files whose data left that path (old side) or
        # came to it (new side): the summary's bytes are counted from them
        # once the changes are known (see _count_bytes)
        self._removed: List[Tuple[str, EntryMeta]] = []
        self._added: List[Tuple[str, EntryMeta]] = []

    # bytes, each hardlink group once ------------------------------------
    def _data_left(self, path: str, m: Optional[EntryMeta]) -> None:
        if m is not None and m.type == "file":
            self._removed.append((path, m))

    def _data_came(self, path: str, m: Optional[EntryMeta]) -> None:
        if m is not None and m.type == "file":
            self._added.append((path, m))

    def _count_bytes(self, moved_old: Collection[str] = (), moved_new: Collection[str] = ()
                     ) -> None:
        """bytes_removed: the data of the files whose old content left its path
        and that no other name keeps (each hardlink group once; none when a
        name of its group is unchanged or the content was renamed);
        bytes_added likewise for the new data."""
        a, b = self._sides
        self.summary.bytes_removed = _unkept_bytes(a, b, self._removed, moved_old)
        self.summary.bytes_added = _unkept_bytes(b, a, self._added, moved_new)

    def _record(self, a: _Side, b: _Side, path: str, kind: str, old, new,
                fields=None) -> Change:
        t = (new or old).type
        c = Change(path, kind, t, fields or {}, old, new)
        c.hardlinks = b.others(path, new) if new is not None else a.others(path, old)
        if new is not None:
            c.layer = b.src.layer_info(new.layer)
        elif b.src.layers:
            c.layer = b.src.layer_info(b.src.deleting_layer(path))
        if old is not None:
            c.old_layer = a.src.layer_info(old.layer)
        s = self.summary
        if kind == "added":
            s.added += 1
            self._data_came(path, new)
        elif kind == "deleted":
            s.deleted += 1
            self._data_left(path, old)
        elif "type" in c.fields:
            s.type_changed += 1
            self._data_left(path, old)
            self._data_came(path, new)
        else:
            s.modified += 1
            if "content" in c.fields:
                self._data_left(path, old)
                self._data_came(path, new)
        return c

    def _merge(self) -> Iterator[Change]:
        opts = self.options
        # The maps and the walk make tens of thousands of objects and no cycles:
        # the cycle collector stays off until the changes are listed (in a
        # process with a large heap each of its passes is costly).
        with _collector_paused():
            a, b = _load_both(self.old, self.new, opts)
            self._sides = (a, b)
            try:
                changes = self._changes(a, b)
            except BaseException:
                a.content_equal.close()
                raise
        try:
            yield from changes
        finally:
            a.content_equal.close()

    def _changes(self, a: _Side, b: _Side) -> List[Change]:
        opts = self.options
        ka = list(a.entries)
        if "content" not in opts.ignore:
            # started before the sorting: the comparisons run meanwhile (in
            # the order of the old side, which for an unsorted source is
            # nearly the merge's order anyway)
            _prefetch_content(a, b, ka, opts)
        if not self.old.in_order:
            ka.sort(key=sort_key)
        kb = list(b.entries) if self.new.in_order else sorted(b.entries, key=sort_key)
        changes = list(self._walk(a, b, ka, kb))
        # the digests of the files in the changes read in place, in one go
        for s, side in ((self.old, "old"), (self.new, "new")):
            if getattr(s, "data_path", None) is not None:
                s.fill_digests([m for m in (getattr(c, side) for c in changes)
                                if m is not None and m.type == "file" and m.digest is None
                                and m.data is not None])
        self._count_bytes()
        return changes

    def _walk(self, a: _Side, b: _Side, ka: List[str], kb: List[str]) -> Iterator[Change]:
        opts = self.options
        ea_map, eb_map = a.entries, b.entries
        skip_old: Optional[str] = None      # a deleted (or replaced) directory's subtree
        keyed = a.src.key_kind is not None and a.src.key_kind == b.src.key_kind
        ga = a.groups() if keyed else {}
        gb = b.groups() if keyed else {}
        no_content = "content" in opts.ignore
        known = a.content_equal.known
        filtering = bool(opts.include or opts.exclude)
        i = j = 0
        na, nb = len(ka), len(kb)
        sa = sb = None
        while i < na or j < nb:
            if j >= nb:
                p, side = ka[i], "old"
            elif i >= na:
                p, side = kb[j], "new"
            else:
                pa, pb = ka[i], kb[j]
                if pa == pb:
                    p, side = pa, "both"
                else:
                    if sa is None or sa[0] != pa:
                        sa = (pa, sort_key(pa))
                    if sb is None or sb[0] != pb:
                        sb = (pb, sort_key(pb))
                    if sa[1] < sb[1]:
                        p, side = pa, "old"
                    else:
                        p, side = pb, "new"
            if side == "old":
                i += 1
                if skip_old is not None and p.startswith(skip_old):
                    self._data_left(p, ea_map[p])
                    continue
                old = ea_map[p]
                if not _wanted(p, opts):
                    continue        # its entries are judged (and counted) each on its own
                if old.type == "dir":
                    skip_old = p.rstrip("/") + "/"
                yield self._record(a, b, p, "deleted", old, None)
                continue
            if side == "new":
                j += 1
                new = eb_map[p]
                if not _wanted(p, opts):
                    continue
                if new.type == "whiteout":
                    yield self._record(a, b, p, "deleted", None, new)
                    continue
                yield self._record(a, b, p, "added", None, new)
                continue
            i += 1
            j += 1
            old, new = ea_map[p], eb_map[p]
            if filtering and not _wanted(p, opts):
                continue
            if old.type == "dir" and new.type != "dir":
                # the old directory's entries go with it (those of one left
                # out by the filter are judged each on its own)
                skip_old = p.rstrip("/") + "/"
            if keyed and old.key is not None and old.key == new.key and \
                    old.flags == new.flags and \
                    (old.link is None or old.link not in ga) and \
                    (new.link is None or new.link not in gb):
                # the same metadata (and no hardlink group on either side):
                # at most the content differs
                if old.type != "file" or no_content:
                    continue
                same = known.get(p)
                if same is None:
                    same = _same_content(a, b, old, new, opts, p)
                if same:
                    continue
                yield self._record(a, b, p, "modified", old, new,
                                   {"content": (a.src.digest(old), b.src.digest(new))})
                continue
            if new.type == "whiteout" and old.type != "whiteout":
                yield self._record(a, b, p, "deleted", old, new)
                continue
            fields = compare_meta(a, b, p, old, new, opts)
            if fields:
                yield self._record(a, b, p, "modified", old, new, fields)

    def _with_renames(self, changes: List[Change]) -> List[Change]:
        a, b = self._sides
        a_src, b_src = self.old, self.new
        deleted: Dict[int, List[int]] = {}
        for idx, c in enumerate(changes):
            if c.kind == "deleted" and c.old is not None and c.old.type == "file" \
                    and c.old.size > 0:
                deleted.setdefault(c.old.size, []).append(idx)
        if not deleted:
            return changes
        by_digest: Dict[Tuple[int, int], List[Optional[str]]] = {}
        used: set = set()
        moved_new: set = set()      # the paths renamed to
        moved_old: set = set()      # and from
        out_replace: Dict[int, Change] = {}
        drop: set = set()
        for idx, c in enumerate(changes):
            if c.kind != "added" or c.new is None or c.new.type != "file":
                continue
            cands = deleted.get(c.new.size)
            if not cands:
                continue
            dn = b_src.digest(c.new)
            if dn is None:
                continue
            match = None
            for k in cands:
                if k in used:
                    continue
                key = (c.new.size, k)
                if key not in by_digest:
                    by_digest[key] = [a_src.digest(changes[k].old)]  # type: ignore[arg-type]
                if by_digest[key][0] == dn:
                    match = k
                    break
            if match is None:
                continue
            used.add(match)
            d = changes[match]
            fields = compare_meta(a, b, c.path, d.old, c.new, self.options)
            fields.pop("hardlinks", None)
            r = Change(c.path, "renamed", c.new.type, fields, d.old, c.new, d.path,
                       c.hardlinks, c.layer, d.old_layer)
            out_replace[idx] = r
            drop.add(match)
            s = self.summary
            s.added -= 1
            s.deleted -= 1
            s.renamed += 1
            moved_new.add(c.path)
            moved_old.add(d.path)
        # the content moved: neither added nor removed
        self._count_bytes(moved_old, moved_new)
        return [out_replace.get(i, c) for i, c in enumerate(changes) if i not in drop]

    def __iter__(self) -> Iterator[Change]:
        if self._started:
            raise RuntimeError("a Diff lists its changes once (its summary counts them as "
                               "they go); call compare() again for another pass")
        self._started = True
        try:
            if not self.options.renames:
                yield from self._merge()
                return
            with _collector_paused():
                changes = self._with_renames(list(self._merge()))
        finally:
            self.close()
        yield from changes

    def close(self) -> None:
        """Close the sources this diff opened itself (e.g. release a store's lock)."""
        owned, self._owned = self._owned, []
        for s in owned:
            s.close()

    def __enter__(self) -> "Diff":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compare(old: SourceArg, new: SourceArg, *, view: Optional[str] = None,
            old_view: Optional[str] = None, new_view: Optional[str] = None,
            ignore: Iterable[str] = (), include: Iterable[str] = (),
            exclude: Iterable[str] = (), semantic: bool = False, dir_mtime: bool = False,
            renames: bool = False) -> Diff:
    """The changes from ``old`` to ``new``: an iterable of :class:`Change`, parents first.

    old, new: a :class:`~layerfs.diff.sources.Source`, a path (directory, layer
    tarball, OCI layout or docker-archive, detected) or a prefixed spec
    (``oci:PATH:TAG``, ``docker-archive:PATH:REF``, ``dir:``, ``layer:``,
    ``upper:``, ``store:``; ``#N`` picks layer N).  view / old_view / new_view:
    "effective" (default) or "raw".  ignore: field names (see IGNORABLE) and
    "xattr:NAME" globs; semantic: ignore what reproducible builds do not care
    about (mtimes; owner names, entry order, compression and tar format never
    count); include / exclude: path globs (a pattern without "/" matches any
    component); renames: pair deleted and added files of equal content.
    """
    opts = Options.make(ignore=ignore, include=include, exclude=exclude, dir_mtime=dir_mtime,
                        renames=renames, semantic=semantic)
    a = open_source(old, old_view or view)
    try:
        b = open_source(new, new_view or view)
    except BaseException:
        if a is not old:
            a.close()
        raise
    return Diff(a, b, opts, tuple(s for s, arg in ((a, old), (b, new)) if s is not arg))


def compare_sources(old: Source, new: Source, options: Optional[Options] = None) -> Diff:
    return Diff(old, new, options or Options())


def tree_changes(old_root, new_root, *, dir_mtime: bool = False) -> Iterator["TreeChange"]:
    """The engine's answer in the shape of :func:`~layerfs.diff.trees.compare_trees`
    (TreeChange records, same order and kinds) for the storage drivers' naive
    diff: the walk and the byte comparisons run in the C core.  old_root None
    stands for an empty tree.  Fields as the engine names them (a size change
    also carries "content"; a symlink's target, not its size)."""
    from .sources import DirectorySource, empty_source
    from .trees import TreeChange
    old = empty_source() if old_root is None else DirectorySource(old_root)
    d = Diff(old, DirectorySource(new_root), Options.make(dir_mtime=dir_mtime))
    for c in d:
        if c.path == "/" and old_root is None:
            continue
        yield TreeChange(c.path, c.kind, dict(c.fields), c.type)


def as_layer_changes(changes: Iterable[Change]) -> List[Tuple[str, str]]:
    """(path, kind) pairs for :func:`layerfs.archive.create_layer`: a rename is
    a deletion of the old path and the new path written."""
    out: List[Tuple[str, str]] = []
    for c in changes:
        if c.kind == "renamed":
            out.append((c.old_path or c.path, "deleted"))
            out.append((c.path, "added"))
        elif c.kind == "deleted":
            out.append((c.path, "deleted"))
        else:
            out.append((c.path, c.kind))
    return out


__all__ = ["Change", "Diff", "IGNORABLE", "Options", "Summary", "as_layer_changes", "compare",
           "compare_meta", "compare_sources", "tree_changes"]
