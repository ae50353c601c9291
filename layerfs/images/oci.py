"""OCI image layouts: read one (directory or tarball), write one.

A layout is ``oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``index.json``
(an image index whose entries are the layout's images, named by the
``org.opencontainers.image.ref.name`` annotation) and ``blobs/sha256/<hex>``.

Reading resolves each entry of index.json to one image manifest: an entry that
is itself an index (a multi-platform image) is narrowed to the wanted platform,
through nested indexes too.  Writing copies each image's blobs and manifest as
they are (same digests), once per layout, and lists the manifest in index.json
under each of its names the way skopeo and buildkit do: the tag in
``org.opencontainers.image.ref.name``, the full name in ``io.containerd.image.name``.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

from ..errors import AlreadyExists, DigestMismatch, NotFound
from . import reference
from ._io import CHUNK, DirFiles, TarWriter, fsync_dir, read_limited, staged_file, write_file_atomic
from ._model import (Blobs, ImageToWrite, LayerToWrite, SourceImage, blob_path_for,
                     check_image_to_write)
from .manifest import (ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME, CONFIG_TYPES, INDEX_TYPES,
                       LAYER_TYPES, MANIFEST_TYPES, MAX_JSON_BLOB, OCI_INDEX, Descriptor,
                       FormatError, Platform, Where, canonical_json, check_uncompressed_layers,
                       parse_index, parse_json, parse_manifest)

__all__ = ["ImageToWrite", "LayerToWrite", "NoMatchingPlatform", "read_oci_layout",
           "write_oci_layout", "names_from_annotations"]

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
_MAX_NESTING = 8


class NoMatchingPlatform(NotFound):
    """An index has no image for the wanted platform; ``available`` lists those it has."""

    def __init__(self, message: str, filename: Optional[str] = None, *,
                 available: Iterable[str] = (), **kw):
        NotFound.__init__(self, message, filename, **kw)
        self.available = list(available)


# --- names ----------------------------------------------------------------------------------

def _is_bare_tag(value: str) -> bool:
    return "/" not in value and ":" not in value and "@" not in value


def names_from_annotations(ann: Optional[dict], base_name: Optional[str] = None
                           ) -> Tuple[List[str], List[str]]:
    """(normalised names, bare tags) from a descriptor's annotations.

    ``io.containerd.image.name`` is a full reference.  ``org.opencontainers.image.ref.name``
    is either a full reference or, as skopeo and umoci write it, only a tag: a
    tag becomes a name only with ``base_name`` ("registry/repo").
    """
    names: List[str] = []
    tags: List[str] = []
    if not ann:
        return names, tags
    full = ann.get(ANNOTATION_IMAGE_NAME)
    if full:
        try:
            names.append(str(reference.parse(full)))
        except reference.ReferenceError:
            pass
    ref = ann.get(ANNOTATION_REF_NAME)
    if ref:
        if _is_bare_tag(ref):
            tags.append(ref)
            if base_name and not full:
                try:
                    names.append(str(reference.parse(f"{base_name}:{ref}")))
                except reference.ReferenceError:
                    pass
        elif not full:
            try:
                names.append(str(reference.parse(ref)))
            except reference.ReferenceError:
                pass
    return names, tags


def _entry_matches(ann: Optional[dict], select: str) -> bool:
    if not ann:
        return False
    ref = ann.get(ANNOTATION_REF_NAME)
    full = ann.get(ANNOTATION_IMAGE_NAME)
    if select in (ref, full):
        return True
    if _is_bare_tag(select):
        return False
    try:
        want = reference.parse(select)
    except reference.ReferenceError:
        return False
    for value in (ref, full):
        if value and not _is_bare_tag(value):
            try:
                if reference.parse(value) == want:
                    return True
            except reference.ReferenceError:
                pass
    return False


def _entry_label(ann: Optional[dict]) -> str:
    if not ann:
        return "(unnamed)"
    return ann.get(ANNOTATION_IMAGE_NAME) or ann.get(ANNOTATION_REF_NAME) or "(unnamed)"


# --- reading --------------------------------------------------------------------------------

def _is_attestation(d: Descriptor) -> bool:
    if d.annotations and d.annotations.get("vnd.docker.reference.type") == "attestation-manifest":
        return True
    return d.platform is not None and d.platform.os == "unknown" \
        and d.platform.architecture == "unknown"


class _Reader:
    def __init__(self, blobs: Blobs, platform: Platform, skipped: list):
        self.blobs = blobs
        self.platform = platform
        self.skipped = skipped
        # Results per blob: indexes may list the same index or manifest many times
        # over, at every level; each blob is read and narrowed once.
        self._chosen: Dict[Tuple[str, str], object] = {}
        self._platforms: Dict[Tuple[str, str], Optional[Platform]] = {}

    def manifest_platform(self, d: Descriptor) -> Optional[Platform]:
        """The platform of a manifest that its descriptor does not give: from its config."""
        key = (d.digest, d.media_type)
        if key not in self._platforms:
            try:
                data = self.blobs.read(d)
                m = parse_manifest(data, self.blobs.where(d.digest), d.media_type)
                cfg = self.blobs.read_config(m.config)[1]
                self._platforms[key] = cfg.platform
            except (NotFound, FormatError):
                self._platforms[key] = None
        return self._platforms[key]

    def choose(self, d: Descriptor, referrer: Where, field: str,
               depth: int = 0) -> Tuple[Descriptor, str]:
        """Narrow an index to the manifest for the platform: (manifest descriptor,
        digest of the index it was listed in)."""
        if depth > _MAX_NESTING:
            raise referrer.error(f"indexes nested more than {_MAX_NESTING} deep", field)
        key = (d.digest, d.media_type)
        if key not in self._chosen:
            try:
                self._chosen[key] = self._choose(d, referrer, field, depth)
            except NoMatchingPlatform as e:
                self._chosen[key] = e
        found = self._chosen[key]
        if isinstance(found, NoMatchingPlatform):
            raise found
        return found  # type: ignore[return-value]

    def _choose(self, d: Descriptor, referrer: Where, field: str,
                depth: int) -> Tuple[Descriptor, str]:
        data = self.blobs.read(d, referrer, field)
        w = self.blobs.where(d.digest, "index")
        idx = parse_index(data, w, d.media_type)
        best: Optional[Tuple[int, int, Descriptor, str]] = None
        available: List[str] = []
        for j, e in enumerate(idx.manifests):
            if _is_attestation(e):
                continue
            if e.media_type in INDEX_TYPES:
                if e.platform is not None:
                    available.append(str(e.platform))
                    rank = self.platform.match_rank(e.platform)
                    if rank is None:
                        continue
                else:
                    rank = 50
                try:
                    found = self.choose(e, w, f"manifests[{j}]", depth + 1)
                except NoMatchingPlatform as sub:
                    available.extend(sub.available)
                    continue
                cand = (rank, j, found[0], found[1])
            elif e.media_type in MANIFEST_TYPES:
                p = e.platform or self.manifest_platform(e)
                if p is None:
                    available.append("(unknown)")
                    rank = 100
                else:
                    available.append(str(p))
                    rank = self.platform.match_rank(p)
                    if rank is None:
                        continue
                cand = (rank, j, e, d.digest)
            else:
                continue
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is None:
            avail = ", ".join(dict.fromkeys(available)) or "none"
            raise NoMatchingPlatform(
                f"index {d.digest} has no image for platform {self.platform}; "
                f"available: {avail}", w.filename, entry=w.entry,
                available=list(dict.fromkeys(available)))
        return best[2], best[3]

    def image(self, d: Descriptor, referrer: Where, field: str) -> Optional[SourceImage]:
        """Read and check one image manifest, its config and its layer blobs' presence."""
        data = self.blobs.read(d, referrer, field)
        mw = self.blobs.where(d.digest, "manifest")
        m = parse_manifest(data, mw, d.media_type)
        if m.config.media_type not in CONFIG_TYPES:
            self.skipped.append((d, f"config media type {m.config.media_type!r} is not an "
                                    "image config"))
            return None
        config_bytes, cfg = self.blobs.read_config(m.config, mw, "config")
        cw = self.blobs.where(m.config.digest, "config")
        if len(cfg.diff_ids) != len(m.layers):
            raise cw.error(f"config has {len(cfg.diff_ids)} diff_ids but manifest {d.digest} "
                           f"lists {len(m.layers)} layers", "rootfs.diff_ids")
        check_uncompressed_layers(m.layers, cfg.diff_ids, mw)
        for i, layer in enumerate(m.layers):
            if layer.media_type not in LAYER_TYPES:
                raise mw.error(f"unsupported layer media type {layer.media_type!r}",
                               f"layers[{i}].mediaType")
            self.blobs.check_present(layer, mw, f"layers[{i}]")
        return SourceImage(
            names=[], manifest_digest=d.digest, manifest_media_type=m.media_type,
            manifest_bytes=data, config_digest=m.config.digest, config_bytes=config_bytes,
            config=cfg.doc, layers=list(m.layers), diff_ids=list(cfg.diff_ids),
            platform=cfg.platform, history=cfg.history,   # shared, as config is
            config_media_type=m.config.media_type)


