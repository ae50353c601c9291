"""What the format readers produce and the writers take, and verified blob access.

- :class:`SourceImage`: one image found in a source (names, manifest, config, layers);
- :class:`ImageToWrite` / :class:`LayerToWrite`: one image to write out;
- :class:`Blobs`: the blobs of one source, read with their digest and size checked.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, Union

from .. import _native
from .._io import _real_fileno
from ..errors import DigestMismatch, NotFound
from ._io import VerifyingReader, read_limited
from .manifest import (MAX_JSON_BLOB, Descriptor, FormatError, ImageConfig, Platform, Where,
                       check_digest, detect_compression, parse_config, verify_blob)


@dataclass
class SourceImage:
    """One image of an :class:`~layerfs.images.sources.ImageSource`.

    ``manifest_bytes`` and ``config_bytes`` are the exact bytes of the blobs
    (never re-serialised).  ``layers`` are the descriptors of the stored
    (usually compressed) layer blobs, bottom first; ``diff_ids`` the config's
    ``rootfs.diff_ids`` (same count).  ``names`` are normalised references
    ("docker.io/library/alpine:3.19"); ``tags`` the bare tags an OCI layout
    gave without a repository (``org.opencontainers.image.ref.name`` = "3.19").
    """
    names: List[str]
    manifest_digest: str
    manifest_media_type: str
    manifest_bytes: bytes
    config_digest: str
    config_bytes: bytes
    config: Dict[str, Any]
    layers: List[Descriptor]
    diff_ids: List[str]
    platform: Optional[Platform]
    history: List[Dict[str, Any]]
    tags: List[str] = field(default_factory=list)
    config_media_type: str = ""
    index_digest: Optional[str] = None      # the index the manifest was chosen from
    annotations: Dict[str, str] = field(default_factory=dict)   # of the referring descriptor
    manifest_synthesized: bool = False      # docker-archive without a manifest: built here

    @property
    def id(self) -> str:
        """The image id: the config digest."""
        return self.config_digest

    @property
    def chain_ids(self) -> List[str]:
        """The ChainID of each layer prefix, bottom first (the store's layer keys)."""
        import hashlib
        out: List[str] = []
        for d in self.diff_ids:
            out.append(d if not out else
                       "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
        return out


Opener = Callable[[], BinaryIO]


@dataclass
class LayerToWrite:
    descriptor: Descriptor          # of the stored blob (as the manifest lists it)
    diff_id: str
    open_blob: Opener               # -> binary stream of the stored (compressed) blob
    open_tar: Optional[Opener] = None   # -> binary stream of the uncompressed tar


@dataclass
class ImageToWrite:
    names: List[str]
    manifest_bytes: bytes
    manifest_digest: str
    manifest_media_type: str
    config_bytes: bytes
    config_digest: str
    layers: List[LayerToWrite]

    @classmethod
    def from_source(cls, src: "SourceImage", source) -> "ImageToWrite":
        """An image read from an ImageSource, to write elsewhere as it is.  The
        layers' uncompressed tars are produced by decompressing the blobs."""
        layers = []
        for d, diff_id in zip(src.layers, src.diff_ids):
            layers.append(LayerToWrite(
                d, diff_id,
                (lambda dg=d.digest: source.open_blob(dg)),
                (lambda dg=d.digest, mt=d.media_type: open_decompressed(source.open_blob(dg), mt))))
        return cls(list(src.names), src.manifest_bytes, src.manifest_digest,
                   src.manifest_media_type, src.config_bytes, src.config_digest, layers)


def open_decompressed(stream: BinaryIO, media_type: Optional[str] = None) -> BinaryIO:
    """A stream of the uncompressed tar of a layer blob (gzip, zstd or plain,
    detected from the first bytes); closing it closes stream.  A blob that is a
    file is decompressed by the C core, ahead in a second thread."""
    import io
    fd = _real_fileno(stream)
    if fd is not None:
        try:
            pos = stream.tell()
            head = os.pread(fd, 4, pos)
        except (OSError, ValueError, io.UnsupportedOperation):
            head = b""
        if detect_compression(head) != "none":
            os.lseek(fd, pos, os.SEEK_SET)
            name = getattr(stream, "name", None)
            raw = _native.DecompressedReader(fd, name=name if isinstance(name, str) else None,
                                             on_close=stream.close, hash=False)
            return io.BufferedReader(raw, 1 << 20)  # type: ignore[return-value]
    buffered = stream if hasattr(stream, "peek") else io.BufferedReader(stream, 1 << 20)
    comp = detect_compression(buffered.peek(4)[:4])
    if comp == "gzip":
        import gzip
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    if comp == "zstd":
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True,
                                                          closefd=True)
    return buffered


def blob_path_for(digest: str) -> str:
    algo, hexpart = digest.split(":", 1)
    return f"blobs/{algo}/{hexpart}"


class Blobs:
    """The blobs of one source, addressed by digest.

    A digest is found at ``blobs/sha256/<hex>`` unless a format registered
    another member for it (legacy docker-archive layer files) or its bytes
    (a manifest built for a docker-archive that has none).
    """

    def __init__(self, files):
        self.files = files
        self._paths: Dict[str, str] = {}
        self._memory: Dict[str, bytes] = {}
        self._sizes: Dict[str, int] = {}
        self._configs: Dict[str, Tuple[bytes, ImageConfig]] = {}

    def register_path(self, digest: str, path: str) -> None:
        self._paths.setdefault(digest, path)

    def register_bytes(self, digest: str, data: bytes) -> None:
        self._memory[digest] = data
        self._sizes[digest] = len(data)

    def note_size(self, digest: str, size: int) -> None:
        self._sizes.setdefault(digest, size)

    def path(self, digest: str) -> str:
        return self._paths.get(digest) or blob_path_for(digest)

    def where(self, digest: str, kind: str = "blob") -> Where:
        w = self.files.where(self.path(digest))
        return Where(w.filename, w.entry, f"{kind} {digest}")

    def _missing(self, digest: str, referrer: Optional[Where], field: Optional[str]):
        w = self.where(digest)
        by = ""
        if referrer is not None:
            by = f" (referenced by {referrer}" + (f" field {field}" if field else "") + ")"
        return NotFound(f"blob {digest} is missing{by}", w.filename, entry=w.entry)

    def size(self, digest: str) -> Optional[int]:
        if digest in self._memory:
            return len(self._memory[digest])
        return self.files.size(self.path(digest))

    def check_present(self, desc: Descriptor, referrer: Where, field: str) -> bool:
        """Check a blob exists with the descriptor's size (without reading it).
        Returns False for an absent non-distributable layer."""
        check_digest(desc.digest, referrer, f"{field}.digest")
        size = self.size(desc.digest)
        if size is None:
            from .manifest import NONDISTRIBUTABLE_TYPES
            if desc.media_type in NONDISTRIBUTABLE_TYPES:
                return False
            raise self._missing(desc.digest, referrer, field)
        if size != desc.size:
            w = self.where(desc.digest)
            raise DigestMismatch(f"blob {desc.digest}: size is {size} bytes, {referrer} "
                                 f"field {field}.size says {desc.size}", w.filename, entry=w.entry)
        self.note_size(desc.digest, desc.size)
        return True

    def read(self, desc: Descriptor, referrer: Optional[Where] = None,
             field: Optional[str] = None, limit: int = MAX_JSON_BLOB) -> bytes:
        """Read a small blob whole (manifest, index, config), verified."""
        if desc.digest in self._memory:
            data = self._memory[desc.digest]
            verify_blob(data, desc.digest, desc.size, Where("<generated>"))
            return data
        w = self.where(desc.digest)
        if desc.size > limit:
            raise FormatError(f"blob {desc.digest} is {desc.size} bytes, more than the {limit} "
                              "allowed for a JSON document", w.filename, field=field, entry=w.entry)
        if self.size(desc.digest) is None:
            raise self._missing(desc.digest, referrer, field)
        data = read_limited(self.files, self.path(desc.digest), limit)
        verify_blob(data, desc.digest, desc.size, w)
        self.note_size(desc.digest, desc.size)
        return data

    def read_config(self, desc: Descriptor, referrer: Optional[Where] = None,
                    field: Optional[str] = None) -> Tuple[bytes, ImageConfig]:
        """A config blob, verified, and its parsed form: read and parsed once per
        source however many images name it (the images share the parsed config)."""
        hit = self._configs.get(desc.digest)
        if hit is None:
            data = self.read(desc, referrer, field)
            hit = (data, parse_config(data, self.where(desc.digest, "config")))
            self._configs[desc.digest] = hit
        elif len(hit[0]) != desc.size:    # the bytes were verified against the digest
            w = self.where(desc.digest)
            raise DigestMismatch(f"blob {desc.digest}: size is {len(hit[0])} bytes, "
                                 f"descriptor says {desc.size}", w.filename, entry=w.entry)
        return hit

    def open(self, digest: str, *, verify: bool = False, size: Optional[int] = None) -> BinaryIO:
        import io
        digest = check_digest(digest, Where("<caller>"), "digest")
        if size is None:
            size = self._sizes.get(digest)
        if digest in self._memory:
            raw: BinaryIO = io.BytesIO(self._memory[digest])
        else:
            path = self.path(digest)
            actual = self.files.size(path)
            if actual is None:
                raise self._missing(digest, None, None)
            if size is not None and actual != size:
                w = self.where(digest)
                raise DigestMismatch(f"blob {digest}: size is {actual} bytes, descriptor says "
                                     f"{size}", w.filename, entry=w.entry)
            raw = self.files.open(path)
        if verify:
            return VerifyingReader(raw, digest, size, self.where(digest))  # type: ignore[return-value]
        return raw

    def real_path(self, digest: str) -> Optional[str]:
        if digest in self._memory:
            return None
        return self.files.real_path(self.path(digest))


ImageList = List[SourceImage]
NameSelector = Union[str, int, None]
TagAnnotations = Tuple[Optional[str], Optional[str]]


def check_image_to_write(img: "ImageToWrite"):
    """Check an ImageToWrite is self-consistent: its bytes match its digests, and
    the manifest lists exactly its config and layers.  Returns the parsed manifest."""
    from .manifest import parse_manifest, sha256_bytes
    from .reference import parse as parse_reference
    label = Where(f"<image {', '.join(img.names) or img.manifest_digest}>")
    for what, data, digest in (("manifest", img.manifest_bytes, img.manifest_digest),
                               ("config", img.config_bytes, img.config_digest)):
        check_digest(digest, label, f"{what}_digest")
        actual = sha256_bytes(data)
        if actual != digest:
            raise DigestMismatch(f"{what} bytes have digest {actual}, not {digest}", label.filename)
    m = parse_manifest(img.manifest_bytes, label, img.manifest_media_type)
    if m.media_type != img.manifest_media_type:
        raise label.error(f"manifest media type is {m.media_type!r}, not "
                          f"{img.manifest_media_type!r}", "manifest_media_type")
    if m.config.digest != img.config_digest or m.config.size != len(img.config_bytes):
        raise label.error(f"the manifest's config is {m.config.digest} ({m.config.size} bytes), "
                          f"not {img.config_digest} ({len(img.config_bytes)} bytes)", "config")
    given = [(l.descriptor.digest, l.descriptor.size) for l in img.layers]
    listed = [(l.digest, l.size) for l in m.layers]
    if given != listed:
        raise label.error("the layers given do not match the manifest's layers", "layers")
    for n in img.names:
        parse_reference(n)
    return m
