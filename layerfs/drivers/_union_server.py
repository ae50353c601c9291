"""The union filesystem server of the ``aufs`` driver (a process of its own).

    python -m layerfs.drivers._union_server [--rw] [--workdir DIR] [--ready-fd N]
        [--foreground] [--fsname NAME] MOUNTPOINT LAYER [LAYER ...]

Layers are given top first; with ``--rw`` the first one is the writable
branch.  The C core (``lfs_union_serve``, csrc/union.c) mounts the union with
FUSE and serves it.  Unless ``--foreground``, the process forks once the mount
is up and the child serves until the mount goes away (umount, ``fusermount3
-u``, or SIGTERM to the child).  ``--ready-fd`` names a pipe that receives one
line, ``ok PID`` once the mount works or ``error ERRNO MESSAGE`` if it failed;
the driver waits on it, so mount() returns only with a working mount.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m layerfs.drivers._union_server",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--rw", action="store_true", help="the first layer is writable")
    ap.add_argument("--workdir", help="copy-up scratch directory on the first layer's filesystem")
    ap.add_argument("--ready-fd", type=int, default=-1, help="pipe for the readiness line")
    ap.add_argument("--foreground", action="store_true", help="serve in this process")
    ap.add_argument("--debug", action="store_true", help="trace FUSE requests on stderr")
    ap.add_argument("--no-passthrough", action="store_true",
                    help="serve every read and write in this process (no kernel passthrough)")
    ap.add_argument("--fsname", help="mount source shown in /proc/self/mountinfo")
    ap.add_argument("--entry-timeout", type=float, default=-1.0)
    ap.add_argument("--attr-timeout", type=float, default=-1.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("mountpoint")
    ap.add_argument("layers", nargs="+")
    return ap.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    from .._core import ffi, lib

    opts = ffi.new("lfs_union_opts *")
    keep = []

    def cstr(s: Optional[str]):
        if s is None:
            return ffi.NULL
        b = ffi.new("char[]", os.fsencode(s))
        keep.append(b)
        return b

    opts.writable = int(args.rw)
    opts.workdir = cstr(args.workdir)
    opts.daemonize = int(not args.foreground)
    opts.debug = int(args.debug)
    opts.no_passthrough = int(args.no_passthrough)
    opts.entry_timeout = args.entry_timeout
    opts.attr_timeout = args.attr_timeout
    opts.max_threads = max(0, args.threads)
    opts.fsname = cstr(args.fsname)
    layers = ffi.new("char *[]", [cstr(p) for p in args.layers])
    err = ffi.new("lfs_error *")
    err.offset = -1
    rc = lib.lfs_union_serve(os.fsencode(args.mountpoint), layers, len(args.layers), opts,
                             args.ready_fd, err)
    if rc < 0:
        msg = ffi.string(err.message).decode("utf-8", "replace") or os.strerror(-rc)
        path = ffi.string(err.path).decode("utf-8", "replace")
        print(f"layerfs union: {path + ': ' if path else ''}{msg}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return serve(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
