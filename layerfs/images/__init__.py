"""Container images: references, manifests, OCI layouts and docker-archives.

Reading: :func:`open_image_source` gives an :class:`ImageSource` whose
``images()`` are :class:`SourceImage` records (names, manifest, config, layer
descriptors, DiffIDs) and whose ``open_blob()`` streams blobs.  Writing:
:func:`write_oci_layout` and :func:`write_docker_archive` take
:class:`ImageToWrite` records.  No store logic lives here.
"""
from ._model import ImageToWrite, LayerToWrite, SourceImage, open_decompressed
from .docker_archive import write_docker_archive
from .manifest import (Descriptor, FormatError, Platform, current_platform, layer_compression,
                       parse_platform)
from .oci import NoMatchingPlatform, write_oci_layout
from .reference import Reference, ReferenceError, parse as parse_reference
from .sources import ImageSource, open_image_source

__all__ = ["Descriptor", "FormatError", "ImageSource", "ImageToWrite", "LayerToWrite",
           "NoMatchingPlatform", "Platform", "Reference", "ReferenceError", "SourceImage",
           "current_platform", "layer_compression", "open_decompressed", "open_image_source",
           "parse_platform", "parse_reference", "write_docker_archive", "write_oci_layout"]
