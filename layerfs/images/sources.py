"""Image sources: the images in an OCI layout or a docker-archive, and their blobs.

>>> with open_image_source("oci:layout:1.0") as src:          # doctest: +SKIP
...     for img in src.images():
...         for desc, diff_id in zip(img.layers, img.diff_ids):
...             apply_layer(src.open_blob(desc.digest, verify=True), rootfs)

What ``open_image_source`` accepts:

- a directory or a tarball (plain, gzip or zstd) holding an OCI layout
  (``oci-layout`` + ``index.json``) or a docker-archive (``manifest.json``; both
  the legacy ``<id>/layer.tar`` form and the current ``docker save`` form that is
  also an OCI layout, read through manifest.json so RepoTags give the names);
- the same with a transport prefix that also selects one image:
  ``oci:PATH[:TAG]``, ``oci-archive:PATH[:TAG]``, ``docker-archive:PATH[:REF]``
  (REF a RepoTag or ``@N``, the N-th image of manifest.json).

Platforms: an index (multi-platform image) is narrowed to one manifest for
the wanted platform; single images are returned whatever their platform (as
``docker load`` does), with ``SourceImage.platform`` from their config.

A tarball is read in place: its headers are scanned once and blobs are read at
their offsets (a gzip or zstd tarball is first decompressed to a temporary
file).  Every manifest, index and config read is checked against its
digest and size, and every layer blob's presence and size are checked when
``images()`` runs; layer contents are checked by whoever reads them
(``open_blob(..., verify=True)``, or ``apply_layer(expected_digest=...)``).
"""
from __future__ import annotations

import os
from typing import BinaryIO, List, Optional, Union

from ..errors import NotFound
from ._io import DirFiles, TarFiles
from ._model import Blobs, SourceImage
from .docker_archive import read_docker_archive
from .manifest import FormatError, Platform, current_platform, parse_platform
from .oci import NoMatchingPlatform, read_oci_layout
from .reference import parse as parse_reference

__all__ = ["ImageSource", "SourceImage", "open_image_source", "parse_source",
           "NoMatchingPlatform", "OCI_LAYOUT", "DOCKER_ARCHIVE"]

OCI_LAYOUT = "oci-layout"
DOCKER_ARCHIVE = "docker-archive"
_TRANSPORTS = ("oci-archive", "oci", "docker-archive")


class ImageSource:
    """The images of one directory or tarball, and read access to its blobs.

    Use as a context manager, or call :meth:`close`.  Blob streams opened from
    a tarball stay usable until they are closed, even after the source is.
    """

    def __init__(self, files, fmt: str, *, platform: Platform, select: Optional[str] = None,
                 base_name: Optional[str] = None, transport: Optional[str] = None):
        self._files = files
        self._blobs = Blobs(files)
        self.format = fmt
        self.path = files.label
        self.platform = platform
        self.select = select
        self.base_name = base_name
        self.transport = transport
        self.skipped: list = []     # (descriptor, reason): manifests that are not images
        self._images: Optional[List[SourceImage]] = None

    def images(self) -> List[SourceImage]:
        """Every image of the source (the selected one for a transport reference),
        one per distinct manifest, multi-platform indexes narrowed to ``platform``."""
        if self._images is None:
            if self.format == DOCKER_ARCHIVE:
                self._images = read_docker_archive(self._files, self._blobs, select=self.select)
            else:
                self._images = read_oci_layout(self._files, self._blobs, platform=self.platform,
                                               select=self.select, base_name=self.base_name,
                                               skipped=self.skipped)
        return list(self._images)

    def open_blob(self, digest: str, *, verify: bool = False,
                  size: Optional[int] = None) -> BinaryIO:
        """A binary stream of a blob, read straight from the directory or tarball.

        From a directory it is the file itself (a real fd: the C core reads it
        directly); from a tarball a bounded view of the member.  With
        ``verify=True`` the stream raises DigestMismatch at EOF unless the bytes
        have the digest (and size, when a descriptor gave one)."""
        if self.format == DOCKER_ARCHIVE and self._images is None:
            self.images()       # legacy archives name layer files, not digests
        return self._blobs.open(digest, verify=verify, size=size)

    def blob_path(self, digest: str) -> Optional[str]:
        """The blob's file when the source is a directory (to copy or reflink it),
        else None."""
        if self.format == DOCKER_ARCHIVE and self._images is None:
            self.images()
        return self._blobs.real_path(digest)

    def blob_size(self, digest: str) -> Optional[int]:
        return self._blobs.size(digest)

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ImageSource {self.format} {self.path!r}>"


def parse_source(text: str):
    """(transport or None, path, selector or None) of a source string.  A path
    that exists is taken as it is, even if it looks like "oci:..."."""
    if os.path.lexists(text):
        return None, text, None
    for t in _TRANSPORTS:
        if text.startswith(t + ":"):
            rest = text[len(t) + 1:]
            path, _, sel = rest.partition(":")
            if not path:
                raise ValueError(f"{text!r}: no path after {t}:")
            return t, path, sel or None
    return None, text, None


def _detect(files, transport: Optional[str]) -> str:
    has_docker = files.size("manifest.json") is not None
    has_layout = files.size("oci-layout") is not None and files.size("index.json") is not None
    if transport in ("oci", "oci-archive"):
        if not has_layout:
            raise FormatError("not an OCI layout: needs oci-layout and index.json", files.label)
        return OCI_LAYOUT
    if transport == "docker-archive" or has_docker:
        if not has_docker:
            raise FormatError("not a docker-archive: manifest.json is missing", files.label)
        return DOCKER_ARCHIVE
    if has_layout:
        return OCI_LAYOUT
    raise FormatError("neither an OCI layout (oci-layout + index.json) nor a docker-archive "
                      "(manifest.json)", files.label)


def open_image_source(path: Union[str, "os.PathLike[str]"], *,
                      platform: Union[Platform, str, None] = None,
                      base_name: Optional[str] = None) -> ImageSource:
    """Open a directory, a tarball or a transport reference (see the module doc).

    ``platform`` (a Platform or "os/arch[/variant]"; default: this machine's)
    chooses the manifest of a multi-platform index.  ``base_name`` ("repo" or
    "registry/repo") turns the bare tags that OCI layouts often carry into names.
    """
    if base_name is not None:
        parse_reference(base_name)      # a bad one refused before anything is read
    transport, p, select = parse_source(os.fspath(path))
    want = current_platform() if platform is None else parse_platform(platform) \
        if isinstance(platform, str) else platform
    if os.path.isdir(p):
        files = DirFiles(p)
    elif os.path.exists(p):
        files = TarFiles(p)
    else:
        raise NotFound("no such image directory or tarball", os.path.abspath(p))
    try:
        fmt = _detect(files, transport)
        return ImageSource(files, fmt, platform=want, select=select, base_name=base_name,
                           transport=transport)
    except BaseException:
        files.close()
        raise