def read_layout_index(files) -> Tuple[Where, "object"]:
    """Check oci-layout and parse index.json of a layout."""
    lw = files.where(LAYOUT_FILE)
    if files.size(LAYOUT_FILE) is None:
        raise NotFound("not an OCI layout: oci-layout is missing", lw.filename, entry=lw.entry)
    doc = parse_json(read_limited(files, LAYOUT_FILE, 1 << 20), lw, "oci-layout")
    if not isinstance(doc, dict):
        raise lw.error("oci-layout must be a JSON object")
    ver = doc.get("imageLayoutVersion")
    if not isinstance(ver, str) or not ver:
        raise lw.error(f"must be a version string, not {ver!r}", "imageLayoutVersion")
    if ver.split(".")[0] != "1":
        raise lw.error(f"unsupported layout version {ver!r}", "imageLayoutVersion")
    iw = files.where(INDEX_FILE)
    if files.size(INDEX_FILE) is None:
        raise NotFound("not an OCI layout: index.json is missing", iw.filename, entry=iw.entry)
    return iw, parse_index(read_limited(files, INDEX_FILE, MAX_JSON_BLOB), iw)


def read_oci_layout(files, blobs: Blobs, *, platform: Platform, select: Optional[str] = None,
                    base_name: Optional[str] = None,
                    skipped: Optional[list] = None) -> List[SourceImage]:
    """Every image of an OCI layout, one per distinct manifest (names merged)."""
    iw, idx = read_layout_index(files)
    skipped = skipped if skipped is not None else []
    reader = _Reader(blobs, platform, skipped)
    entries = list(enumerate(idx.manifests))
    if select is not None:
        entries = [(j, d) for j, d in entries if _entry_matches(d.annotations, select)]
        if not entries:
            avail = ", ".join(sorted({_entry_label(d.annotations) for d in idx.manifests}))
            raise NotFound(f"no image named {select!r} in the layout; it has: {avail or 'none'}",
                           iw.filename, entry=iw.entry)
    # Manifests listed side by side with platforms under the same name form one
    # multi-platform image: keep the one for the platform.
    groups: "OrderedDict[tuple, List[Tuple[int, Descriptor]]]" = OrderedDict()
    for j, d in entries:
        if d.media_type in MANIFEST_TYPES and d.platform is not None and not _is_attestation(d):
            key = ("platform", _entry_label(d.annotations))
        else:
            key = ("entry", j)
        groups.setdefault(key, []).append((j, d))
    chosen: List[Tuple[int, Descriptor, Descriptor, Optional[str]]] = []
    for members in groups.values():
        if len(members) > 1 and len({str(d.platform) for _, d in members}) > 1:
            ranked = [(reader.platform.match_rank(d.platform), j, d) for j, d in members]
            ok = [r for r in ranked if r[0] is not None]
            if not ok:
                avail = ", ".join(dict.fromkeys(str(d.platform) for _, d in members))
                raise NoMatchingPlatform(
                    f"{_entry_label(members[0][1].annotations)}: no image for platform "
                    f"{platform}; available: {avail}", iw.filename, entry=iw.entry,
                    available=[str(d.platform) for _, d in members])
            best = min(ok, key=lambda r: (r[0], r[1]))
            members = [(best[1], best[2])]
        for j, d in members:
            if _is_attestation(d):
                continue
            if d.media_type in INDEX_TYPES:
                m, index_digest = reader.choose(d, iw, f"manifests[{j}]")
                chosen.append((j, d, m, index_digest))
            elif d.media_type in MANIFEST_TYPES:
                chosen.append((j, d, d, None))
            else:
                skipped.append((d, f"media type {d.media_type!r} is not an image"))
    images: "OrderedDict[str, SourceImage]" = OrderedDict()
    seen: Dict[str, Tuple[Dict[str, None], Dict[str, None]]] = {}  # names, tags: ordered sets
    for j, top, m, index_digest in chosen:
        img = images.get(m.digest)
        if img is None:
            field = f"manifests[{j}]" if m is top else \
                f"manifests[{j}] (through index {index_digest})"
            img = reader.image(m, iw, field)
            if img is None:
                continue
            img.index_digest = index_digest
            img.annotations = dict(top.annotations or {})
            images[m.digest] = img
        names, tags = names_from_annotations(top.annotations, base_name)
        have_names, have_tags = seen.setdefault(m.digest, ({}, {}))
        for n in names:
            if n not in have_names:
                have_names[n] = None
                img.names.append(n)
        for t in tags:
            if t not in have_tags:
                have_tags[t] = None
                img.tags.append(t)
    return list(images.values())


