"""Layer archives: apply and write OCI/Docker layer tarballs, with digests.

>>> from layerfs.archive import apply_layer, create_layer
>>> r = apply_layer("layer.tar.gz", "rootfs")          # doctest: +SKIP
>>> r.digest, r.diff_id                                 # doctest: +SKIP
"""
from .apply import ApplyResult, apply_layer, unpack_layers
from .create import CreateResult, create_layer

__all__ = ["ApplyResult", "CreateResult", "apply_layer", "create_layer", "unpack_layers"]
