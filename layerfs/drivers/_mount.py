"""mount(2) and umount2(2) for the drivers, through ctypes.

A mount whose options hold relative paths (overlay's short lower links) must
run with the working directory at the driver root.  The working directory is
shared by the threads of a process, so such a mount runs in a short-lived
thread that first unshares its fs attributes (unshare(CLONE_FS)), then chdirs
and calls mount(2): no fork of the Python process (tens of ms), no mount(8).
Every other mount is a direct call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import subprocess
import threading
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
CLONE_FS = 0x200

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int


def _b(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else os.fsencode(s)


def _mount_now(args, target: str, fstype: Optional[str]) -> None:
    if _libc.mount(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype or 'bind'} on {target}: {os.strerror(e)}", target)


def mount(source: str, target: str, fstype: Optional[str], flags: int = 0,
          data: Optional[str] = None, cwd: Optional[str] = None) -> None:
    """mount(2); with cwd, from a thread whose working directory is cwd.
    Raises OSError(errno) with the target as filename."""
    args = (_b(source), _b(target), _b(fstype), flags, _b(data))
    if cwd is None:
        _mount_now(args, target, fstype)
        return
    # The working directory belongs to the process; a thread that unshares its
    # fs attributes (CLONE_FS) gets one of its own and can chdir without
    # disturbing the others.  A short-lived thread costs ~0.1 ms, a fork of the
    # Python process tens of milliseconds.
    cwd_b = os.fsencode(cwd)
    outcome: list = []

    def run():
        try:
            if _libc.unshare(CLONE_FS) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"unshare(CLONE_FS): {os.strerror(e)}")
            os.chdir(cwd_b)
            _mount_now(args, target, fstype)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            outcome.append(e)

    t = threading.Thread(target=run, name="layerfs-mount")
    t.start()
    t.join()
    if outcome and outcome[0] is not None:
        raise outcome[0]
    if not outcome:
        raise OSError(_errno.EIO, f"mount {fstype or 'bind'} on {target}: mount thread failed",
                      target)


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