# --- writing --------------------------------------------------------------------------------

def index_entries(img: ImageToWrite, manifest_size: Optional[int] = None,
                  digest: Optional[str] = None, media_type: Optional[str] = None) -> List[dict]:
    """index.json entries for an image: one per name (tag in ref.name, full name in
    io.containerd.image.name), or one without annotations when it has no name."""
    base = {"mediaType": media_type or img.manifest_media_type,
            "digest": digest or img.manifest_digest,
            "size": manifest_size if manifest_size is not None else len(img.manifest_bytes)}
    out = []
    for n in img.names:
        ref = reference.parse(n)
        ann = {ANNOTATION_IMAGE_NAME: str(ref)}
        if ref.tag:
            ann[ANNOTATION_REF_NAME] = ref.tag
        out.append(dict(base, annotations=ann))
    if not out:
        out.append(dict(base))
    return out


def _replaces(old: dict, new: dict) -> bool:
    """Does a new index.json entry take the place of an old one (same name)?"""
    oa, na = old.get("annotations") or {}, new.get("annotations") or {}
    if not na:
        return old.get("digest") == new.get("digest") and not oa
    if oa.get(ANNOTATION_IMAGE_NAME):
        return oa.get(ANNOTATION_IMAGE_NAME) == na.get(ANNOTATION_IMAGE_NAME)
    return bool(oa.get(ANNOTATION_REF_NAME)) and \
        oa.get(ANNOTATION_REF_NAME) == na.get(ANNOTATION_REF_NAME)


