"""Raw tar construction for tests: every header byte is under the caller's control.

Headers are built field by field (ustar layout), checksums are computed unless
overridden, and PAX / GNU long-name records are written by hand, so tests can
produce both well-formed archives and deliberately broken ones.

    t = Tar()
    t.dir("a/")
    t.file("a/f", b"hello", mode=0o4755, uid=1000, pax={"mtime": "1.5"})
    t.symlink("a/l", "../f")
    t.whiteout("a/gone")
    data = t.bytes()               # with the two zero end blocks
    gz = gzip_bytes(data)
"""
from __future__ import annotations

import gzip
import io
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

BLOCK = 512
Str = Union[str, bytes]

# (name, offset, length) of the ustar header fields
FIELDS = [
    ("name", 0, 100), ("mode", 100, 8), ("uid", 108, 8), ("gid", 116, 8),
    ("size", 124, 12), ("mtime", 136, 12), ("chksum", 148, 8), ("typeflag", 156, 1),
    ("linkname", 157, 100), ("magic", 257, 6), ("version", 263, 2), ("uname", 265, 32),
    ("gname", 297, 32), ("devmajor", 329, 8), ("devminor", 337, 8), ("prefix", 345, 155),
]
FIELD = {name: (off, length) for name, off, length in FIELDS}


def b(s: Str) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")


def octal(value: int, length: int) -> bytes:
    """NUL-terminated zero-padded octal, as GNU tar writes it."""
    digits = b"%0*o" % (length - 1, value)
    if len(digits) > length - 1:
        raise ValueError(f"{value} does not fit in {length} bytes of octal")
    return digits + b"\0"


def base256(value: int, length: int) -> bytes:
    """GNU base-256 (binary) number: first byte 0x80 (positive) or 0xff (negative)."""
    raw = (value % (1 << (8 * length))).to_bytes(length, "big")
    if value >= 0:
        if raw[0] & 0x80 or value >= 1 << (8 * length - 1):
            raise ValueError("too large for base-256 field")
        return bytes([0x80]) + raw[1:]
    return raw  # two's complement: starts with 0xff for small negatives


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 32 + sum(header[156:BLOCK])


def header(name: Str = b"", *, typeflag: Str = b"0", mode: Union[int, bytes] = 0o644,
           uid: Union[int, bytes] = 0, gid: Union[int, bytes] = 0,
           size: Union[int, bytes] = 0, mtime: Union[int, bytes] = 0,
           linkname: Str = b"", uname: Str = b"", gname: Str = b"",
           devmajor: Union[int, bytes] = 0, devminor: Union[int, bytes] = 0,
           prefix: Str = b"", magic: bytes = b"ustar\x00", version: bytes = b"00",
           chksum: Optional[Union[int, bytes]] = None, raw: Optional[Dict[str, bytes]] = None) -> bytes:
    """One 512-byte header.  Integer fields are octal; pass bytes to write a
    field verbatim (e.g. base256(...) or garbage).  raw overrides any field's
    bytes after encoding; chksum given as int/bytes replaces the computed one."""
    h = bytearray(BLOCK)

    def put(field: str, value: bytes):
        off, length = FIELD[field]
        if len(value) > length:
            raise ValueError(f"{field} too long ({len(value)} > {length})")
        h[off:off + len(value)] = value

    def num(field: str, value):
        length = FIELD[field][1]
        put(field, value if isinstance(value, bytes) else octal(value, length))

    put("name", b(name))
    num("mode", mode)
    num("uid", uid)
    num("gid", gid)
    num("size", size)
    num("mtime", mtime)
    put("typeflag", b(typeflag))
    put("linkname", b(linkname))
    put("magic", magic)
    put("version", version)
    put("uname", b(uname))
    put("gname", b(gname))
    num("devmajor", devmajor)
    num("devminor", devminor)
    put("prefix", b(prefix))
    for field, value in (raw or {}).items():
        off, length = FIELD[field]
        h[off:off + length] = value.ljust(length, b"\0")[:length]
    if chksum is None:
        h[148:156] = b"%06o\0 " % checksum(bytes(h))
    elif isinstance(chksum, int):
        h[148:156] = b"%06o\0 " % chksum
    else:
        h[148:156] = chksum.ljust(8, b"\0")[:8]
    return bytes(h)


def pax_record(key: Str, value: Str) -> bytes:
    """'<len> key=value\\n' where len counts the whole record including itself."""
    body = b" " + b(key) + b"=" + b(value) + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax_data(records: Union[Dict[Str, Str], Sequence[Tuple[Str, Str]]]) -> bytes:
    items = records.items() if isinstance(records, dict) else records
    return b"".join(pax_record(k, v) for k, v in items)


