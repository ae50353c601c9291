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

ffibuilder.set_source(
    "layerfs._core",
    '#include "layerfs.h"\n',
    sources=_sources(),
    include_dirs=[str(CSRC)],
    libraries=["crypto", "z", "zstd", "isal"],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