def merge_index(doc: dict, new_entries: List[dict]) -> dict:
    entries = [e for e in doc.get("manifests", [])
               if not any(_replaces(e, n) for n in new_entries)]
    doc = dict(doc)
    doc["schemaVersion"] = 2
    doc.setdefault("mediaType", OCI_INDEX)
    doc["manifests"] = entries + new_entries
    return doc


def _blob_plan(images: List[ImageToWrite]) -> "OrderedDict[str, tuple]":
    """Every blob to write once: digest -> ("bytes", data) | ("layer", LayerToWrite)."""
    plan: "OrderedDict[str, tuple]" = OrderedDict()
    for img in images:
        for layer in img.layers:
            plan.setdefault(layer.descriptor.digest, ("layer", layer))
        plan.setdefault(img.config_digest, ("bytes", img.config_bytes))
        plan.setdefault(img.manifest_digest, ("bytes", img.manifest_bytes))
    return plan


def _copy_verified(layer: LayerToWrite, out, label: str) -> None:
    import hashlib
    h = hashlib.sha256()
    count = 0
    with layer.open_blob() as src:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            count += len(chunk)
            h.update(chunk)
            out.write(chunk)
    d = layer.descriptor
    if count != d.size or "sha256:" + h.hexdigest() != d.digest:
        raise DigestMismatch(f"layer blob {d.digest}: the stream gave {count} bytes with digest "
                             f"sha256:{h.hexdigest()} (descriptor: {d.size} bytes)", label)


