"""Per-layer attribution and waste: exact byte accounting, reasons, hardlinks,
and conservation (stored - wasted = what the applied image holds)."""
import os
from pathlib import Path

from hypothesis import example, given, settings, strategies as st

from layerfs.archive import unpack_layers
from layerfs.diff import analyze_layers, layer_stack

from .test_sources import TarBuilder, write_docker, write_oci


def stack(tmp_path: Path, builders):
    return [b.write(tmp_path / f"l{i}.tar") for i, b in enumerate(builders)]


def wasted(report):
    return sorted((w.path, w.size, w.layer, w.by_layer, tuple(w.reason))
                  for r in report.layers for w in r.wasted)


def test_file_rewritten_in_three_layers_wastes_two_copies_once_each(tmp_path):
    layers = stack(tmp_path, [
        TarBuilder().dir("app").file("app/blob", b"a" * 1000),
        TarBuilder().file("app/blob", b"b" * 2000),
        TarBuilder().file("app/blob", b"c" * 3000),
    ])
    r = analyze_layers(layer_stack(layers))
    assert wasted(r) == [("/app/blob", 1000, 0, 1, ("content",)),
                         ("/app/blob", 2000, 1, 2, ("content",))]
    assert [l.wasted_bytes for l in r.layers] == [1000, 2000, 0]
    assert [l.causes_bytes for l in r.layers] == [0, 1000, 2000]
    assert r.total_bytes == 6000 and r.wasted_bytes == 3000 and r.image_bytes == 3000
    assert r.efficiency == 0.5
    assert [(l.added, l.modified) for l in r.layers] == [(2, 0), (0, 1), (0, 1)]


def test_reasons_for_recopies_and_deletions(tmp_path):
    layers = stack(tmp_path, [
        TarBuilder().file("chmod", b"x" * 100).file("chown", b"y" * 200)
        .file("touch", b"z" * 300, mtime=1).file("same", b"s" * 400).file("rm", b"r" * 500)
        .dir("tmp").file("tmp/a", b"t" * 600).file("tmp/b", b"u" * 700)
        .file("x", b"v" * 800),
        TarBuilder().file("chmod", b"x" * 100, mode=0o755).file("chown", b"y" * 200, uid=33)
        .file("touch", b"z" * 300, mtime=2).file("same", b"s" * 400).whiteout("rm")
        .opaque("tmp").file("tmp/c", b"w").symlink("x", "/dev/null"),
    ])
    r = analyze_layers(layer_stack(layers))
    assert wasted(r) == [("/chmod", 100, 0, 1, ("mode",)), ("/chown", 200, 0, 1, ("owner",)),
                         ("/rm", 500, 0, 1, ("deleted",)), ("/same", 400, 0, 1, ("duplicate",)),
                         ("/tmp/a", 600, 0, 1, ("deleted",)),
                         ("/tmp/b", 700, 0, 1, ("deleted",)),
                         ("/touch", 300, 0, 1, ("mtime",)), ("/x", 800, 0, 1, ("type",))]
    top = r.layers[1]
    assert top.deleted == 3 and top.deleted_bytes == 1800
    assert top.causes == {"deleted": 1800, "duplicate": 400, "mode": 100, "mtime": 300,
                          "owner": 200, "type": 800}


def test_hardlinked_copy_is_wasted_only_when_its_last_name_goes(tmp_path):
    layers = stack(tmp_path, [
        TarBuilder().file("a", b"h" * 4096).hardlink("b", "a"),
        TarBuilder().file("a", b"new"),               # "b" still holds the old bytes
        TarBuilder().whiteout("b"),
    ])
    r = analyze_layers(layer_stack(layers))
    assert r.layers[0].content_bytes == 4096          # the link stores no content
    assert wasted(r) == [("/b", 4096, 0, 2, ("deleted",))]
    assert r.image_bytes == 3


def test_image_sources_and_history(tmp_path):
    layers = stack(tmp_path, [TarBuilder().file("f", b"1" * 10),
                              TarBuilder().file("f", b"2" * 20)])
    hist = [{"created_by": "COPY f /"}, {"created_by": "RUN regen"}]
    for src in (f"oci:{write_oci(layers, tmp_path / 'oci', history=hist)}",
                f"docker-archive:{write_docker(layers, tmp_path / 'd.tar', history=hist)}"):
        r = analyze_layers(src)
        assert [l.info.created_by for l in r.layers] == ["COPY f /", "RUN regen"]
        assert wasted(r) == [("/f", 10, 0, 1, ("content",))]
        assert r.layers[0].info.diff_id.startswith("sha256:")
        d = r.as_dict()
        assert d["layers"][0]["wasted"][0]["reason"] == ["content"]


# ----------------------------------------------------------------- conservation

NAMES = ["a", "b", "d/a", "d/b", "d/e/a"]
op = st.one_of(
    st.tuples(st.just("file"), st.sampled_from(NAMES), st.integers(0, 3000),
              st.sampled_from([0o644, 0o755])),
    st.tuples(st.just("link"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("whiteout"), st.sampled_from(NAMES + ["d", "d/e"])),
    st.tuples(st.just("opaque"), st.sampled_from(["d", "d/e"])),
)


def _unique_bytes(root: Path) -> int:
    seen, total = set(), 0
    for dirpath, dirs, files in os.walk(root):
        for f in files:
            st_ = os.lstat(os.path.join(dirpath, f))
            if os.path.stat.S_ISREG(st_.st_mode) and st_.st_ino not in seen:
                seen.add(st_.st_ino)
                total += st_.st_size
    return total


@settings(max_examples=60)
@given(st.lists(st.lists(op, max_size=6), min_size=1, max_size=4))
# a path written twice in one layer, a hardlink made to the first copy between
@example(plan=[[("file", "b", 0, 0o644), ("link", "a", "b"), ("file", "b", 1, 0o644)]])
def test_stored_minus_wasted_is_what_the_image_holds(tmp_path_factory, plan):
    tmp = tmp_path_factory.mktemp("waste")
    builders = []
    for li, ops in enumerate(plan):
        b = TarBuilder()
        written = set()
        for o in ops:
            if o[0] == "file":
                _, name, size, mode = o
                if "d" in written and name.startswith("d/"):
                    pass
                for parent in ("d", "d/e"):
                    if name.startswith(parent + "/") and parent not in written:
                        b.dir(parent)
                        written.add(parent)
                b.file(name, bytes([65 + li]) * size, mode=mode)
                written.add(name)
            elif o[0] == "link":
                _, name, target = o
                if target in written and name != target and name not in written \
                        and not any(w.startswith(name + "/") for w in written):
                    for parent in ("d", "d/e"):
                        if name.startswith(parent + "/") and parent not in written:
                            b.dir(parent)
                            written.add(parent)
                    b.hardlink(name, target)
                    written.add(name)
            elif o[0] == "whiteout":
                b.whiteout(o[1])
            else:
                b.opaque(o[1])
        builders.append(b)
    layers = stack(tmp, builders)
    r = analyze_layers(layer_stack(layers))
    dest = tmp / "rootfs"
    unpack_layers([str(p) for p in layers], dest)
    assert r.total_bytes - r.wasted_bytes == r.image_bytes == _unique_bytes(dest)
    assert r.total_bytes == sum(l.content_bytes for l in r.layers)
    assert all(w.layer <= w.by_layer for l in r.layers for w in l.wasted)
