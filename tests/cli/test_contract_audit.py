"""The command's contract in the cases the other CLI tests leave out: a closed or
broken stdout, Ctrl-C, a full disk, unreadable files, names that are not UTF-8,
bad option values, and failures that must leave the destination as it was.

Every case runs `python -m layerfs` (or layerfs.cli.main in a child process) for real.
"""
from __future__ import annotations

import json
import io
import os
import tarfile
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LAYERFS_CMD
from tests.diff.test_sources import TarBuilder, write_oci


def one_error_line(p, *needles):
    """The run failed the contract's way: exit 2, one line on stderr naming the needles."""
    assert p.returncode == 2, f"exit {p.returncode}\nstdout: {p.stdout!r}\nstderr: {p.stderr!r}"
    err = p.stderr if isinstance(p.stderr, str) else p.stderr.decode()
    assert "Traceback" not in err, err
    assert err.startswith("layerfs: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    for n in needles:
        assert str(n) in err, err
    return err


def many_files(root: Path, n: int = 6000) -> Path:
    """A directory whose diff against an empty one is far more than a pipe holds."""
    root.mkdir()
    for i in range(n):
        (root / f"file-with-a-rather-long-name-to-fill-the-pipe-{i:05d}").write_bytes(b"")
    return root


def listing(root: Path):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None)
                  for p in root.rglob("*"))


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs: writing more than that fails with ENOSPC."""
    mp = tmp_path / "tiny"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mp)], check=True)
    try:
        yield mp
    finally:
        subprocess.run(["umount", "-l", str(mp)], check=True)


# --------------------------------------------------------------------------- stdout


@pytest.mark.parametrize("fmt", [[], ["--json-lines"]])
def test_diff_into_a_pipe_closed_early_exits_2_quietly(tmp_path, fmt):
    """`layerfs diff A B | head -1`: no traceback, and not exit 1 ("different"),
    which a closed pipe must not pretend to have found out."""
    (tmp_path / "empty").mkdir()
    many = many_files(tmp_path / "many")
    p = subprocess.Popen(LAYERFS_CMD + ["diff", *fmt, str(tmp_path / "empty"), str(many)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()                                   # what `head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 2, err
    assert first and "Traceback" not in err and "Exception ignored" not in err, err


def test_main_returns_its_status_when_stdout_breaks(tmp_path):
    """main(argv) -> int returns 2 on a broken stdout; it does not raise SystemExit."""
    (tmp_path / "empty").mkdir()
    many = many_files(tmp_path / "many")
    code = ("import sys\nfrom layerfs.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = f'SystemExit({e.code})'\n"
            "sys.stderr.write(f'returned {rc}\\n')\n")
    p = subprocess.Popen([sys.executable, "-c", code, "diff", str(tmp_path / "empty"), str(many)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "returned 2\n" in err, err


_LEAVE = ("import atexit, sys, threading, time\n"
          "from layerfs.cli import _leave\n"
          "mark = sys.argv[1]\n"
          "atexit.register(lambda: open(mark, 'a').write('atexit\\n'))\n"
          "def late():\n    time.sleep(0.2)\n    open(mark, 'a').write('thread\\n')\n"
          "threading.Thread(target=late).start()\n"
          "sys.stdout.write('unflushed output ' * 100)\n"
          "_leave(int(sys.argv[2]))\n")


@pytest.mark.parametrize("status", [0, 1])
def test_leaving_joins_threads_runs_atexit_and_reports_the_last_flush(tmp_path, status):
    """The command's quick exit still waits for threads that are not daemons,
    runs the atexit handlers, and flushes stdout: output that cannot be written
    at the end is exit 2 and one line, not the interpreter's 'Exception
    ignored' and exit 120."""
    mark = tmp_path / "mark"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # stdout buffered
    with open(tmp_path / "out", "wb") as out:
        p = subprocess.run([sys.executable, "-c", _LEAVE, str(mark), str(status)], stdout=out,
                           stderr=subprocess.PIPE, text=True, env=env)
    assert p.returncode == status and p.stderr == ""
    assert (tmp_path / "out").read_text() == "unflushed output " * 100
    assert mark.read_text() == "thread\natexit\n"
    mark.unlink()
    with open("/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, "-c", _LEAVE, str(mark), str(status)], stdout=full,
                           stderr=subprocess.PIPE, text=True, env=env)
    one_error_line(p, "standard output", "No space left on device")
    assert mark.read_text() == "thread\natexit\n"
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-c", _LEAVE, str(mark), str(status)], stdout=w,
                           stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(w)
    assert p.returncode == 2 and p.stderr == ""      # a reader that went away: quietly


