"""docker-archive: the ``docker save`` / ``docker load`` tarball.

``manifest.json`` lists the images: ``[{"Config": PATH, "RepoTags": [...],
"Layers": [PATH, ...]}]``.  Two layouts exist:

- legacy (Docker < 25, skopeo): ``<config-hex>.json`` and ``<v1-id>/layer.tar``
  (or ``<diffid-hex>.tar``), uncompressed layers, no manifest blob;
- current (Docker >= 25): also an OCI layout: ``oci-layout``, ``index.json``,
  config and layers under ``blobs/sha256/`` and an OCI manifest per image.

Reading prefers the OCI manifest when the archive has one for the image's
config (its bytes then stay exact); otherwise a manifest is built from
manifest.json (``SourceImage.manifest_synthesized``).  Names come from RepoTags.

Writing produces the current form, with uncompressed layers named by DiffID and
the config unchanged (so the image id stays the same).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional

from ..errors import AlreadyExists, DigestMismatch, NotFound
from . import reference
from ._io import CHUNK, TarWriter, _safe_relpath, read_limited, staged_file
from .oci import index_entries as oci_index_entries
from ._model import (Blobs, ImageToWrite, LayerToWrite, SourceImage, blob_path_for,
                     check_image_to_write)
from .manifest import (INDEX_TYPES, LAYER_TYPES, MANIFEST_TYPES, MAX_JSON_BLOB,
                       NONDISTRIBUTABLE_TYPES, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_LAYER_GZIP,
                       OCI_LAYER_ZSTD, OCI_MANIFEST, Descriptor, FormatError, Where,
                       canonical_json, check_field_names, check_uncompressed_layers,
                       detect_compression, parse_config, parse_index, parse_json, parse_manifest,
                       sha256_bytes)

__all__ = ["ImageToWrite", "LayerToWrite", "read_docker_archive", "write_docker_archive"]

MANIFEST_FILE = "manifest.json"
REPOSITORIES_FILE = "repositories"
_HEX64 = re.compile(r"[0-9a-f]{64}")


# --- reading --------------------------------------------------------------------------------

def _oci_manifests_by_config(files, blobs: Blobs) -> Dict[str, tuple]:
    """config digest -> (manifest descriptor, manifest bytes) for every manifest that
    index.json reaches (all platforms) whose blob is in the archive."""
    out: Dict[str, tuple] = {}
    if files.size("index.json") is None:
        return out
    iw = files.where("index.json")
    try:
        idx = parse_index(read_limited(files, "index.json", MAX_JSON_BLOB), iw)
    except FormatError:
        return out          # manifest.json is authoritative for a docker-archive
    todo = [(d, 0) for d in idx.manifests]
    seen = set()
    while todo:
        d, depth = todo.pop(0)
        if d.digest in seen or depth > 8 or blobs.size(d.digest) is None:
            continue
        seen.add(d.digest)
        try:
            data = blobs.read(d, iw)
            if d.media_type in INDEX_TYPES:
                todo.extend((e, depth + 1) for e in
                            parse_index(data, blobs.where(d.digest), d.media_type).manifests)
            elif d.media_type in MANIFEST_TYPES:
                m = parse_manifest(data, blobs.where(d.digest), d.media_type)
                out.setdefault(m.config.digest, (d, data, m))
        except (FormatError, DigestMismatch, NotFound):
            continue
    return out


def _str_list(value, where: Where, field: str, allow_none: bool = False) -> List[str]:
    if value is None and allow_none:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise where.error("must be a list of strings", field)
    return value


def _synthesize(files, blobs: Blobs, item_where: Where, field: str, config_digest: str,
                config_bytes: bytes, layer_paths: List[str], diff_ids: List[str],
                hashed: Dict[str, tuple]):
    """An OCI manifest for an image that has none: layer blobs are the files
    manifest.json names; an uncompressed layer's digest is its DiffID (checked
    when the blob is read), a compressed one is hashed here, once per file
    (``hashed``: path -> (digest, media type), shared by the images of a source)."""
    layers = []
    for j, path in enumerate(layer_paths):
        size = files.size(path)
        w = files.where(path)
        if size is None:
            raise NotFound(f"layer file {path} is missing (referenced by {item_where} field "
                           f"{field}.Layers[{j}])", w.filename, entry=w.entry)
        comp = "hashed" if path in hashed else detect_compression(files.head(path, 8))
        if comp == "hashed":
            digest, mt = hashed[path]
        elif comp == "none":
            digest, mt = diff_ids[j], OCI_LAYER
        else:
            h = hashlib.sha256()
            with files.open(path) as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
            digest = "sha256:" + h.hexdigest()
            mt = OCI_LAYER_GZIP if comp == "gzip" else OCI_LAYER_ZSTD
            hashed[path] = (digest, mt)
        blobs.register_path(digest, path)
        blobs.note_size(digest, size)
        layers.append(Descriptor(mt, digest, size))
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                      "size": len(config_bytes)},
           "layers": [l.to_json() for l in layers]}
    data = canonical_json(doc)
    digest = sha256_bytes(data)
    blobs.register_bytes(digest, data)
    return digest, data, layers


def read_docker_archive(files, blobs: Blobs, *, select: Optional[str] = None
                        ) -> List[SourceImage]:
    """Every image manifest.json lists, one per distinct manifest (entries listing
    the same image again add their tags to it), or the one ``select`` names: a
    RepoTag, or "@N" for the N-th entry."""
    mw = files.where(MANIFEST_FILE)
    if files.size(MANIFEST_FILE) is None:
        raise NotFound("not a docker-archive: manifest.json is missing", mw.filename,
                       entry=mw.entry)
    doc = parse_json(read_limited(files, MANIFEST_FILE, MAX_JSON_BLOB), mw, "manifest.json")
    if not isinstance(doc, list):
        raise mw.error("manifest.json must be a JSON list of images")
    if not doc:
        raise mw.error("manifest.json lists no images")
    want_index: Optional[int] = None
    want_ref = None
    if select is not None:
        if select.startswith("@") and select[1:].isdigit():
            want_index = int(select[1:])
            if want_index >= len(doc):
                raise NotFound(f"manifest.json has {len(doc)} images, no {select}", mw.filename,
                               entry=mw.entry)
        else:
            want_ref = reference.parse(select)
    oci = _oci_manifests_by_config(files, blobs)
    images: List[SourceImage] = []     # one per distinct manifest
    merged: Dict[str, Dict[str, None]] = {}     # manifest digest -> its names (ordered set)
    order: Dict[str, int] = {}                  # manifest digest -> index in images
    all_tags: List[str] = []
    configs: Dict[str, tuple] = {}
    hashed: Dict[str, tuple] = {}
    for i, item in enumerate(doc):
        field = f"[{i}]"
        if not isinstance(item, dict):
            raise mw.error("must be an object", field)
        check_field_names(item, ("Config", "RepoTags", "Layers", "Parent", "LayerSources"), mw,
                          field)
        cfg_field = item.get("Config")
        if not isinstance(cfg_field, str) or not cfg_field:
            raise mw.error("must be a path", f"{field}.Config")
        cfg_path = _safe_relpath(cfg_field, mw, f"{field}.Config")
        layer_paths = [_safe_relpath(p, mw, f"{field}.Layers[{j}]") for j, p in
                       enumerate(_str_list(item.get("Layers"), mw, f"{field}.Layers"))]
        repo_tags = _str_list(item.get("RepoTags"), mw, f"{field}.RepoTags", allow_none=True)
        unique: Dict[str, None] = {}        # ordered, and a set: linear in the tags
        for k, t in enumerate(repo_tags):
            try:
                unique[str(reference.parse(t))] = None
            except reference.ReferenceError as e:
                raise mw.error(str(e), f"{field}.RepoTags[{k}]") from None
        names = list(unique)
        all_tags.extend(repo_tags)
        if want_index is not None and i != want_index:
            continue
        if want_ref is not None and str(want_ref) not in unique:
            continue
        cw = files.where(cfg_path)
        if files.size(cfg_path) is None:
            raise NotFound(f"config file {cfg_path} is missing (referenced by manifest.json "
                           f"field {field}.Config)", cw.filename, entry=cw.entry)
        if cfg_path not in configs:     # read and parsed once, however many images name it
            config_bytes = read_limited(files, cfg_path, MAX_JSON_BLOB)
            config_digest = sha256_bytes(config_bytes)
            stem = os.path.basename(cfg_path)
            stem = stem[:-5] if stem.endswith(".json") else stem
            if _HEX64.fullmatch(stem) and "sha256:" + stem != config_digest:
                raise DigestMismatch(f"config blob sha256:{stem}: content has digest "
                                     f"{config_digest}", cw.filename, entry=cw.entry)
            blobs.register_path(config_digest, cfg_path)
            configs[cfg_path] = (config_bytes, config_digest, parse_config(config_bytes, cw))
        config_bytes, config_digest, cfg = configs[cfg_path]
        if len(cfg.diff_ids) != len(layer_paths):
            raise cw.error(f"config has {len(cfg.diff_ids)} diff_ids but manifest.json field "
                           f"{field}.Layers lists {len(layer_paths)} layers", "rootfs.diff_ids")
        found = oci.get(config_digest)
        synthesized = False
        if found is not None and len(found[2].layers) == len(layer_paths):
            desc, manifest_bytes, m = found
            manifest_digest, media_type, layers = desc.digest, m.media_type, list(m.layers)
            where_m = blobs.where(desc.digest)
            config_mt = m.config.media_type
            check_uncompressed_layers(layers, cfg.diff_ids, where_m)
            for j, layer in enumerate(layers):
                if layer.media_type not in LAYER_TYPES:
                    raise where_m.error(f"unsupported layer media type {layer.media_type!r}",
                                        f"layers[{j}].mediaType")
                if blobs.size(layer.digest) is None:
                    blobs.register_path(layer.digest, layer_paths[j])
                blobs.check_present(layer, where_m, f"layers[{j}]")
        else:
            manifest_digest, manifest_bytes, layers = _synthesize(
                files, blobs, mw, field, config_digest, config_bytes, layer_paths, cfg.diff_ids,
                hashed)
            media_type, config_mt, synthesized = OCI_MANIFEST, OCI_CONFIG, True
        if manifest_digest in merged:
            # the same image listed again (another entry, other tags): one image
            have = merged[manifest_digest]
            for n in names:
                if n not in have:
                    have[n] = None
                    images[order[manifest_digest]].names.append(n)
            continue
        merged[manifest_digest] = dict.fromkeys(names)
        order[manifest_digest] = len(images)
        images.append(SourceImage(
            names=names, manifest_digest=manifest_digest, manifest_media_type=media_type,
            manifest_bytes=manifest_bytes, config_digest=config_digest,
            config_bytes=config_bytes, config=cfg.doc, layers=layers,
            diff_ids=list(cfg.diff_ids), platform=cfg.platform, history=cfg.history,
            config_media_type=config_mt, manifest_synthesized=synthesized))
    if want_ref is not None and not images:
        raise NotFound(f"no image tagged {select!r} in the archive; it has: "
                       f"{', '.join(all_tags) or 'no tags'}", mw.filename, entry=mw.entry)
    return images


# --- writing --------------------------------------------------------------------------------

def write_docker_archive(images: Iterable[ImageToWrite], dest) -> dict:
    """Write images as ``docker save`` (Docker >= 25) does, to the tarball dest.

    Each layer is written uncompressed as ``blobs/sha256/<diffid-hex>`` from
    ``LayerToWrite.open_tar`` (its sha256 must be the DiffID); the config as it
    is; a new OCI manifest per image (its layers are the uncompressed tars) in
    ``blobs/`` and ``index.json``; ``manifest.json`` and ``repositories`` for
    older loaders.  Staged beside dest and renamed into place.  Returns the
    manifest.json document.
    """
    images = list(images)
    parsed = []
    for img in images:
        check_image_to_write(img)
        cfg = parse_config(img.config_bytes, Where(f"<config {img.config_digest}>"))
        if [l.diff_id for l in img.layers] != cfg.diff_ids:
            raise FormatError("the layers' DiffIDs differ from the config's rootfs.diff_ids",
                              f"<image {img.config_digest}>", field="rootfs.diff_ids")
        for l in img.layers:
            if l.open_tar is None:
                raise ValueError(f"layer {l.descriptor.digest}: open_tar is needed for a "
                                 "docker-archive (its layers are uncompressed)")
        parsed.append(cfg)
    dest = os.path.abspath(os.fspath(dest))
    if os.path.isdir(dest):
        raise AlreadyExists("destination is a directory, not a tarball", dest)
    manifest_json: List[dict] = []
    index_entries: List[dict] = []
    repositories: "OrderedDict[str, Dict[str, str]]" = OrderedDict()
    with staged_file(dest) as f:
        tw = TarWriter(f)
        tw.add_dir("blobs")
        tw.add_dir("blobs/sha256")
        written: Dict[str, int] = {}
        for img, cfg in zip(images, parsed):
            if img.config_digest not in written:
                tw.add_bytes(blob_path_for(img.config_digest), img.config_bytes)
                written[img.config_digest] = len(img.config_bytes)
            layer_descs = []
            layer_sources = {}
            for layer in img.layers:
                name = blob_path_for(layer.diff_id)
                if layer.diff_id not in written:
                    with layer.open_tar() as src:
                        size, actual = tw.add_stream(name, src)
                    if actual != layer.diff_id:
                        raise DigestMismatch(f"layer {layer.descriptor.digest}: its tar has "
                                             f"digest {actual}, not the DiffID {layer.diff_id}",
                                             dest, entry=name)
                    written[layer.diff_id] = size
                layer_descs.append({"mediaType": OCI_LAYER, "digest": layer.diff_id,
                                    "size": written[layer.diff_id]})
                if layer.descriptor.media_type in NONDISTRIBUTABLE_TYPES:
                    layer_sources[layer.diff_id] = layer.descriptor.to_json()
            manifest = canonical_json({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": img.config_digest,
                           "size": len(img.config_bytes)},
                "layers": layer_descs})
            mdigest = sha256_bytes(manifest)
            if mdigest not in written:
                tw.add_bytes(blob_path_for(mdigest), manifest)
                written[mdigest] = len(manifest)
            index_entries.extend(oci_index_entries(img, len(manifest), mdigest, OCI_MANIFEST))
            repo_tags = []
            for n in img.names:
                ref = reference.parse(n)
                if not ref.tag or ref.digest:
                    continue
                repo_tags.append(ref.familiar())
                if img.layers:
                    short = ref.familiar().rsplit(":", 1)[0]
                    repositories.setdefault(short, OrderedDict())[ref.tag] = \
                        img.layers[-1].diff_id.split(":", 1)[1]
            item = {"Config": blob_path_for(img.config_digest), "RepoTags": repo_tags,
                    "Layers": [blob_path_for(l.diff_id) for l in img.layers]}
            if layer_sources:
                item["LayerSources"] = layer_sources
            manifest_json.append(item)
        tw.add_bytes("index.json", canonical_json(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}))
        tw.add_bytes(MANIFEST_FILE, canonical_json(manifest_json))
        tw.add_bytes("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
        if repositories:
            tw.add_bytes(REPOSITORIES_FILE, canonical_json(repositories))
        tw.finish()
    return {"manifest": manifest_json, "index": index_entries}

