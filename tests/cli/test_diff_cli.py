"""`layerfs diff` and `layerfs layers` through `python -m layerfs`: exit codes,
stdout/stderr separation, the JSON documents and the CI gate."""
import json
import os
import shutil
import subprocess

import pytest

from tests.diff.test_sources import CAP_NET_RAW, T0, TarBuilder, gnu_tar, mk, write_oci


@pytest.fixture
def trees(tmp_path):
    a = tmp_path / "a"
    mk(a, "etc/hosts", b"127.0.0.1 localhost\n")
    mk(a, "usr/bin/ping", b"ping" * 10, mode=0o755)
    mk(a, "srv/old", b"moved content")
    mk(a, "lib/x", b"x")
    b = tmp_path / "b"
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    (b / "etc/hosts").write_bytes(b"127.0.0.1 localhost\n::1 localhost\n")
    os.utime(b / "etc/hosts", ns=(T0, T0))
    os.chmod(b / "usr/bin/ping", 0o4755)
    os.setxattr(b / "usr/bin/ping", "security.capability", CAP_NET_RAW)
    os.rename(b / "srv/old", b / "srv/new")
    shutil.rmtree(b / "lib")
    os.symlink("usr/lib", b / "lib")
    mk(b, "opt/added", b"+" * 50)
    return a, b