def _write_blob_file(path: str, kind: str, payload, label: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if kind == "bytes":
                f.write(payload)
            else:
                _copy_verified(payload, f, label)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_layout_dir(root: str, images: List[ImageToWrite], new_entries: List[dict],
                      created: List[str]) -> None:
    """Write blobs that are missing, then index.json (merged) last."""
    blob_dir = os.path.join(root, "blobs", "sha256")
    for d in (os.path.join(root, "blobs"), blob_dir):
        # an existing layout's blob directories must be its own: a symlink would
        # take the blobs written here out of the layout
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            os.mkdir(d, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise FormatError(f"{os.path.relpath(d, root)} is a symlink; blobs are written "
                              "only into the layout's own directories", d)
        if not stat.S_ISDIR(st.st_mode):
            raise FormatError(f"{os.path.relpath(d, root)} is not a directory", d)
    for digest, (kind, payload) in _blob_plan(images).items():
        path = os.path.join(root, blob_path_for(digest))
        size = len(payload) if kind == "bytes" else payload.descriptor.size
        try:
            if os.stat(path).st_size == size:
                continue
        except FileNotFoundError:
            pass
        _write_blob_file(path, kind, payload, path)
        created.append(path)
    fsync_dir(blob_dir)
    layout = os.path.join(root, LAYOUT_FILE)
    if not os.path.exists(layout):
        write_file_atomic(layout, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
    index_path = os.path.join(root, INDEX_FILE)
    doc: dict = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path, "rb") as f:
            data = f.read()
        parse_index(data, Where(index_path))          # refuse to extend a broken index
        doc = json.loads(data)
    write_file_atomic(index_path, canonical_json(merge_index(doc, new_entries)))
    fsync_dir(root)


def _write_layout_tar(dest: str, images: List[ImageToWrite], entries: List[dict]) -> None:
    with staged_file(dest) as f:
        tw = TarWriter(f)
        tw.add_bytes(LAYOUT_FILE, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
        tw.add_dir("blobs")
        tw.add_dir("blobs/sha256")
        for digest, (kind, payload) in _blob_plan(images).items():
            name = blob_path_for(digest)
            if kind == "bytes":
                tw.add_bytes(name, payload)
                continue
            d = payload.descriptor
            with payload.open_blob() as src:
                size, actual = tw.add_stream(name, src, d.size)
            if actual != d.digest:
                raise DigestMismatch(f"layer blob {d.digest}: the stream has digest {actual}",
                                     dest, entry=name)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        tw.add_bytes(INDEX_FILE, canonical_json(index))
        tw.finish()


def write_oci_layout(images: Iterable[ImageToWrite], dest, *, tar: bool = False) -> List[dict]:
    """Write images to an OCI layout: a directory (created, or extended when it is
    already a layout: blobs added, index.json entries of the same names replaced)
    or, with ``tar=True``, a tarball (replaced as a whole).

    Blobs and manifests are written as given, each once; a layer stream whose
    bytes do not match its descriptor fails the write.  Everything is staged
    and renamed into place: on failure nothing new remains.  Returns the
    index.json entries written for these images.
    """
    images = list(images)
    for img in images:
        check_image_to_write(img)
    entries = [e for img in images for e in index_entries(img)]
    dest = os.path.abspath(os.fspath(dest))
    if tar:
        if os.path.isdir(dest):
            raise AlreadyExists("destination is a directory, not a tarball", dest)
        _write_layout_tar(dest, images, entries)
        return entries
    if os.path.isdir(dest) and os.path.exists(os.path.join(dest, LAYOUT_FILE)):
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        created: List[str] = []
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            read_layout_index(DirFiles(dest))
            _write_layout_dir(dest, images, entries, created)
        except BaseException:
            for p in created:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            raise
        finally:
            os.close(fd)
        return entries
    if os.path.lexists(dest) and not (os.path.isdir(dest) and not os.listdir(dest)):
        raise AlreadyExists("destination exists and is not an OCI layout", dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.new-", dir=parent)
    try:
        os.chmod(stage, 0o755)
        _write_layout_dir(stage, images, entries, [])
        fsync_dir(os.path.join(stage, "blobs"))
        os.rename(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    fsync_dir(parent)
    return entries

