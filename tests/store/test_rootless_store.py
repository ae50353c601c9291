"""A store run rootless, as Podman runs: `layerfs` as root of a user namespace
whose ids 0-65535 are 100000-165535 outside (what newuidmap sets up from
/etc/subuid), with its own mount namespace.  Every command runs in such a
namespace of its own, as each `podman` command does."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.archive.tarbuild import Tar
from tests.diff.test_sources import write_oci

BASE = 100000

# The child imports everything first (the interpreter lives under /root, which
# the namespace's ids cannot read), forks, unshares a user and mount namespace
# in the child and writes its id maps from the parent, as newuidmap does.
USERNS_MAIN = f"""
import concurrent.futures.thread, ctypes, difflib, importlib, importlib.metadata, json, os
import pkgutil, sys, tempfile
import layerfs
for m in pkgutil.walk_packages(layerfs.__path__, "layerfs."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
from layerfs.cli import main
libc = ctypes.CDLL(None, use_errno=True)
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000 | 0x00020000) != 0:     # CLONE_NEWUSER | CLONE_NEWNS
        os.write(2, b"unshare failed\\n")
        os._exit(99)
    os.write(ready_w, b"x")
    os.read(go_r, 1)
    os.setgroups([]); os.setresgid(0, 0, 0); os.setresuid(0, 0, 0)
    code = main(sys.argv[1:])
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
os.read(ready_r, 1)
for f in ("uid_map", "gid_map"):
    with open(f"/proc/{{pid}}/{{f}}", "w") as fh:
        fh.write(os.environ.get("TEST_ID_MAP", "0 {BASE} 65536"))
os.write(go_w, b"x")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def rootless(*args, cwd, id_map=None):
    env = dict(os.environ, TEST_ID_MAP=id_map) if id_map else None
    return subprocess.run([sys.executable, "-c", USERNS_MAIN, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def work():
    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"]).returncode:
        pytest.skip("user namespaces are not available")
    # /var/tmp: the namespace's ids must be able to reach it
    d = Path(tempfile.mkdtemp(prefix="layerfs-rootless-", dir="/var/tmp"))
    base = (Tar().dir("usr/", mode=0o755).dir("usr/bin/", mode=0o555)
            .file("usr/bin/sh", b"#!sh", mode=0o555).dir("etc/", mode=0o755)
            .file("etc/shadow", b"root:!:", mode=0).file("etc/gshadow", b"root:::", mode=0)
            .dir("home/", mode=0o755).dir("home/user/", mode=0o700, uid=1000, gid=1000)
            .file("home/user/.profile", b"p", uid=1000, gid=1000)
            .dir("dev/", mode=0o755).char("dev/null", 1, 3, mode=0o666))
    app = (Tar().file("usr/bin/tool", b"tool", mode=0o755).whiteout("etc/gshadow")
           .file("etc/shadow", b"root:*:", mode=0))
    (d / "base.tar").write_bytes(base.bytes())
    (d / "app.tar").write_bytes(app.bytes())
    write_oci([d / "base.tar", d / "app.tar"], d / "oci")
    os.chown(d, BASE, BASE)
    for p in d.rglob("*"):
        os.lchown(p, BASE, BASE)
    yield d
    shutil.rmtree(d)


def owner(p: Path):
    st = os.lstat(p)
    return st.st_uid, st.st_gid


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_rootless_store_load_save_diff_rmi(work, driver):
    store = work / "store"
    ref = "example.com/test/img:1"
    r = rootless("--root", store, "--driver", driver, "load", "-q", "-i", "oci:oci", cwd=work)
    assert r.returncode == 0, r.stderr
    assert f"Loaded image: {ref}" in r.stdout

    # the top layer's tree: ids shifted into the range, modes as the layers say,
    # no device (none can be made in a user namespace; Docker and Podman skip them)
    tools = [p for p in store.rglob("tool") if p.parent.name == "bin"]
    assert tools, "the app layer's files are not in the store"
    top = tools[0].parents[2]
    assert owner(top / "usr/bin/tool") == (BASE, BASE)
    if driver == "vfs":                     # a full copy: the base layer's files too
        assert owner(top / "home/user/.profile") == (BASE + 1000, BASE + 1000)
        assert stat.S_IMODE(os.lstat(top / "usr/bin").st_mode) == 0o555
        assert not (top / "etc/gshadow").exists()
        assert (top / "etc/shadow").read_bytes() == b"root:*:"
        assert not (top / "dev/null").exists()

    r = rootless("--root", store, "diff", f"store:{ref}", "oci:oci", cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr

    # without their blobs, the layers come back bit for bit from the tree
    # (tar-split records; the 0000 files read back)
    r = rootless("--root", store, "prune", "--blobs", cwd=work)
    assert r.returncode == 0, r.stderr
    r = rootless("--root", store, "save", "--format", "docker-archive", "-o", "saved.tar", ref,
                 cwd=work)
    assert r.returncode == 0, r.stderr
    r = rootless("--root", store, "inspect", ref, cwd=work)
    assert r.returncode == 0, r.stderr
    diff_ids = json.loads(r.stdout)[0]["Config"]["rootfs"]["diff_ids"]
    r = rootless("diff", "--json", "docker-archive:saved.tar", "oci:oci", cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert [l["diff_id"] for l in doc["old"]["layers"]] == diff_ids

    r = rootless("--root", store, "fsck", cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rebuilt from their records" in r.stderr
    r = rootless("--root", store, "rmi", ref, cwd=work)
    assert r.returncode == 0, r.stderr
    assert not [p for p in store.rglob("tool")]


def test_one_id_namespace_names_the_unmapped_owner(work):
    # `unshare -r` maps only root: a layer's uid 1000 cannot be given
    r = rootless("--root", work / "store", "--driver", "vfs", "load", "-q", "-i", "oci:oci",
                 cwd=work, id_map=f"0 {BASE} 1")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("layerfs: error: ")
    assert "entry 'home/user/'" in err and "1000:1000" in err
    assert "not mapped in this user namespace" in err
    r = rootless("--root", work / "store", "images", "--json", cwd=work)
    assert r.returncode == 0 and json.loads(r.stdout)["images"] == []
