"""layerfs: container image layers and storage drivers, as a library.

Subpackages: ``layerfs.archive`` (apply/write layer tarballs), ``layerfs.digest``
(digests, DiffIDs, ChainIDs), ``layerfs.drivers`` (overlay, aufs, vfs).
"""
__version__ = "0.1.0"

from .errors import LayerError  # noqa: E402,F401