def test_same_exits_0(layerfs_cli, trees):
    a, _ = trees
    r = layerfs_cli("diff", a, gnu_tar(a, a.parent / "a.tar"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert r.stderr.startswith("0 changes")


def test_text_output_and_exit_1(layerfs_cli, trees):
    a, b = trees
    r = layerfs_cli("diff", a, b)
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert "M /usr/bin/ping  mode 0755→4755, xattr security.capability added" in lines
    hosts = next(l for l in lines if l.startswith("M /etc/hosts"))
    assert "content (sha256 " in hosts and "size 20→34" in hosts
    assert "T /lib  dir→symlink" in lines
    assert "R /srv/new ← /srv/old" in lines
    assert "A /opt/added" in lines
    # stderr: only the summary line
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("6 changes: 2 added, 0 deleted, 2 modified, "
                                               "1 type changed, 1 renamed")
    r = layerfs_cli("diff", "--exit-zero", "-q", a, b)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "\n".join(lines) + "\n"


def test_json_document(layerfs_cli, trees):
    a, b = trees
    layer = gnu_tar(b, b.parent / "b.tar.gz", compress="gzip")
    r = layerfs_cli("diff", "--json", a, layer)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["version"] == 1
    assert doc["old"]["kind"] == "dir" and doc["new"]["kind"] == "layer"
    assert doc["new"]["layers"][0]["diff_id"].startswith("sha256:")
    by_path = {c["path"]: c for c in doc["changes"]}
    ping = by_path["/usr/bin/ping"]
    assert ping["kind"] == "modified" and ping["code"] == "M" and ping["type"] == "file"
    assert ping["fields"]["mode"] == {"old": 0o755, "new": 0o4755}
    assert ping["layer"]["index"] == 0
    hosts = by_path["/etc/hosts"]
    assert hosts["size"] == {"old": 20, "new": 34}
    assert hosts["digest"]["old"] != hosts["digest"]["new"]
    assert by_path["/srv/new"]["old_path"] == "/srv/old"
    assert by_path["/lib"]["code"] == "T" and by_path["/lib"]["old_type"] == "dir"
    assert doc["summary"]["changes"] == len(doc["changes"]) == 6
    assert doc["summary"]["bytes_added"] == 34 + 50
    # one change per line, in the order of the document
    lines = r.stdout.splitlines()
    first = lines.index('  "changes": [')
    assert [json.loads(line.rstrip(",")) for line in lines[first + 1:first + 7]] == doc["changes"]
    assert lines[first + 7] == "  ],"


def test_json_of_two_plain_layer_files(layerfs_cli, trees):
    """Two uncompressed layers are read in place (not hashed while scanned): the
    layer digests the JSON shows are still each file's sha256, and the records
    are those of the gzip copies."""
    import hashlib
    a, b = trees
    ta, tb = gnu_tar(a, a.parent / "a.tar"), gnu_tar(b, b.parent / "b.tar")
    r = layerfs_cli("diff", "--json", ta, tb)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    for side, path in (("old", ta), ("new", tb)):
        want = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        assert doc[side]["layers"][0]["digest"] == want
        assert doc[side]["layers"][0]["diff_id"] == want
    for c in doc["changes"]:
        if c.get("layer"):
            assert c["layer"]["digest"] == doc["new"]["layers"][0]["digest"]
    ga = gnu_tar(a, a.parent / "a.tar.gz", compress="gzip")
    gb = gnu_tar(b, b.parent / "b.tar.gz", compress="gzip")
    g = json.loads(layerfs_cli("diff", "--json", ga, gb).stdout)
    strip = lambda cs: [{k: v for k, v in c.items() if k not in ("layer", "old_layer")}  # noqa
                        for c in cs]
    assert strip(doc["changes"]) == strip(g["changes"])
    assert doc["summary"] == g["summary"]


def test_json_lines(layerfs_cli, trees):
    a, b = trees
    r = layerfs_cli("diff", "--json-lines", "--no-renames", "--exclude", "/etc", a, b)
    recs = [json.loads(l) for l in r.stdout.splitlines()]
    assert recs[0]["record"] == "header" and recs[0]["version"] == 1
    assert recs[-1]["record"] == "summary"
    paths = [x["path"] for x in recs[1:-1]]
    assert all(x["record"] == "change" for x in recs[1:-1])
    assert "/etc/hosts" not in paths and "/srv/old" in paths and "/srv/new" in paths
    assert recs[-1]["changes"] == len(paths)


def test_ignore_and_semantic(layerfs_cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    mk(a, "f", b"same", mtime_ns=T0)
    mk(b, "f", b"same", mtime_ns=T0 + 1, uid=5)
    assert layerfs_cli("diff", a, b).returncode == 1
    assert layerfs_cli("diff", "--ignore", "mtime,owner", a, b).returncode == 0
    r = layerfs_cli("diff", "--semantic", a, b)
    assert r.returncode == 1 and r.stdout == "M /f  uid 0→5\n"
    r = layerfs_cli("diff", "--ignore", "bogus", a, b)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bogus" in r.stderr


def test_errors_are_one_line_exit_2(layerfs_cli, tmp_path):
    r = layerfs_cli("diff", tmp_path / "missing", tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("layerfs: error: ") and r.stderr.count("\n") == 1
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    r = layerfs_cli("diff", bad, tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr


def test_raw_view_of_a_layer(layerfs_cli, tmp_path):
    l0 = TarBuilder().dir("etc").file("etc/a", b"a").file("etc/b", b"b").write(tmp_path / "0.tar")
    l1 = TarBuilder().whiteout("etc/a").file("etc/c", b"c").write(tmp_path / "1.tar")
    # the layer's own entries: what it adds, and its whiteouts as deletions
    r = layerfs_cli("diff", "--raw", "empty:", l1)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == ["A /etc", "D /etc/a", "A /etc/c"]
    # against the layer below, the raw view is a tree of its own
    r = layerfs_cli("diff", "--raw-new", l0, l1)
    lines = r.stdout.splitlines()
    assert "D /etc/a" in lines and "A /etc/c" in lines and "D /etc/b" in lines
    r = layerfs_cli("diff", "--json", l0, l0)
    assert r.returncode == 0 and json.loads(r.stdout)["changes"] == []


def test_layers_report_and_gate(layerfs_cli, tmp_path):
    layers = [
        TarBuilder().dir("app").file("app/big", b"1" * 10000).file("app/keep", b"k" * 100)
        .write(tmp_path / "0.tar"),
        TarBuilder().file("app/big", b"1" * 10000, mode=0o755).write(tmp_path / "1.tar"),
        TarBuilder().whiteout("app/big").write(tmp_path / "2.tar"),
    ]
    hist = [{"created_by": "COPY app /app"}, {"created_by": "RUN chmod +x /app/big"},
            {"created_by": "RUN rm /app/big"}]
    oci = write_oci(layers, tmp_path / "oci", history=hist)
    r = layerfs_cli("layers", f"oci:{oci}")
    assert r.returncode == 0, r.stderr
    assert "RUN chmod +x /app/big" in r.stdout
    assert "/app/big  (layer 0 → 1: mode only)" in r.stdout
    assert "/app/big  (layer 1 → 2: deleted)" in r.stdout
    assert "efficiency" in r.stdout.splitlines()[-1]
    r = layerfs_cli("layers", "--json", f"oci:{oci}")
    doc = json.loads(r.stdout)
    assert doc["version"] == 1
    assert doc["wasted_bytes"] == 20000 and doc["total_bytes"] == 20100
    assert [l["wasted_bytes"] for l in doc["layers"]] == [10000, 10000, 0]
    assert doc["layers"][2]["created_by"] == "RUN rm /app/big"
    assert doc["gate"]["passed"] is True
    # the gate
    r = layerfs_cli("layers", "--max-wasted-bytes", "10kB", f"oci:{oci}")
    assert r.returncode == 1 and "gate failed" in r.stderr
    assert layerfs_cli("layers", "--max-wasted-bytes", "20000", f"oci:{oci}").returncode == 0
    r = layerfs_cli("layers", "--min-efficiency", "50%", "--json", f"oci:{oci}")
    assert r.returncode == 1 and json.loads(r.stdout)["gate"]["passed"] is False
    assert layerfs_cli("layers", "--min-efficiency", "0.004", f"oci:{oci}").returncode == 0
    # several layer tarballs make a stack too
    r = layerfs_cli("layers", "--json", *layers)
    assert json.loads(r.stdout)["wasted_bytes"] == 20000
    r = layerfs_cli("layers", "--min-efficiency", "150%", *layers)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_store_sources(layerfs_cli, tmp_path):
    layers = [TarBuilder().dir("etc").file("etc/conf", b"v1" * 100).write(tmp_path / "0.tar"),
              TarBuilder().file("etc/conf", b"v2" * 100).write(tmp_path / "1.tar")]
    oci = write_oci(layers, tmp_path / "oci")
    root = tmp_path / "store"
    r = layerfs_cli("--root", root, "--driver", "vfs", "load", "-i", oci)
    assert r.returncode == 0, r.stderr
    r = layerfs_cli("--root", root, "diff", "store:example.com/test/img:1", f"oci:{oci}")
    assert r.returncode == 0, r.stderr
    r = layerfs_cli("--root", root, "diff", "--layer-info", f"store:example.com/test/img:1#0",
                    "store:example.com/test/img:1")
    assert r.returncode == 1 and r.stdout.startswith("M /etc/conf  content"), r.stderr
    assert "[layer 1: step 1]" in r.stdout
    r = layerfs_cli("--root", root, "layers", "--json", "store:example.com/test/img:1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["wasted_bytes"] == 200
