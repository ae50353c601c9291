"""Hostile image inputs: documents built to exhaust the parser (nesting, numbers,
size, fan-out), documents that read as two kinds at once, media types that lie,
and destinations that would lead writes elsewhere.  Every refusal is a clean
FormatError (or DigestMismatch) naming the file, never a crash or a hang."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from layerfs.images import FormatError, open_image_source

from .conftest import (OCI_INDEX, OCI_MANIFEST, build_image, entry, fill, jbytes, put_blob,
                       write_index)


def _layout(tmp_path, name="layout"):
    layout = str(tmp_path / name)
    os.makedirs(layout)
    img = build_image(layout, [fill(str(tmp_path / f"{name}-tree"), {"etc/hostname": "box\n"})])
    return layout, img


# --- parser exhaustion ----------------------------------------------------------------------

def test_deeply_nested_index_json_is_a_format_error(tmp_path):
    layout, _ = _layout(tmp_path)
    write_index(layout, [])
    with open(os.path.join(layout, "index.json"), "wb") as f:
        f.write(b'{"schemaVersion":2,"manifests":[],"x":' + b"[" * 200000 + b"]" * 200000 + b"}")
    with pytest.raises(FormatError, match="index.json") as e:
        open_image_source(layout).images()
    assert "nested" in str(e.value)


def test_number_too_long_for_python_is_a_format_error(tmp_path):
    layout, img = _layout(tmp_path)
    m = dict(img.manifest, annotations=None)
    data = jbytes(m).replace(b'"annotations":null', b'"x":1' + b"0" * 10000)
    md = put_blob(layout, data)
    write_index(layout, [{"mediaType": OCI_MANIFEST, **md}])
    with pytest.raises(FormatError, match="number"):
        open_image_source(layout).images()


# --- documents that are two kinds at once (CVE-2021-41190) ------------------------------------

def _ambiguous(tmp_path):
    """A blob that is a manifest (config, layers) and an index (manifests) at once,
    without a mediaType of its own, the index part naming another image."""
    layout, img = _layout(tmp_path)
    other = build_image(layout, [fill(str(tmp_path / "other"), {"etc/hostname": "other\n"})])
    doc = dict(img.manifest)
    del doc["mediaType"]
    doc["manifests"] = [entry(other, layout)]
    return layout, put_blob(layout, jbytes(doc))


@pytest.mark.parametrize("as_type", [OCI_MANIFEST, OCI_INDEX])
def test_document_both_manifest_and_index_is_refused(tmp_path, as_type):
    layout, d = _ambiguous(tmp_path)
    write_index(layout, [{"mediaType": as_type, **d}])
    want = "index" if as_type == OCI_MANIFEST else "manifest"
    with pytest.raises(FormatError, match=f"found an? {want}"):
        open_image_source(layout).images()


# --- fan-out -----------------------------------------------------------------------------------

_READ_IN_CHILD = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {repo!r})
    resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
    from layerfs.images import open_image_source
    from layerfs.images import NoMatchingPlatform
    with open_image_source(sys.argv[1], platform=sys.argv[2]) as src:
        try:
            print(len(src.images()))
        except NoMatchingPlatform as e:
            print("no match:", ", ".join(e.available))
""")


def _read_in_child(layout: str, platform: str) -> subprocess.CompletedProcess:
    """images() of a layout in a child process limited to 60 s of CPU (SIGXCPU
    kills it past that), so that a reader that never finishes fails the test."""
    import layerfs
    repo = os.path.dirname(os.path.dirname(layerfs.__file__))
    return subprocess.run([sys.executable, "-c", _READ_IN_CHILD.format(repo=repo), layout,
                           platform],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("platform,out", [("linux/amd64", "1"),
                                          ("linux/arm64", "no match: linux/amd64")])
def test_index_fan_out_is_read_once_per_blob(tmp_path, platform, out):
    """Eight nested indexes, each listing the next one 30 times: 30**8 paths to
    one manifest, but only nine distinct blobs (and one platform to report)."""
    layout, img = _layout(tmp_path)
    cur = dict(entry(img, layout), platform={"architecture": "amd64", "os": "linux"})
    for _ in range(8):
        d = put_blob(layout, jbytes({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                     "manifests": [cur] * 30}))
        cur = {"mediaType": OCI_INDEX, **d}
    write_index(layout, [cur])
    p = _read_in_child(layout, platform)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == out


# --- memory ------------------------------------------------------------------------------------

_READ_LIMITED_AS = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {repo!r})
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from layerfs.images import FormatError, open_image_source
    try:
        with open_image_source(sys.argv[1], platform="linux/amd64") as src:
            print(len(src.images()))
    except FormatError as e:
        print("FormatError:", e)
