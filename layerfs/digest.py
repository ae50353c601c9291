"""Digests: sha256 of files and layer streams, DiffIDs and ChainIDs.

- digest:  sha256 of a layer blob as stored (compressed)
- DiffID:  sha256 of the uncompressed tar stream
- ChainID: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))
"""
from __future__ import annotations

import os
import re
from typing import Iterable, List

from . import _native
from ._io import Source, open_source
from .errors import LayerError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

Digests = _native.Digests


def parse_digest(value: str) -> str:
    """Return value as "sha256:<64 hex>", accepting a bare hex string; raise ValueError otherwise."""
    v = value.strip().lower()
    if re.fullmatch(r"[0-9a-f]{64}", v):
        v = "sha256:" + v
    if not _DIGEST_RE.match(v):
        raise ValueError(f"not a sha256 digest: {value!r}")
    return v


def chain_id(diff_ids: Iterable[str]) -> str:
    """ChainID of a stack of layers given their DiffIDs, bottom first."""
    ids = chain_ids(diff_ids)
    if not ids:
        raise ValueError("chain_id needs at least one DiffID")
    return ids[-1]


def chain_ids(diff_ids: Iterable[str]) -> List[str]:
    """The ChainID of every prefix of the stack: [ChainID(L0), ChainID(L0..L1), ...]."""
    out: List[str] = []
    for d in diff_ids:
        d = parse_digest(d)
        if out:
            import hashlib      # here: a single layer (one unpack) never needs it
            d = "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest()
        out.append(d)
    return out


def sha256_file(path: "os.PathLike[str] | str") -> str:
    """sha256 of a file's bytes, as "sha256:<hex>" (C core, OpenSSL, GIL released)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _native.sha256_fd(fd, os.fsdecode(path))[0]
    finally:
        os.close(fd)


def layer_digests(source: Source, compression: str = "auto", *,
                  check_tar: bool = False) -> Digests:
    """Digest (of the bytes) and DiffID (of the decompressed tar) of a layer blob.

    check_tar: also read the tar headers (in the same pass), so that a blob
    that is not a tar archive -- whose "DiffID" would name nothing -- is an
    error naming the entry and offset where it stops being one."""
    code = _native.COMPRESSION_CODES.get(compression)
    if code is None:
        raise ValueError(f"unknown compression {compression!r}")
    with open_source(source) as (fd, name):
        try:
            if check_tar:
                return _native.scan(fd, compression=code, hash=False, name=name,
                                    factory=_native.discard)[1]
            return _native.digest_stream(fd, code, name)
        except LayerError as e:
            if not e.filename:
                e.filename = name
            raise
