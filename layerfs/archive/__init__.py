"""Layer archives: apply and write OCI/Docker layer tarballs, with digests.

>>> from layerfs.archive import apply_layer, create_layer
>>> r = apply_layer("layer.tar.gz", "rootfs")          # doctest: +SKIP
>>> r.digest, r.diff_id                                 # doctest: +SKIP
"""
from .apply import ApplyResult, apply_layer, unpack_layers


def __getattr__(name: str):
    # the writing side loads on first use: unpacking never needs it
    if name in ("CreateResult", "create_layer"):
        from . import create
        return getattr(create, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ApplyResult", "CreateResult", "apply_layer", "create_layer", "unpack_layers"]
