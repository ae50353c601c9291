"""Writing stored images out: OCI layouts (tarball or directory) and docker-archives.

An OCI save writes each image's original manifest, config and layer blobs, so
the digests (and any signature over the manifest) are those it was loaded
with.  A layer blob that ``prune --blobs`` dropped is regenerated: an
uncompressed one exactly (the tar-split record rebuilds the tar, which is the
blob); a compressed one only by compressing again, which gives a new digest
and so a new manifest -- refused unless ``allow_recompress``, and reported.
A docker-archive holds the uncompressed layer tars only: always exact.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

from .. import _native
from .._native import Digests
from ..errors import NotFound, PreconditionFailed
from ..images import ImageToWrite, LayerToWrite, open_decompressed, write_docker_archive, \
    write_oci_layout
from ..images.manifest import (Descriptor, Where, canonical_json, layer_compression,
                               parse_manifest, sha256_bytes)
from . import _tarsplit
from ._fs import remove_path, tmp_name
from .progress import NULL, CountingReader, Progress
from .records import ImageRecord

FORMATS = ("oci", "oci-dir", "docker-archive")

__all__ = ["FORMATS", "SaveResult", "save"]


@dataclass
class SavedImage:
    id: str
    names: List[str]
    manifest_digest: str            # as stored
    written_manifest_digest: str    # as written (differs only after recompression)
    regenerated_layers: int = 0     # layer tars rebuilt from tar-split records
    recompressed_layers: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SaveResult:
    dest: str
    format: str
    images: List[SavedImage] = field(default_factory=list)

    @property
    def manifest_changed(self) -> bool:
        return any(i.manifest_digest != i.written_manifest_digest for i in self.images)

    def to_json(self) -> dict:
        return {"dest": self.dest, "format": self.format, "manifest_changed": self.manifest_changed,
                "images": [i.to_json() for i in self.images]}


def _counted(opener: Callable[[], BinaryIO], progress: Progress, label: str,
             total: Optional[int]) -> Callable[[], BinaryIO]:
    if not progress.enabled:
        return opener

    def open_() -> BinaryIO:
        task = progress.task(label, total)
        return CountingReader(opener(), task)  # type: ignore[return-value]
    return open_


def _recompress(store, opener: Callable[[], BinaryIO], compression: str) -> Tuple[str, Digests]:
    """Compress a layer tar into a temporary file, in the C core with the levels
    create_layer uses (gzip 1 by ISA-L, zstd 3), compressing in a second thread
    while the tar is read; returns its path and digests (a tar reassembled from
    its tar-split record checks its own DiffID)."""
    tmp = tmp_name(store.tmp_dir, "recompress")
    try:
        with opener() as src, open(tmp, "xb") as out, \
                _native.CompressingWriter(out.fileno(), _native.COMPRESSION_CODES[compression],
                                          name=tmp) as z:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                z.write(chunk)
            digests = z.finish()
    except BaseException:
        remove_path(tmp)
        raise
    return tmp, digests


def _image_to_write(store, img: ImageRecord, names: List[str], fmt: str,
                    allow_recompress: bool, progress: Progress,
                    cleanup: contextlib.ExitStack) -> (ImageToWrite, SavedImage):
    mbytes = store.read_blob(img.manifest_digest)
    cbytes = store.read_blob(img.config_digest)
    m = parse_manifest(mbytes, Where(store.blob_path(img.manifest_digest)),
                       img.manifest_media_type)
    saved = SavedImage(img.id, list(names), img.manifest_digest, img.manifest_digest)
    layers: List[LayerToWrite] = []
    missing: List[int] = []
    for i, (desc, il) in enumerate(zip(m.layers, img.layers)):
        blob = store.blob_path(desc.digest)
        rec = store.layer(il.chain_id)
        if rec is None:
            raise NotFound(f"layer {il.chain_id} of image {img.id} is missing from the store "
                           "(run layerfs fsck)", store.layer_dir(il.chain_id))
        present = os.path.exists(blob)
        has_record = rec.record and store.records and \
            os.path.exists(store.record_path(il.chain_id))

        def open_tar(chain_id=il.chain_id, blob=blob, mt=desc.media_type,
                     has_record=has_record) -> BinaryIO:
            if has_record:
                return _tarsplit.open_reassembled(store.record_path(chain_id),
                                                  store.layer_files(chain_id))
            return open_decompressed(open(blob, "rb"), mt)

        try:
            comp = layer_compression(desc.media_type)
        except ValueError:
            comp = "unknown"
        if present:
            def open_blob(blob=blob) -> BinaryIO:
                return open(blob, "rb")
        elif comp == "none" and has_record:
            open_blob = open_tar
            saved.regenerated_layers += 1
        elif fmt == "docker-archive" and has_record:
            def open_blob() -> BinaryIO:
                raise NotFound("the layer blob was pruned")
            saved.regenerated_layers += 1
        elif has_record and comp in ("gzip", "zstd"):
            missing.append(i)
            open_blob = None  # type: ignore[assignment]
        else:
            raise NotFound(f"layer blob {desc.digest} of image {img.id} is missing and cannot be "
                           "regenerated (no tar-split record)", blob)
        label = f"layer {i + 1}/{len(m.layers)} {desc.digest.split(':')[1][:12]}"
        layers.append(LayerToWrite(
            desc, il.diff_id,
            _counted(open_blob, progress, label, desc.size) if open_blob else None,  # type: ignore
            _counted(open_tar, progress, label, store.layer(il.chain_id).tar_size)))
    if missing:
        if not allow_recompress:
            raise PreconditionFailed(
                f"image {img.id}: {len(missing)} compressed layer blob(s) were pruned "
                "(prune --blobs); an OCI save must compress them again, which changes their "
                "digests and the manifest digest unless the compressor gives the same bytes "
                "(signatures over it would no longer apply). "
                "Pass --allow-recompress to do so, or save as docker-archive (exact)")
        doc = json.loads(mbytes)
        for i in missing:
            desc = layers[i].descriptor
            comp = layer_compression(desc.media_type)
            tmp, digests = _recompress(store, layers[i].open_tar, comp)  # type: ignore[arg-type]
            cleanup.callback(remove_path, tmp)
            digest, size = digests.digest, digests.compressed_size
            new = Descriptor(desc.media_type, digest, size, desc.annotations, desc.platform,
                             desc.urls, desc.artifact_type)
            doc["layers"][i]["digest"], doc["layers"][i]["size"] = digest, size
            layers[i].descriptor = new
            layers[i].open_blob = (lambda p=tmp: open(p, "rb"))
            saved.recompressed_layers += 1
        mbytes = canonical_json(doc)
        saved.written_manifest_digest = sha256_bytes(mbytes)
    w = ImageToWrite(list(names), mbytes, saved.written_manifest_digest, img.manifest_media_type,
                     cbytes, img.config_digest, layers)
    return w, saved


def save(store, refs: Sequence[str], dest, fmt: str = "oci", *, allow_recompress: bool = False,
         progress: Progress = NULL) -> SaveResult:
    """Write the images named by refs to dest as ``oci`` (an OCI layout tarball),
    ``oci-dir`` (an OCI layout directory, created or extended) or
    ``docker-archive`` (``docker save`` format).  A ref that is a name writes
    that name; an id writes every name of the image."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    if not refs:
        raise ValueError("no image to save")
    dest = os.path.abspath(os.fspath(dest))
    with store.reading():
        chosen: Dict[str, tuple] = {}
        for ref in refs:
            res = store.resolve(ref)
            img = res.image
            names = [res.name] if res.name else store.names_of(img.manifest_digest)
            if img.manifest_digest in chosen:
                old = chosen[img.manifest_digest][1]
                names = old + [n for n in names if n not in old]
            chosen[img.manifest_digest] = (img, names)
        result = SaveResult(dest, fmt)
        with contextlib.ExitStack() as cleanup:
            writes = []
            for img, names in chosen.values():
                w, saved = _image_to_write(store, img, names, fmt, allow_recompress, progress,
                                           cleanup)
                writes.append(w)
                result.images.append(saved)
            if fmt == "docker-archive":
                write_docker_archive(writes, dest)
            else:
                write_oci_layout(writes, dest, tar=(fmt == "oci"))
        return result