""")


def _read_in_1gib(path: str) -> subprocess.CompletedProcess:
    """images() of a source in a child process whose address space is limited to 1 GiB."""
    import layerfs
    repo = os.path.dirname(os.path.dirname(layerfs.__file__))
    return subprocess.run([sys.executable, "-c", _READ_LIMITED_AS.format(repo=repo), path],
                          capture_output=True, text=True, timeout=600)


def _padding(n_bytes: int) -> bytes:
    """A JSON array of empty objects about n_bytes long: ~25 times its size once parsed."""
    return b"[" + b"{}," * (n_bytes // 3) + b"{}]"


@pytest.mark.parametrize("where", ["index.json", "manifest", "config", "manifest.json"])
def test_huge_documents_refused_before_they_are_parsed(tmp_path, where):
    """A 60 MiB document of empty objects takes ~1.6 GB once parsed: the size
    limit must refuse it before that (containerd and containers/image stop at 4 MiB)."""
    layout, img = _layout(tmp_path)
    pad = _padding(60 << 20)
    top = entry(img, layout)
    if where == "index.json":
        write_index(layout, [top])
        with open(os.path.join(layout, "index.json"), "wb") as f:
            f.write(jbytes({"schemaVersion": 2, "manifests": [top], "x": None})
                    .replace(b"null", pad))
    elif where == "manifest":
        md = put_blob(layout, jbytes(dict(img.manifest, x=None)).replace(b"null", pad))
        write_index(layout, [{"mediaType": OCI_MANIFEST, **md}])
    elif where == "config":
        cd = put_blob(layout, jbytes(dict(img.config, x=None)).replace(b"null", pad))
        md = put_blob(layout, jbytes(dict(img.manifest, config=dict(img.manifest["config"], **cd))))
        write_index(layout, [{"mediaType": OCI_MANIFEST, **md}])
    else:
        with open(os.path.join(layout, "manifest.json"), "wb") as f:
            f.write(b'[{"Config":"x","Layers":[],"Pad":' + pad + b"}]")
    p = _read_in_1gib(layout)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("FormatError:") and "allowed" in p.stdout, p.stdout


@pytest.mark.parametrize("fmt", ["oci", "docker-archive"])
def test_config_shared_by_many_images_is_parsed_once(tmp_path, fmt):
    """One config just under the size limit (~100 MB once parsed) named by 30
    images: parsed once, not once per image (3 GB)."""
    layout, img = _layout(tmp_path)
    cfg = jbytes(dict(img.config, x=None)).replace(b"null", _padding((4 << 20) - 4096))
    cd = put_blob(layout, cfg)
    if fmt == "oci":
        entries = []
        for i in range(30):
            m = dict(img.manifest, config=dict(img.manifest["config"], **cd),
                     annotations={"n": str(i)})
            md = put_blob(layout, jbytes(m))
            entries.append({"mediaType": OCI_MANIFEST, **md,
                            "annotations": {"io.containerd.image.name": f"example.com/a:{i}"}})
        write_index(layout, entries)
    else:
        layer = "blobs/sha256/" + img.layer_digests[0].split(":")[1]
        with open(os.path.join(layout, "manifest.json"), "w") as f:
            json.dump([{"Config": "blobs/sha256/" + cd["digest"].split(":")[1],
                        "RepoTags": [f"example.com/a:{i}"], "Layers": [layer]}
                       for i in range(30)], f)
    p = _read_in_1gib(layout)
    assert p.returncode == 0, p.stderr[-2000:]
    # thirty images; the docker-archive's entries list one image thirty times
    assert p.stdout.strip() == ("30" if fmt == "oci" else "1")


def test_docker_archive_layer_named_by_many_images_is_hashed_once(tmp_path):
    """A legacy docker-archive (no OCI manifests) whose manifest.json names one
    20 MB gzip layer in 8000 entries: its digest is computed once (160 GB of
    hashing otherwise)."""
    layout = str(tmp_path / "archive")
    os.makedirs(layout)
    img = build_image(layout, [fill(str(tmp_path / "t"), {"big": os.urandom(20 << 20)})])
    layer = "blobs/sha256/" + img.layer_digests[0].split(":")[1]
    config = "blobs/sha256/" + img.config_digest.split(":")[1]
    with open(os.path.join(layout, "manifest.json"), "w") as f:
        json.dump([{"Config": config, "RepoTags": None, "Layers": [layer]}] * 8000, f)
    p = _read_in_child(layout, "linux/amd64")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "1"          # one image, listed 8000 times


# --- media types that lie ----------------------------------------------------------------------

def test_uncompressed_layer_whose_digest_is_not_its_diff_id(tmp_path):
    """An uncompressed layer blob is its tar: its digest must be the DiffID."""
    layout, img = _layout(tmp_path)      # a gzip layer
    m = dict(img.manifest, layers=[dict(img.manifest["layers"][0],
                                        mediaType="application/vnd.oci.image.layer.v1.tar")])
    write_index(layout, [{"mediaType": OCI_MANIFEST, **put_blob(layout, jbytes(m))}])
    with pytest.raises(FormatError, match=r"layers\[0\].*uncompressed.*DiffID"):
        open_image_source(layout).images()


# --- destinations ------------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["blobs", "blobs/sha256"])
def test_writing_into_a_layout_whose_blob_directory_is_a_symlink(tmp_path, link):
    """Extending a layout must not follow a symlinked blobs/ out of it."""
    from layerfs.images import ImageToWrite, write_oci_layout
    layout, img = _layout(tmp_path)
    write_index(layout, [entry(img, layout, full="docker.io/library/x:1")])
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    write_index(str(dest), [])
    if link == "blobs/sha256":
        (dest / "blobs").mkdir()
    os.symlink(outside, dest / link)
    with open_image_source(layout) as src:
        with pytest.raises(FormatError, match="symlink"):
            write_oci_layout([ImageToWrite.from_source(i, src) for i in src.images()], dest)
    assert list(outside.iterdir()) == []


# --- keys other readers take differently ---------------------------------------------------------

def test_duplicate_key_is_refused(tmp_path):
    """{"digest": A, "digest": B}: a reader that keeps the first key and one that
    keeps the last see two different blobs."""
    layout, img = _layout(tmp_path)
    e = jbytes(entry(img, layout))
    text = e.replace(b'"digest":', b'"digest":"sha256:' + b"0" * 64 + b'","digest":', 1)
    write_index(layout, [])
    with open(os.path.join(layout, "index.json"), "wb") as f:
        f.write(b'{"schemaVersion":2,"manifests":[' + text + b"]}")
    with pytest.raises(FormatError, match="twice"):
        open_image_source(layout).images()


@pytest.mark.parametrize("where", ["manifest", "descriptor", "platform", "config", "rootfs",
                                   "manifest.json"])
def test_key_differing_only_in_case_is_refused(tmp_path, where):
    """Go's encoding/json (containerd, skopeo, umoci, docker) matches struct
    fields case-insensitively, "Layers" or "ſize" included: a document with such
    a key means something else to them than to a reader that matches exactly."""
    layout, img = _layout(tmp_path)
    other = build_image(layout, [fill(str(tmp_path / "other"), {"x": "y"})])
    m, c = dict(img.manifest), dict(img.config)
    top = entry(img, layout)
    if where == "manifest":
        m["Layers"] = other.manifest["layers"]
    elif where == "descriptor":
        m["layers"] = [dict(m["layers"][0], **{"\u017fize": 1})]      # long s: "size" to Go
    elif where == "platform":
        top = dict(top, Platform={"architecture": "arm64", "os": "linux"})
    elif where == "config":
        c["Architecture"] = "arm64"
    elif where == "rootfs":
        c["rootfs"] = dict(c["rootfs"], DIFF_IDS=other.diff_ids)
    if where in ("config", "rootfs"):
        m["config"] = dict(m["config"], **put_blob(layout, jbytes(c)))
    if where != "manifest.json":
        top = dict(top, **put_blob(layout, jbytes(m)))
        write_index(layout, [top])
    else:
        with open(os.path.join(layout, "manifest.json"), "w") as f:
            json.dump([{"Config": "blobs/sha256/" + img.config_digest.split(":")[1],
                        "config": "blobs/sha256/" + other.config_digest.split(":")[1],
                        "Layers": ["blobs/sha256/" + img.layer_digests[0].split(":")[1]]}], f)
    with pytest.raises(FormatError, match="only in case"):
        open_image_source(layout).images()


# --- paths in manifest.json ----------------------------------------------------------------------

@pytest.mark.parametrize("key", ["Config", "Layers"])
def test_nul_in_a_manifest_json_path_is_a_format_error(tmp_path, key):
    layout, img = _layout(tmp_path)
    item = {"Config": "blobs/sha256/" + img.config_digest.split(":")[1],
            "Layers": ["blobs/sha256/" + img.layer_digests[0].split(":")[1]]}
    item[key] = "blobs/sha256/x\0y" if key == "Config" else ["blobs/x\0y"]
    with open(os.path.join(layout, "manifest.json"), "w") as f:
        json.dump([item], f)
    with pytest.raises(FormatError, match="NUL") as e:
        open_image_source(layout).images()
    assert e.value.filename.endswith("manifest.json")


# --- links in archives and directories -------------------------------------------------------------

def _tar_of(layout: str, dest: str, replace: dict) -> str:
    """A tarball of the layout's files, with members named in ``replace`` made
    links instead: name -> ("sym" | "hard", target)."""
    import tarfile
    with tarfile.open(dest, "w") as tf:
        for d, _, files in os.walk(layout):
            for n in sorted(files):
                p = os.path.join(d, n)
                name = os.path.relpath(p, layout)
                if name in replace:
                    kind, target = replace[name]
                    ti = tarfile.TarInfo(name)
                    ti.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                    ti.linkname = target
                    tf.addfile(ti)
                else:
                    tf.add(p, name)
    return dest


@pytest.mark.parametrize("kind,target", [("sym", "ABS"), ("sym", "../../../../../ABS"),
                                         ("hard", "ABS"), ("hard", "../../ABS")])
def test_links_in_an_archive_never_reach_the_filesystem(tmp_path, kind, target):
    """A blob member that links to a file outside the archive, holding exactly
    the blob's bytes: read in place, the archive has no such member."""
    from layerfs.errors import NotFound
    layout, img = _layout(tmp_path)
    write_index(layout, [entry(img, layout)])
    name = "blobs/sha256/" + img.layer_digests[0].split(":")[1]
    outside = str(tmp_path / "outside-copy")
    with open(os.path.join(layout, name), "rb") as f, open(outside, "wb") as out:
        out.write(f.read())
    tarball = _tar_of(layout, str(tmp_path / "image.tar"),
                      {name: (kind, target.replace("ABS", outside.lstrip("/")
                                                   if target.startswith("..") else outside))})
    with pytest.raises(NotFound, match="missing"):
        open_image_source(tarball).images()


