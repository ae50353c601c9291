"""Image manifests, indexes, configs and descriptors (OCI image-spec and Docker v2.2).

Vocabulary:

- a *blob* is content addressed by its digest ("sha256:<hex>") and size;
- a *descriptor* points at a blob: media type, digest, size (and annotations,
  platform, urls);
- a *manifest* lists one image's config blob and its layer blobs (bottom first);
- an *index* (Docker: manifest list) lists manifests, usually one per platform;
- a *config* carries the image's run settings, its platform and ``rootfs.diff_ids``:
  the digest of each layer's uncompressed tar.

The parse helpers check the JSON against the spec and raise :class:`FormatError`
naming the file (and the archive member) and the JSON field that is wrong.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import platform as _platform_mod
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import DigestMismatch, LayerError

# --- media types -------------------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDISTRIBUTABLE_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDISTRIBUTABLE_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"          # uncompressed
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
NONDISTRIBUTABLE_TYPES = frozenset({OCI_LAYER_NONDISTRIBUTABLE, OCI_LAYER_NONDISTRIBUTABLE_GZIP,
                                    OCI_LAYER_NONDISTRIBUTABLE_ZSTD, DOCKER_FOREIGN_LAYER})
_LAYER_COMPRESSION = {
    OCI_LAYER: "none", OCI_LAYER_GZIP: "gzip", OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDISTRIBUTABLE: "none", OCI_LAYER_NONDISTRIBUTABLE_GZIP: "gzip",
    OCI_LAYER_NONDISTRIBUTABLE_ZSTD: "zstd",
    DOCKER_LAYER: "none", DOCKER_LAYER_GZIP: "gzip", DOCKER_LAYER_ZSTD: "zstd",
    DOCKER_FOREIGN_LAYER: "gzip",
}
LAYER_TYPES = frozenset(_LAYER_COMPRESSION)

# --- annotations -------------------------------------------------------------------------

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_CREATED = "org.opencontainers.image.created"

# Manifests, indexes and configs (and a layout's index.json, a docker-archive's
# manifest.json) larger than this are refused: they are read into memory, where
# JSON takes up to ~25 times its size.  containerd reads manifests and indexes up
# to 4 MiB, containers/image configs up to 4 MiB.
MAX_JSON_BLOB = 4 << 20

_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


class FormatError(LayerError, ValueError):
    """A manifest, index, config or archive that does not follow its format.

    ``filename`` is the file (for an archive: the archive, with the member in
    ``entry``), ``field`` the JSON field that is wrong, e.g. ``layers[1].digest``.
    """

    def __init__(self, message: str, filename: Optional[str] = None, *,
                 field: Optional[str] = None, entry: Optional[str] = None):
        text = f"{field}: {message}" if field else message
        LayerError.__init__(self, errno.EINVAL, text, filename, entry=entry)
        self.field = field


@dataclass(frozen=True)
class Where:
    """Where a JSON document came from, for error messages: the file, and the
    member when the file is an archive."""
    filename: str
    entry: Optional[str] = None
    what: Optional[str] = None      # e.g. "blob sha256:..." for messages

    def error(self, message: str, field: Optional[str] = None) -> FormatError:
        return FormatError(message, self.filename, field=field, entry=self.entry)

    def __str__(self) -> str:
        place = f"{self.filename}:{self.entry}" if self.entry else self.filename
        return f"{self.what} ({place})" if self.what else place


# --- digests -----------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(value: Any, where: Where, field: str) -> str:
    """A descriptor digest: must be "sha256:<64 lowercase hex>"."""
    if not isinstance(value, str):
        raise where.error(f"digest must be a string, not {type(value).__name__}", field)
    if not _SHA256_RE.fullmatch(value):
        if _ANY_DIGEST_RE.fullmatch(value) and not value.startswith("sha256:"):
            raise where.error(f"unsupported digest algorithm in {value!r} (only sha256)", field)
        raise where.error(f"not a sha256 digest: {value!r}", field)
    return value


def verify_blob(data: bytes, digest: str, size: Optional[int], where: Where) -> None:
    """Raise DigestMismatch (naming the blob and the file) unless data is that blob."""
    if size is not None and len(data) != size:
        raise DigestMismatch(f"blob {digest}: size is {len(data)} bytes, descriptor says {size}",
                             where.filename, entry=where.entry)
    actual = sha256_bytes(data)
    if actual != digest:
        raise DigestMismatch(f"blob {digest}: content has digest {actual}",
                             where.filename, entry=where.entry)


# --- platforms ---------------------------------------------------------------------------

_ARCH_ALIASES = {
    "x86_64": ("amd64", None), "x86-64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", None), "arm64": ("arm64", None),
    "armhf": ("arm", "v7"), "armel": ("arm", "v6"), "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv6": ("arm", "v6"),
    "armv5tel": ("arm", "v5"), "armv5l": ("arm", "v5"), "arm": ("arm", None),
    "i386": ("386", None), "i486": ("386", None), "i586": ("386", None),
    "i686": ("386", None), "386": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
    "mips64": ("mips64", None), "mips64le": ("mips64le", None), "loong64": ("loong64", None),
    "loongarch64": ("loong64", None),
}
# The variant an architecture has when none is written.
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}


def _norm_variant(arch: str, variant: Optional[str]) -> Optional[str]:
    if variant:
        variant = variant.lower()
        if arch == "arm64" and variant == "8":
            variant = "v8"
        if arch == "arm" and variant in ("5", "6", "7", "8"):
            variant = "v" + variant
    return variant or None


@dataclass(frozen=True)
class Platform:
    """An OCI platform: os, architecture, optional variant and os_version.

    Architectures use the Go names (amd64, arm64, arm, 386, ...).  ``str()``
    gives "os/arch[/variant]".
    """
    os: str
    architecture: str
    variant: Optional[str] = None
    os_version: Optional[str] = None

    def normalized(self) -> "Platform":
        arch, implied = _ARCH_ALIASES.get(self.architecture.lower(),
                                          (self.architecture.lower(), None))
        variant = _norm_variant(arch, self.variant) or implied
        return Platform(self.os.lower(), arch, variant, self.os_version)

    def _key(self) -> Tuple[str, str, str]:
        p = self.normalized()
        return p.os, p.architecture, p.variant or _DEFAULT_VARIANT.get(p.architecture, "")

    def matches(self, other: "Platform") -> bool:
        """True when an image built for ``other`` runs as this platform: same os
        and architecture, and a variant this one can run (an arm v7 host runs
        v6 and v5 images; arm64 images with no variant are v8)."""
        return self.match_rank(other) is not None

    def match_rank(self, other: "Platform") -> Optional[int]:
        """0 for an exact match, higher for a compatible older variant, None when
        ``other`` cannot run here."""
        mos, march, mvar = self._key()
        oos, oarch, ovar = other._key()
        if mos != oos or march != oarch:
            return None
        if self.os_version and other.os_version and self.os_version != other.os_version:
            return None
        if mvar == ovar:
            return 0
        m, o = _variant_number(mvar), _variant_number(ovar)
        if m is not None and o is not None and o < m:
            return m - o
        return None

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            d["os.version"] = self.os_version
        if self.variant:
            d["variant"] = self.variant
        return d

    @classmethod
    def from_json(cls, obj: Any, where: Optional[Where] = None,
                  field: str = "platform") -> "Platform":
        where = where or Where("<platform>")
        if not isinstance(obj, dict):
            raise where.error("must be an object", field)
        check_field_names(obj, PLATFORM_FIELDS, where, field)
        for k in ("os", "architecture"):
            if not isinstance(obj.get(k), str) or not obj.get(k):
                raise where.error(f"{k} must be a non-empty string", field)
        for k in ("variant", "os.version"):
            if obj.get(k) is not None and not isinstance(obj.get(k), str):
                raise where.error(f"{k} must be a string", field)
        return cls(obj["os"], obj["architecture"], obj.get("variant") or None,
                   obj.get("os.version") or None)

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


def _variant_number(v: str) -> Optional[int]:
    m = re.fullmatch(r"v(\d+)", v or "")
    return int(m.group(1)) if m else None


def parse_platform(text: str) -> Platform:
    """"linux/arm64/v8", "linux/amd64", "arm64" (os linux) -> a normalised Platform."""
    if isinstance(text, Platform):
        return text.normalized()
    parts = [p for p in str(text).strip().split("/")]
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise ValueError(f"not a platform (os/arch[/variant]): {text!r}")
    if len(parts) == 1:
        os_name, arch, variant = "linux", parts[0], None
    else:
        os_name, arch = parts[0], parts[1]
        variant = parts[2] if len(parts) == 3 else None
    return Platform(os_name, arch, variant).normalized()


def current_platform() -> Platform:
    """The platform of this machine, uname normalised to OCI names
    (x86_64 -> amd64, aarch64 -> arm64 v8, armv7l -> arm v7)."""
    machine = os.uname().machine if hasattr(os, "uname") else _platform_mod.machine()
    arch, variant = _ARCH_ALIASES.get(machine.lower(), (machine.lower(), None))
    if arch == "arm64":
        variant = "v8"
    system = (_platform_mod.system() or "linux").lower()
    return Platform(system, arch, variant)


# --- field names -------------------------------------------------------------------------

def check_field_names(obj: Mapping[str, Any], names, where: Where,
                      field: Optional[str] = None) -> None:
    """Refuse a key that differs only in case from a field this object has (as
    "Layers" from "layers", or "\u017fize" from "size"): Go's encoding/json, which
    containerd, skopeo, umoci and docker read these documents with, matches
    fields case-insensitively and would read that key as the field."""
    folded = {n.casefold(): n for n in names}
    for k in obj:
        n = folded.get(k.casefold()) if isinstance(k, str) else None
        if n is not None and k != n:
            raise where.error(f"key {k!r} differs only in case from {n!r} (other readers "
                              "take it for that field)", f"{field}.{k}" if field else k)


DESCRIPTOR_FIELDS = ("mediaType", "digest", "size", "urls", "annotations", "data", "platform",
                     "artifactType")
PLATFORM_FIELDS = ("architecture", "os", "os.version", "os.features", "variant")
MANIFEST_FIELDS = ("schemaVersion", "mediaType", "artifactType", "config", "layers", "subject",
                   "annotations")
INDEX_FIELDS = ("schemaVersion", "mediaType", "artifactType", "manifests", "subject",
                "annotations")
CONFIG_FIELDS = ("created", "author", "architecture", "os", "os.version", "os.features",
                 "variant", "config", "rootfs", "history")
ROOTFS_FIELDS = ("type", "diff_ids")


# --- descriptors -------------------------------------------------------------------------

@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Optional[Mapping[str, str]] = None
    platform: Optional[Platform] = None
    urls: Optional[Tuple[str, ...]] = None
    artifact_type: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                             "size": self.size}
        if self.urls:
            d["urls"] = list(self.urls)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform is not None:
            d["platform"] = self.platform.to_json()
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        return d

    @classmethod
    def from_json(cls, obj: Any, where: Optional[Where] = None,
                  field: str = "descriptor") -> "Descriptor":
        where = where or Where("<descriptor>")
        if not isinstance(obj, dict):
            raise where.error("descriptor must be an object", field)
        check_field_names(obj, DESCRIPTOR_FIELDS, where, field)
        mt = obj.get("mediaType")
        if not isinstance(mt, str) or not mt:
            raise where.error("mediaType must be a non-empty string", f"{field}.mediaType")
        digest = check_digest(obj.get("digest"), where, f"{field}.digest")
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise where.error(f"size must be a non-negative integer, not {size!r}",
                              f"{field}.size")
        ann = obj.get("annotations")
        if ann is not None:
            if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in ann.items()):
                raise where.error("annotations must map strings to strings",
                                  f"{field}.annotations")
        urls = obj.get("urls")
        if urls is not None:
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                raise where.error("urls must be a list of strings", f"{field}.urls")
            urls = tuple(urls)
        plat = obj.get("platform")
        plat = Platform.from_json(plat, where, f"{field}.platform") if plat is not None else None
        at = obj.get("artifactType")
        return cls(mt, digest, size, ann or None, plat, urls or None,
                   at if isinstance(at, str) and at else None)


def layer_compression(media_type: str) -> str:
    """"none", "gzip" or "zstd" for a layer media type; ValueError for others."""
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise ValueError(f"not a layer media type: {media_type!r}") from None


def detect_compression(head: bytes) -> str:
    """"gzip", "zstd" or "none" from a blob's first bytes."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