def pax_header(records, *, name: Str = b"PaxHeaders/x", typeflag: Str = b"x",
               size: Optional[Union[int, bytes]] = None, data: Optional[bytes] = None,
               **hdr) -> bytes:
    """A PAX extended header ('x', or 'g' for global) with its padded data.
    size overrides the declared size (data is written as given)."""
    body = pax_data(records) if data is None else data
    return header(name, typeflag=typeflag, size=len(body) if size is None else size,
                  mode=0o644, **hdr) + pad(body)


def gnu_long(kind: Str, value: Str, *, size: Optional[Union[int, bytes]] = None) -> bytes:
    """GNU ././@LongLink record: kind 'L' (name) or 'K' (link name); value NUL-terminated."""
    body = b(value) + b"\0"
    return header(b"././@LongLink", typeflag=kind, size=len(body) if size is None else size,
                  magic=b"ustar ", version=b" \0") + pad(body)


def end() -> bytes:
    return b"\0" * (2 * BLOCK)


def split_ustar(name: bytes) -> Tuple[bytes, bytes]:
    """Split a name into (prefix, name) for ustar if possible, else raise."""
    if len(name) <= 100:
        return b"", name
    for i in range(len(name) - 1, 0, -1):
        if name[i:i + 1] == b"/" and i <= 155 and len(name) - i - 1 <= 100 and len(name) - i - 1 > 0:
            return name[:i], name[i + 1:]
    raise ValueError("name does not fit ustar")


class Tar:
    """An archive under construction.  Each method appends one entry.  Names
    longer than 100 bytes get a PAX 'path' / 'linkpath' record (long="pax"), a
    GNU ././@LongLink record (long="gnu"), or the ustar prefix field
    (long="ustar"); long=None raises instead."""

    def __init__(self, long: Optional[str] = "pax"):
        self.parts: List[bytes] = []
        self.long = long

    # -- low level ---------------------------------------------------------
    def raw(self, data: bytes) -> "Tar":
        self.parts.append(data)
        return self

    def entry(self, name: Str, typeflag: Str, data: bytes = b"", *, linkname: Str = b"",
              pax: Optional[Union[Dict[Str, Str], Sequence[Tuple[Str, Str]]]] = None,
              size: Optional[Union[int, bytes]] = None, **hdr) -> "Tar":
        name, linkname = b(name), b(linkname)
        records = list((pax.items() if isinstance(pax, dict) else pax) if pax else [])
        keys = {b(k) for k, _ in records}
        pre = []
        prefix = b""
        if len(name) > 100:
            if self.long == "gnu":
                pre.append(gnu_long(b"L", name))
            elif self.long == "ustar":
                prefix, name = split_ustar(name)
            elif self.long == "pax":
                if b"path" not in keys:
                    records.append((b"path", name))
            else:
                raise ValueError("name longer than 100 bytes")
            name = name[:100]
        if len(linkname) > 100:
            if self.long == "gnu":
                pre.append(gnu_long(b"K", linkname))
            elif self.long in ("pax", "ustar"):
                if b"linkpath" not in keys:
                    records.append((b"linkpath", linkname))
            else:
                raise ValueError("link name longer than 100 bytes")
            linkname = linkname[:100]
        for field in ("uid", "gid", "mtime"):
            value = hdr.get(field)
            if isinstance(value, int) and not 0 <= value < 8 ** (FIELD[field][1] - 1):
                if self.long == "pax" and b(field) not in keys:
                    records.append((b(field), b"%d" % value))
                    hdr[field] = 0
                else:
                    hdr[field] = base256(value, FIELD[field][1])
        if records:
            self.parts.append(pax_header(records, name=b"PaxHeaders/" + name[-80:]))
        self.parts.extend(pre)
        self.parts.append(header(name, typeflag=typeflag, linkname=linkname, prefix=prefix,
                                 size=len(data) if size is None else size, **hdr))
        if data:
            self.parts.append(pad(data))
        return self

    # -- conveniences ------------------------------------------------------
    def file(self, name: Str, data: bytes = b"", *, mode: int = 0o644, **kw) -> "Tar":
        return self.entry(name, b"0", data, mode=mode, **kw)

    def dir(self, name: Str, *, mode: int = 0o755, **kw) -> "Tar":
        return self.entry(name, b"5", mode=mode, **kw)

    def symlink(self, name: Str, target: Str, *, mode: int = 0o777, **kw) -> "Tar":
        return self.entry(name, b"2", linkname=target, mode=mode, **kw)

    def hardlink(self, name: Str, target: Str, *, mode: int = 0o644, **kw) -> "Tar":
        return self.entry(name, b"1", linkname=target, mode=mode, **kw)

    def char(self, name: Str, major: int, minor: int, *, mode: int = 0o666, **kw) -> "Tar":
        return self.entry(name, b"3", mode=mode, devmajor=major, devminor=minor, **kw)

    def block(self, name: Str, major: int, minor: int, *, mode: int = 0o660, **kw) -> "Tar":
        return self.entry(name, b"4", mode=mode, devmajor=major, devminor=minor, **kw)

    def fifo(self, name: Str, *, mode: int = 0o644, **kw) -> "Tar":
        return self.entry(name, b"6", mode=mode, **kw)

    def whiteout(self, path: Str, **kw) -> "Tar":
        """.wh.<basename> in the path's directory."""
        path = b(path).rstrip(b"/")
        d, _, base = path.rpartition(b"/")
        return self.file((d + b"/" if d else b"") + b".wh." + base, **kw)

    def opaque(self, dirpath: Str, **kw) -> "Tar":
        d = b(dirpath).rstrip(b"/")
        return self.file((d + b"/" if d else b"") + b".wh..wh..opq", **kw)

    def sparse_file(self, name: Str, segments: Sequence[Tuple[int, bytes]], realsize: int,
                    *, mode: int = 0o644, **kw) -> "Tar":
        """A PAX GNU.sparse 1.0 entry: segments are (offset, data) in order.
        Like GNU tar, a final empty segment at realsize is added when the file
        ends in a hole.  The data segments follow the map back to back; GNU tar
        pads each one to a 512-byte block, so keep every segment but the last a
        multiple of 512 bytes for an archive both readings agree on."""
        name = b(name)
        segments = list(segments)
        if not segments or segments[-1][0] + len(segments[-1][1]) < realsize:
            segments.append((realsize, b""))
        mp = [b"%d\n" % len(segments)]
        for off, data in segments:
            mp.append(b"%d\n%d\n" % (off, len(data)))
        body = pad(b"".join(mp)) + b"".join(d for _, d in segments)
        records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                   (b"GNU.sparse.name", name), (b"GNU.sparse.realsize", b"%d" % realsize)]
        records += list(kw.pop("pax", {}).items())
        base = name.rpartition(b"/")[2]
        self.parts.append(pax_header(records, name=b"PaxHeaders/" + base[-80:]))
        self.parts.append(header(b"GNUSparseFile.0/" + base[-80:], typeflag=b"0", mode=mode,
                                 size=len(body), **kw))
        self.parts.append(pad(body))
        return self

    def bytes(self, *, trailer: bool = True) -> bytes:
        return b"".join(self.parts) + (end() if trailer else b"")


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=level, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def zstd_bytes(data: bytes, level: int = 3) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor(level=level).compress(data)