def test_manifest_json_symlink_out_of_the_archive_or_directory(tmp_path):
    layout, img = _layout(tmp_path)
    real = str(tmp_path / "real-manifest.json")
    with open(real, "w") as f:
        json.dump([{"Config": "blobs/sha256/" + img.config_digest.split(":")[1],
                    "Layers": ["blobs/sha256/" + img.layer_digests[0].split(":")[1]]}], f)
    tarball = _tar_of(layout, str(tmp_path / "image.tar"), {})
    import tarfile
    with tarfile.open(tarball, "a") as tf:
        ti = tarfile.TarInfo("manifest.json")
        ti.type, ti.linkname = tarfile.SYMTYPE, real
        tf.addfile(ti)
    with pytest.raises(FormatError, match="neither"):
        open_image_source(tarball)
    os.symlink(real, os.path.join(layout, "manifest.json"))
    with pytest.raises(FormatError, match="outside the image directory"):
        open_image_source(layout)


# --- digests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["sha256:../../../../etc/shadow", "sha256:" + "A" * 64,
                                 "sha256:" + "a" * 63, "sha512:" + "a" * 128, "sha256:" + "a" * 65,
                                 "sha256:" + "a" * 64 + "\n", "../blobs/sha256/" + "a" * 64])
@pytest.mark.parametrize("where", ["layer", "config"])
def test_digests_that_are_not_sha256_hex_never_become_paths(tmp_path, bad, where):
    """A digest names a file under blobs/; any that is not "sha256:" and 64
    lowercase hex digits is refused, naming the field, before any path is made."""
    layout, img = _layout(tmp_path)
    m = dict(img.manifest)
    if where == "layer":
        m["layers"] = [dict(m["layers"][0], digest=bad)]
    else:
        m["config"] = dict(m["config"], digest=bad)
    write_index(layout, [{"mediaType": OCI_MANIFEST, **put_blob(layout, jbytes(m))}])
    with pytest.raises(FormatError) as e:
        open_image_source(layout).images()
    assert e.value.field == ("layers[0].digest" if where == "layer" else "config.digest")