# --- documents ---------------------------------------------------------------------------

class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def parse_json(data: bytes, where: Where, what: str = "document") -> Any:
    """Parse a JSON document; an object with the same key twice is refused (a
    reader that keeps the first and one that keeps the last disagree)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise where.error(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as e:
        raise where.error(f"{what} has the key {e.args[0]!r} twice in one object") from None
    except json.JSONDecodeError as e:
        raise where.error(f"{what} is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}") from None
    except RecursionError:
        # arrays or objects nested deeper than the parser's recursion limit
        raise where.error(f"{what} is nested too deeply to be read") from None
    except ValueError as e:
        # an integer with more digits than int() converts (sys.get_int_max_str_digits)
        raise where.error(f"{what} holds a number that cannot be read: {e}") from None


@dataclass(frozen=True)
class Manifest:
    media_type: str                 # from the document, else the descriptor that pointed here
    config: Descriptor
    layers: List[Descriptor]
    annotations: Optional[Mapping[str, str]] = None
    subject: Optional[Descriptor] = None


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: List[Descriptor]
    annotations: Optional[Mapping[str, str]] = None


def _check_schema(doc: Any, where: Where, what: str) -> None:
    if not isinstance(doc, dict):
        raise where.error(f"{what} must be a JSON object")
    sv = doc.get("schemaVersion")
    if sv == 1 and what == "manifest":
        raise where.error("Docker schema 1 manifests are not supported", "schemaVersion")
    if sv != 2 or isinstance(sv, bool):
        raise where.error(f"must be 2, not {sv!r}", "schemaVersion")


def parse_manifest(data: bytes, where: Where, media_type: Optional[str] = None) -> Manifest:
    """Parse and check an image manifest (OCI or Docker v2 schema 2)."""
    doc = parse_json(data, where, "manifest")
    _check_schema(doc, where, "manifest")
    check_field_names(doc, MANIFEST_FIELDS + ("manifests",), where)
    mt = _own_media_type(doc, where, "manifest", media_type, MANIFEST_TYPES)
    if mt is None and media_type:
        mt = media_type
    elif mt is None:
        cfg = doc.get("config")
        mt = DOCKER_MANIFEST if isinstance(cfg, dict) and \
            cfg.get("mediaType") == DOCKER_CONFIG else OCI_MANIFEST
    if mt in (DOCKER_MANIFEST_SCHEMA1, DOCKER_MANIFEST_SCHEMA1_SIGNED):
        raise where.error("Docker schema 1 manifests are not supported", "mediaType")
    if mt not in MANIFEST_TYPES:
        raise where.error(f"{mt!r} is not a manifest media type", "mediaType")
    if "manifests" in doc:
        # a document that is also an index reads as another image to a reader that
        # takes it for one (CVE-2021-41190): refused, as containerd does
        raise where.error("expected a manifest but found an index field", "manifests")
    config = Descriptor.from_json(doc.get("config"), where, "config")
    layers = _descriptor_list(doc, where, "layers")
    subject = doc.get("subject")
    subject = Descriptor.from_json(subject, where, "subject") if subject is not None else None
    return Manifest(mt, config, layers, _annotations(doc, where), subject)


def parse_index(data: bytes, where: Where, media_type: Optional[str] = None) -> Index:
    """Parse and check an image index (OCI) or manifest list (Docker)."""
    doc = parse_json(data, where, "index")
    _check_schema(doc, where, "index")
    check_field_names(doc, INDEX_FIELDS + ("config", "layers"), where)
    mt = _own_media_type(doc, where, "index", media_type, INDEX_TYPES)
    if mt is None:
        mt = media_type or OCI_INDEX
    if mt not in INDEX_TYPES:
        raise where.error(f"{mt!r} is not an index media type", "mediaType")
    for key in ("config", "layers"):
        if key in doc:
            raise where.error("expected an index but found a manifest field", key)
    return Index(mt, _descriptor_list(doc, where, "manifests"), _annotations(doc, where))


def _own_media_type(doc: Dict[str, Any], where: Where, what: str, media_type: Optional[str],
                    types) -> Optional[str]:
    """The document's own mediaType (None if absent); it must agree with the
    descriptor's when that names a type of this kind."""
    mt = doc.get("mediaType")
    if mt is None:
        return None
    if not isinstance(mt, str):
        raise where.error("must be a string", "mediaType")
    if media_type in types and mt != media_type:
        raise where.error(f"{what} says {mt!r} but its descriptor says {media_type!r}",
                          "mediaType")
    return mt


