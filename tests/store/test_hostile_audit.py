"""Hostile images against the store: media types that lie, DiffIDs and ChainIDs
claimed for content that is not theirs, names that fail after the image is
stored, and loads, removals and prunes racing in real processes."""
from __future__ import annotations

import os

import pytest

from layerfs.errors import DigestMismatch
from layerfs.images import FormatError

from .conftest import build_image, entry, fill, write_index
from tests.images.conftest import LAYER_TYPES, OCI_MANIFEST, jbytes, put_blob


def _named(d: dict, name: str) -> dict:
    return dict(d, annotations={"io.containerd.image.name": name})


def _assert_consistent(s, manifests=()):
    assert {i.manifest_digest for i in s.images()} == set(manifests)
    assert os.listdir(os.path.join(s.root, "tmp")) == []
    assert {i.id for i in s.driver.layers()} == {l.id for l in s.layers()}
    rep = s.fsck()
    assert rep.ok, rep.problems


# --- media types that lie ------------------------------------------------------------------

def test_uncompressed_media_type_on_a_gzip_blob_is_refused(make_store, tmp_path):
    """The media type says "tar" but the blob is gzip: the store would take the
    blob for the layer tar its tar-split record rebuilds, not keep it, and the
    image could never be saved again."""
    layout = str(tmp_path / "l")
    os.makedirs(layout)
    img = build_image(layout, [fill(str(tmp_path / "t"), {"f": "1"})], compression="gzip")
    m = dict(img.manifest, layers=[dict(img.manifest["layers"][0], mediaType=LAYER_TYPES["none"])])
    write_index(layout, [_named({"mediaType": OCI_MANIFEST, **put_blob(layout, jbytes(m))},
                                "docker.io/library/lie:1")])
    s = make_store("vfs")
    with pytest.raises(FormatError, match="uncompressed"):
        s.load(layout)
    _assert_consistent(s)
