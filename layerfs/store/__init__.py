"""The image and layer store: images loaded from OCI layouts and docker-archives
(or imported from root filesystem tarballs), their layers kept once by ChainID
in one storage driver, their original blobs content-addressed, names Docker-style.

>>> from layerfs.store import Store
>>> with Store("/var/lib/layerfs") as s:                   # doctest: +SKIP
...     (loaded,) = s.load("app.tar")
...     s.set_names(loaded.image.manifest_digest, ["app:1"])
...     path = s.mount("app:1")                             # a read-only view
"""
from .records import ImageLayer, ImageRecord, LayerRecord
from .store import AmbiguousReference, RemoveResult, Resolved, Store, default_root

__all__ = ["Store", "default_root", "ImageRecord", "ImageLayer", "LayerRecord", "Resolved",
           "RemoveResult", "AmbiguousReference"]