@pytest.mark.parametrize("name", ["alpine:latest\n", "alpine\n", "example.com\n/x:1",
                                  "example.com/x\n:1"])
def test_names_with_a_trailing_newline_are_not_names(tmp_path, name):
    """A name such as "alpine:latest\\n" lists like alpine:latest but is another
    name (a regular expression's "$" matches before a final newline)."""
    from layerfs.images import ReferenceError as BadReference, parse_reference
    with pytest.raises(BadReference):
        parse_reference(name)
    layout, img = _layout(tmp_path)
    write_index(layout, [entry(img, layout, full=name)])
    tar = {"RepoTags": [name], "Config": "blobs/sha256/" + img.config_digest.split(":")[1],
           "Layers": ["blobs/sha256/" + img.layer_digests[0].split(":")[1]]}
    with open_image_source(layout) as src:
        assert src.images()[0].names == []
    with open(os.path.join(layout, "manifest.json"), "w") as f:
        json.dump([tar], f)
    with pytest.raises(FormatError, match="RepoTags"):
        open_image_source(layout).images()


def test_tags_are_ascii_as_docker_has_them():
    """Docker's tag pattern is [\\w][\\w.-]{0,127} with Go's ASCII \\w; Python's \\w
    takes any letter, and "alpine:l\\u0430test" (a Cyrillic a) lists like
    alpine:latest."""
    from layerfs.images import ReferenceError as BadReference, parse_reference
    for tag in ("l\u0430test", "\u0661", "v\u00e9"):
        with pytest.raises(BadReference):
            parse_reference(f"alpine:{tag}")
    assert parse_reference("alpine:Latest_1.0-x").tag == "Latest_1.0-x"


