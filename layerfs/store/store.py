"""The image and layer store: one directory, one driver, images sharing layers.

Layout (see docs/architecture.md)::

    store.json                  {"version": 1, "driver": NAME, "driver_options": {...}}
    lock                        store lock (flock): shared while reading or adding,
                                exclusive while removing or sweeping
    meta.lock                   short exclusive lock around repositories.json and mounts/
    driver/                     the driver's root; its layer ids are ChainID hex
    layers/<chainid-hex>/       layer.json (LayerRecord), tar-split (record), usage
    blobs/sha256/<hex>          original blobs: layers, configs, manifests
    images/<manifest-hex>.json  ImageRecord
    repositories.json           {"names": {reference: manifest digest}}
    mounts/<manifest-hex>.json  {"count": N, "path": ...}: images mounted by `mount`
    locks/<chainid-hex>         flock held while that layer is being made
    tmp/                        staging; swept when the store is opened unused

Crash safety: every layer is made in the driver and in tmp/ first and becomes
visible only when its directory is renamed to ``layers/<hex>``; an image record
is written (staged, renamed) only after all its layers and blobs exist.  On
opening, when no other process uses the store, tmp/ and driver layers that have
no layer record are swept.

Concurrency: adders (load, import, tag, mount) share the store lock with
readers; a layer is made under its own lock, so two processes loading images on
the same base make each layer once.  Removers (rmi, prune) take the store lock
exclusively, so nothing is removed under a load that is about to reuse it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple

from .. import drivers as _drivers
from ..digest import parse_digest
from ..errors import LayerError, NotFound, PreconditionFailed
from ..images import reference
from ..images.manifest import layer_compression
from . import _tarsplit
from ._fs import (DamagedRecord, Flock, disk_usage, fsync_dir, read_json, read_record,
                  read_unsynced_json, remove_path, tmp_name, write_atomic, write_json_atomic)
from .records import ImageRecord, LayerRecord, hex_of

STORE_VERSION = 1
_SUBDIRS = ("blobs/sha256", "layers", "images", "mounts", "locks", "tmp")
#: every name a store puts in its root directory
STORE_ENTRIES = frozenset({d.split("/")[0] for d in _SUBDIRS} |
                          {"store.json", "lock", "meta.lock", "driver", "repositories.json"})


def default_root() -> str:
    """/var/lib/layerfs for root, else $XDG_DATA_HOME/layerfs (~/.local/share/layerfs)."""
    if os.geteuid() == 0:
        return "/var/lib/layerfs"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                          ".local", "share")
    return os.path.join(base, "layerfs")


class AmbiguousReference(LayerError, ValueError):
    def __init__(self, message: str, filename: Optional[str] = None):
        LayerError.__init__(self, errno.EINVAL, message, filename)


def tag_names(names: Iterable[str]) -> List[str]:
    """names normalised, each a tag: a reference with a digest cannot name an
    image (ValueError), nor can a bad one (ReferenceError)."""
    refs = [reference.parse(n) for n in names]
    for r in refs:
        if r.digest:
            raise ValueError(f"cannot name an image with a digest reference: {str(r)!r}")
    return [str(r) for r in refs]


@dataclass
class Resolved:
    """An image found by a reference, and how it was named."""
    image: ImageRecord
    name: Optional[str]            # the normalised name, when the reference was a name
    by_id: bool


@dataclass
class RemoveResult:
    untagged: List[str] = field(default_factory=list)
    deleted_images: List[str] = field(default_factory=list)   # config digests
    deleted_layers: List[str] = field(default_factory=list)   # ChainIDs
    deleted_blobs: List[str] = field(default_factory=list)
    reclaimed: int = 0

    def merge(self, other: "RemoveResult") -> None:
        self.untagged += other.untagged
        self.deleted_images += other.deleted_images
        self.deleted_layers += other.deleted_layers
        self.deleted_blobs += other.deleted_blobs
        self.reclaimed += other.reclaimed

    def to_json(self) -> dict:
        return {"untagged": self.untagged, "deleted_images": self.deleted_images,
                "deleted_layers": self.deleted_layers, "deleted_blobs": self.deleted_blobs,
                "reclaimed": self.reclaimed}


class Store:
    """An image and layer store at ``root`` (created on first use).

    ``driver``: the storage driver to use; on first use the best supported one
    is chosen and remembered in store.json, and a later different choice is
    refused.  Use as a context manager or call :meth:`close`.
    """

    def __init__(self, root: Optional[str] = None, driver: Optional[str] = None,
                 driver_options: Optional[dict] = None, *, sweep: bool = True,
                 durable: bool = True):
        self.root = os.path.abspath(os.fspath(root or default_root()))
        self.durable = durable
        os.makedirs(self.root, mode=0o711, exist_ok=True)
        for sub in _SUBDIRS:
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
        self._lock = Flock(self._p("lock"))
        self._lock_depth = 0
        self._lock_mode: Optional[int] = None
        checked = False
        with self._meta():
            try:
                conf = read_json(self._p("store.json"))
            except DamagedRecord as e:
                raise DamagedRecord(e.filename, e.why, f"not valid JSON ({e.why}); the "
                                    "store's configuration is damaged") from None
            if conf is None:
                checked = True          # drivers.default/get below probe the filesystem
                name = driver or _drivers.default(self._p("driver"))
                conf = {"version": STORE_VERSION, "driver": name,
                        "driver_options": dict(driver_options or {})}
                os.makedirs(self._p("driver"), mode=0o700, exist_ok=True)
                write_json_atomic(self._p("store.json"), conf, self._p("tmp"))
            elif driver and driver != conf.get("driver"):
                raise PreconditionFailed(
                    f"the store at {self.root} uses the {conf.get('driver')!r} driver, not "
                    f"{driver!r} (a store keeps one driver; use another --root)",
                    self._p("store.json"))
        if conf.get("version") != STORE_VERSION:
            raise LayerError(errno.EPROTO, f"unknown store version {conf.get('version')!r}",
                             self._p("store.json"))
        self.driver_name: str = conf["driver"]
        opts = dict(conf.get("driver_options") or {})
        opts.update(driver_options or {})
        if checked:
            self.driver = _drivers.get(self.driver_name, self._p("driver"), **opts)
        else:
            # The driver worked here when the store was made: skip its support probe
            # (overlay's is a test mount whose unmount syncs the whole filesystem).
            self.driver = _drivers.driver_class(self.driver_name)(self._p("driver"), **opts)
        self.records = _tarsplit.available()
        if sweep and self._lock.try_exclusive():
            try:
                self._sweep()
            finally:
                self._lock.release()

    # -- paths and locks --------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def tmp_dir(self) -> str:
        return self._p("tmp")

    def blob_path(self, digest: str) -> str:
        algo, h = parse_digest(digest).split(":", 1)
        return self._p("blobs", algo, h)

    def layer_dir(self, chain_id: str) -> str:
        return self._p("layers", hex_of(parse_digest(chain_id)))

    def _image_path(self, manifest_digest: str) -> str:
        return self._p("images", hex_of(manifest_digest) + ".json")

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        """The store lock, re-entrant within this object; an exclusive request
        inside a shared hold converts the lock (not atomically, as flock does)."""
        if self._lock_depth == 0:
            self._lock.acquire(mode)
            self._lock_mode = mode
        elif mode == fcntl.LOCK_EX and self._lock_mode != fcntl.LOCK_EX:
            fcntl.flock(self._lock.fd, fcntl.LOCK_EX)  # type: ignore[arg-type]
            prev, self._lock_mode = self._lock_mode, fcntl.LOCK_EX
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                fcntl.flock(self._lock.fd, prev)  # type: ignore[arg-type]
                self._lock_mode = prev
            return
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                self._lock.release()
                self._lock_mode = None

    def reading(self):
        """Hold the store lock shared (reading or adding)."""
        return self._locked(fcntl.LOCK_SH)

    def removing(self):
        """Hold the store lock exclusively (removing or sweeping)."""
        return self._locked(fcntl.LOCK_EX)

    @contextlib.contextmanager
    def _meta(self) -> Iterator[None]:
        lock = Flock(self._p("meta.lock"))
        with lock.exclusive():
            yield

    def layer_lock(self, chain_id: str) -> Flock:
        return Flock(self._p("locks", hex_of(chain_id)))

    def close(self) -> None:
        self.driver.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- layers -----------------------------------------------------------------------------
    def layer(self, chain_id: str) -> Optional[LayerRecord]:
        return read_record(os.path.join(self.layer_dir(chain_id), "layer.json"), LayerRecord)

    def layers(self) -> List[LayerRecord]:
        out = []
        for name in sorted(os.listdir(self._p("layers"))):
            if len(name) != 64:
                continue
            rec = read_record(self._p("layers", name, "layer.json"), LayerRecord)
            if rec is not None:
                out.append(rec)
        return out

    def record_path(self, chain_id: str) -> str:
        return os.path.join(self.layer_dir(chain_id), "tar-split")

    def layer_files(self, chain_id: str) -> str:
        """The directory holding the files the layer's tar unpacked to (the driver's diff)."""
        meta = self.driver.metadata(hex_of(chain_id))
        return str(meta.get("diff") or meta.get("dir"))

    def layer_usage(self, chain_id: str) -> int:
        """Disk bytes of the layer: its driver directory and its record (cached)."""
        d = self.layer_dir(chain_id)
        cached = read_unsynced_json(os.path.join(d, "usage.json"))
        if cached and isinstance(cached.get("bytes"), int):
            return cached["bytes"]
        n = disk_usage(self.layer_files(chain_id)) + disk_usage(self.record_path(chain_id)) + \
            disk_usage(os.path.join(d, "layer.json"))
        with contextlib.suppress(OSError):
            write_json_atomic(os.path.join(d, "usage.json"), {"bytes": n}, self.tmp_dir,
                              sync=False)
        return n

    # -- blobs ------------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def blob_size(self, digest: str) -> Optional[int]:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            return None

    def read_blob(self, digest: str) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store", self.blob_path(digest)) from None

    def put_blob_bytes(self, digest: str, data: bytes) -> None:
        """Store a small blob (config, manifest) unless present; checks the digest."""
        from ..images.manifest import sha256_bytes
        if sha256_bytes(data) != digest:
            from ..errors import DigestMismatch
            raise DigestMismatch(f"blob bytes do not have digest {digest}", self.blob_path(digest))
        if not self.has_blob(digest):
            write_atomic(self.blob_path(digest), data, self.tmp_dir, sync=self.durable)

    def commit_blob_file(self, tmp: str, digest: str) -> None:
        """Move a verified temporary file into blobs/ (dropped when already there)."""
        dest = self.blob_path(digest)
        if os.path.exists(dest):
            os.unlink(tmp)
            return
        os.chmod(tmp, 0o644)
        os.rename(tmp, dest)

    def blob_needed(self, media_type: str, layer: Optional[LayerRecord]) -> bool:
        """Whether a layer blob must be kept: compressed blobs are; an uncompressed
        blob is the layer tar itself, which the tar-split record regenerates."""
        try:
            comp = layer_compression(media_type)
        except ValueError:
            comp = "unknown"
        if comp != "none":
            return True
        return not (layer is not None and layer.record and self.records)

    # -- images and names -------------------------------------------------------------------
    def image(self, manifest_digest: str) -> Optional[ImageRecord]:
        return read_record(self._image_path(manifest_digest), ImageRecord)

    def images(self) -> List[ImageRecord]:
        out = []
        for name in sorted(os.listdir(self._p("images"))):
            if not name.endswith(".json") or len(name) != 69:
                continue
            rec = read_record(self._p("images", name), ImageRecord)
            if rec is not None:
                out.append(rec)
        return out

    def put_image(self, rec: ImageRecord) -> None:
        if self.durable:
            # the blobs renamed into blobs/ reach the disk before the record
            # that makes the image visible names them
            fsync_dir(self._p("blobs", "sha256"))
        write_json_atomic(self._image_path(rec.manifest_digest), rec.to_json(), self.tmp_dir,
                          sync=self.durable)
        if self.durable:
            fsync_dir(self._p("images"))

    def names(self) -> Dict[str, str]:
        """Every name: normalised reference -> manifest digest."""
        doc = read_json(self._p("repositories.json")) or {}
        return dict(doc.get("names") or {})

    def _write_names(self, names: Dict[str, str]) -> None:
        write_json_atomic(self._p("repositories.json"), {"version": 1, "names": names},
                          self.tmp_dir, sync=self.durable)

    def names_of(self, manifest_digest: str, names: Optional[Dict[str, str]] = None) -> List[str]:
        names = self.names() if names is None else names
        return sorted(n for n, d in names.items() if d == manifest_digest)

    def set_names(self, manifest_digest: str, new_names: Iterable[str]) -> None:
        """Point names at an image (moving them from any other image, as docker tag does).
        Names are tags: a reference with a digest is refused (ValueError)."""
        new = tag_names(new_names)
        if not new:
            return
        with self._meta():
            names = self.names()
            changed = False
            for n in new:
                if names.get(n) != manifest_digest:
                    names[n] = manifest_digest
                    changed = True
            if changed:
                self._write_names(names)

    def tag(self, ref: str, new_name: str) -> str:
        """Give the image ``ref`` the name ``new_name`` (normalised; returned)."""
        with self.reading():
            img = self.resolve(ref).image
            r = reference.parse(new_name)
            if r.digest:
                raise ValueError(f"cannot tag with a digest reference: {new_name!r}")
            self.set_names(img.manifest_digest, [str(r)])
            return str(r)

    def resolve(self, ref: str) -> Resolved:
        """The image a reference names: a name ([registry/]repo[:tag][@digest]), an
        image id or manifest digest (sha256:<hex>), or a unique id prefix."""
        ref = ref.strip()
        names = self.names()
        name_error = None
        try:
            r = reference.parse(ref)
        except reference.ReferenceError as e:
            r, name_error = None, e
        if r is not None:
            if r.digest:
                img = self.image(r.digest) if r.digest.startswith("sha256:") else None
                if img is not None and (r.tag is None or names.get(str(r.with_tag(r.tag)))
                                        == r.digest):
                    return Resolved(img, None, False)
            else:
                d = names.get(str(r))
                if d:
                    img = self.image(d)
                    if img is not None:
                        return Resolved(img, str(r), False)
        hexpart = ref[len("sha256:"):] if ref.startswith("sha256:") else ref
        if 1 <= len(hexpart) <= 64 and all(c in "0123456789abcdef" for c in hexpart):
            found = {}
            for img in self.images():
                if hex_of(img.config_digest).startswith(hexpart) or \
                        (len(hexpart) == 64 and hex_of(img.manifest_digest) == hexpart):
                    found[img.manifest_digest] = img
            if len(found) == 1:
                return Resolved(next(iter(found.values())), None, True)
            if len(found) > 1:
                raise AmbiguousReference(f"{ref!r} matches {len(found)} images; give more of "
                                         "the id or a name")
        if r is None and name_error is not None:
            raise name_error
        raise NotFound(f"no such image: {ref}")

    # -- mounts -----------------------------------------------------------------------------
    def _mount_file(self, img: ImageRecord) -> str:
        return self._p("mounts", img.key + ".json")

    def _mount_state(self, img: ImageRecord) -> Tuple[int, Optional[str]]:
        doc = read_unsynced_json(self._mount_file(img)) or {}
        n, path = int(doc.get("count", 0)), doc.get("path")
        if n > 0 and img.top is not None and path:
            from ..drivers.base import is_mountpoint
            if not is_mountpoint(path):
                return 0, None          # stale: the mount went away (reboot, umount by hand)
        return n, path

    def mount_count(self, img: ImageRecord) -> int:
        return self._mount_state(img)[0]

    def mounted_path(self, img: ImageRecord) -> Optional[str]:
        n, path = self._mount_state(img)
        return path if n > 0 else None

    def mount(self, ref: str) -> str:
        """Mount a read-only view of the image and return its path (counted: each
        mount needs one unmount)."""
        with self.reading():
            img = self.resolve(ref).image
            with self._meta():
                n, _ = self._mount_state(img)
                if img.top is None:
                    path = self._p("mounts", img.key + ".empty")
                    os.makedirs(path, mode=0o555, exist_ok=True)
                else:
                    path = self.driver.mount(hex_of(img.top))
                write_json_atomic(self._mount_file(img), {"count": n + 1, "path": path},
                                  self.tmp_dir, sync=False)
                return path

    def unmount(self, ref: str, *, all_mounts: bool = False) -> int:
        """Drop one mount of the image (all with all_mounts); returns how many remain."""
        with self.reading():
            img = self.resolve(ref).image
            with self._meta():
                return self._unmount(img, all_mounts)

    def _unmount(self, img: ImageRecord, all_mounts: bool) -> int:
        doc = read_unsynced_json(self._mount_file(img)) or {}
        n = int(doc.get("count", 0))
        if n <= 0:
            raise PreconditionFailed(f"image {img.id} is not mounted")
        alive, _ = self._mount_state(img)
        drop = n if all_mounts else 1
        if img.top is not None:
            for _ in range(drop):
                try:
                    self.driver.unmount(hex_of(img.top))
                except PreconditionFailed:
                    break               # the driver has no mount left (stale count)
        left = n - drop if alive else 0
        if left <= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._mount_file(img))
            remove_path(self._p("mounts", img.key + ".empty"))
        else:
            write_json_atomic(self._mount_file(img), {"count": left, "path": doc.get("path")},
                              self.tmp_dir, sync=False)
        return max(left, 0)

    # -- removal ----------------------------------------------------------------------------
    def rmi(self, ref: str, *, force: bool = False) -> RemoveResult:
        """Remove a name, or an image with the layers and blobs nothing else uses.

        A name of an image that has other names is only untagged.  An image
        that is mounted, or (by id) has several names, is refused unless force
        (which unmounts it)."""
        with self.removing():
            res = self.resolve(ref)
            img = res.image
            out = RemoveResult()
            with self._meta():
                names = self.names()
                own = self.names_of(img.manifest_digest, names)
                if res.name is not None and len(own) > 1:
                    del names[res.name]
                    self._write_names(names)
                    out.untagged.append(res.name)
                    return out
                if res.by_id and len(own) > 1 and not force:
                    raise PreconditionFailed(
                        f"image {img.id} has several names ({', '.join(own)}): remove them "
                        "one by one, or force")
                if self.mount_count(img) > 0:
                    if not force:
                        raise PreconditionFailed(
                            f"image {img.id} is in use: mounted at {self.mounted_path(img)} "
                            "(unmount it, or force)")
                    self._unmount(img, True)
                for n in own:
                    del names[n]
                    out.untagged.append(n)
                self._write_names(names)
                self._drop_image_record(img)
                out.deleted_images.append(img.id)
            out.merge(self._gc(set(img.chain_ids), set(img.blob_digests())))
            return out

    def _drop_image_record(self, img: ImageRecord) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._image_path(img.manifest_digest))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._mount_file(img))

    def _references(self) -> Tuple[Set[str], Set[str]]:
        layers: Set[str] = set()
        blobs: Set[str] = set()
        for img in self.images():
            layers.update(img.chain_ids)
            blobs.update(img.blob_digests())
        return layers, blobs

    def _gc(self, layer_candidates: Optional[Set[str]],
            blob_candidates: Optional[Set[str]]) -> RemoveResult:
        """Remove candidate layers and blobs (None: all) that no image references.
        Caller holds the store lock exclusively."""
        out = RemoveResult()
        used_layers, used_blobs = self._references()
        records = {l.chain_id: l for l in self.layers()}
        doomed = {c for c in (records if layer_candidates is None else layer_candidates)
                  if c in records and c not in used_layers}
        grew = True
        while grew:                      # unreferenced layers above a doomed one go too
            grew = False
            for c, l in records.items():
                if c not in doomed and l.parent in doomed and c not in used_layers:
                    doomed.add(c)
                    grew = True

        # A layer mounted through the driver without the store counting it (a
        # `mount` killed before it wrote its count) cannot be removed: it stays,
        # with the layers under it, until a prune after the unmount.
        for c in [c for c in doomed if self._driver_view_mounted(hex_of(c))]:
            while c in records and c in doomed:
                doomed.discard(c)
                c = records[c].parent  # type: ignore[assignment]

        def depth(c: str) -> int:
            n = 0
            while c in records and records[c].parent:
                c = records[c].parent  # type: ignore[assignment]
                n += 1
            return n

        for c in sorted(doomed, key=depth, reverse=True):
            out.reclaimed += self._remove_layer(c)
            out.deleted_layers.append(c)
        if blob_candidates is None:
            blob_candidates = set(self.blob_digests())
        for d in sorted(blob_candidates):
            if d in used_blobs:
                continue
            p = self.blob_path(d)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            os.unlink(p)
            out.reclaimed += st.st_blocks * 512
            out.deleted_blobs.append(d)
        return out

    def _driver_view_mounted(self, hexid: str) -> bool:
        """Whether the driver has the layer's view mounted (what its remove refuses)."""
        from ..drivers.base import is_mountpoint
        try:
            meta = self.driver.metadata(hexid)
        except NotFound:
            return False
        merged = meta.get("merged")
        return bool(meta.get("mount_count")) and isinstance(merged, str) and \
            is_mountpoint(merged)

    def _remove_layer(self, chain_id: str) -> int:
        """Make the layer invisible (rename its record away), then remove it from
        the driver; returns the bytes reclaimed."""
        hexid = hex_of(chain_id)
        size = 0
        with contextlib.suppress(OSError):
            size = self.layer_usage(chain_id)
        trash = tmp_name(self.tmp_dir, f"rm-{hexid[:12]}")
        os.rename(self.layer_dir(chain_id), trash)
        try:
            self._remove_driver_layer(hexid)
        except BaseException:
            os.rename(trash, self.layer_dir(chain_id))     # the layer stays whole
            raise
        remove_path(trash)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._p("locks", hexid))
        return size

    def _remove_driver_layer(self, hexid: str) -> None:
        """Remove a driver layer and any record-less layers above it (leftovers)."""
        try:
            self.driver.get(hexid)
        except NotFound:
            return
        for info in reversed(self.driver.layers()):
            if info.parent == hexid:
                self._remove_driver_layer(info.id)
        self.driver.remove(hexid)

    def blob_digests(self) -> List[str]:
        d = self._p("blobs", "sha256")
        return ["sha256:" + n for n in sorted(os.listdir(d)) if len(n) == 64]

    def prune(self, *, blobs: bool = False, untagged: bool = False) -> RemoveResult:
        """Remove what no image references (layers, blobs, leftovers); with
        ``untagged`` first the images without a name that are not mounted; with
        ``blobs`` also the layer blobs the tar-split records can regenerate."""
        with self.removing():
            out = RemoveResult()
            self._sweep()
            if untagged:
                with self._meta():
                    named = set(self.names().values())
                    for img in self.images():
                        if img.manifest_digest not in named and self.mount_count(img) == 0:
                            self._drop_image_record(img)
                            out.deleted_images.append(img.id)
            out.merge(self._gc(None, None))
            if blobs:
                for img in self.images():
                    for l in img.layers:
                        rec = self.layer(l.chain_id)
                        if rec is None or not rec.record or not self.records:
                            continue
                        p = self.blob_path(l.digest)
                        try:
                            st = os.stat(p)
                        except FileNotFoundError:
                            continue
                        os.unlink(p)
                        out.reclaimed += st.st_blocks * 512
                        out.deleted_blobs.append(l.digest)
            for name in os.listdir(self._p("locks")):
                if len(name) == 64 and not os.path.isdir(self._p("layers", name)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._p("locks", name))
            return out

    # -- sweeping ---------------------------------------------------------------------------
    def _sweep(self) -> List[str]:
        """Remove what interrupted operations left (caller holds the lock exclusively):
        tmp/, record-less driver layers, layer directories without layer.json."""
        swept = []
        for name in os.listdir(self.tmp_dir):
            remove_path(os.path.join(self.tmp_dir, name))
            swept.append(f"tmp/{name}")
        for name in os.listdir(self._p("layers")):
            p = self._p("layers", name)
            if not os.path.exists(os.path.join(p, "layer.json")):
                remove_path(p)
                swept.append(f"layers/{name}")
        recorded = {n for n in os.listdir(self._p("layers"))}
        for info in reversed(self.driver.layers()):
            if info.id not in recorded:
                try:
                    self._remove_driver_layer(info.id)
                except NotFound:
                    pass
                except PreconditionFailed:
                    continue        # mounted: left for a later sweep (fsck reports it)
                swept.append(f"driver layer {info.id}")
        for name in os.listdir(self._p("images")):
            if not (name.endswith(".json") and len(name) == 69):
                remove_path(self._p("images", name))
                swept.append(f"images/{name}")
        return swept

    # -- loading, importing, saving, checking (see load.py, save.py, fsck.py) ---------------
    def load(self, source, **kw):
        from .load import load
        return load(self, source, **kw)

    def import_rootfs(self, tarball, name: Optional[str] = None, **kw):
        from .load import import_rootfs
        return import_rootfs(self, tarball, name, **kw)

    def save(self, refs, dest, fmt: str = "oci", **kw):
        from .save import save
        return save(self, refs, dest, fmt, **kw)

    def fsck(self, **kw):
        from .fsck import fsck
        return fsck(self, **kw)

    def df(self):
        from .usage import df
        return df(self)


__all__ = ["Store", "Resolved", "RemoveResult", "AmbiguousReference", "default_root"]
