"""cffi build script for layerfs._core (out-of-line API mode).

setup.py names this module in ``cffi_modules``.  The cdef is csrc/layerfs.h
with its preprocessor lines removed; the sources are every csrc/*.c.
Set LAYERFS_SANITIZE=address (or undefined) to build with a sanitizer.
"""
import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent.parent
CSRC = HERE / "csrc"


def _cdef() -> str:
    text = (CSRC / "layerfs.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#define"):
            continue
        if stripped.startswith("#define LAYERFS_H"):
            continue
        lines.append(line)
    return "\n".join(lines)


def _sources():
    return sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.c"))


ffibuilder = FFI()
ffibuilder.cdef(_cdef())

_cflags = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
           "-fvisibility=hidden", "-pthread"]
_ldflags = ["-pthread"]
_sanitize = os.environ.get("LAYERFS_SANITIZE")
if _sanitize:
    _cflags += [f"-fsanitize={_sanitize}", "-fno-omit-frame-pointer", "-g", "-O1"]
    _ldflags += [f"-fsanitize={_sanitize}"]


def _pkg_include_dirs(pkg: str, default):
    """Include directories of a pkg-config package (the default when pkg-config is missing)."""
    import shutil
    import subprocess
    if shutil.which("pkg-config"):
        p = subprocess.run(["pkg-config", "--cflags-only-I", pkg], capture_output=True, text=True)
        if p.returncode == 0:
            return [f[2:] for f in p.stdout.split() if f.startswith("-I")]
    return list(default)


ffibuilder.set_source(
    "layerfs._core",
    '#include "layerfs.h"\n',
    sources=_sources(),
    include_dirs=[str(CSRC)] + _pkg_include_dirs("fuse3", ["/usr/include/fuse3"]),
    libraries=["crypto", "z", "zstd", "isal", "fuse3"],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