# --- many names --------------------------------------------------------------------------------------

def test_many_names_for_one_image_take_linear_time(tmp_path):
    """RepoTags are merged without duplicates: checked against a list, each tag
    cost a pass over the ones before it (manifest.json holds 300000 short tags
    within its size limit: 4.5e10 comparisons)."""
    layout, img = _layout(tmp_path)
    with open(os.path.join(layout, "manifest.json"), "w") as f:
        json.dump([{"Config": "blobs/sha256/" + img.config_digest.split(":")[1],
                    "Layers": ["blobs/sha256/" + img.layer_digests[0].split(":")[1]],
                    "RepoTags": [f"a:{i}" for i in range(300000)]}], f, separators=(",", ":"))
    assert os.path.getsize(os.path.join(layout, "manifest.json")) < 4 << 20
    p = _read_in_child(layout, "linux/amd64")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "1"


def test_docker_archive_entries_of_one_image_are_one_image(tmp_path):
    """manifest.json may list the same config and layers many times over, each
    with its own tag: that is one image with every tag (as OCI index entries
    of one manifest are), not thousands of images each loaded and named on its
    own (a store rewrote its names file once per entry: quadratic)."""
    layout, img = _layout(tmp_path)
    item = {"Config": "blobs/sha256/" + img.config_digest.split(":")[1],
            "Layers": ["blobs/sha256/" + img.layer_digests[0].split(":")[1]]}
    with open(os.path.join(layout, "manifest.json"), "w") as f:
        json.dump([dict(item, RepoTags=[f"a:{i}", "b:1"]) for i in range(15000)], f,
                  separators=(",", ":"))
    with open_image_source(layout) as src:
        (got,) = src.images()
    assert got.names[:3] == ["docker.io/library/a:0", "docker.io/library/b:1",
                             "docker.io/library/a:1"]
    assert len(got.names) == 15001
    with open_image_source(f"docker-archive:{layout}:a:7") as src:
        (got,) = src.images()
    assert "docker.io/library/a:7" in got.names