def test_diff_text_shows_names_that_are_not_utf8(tmp_path):
    """Paths are bytes: the text output writes them as they are (like ls and diff)
    instead of failing with an encoding error."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / os.fsdecode(b"caf\xe9-latin1")).write_bytes(b"x")
    p = subprocess.run(LAYERFS_CMD + ["diff", str(a), str(b)], capture_output=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stdout == b"A /caf\xe9-latin1\n"
    # a layer file's name is printed back the same way, after the unpack worked
    layer = TarBuilder().file("f", b"f").write(tmp_path / os.fsdecode(b"l\xff.tar"))
    p = subprocess.run(LAYERFS_CMD + ["unpack", str(layer), str(tmp_path / "dest")],
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(os.fsencode(layer) + b"\tdigest sha256:")
    # the same under the C locale
    env = dict(os.environ, LC_ALL="C", LANG="C")
    p = subprocess.run(LAYERFS_CMD + ["diff", str(a), str(b)], capture_output=True, timeout=120,
                       env=env)
    assert p.returncode == 1 and p.stdout == b"A /caf\xe9-latin1\n", p.stderr


@pytest.mark.parametrize("args", [["diff", "{a}", "{b}"], ["digest", "{layer}"],
                                  ["diff", "--json", "{a}", "{b}"]])
def test_closed_stdout_is_an_error_not_a_traceback_or_silence(tmp_path, args):
    """Started with fd 1 closed (`layerfs ... >&-`): the output cannot be written,
    which is an error (exit 2, one line), not a traceback nor a silent exit 0."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "new").write_bytes(b"x")
    layer = TarBuilder().file("f", b"f").write(tmp_path / "l.tar")
    argv = [x.format(a=a, b=b, layer=layer) for x in args]
    p = subprocess.run(LAYERFS_CMD + argv, stderr=subprocess.PIPE, text=True, timeout=120,
                       preexec_fn=lambda: os.close(1))
    one_error_line(p, "standard output")


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_unpack_one_line_no_leftovers(tmp_path):
    """SIGINT while a layer is read from a FIFO: exit non-zero, one line on stderr,
    no traceback, and neither DEST nor its staging directory remains."""
    l0 = TarBuilder().dir("etc").file("etc/a", b"a").write(tmp_path / "0.tar")
    data = TarBuilder().dir("big").file("big/f", os.urandom(1 << 20)).write(
        tmp_path / "big.tar").read_bytes()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dest = tmp_path / "dest"
    p = subprocess.Popen(LAYERFS_CMD + ["unpack", str(l0), str(fifo), str(dest)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(fifo, "wb") as w:
        w.write(data[:len(data) // 2])
        w.flush()
        p.send_signal(signal.SIGINT)                   # pending before the layer can end
        try:
            w.write(data[len(data) // 2:])
        except BrokenPipeError:
            pass
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("layerfs: "), repr(err)
    assert out == ""
    assert sorted(os.listdir(tmp_path)) == ["0.tar", "big.tar", "fifo"]


# --------------------------------------------------------------------------- reasons


def test_full_disk_error_says_the_disk_is_full(tmp_path, tiny_fs):
    layer = TarBuilder().dir("d").file("d/big", os.urandom(2 << 20)).write(tmp_path / "l.tar")
    p = subprocess.run(LAYERFS_CMD + ["unpack", str(layer), str(tiny_fs / "out")],
                       capture_output=True, text=True, timeout=120)
    one_error_line(p, layer, "d/big", os.strerror(28))
    assert os.listdir(tiny_fs) == []                   # nothing staged remains


NOBODY_MAIN = """
import importlib, os, pkgutil, sys
import layerfs
for m in pkgutil.walk_packages(layerfs.__path__, "layerfs."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
import difflib, importlib.metadata, json, tempfile  # the interpreter's tree is root's
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
from layerfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def as_nobody(*args, cwd):
    """layerfs as uid 65534 (imports done first: the interpreter lives under /root)."""
    return subprocess.run([sys.executable, "-c", NOBODY_MAIN, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_unreadable_directory_error_says_permission_denied(tmp_path):
    """Relative names: the child starts in tmp_path, whose parents are root's 0700."""
    os.chmod(tmp_path, 0o755)
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "f").write_bytes(b"f")
    os.chmod(locked, 0)
    (tmp_path / "other").mkdir()
    p = as_nobody("diff", "locked", "other", cwd=tmp_path)
    one_error_line(p, "locked", os.strerror(13))


def test_a_path_behind_an_unreadable_directory_is_permission_denied_not_missing(tmp_path):
    os.chmod(tmp_path, 0o755)
    locked = tmp_path / "locked"
    (locked / "inner").mkdir(parents=True)
    os.chmod(locked, 0o700)
    (tmp_path / "other").mkdir()
    p = as_nobody("diff", "locked/inner", "other", cwd=tmp_path)
    one_error_line(p, "locked/inner", os.strerror(13))
    assert "no such" not in p.stderr.lower()


# --------------------------------------------------------------------------- nothing half-done


def test_unpack_onto_a_populated_dest_with_a_corrupt_layer_leaves_it_unchanged(tmp_path):
    """The first layer is fine, the second is cut short: DEST, which already holds
    files (so it is not staged), must not keep the first layer's files."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_bytes(b"mine")
    before = listing(dest)
    good = TarBuilder().dir("etc").file("etc/a", b"a" * 3000).write(tmp_path / "0.tar")
    whole = TarBuilder().dir("usr").file("usr/b", b"b" * 5000).write(tmp_path / "1.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:1600])
    p = subprocess.run(LAYERFS_CMD + ["unpack", str(good), str(cut), str(dest)],
                       capture_output=True, text=True, timeout=120)
    one_error_line(p, cut)
    assert listing(dest) == before


def test_save_into_a_missing_directory_names_the_output(tmp_path):
    layer = TarBuilder().dir("etc").file("etc/a", b"a").write(tmp_path / "0.tar")
    oci = write_oci([layer], tmp_path / "oci")
    root = tmp_path / "store"
    p = subprocess.run(LAYERFS_CMD + ["--root", str(root), "--driver", "vfs", "load", "-q", "-i",
                                      str(oci)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "no" / "such" / "dir" / "img.tar"
    p = subprocess.run(LAYERFS_CMD + ["--root", str(root), "save", "example.com/test/img:1",
                                      "-o", str(out)], capture_output=True, text=True, timeout=120)
    err = one_error_line(p, out)
    assert ".tmp-" not in err
    assert not (tmp_path / "no").exists()
    p = subprocess.run(LAYERFS_CMD + ["--root", str(root), "fsck", "--json"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True, p.stdout + p.stderr


# --------------------------------------------------------------------------- option values


@pytest.mark.parametrize("option,value", [("--max-wasted-bytes", "lots"),
                                          ("--min-efficiency", "half"),
                                          ("--min-efficiency", "2")])
def test_bad_gate_values_name_the_option(tmp_path, option, value):
    layer = TarBuilder().file("f", b"f").write(tmp_path / "0.tar")
    p = subprocess.run(LAYERFS_CMD + ["layers", option, value, str(layer)], capture_output=True,
                       text=True, timeout=120)
    one_error_line(p, option, value)




def test_rmi_with_an_unknown_reference_removes_nothing(tmp_path):
    """`rmi IMG nosuch`: the unknown name is an error before anything is removed
    (not after IMG is gone, which --json would then not even report)."""
    layer = TarBuilder().dir("etc").file("etc/a", b"a").write(tmp_path / "0.tar")
    oci = write_oci([layer], tmp_path / "oci")
    root = str(tmp_path / "store")
    run = lambda *a: subprocess.run(LAYERFS_CMD + ["--root", root, *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    assert run("--driver", "vfs", "load", "-q", "-i", str(oci)).returncode == 0
    for fmt in ([], ["--json"]):
        p = run("rmi", *fmt, "example.com/test/img:1", "nosuch:1")
        one_error_line(p, "nosuch:1")
        assert p.stdout == ""
        p = run("images", "--json")
        names = [n for i in json.loads(p.stdout)["images"] for n in i["names"]]
        assert names == ["example.com/test/img:1"]
    p = run("fsck", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True


@pytest.mark.parametrize("how", ["load -t", "load --name", "import"])
def test_a_bad_image_name_stores_nothing(tmp_path, how):
    """A name that is not a valid reference is refused before the image is
    stored, not after (which left an untagged image behind, and exit 2)."""
    layer = TarBuilder().dir("etc").file("etc/a", b"a").write(tmp_path / "0.tar")
    oci = write_oci([layer], tmp_path / "oci")
    # a bare OCI tag, so that --name is what names it
    index = json.loads((oci / "index.json").read_text())
    index["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": "1"}
    (oci / "index.json").write_text(json.dumps(index))
    root = str(tmp_path / "store")
    run = lambda *a: subprocess.run(LAYERFS_CMD + ["--root", root, "--driver", "vfs", *a],  # noqa
                                    capture_output=True, text=True, timeout=120)
    args = {"load -t": ["load", "-i", str(oci), "-t", "ok:1", "-t", "Not/Valid"],
            "load --name": ["load", "-i", str(oci), "--name", "Not/Valid"],
            "import": ["import", str(layer), "Not/Valid"]}[how]
    one_error_line(run(*args), "Not/Valid")
    p = run("df", "--json")
    assert p.returncode == 0, p.stderr
    totals = json.loads(p.stdout)["totals"]
    assert (totals["images"], totals["layers"], totals["blobs"]) == (0, 0, 0)


def test_an_unknown_driver_is_not_remembered(tmp_path):
    """--driver with a name no driver has: an error that does not write the name
    into a new store (which then refused every later command)."""
    root = tmp_path / "store"
    p = subprocess.run(LAYERFS_CMD + ["--root", str(root), "--driver", "bogus", "images"],
                       capture_output=True, text=True, timeout=120)
    one_error_line(p, "bogus")
    p = subprocess.run(LAYERFS_CMD + ["--root", str(root), "images", "--driver", "bogus"],
                       capture_output=True, text=True, timeout=120)
    one_error_line(p, "bogus")
    p = subprocess.run(LAYERFS_CMD + ["--root", str(root), "--driver", "vfs", "images", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["images"] == [], p.stderr


def documents(tmp_path: Path) -> Path:
    """A directory of someone's files (what a mistyped --root may name)."""
    d = tmp_path / "documents"
    d.mkdir()
    (d / "notes.txt").write_bytes(b"mine")
    return d


@pytest.mark.parametrize("verb", [["images"], ["df", "--json"], ["prune"]])
def test_root_that_holds_other_files_is_not_made_a_store(tmp_path, verb):
    """--root naming a directory of other files (a typo, $HOME): an error, and
    nothing of a store is written among those files."""
    root = documents(tmp_path)
    p = subprocess.run(LAYERFS_CMD + ["--root", str(root), *verb], capture_output=True,
                       text=True, timeout=120)
    one_error_line(p, root, "not a layerfs store")
    assert os.listdir(root) == ["notes.txt"]
    # an empty directory, or one holding a store, is fine
    (tmp_path / "empty").mkdir()
    p = subprocess.run(LAYERFS_CMD + ["--root", str(tmp_path / "empty"), "--driver", "vfs",
                                      *verb], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(LAYERFS_CMD + ["--root", str(tmp_path / "empty"), *verb],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("fmt", ["oci", "docker-archive"])
def test_save_onto_a_full_disk_leaves_nothing_and_names_the_output(tmp_path, tiny_fs, fmt):
    big = TarBuilder().dir("d").file("d/big", os.urandom(2 << 20)).write(tmp_path / "0.tar")
    oci = write_oci([big], tmp_path / "oci")
    root = str(tmp_path / "store")
    run = lambda *a: subprocess.run(LAYERFS_CMD + ["--root", root, *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    assert run("--driver", "vfs", "load", "-q", "-i", str(oci)).returncode == 0
    out = tiny_fs / "img.tar"
    p = run("save", "--format", fmt, "example.com/test/img:1", "-o", str(out))
    one_error_line(p, out, os.strerror(28))
    assert os.listdir(tiny_fs) == []                   # no partial or hidden temporary file
    # where there is room, the same command writes the tarball under its name
    good = tmp_path / "img.tar"
    p = run("save", "--json", "--format", fmt, "example.com/test/img:1", "-o", str(good))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["dest"] == str(good)
    assert sorted(os.listdir(tmp_path)) == ["0.tar", "img.tar", "oci", "store", "tiny"]


@pytest.mark.parametrize("verb", [["diff", "store:img:1", "empty:"], ["layers", "store:img:1"]])
def test_reading_store_sources_does_not_make_a_store(tmp_path, verb):
    """diff and layers only read a store: a --root without one is an error, and
    neither a new directory nor a store among other files is created."""
    missing = tmp_path / "missing"
    p = subprocess.run(LAYERFS_CMD + ["--root", str(missing), *verb], capture_output=True,
                       text=True, timeout=120)
    one_error_line(p, missing, "no layerfs store")
    assert not missing.exists()
    other = documents(tmp_path)
    p = subprocess.run(LAYERFS_CMD + ["--root", str(other), *verb], capture_output=True,
                       text=True, timeout=120)
    one_error_line(p, other, "no layerfs store")
    assert os.listdir(other) == ["notes.txt"]


def test_unpack_into_a_symlink_to_an_empty_directory(tmp_path):
    """DEST a symlink to an empty directory: the layers land in that directory
    (it failed with 'Not a directory', naming the staging directory)."""
    layer = TarBuilder().dir("etc").file("etc/a", b"a").write(tmp_path / "0.tar")
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    p = subprocess.run(LAYERFS_CMD + ["unpack", "--json", str(layer), str(tmp_path / "link")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["dest"] == str(tmp_path / "link")
    assert os.readlink(tmp_path / "link") == "real"
    assert (tmp_path / "real/etc/a").read_bytes() == b"a"
    assert sorted(os.listdir(tmp_path)) == ["0.tar", "link", "real"]


def test_fsck_prints_problems_on_stdout_and_its_summary_on_stderr(tmp_path):
    """`layerfs fsck > problems.txt` holds the problems only (none for a sound
    store); the 'checked ...' summary goes to stderr, as diff's does."""
    layer = TarBuilder().dir("etc").file("etc/a", b"a" * 100).write(tmp_path / "0.tar")
    oci = write_oci([layer], tmp_path / "oci")
    root = tmp_path / "store"
    run = lambda *a: subprocess.run(LAYERFS_CMD + ["--root", str(root), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    assert run("--driver", "vfs", "load", "-q", "-i", str(oci)).returncode == 0
    p = run("fsck")
    assert p.returncode == 0 and p.stdout == "", p.stdout
    assert p.stderr.startswith("checked ") and p.stderr.rstrip().endswith(": ok")
    blobs = root / "blobs" / "sha256"
    victim = sorted(blobs.iterdir())[0]
    with open(victim, "ab") as f:
        f.write(b"x")
    p = run("fsck")
    assert p.returncode == 1
    assert p.stdout.splitlines() and all(l.startswith(("blob ", "layer ", "image ", "name "))
                                         for l in p.stdout.splitlines()), p.stdout
    assert f"blob sha256:{victim.name}" in p.stdout
    assert "checked " in p.stderr and "problem(s)" in p.stderr


def test_failed_unpack_removes_the_parents_it_made(tmp_path):
    """DEST's missing parents are made for it; when a layer fails they go too."""
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar archive " * 40)
    dest = tmp_path / "a" / "b" / "c" / "dest"
    p = subprocess.run(LAYERFS_CMD + ["unpack", str(bad), str(dest)], capture_output=True,
                       text=True, timeout=120)
    one_error_line(p, bad)
    assert sorted(os.listdir(tmp_path)) == ["bad.tar"]
    good = TarBuilder().file("f", b"f").write(tmp_path / "good.tar")
    p = subprocess.run(LAYERFS_CMD + ["unpack", str(good), str(dest)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and (dest / "f").read_bytes() == b"f", p.stderr


def test_a_damaged_store_json_is_named(tmp_path):
    root = tmp_path / "store"
    p = subprocess.run(LAYERFS_CMD + ["--root", str(root), "--driver", "vfs", "images"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    (root / "store.json").write_text('{"version": 1, "driver": ')
    p = subprocess.run(LAYERFS_CMD + ["--root", str(root), "images"], capture_output=True,
                       text=True, timeout=120)
    one_error_line(p, root / "store.json", "not valid JSON")
    assert (root / "store.json").read_text() == '{"version": 1, "driver": '


def test_an_error_names_a_path_as_text_not_as_bytes(tmp_path):
    missing = tmp_path / "no-such-upper"
    p = subprocess.run(LAYERFS_CMD + ["diff", f"upper:{missing}", "empty:"], capture_output=True,
                       text=True, timeout=120)
    err = one_error_line(p, f"{missing}: ")
    assert "b'" not in err


@pytest.fixture
def open_tmp():
    """A directory every user can reach (pytest's tmp_path lies under root's 0700 one)."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="layerfs-cli-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        for p in [d, *d.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)
        shutil.rmtree(d)


def test_unpack_where_dest_cannot_be_made_names_that_directory(open_tmp):
    """As a user who cannot write the directory DEST would be made in: the error
    names that directory, not the hidden staging directory it could not create."""
    tmp_path = open_tmp
    TarBuilder().file("f", b"f").write(tmp_path / "0.tar")
    (tmp_path / "ro").mkdir(mode=0o555)
    os.chmod(tmp_path / "ro", 0o555)
    p = as_nobody("unpack", "--owners", "skip", "0.tar", "ro/dest", cwd=tmp_path)
    err = one_error_line(p, "ro", os.strerror(13), "ro/dest")
    assert ".new-" not in err
    assert os.listdir(tmp_path / "ro") == []


@pytest.mark.parametrize("verb", ["load", "import"])
def test_load_or_import_from_a_pipe_is_refused_by_name(tmp_path, verb):
    """An image tarball is read with seeks, a rootfs tarball twice: `load -i FIFO`
    or `import FIFO` (or /dev/stdin from a pipe) is refused naming the input, not
    with a bare 'Illegal seek' or by blocking on the pipe's second opening."""
    fifo = tmp_path / "image.tar"
    os.mkfifo(fifo)
    root = tmp_path / "store"
    args = ["load", "-i", str(fifo)] if verb == "load" else ["import", str(fifo), "x:1"]
    p = subprocess.run(LAYERFS_CMD + ["--root", str(root), "--driver", "vfs", *args],
                       capture_output=True, text=True, timeout=60)
    one_error_line(p, fifo, "pipe")
    assert not root.exists()


@pytest.mark.parametrize("content", [b"not a layer\n", b"\x1f\x8b" + bytes(40), b"A" * 4096])
def test_digest_of_a_file_that_is_no_tar_is_an_error(tmp_path, content):
    """A DiffID names a tar stream: a blob that is none (nor a compressed one) is refused."""
    f = tmp_path / "blob"
    f.write_bytes(content)
    p = subprocess.run(LAYERFS_CMD + ["digest", str(f)], capture_output=True, text=True)
    one_error_line(p, str(f))
    assert p.stdout == ""


def test_digest_of_a_gzip_layer_matches_its_tar(tmp_path):
    import gzip
    import hashlib
    tar = TarBuilder().dir("etc").file("etc/a", b"a" * 3000).write(tmp_path / "l.tar")
    gz = tmp_path / "l.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    p = subprocess.run(LAYERFS_CMD + ["digest", "--json", str(gz)], capture_output=True,
                       text=True, check=True)
    doc = json.loads(p.stdout)["files"][0]
    assert doc["digest"] == "sha256:" + hashlib.sha256(gz.read_bytes()).hexdigest()
    assert doc["diff_id"] == "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()


def test_json_text_keeps_what_fits_on_a_line():
    from layerfs.cli._output import json_text
    doc = {"version": 1, "small": {"a": [1, 2]}, "empty": [], "items": [{"p": "/x" * i} for i in range(5)],
           "big": {"k": "v" * 300, "l": list(range(3))}}
    text = json_text(doc, width=100)
    assert json.loads(text) == doc
    lines = text.splitlines()
    assert '  "small": {"a": [1, 2]},' in lines and '  "empty": [],' in lines
    for i in range(5):               # each list item on a line of its own
        assert sum(json.dumps({"p": "/x" * i}) in l for l in lines) == 1
    assert '    "l": [0, 1, 2]' in lines  # too long as a whole, its short parts stay whole
    assert all(len(l) <= 100 for l in lines if '"v' not in l)
    assert json.loads(json_text(list(range(1000)))) == list(range(1000))


def test_unpack_relative_dest_under_a_closed_parent(tmp_path):
    """The working directory is nobody's, its parents are root's 0700: relative
    names must do (as they do for tar)."""
    os.chmod(tmp_path, 0o755)
    work = tmp_path / "work"
    work.mkdir()
    layer = work / "l.tar"
    with tarfile.open(layer, "w") as tf:
        ti = tarfile.TarInfo("etc/hostname")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"box"))
    for p in (work, layer):
        os.chown(p, 65534, 65534)
    os.chmod(tmp_path, 0o700)
    for dest in ("out", "sub/deeper/out", "./out2/"):
        p = as_nobody("unpack", "-q", "--owners", "skip", "l.tar", dest, cwd=work)
        assert p.returncode == 0, (dest, p.stderr)
        assert (work / dest / "etc/hostname").read_bytes() == b"box"
    assert sorted(n for n in os.listdir(work) if n.startswith(".")) == []   # no staging left