def _descriptor_list(doc: Dict[str, Any], where: Where, key: str) -> List[Descriptor]:
    items = doc.get(key)
    if not isinstance(items, list):
        raise where.error("must be a list of descriptors", key)
    return [Descriptor.from_json(d, where, f"{key}[{i}]") for i, d in enumerate(items)]


def _annotations(doc: Dict[str, Any], where: Where) -> Optional[Dict[str, str]]:
    ann = doc.get("annotations")
    if ann is not None and not isinstance(ann, dict):
        raise where.error("must be an object", "annotations")
    return ann or None


@dataclass(frozen=True)
class ImageConfig:
    doc: Dict[str, Any]
    diff_ids: List[str]
    platform: Optional[Platform]
    history: List[Dict[str, Any]] = field(default_factory=list)


def parse_config(data: bytes, where: Where) -> ImageConfig:
    """Parse an image config: rootfs.diff_ids, platform, history."""
    doc = parse_json(data, where, "config")
    if not isinstance(doc, dict):
        raise where.error("config must be a JSON object")
    check_field_names(doc, CONFIG_FIELDS, where)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict):
        raise where.error("must be an object", "rootfs")
    check_field_names(rootfs, ROOTFS_FIELDS, where, "rootfs")
    if rootfs.get("type") != "layers":
        raise where.error(f"must be 'layers', not {rootfs.get('type')!r}", "rootfs.type")
    ids = rootfs.get("diff_ids")
    if ids is None:
        ids = []
    if not isinstance(ids, list):
        raise where.error("must be a list of digests", "rootfs.diff_ids")
    diff_ids = [check_digest(d, where, f"rootfs.diff_ids[{i}]") for i, d in enumerate(ids)]
    plat = None
    if isinstance(doc.get("os"), str) and isinstance(doc.get("architecture"), str) \
            and doc["os"] and doc["architecture"]:
        variant = doc.get("variant") if isinstance(doc.get("variant"), str) else None
        osv = doc.get("os.version") if isinstance(doc.get("os.version"), str) else None
        plat = Platform(doc["os"], doc["architecture"], variant or None, osv or None)
    history = doc.get("history")
    if history is None:
        history = []
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise where.error("must be a list of objects", "history")
    return ImageConfig(doc, diff_ids, plat, history)