def test_a_fifo_in_an_image_directory_is_refused_without_waiting_for_a_writer(tmp_path):
    """Opening a file of an image directory never blocks: a FIFO where a blob
    or document should be (put there, or swapped in after the regular-file
    check) is a format error at once."""
    code = textwrap.dedent("""
        import os, sys
        from layerfs.images._io import DirFiles
        from layerfs.images import FormatError
        os.mkfifo(os.path.join(sys.argv[1], "index.json"))
        try:
            DirFiles(sys.argv[1]).open("index.json")
        except FormatError as e:
            print("refused:", e)
    """)
    root = tmp_path / "layout"
    root.mkdir()
    p = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert "refused:" in p.stdout and "index.json is not a regular file" in p.stdout


def test_a_staged_file_that_fills_the_disk_leaves_nothing(tmp_path):
    """staged_file on a full filesystem: the write fails and neither the
    destination nor the temporary file beside it remains (the cleanup's own
    close fails again flushing the buffer; the file is still removed)."""
    from layerfs.images._io import staged_file
    mp = tmp_path / "tiny"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mp)], check=True)
    try:
        with pytest.raises(OSError):
            with staged_file(str(mp / "out.tar")) as f:
                f.write(b"x" * (1 << 20))              # fills it
                f.write(b"y" * 100)                    # buffered: fails at the flush
        assert os.listdir(mp) == []
    finally:
        subprocess.run(["umount", "-l", str(mp)], check=True)


def test_a_pipe_given_as_an_image_tarball_or_rootfs_is_refused_by_the_library(tmp_path):
    """open_image_source and Store.import_rootfs refuse a FIFO by name at once
    (an image tarball is read with seeks, a rootfs tarball twice)."""
    code = textwrap.dedent("""
        import errno, os, sys
        from layerfs.errors import LayerError
        from layerfs.images import open_image_source
        from layerfs.store import Store
        fifo = os.path.join(sys.argv[1], "in.tar")
        os.mkfifo(fifo)
        for call in (lambda: open_image_source(fifo),
                     lambda: Store(os.path.join(sys.argv[1], "store"), driver="vfs")
                             .import_rootfs(fifo, "x:1")):
            try:
                call()
            except LayerError as e:
                print(e.errno == errno.ESPIPE, e.filename == fifo, "pipe" in str(e))
    """)
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["True True True", "True True True"], p.stdout
