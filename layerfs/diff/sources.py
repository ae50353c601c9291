"""Sources for the diff engine: anything that holds a tree of files.

A :class:`Source` gives a map ``path -> EntryMeta`` (metadata only, never file
content) in one of two views:

``effective``
    what a container would see: layers applied in order, whiteouts resolved.
    The default for everything.
``raw``
    a layer's own entries: whiteouts appear as entries of type ``"whiteout"``,
    opaque directories carry ``opaque=True``.

Kinds of source (:func:`open_source` detects them, or takes a prefix):

==================  =====================================================
``dir:PATH``        a directory, walked with lstat; content hashed lazily
``layer:PATH``      a layer tarball (plain, gzip, zstd) listed by the C core
                    without extracting (``lfs_scan``), content digests included
``oci:PATH[:TAG]``  an OCI image layout (directory or tar)
``docker-archive:PATH[:REF]``  a ``docker save`` tarball
``upper:PATH``      an overlay upper directory (char 0:0 whiteouts, opaque
                    xattrs); raw view by default
``store:REF``       an image of a layerfs store (name, id, id prefix) or a layer by
                    ChainID (with the layers below it); the store at $LAYERFS_ROOT
                    or the default root unless ``store_root`` is given
``empty:``          an empty tree (``layerfs diff --raw empty: LAYER``: a layer's own changes)
==================  =====================================================

A ``#N`` suffix on an image or layer stack picks layer N (0 is the bottom,
-1 the top): the effective view of the layers up to N, or the raw view of
layer N.

Memory is O(entries): each entry is one slotted :class:`EntryMeta`.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import threading
from typing import (Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Set,
                    Tuple, Union)

from .. import _native
from .._io import lexical_parts, open_source as _open_stream
from ..errors import LayerError, NotFound, NotSupported
from .trees import OVERLAY_PRIVATE_XATTRS, content_digest, read_xattrs, type_name

EFFECTIVE, RAW = "effective", "raw"
VIEWS = (EFFECTIVE, RAW)

# EntryMeta.flags
IMPLICIT = 1        # a directory no entry described (parent of an entry of a tar)
OPAQUE = 2          # raw view: an opaque directory (lower contents hidden)
COARSE = 4          # mtime from a tar header without sub-second part: may be truncated

_WALK_TYPES = {"0": "file", "2": "symlink", "3": "char", "4": "block", "5": "dir", "6": "fifo",
               "s": "socket"}
_TAR_TYPES = {"0": "file", "2": "symlink", "3": "char", "4": "block", "5": "dir", "6": "fifo"}
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"


_KEY_KEEPS = frozenset({"content", "link", "layer", "inode", "flags", "data"})


class EntryMeta:
    """The metadata of one entry of a tree.

    type: "file", "dir", "symlink", "char", "block", "fifo", "socket", or in
    raw views "whiteout" and "hardlink" (a link to a file of a lower layer);
    mode: permission bits (07777); size: bytes of a regular file (0
    otherwise); mtime_ns: modification time in ns; linkname: symlink target
    (a "hardlink"'s: the path it links to); rdev: (major, minor) of a
    device; xattrs: name -> bytes; digest: "sha256:<hex>" of a regular
    file's content when known; content: the file to read it from
    (directory sources); link: hardlink group key
    (entries with the same key share one inode); layer: index of the layer
    that last wrote the entry (image sources); inode: (dev, ino) of a
    directory source's entry; flags: IMPLICIT, OPAQUE, COARSE; key: a value the
    source made of the record it read (everything above but content, link,
    layer, inode and flags), or None: two entries from the same kind of record
    with equal keys have the same metadata (a shortcut for the engine; unequal
    keys tell nothing); data: where a regular file's bytes start in the layer
    file of a source that reads them there on demand (digest None until then).
    """
    __slots__ = ("type", "mode", "uid", "gid", "size", "mtime_ns", "linkname", "rdev",
                 "xattrs", "digest", "content", "link", "layer", "inode", "flags", "key",
                 "data")

    def __init__(self, type: str, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0,
                 mtime_ns: int = 0, linkname: str = "", rdev: Optional[Tuple[int, int]] = None,
                 xattrs: Optional[Dict[str, bytes]] = None, digest: Optional[str] = None,
                 content: Optional[bytes] = None, link: Any = None, layer: Optional[int] = None,
                 inode: Optional[Tuple[int, int]] = None, flags: int = 0,
                 key: Any = None, data: Optional[int] = None):
        self.type = type
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_ns = mtime_ns
        self.linkname = linkname
        self.rdev = rdev
        self.xattrs = xattrs if xattrs is not None else {}
        self.digest = digest
        self.content = content
        self.link = link
        self.layer = layer
        self.inode = inode
        self.flags = flags
        self.key = key
        self.data = data

    def copy(self, **changes) -> "EntryMeta":
        m = EntryMeta.__new__(EntryMeta)
        for k in EntryMeta.__slots__:
            setattr(m, k, changes[k] if k in changes else getattr(self, k))
        if "key" not in changes and not _KEY_KEEPS.issuperset(changes):
            m.key = None
        return m

    @property
    def implicit(self) -> bool:
        return bool(self.flags & IMPLICIT)

    @property
    def opaque(self) -> bool:
        return bool(self.flags & OPAQUE)

    def as_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"type": self.type}
        if self.type not in ("whiteout",):
            d.update(mode=self.mode, uid=self.uid, gid=self.gid, mtime_ns=self.mtime_ns)
        if self.type == "file":
            d["size"] = self.size
            if self.digest:
                d["digest"] = self.digest
        if self.type == "symlink":
            d["linkname"] = self.linkname
        if self.rdev is not None and self.type in ("char", "block"):
            d["rdev"] = list(self.rdev)
        if self.xattrs:
            import base64
            d["xattrs"] = {k: base64.b64encode(v).decode() for k, v in sorted(self.xattrs.items())}
        if self.layer is not None:
            d["layer"] = self.layer
        if self.flags & OPAQUE:
            d["opaque"] = True
        if self.flags & IMPLICIT:
            d["implicit"] = True
        return d

    def __repr__(self) -> str:
        return f"EntryMeta({self.as_dict()!r})"


class _Task:
    """The result of a call made on another thread (a small future)."""
    __slots__ = ("_done", "_value", "_error")

    def __init__(self):
        self._done = threading.Event()
        self._value: Any = None
        self._error: Optional[BaseException] = None

    def _run(self, fn, args) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to result()
            self._error = e
        finally:
            self._done.set()

    def wait(self) -> None:
        self._done.wait()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


def _in_thread(fn, *args) -> _Task:
    """fn(*args) on a new thread."""
    task = _Task()
    threading.Thread(target=task._run, args=(fn, args), name="layerfs-diff",
                     daemon=True).start()
    return task


class _LazyDigest:
    """A LayerInfo digest attribute.  An uncompressed layer read in place is not
    hashed by its scan: its digest (which is its DiffID) is computed when either
    is first asked for."""

    def __init__(self, slot: str):
        self.slot = slot

    def __get__(self, layer: Optional["LayerInfo"], owner=None):
        if layer is None:
            return self
        value = getattr(layer, self.slot)
        if value is None and layer._hash_later is not None:
            later, layer._hash_later = layer._hash_later, None
            d = later()
            for slot in ("_digest", "_diff_id"):
                if getattr(layer, slot) is None:
                    setattr(layer, slot, d)
            value = getattr(layer, self.slot)
        return value

    def __set__(self, layer: "LayerInfo", value: Optional[str]) -> None:
        setattr(layer, self.slot, value)


class LayerInfo:
    """One layer of a stack: where it comes from and what the image says of it."""
    __slots__ = ("index", "name", "_digest", "_diff_id", "size", "tar_size", "media_type",
                 "created_by", "comment", "created", "_open", "_hash_later", "hash_early")
    digest = _LazyDigest("_digest")
    diff_id = _LazyDigest("_diff_id")

    def __init__(self, index: int, name: str, open: Callable[[], Any], *,
                 digest: Optional[str] = None, diff_id: Optional[str] = None,
                 size: Optional[int] = None, media_type: Optional[str] = None,
                 created_by: Optional[str] = None, comment: Optional[str] = None,
                 created: Optional[str] = None):
        self.index = index
        self.name = name
        self._open = open
        self._digest = digest
        self._diff_id = diff_id
        self._hash_later: Optional[Callable[[], str]] = None
        # a scan that does not hash the layer starts hashing it in a thread at
        # once (for output that will show the digest), rather than when asked
        self.hash_early = False
        self.size = size
        self.tar_size: Optional[int] = None
        self.media_type = media_type
        self.created_by = created_by
        self.comment = comment
        self.created = created

    def open(self):
        """A path or a binary stream of the layer blob (compressed or not)."""
        return self._open()

    @contextlib.contextmanager
    def stream(self) -> Iterator[Tuple[int, str]]:
        """(readable fd, name) of the layer blob, closed afterwards."""
        src = self.open()
        try:
            with _open_stream(src) as opened:
                yield opened
        finally:
            close = getattr(src, "close", None)
            if close is not None:
                close()

    def as_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"index": self.index}
        for k in ("digest", "diff_id", "size", "tar_size", "media_type", "created_by",
                  "comment", "created"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


# ----------------------------------------------------------------- paths

def norm_path(name: str) -> str:
    """A tar member name or relative path as "/a/b" ("/" for the root)."""
    p = name[2:] if name.startswith("./") else name.lstrip("/")
    p = p.rstrip("/")
    if p and "//" not in p and "/./" not in p and "/../" not in p and p != "." and \
            p != ".." and not p.startswith(("./", "../")) and not p.endswith(("/.", "/..")):
        return "/" + p
    return "/" + "/".join(lexical_parts(name))


def parent_of(path: str) -> str:
    if path == "/":
        return ""
    i = path.rfind("/")
    return path[:i] or "/"


def sort_key(path: str) -> bytes:
    """Sort key of the engine's order: parents first, then each directory's
    entries by name as bytes (the order of ``trees.path_key``: with "/" as the
    lowest byte, comparing whole paths compares them component by component)."""
    return path.encode("utf-8", "surrogateescape").replace(b"/", b"\0")


def sort_paths(paths: Iterable[str]) -> List[str]:
    """Paths in the engine's order: parents first, then entries by name (bytes)."""
    return sorted(paths, key=sort_key)


# ----------------------------------------------------------------- the tree of a stack

class Tree:
    """An effective tree being built: path -> EntryMeta, plus each directory's
    children, so that removing a subtree costs the size of the subtree."""

    def __init__(self):
        self.entries: Dict[str, EntryMeta] = {}
        self.children: Dict[str, Set[str]] = {}

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def get(self, path: str) -> Optional[EntryMeta]:
        return self.entries.get(path)

    def _link_child(self, path: str) -> None:
        if path == "/":
            return
        self.children.setdefault(parent_of(path), set()).add(path)

    def ensure_parents(self, path: str, layer: Optional[int]) -> List[str]:
        """Create the missing directories above path as implicit ones (as an
        extraction would); a non-directory in the way is replaced."""
        made = []
        p = parent_of(path)
        missing = []
        while p:
            m = self.entries.get(p)
            if m is not None and m.type == "dir":
                break
            missing.append(p)
            p = parent_of(p)
        for p in reversed(missing):
            if p in self.entries:
                self.remove(p)
            self.entries[p] = EntryMeta("dir", 0o755, layer=layer, flags=IMPLICIT)
            self._link_child(p)
            made.append(p)
        return made

    def remove(self, path: str) -> List[Tuple[str, EntryMeta]]:
        """Remove path and everything below it; returns what was removed."""
        out: List[Tuple[str, EntryMeta]] = []
        m = self.entries.pop(path, None)
        if m is None:
            return out
        if path != "/":
            sib = self.children.get(parent_of(path))
            if sib is not None:
                sib.discard(path)
        out.append((path, m))
        stack = [path]
        while stack:
            d = stack.pop()
            kids = self.children.pop(d, None)
            if not kids:
                continue
            for k in kids:
                km = self.entries.pop(k, None)
                if km is not None:
                    out.append((k, km))
                    stack.append(k)
        return out

    def remove_children(self, path: str) -> List[Tuple[str, EntryMeta]]:
        out: List[Tuple[str, EntryMeta]] = []
        for k in list(self.children.get(path, ())):
            out.extend(self.remove(k))
        return out

    def put(self, path: str, meta: EntryMeta) -> List[Tuple[str, EntryMeta]]:
        """Set path to meta; returns the entries it replaced (a directory
        replaced by a non-directory takes its subtree along; a directory over a
        directory keeps the children)."""
        old = self.entries.get(path)
        replaced: List[Tuple[str, EntryMeta]] = []
        if old is not None:
            if old.type == "dir" and meta.type == "dir":
                replaced.append((path, old))
            else:
                replaced.extend(self.remove(path))
        self.entries[path] = meta
        self._link_child(path)
        return replaced


class FoldObserver:
    """Hooks called while layers are folded (see :mod:`layerfs.diff.layers`)."""

    def removed(self, layer: int, path: str, old: EntryMeta, new: Optional[EntryMeta],
                whiteout: bool) -> None:
        """old (at path) left the tree because layer wrote new over it (or a
        whiteout / opaque directory removed it, new None)."""

    def added(self, layer: int, path: str, new: EntryMeta, existed: bool) -> None:
        """layer wrote new at path (existed: something was there before)."""


def _scan_meta(e: "_native.ScanEntry", layer: Optional[int]) -> EntryMeta:
    t = _TAR_TYPES.get(e.type)
    if t is None:
        t = "hardlink" if e.type == "1" else "unknown"
    flags = COARSE if e.mtime_nsec == 0 else 0
    rdev = (e.devmajor, e.devminor) if t in ("char", "block") else None
    return EntryMeta(t, e.mode & 0o7777, e.uid, e.gid, e.size if t == "file" else 0,
                     e.mtime_sec * 1_000_000_000 + e.mtime_nsec,
                     e.linkname if t in ("symlink", "hardlink") else "", rdev,
                     e.xattrs or None, e.digest, None, None, layer, None, flags)


def scan_layer(layer: LayerInfo, factory: Optional[Callable[..., Any]] = None,
               offsets: bool = False) -> List["_native.ScanEntry"]:
    """The entries of one layer blob (C core; content hashed, nothing extracted).
    factory: see :func:`layerfs._native.scan`; offsets: instead of hashing
    the content, note where each (non-sparse) file's bytes start -- for an
    uncompressed layer file read from its start."""
    with layer.stream() as (fd, name):
        entries, digests = _native.scan(fd, name=layer.name or name, factory=factory,
                                        hash=not offsets, offsets=offsets,
                                        stream_hash=not offsets)
        if offsets and digests.compression != "none":
            raise ValueError(f"{layer.name}: compressed ({digests.compression}), "
                             "its content cannot be read in place")
    if digests.digest is None:
        if layer._digest is None or layer._diff_id is None:
            layer._hash_later = _in_thread(_hash_layer_blob, layer).result \
                if layer.hash_early else (lambda: _hash_layer_blob(layer))
    else:
        if layer._diff_id is None:
            layer.diff_id = digests.diff_id
        if layer._digest is None:
            layer.digest = digests.digest
    if layer.size is None:
        layer.size = digests.compressed_size
    layer.tar_size = digests.tar_size
    return entries


class _Classified:
    """A layer's entries split as :func:`_classify` does, made while it was scanned."""
    __slots__ = ("whiteouts", "opaques", "items")

    def __init__(self, whiteouts: List[str], opaques: List[str],
                 items: List[Tuple[str, EntryMeta]]):
        self.whiteouts, self.opaques, self.items = whiteouts, opaques, items


def _classifier(index: int) -> Callable[..., Any]:
    """A scan factory giving what _classify makes of each entry: (0, path,
    meta), (1, whiteout target), (2, opaque directory) or None (AUFS metadata)."""
    types, new = _TAR_TYPES, EntryMeta

    def make(name, typ, mode, uid, gid, size, msec, mnsec, dmaj, dmin, hoff, digest, link,
             xattrs, sparse, key, data_offset):
        path = norm_path(name)
        base = path[path.rfind("/") + 1:]
        if base.startswith(WH_PREFIX):
            d = parent_of(path)
            if base == WH_OPAQUE:
                return 2, d
            if base.startswith(WH_PREFIX + WH_PREFIX):
                return None               # AUFS private metadata (.wh..wh.plnk, ...)
            return 1, d.rstrip("/") + "/" + base[len(WH_PREFIX):]
        t = types.get(typ)
        if t is None:
            t = "hardlink" if typ == "1" else "unknown"
        m = new(t, mode & 0o7777, uid, gid, size if t == "file" else 0,
                msec * 1_000_000_000 + mnsec,
                link if t == "symlink" or t == "hardlink" else "",
                (dmaj, dmin) if t == "char" or t == "block" else None,
                xattrs or None, digest, None, None, index, None,
                COARSE if mnsec == 0 else 0, key,
                data_offset if data_offset >= 0 and t == "file" else None)
        if t == "hardlink":
            m.linkname = norm_path(m.linkname)
        return 0, path, m
    return make


def _hash_layer_blob(layer: LayerInfo) -> str:
    """sha256 of an uncompressed layer blob: its digest and its DiffID."""
    with layer.stream() as (fd, name):
        return _native.sha256_fd(fd, layer.name or name)[0]


def scan_classified(layer: LayerInfo, offsets: bool = False) -> _Classified:
    """scan_layer, split as fold_layer needs it (in the scan's reader thread)."""
    whiteouts: List[str] = []
    opaques: List[str] = []
    items: List[Tuple[str, EntryMeta]] = []
    for r in scan_layer(layer, _classifier(layer.index), offsets):
        if r is None:
            continue
        k = r[0]
        if k == 0:
            items.append((r[1], r[2]))
        elif k == 1:
            whiteouts.append(r[1])
        else:
            opaques.append(r[1])
    return _Classified(whiteouts, opaques, items)


def _fold_first(c: _Classified, index: int) -> Optional[Dict[str, EntryMeta]]:
    """fold_layer of the first layer onto an empty tree, for the common case
    (no path written twice, no non-directory where a directory should be):
    the map, or None when the general fold must do it.  Whiteouts and opaque
    directories have nothing below them to remove."""
    entries: Dict[str, EntryMeta] = {}
    get = entries.get
    for k, (path, m) in enumerate(c.items):
        t = m.type
        if t == "hardlink":
            target = get(m.linkname)
            if target is None or target.type == "dir":
                return None               # the general fold tells what is wrong
            if target.link is None:
                target.link = (index, k)
            m = target.copy(layer=index, flags=target.flags)
        elif t == "file":
            m.link = (index, k)
        if path in entries:
            return None
        if path != "/":
            p = parent_of(path)
            pm = get(p)
            if pm is None or pm.type != "dir":
                missing = []
                while p:
                    pm = get(p)
                    if pm is not None:
                        if pm.type != "dir":
                            return None
                        break
                    missing.append(p)
                    p = parent_of(p)
                for p in reversed(missing):
                    entries[p] = EntryMeta("dir", 0o755, layer=index, flags=IMPLICIT)
        entries[path] = m
    if "/" not in entries:
        entries["/"] = EntryMeta("dir", 0o755, layer=index, flags=IMPLICIT)
    return entries


def _classify(entries, index: int):
    """Split a layer's entries: (whiteout targets, opaque dirs, [(path, meta)])."""
    if isinstance(entries, _Classified):
        return entries.whiteouts, entries.opaques, entries.items
    whiteouts: List[str] = []
    opaques: List[str] = []
    items: List[Tuple[str, EntryMeta]] = []
    for e in entries:
        path = norm_path(e.path)
        base = path.rsplit("/", 1)[1]
        if base.startswith(WH_PREFIX):
            d = parent_of(path)
            if base == WH_OPAQUE:
                opaques.append(d)
            elif base.startswith(WH_PREFIX + WH_PREFIX):
                pass                      # AUFS private metadata (.wh..wh.plnk, ...)
            else:
                whiteouts.append((d.rstrip("/") + "/" + base[len(WH_PREFIX):]))
            continue
        m = _scan_meta(e, index)
        if m.type == "hardlink":
            m.linkname = norm_path(m.linkname)
        items.append((path, m))
    return whiteouts, opaques, items


def fold_layer(tree: Tree, entries: List["_native.ScanEntry"], index: int,
               observer: Optional[FoldObserver] = None,
               deleted_by: Optional[Dict[str, int]] = None) -> None:
    """Apply one layer's entries to tree (OCI semantics: the layer's whiteouts
    and opaque directories act on the lower layers only, wherever they stand
    in the archive; then entries in archive order, later duplicates winning)."""
    whiteouts, opaques, items = _classify(entries, index)
    # deleted_by: every path this layer removes (not only a whiteout's own), so
    # that a path removed again later is credited to the later layer
    for target in whiteouts:
        gone = tree.remove(target)
        if deleted_by is not None:
            for p, m in gone:
                deleted_by[p] = index
        if observer is not None:
            for p, m in gone:
                observer.removed(index, p, m, None, True)
    for d in opaques:
        gone = tree.remove_children(d)
        if deleted_by is not None:
            for p, m in gone:
                deleted_by[p] = index
        if observer is not None:
            for p, m in gone:
                observer.removed(index, p, m, None, True)
    # A content copy is named by (layer, entry number): a path written twice in
    # one layer is two copies (a hardlink made between them keeps the first).
    for k, (path, m) in enumerate(items):
        if m.type == "hardlink":
            target = tree.get(m.linkname)
            if target is None or target.type == "dir":
                raise LayerError(errno.ENOENT, f"hardlink to missing {m.linkname}",
                                 None, entry=path)
            if target.link is None:
                target.link = (index, k)
            # a hardlink shares the target's inode: its metadata and content
            m = target.copy(layer=index, flags=target.flags)
        elif m.type == "file":
            m.link = (index, k)        # this copy of the content (shared by hardlinks)
        if path != "/":
            for p in tree.ensure_parents(path, index):
                if observer is not None:
                    observer.added(index, p, tree.entries[p], False)
        existed = path in tree.entries
        gone = tree.put(path, m)
        if deleted_by is not None:
            for p, old in gone:
                if p != path:           # below a directory replaced by a non-directory
                    deleted_by[p] = index
        if observer is not None:
            for p, old in gone:
                observer.removed(index, p, old, m if p == path else None, False)
            observer.added(index, path, m, existed)
    if "/" not in tree.entries:
        tree.entries["/"] = EntryMeta("dir", 0o755, layer=index, flags=IMPLICIT)


def raw_layer_map(entries: List["_native.ScanEntry"], index: int) -> Dict[str, EntryMeta]:
    """A layer's own entries: whiteouts as "whiteout" entries, opaque dirs flagged.
    A path the layer both whites out and writes is its entry (a directory
    then flagged opaque: the lower one's entries are gone)."""
    whiteouts, opaques, items = _classify(entries, index)
    tree = Tree()
    for k, (path, m) in enumerate(items):
        if m.type == "hardlink":
            target = tree.get(m.linkname)
            if target is not None and target.type != "dir":
                if target.link is None:
                    target.link = (index, k)
                m = target.copy()
        elif m.type == "file":
            m.link = (index, k)
        tree.ensure_parents(path, index)
        tree.put(path, m)
    # A whiteout acts on the lower layers only: an entry of the layer at the
    # same path stays (a directory then hides the lower one's entries, as an
    # opaque one does).  The deepest first, so that a whited-out directory
    # takes the whiteouts below it along.
    own = set(tree.entries)

    def below_own_file(path: str) -> bool:
        # below a non-directory of the layer: nothing there to hide
        p = parent_of(path)
        while p and p not in own:
            p = parent_of(p)
        return bool(p) and tree.entries[p].type != "dir"

    for target in sorted(set(whiteouts), key=lambda p: p.count("/"), reverse=True):
        m = tree.get(target)
        if target in own and m is not None:
            if m.type == "dir":
                m.flags |= OPAQUE
            continue
        if below_own_file(target):
            continue
        tree.ensure_parents(target, index)
        tree.put(target, EntryMeta("whiteout", layer=index))
    for d in opaques:
        if d != "/" and below_own_file(d + "/"):
            continue
        m = tree.get(d)
        if m is None or m.type != "dir":
            tree.ensure_parents(d, index)
            m = EntryMeta("dir", 0o755, layer=index, flags=IMPLICIT)
            tree.put(d, m)
        m.flags |= OPAQUE
    if "/" not in tree.entries:
        tree.entries["/"] = EntryMeta("dir", 0o755, layer=index, flags=IMPLICIT)
    return tree.entries


# ----------------------------------------------------------------- sources

class Source:
    """Base class: something that yields a map of entries.

    Subclasses implement :meth:`_load`.  ``kind`` names the container
    ("dir", "layer", "oci", "docker-archive", "upper", "store"); ``layers``
    lists the layers of a stack (empty for directories); ``deleted_by`` maps
    a path a layer removed (by a whiteout, an opaque directory, or a
    non-directory written over a directory above it) to the index of the
    last layer that did (effective views of stacks).
    """
    kind = "source"
    #: what the entries' keys (EntryMeta.key) are made of; keys of two sources
    #: compare only when this is the same (and not None)
    key_kind: Optional[str] = None

    def __init__(self, name: str, view: Optional[str] = None):
        if view is not None and view not in VIEWS:
            raise ValueError(f"unknown view {view!r} (effective, raw)")
        self.name = name
        self.view = view or self.default_view
        self._entries: Optional[Dict[str, EntryMeta]] = None
        self.in_order = False        # entries() already in the engine's order (sort_key)
        self.deleted_by: Dict[str, int] = {}
        self.layers: List[LayerInfo] = []

    default_view = EFFECTIVE

    def entries(self) -> Dict[str, EntryMeta]:
        """path -> EntryMeta of the whole tree (built once)."""
        if self._entries is None:
            self._entries = self._load()
        return self._entries

    def _load(self) -> Dict[str, EntryMeta]:
        raise NotImplementedError

    # content -------------------------------------------------------------
    def digest(self, meta: EntryMeta) -> Optional[str]:
        """sha256 of a regular file's content (computed once, for directory sources)."""
        if meta.digest is None and meta.content is not None:
            meta.digest = content_digest(meta.content, read_errors=True)
        return meta.digest

    def open_content(self, meta: EntryMeta) -> Optional[BinaryIO]:
        """The content of a regular file, when the source can read it again."""
        if meta.content is not None:
            return open(meta.content, "rb")
        return None

    def layer_info(self, index: Optional[int]) -> Optional[LayerInfo]:
        if index is None or not self.layers or not 0 <= index < len(self.layers):
            return None
        return self.layers[index]

    def deleting_layer(self, path: str) -> Optional[int]:
        """The layer whose whiteout removed path (or an ancestor), if known."""
        if not self.deleted_by:
            return None
        p = path
        while p:
            i = self.deleted_by.get(p)
            if i is not None:
                return i
            p = parent_of(p)
        return None

    def describe(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "kind": self.kind, "view": self.view}
        if self.layers:
            d["layers"] = [l.as_dict() for l in self.layers]
        return d

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.view}>"