def check_layers_match(layers: List[Descriptor], diff_ids: List[str], where: Where) -> None:
    """The manifest's layer count must equal the config's rootfs.diff_ids count."""
    if len(layers) != len(diff_ids):
        raise where.error(f"config has {len(diff_ids)} diff_ids but the manifest lists "
                          f"{len(layers)} layers", "rootfs.diff_ids")


def check_uncompressed_layers(layers: List[Descriptor], diff_ids: List[str], where: Where) -> None:
    """An uncompressed layer's blob is its tar, so its digest must be its DiffID.
    A media type that says "uncompressed" over a compressed blob would have the
    blob taken for a tar that can be rebuilt from the unpacked layer."""
    for i, (layer, diff_id) in enumerate(zip(layers, diff_ids)):
        if _LAYER_COMPRESSION.get(layer.media_type) == "none" and layer.digest != diff_id:
            raise where.error(f"media type {layer.media_type!r} says the layer is uncompressed, "
                              f"but its digest {layer.digest} is not its DiffID {diff_id}",
                              f"layers[{i}]")


def canonical_json(doc: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it (no spaces, no HTML escaping issue)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def is_manifest(media_type: str) -> bool:
    return media_type in MANIFEST_TYPES


__all__ = [n for n in dir() if n.isupper() and not n.startswith("_")] + [
    "FormatError", "Where", "Descriptor", "Platform", "Manifest", "Index", "ImageConfig",
    "parse_platform", "current_platform", "layer_compression", "detect_compression",
    "parse_json", "parse_manifest", "parse_index", "parse_config", "check_layers_match",
    "check_uncompressed_layers", "check_field_names",
    "check_digest", "verify_blob", "sha256_bytes", "canonical_json", "is_index", "is_manifest",
]
