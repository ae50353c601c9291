"""The store's records: what a layer and an image are, as kept on disk.

- :class:`LayerRecord` (``layers/<chainid-hex>/layer.json``): one applied layer,
  keyed by ChainID.  Its presence is what makes the layer exist: the driver's
  layer and the tar-split record are made first, the record directory is
  renamed into place last.
- :class:`ImageRecord` (``images/<manifest-hex>.json``): one image, keyed by its
  manifest digest (the bytes a signature covers).  Its id, as Docker shows it,
  is the config digest.  Written last, after every layer and blob it names.
- ``repositories.json``: normalised reference -> manifest digest.

Reference counts are never stored: a layer is in use while an image record's
chain holds it, a blob while an image record names it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import DigestMismatch

RECORD_VERSION = 1


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]


@dataclass
class LayerRecord:
    chain_id: str
    diff_id: str
    parent: Optional[str]          # ChainID of the layer below, None for a bottom layer
    tar_size: int                  # bytes of the uncompressed layer tar
    created: float
    driver: str
    record: bool = False           # a tar-split record regenerates the tar
    record_size: int = 0
    entries: int = 0

    @property
    def id(self) -> str:
        """The driver's id of the layer: the ChainID's hex."""
        return hex_of(self.chain_id)

    def to_json(self) -> Dict[str, Any]:
        return {"version": RECORD_VERSION, "chain_id": self.chain_id, "diff_id": self.diff_id,
                "parent": self.parent, "tar_size": self.tar_size, "created": self.created,
                "driver": self.driver, "record": self.record, "record_size": self.record_size,
                "entries": self.entries}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "LayerRecord":
        return cls(d["chain_id"], d["diff_id"], d.get("parent"), int(d.get("tar_size", 0)),
                   float(d.get("created", 0)), d.get("driver", ""), bool(d.get("record")),
                   int(d.get("record_size", 0)), int(d.get("entries", 0)))


def check_reuse(rec: LayerRecord, parent: Optional[str], diff_id: str, label: str) -> None:
    """A stored layer is reused only as what it is: the same DiffID on the same
    parent.  A ChainID alone does not say so: a bottom layer's ChainID is its
    DiffID, which an image may claim to be any other layer's ChainID."""
    if rec.diff_id != diff_id or rec.parent != parent:
        raise DigestMismatch(
            f"layer {rec.chain_id} is stored with DiffID {rec.diff_id} on parent "
            f"{rec.parent or '(none)'}; the image gives DiffID {diff_id} on parent "
            f"{parent or '(none)'}", label)


@dataclass
class ImageLayer:
    """One layer of an image: its place in the chain and the blob the manifest names."""
    chain_id: str
    diff_id: str
    digest: str                    # the manifest's layer digest (the original blob)
    media_type: str
    size: int                      # the blob's size

    def to_json(self) -> Dict[str, Any]:
        return {"chain_id": self.chain_id, "diff_id": self.diff_id, "digest": self.digest,
                "media_type": self.media_type, "size": self.size}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ImageLayer":
        return cls(d["chain_id"], d["diff_id"], d["digest"], d["media_type"], int(d["size"]))


@dataclass
class ImageRecord:
    manifest_digest: str
    manifest_media_type: str
    manifest_size: int
    config_digest: str
    config_media_type: str
    config_size: int
    layers: List[ImageLayer]
    platform: Optional[str]
    created: Optional[str]         # the config's "created"
    loaded: float                  # when it entered the store
    source: str = ""               # what it was loaded or imported from
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The image id: the config digest."""
        return self.config_digest

    @property
    def key(self) -> str:
        return hex_of(self.manifest_digest)

    @property
    def top(self) -> Optional[str]:
        """ChainID of the top layer (None for an image without layers)."""
        return self.layers[-1].chain_id if self.layers else None

    @property
    def chain_ids(self) -> List[str]:
        return [l.chain_id for l in self.layers]

    def blob_digests(self) -> List[str]:
        return [self.manifest_digest, self.config_digest] + [l.digest for l in self.layers]

    def to_json(self) -> Dict[str, Any]:
        return {"version": RECORD_VERSION, "manifest_digest": self.manifest_digest,
                "manifest_media_type": self.manifest_media_type,
                "manifest_size": self.manifest_size, "config_digest": self.config_digest,
                "config_media_type": self.config_media_type, "config_size": self.config_size,
                "layers": [l.to_json() for l in self.layers], "platform": self.platform,
                "created": self.created, "loaded": self.loaded, "source": self.source,
                "extra": self.extra}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ImageRecord":
        return cls(d["manifest_digest"], d["manifest_media_type"], int(d["manifest_size"]),
                   d["config_digest"], d.get("config_media_type", ""), int(d["config_size"]),
                   [ImageLayer.from_json(l) for l in d.get("layers", [])], d.get("platform"),
                   d.get("created"), float(d.get("loaded", 0)), d.get("source", ""),
                   dict(d.get("extra") or {}))


__all__ = ["LayerRecord", "ImageLayer", "ImageRecord", "hex_of", "RECORD_VERSION"]
