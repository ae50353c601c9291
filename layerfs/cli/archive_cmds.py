"""Verbs on layer archives: unpack, digest."""
from __future__ import annotations

import errno
import os
import time

import click

from . import cli
from ._output import emit_json, human_size, progress, progress_enabled
from ..archive import unpack_layers
from ..archive.apply import stages
from ..digest import chain_id, layer_digests

JSON_VERSION = 1


@cli.command()
@click.argument("layers", nargs=-1, required=True, type=click.Path(dir_okay=False, allow_dash=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--whiteouts", type=click.Choice(["apply", "overlay", "keep"]), default="apply",
              show_default=True, help="How whiteouts are written.")
@click.option("--owners", type=click.Choice(["keep", "skip"]), default="keep", show_default=True,
              help="skip: do not chown (for running unprivileged).")
@click.option("--skip-devices", is_flag=True, help="Do not create device nodes (warn instead).")
@click.option("--no-xattrs", is_flag=True, help="Do not set extended attributes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def unpack(layers, dest, as_json, whiteouts, owners, skip_devices, no_xattrs, quiet):
    """Apply LAYERS in order onto DEST (flatten an image).

    Each layer is a tar, tar.gz or tar.zst; its digest and DiffID are computed in
    the same pass. A DEST that is missing or empty is built in a temporary
    directory beside it and appears only when every layer applied.
    """
    show = progress_enabled(quiet)
    start = time.monotonic()

    def on_layer(i, name, r):
        progress(f"layer {i + 1}/{len(layers)} {name}: {r.entries} entries, "
                 f"{human_size(r.tar_size)} ({r.compression})", show)

    # a symlink to a directory stands for that directory (the staging directory
    # of an empty one is renamed onto it, which a symlink in its place refuses)
    target = os.path.realpath(dest) if os.path.islink(dest) and os.path.isdir(dest) else dest
    made = _missing_parents(target)             # made for DEST; removed again on failure
    if stages(target):
        _check_can_make(dest, made[-1] if made else os.path.dirname(os.path.normpath(target)))
    try:
        results = unpack_layers(layers, target, whiteouts=whiteouts, owners=owners,
                                skip_devices=skip_devices, no_xattrs=no_xattrs,
                                progress=on_layer)
    except BaseException:
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    warnings = sum(r.warnings for r in results)
    if warnings:
        first = next(r.first_warning for r in results if r.warnings)
        click.echo(f"layerfs: warning: {warnings} item(s) skipped; first: {first}", err=True)
    chain = chain_id([r.diff_id for r in results])
    if as_json:
        emit_json({"version": JSON_VERSION, "dest": dest, "chain_id": chain,
                   "layers": [r.as_dict() for r in results]})
    else:
        for r in results:
            click.echo(f"{r.source}\tdigest {r.digest}\tdiff_id {r.diff_id}\t{r.entries} entries")
        click.echo(f"chain_id {chain}")
    progress(f"unpacked {len(results)} layer(s) into {dest} in {time.monotonic() - start:.2f}s", show)
    return 0


def _missing_parents(dest: str):
    """DEST's ancestors that do not exist yet, deepest first."""
    out = []
    p = os.path.dirname(os.path.normpath(dest))     # relative stays relative: the working
    while p and p != os.path.dirname(p) and not os.path.lexists(p):    # directory's parents
        out.append(p)                               # may be closed to this user
        p = os.path.dirname(p)
    return out


def _check_can_make(dest: str, where: str) -> None:
    """A missing or empty DEST is built in a directory staged beside it: refuse
    early, naming the directory, when this user cannot create anything there."""
    anc = where or "."
    while not os.path.lexists(anc) and anc != os.path.dirname(anc):
        anc = os.path.dirname(anc) or "."
    if os.path.isdir(anc) and not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"{os.strerror(errno.EACCES)} (cannot make "
                              f"{dest} in this directory)", anc)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def digest(files, as_json):
    """Print the digest (of the bytes) and DiffID (of the tar) of layer FILES."""
    docs = []
    for f in files:
        d = layer_digests(f, check_tar=True)
        docs.append({"file": f, "digest": d.digest, "diff_id": d.diff_id,
                     "compression": d.compression, "size": d.compressed_size,
                     "tar_size": d.tar_size})
        if not as_json:
            click.echo(f"{f}\tdigest {d.digest}\tdiff_id {d.diff_id}\t{d.compression}")
    if as_json:
        emit_json({"version": JSON_VERSION, "files": docs})
    return 0