class DirectorySource(Source):
    """A directory tree, walked with lstat (no recursion limit); xattrs read
    with the walk, content only when the engine asks (:meth:`digest`)."""
    kind = "dir"
    key_kind = "walk"
    overlay = False

    def __init__(self, path, view: Optional[str] = None, name: Optional[str] = None):
        self.path = os.fsencode(path).rstrip(b"/") or b"/"
        super().__init__(name or os.fsdecode(path), view)
        st = os.lstat(self.path)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", os.fsdecode(path))

    def _meta(self, full: bytes, st: os.stat_result) -> EntryMeta:
        mode = st.st_mode
        fmt = mode & 0o170000
        m = EntryMeta(type_name(mode), mode & 0o7777, st.st_uid, st.st_gid,
                      0, st.st_mtime_ns, "", None, None, None, None, None, None,
                      (st.st_dev, st.st_ino), 0)
        if fmt == stat.S_IFREG:
            m.size = st.st_size
            m.content = full
            if st.st_nlink > 1:
                m.link = m.inode
        elif fmt == stat.S_IFLNK:
            m.linkname = os.fsdecode(os.readlink(full))
            m.mode = 0o777
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            m.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif fmt != stat.S_IFDIR and st.st_nlink > 1:
            m.link = m.inode
        try:
            if os.listxattr(full, follow_symlinks=False):
                m.xattrs = read_xattrs(full)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.ENOENT):
                raise
        return m

    def _load(self) -> Dict[str, EntryMeta]:
        if hasattr(_native, "walk"):
            return self._load_native()
        return self._load_python()

    def _load_native(self) -> Dict[str, EntryMeta]:
        """The walk in C (lfs_walk: lstat, link targets, xattrs, sorted), the
        records turned into entries as they arrive (in the walk's reader thread)."""
        out = dict(filter(None, _native.walk(os.fsdecode(self.path), self._walk_factory())))
        self.in_order = True          # lfs_walk: sorted preorder
        return out

    def load_compared(self, ref: "DirectorySource", trust_mtime: bool
                      ) -> Dict[str, Tuple[bool, Optional[str], Optional[str]]]:
        """Load the entries (as :meth:`entries`) while the C core compares each
        regular file with the same-size regular file at the same path of ref
        (lfs_walk_compare; see there for which pairs).  Returns {path: (same
        bytes, ref's digest, this one's digest)}, digests when they differ."""
        found, compared = _native.walk_compare(os.fsdecode(self.path), os.fsdecode(ref.path),
                                               trust_mtime=trust_mtime,
                                               factory=self._walk_factory())
        self._entries = dict(filter(None, found))
        self.in_order = True
        return {"/" + p: v for p, v in compared.items()}

    def _walk_factory(self) -> Callable[..., Optional[Tuple[str, EntryMeta]]]:
        """(path, EntryMeta) of a walk record, or None to leave it out."""
        root = self.path
        private = OVERLAY_PRIVATE_XATTRS
        types = _WALK_TYPES
        adjust = self._adjust
        plain = type(self)._adjust is DirectorySource._adjust
        new = EntryMeta

        def make(path, t, mode, uid, gid, nlink, size, mtime_ns, dmaj, dmin, dev, ino, link,
                 raw, key):
            t = types.get(t, "unknown")
            xattrs = {k: v for k, v in raw.items() if not k.startswith(private)} if raw else {}
            inode = (dev, ino)
            if t == "file":
                m = new(t, mode, uid, gid, size, mtime_ns, link, None, xattrs, None,
                        root + b"/" + os.fsencode(path) if path else root,
                        inode if nlink > 1 else None, None, inode, 0, key)
            elif t == "dir":
                m = new(t, mode, uid, gid, size, mtime_ns, link, None, xattrs, None, None, None,
                        None, inode, 0, key)
            else:
                m = new(t, 0o777 if t == "symlink" else mode, uid, gid, size, mtime_ns, link,
                        (dmaj, dmin) if t in ("char", "block") else None, xattrs, None, None,
                        inode if nlink > 1 else None, None, inode, 0, key)
            path = "/" + path
            if not plain:
                m.key = None
                if adjust(path, None, m, raw) is False:
                    return None
            return path, m

        return make

    def _load_python(self) -> Dict[str, EntryMeta]:
        out: Dict[str, EntryMeta] = {}
        root = self.path
        out["/"] = self._meta(root, os.lstat(root))
        self._adjust("/", root, out["/"])
        stack = [b""]
        while stack:
            rel = stack.pop()
            d = root + b"/" + rel if rel else root
            try:
                it = os.scandir(d)
            except FileNotFoundError:
                continue
            with it:
                for e in it:
                    r = rel + b"/" + e.name if rel else e.name
                    try:
                        st = e.stat(follow_symlinks=False)
                        m = self._meta(e.path, st)
                    except FileNotFoundError:
                        continue
                    path = "/" + os.fsdecode(r)
                    if self._adjust(path, e.path, m) is False:
                        continue
                    out[path] = m
                    if m.type == "dir":
                        stack.append(r)
        return out

    def _adjust(self, path: str, full: Optional[bytes], m: EntryMeta,
                raw_xattrs: Optional[Dict[str, bytes]] = None):
        return True


