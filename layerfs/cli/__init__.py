"""The ``layerfs`` command.

``main(argv) -> int`` returns the exit status: 0 ok, 1 differences found
(diff), 2 error.  Errors print one line on stderr; payload (and ``--json``)
goes to stdout; progress goes to stderr, only when it is a terminal.
"""
from __future__ import annotations

import errno
import importlib
import io
import os
import select
import sys
from typing import List, Optional

import click

from ..errors import LayerError

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2


#: Which module defines each command; a command's module is imported only when
#: that command runs (or for --help), so `layerfs unpack` does not pay for the store.
COMMANDS = {
    "unpack": "archive_cmds", "digest": "archive_cmds",
    "drivers": "driver_cmds",
    "diff": "diff_cmds", "layers": "diff_cmds",
    "load": "store_cmds", "import": "store_cmds", "save": "store_cmds",
    "images": "store_cmds", "df": "store_cmds", "inspect": "store_cmds",
    "history": "store_cmds", "tag": "store_cmds", "rmi": "store_cmds",
    "prune": "store_cmds", "mount": "store_cmds", "unmount": "store_cmds",
    "fsck": "store_cmds",
}


class _Interrupted(Exception):
    """Ctrl-C while a command ran (click would print an empty line before its own message)."""


class _StdoutBroken(Exception):
    """The reader of stdout went away (`layerfs diff A B | head -1`)."""


def _stdout_broken() -> bool:
    """Whether fd 1 is a pipe whose reading end is closed (poll reports POLLERR)."""
    try:
        p = select.poll()
        p.register(1, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's last flush cannot fail."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def invoke(self, ctx):
        # click would turn these into its own exit status (1 for a broken pipe,
        # whatever standalone_mode says); main() maps them itself
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None
        except OSError as e:
            if e.errno == errno.EPIPE and _stdout_broken():
                raise _StdoutBroken() from None
            raise

    def _load(self, name: str) -> None:
        module = COMMANDS.get(name)
        if module and name not in self.commands:
            importlib.import_module(f"{__name__}.{module}")  # registers on `cli`

    def list_commands(self, ctx):
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx, name):
        self._load(name)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="layerfs")
@click.option("--root", type=click.Path(file_okay=False), default=None, envvar="LAYERFS_ROOT",
              help="Image store directory (default /var/lib/layerfs as root, else "
                   "~/.local/share/layerfs).")
@click.option("--driver", default=None, envvar="LAYERFS_DRIVER",
              help="Storage driver of the image store (chosen on first use, then remembered).")
@click.pass_context
def cli(ctx, root, driver):
    """Container image layers and storage drivers."""
    # The store is opened lazily by the commands that use it (store_cmds.py).
    ctx.ensure_object(dict).update(root=root, driver=driver)


#: errnos that say something about the system (a full disk, a permission), which
#: the C core's messages ("cannot write file data", "opening directory") leave out
_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                  errno.EFBIG, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EMLINK,
                  errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG,
                  errno.EXDEV, errno.EBUSY, errno.ETXTBSY, errno.ENOTEMPTY, errno.EEXIST,
                  errno.ESTALE, errno.ENXIO, errno.ENODEV, errno.EOVERFLOW}


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and isinstance(e.filename, bytes):
        e.filename = os.fsdecode(e.filename)        # not "b'/path'"
    if isinstance(e, LayerError):
        text = str(e)
        # the typed errors (NotFound, ...) word their own reason; a plain one may
        # carry only what was being done when the system call failed
        if type(e) is LayerError and e.errno in _SYSTEM_ERRNOS:
            reason = os.strerror(e.errno)
            if reason.lower() not in text.lower():
                text = f"{text}: {reason}"
        return text
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return str(e) or e.__class__.__name__


class _ClosedFd(io.RawIOBase):
    """Stands for a standard output the command was started without (`>&-`):
    writing to it fails, as writing to a closed descriptor does."""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        raise OSError(errno.EBADF, f"{os.strerror(errno.EBADF)} (it is closed)",
                      "standard output")


def _closed_stdout() -> bool:
    """When fd 1 is closed: occupy it (files opened later must not become
    "stdout") and make sys.stdout a stream whose writes fail."""
    if sys.stdout is not None:
        return False
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if fd != 1:
            os.close(fd)
    except OSError:
        pass
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(_ClosedFd()), encoding="utf-8",
                                  errors="surrogateescape")
    return True


def _bytes_safe_stdout() -> None:
    """Paths are bytes: names that are not valid in the encoding go out as they
    are (as the filesystem encoding decoded them), like ls and diff print them."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="surrogateescape")
        except (OSError, ValueError):
            pass


def main(argv: Optional[List[str]] = None) -> int:
    closed = _closed_stdout()
    _bytes_safe_stdout()
    try:
        return _main(argv)
    finally:
        if closed:
            sys.stdout = None       # what could not be written is dropped at exit


def _main(argv: Optional[List[str]]) -> int:
    try:
        rv = cli.main(args=argv, prog_name="layerfs", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.Abort:
        click.echo("layerfs: aborted", err=True)
        return EXIT_ERROR
    except click.ClickException as e:
        click.echo(f"layerfs: error: {e.format_message()}", err=True)
        return EXIT_ERROR
    except (KeyboardInterrupt, _Interrupted):
        click.echo("layerfs: interrupted", err=True)
        return EXIT_ERROR
    except _StdoutBroken:
        _silence_stdout()
        return EXIT_ERROR
    except (OSError, ValueError) as e:
        click.echo(f"layerfs: error: {_describe(e)}", err=True)
        return EXIT_ERROR
    return rv if isinstance(rv, int) else EXIT_OK


def run():  # console_scripts entry point
    _leave(main())


def _leave(code: int) -> None:
    """Exit as the interpreter would -- threads that are not daemons joined,
    atexit handlers run, the standard streams flushed -- but without its
    finalization, which takes each module and object apart one by one (about
    10 ms, a good part of a short command's run)."""
    import atexit
    import threading
    main_thread = threading.main_thread()
    for t in threading.enumerate():
        if t is not main_thread and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError) as e:
            if stream is not sys.stdout:
                continue                    # stderr: nowhere left to say it
            code = EXIT_ERROR
            if not (isinstance(e, OSError) and e.errno == errno.EPIPE):
                try:
                    sys.stderr.write(f"layerfs: error: standard output: {_describe(e)}\n")
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
    os._exit(code)