def simple(entries: Iterable[Tuple[str, bytes]]) -> bytes:
    """A plain archive of regular files (name, data)."""
    t = Tar()
    for name, data in entries:
        t.file(name, data)
    return t.bytes()


def run_as_nobody(code: str, fds: Sequence[int], env: Optional[dict] = None):
    """Run Python statements (with ``_native`` imported, over the inherited fds)
    in a child process as uid/gid 65534 without groups; it exits with the errno
    of an OSError (printed on stderr), else 0.  Returns the CompletedProcess."""
    import subprocess
    import sys
    import textwrap
    child = ("import os, sys; from layerfs import _native; os.setgroups([]); "
             "os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
             "try:\n" + textwrap.indent(code, "    ") + "\n"
             "except OSError as e:\n"
             "    print(e, file=sys.stderr); sys.exit(e.errno)")
    return subprocess.run([sys.executable, "-c", child], pass_fds=list(fds), capture_output=True,
                          text=True, cwd="/", env=env)


def native_as_nobody(call: str, fds: Sequence[int], env: Optional[dict] = None):
    """``_native.<call>`` (a Python expression over the inherited fds) run as
    nobody; see run_as_nobody."""
    return run_as_nobody(f"_native.{call}", fds, env)


def apply_as_nobody(root, data: bytes, env: Optional[dict] = None, **options):
    """Apply the layer data onto directory root in a child running as nobody
    (see native_as_nobody); the layer file is written beside root.  Returns
    (errno or 0, stderr)."""
    import os
    layer = root.parent / (root.name + ".layer.tar")
    layer.write_bytes(data)
    in_fd = os.open(layer, os.O_RDONLY)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        p = native_as_nobody(f"apply({in_fd}, {root_fd}, **{options!r})", [in_fd, root_fd], env=env)
    finally:
        os.close(in_fd)
        os.close(root_fd)
    return p.returncode, p.stderr.strip()
