"""mount(2) and umount2(2) for the drivers, through ctypes.

A mount whose options hold relative paths (overlay's short lower links) must
run with the working directory at the driver root.  The working directory is
per process, so such a mount runs in a forked child that chdirs and calls
mount(2) (about 1 ms, against ~3 ms for running mount(8)); every other mount
is a direct call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import subprocess
import time
from typing import Optional, Sequence

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _b(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else os.fsencode(s)


def mount(source: str, target: str, fstype: Optional[str], flags: int = 0,
          data: Optional[str] = None, cwd: Optional[str] = None) -> None:
    """mount(2); with cwd, in a forked child whose working directory is cwd.
    Raises OSError(errno) with the target as filename."""
    args = (_b(source), _b(target), _b(fstype), flags, _b(data))
    if cwd is None:
        if _libc.mount(*args) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {fstype or 'bind'} on {target}: {os.strerror(e)}", target)
        return
    cwd_b = os.fsencode(cwd)
    pid = os.fork()
    if pid == 0:  # child: no Python-level work beyond these calls
        try:
            os.chdir(cwd_b)
            rc = _libc.mount(*args)
            os._exit(0 if rc == 0 else (ctypes.get_errno() or _errno.EIO))
        except BaseException:
            os._exit(_errno.EIO)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        code = code if code > 0 else _errno.EIO
        raise OSError(code, f"mount {fstype or 'bind'} on {target}: {os.strerror(code)}", target)


def bind(source: str, target: str, readonly: bool) -> None:
    """A bind mount of source on target; read-only needs a second, remounting call."""
    mount(source, target, None, MS_BIND)
    if readonly:
        try:
            mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        except OSError:
            umount(target)
            raise


def umount(target: str, retries: int = 20) -> None:
    """umount2(2); while busy, retry a little, then detach lazily."""
    t = _b(target)
    for i in range(retries):
        if _libc.umount2(t, 0) == 0:
            return
        e = ctypes.get_errno()
        if e in (_errno.EINVAL, _errno.ENOENT):
            raise OSError(e, f"umount {target}: not mounted", target)
        if e != _errno.EBUSY:
            raise OSError(e, f"umount {target}: {os.strerror(e)}", target)
        time.sleep(0.005 * (i + 1))
    if _libc.umount2(t, MNT_DETACH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}", target)


def run_program(argv: Sequence[str], cwd: Optional[str] = None) -> None:
    """Run a mount helper program (fuse-overlayfs, fusermount3); raise OSError on failure."""
    p = subprocess.run(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).decode("utf-8", "replace").strip()
        raise OSError(_errno.EIO, f"{argv[0]} exited {p.returncode}: {msg}", argv[-1])