class OverlayUpperSource(DirectorySource):
    """An overlay upper directory: a char device 0:0 is a whiteout, a directory
    with the opaque xattr ("y") hides the lower contents.  Raw view by
    default; the effective view drops the whiteouts (the upper dir on its own)."""
    kind = "upper"
    default_view = RAW

    def _adjust(self, path: str, full: Optional[bytes], m: EntryMeta,
                raw_xattrs: Optional[Dict[str, bytes]] = None):
        if m.type == "char" and m.rdev == (0, 0):
            if self.view == EFFECTIVE:
                return False
            m.type, m.mode, m.uid, m.gid, m.mtime_ns, m.rdev = "whiteout", 0, 0, 0, 0, None
            m.xattrs = {}
            return True
        if m.type == "dir":
            for name in _OPAQUE_XATTRS:
                if raw_xattrs is not None:
                    value = raw_xattrs.get(name)
                else:
                    try:
                        value = os.getxattr(full, name, follow_symlinks=False)
                    except OSError:
                        continue
                if value == b"y":
                    if self.view == RAW:
                        m.flags |= OPAQUE
                    break
        return True


class LayerStackSource(Source):
    """One or more layer tarballs applied in order (an image is one of these).

    ``upto``: only the layers up to that index (negative from the top); the raw
    view shows that layer's own entries (default: the top layer)."""
    kind = "layer"
    key_kind = "scan"

    def __init__(self, layers: List[LayerInfo], name: str, view: Optional[str] = None,
                 upto: Optional[int] = None, threads: int = 2):
        super().__init__(name, view)
        if not layers:
            raise ValueError(f"{name}: no layers")
        self.all_layers = layers
        if upto is not None:
            n = len(layers)
            i = upto + n if upto < 0 else upto
            if not 0 <= i < n:
                raise NotFound(f"no layer {upto} (the image has {n})", name)
            layers = layers[:i + 1]
        self.layers = layers
        self.threads = max(1, threads)
        self.data_path: Optional[str] = None   # read_in_place(): the layer file

    def can_read_in_place(self) -> bool:
        """Whether this is one uncompressed layer file whose file contents the
        engine may read in place (pread) instead of hashing them all up front."""
        if type(self) is not LayerStackSource or len(self.layers) != 1 or \
                self._entries is not None:
            return False
        path = self.layers[0].open()
        if not isinstance(path, str):
            close = getattr(path, "close", None)
            if close is not None:
                close()
            return False
        try:
            with open(path, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    return False
                head = f.read(6)
        except OSError:
            return False
        return head[:2] != b"\x1f\x8b" and head[:4] != b"\x28\xb5\x2f\xfd"

    def read_in_place(self) -> None:
        """Load with each regular file's offset in the layer file instead of its
        digest (EntryMeta.data); :meth:`digest` and :meth:`fill_digests` read
        them on demand.  Only when :meth:`can_read_in_place`."""
        self.data_path = self.layers[0].open()

    def digest(self, meta: EntryMeta) -> Optional[str]:
        if meta.digest is None and meta.data is not None:
            self.fill_digests([meta])
        return super().digest(meta)

    def fill_digests(self, metas: List[EntryMeta]) -> None:
        """Compute the missing digests of metas read in place (one C call)."""
        todo = [m for m in metas if m.digest is None and m.data is not None]
        if not todo or self.data_path is None:
            return
        fd = os.open(self.data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            got = _native.ranges_compare(fd, -1, [(m.data, m.size, -1, -1) for m in todo])
        finally:
            os.close(fd)
        for m, (_, d, _) in zip(todo, got):
            m.digest = d

    def scans(self, layers: Optional[List[LayerInfo]] = None, classified: bool = False
              ) -> Iterator[Tuple[LayerInfo, List["_native.ScanEntry"]]]:
        """(layer, entries) for each layer in order; the C scans of the next
        layers run in other threads while the caller folds this one.
        classified: entries already split for fold_layer (scan_classified)."""
        layers = self.layers if layers is None else layers
        scan = scan_classified if classified else scan_layer
        if len(layers) == 1 or self.threads == 1:
            for l in layers:
                yield l, scan(l)
            return
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            futs = [pool.submit(scan, l) for l in layers[:self.threads]]
            nxt = len(futs)
            for i, l in enumerate(layers):
                entries = futs[i].result()
                futs[i] = None  # type: ignore[call-overload]  # drop the finished list
                if nxt < len(layers):
                    futs.append(pool.submit(scan, layers[nxt]))
                    nxt += 1
                yield l, entries

    def _load(self) -> Dict[str, EntryMeta]:
        if self.view == RAW:
            top = self.layers[-1]
            return raw_layer_map(scan_classified(top, self.data_path is not None), top.index)
        if len(self.layers) == 1:
            c = scan_classified(self.layers[0], self.data_path is not None)
            first = _fold_first(c, self.layers[0].index)
            if first is not None:
                return first
            tree = Tree()
            fold_layer(tree, c, self.layers[0].index, deleted_by=self.deleted_by)
            if "/" not in tree.entries:
                tree.entries["/"] = EntryMeta("dir", 0o755, flags=IMPLICIT)
            return tree.entries
        tree = Tree()
        for l, entries in self.scans(classified=True):
            fold_layer(tree, entries, l.index, deleted_by=self.deleted_by)
        if "/" not in tree.entries:
            tree.entries["/"] = EntryMeta("dir", 0o755, flags=IMPLICIT)
        return tree.entries


def _history_for_layers(history: List[Dict[str, Any]], n: int) -> List[Dict[str, Any]]:
    """The history entries of the layers (those without empty_layer), bottom
    first; padded with {} when the history is short."""
    out = [h for h in history if isinstance(h, dict) and not h.get("empty_layer")]
    if len(out) != n:
        out = out[:n] + [{}] * max(0, n - len(out))
    return out


class ImageSourceAdapter(LayerStackSource):
    """An image of an OCI layout or docker-archive (layerfs.images)."""

    def __init__(self, spec: str, view: Optional[str] = None, upto: Optional[int] = None,
                 name: Optional[str] = None, platform=None):
        from ..images.sources import open_image_source
        self._src = open_image_source(spec, platform=platform)
        try:
            images = self._src.images()
            if not images:
                raise NotFound("no image in the source", spec)
            if len(images) > 1:
                names = ", ".join((i.names or i.tags or [i.manifest_digest])[0] for i in images)
                raise ValueError(f"{spec}: {len(images)} images ({names}); choose one "
                                 f"with {self._src.format.split('-')[0]}:PATH:TAG")
            img = images[0]
            self.image = img
            hist = _history_for_layers(img.history, len(img.layers))
            layers = []
            for i, (desc, diff_id) in enumerate(zip(img.layers, img.diff_ids)):
                h = hist[i]
                layers.append(LayerInfo(
                    i, f"{spec} layer {i} ({desc.digest})",
                    (lambda d=desc: self._src.open_blob(d.digest, size=d.size)),
                    digest=desc.digest, diff_id=diff_id, size=desc.size,
                    media_type=desc.media_type, created_by=h.get("created_by"),
                    comment=h.get("comment"), created=h.get("created")))
            if not layers:
                raise NotFound("the image has no layers", spec)
            super().__init__(layers, name or spec, view, upto)
            self.kind = "docker-archive" if self._src.format == "docker-archive" else "oci"
        except BaseException:
            self._src.close()
            raise

    def describe(self) -> Dict[str, Any]:
        d = super().describe()
        d["image"] = {"id": self.image.config_digest, "manifest": self.image.manifest_digest,
                      "names": list(self.image.names or self.image.tags)}
        return d

    def close(self) -> None:
        self._src.close()


class StoreSource(LayerStackSource):
    """An image of a layerfs store (by name, image id or unique id prefix), or
    a layer by ChainID with the layers below it.  Each layer is read from its
    original blob when the store kept it, else rebuilt from its tar-split
    record.  The store lock is held shared until :meth:`close`."""

    def __init__(self, ref: str, view: Optional[str] = None, upto: Optional[int] = None,
                 root: Optional[str] = None, store=None):
        from ..store import Store
        self._own = store is None
        self.store = store if store is not None else Store(root or os.environ.get("LAYERFS_ROOT"),
                                                           sweep=False)
        self._hold = self.store.reading()
        self._hold.__enter__()
        try:
            layers, self.image = self._resolve(ref)
            super().__init__(layers, f"store:{ref}", view, upto)
            self.kind = "store"
        except BaseException:
            self.close()
            raise

    def _opener(self, chain_id: str, digest: Optional[str]):
        st = self.store
        blob = st.blob_path(digest) if digest else None
        if blob is not None and os.path.exists(blob):
            return lambda: blob
        rec = st.layer(chain_id)
        if rec is not None and rec.record and st.records and \
                os.path.exists(st.record_path(chain_id)):
            from ..store import _tarsplit

            def reassembled():
                return _tarsplit.open_reassembled(st.record_path(chain_id),
                                                  st.layer_files(chain_id))
            return reassembled

        def missing():
            raise NotFound(f"layer {chain_id}: neither its blob nor a tar-split record is in "
                           "the store", st.layer_dir(chain_id))
        return missing

    def _resolve(self, ref: str):
        import json as _json
        st = self.store
        try:
            img = st.resolve(ref).image
        except NotFound:
            img = None
        if img is not None:
            history: List[Dict[str, Any]] = []
            try:
                history = _json.loads(st.read_blob(img.config_digest)).get("history") or []
            except (OSError, ValueError, AttributeError):
                history = []
            hist = _history_for_layers(history, len(img.layers))
            layers = [LayerInfo(i, f"store:{ref} layer {i} ({il.chain_id})",
                                self._opener(il.chain_id, il.digest), digest=il.digest,
                                diff_id=il.diff_id, size=il.size, media_type=il.media_type,
                                created_by=hist[i].get("created_by"),
                                comment=hist[i].get("comment"), created=hist[i].get("created"))
                      for i, il in enumerate(img.layers)]
            if not layers:
                raise NotFound("the image has no layers", f"store:{ref}")
            return layers, img
        # a layer by ChainID: the chain below it, bottom first
        from ..digest import parse_digest
        try:
            chain = parse_digest(ref)
        except ValueError:
            raise NotFound(f"no image or layer {ref!r} in the store", st.root) from None
        recs = []
        c: Optional[str] = chain
        while c:
            rec = st.layer(c)
            if rec is None:
                raise NotFound(f"no image or layer {ref!r} in the store", st.root)
            recs.append(rec)
            c = rec.parent
        recs.reverse()
        return [LayerInfo(i, f"store layer {r.chain_id}", self._opener(r.chain_id, None),
                          diff_id=r.diff_id) for i, r in enumerate(recs)], None

    def describe(self) -> Dict[str, Any]:
        d = super().describe()
        d["store"] = self.store.root
        if self.image is not None:
            d["image"] = {"id": self.image.config_digest, "manifest": self.image.manifest_digest,
                          "names": self.store.names_of(self.image.manifest_digest)}
        return d

    def close(self) -> None:
        hold, self._hold = getattr(self, "_hold", None), None
        if hold is not None:
            hold.__exit__(None, None, None)
        if getattr(self, "_own", False):
            self._own = False
            self.store.close()


# ----------------------------------------------------------------- specs

_Factory = Callable[[str, Optional[str], Optional[int]], Source]
_TRANSPORTS: Dict[str, _Factory] = {}


def register_transport(prefix: str, factory: _Factory) -> None:
    """Make ``PREFIX:REST`` open with factory(REST, view, layer_index).

    The store registers ``store`` this way; until it does, ``store:`` says it
    is not available."""
    _TRANSPORTS[prefix] = factory


def _layer_file_source(path: str, view, upto) -> Source:
    if not os.path.isfile(path) and not os.path.exists(path):
        raise NotFound("no such layer tarball", path)
    return LayerStackSource([LayerInfo(0, path, lambda: path)], path, view, upto)


def _store_source(ref: str, view, upto, root: Optional[str] = None) -> Source:
    try:
        import layerfs.store  # noqa: F401
    except ImportError:
        raise NotSupported(f"store:{ref}: no layerfs store support in this build") from None
    return StoreSource(ref, view, upto, root=root)


register_transport("dir", lambda p, v, u: DirectorySource(p, v))
register_transport("upper", lambda p, v, u: OverlayUpperSource(p, v))
register_transport("layer", _layer_file_source)
register_transport("tar", _layer_file_source)
register_transport("store", _store_source)
register_transport("empty", lambda p, v, u: empty_source())

_IMAGE_PREFIXES = ("oci", "oci-archive", "docker-archive")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _looks_like_image_member(name: str) -> Optional[str]:
    n = name.lstrip("./")
    if n in ("oci-layout", "index.json"):
        return "oci"
    if n in ("manifest.json", "repositories"):
        return "docker-archive"
    parts = n.split("/")
    if len(parts) >= 3 and parts[0] == "blobs" and _HEX64.match(parts[2] or ""):
        return "oci"
    if len(parts) == 2 and _HEX64.match(parts[0]) and parts[1] in ("layer.tar", "json", "VERSION"):
        return "docker-archive"
    return None


class _Limited(io.RawIOBase):
    """At most ``limit`` bytes of a file, then end of file."""

    def __init__(self, f, limit: int):
        super().__init__()
        self.f, self.left = f, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.left <= 0:
            return 0
        data = self.f.read(min(len(b), self.left))
        self.left -= len(data)
        b[:len(data)] = data
        return len(data)


_TAR_REGULAR = (b"0", b"\0", b"7")
_TAR_KNOWN = _TAR_REGULAR + (b"1", b"2", b"3", b"4", b"5", b"6")


def _octal(field: bytes) -> int:
    """A numeric header field as tarfile reads it (octal, NUL-terminated)."""
    if field[:1] in (b"\x80", b"\xff"):
        raise ValueError("base-256 number")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _quick_detect(f, budget: int) -> Optional[str]:
    """detect_file's answer read from the headers directly, or None when the
    archive has anything this reader leaves to tarfile (bad checksums, global
    or Solaris extended headers, sparse files, base-256 sizes, ...)."""
    def skip(n: int) -> bool:
        n = (n + 511) // 512 * 512
        if n:
            f.seek(n, 1)        # past the end: the next header read comes short
        return True

    pax_name: Optional[str] = None
    pax_size: Optional[int] = None
    long_name: Optional[str] = None
    i = 0
    while True:
        buf = f.read(512)
        if len(buf) != 512:
            return None
        if buf.count(0) == 512:
            return "layer" if i else None
        try:
            chksum = _octal(buf[148:156])
            size = _octal(buf[124:136])
        except ValueError:
            return None
        if chksum != 256 + sum(buf[:148]) + sum(buf[156:]):
            return None
        t = buf[156:157]
        if t == b"x":
            data = f.read((size + 511) // 512 * 512)
            if len(data) < size:
                return None
            pos = 0
            data = data[:size]
            while pos < len(data):
                sp = data.find(b" ", pos)
                try:
                    n = int(data[pos:sp])
                except ValueError:
                    return None
                rec = data[sp + 1:pos + n]
                if n <= 0 or sp < 0 or not rec.endswith(b"\n") or b"=" not in rec:
                    return None
                k, v = rec[:-1].split(b"=", 1)
                if k == b"path":
                    pax_name = v.decode("utf-8", "surrogateescape")
                elif k == b"size":
                    try:
                        pax_size = int(v)
                    except ValueError:
                        return None
                elif k.startswith(b"GNU.sparse") or k == b"hdrcharset":
                    return None
                pos += n
            continue
        if t == b"L":
            data = f.read((size + 511) // 512 * 512)
            if len(data) < size:
                return None
            long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if t == b"K":
            if not skip(size):
                return None
            continue
        if t not in _TAR_KNOWN:
            return None
        name = buf[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = buf[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        is_dir = t == b"5" or (t == b"\0" and name.endswith("/"))
        if is_dir:
            name = name.rstrip("/")
        if prefix:
            name = prefix + "/" + name
        if long_name is not None:
            name = long_name
        if pax_name is not None:
            name = pax_name
        if is_dir:
            name = name.rstrip("/")
        if pax_size is not None:
            size = pax_size
        pax_name = pax_size = long_name = None
        if _looks_like_image_member(name):
            return "image"
        if i >= budget:
            return "layer"
        i += 1
        if t in _TAR_REGULAR and not skip(size):
            return None


def detect_file(path: str, budget: int = 200, compressed_bytes: int = 8 << 20) -> str:
    """"image" if the tarball at path holds an OCI layout or docker-archive
    (judged from its first ``budget`` members, and for a compressed file from
    its first ``compressed_bytes``), else "layer"."""
    with open(path, "rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        if head[:4] != b"\x28\xb5\x2f\xfd":
            if head[:2] == b"\x1f\x8b":
                import gzip
                quick = gzip.GzipFile(fileobj=io.BufferedReader(_Limited(raw, compressed_bytes)))
            else:
                quick = raw
            try:
                found = _quick_detect(quick, budget)
            except (OSError, EOFError, ValueError):
                found = None
            if found is not None:
                return found
    return _tarfile_detect(path, budget, compressed_bytes)


def _tarfile_detect(path: str, budget: int = 200, compressed_bytes: int = 8 << 20) -> str:
    """detect_file by Python's tarfile (every format it reads)."""
    import tarfile
    with open(path, "rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        f = raw if head[:2] != b"\x1f\x8b" and head[:4] != b"\x28\xb5\x2f\xfd" else \
            io.BufferedReader(_Limited(raw, compressed_bytes))
        mode = "r|*" if head[:2] == b"\x1f\x8b" else "r:"
        if head[:4] == b"\x28\xb5\x2f\xfd":
            try:
                import zstandard
            except ImportError:
                return "layer"
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            fileobj, mode = reader, "r|"
        else:
            fileobj = f
        try:
            with tarfile.open(fileobj=fileobj, mode=mode) as tf:
                for i, ti in enumerate(tf):
                    if _looks_like_image_member(ti.name):
                        return "image"
                    if i >= budget:
                        break
        except (tarfile.TarError, EOFError, OSError, ValueError):
            return "layer"
    return "layer"


def _split_layer_index(spec: str) -> Tuple[str, Optional[int]]:
    if os.path.lexists(spec):
        return spec, None
    m = re.match(r"^(.*)#(-?\d+)$", spec)
    if m:
        return m.group(1), int(m.group(2))
    return spec, None


SourceArg = Union[str, "os.PathLike[str]", Source]


def open_source(spec: SourceArg, view: Optional[str] = None, *, platform=None,
                store_root: Optional[str] = None) -> Source:
    """A :class:`Source` for a path, a prefixed spec, or a Source (returned as is).

    Detection without a prefix: a directory holding ``oci-layout`` or
    ``manifest.json`` is an image; another directory is a tree; a file whose
    first members look like an image archive is an image; another file is a
    layer tarball.
    """
    if isinstance(spec, Source):
        if view is not None and view != spec.view:
            raise ValueError(f"{spec.name}: already opened with the {spec.view} view")
        return spec
    text = os.fsdecode(os.fspath(spec))
    text, upto = _split_layer_index(text)
    if not os.path.lexists(text):
        prefix, sep, rest = text.partition(":")
        if sep and prefix in _IMAGE_PREFIXES:
            return ImageSourceAdapter(text, view, upto, platform=platform)
        if sep and prefix == "store" and _TRANSPORTS.get("store") is _store_source:
            return _store_source(rest, view, upto, root=store_root)
        if sep and prefix in _TRANSPORTS:
            return _TRANSPORTS[prefix](rest, view, upto)
        try:
            os.lstat(text)      # why it cannot be seen: a missing path, or no permission
        except (FileNotFoundError, NotADirectoryError):
            pass
        raise NotFound("no such file, directory or image", text)
    if os.path.isdir(text):
        if any(os.path.exists(os.path.join(text, n)) for n in ("oci-layout", "manifest.json")):
            return ImageSourceAdapter(text, view, upto, platform=platform)
        if upto is not None:
            raise ValueError(f"{text}: a directory has no layers to choose from")
        return DirectorySource(text, view)
    if detect_file(text) == "image":
        return ImageSourceAdapter(text, view, upto, platform=platform)
    return LayerStackSource([LayerInfo(0, text, lambda: text)], text, view, upto)


def layer_stack(paths: Iterable[SourceArg], view: Optional[str] = None,
                upto: Optional[int] = None) -> LayerStackSource:
    """Several layer tarballs (bottom first) as one stack."""
    infos = []
    for i, p in enumerate(paths):
        p = os.fsdecode(os.fspath(p))
        if not os.path.exists(p):
            raise NotFound("no such layer tarball", p)
        infos.append(LayerInfo(i, p, (lambda q=p: q)))
    name = " + ".join(l.name for l in infos)
    return LayerStackSource(infos, name, view, upto)


class MapSource(Source):
    """A source over a ready map (tests, other engines)."""
    kind = "map"

    def __init__(self, entries: Dict[str, EntryMeta], name: str = "<map>", view=None):
        super().__init__(name, view)
        self._entries = entries

    def _load(self):
        return self._entries


EMPTY_NAME = "<empty>"


def empty_source() -> Source:
    """An empty tree (just the root directory, implicit)."""
    return MapSource({"/": EntryMeta("dir", 0o755, flags=IMPLICIT)}, EMPTY_NAME)


__all__ = ["COARSE", "DirectorySource", "EFFECTIVE", "EntryMeta", "FoldObserver", "IMPLICIT",
           "ImageSourceAdapter", "LayerInfo", "LayerStackSource", "MapSource", "OPAQUE",
           "StoreSource",
           "OVERLAY_PRIVATE_XATTRS", "OverlayUpperSource", "RAW", "Source", "Tree", "VIEWS",
           "detect_file", "empty_source", "fold_layer", "layer_stack", "norm_path",
           "open_source", "parent_of", "raw_layer_map", "register_transport", "scan_layer",
           "sort_key", "sort_paths"]
